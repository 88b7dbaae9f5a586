import pickle

import numpy as np
import pytest
import torch

from spadeformer.data.image import Cifar10GrayDataset, load_cifar_batch, rgb_to_gray
from spadeformer.data.lra_common import CorruptFileError


def tf_gray(r, g, b):
    """TF's rgb_to_grayscale of one uint8 pixel (float64 here; TF's float32 may differ by
    one grey level where the value sits within float32 error of an integer) -> (level, exact
    value before truncation)."""
    y = (0.2989 * r + 0.5870 * g + 0.1140 * b) / 255 * 255.5
    return int(y), y


def write_batch(path, data, labels, py2_names=False):
    raw = pickle.dumps({b"batch_label": b"fixture", b"labels": list(labels), b"data": data,
                        b"filenames": [b"x.png"] * len(labels)}, protocol=2)
    if py2_names:  # the release was pickled by numpy 1.x under Python 2: numpy.core.*
        raw = raw.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
        assert b"cnumpy.core.multiarray\n" in raw
    path.write_bytes(raw)


@pytest.fixture
def cifar(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    batches = {}
    for k, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        data = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
        labels = [(k + j) % 10 for j in range(3)]
        write_batch(folder / name, data, labels, py2_names=(k % 2 == 0))
        batches[name] = (data, labels)
    return tmp_path, batches


def test_grayscale_is_tf_rgb_to_grayscale_per_pixel(cifar):
    root, batches = cifar
    ds = Cifar10GrayDataset(root, "train")
    assert len(ds) == 15 and ds.vocab_size == 256 and ds.num_classes == 10
    n = 0
    for i in range(1, 6):
        data, labels = batches[f"data_batch_{i}"]
        for j in range(3):
            item = ds[n]
            assert item["input_ids"].dtype == torch.long and item["input_ids"].shape == (1024,)
            row = data[j].tolist()
            got = item["input_ids"].tolist()
            for p in range(1024):
                level, y = tf_gray(row[p], row[1024 + p], row[2048 + p])
                if abs(y - round(y)) > 1e-4:  # not on a truncation boundary
                    assert got[p] == level, (p, row[p], row[1024 + p], row[2048 + p])
                else:
                    assert got[p] in (level - 1, level, level + 1)
            assert int(item["labels"]) == labels[j]
            n += 1


def test_grayscale_truncates_like_tf_with_its_weights():
    # TF truncates Y * 255.5 and its weights sum to 0.9999: values a rounding BT.601 luma
    # (0.299, 0.587, 0.114, half up) gets one level higher
    pixels = [(17, 91, 0), (100, 150, 200), (1, 0, 0), (255, 255, 255), (0, 0, 0), (255, 0, 0)]
    rows = np.zeros((1, 3072), dtype=np.uint8)
    for p, (r, g, b) in enumerate(pixels):
        rows[0, p], rows[0, 1024 + p], rows[0, 2048 + p] = r, g, b
    gray = rgb_to_gray(rows)
    assert gray.dtype == np.uint8 and gray.shape == (1, 1024)
    # 58.61 -> 58 (rounded luma: 59); 141.02; 0.30 -> 0; 255.47 -> 255; 0; 76.21 -> 76
    assert gray[0, :6].tolist() == [58, 141, 0, 255, 0, 76]
    assert gray[0, 6:].max() == 0


def test_test_split_and_batches_folder_as_root(cifar):
    root, batches = cifar
    ds = Cifar10GrayDataset(root / "cifar-10-batches-py", "test")
    assert len(ds) == 3
    assert [int(ds[i]["labels"]) for i in range(3)] == batches["test_batch"][1]
    with pytest.raises(ValueError, match="split must be one of"):
        Cifar10GrayDataset(root, "val")


def test_errors_name_missing_and_corrupt_files(cifar, tmp_path):
    root, _ = cifar
    folder = root / "cifar-10-batches-py"
    expected = r"data_batch_1 does not exist; expected layout: <root>/cifar-10-batches-py"
    with pytest.raises(FileNotFoundError, match=expected):
        Cifar10GrayDataset(tmp_path / "elsewhere")
    (folder / "data_batch_3").write_bytes(b"this is not a pickle")
    with pytest.raises(CorruptFileError, match=r"data_batch_3: not a readable CIFAR-10 batch"):
        Cifar10GrayDataset(root)
    write_batch(folder / "data_batch_3", np.zeros((2, 100), dtype=np.uint8), [0, 1])
    with pytest.raises(CorruptFileError, match=r"b'data' must be uint8 \(N, 3072\)"):
        Cifar10GrayDataset(root)
    write_batch(folder / "data_batch_3", np.zeros((2, 3072), dtype=np.uint8), [0, 10])
    with pytest.raises(CorruptFileError, match=r"b'labels' must be 2 ints in 0..9"):
        load_cifar_batch(folder / "data_batch_3")
    (folder / "test_batch").unlink()
    with pytest.raises(FileNotFoundError, match="test_batch does not exist"):
        Cifar10GrayDataset(root, "test")


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def test_pickle_loading_refuses_arbitrary_globals(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "data_batch_1"
    bad.write_bytes(pickle.dumps({b"data": _Evil(marker), b"labels": [0]}, protocol=2))
    with pytest.raises(CorruptFileError, match=r"global .* is not allowed in a CIFAR-10 batch"):
        load_cifar_batch(bad)
    assert not marker.exists()


def test_validation_split_carved_from_train(cifar):
    from spadeformer.data.lra_common import split_indices, subset

    root, _ = cifar
    train = Cifar10GrayDataset(root, "train")
    tr, va = split_indices(len(train), (0.8, 0.2), seed=3)
    assert len(tr) == 12 and len(va) == 3
    assert sorted(np.concatenate([tr, va]).tolist()) == list(range(15))
    again = split_indices(len(train), (0.8, 0.2), seed=3)
    assert all((a == b).all() for a, b in zip(again, (tr, va), strict=True))
    val = subset(train, va)
    assert torch.equal(val[0]["input_ids"], train[int(va[0])]["input_ids"])
    with pytest.raises(ValueError, match="fractions must be positive and sum to 1"):
        split_indices(10, (0.5, 0.6))
