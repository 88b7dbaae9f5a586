import random
import statistics

import pytest
import torch

from spadeformer.data.listops import (
    VOCAB,
    ListOpsDataset,
    generate_listops,
    sample_tree,
    sample_tree_ref,
    tree_ref_to_string,
    tree_ref_value,
)
from spadeformer.data.lra_common import CorruptFileError, PadCollate

OPS = {"[MIN", "[MAX", "[MED", "[SM"}


# --- an evaluator and renderer written independently of the package --------------------------


def parse(tokens):
    """Bracket-free prefix tokens -> nested (op, [args]) / int, via recursion."""
    pos = 0

    def node():
        nonlocal pos
        tok = tokens[pos]
        pos += 1
        if tok in OPS:
            args = []
            while tokens[pos] != "]":
                args.append(node())
            pos += 1
            return (tok, args)
        assert tok.isdigit() and len(tok) == 1, tok
        return int(tok)

    tree = node()
    assert pos == len(tokens), "trailing tokens"
    return tree


def value(tree):
    if isinstance(tree, int):
        return tree
    op, args = tree
    vals = [value(a) for a in args]
    if op == "[MIN":
        return min(vals)
    if op == "[MAX":
        return max(vals)
    if op == "[SM":
        return sum(vals) % 10
    return int(statistics.median(vals))  # the release: int(np.median(...))


def release_string(tree):
    """The release's to_string of its left-nested tuples ((((op, a), b), c), ']')."""

    def to_tuple(t):
        if isinstance(t, int):
            return t
        op, args = t
        acc = (op, to_tuple(args[0]))
        for a in args[1:]:
            acc = (acc, to_tuple(a))
        return (acc, "]")

    def render(t):
        return f"( {render(t[0])} {render(t[1])} )" if isinstance(t, tuple) else str(t)

    return render(to_tuple(tree))


def depth(tree):
    return 1 if isinstance(tree, int) else 1 + max(depth(a) for a in tree[1])


# --- generator ---------------------------------------------------------------------------------


def test_fast_sampler_draws_exactly_the_release_construction():
    for seed in range(100):
        tokens, val, length = sample_tree(random.Random(seed), max_length=None)
        tree, ref_length = sample_tree_ref(random.Random(seed))
        assert " ".join(tokens) == tree_ref_to_string(tree)
        assert val == tree_ref_value(tree)
        assert length == ref_length


def test_sampler_abort_returns_none_only_for_long_trees():
    for seed in range(200):
        full = sample_tree(random.Random(seed), max_length=None)
        cut = sample_tree(random.Random(seed), max_length=60)
        if full[2] < 60:
            assert cut == full
        else:
            assert cut is None


def read_tsv(path):
    lines = path.read_text(encoding="utf-8").split("\n")
    assert lines[0] == "Source\tTarget"
    assert lines[-1] == ""
    return [tuple(line.split("\t")) for line in lines[1:-1]]


def test_generated_files_format_labels_lengths_and_uniqueness(tmp_path):
    paths = generate_listops(tmp_path, n_train=60, n_val=10, n_test=10, seed=3,
                             min_length=20, max_length=150, max_depth=6, progress=False)
    assert set(paths) == {"train", "val", "test"}
    assert paths["train"].name == "basic_train.tsv"
    rows = {split: read_tsv(p) for split, p in paths.items()}
    assert [len(rows[s]) for s in ("train", "val", "test")] == [60, 10, 10]
    sources = [src for split in rows.values() for src, _ in split]
    assert len(set(sources)) == len(sources)
    for src, target in (r for split in rows.values() for r in split):
        tokens = src.split(" ")
        bare = [t for t in tokens if t not in ("(", ")")]
        assert 20 < len(bare) < 150
        tree = parse(bare)
        assert not isinstance(tree, int)
        assert depth(tree) <= 6
        assert all(2 <= len(t[1]) <= 10 for t in _operators(tree))
        assert int(target) == value(tree)
        assert src == release_string(tree)


def _operators(tree):
    if isinstance(tree, int):
        return []
    return [tree] + [o for a in tree[1] for o in _operators(a)]


