import hashlib
import math
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from spadeformer.data.batching import EpochSampler, collate_batch, fetch_batch
from spadeformer.data.corpus import (
    FILE_SEPARATOR,
    SPLITS,
    VOCAB_SIZE,
    BlockDataset,
    ByteCorpus,
    assign_split,
    list_source_files,
    load_split,
    unigram_bpb,
    unigram_bpb_ref,
)


def _tree(root: Path, n: int = 80) -> Path:
    rng = np.random.default_rng(1)
    for i in range(n):
        path = root / ("a" if i % 2 else "b") / f"f{i:03d}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        # Each file starts with its own name so splits can be recovered from the bytes.
        body = bytes(rng.integers(97, 123, size=int(rng.integers(50, 300))).astype(np.uint8))
        path.write_bytes(f"#@{path.relative_to(root).as_posix()}@\n".encode() + body)
    for skipped in ("site-packages/x.py", "test/test_y.py", "a/tests/t.py",
                    "a/idle_test/z.py", "__pycache__/c.py"):
        (root / skipped).parent.mkdir(parents=True, exist_ok=True)
        (root / skipped).write_bytes(b"#@SKIPPED@\n")
    (root / "readme.txt").write_bytes(b"#@TXT@\n")
    return root


@pytest.fixture
def tree(tmp_path):
    return _tree(tmp_path / "src")


def test_file_listing_skips_site_packages_tests_and_non_python(tree):
    files = list_source_files(tree)
    assert len(files) == 80 and files == sorted(files)
    assert all(f.endswith(".py") and "site-packages" not in f for f in files)
    with_tests = list_source_files(tree, include_tests=True)
    assert set(with_tests) - set(files) == {"test/test_y.py", "a/tests/t.py", "a/idle_test/z.py"}


def test_split_is_deterministic_disjoint_and_by_file(tree):
    corpus = ByteCorpus(tree)
    per_split = {s: corpus.files(s) for s in SPLITS}
    all_files = list_source_files(tree)
    # Disjoint and complete.
    assert sorted(sum(per_split.values(), [])) == all_files
    assert all(not set(per_split[a]) & set(per_split[b]) for a in SPLITS for b in SPLITS if a < b)
    # The rule is the SHA-1 of the relative path (independent recomputation).
    for f in all_files:
        u = int(hashlib.sha1(f.encode()).hexdigest()[:16], 16) / 2**64
        assert assign_split(f) == ("train" if u < 0.9 else "val" if u < 0.95 else "test")
    # The bytes of each split are exactly its files, sorted, joined by the separator.
    for s in SPLITS:
        want = FILE_SEPARATOR.join((tree / f).read_bytes() for f in per_split[s])
        got = corpus.bytes(s)
        assert got.dtype == torch.uint8 and bytes(got.numpy()) == want
        names = {m.split(b"@")[0].decode() for m in bytes(got.numpy()).split(b"#@")[1:]}
        assert names == set(per_split[s])
    # Deterministic: a fresh listing (different order on disk is irrelevant) gives the same.
    assert torch.equal(load_split("val", root=tree), corpus.bytes("val"))
    # Splits do not depend on which other files exist: drop half the files, the rest keep theirs.
    for f in all_files[::2]:
        (tree / f).unlink()
    fresh = ByteCorpus(tree, fractions=(0.9, 0.05, 0.05), max_bytes=10**9)  # new cache key
    for s in SPLITS:
        assert set(fresh.files(s)) <= set(per_split[s])


def test_fractions_change_the_split_and_are_validated(tree):
    every = list_source_files(tree)
    assert all(assign_split(f, (0.0, 1.0, 0.0)) == "val" for f in every)
    with pytest.raises(ValueError, match="fractions"):
        ByteCorpus(tree, fractions=(0.9, 0.2, 0.05))
    with pytest.raises(ValueError, match="split"):
        load_split("dev", root=tree)
    with pytest.raises(FileNotFoundError, match="root"):
        list_source_files(tree / "missing")


def test_max_bytes_caps_each_split(tree):
    full = ByteCorpus(tree)
    capped = ByteCorpus(tree, max_bytes=500)
    for s in SPLITS:
        n = min(500, full.bytes(s).numel())
        assert torch.equal(capped.bytes(s), full.bytes(s)[:n])


def test_returned_tensors_are_copies_of_the_cache(tree):
    corpus = ByteCorpus(tree)
    a = corpus.bytes("train")
    a.zero_()
    assert corpus.bytes("train").sum() > 0


