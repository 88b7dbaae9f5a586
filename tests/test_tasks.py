"""Data sources by name (spadeformer.tasks): datasets, collation, validation carving, errors.

Every source reads small fixtures written here in its release format.
"""

import math
import pickle
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from spadeformer.runconfig import DATA_OPTIONS, RunConfigError, load_run_config
from spadeformer.tasks import SOURCES, get_task

# --------------------------------------------------------------------- release-format fixtures
# ListOps ids as documented in data/listops.py: pad 0, digits 1..10, [MIN [MAX [MED [SM 11..14,
# "]" 15 ("(" and ")" are dropped by default).
LISTOPS_ROWS = [  # (release text, label, expected ids)
    ("( ( ( [MAX 2 ) 9 ) ] )", 9, [12, 3, 10, 15]),
    ("( ( ( [SM 1 ) ( ( ( [MIN 4 ) 5 ) ] ) ) ] )", 5, [14, 2, 11, 5, 6, 15, 15]),
    ("( ( ( ( [MED 1 ) 7 ) 3 ) ] )", 3, [13, 2, 8, 4, 15]),
    ("( ( ( [MIN 8 ) 6 ) ] )", 6, [11, 9, 7, 15]),
]


def write_listops(root, rows=LISTOPS_ROWS):
    root.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val", "test"):
        body = "".join(f"{text}\t{label}\n" for text, label, _ in rows)
        (root / f"basic_{split}.tsv").write_text("Source\tTarget\n" + body)
    return root


def write_aclimdb(root, per_class=10):
    for split in ("train", "test"):
        for label, name in enumerate(("neg", "pos")):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                (folder / f"{i}_{label * 9 + 1}.txt").write_text(f"{name} review {i} " * (i + 1))
    (root / "train" / "unsup").mkdir()
    (root / "train" / "unsup" / "0_0.txt").write_text("unlabelled")
    return root


def write_aan(root, n=6):
    root.mkdir(parents=True, exist_ok=True)
    for split in ("train", "eval", "test"):
        lines = [f"{i % 2}\tP{i}\tQ{i}\t{b'paper ' * (i + 1)!r}\t{b'cites ' * (2 * i + 1)!r}"
                 for i in range(n)]
        (root / f"new_aan_pairs.{split}.tsv").write_text("\n".join(lines) + "\n")
    return root


def write_cifar(root, per_batch=4):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for k, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [(k + j) % 10 for j in range(per_batch)]
        folder.joinpath(name).write_bytes(
            pickle.dumps({b"data": data, b"labels": labels}, protocol=2))
    return root


def write_pathfinder(root, size=32, n=20):
    from PIL import Image

    rng = np.random.default_rng(size)
    (root / "imgs" / "0").mkdir(parents=True)
    (root / "metadata").mkdir()
    lines = []
    for i in range(n):
        img = rng.integers(0, 256, (size, size), dtype=np.uint8)
        Image.fromarray(img).save(root / "imgs" / "0" / f"sample_{i}.png")
        lines.append(f"imgs/0 sample_{i}.png {i} {int(i % 3 == 0)} 1.8 14 5 5 2 3 1")
    (root / "metadata" / "0.npy").write_text("\n".join(lines) + "\n")
    return root


WIKI_WORDS = ["the", "of", "and", "in", "to", "a", "was", "<unk>", "@-@", "=", "river", "song"]


def wiki_text(n_lines, seed):
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n_lines):
        k = int(rng.integers(0, 12))  # blank lines too, as in the release
        lines.append(" " + " ".join(rng.choice(WIKI_WORDS, k, p=None)) + " " if k else "")
    return "\n".join(lines) + "\n"


def write_wikitext(root, train_lines=300, eval_lines=60):
    root.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", train_lines, 1), ("valid", eval_lines, 2),
                           ("test", eval_lines, 3)):
        (root / f"wiki.{split}.tokens").write_text(wiki_text(n, seed))
    return root


def word_stream(path, vocab_tokens):
    """Independent encoding: each line's words then <eos>."""
    index = {t: i for i, t in enumerate(vocab_tokens)}
    ids = []
    for line in path.read_text().splitlines():
        ids += [index[w] for w in line.split()] + [index["<eos>"]]
    return ids