def test_default_length_bounds_and_label_spread(tmp_path):
    paths = generate_listops(tmp_path, n_train=40, n_val=0, n_test=0, seed=1, progress=False)
    rows = read_tsv(paths["train"])
    lengths = [len([t for t in src.split() if t not in ("(", ")")]) for src, _ in rows]
    assert all(500 < n < 2000 for n in lengths)
    for src, target in rows:
        assert int(target) == value(parse([t for t in src.split() if t not in ("(", ")")]))
    assert len({t for _, t in rows}) >= 4  # labels are not degenerate


def test_generation_is_seeded(tmp_path):
    kw = dict(n_train=15, n_val=3, n_test=3, min_length=10, max_length=80, progress=False)
    a = generate_listops(tmp_path / "a", seed=7, **kw)
    b = generate_listops(tmp_path / "b", seed=7, **kw)
    c = generate_listops(tmp_path / "c", seed=8, **kw)
    for split in ("train", "val", "test"):
        assert a[split].read_bytes() == b[split].read_bytes()
    assert a["train"].read_bytes() != c["train"].read_bytes()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(min_length=100, max_length=100), "max_length"),
        (dict(max_args=1), "max_args"),
        (dict(max_depth=1), "max_depth"),
        (dict(n_val=-1), "n_val"),
    ],
)
def test_generator_rejects_bad_config(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate_listops(tmp_path, progress=False, **kwargs)


# --- loader ------------------------------------------------------------------------------------

EXPECTED_ID = {"<pad>": 0, **{str(d): d + 1 for d in range(10)},
               "[MIN": 11, "[MAX": 12, "[MED": 13, "[SM": 14, "]": 15, "(": 16, ")": 17}


def write_fixture(path, lines, header=True, newline="\n"):
    text = ("Source\tTarget" + newline if header else "") + newline.join(lines) + newline
    path.write_bytes(text.encode("utf-8"))
    return path


def test_vocabulary_is_the_documented_one():
    assert {t: i for i, t in enumerate(VOCAB)} == EXPECTED_ID
    assert ListOpsDataset.vocab_size == 18


def test_loader_reads_release_format_with_and_without_brackets(tmp_path):
    lines = [
        "( ( ( [MAX 2 ) 9 ) ] )\t9",  # release form of [MAX 2 9]
        "( ( ( [SM 1 ) ( ( ( [MIN 4 ) 5 ) ] ) ) ] )\t5",
        "[MED 3 8 1 7 ]\t5",  # a bracket-free variant
    ]
    ds = ListOpsDataset(write_fixture(tmp_path / "basic_test.tsv", lines, newline="\r\n"))
    assert len(ds) == 3
    item = ds[0]
    assert item["input_ids"].dtype == torch.long and item["labels"].dtype == torch.long
    assert item["input_ids"].tolist() == [EXPECTED_ID[t] for t in "[MAX 2 9 ]".split()]
    assert ds[1]["input_ids"].tolist() == [EXPECTED_ID[t] for t in "[SM 1 [MIN 4 5 ] ]".split()]
    assert [int(ds[i]["labels"]) for i in range(3)] == [9, 5, 5]

    kept = ListOpsDataset(tmp_path / "basic_test.tsv", keep_brackets=True)
    assert kept[0]["input_ids"].tolist() == [
        EXPECTED_ID[t] for t in "( ( ( [MAX 2 ) 9 ) ] )".split()
    ]


def test_loader_on_generated_files_matches_independent_evaluation(tmp_path):
    paths = generate_listops(tmp_path, n_train=20, n_val=2, n_test=2, seed=0, min_length=30,
                             max_length=200, progress=False)
    ds = ListOpsDataset(paths["train"])
    inv = {i: t for t, i in EXPECTED_ID.items()}
    for i in range(len(ds)):
        tokens = [inv[int(j)] for j in ds[i]["input_ids"]]
        assert int(ds[i]["labels"]) == value(parse(tokens))


def test_loader_truncates_or_raises_on_long_sequences(tmp_path):
    path = write_fixture(tmp_path / "x.tsv", ["[SM " + "1 " * 30 + "]\t0"], header=False)
    assert len(ListOpsDataset(path, max_length=10)[0]["input_ids"]) == 10
    assert len(ListOpsDataset(path)[0]["input_ids"]) == 32
    with pytest.raises(ValueError, match=r"x.tsv:1: sequence has 32 tokens > max_length=10"):
        ListOpsDataset(path, max_length=10, truncate=False)


def test_loader_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope.tsv does not exist.*Source<TAB>Target"):
        ListOpsDataset(tmp_path / "nope.tsv")
    bad = write_fixture(tmp_path / "a.tsv", ["[MAX 1 2 ]\t2", "[FOO 1 2 ]\t2"])
    with pytest.raises(CorruptFileError, match=r"a.tsv:3: unknown token '\[FOO'"):
        ListOpsDataset(bad)
    bad = write_fixture(tmp_path / "b.tsv", ["[MAX 1 2 ]\t12"])
    with pytest.raises(CorruptFileError, match=r"b.tsv:2: Target must be a digit 0-9, got '12'"):
        ListOpsDataset(bad)
    for target in ("nan", "inf", "1e0", "-1", ""):
        bad = write_fixture(tmp_path / "t.tsv", [f"[MAX 1 2 ]\t{target}"])
        with pytest.raises(CorruptFileError, match=r"t.tsv:2: Target must be a digit 0-9"):
            ListOpsDataset(bad)
    ok = write_fixture(tmp_path / "ok.tsv", ["[MAX 1 2 ]\t2.0", "[MIN 3 4 ]\t 3 "])
    assert ListOpsDataset(ok).labels.tolist() == [2, 3]  # pandas re-saved, stray spaces
    bad = write_fixture(tmp_path / "c.tsv", ["[MAX 1 2 ] 2"])
    with pytest.raises(CorruptFileError, match=r"c.tsv:2: expected 2 tab-separated fields"):
        ListOpsDataset(bad)
    with pytest.raises(CorruptFileError, match="no examples"):
        ListOpsDataset(write_fixture(tmp_path / "d.tsv", []))


def test_collate_pads_to_batch_max_and_marks_padding(tmp_path):
    path = write_fixture(tmp_path / "e.tsv", ["[MAX 1 2 ]\t2", "[MIN 1 2 3 4 5 ]\t1"])
    ds = ListOpsDataset(path)
    batch = PadCollate()([ds[0], ds[1]])
    assert batch["input_ids"].shape == (2, 7)
    assert batch["labels"].tolist() == [2, 1]
    assert batch["padding_mask"].tolist() == [[False] * 4 + [True] * 3, [False] * 7]
    assert batch["input_ids"][0, 4:].tolist() == [0, 0, 0]
    fixed = PadCollate(length=10)([ds[0], ds[1]])
    assert fixed["input_ids"].shape == (2, 10) and fixed["padding_mask"][1, 7:].all()
    with pytest.raises(ValueError, match="length=5 is shorter than the longest"):
        PadCollate(length=5)([ds[0], ds[1]])


def test_existing_files_are_refused_unless_overwrite(tmp_path):
    kw = dict(n_train=4, n_val=1, n_test=1, min_length=10, max_length=40, progress=False)
    first = generate_listops(tmp_path, seed=1, **kw)["train"].read_text()
    with pytest.raises(FileExistsError, match="already holds ListOps files.*--overwrite"):
        generate_listops(tmp_path, seed=2, **kw)
    assert (tmp_path / "basic_train.tsv").read_text() == first  # untouched
    again = generate_listops(tmp_path, seed=2, overwrite=True, **kw)["train"].read_text()
    assert again != first
    # only this task's three files count: another task_name beside them is not in the way
    generate_listops(tmp_path / "two", seed=3, task_name="basic_long", **kw)
    generate_listops(tmp_path / "two", seed=3, **kw)
    with pytest.raises(ValueError, match="n_train must be >= 0"):  # arguments first
        generate_listops(tmp_path, seed=2, **{**kw, "n_train": -1})
