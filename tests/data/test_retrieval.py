import pytest
import torch

from spadeformer.data.lra_common import CorruptFileError, PadCollate
from spadeformer.data.retrieval import AANDataset, parse_aan_text

DOC_A = "Parsing with CCG.\nWe present\ta parser — 95% F1, \"quoted\" and 'single'.".encode()
DOC_B = b"Binary \x00\xff\xe9 bytes and a backslash \\ here"
DOC_C = ("x" * 5000).encode()


def line(label, id1, id2, t1, t2):
    # the release wrote str(bytes) for each text, i.e. Python's repr of a bytes object
    return "\t".join([label, id1, id2, repr(t1), repr(t2)])


@pytest.fixture
def aan(tmp_path):
    root = tmp_path / "tsv_data"
    root.mkdir()
    rows = {
        "train": [line("1", "P1", "P2", DOC_A, DOC_B), line("0.0", "P1", "P3", DOC_A, DOC_C),
                  line("1.0", "P3", "P2", DOC_C, DOC_B)],
        "eval": [line("0", "P2", "P1", DOC_B, DOC_A)],
        "test": [line("1", "P3", "P3", DOC_C, DOC_C)],
    }
    for split, lines in rows.items():
        (root / f"new_aan_pairs.{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def ids(data: bytes):
    return [b + 1 for b in data]


def test_reads_pairs_bytes_and_labels(aan):
    ds = AANDataset(aan, "train")
    assert len(ds) == 3 and ds.vocab_size == 257
    item = ds[0]
    assert set(item) == {"input_ids_1", "input_ids_2", "labels"}
    assert item["input_ids_1"].dtype == torch.long
    assert item["input_ids_1"].tolist() == ids(DOC_A)
    assert item["input_ids_2"].tolist() == ids(DOC_B)
    assert [int(ds[i]["labels"]) for i in range(3)] == [1, 0, 1]
    assert ds[1]["input_ids_2"].tolist() == ids(DOC_C[:4000])  # 4000 bytes per document
    assert len(ds.documents) == 3  # repeated documents are stored once
    assert torch.equal(ds[2]["input_ids_2"], ds[0]["input_ids_2"])


def test_splits_and_single_file(aan):
    assert int(AANDataset(aan, "val")[0]["labels"]) == 0  # val = the release's eval file
    assert AANDataset(aan, "eval")[0]["input_ids_1"].tolist() == ids(DOC_B)
    assert len(AANDataset(aan / "new_aan_pairs.test.tsv")) == 1
    short = AANDataset(aan, "test", max_length=7)
    assert short[0]["input_ids_1"].tolist() == ids(b"xxxxxxx")


def test_parse_is_literal_only(tmp_path):
    assert parse_aan_text("b'a\\tb\\n'") == b"a\tb\n"
    assert parse_aan_text('b"it\'s"') == b"it's"
    assert parse_aan_text("plain text é") == "plain text é".encode()
    marker = tmp_path / "pwned"
    evil = f"b'' + __import__('pathlib').Path({str(marker)!r}).touch()"
    with pytest.raises(ValueError):
        parse_aan_text(evil)
    assert not marker.exists()


def test_collate_gives_two_masks(aan):
    ds = AANDataset(aan, "train")
    batch = PadCollate()([ds[0], ds[1]])
    assert set(batch) == {"input_ids_1", "padding_mask_1", "input_ids_2", "padding_mask_2",
                          "labels"}
    assert batch["input_ids_2"].shape == (2, 4000)
    assert batch["padding_mask_2"][0].sum() == 4000 - len(DOC_B)
    assert not batch["padding_mask_1"].any()  # both first documents are DOC_A


def test_errors_name_missing_and_corrupt_files(tmp_path, aan):
    expected = r"nope does not exist; expected layout: new_aan_pairs"
    with pytest.raises(FileNotFoundError, match=expected):
        AANDataset(tmp_path / "nope")
    (aan / "new_aan_pairs.eval.tsv").unlink()
    with pytest.raises(FileNotFoundError, match=r"new_aan_pairs.eval.tsv does not exist"):
        AANDataset(aan, "val")
    with pytest.raises(ValueError, match="split must be one of"):
        AANDataset(aan, "dev")

    bad = tmp_path / "bad.tsv"
    bad.write_text(line("1", "a", "b", b"x", b"y") + "\n1\ta\tb\tb'x'\n")
    with pytest.raises(CorruptFileError, match=r"bad.tsv:2: expected 5 tab-separated fields"):
        AANDataset(bad)
    bad.write_text("2\ta\tb\tb'x'\tb'y'\n")
    with pytest.raises(CorruptFileError, match=r"bad.tsv:1: label must be 0 or 1, got '2'"):
        AANDataset(bad)
    bad.write_text(line("1", "a", "b", b"x", b"y") + "\n" + line("0", "a", "c", b"x", b"") + "\n")
    with pytest.raises(CorruptFileError, match=r"bad.tsv:2: text 2 of the pair is empty"):
        AANDataset(bad)
    bad.write_text("1\ta\tb\tb'unterminated\tb'y'\n")
    with pytest.raises(CorruptFileError, match=r"bad.tsv:1: a text field is not a valid bytes"):
        AANDataset(bad)
    bad.write_text("")
    with pytest.raises(CorruptFileError, match="holds no pairs"):
        AANDataset(bad)