# --------------------------------------------------------------------- registry
def test_every_source_has_its_options_listed():
    assert set(SOURCES) == set(DATA_OPTIONS)
    with pytest.raises(RunConfigError, match=r"data.name must be one of .*'wikitext103'"):
        get_task({"name": "wikitext2"})
    with pytest.raises(RunConfigError, match="did you mean 'max_length'"):
        load_run_config(None, ["data.name=listops", "data.max_lenght=10"])


def test_bad_yaml_and_non_mapping_sections_are_clear_errors(tmp_path):
    for text, match in [("data: stdlib\n", "section 'data' must be a mapping"),
                        ("model: [s4]\n", "section 'model' must be a mapping"),
                        ("train:\n  lr: [1e-3\n", "is not valid YAML")]:
        path = tmp_path / "run.yaml"
        path.write_text(text)
        with pytest.raises(RunConfigError, match=match):
            load_run_config(path, ["train.steps=10"])
    for override in ("model.global_layers=[0, 1", "train.lr=@1e-3", "data.root=*root"):
        with pytest.raises(RunConfigError, match="the value is not valid YAML"):
            load_run_config(None, [override])
    with pytest.raises(RunConfigError, match="section 'train' must be a mapping"):
        load_run_config(None, ["train.steps=10"], base={"train": 5})


# --------------------------------------------------------------------- LRA sources
def test_listops_items_collate_and_baseline(tmp_path):
    root = write_listops(tmp_path / "listops")
    source = get_task({"name": "listops", "path": str(root), "max_length": 6})
    task = source.task
    assert (task.objective, task.model_class, task.vocab_size, task.num_labels) == (
        "classify", "SpadeForSequenceClassification", 18, 10)
    for split in ("train", "val", "test"):
        ds = source.dataset(split)
        assert len(ds) == len(LISTOPS_ROWS)
        for i, (_, label, ids) in enumerate(LISTOPS_ROWS):
            assert ds[i]["input_ids"].tolist() == ids[:6]  # truncated to data.max_length
            assert int(ds[i]["labels"]) == label
    assert source.dataset("train") is source.dataset("train")  # read once
    batch = source.collate_fn([source.dataset("train")[i] for i in range(4)])
    assert batch["input_ids"].shape == (4, 6) and batch["labels"].tolist() == [9, 5, 3, 6]
    # masks: True = padded; the rows have 4, 6 (truncated from 7), 5, 4 real tokens
    assert (~batch["padding_mask"]).sum(1).tolist() == [4, 6, 5, 4]
    assert source.baseline("test") == {"majority_accuracy": 0.25, "chance_accuracy": 0.1}