def test_block_dataset_shapes_and_shift():
    data = torch.arange(103, dtype=torch.int64).to(torch.uint8)
    ds = BlockDataset(data, seq_len=10)
    assert len(ds) == 10  # (103 - 11) // 10 + 1
    item = ds[3]
    assert item["input_ids"].shape == (10,) and item["input_ids"].dtype == torch.int64
    assert item["input_ids"].tolist() == list(range(30, 40))
    assert item["labels"].tolist() == list(range(31, 41))
    batch = ds.get_batch([0, 9, 3])
    assert batch["input_ids"].shape == (3, 10) and batch["labels"].shape == (3, 10)
    assert torch.equal(batch["input_ids"][2], item["input_ids"])
    assert torch.equal(batch["labels"], collate_batch([ds[0], ds[9], ds[3]])["labels"])
    # Every byte after the first is a target exactly once when blocks tile the data.
    targets = torch.cat([ds[i]["labels"] for i in range(len(ds))])
    assert targets.tolist() == list(range(1, 101))
    overlapping = BlockDataset(data, seq_len=10, stride=5)
    assert len(overlapping) == 19 and overlapping[1]["input_ids"][0] == 5
    with pytest.raises(IndexError):
        ds[10]
    with pytest.raises(ValueError, match="seq_len"):
        BlockDataset(data, seq_len=0)
    with pytest.raises(ValueError, match="fewer than one block"):
        BlockDataset(data[:5], seq_len=10)
    # integer data is taken as bytes only when every value is one (a cast would wrap 300 to 44)
    wide = torch.arange(20, dtype=torch.int64)
    assert BlockDataset(wide, seq_len=4)[1]["input_ids"].tolist() == [4, 5, 6, 7]
    assert BlockDataset(wide.numpy().astype("uint16"), seq_len=4)[0]["labels"].tolist() == [
        1, 2, 3, 4]
    for bad, match in [(torch.tensor([300, 1, 2, 3, 4, 5]), r"0..255, got torch.int64 .*300\]"),
                       (torch.tensor([-1, 1, 2, 3, 4, 5]), r"\[-1, 5\]"),
                       (torch.rand(10), "integer byte values, got torch.float32"),
                       (torch.rand(10).numpy(), "integer byte values, got a numpy float32"),
                       (np.array([1, 2, 3, 4, 256, 5], dtype=np.uint16), r"numpy uint16 .*256\]")]:
        with pytest.raises(ValueError, match=match):
            BlockDataset(bad, seq_len=4)


def test_block_dataset_shares_a_uint8_memmap(tmp_path):
    # A corpus larger than RAM arrives as a read-only uint8 memmap: it is read in place (no
    # int64 copy at 8x its size) and without torch's "not writable" warning.
    path = tmp_path / "ids.bin"
    np.arange(200, dtype=np.uint8).tofile(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = BlockDataset(mm, seq_len=9)
    assert ds.data.data_ptr() == mm.ctypes.data  # same buffer, not a copy
    assert ds.get_batch([1])["labels"].tolist() == [list(range(10, 19))]


def test_sampler_is_a_function_of_seed_and_position():
    s = EpochSampler(7, seed=3)
    stream = s.indices(0, 21)
    # Every epoch is a permutation; epochs differ.
    epochs = [stream[i:i + 7] for i in range(0, 21, 7)]
    assert all(sorted(e) == list(range(7)) for e in epochs)
    assert epochs[0] != epochs[1] or epochs[1] != epochs[2]
    # Any window read later, by a fresh sampler, is the same slice of the stream.
    fresh = EpochSampler(7, seed=3)
    assert fresh.indices(5, 10) == stream[5:15]
    assert EpochSampler(7, seed=4).indices(0, 21) != stream
    assert EpochSampler(5, seed=0, shuffle=False).indices(3, 4) == [3, 4, 0, 1]


def test_collate_pads_variable_length_and_marks_padding():
    items = [{"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor(1)},
             {"input_ids": torch.tensor([8]), "labels": torch.tensor(0)}]
    batch = collate_batch(items)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["padding_mask"].tolist() == [[False, False, False], [False, True, True]]
    assert batch["labels"].tolist() == [1, 0]
    assert fetch_batch(items, [1, 0])["input_ids"].tolist() == [[8, 0, 0], [5, 6, 7]]


def test_unigram_baseline_matches_an_independent_count(tree):
    corpus = ByteCorpus(tree)
    train, val = bytes(corpus.bytes("train").numpy()), bytes(corpus.bytes("val").numpy())
    counts = Counter(train)
    expected = -sum(math.log2((counts.get(b, 0) + 1) / (len(train) + 256)) for b in val) / len(val)
    assert corpus.unigram_bpb("val") == pytest.approx(expected, rel=1e-12)
    # Fast path vs its pure-Python twin, including bytes never seen in train.
    a = torch.tensor([1, 1, 2, 3], dtype=torch.uint8)
    b = torch.tensor([1, 255, 2, 2, 0], dtype=torch.uint8)
    assert unigram_bpb(a, b) == pytest.approx(unigram_bpb_ref(bytes(a.tolist()), bytes(b.tolist())),
                                              rel=1e-12)
    # Sanity: a uniform-looking split costs close to, but not more than, 8 bits + smoothing.
    assert 0 < corpus.unigram_bpb("val") < math.log2(VOCAB_SIZE) + 0.5


def test_real_stdlib_corpus_is_usable():
    files = list_source_files()
    assert any(f == "os.py" for f in files)
    assert not any("site-packages" in f or f.startswith("test/") for f in files)
    corpus = ByteCorpus(max_bytes=200_000)
    sizes = {s: len(corpus.files(s)) for s in SPLITS}
    assert all(sizes[s] > 0 for s in SPLITS)
    assert 0.8 < sizes["train"] / len(files) < 0.97  # ~90% of the files
    val = corpus.bytes("val")
    assert val.numel() == 200_000
    ds = corpus.dataset("val", seq_len=256)
    assert len(ds) == (200_000 - 257) // 256 + 1
    bpb = corpus.unigram_bpb("val")
    assert 3.5 < bpb < 6.5  # source code: a unigram model does far better than 8 bits
