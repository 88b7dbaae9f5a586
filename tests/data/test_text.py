import pytest
import torch

from spadeformer.data.lra_common import BYTE_VOCAB_SIZE, CorruptFileError, PadCollate
from spadeformer.data.text import ByteTextClassificationDataset, imdb


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))


@pytest.fixture
def aclimdb(tmp_path):
    """A miniature aclImdb: train/{neg,pos,unsup}, test/{neg,pos}, plus the release's extras."""
    root = tmp_path / "aclImdb"
    write(root / "train" / "pos" / "0_9.txt", "Great film.<br /><br />Loved it")
    write(root / "train" / "pos" / "1_7.txt", "Très bien — naïve charm ☺")
    write(root / "train" / "neg" / "0_2.txt", "Dull.")
    write(root / "train" / "unsup" / "0_0.txt", "no label")
    write(root / "train" / "labeledBow.feat", "0 0:1\n")
    write(root / "test" / "neg" / "0_1.txt", "Awful " * 2000)
    write(root / "test" / "pos" / "0_10.txt", "Fine")
    write(root / "imdb.vocab", "the\n")
    return root


def ids_of(text):
    return [b + 1 for b in text.encode("utf-8")]  # documented: byte b -> id b + 1, 0 = pad


def test_imdb_reads_bytes_labels_and_ignores_unsup(aclimdb):
    ds = imdb(aclimdb, "train")
    assert ds.classes == ["neg", "pos"] and len(ds) == 3
    by_name = {f.name: i for i, f in enumerate(ds.files)}
    item = ds[by_name["0_9.txt"]]
    assert item["input_ids"].dtype == torch.long
    assert item["input_ids"].tolist() == ids_of("Great film.<br /><br />Loved it")
    assert int(item["labels"]) == 1
    accented = ds[by_name["1_7.txt"]]["input_ids"].tolist()
    assert accented == ids_of("Très bien — naïve charm ☺")
    assert max(accented) <= 256 and len(accented) > len("Très bien — naïve charm ☺")
    assert int(ds[by_name["0_2.txt"]]["labels"]) == 0
    assert ds.vocab_size == BYTE_VOCAB_SIZE == 257


def test_truncation_to_max_length(aclimdb):
    ds = imdb(aclimdb, "test")
    lengths = sorted(len(ds[i]["input_ids"]) for i in range(len(ds)))
    assert lengths == [4, 4096]
    short = imdb(aclimdb, "test", max_length=10)
    by_name = {f.name: i for i, f in enumerate(short.files)}
    assert short[by_name["0_1.txt"]]["input_ids"].tolist() == ids_of("Awful Awfu")


def test_general_folder_per_class_layout_sorted_ids(tmp_path):
    for name, text in [("zebra", "z"), ("apple", "a"), ("mango", "m")]:
        write(tmp_path / "data" / name / "x.txt", text)
    ds = ByteTextClassificationDataset(tmp_path / "data", split=None)
    assert ds.classes == ["apple", "mango", "zebra"]
    got = {chr(int(ds[i]["input_ids"][0]) - 1): int(ds[i]["labels"]) for i in range(3)}
    assert got == {"a": 0, "m": 1, "z": 2}
    sub = ByteTextClassificationDataset(tmp_path / "data", split=None, classes=["zebra", "apple"])
    assert sub.classes == ["apple", "zebra"] and len(sub) == 2
    write(tmp_path / "data" / ".ipynb_checkpoints" / "x.txt", "n")  # hidden: not a class
    assert ByteTextClassificationDataset(tmp_path / "data", split=None).classes == ds.classes
    # hidden files are no documents: an empty .keep.txt, a macOS ._x.txt that is not UTF-8
    write(tmp_path / "data" / "apple" / ".keep.txt", "")
    (tmp_path / "data" / "apple" / "._x.txt").write_bytes(b"\x00\x05\x16\x07\xff\xfe")
    (tmp_path / "data" / "apple" / "sub.txt").mkdir()  # a folder is no document either
    assert ByteTextClassificationDataset(tmp_path / "data", split=None).files == ds.files


def test_collate_pads_documents(aclimdb):
    ds = imdb(aclimdb, "train")
    batch = PadCollate()([ds[i] for i in range(3)])
    lengths = [len(ds[i]["input_ids"]) for i in range(3)]
    assert batch["input_ids"].shape == (3, max(lengths))
    assert batch["padding_mask"].sum(1).tolist() == [max(lengths) - n for n in lengths]
    assert (batch["input_ids"][batch["padding_mask"]] == 0).all()
    assert batch["labels"].shape == (3,)


def test_errors_name_missing_and_corrupt_files(tmp_path, aclimdb):
    expected = r"nowhere does not exist; expected layout: <root>/<split>/<class>"
    with pytest.raises(FileNotFoundError, match=expected):
        imdb(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        imdb(aclimdb, "dev")
    (aclimdb / "test" / "pos" / "0_10.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"test/pos holds no \*\.txt files"):
        imdb(aclimdb, "test")
    write(aclimdb / "train" / "neg" / "1_1.txt", b"bad \xff\xfe bytes")
    with pytest.raises(CorruptFileError, match=r"1_1.txt: not UTF-8 text"):
        imdb(aclimdb, "train")
    with pytest.raises(FileNotFoundError, match=r"train/missing does not exist"):
        ByteTextClassificationDataset(aclimdb, "train", classes=["neg", "missing"])
    write(aclimdb / "train" / "neg" / "1_1.txt", b"")
    with pytest.raises(CorruptFileError, match=r"1_1.txt: empty document \(0 bytes\)"):
        imdb(aclimdb, "train")