def test_text_carves_a_seeded_disjoint_validation_split(tmp_path):
    root = write_aclimdb(tmp_path / "aclImdb")
    opts = {"name": "text", "path": str(root), "max_length": 16, "val_fraction": 0.25}
    source = get_task(opts)
    train, val, test = (source.dataset(s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (15, 5, 20)  # unsup is not a class
    files = source.dataset("train").dataset.files
    train_files = {files[i] for i in train.indices}
    val_files = {files[i] for i in val.indices}
    assert not train_files & val_files and len(train_files | val_files) == 20
    again = get_task(opts)
    assert again.dataset("val").indices == val.indices  # same seed, same partition
    other = get_task({**opts, "split_seed": 1})
    assert other.dataset("val").indices != val.indices
    item = val[0]
    assert item["input_ids"].shape[0] <= 16 and int(item["input_ids"].min()) >= 1  # byte + 1
    expected = [b + 1 for b in files[val.indices[0]].read_bytes()[:16]]
    assert item["input_ids"].tolist() == expected
    assert int(item["labels"]) == (files[val.indices[0]].parent.name == "pos")
    batch = source.collate_fn([train[i] for i in range(3)])
    assert batch["input_ids"].shape[0] == 3 and batch["padding_mask"].dtype == torch.bool
    assert source.task.vocab_size == 257 and source.task.num_labels == 2
    labels = [int(val[i]["labels"]) for i in range(len(val))]
    assert source.baseline("val")["majority_accuracy"] == max(Counter(labels).values()) / 5


def test_retrieval_pairs_two_masks_and_eval_file_as_val(tmp_path):
    root = write_aan(tmp_path / "tsv_data")
    source = get_task({"name": "retrieval", "path": str(root), "max_length": 20})
    assert source.task.model_class == "SpadeForRetrieval" and source.task.vocab_size == 257
    val = source.dataset("val")
    assert val.path.name == "new_aan_pairs.eval.tsv"
    batch = source.collate_fn([val[i] for i in range(3)])
    assert set(batch) == {"input_ids_1", "padding_mask_1", "input_ids_2", "padding_mask_2",
                          "labels"}
    assert (~batch["padding_mask_1"]).sum(1).tolist() == [6, 12, 18]  # "paper " x (i + 1)
    assert (~batch["padding_mask_2"]).sum(1).tolist() == [6, 18, 20]  # "cites " x (2i+1), cut
    assert batch["input_ids_1"][0, :6].tolist() == [b + 1 for b in b"paper "]
    assert batch["labels"].tolist() == [0, 1, 0]


def test_image_is_1024_grey_levels_with_carved_val(tmp_path):
    root = write_cifar(tmp_path)
    source = get_task({"name": "image", "path": str(root / "cifar-10-batches-py")})
    train, val, test = (source.dataset(s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (18, 2, 4)  # 10 % of 20 training images
    assert not set(train.indices) & set(val.indices)
    batch = source.collate_fn([train[i] for i in range(2)])
    assert batch["input_ids"].shape == (2, 1024) and not batch["padding_mask"].any()
    assert int(batch["input_ids"].max()) < source.task.vocab_size == 256
    with pytest.raises(RunConfigError, match=r"data.val_fraction must be a number in \(0, 1\)"):
        get_task({"name": "image", "path": str(root), "val_fraction": 1.0})
    tiny = get_task({"name": "image", "path": str(root), "val_fraction": 0.01})
    with pytest.raises(ValueError, match="leaves 20 for train and 0 for val"):
        tiny.dataset("val")


def test_pathfinder_partition_and_size_check(tmp_path):
    root = write_pathfinder(tmp_path / "pf32", size=32, n=20)
    source = get_task({"name": "pathfinder", "path": str(root), "size": 32})
    parts = [source.dataset(s) for s in ("train", "val", "test")]
    assert [len(p) for p in parts] == [16, 2, 2]  # 80 / 10 / 10
    paths = [set(p.paths) for p in parts]
    assert not (paths[0] & paths[1] or paths[0] & paths[2] or paths[1] & paths[2])
    assert len(paths[0] | paths[1] | paths[2]) == 20
    item = parts[1][0]
    assert item["input_ids"].shape == (1024,) and int(item["labels"]) in (0, 1)
    assert source.task.num_labels == 2 and source.task.vocab_size == 256
    with pytest.raises(RunConfigError, match=r"data.size must be one of \[32, 128\].*got 64"):
        get_task({"name": "pathfinder", "path": str(root), "size": 64})
    pathx = get_task({"name": "pathfinder", "path": str(root), "size": 128})
    with pytest.raises(ValueError, match="expected 128x128"):  # 32x32 images, Path-X asked
        pathx.dataset("train")[0]


# --------------------------------------------------------------------- WikiText-103
def test_wikitext_vocab_blocks_and_unigram_baseline(tmp_path):
    root = write_wikitext(tmp_path / "wikitext-103")
    source = get_task({"name": "wikitext103", "path": str(root), "seq_len": 32, "context": 8,
                       "vocab_path": str(tmp_path / "cache" / "vocab.json")})
    assert source.collate_fn is None
    words = Counter((root / "wiki.train.tokens").read_text().split())
    # vocabulary = <pad>, <eos>, <unk>, then the other training words
    assert source.task.vocab_size == 3 + len(set(words) - {"<unk>"})
    assert source.task.objective == "lm" and source.task.model_class == "SpadeForCausalLM"
    assert (tmp_path / "cache" / "vocab.json").is_file()
    tokens = source.vocab.tokens
    train_ids = word_stream(root / "wiki.train.tokens", tokens)
    ds = source.dataset("train")
    assert len(ds) == (len(train_ids) - 1) // 32
    item = ds[1]
    assert item["input_ids"].tolist() == train_ids[32:64]
    assert item["labels"].tolist() == train_ids[33:65]
    assert len(source.dataset("val")[0]["input_ids"]) == 32  # eval_seq_len defaults to seq_len
    # unigram baseline: train counts + 1, every token of the split scored once
    counts = Counter(train_ids)
    total = sum(counts[i] + 1 for i in range(len(tokens)))
    test_ids = word_stream(root / "wiki.test.tokens", tokens)
    nll = -sum(math.log((counts[t] + 1) / total) for t in test_ids) / len(test_ids)
    assert source.baseline("test")["unigram_ppl"] == pytest.approx(math.exp(nll), rel=1e-9)


class UniformLM(nn.Module):
    """Equal logits for every word: perplexity must be exactly the vocabulary size."""

    def __init__(self, vocab_size):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab_size)
        self.seen = []

    def forward(self, input_ids):
        self.seen.append(tuple(input_ids.shape))
        return torch.zeros(*input_ids.shape, self.config.vocab_size)


def test_wikitext_perplexity_windows_count_and_value(tmp_path):
    root = write_wikitext(tmp_path / "wt")
    source = get_task({"name": "wikitext103", "path": str(root), "seq_len": 24,
                       "eval_seq_len": 40, "context": 10})
    v = source.task.vocab_size
    n_test = len(word_stream(root / "wiki.test.tokens", source.vocab.tokens))
    model = UniformLM(v)
    out = source.perplexity(model, "test", batch_size=2)
    assert out["tokens"] == n_test  # every token of the file scored once
    assert out["ppl"] == pytest.approx(v, rel=1e-6) and out["loss"] == pytest.approx(math.log(v))
    assert (out["seq_len"], out["context"]) == (40, 10)
    assert {shape[1] for shape in model.seen} == {40}
    first = source.perplexity(UniformLM(v), "test", max_windows=2)
    assert first["tokens"] == 40 + 30  # first window scores 40, the next seq_len - context
    with pytest.raises(ValueError, match=r"vocab_size=7 does not match"):
        source.perplexity(UniformLM(7), "test")


def test_wikitext_option_errors(tmp_path):
    root = write_wikitext(tmp_path / "wt", train_lines=3, eval_lines=3)
    with pytest.raises(RunConfigError, match=r"data.context must be < .* 32"):
        get_task({"name": "wikitext103", "path": str(root), "seq_len": 32, "context": 32})
    source = get_task({"name": "wikitext103", "path": str(root), "seq_len": 4096,
                       "context": 0})
    with pytest.raises(ValueError, match=r"fewer than one block of data.seq_len=4096"):
        source.dataset("train")
    with pytest.raises(ValueError, match="split must be one of"):
        source.dataset("valid")


# --------------------------------------------------------------------- missing data
@pytest.mark.parametrize("name, layout", [
    ("listops", "basic_{train,val,test}.tsv"),
    ("text", "train/{neg,pos}/*.txt"),
    ("retrieval", "new_aan_pairs.{train,eval,test}.tsv"),
    ("image", "cifar-10-batches-py"),
    ("pathfinder", "imgs/<batch>/sample_<i>.png and metadata/<batch>.npy"),
    ("wikitext103", "wiki.{train,valid,test}.tokens"),
])
def test_missing_path_names_the_option_and_layout(tmp_path, name, layout):
    with pytest.raises(RunConfigError) as err:
        get_task({"name": name})
    assert "data.path is required" in str(err.value) and layout in str(err.value)
    with pytest.raises(FileNotFoundError) as err:
        get_task({"name": name, "path": str(tmp_path / "nowhere")})
    assert "nowhere' does not exist" in str(err.value) and layout in str(err.value)


def test_missing_file_inside_the_folder_names_the_file(tmp_path):
    root = write_listops(tmp_path / "listops")
    (root / "basic_val.tsv").unlink()
    source = get_task({"name": "listops", "path": str(root)})
    source.dataset("train")
    with pytest.raises(FileNotFoundError, match=r"basic_val.tsv does not exist; expected"):
        source.dataset("val")
    with pytest.raises(RunConfigError, match=r"data.max_length must be an integer >= 1"):
        get_task({"name": "listops", "path": str(root), "max_length": 0})
