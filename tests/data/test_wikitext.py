import json
import math
from collections import Counter

import numpy as np
import pytest
import torch

from spadeformer.data.lra_common import IGNORE_INDEX, CorruptFileError
from spadeformer.data.wikitext import (
    LMBlockDataset,
    WordVocab,
    encode_file,
    eval_stream,
    evaluate_perplexity,
    load_wikitext103,
    sliding_windows,
)

TRAIN = (
    " \n"
    " = Valkyria Chronicles = \n"
    " \n"
    " The game was released in <unk> . The game sold well . \n"
    " It was <unk> by the team , the team said . \n"
)
VALID = " \n = Robert = \n Robert is an actor . \n"
TEST = " \n The actor said Zyzzyva . \n"


@pytest.fixture
def wiki(tmp_path):
    root = tmp_path / "wikitext-103"
    root.mkdir()
    for split, text in (("train", TRAIN), ("valid", VALID), ("test", TEST)):
        (root / f"wiki.{split}.tokens").write_text(text, encoding="utf-8")
    return root


def expected_ids(text, vocab_tokens):
    index = {t: i for i, t in enumerate(vocab_tokens)}
    out = []
    for line in text.splitlines():
        out += [index.get(w, index["<unk>"]) for w in line.split()] + [index["<eos>"]]
    return out


def test_vocab_from_train_specials_then_frequency(wiki):
    vocab = WordVocab.build(wiki / "wiki.train.tokens")
    assert vocab.tokens[:3] == ["<pad>", "<eos>", "<unk>"]
    words = Counter(w for line in TRAIN.splitlines() for w in line.split())
    assert set(vocab.tokens[3:]) == set(words) - {"<unk>"}
    assert vocab.tokens[3:] == sorted(set(words) - {"<unk>"}, key=lambda w: (-words[w], w))
    assert vocab.tokens[3] == "." and words["."] == 3  # the most frequent word comes first
    assert len(vocab) == 3 + len(set(words) - {"<unk>"})


def test_vocab_json_round_trip_and_corruption(wiki, tmp_path):
    vocab = WordVocab.build(wiki / "wiki.train.tokens")
    vocab.save(tmp_path / "vocab.json")
    assert json.loads((tmp_path / "vocab.json").read_text())["tokens"] == vocab.tokens
    assert WordVocab.load(tmp_path / "vocab.json").tokens == vocab.tokens
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CorruptFileError, match=r"bad.json: not a WordVocab JSON file"):
        WordVocab.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"format": "x", "tokens": []}))
    with pytest.raises(CorruptFileError, match="format is 'x'"):
        WordVocab.load(tmp_path / "other.json")
    with pytest.raises(FileNotFoundError, match="missing.json does not exist"):
        WordVocab.load(tmp_path / "missing.json")


def test_encoding_adds_eos_per_line_and_maps_unknown_words(wiki, tmp_path):
    vocab = WordVocab.build(wiki / "wiki.train.tokens")
    for split, text in (("train", TRAIN), ("valid", VALID), ("test", TEST)):
        ids = encode_file(wiki / f"wiki.{split}.tokens", vocab)
        assert ids.dtype == np.int32
        assert ids.tolist() == expected_ids(text, vocab.tokens)
    test_ids = encode_file(wiki / "wiki.test.tokens", vocab).tolist()
    assert test_ids[0] == vocab.eos_id  # the blank first line
    assert vocab.decode(test_ids) == "<eos> The <unk> said <unk> . <eos>"  # actor, Zyzzyva unseen
    first = encode_file(wiki / "wiki.valid.tokens", vocab, cache_dir=tmp_path / "cache")
    cached = list((tmp_path / "cache").glob("wiki.valid.tokens.*.npy"))
    assert len(cached) == 1
    np.testing.assert_array_equal(np.load(cached[0]), first)
    again = encode_file(wiki / "wiki.valid.tokens", vocab, cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(again, first)


def test_cache_follows_the_source_file_not_its_name(wiki, tmp_path):
    import os

    vocab = WordVocab.build(wiki / "wiki.train.tokens")
    cache = tmp_path / "cache"
    other = tmp_path / "other"
    other.mkdir()
    theirs = other / "wiki.valid.tokens"  # same name, other text, older than the cache
    theirs.write_text("said the\n")
    os.utime(theirs, (1e9, 1e9))
    mine = encode_file(wiki / "wiki.valid.tokens", vocab, cache_dir=cache)
    uncached = encode_file(theirs, vocab).tolist()
    assert encode_file(theirs, vocab, cache_dir=cache).tolist() == uncached
    assert encode_file(theirs, vocab).tolist() != mine.tolist()
    # replaced in place by a copy that keeps an old modification time (tar -x, cp -p)
    (wiki / "wiki.valid.tokens").write_text("the\n")
    os.utime(wiki / "wiki.valid.tokens", (1e9, 1e9))
    fresh = encode_file(wiki / "wiki.valid.tokens", vocab, cache_dir=cache)
    assert fresh.tolist() == encode_file(wiki / "wiki.valid.tokens", vocab).tolist()
    assert not [p for p in cache.iterdir() if ".tmp-" in p.name]  # atomic writes left nothing


def test_cache_is_keyed_on_content(wiki, tmp_path):
    import os

    vocab = WordVocab.build(wiki / "wiki.train.tokens")
    cache, src = tmp_path / "cache", wiki / "wiki.valid.tokens"
    src.write_text("the cat\n")
    os.utime(src, (1e9, 1e9))
    encode_file(src, vocab, cache_dir=cache)
    # same size and modification time, other words (cp -p of another file): encoded afresh
    src.write_text("cat the\n")
    os.utime(src, (1e9, 1e9))
    assert encode_file(src, vocab, cache_dir=cache).tolist() == encode_file(src, vocab).tolist()
    # touched or moved, same bytes: the ids already cached are reused, no new file
    before = sorted(p.name for p in cache.iterdir())
    os.utime(src)
    moved = tmp_path / "moved"
    moved.mkdir()
    os.replace(src, moved / src.name)
    encode_file(moved / src.name, vocab, cache_dir=cache)
    assert sorted(p.name for p in cache.iterdir()) == before and len(before) == 2


def test_load_wikitext103_builds_then_reuses_vocab(wiki, tmp_path):
    vocab, streams = load_wikitext103(wiki, vocab_path=tmp_path / "v.json")
    assert (tmp_path / "v.json").is_file() and set(streams) == {"train", "valid", "test"}
    again, _ = load_wikitext103(wiki, vocab_path=tmp_path / "v.json")
    assert again.tokens == vocab.tokens
    (wiki / "wiki.valid.tokens").unlink()
    with pytest.raises(FileNotFoundError, match=r"wiki.valid.tokens does not exist; expected"):
        load_wikitext103(wiki)
    (wiki / "wiki.train.tokens").write_bytes(b"caf\xe9\n")
    with pytest.raises(CorruptFileError, match="wiki.train.tokens: not UTF-8"):
        WordVocab.build(wiki / "wiki.train.tokens")


def test_lm_blocks_are_shifted_by_one():
    ids = np.arange(100, dtype=np.int32)
    ds = LMBlockDataset(ids, block_size=16)
    assert len(ds) == 6  # (100 - 1) // 16
    for i in range(len(ds)):
        item = ds[i]
        assert item["input_ids"].tolist() == list(range(16 * i, 16 * i + 16))
        assert item["labels"].tolist() == list(range(16 * i + 1, 16 * i + 17))
    with pytest.raises(IndexError):
        ds[6]
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        LMBlockDataset(ids, block_size=0)


@pytest.mark.parametrize(
    "n, seq_len, context",
    [(1000, 64, 10), (1000, 64, 0), (65, 64, 10), (30, 64, 10), (2, 8, 3), (5000, 307, 40),
     (3073, 3072, 400), (20000, 3072, 400)],
)
def test_windows_score_every_token_once_with_context(n, seq_len, context):
    x = np.arange(n)  # token value = its position, so windows reveal where they are
    n_targets = n - 1
    windows = list(sliding_windows(x, seq_len, context))
    stride = seq_len - context
    assert len(windows) == 1 + max(0, math.ceil((n_targets - seq_len) / stride))
    seen = []
    for w, (inputs, labels) in enumerate(windows):
        assert inputs.dtype == labels.dtype == torch.long
        assert len(inputs) == len(labels) == min(seq_len, n_targets)
        assert inputs.tolist() == list(range(int(inputs[0]), int(inputs[0]) + len(inputs)))
        scored = (labels != IGNORE_INDEX).nonzero().flatten().tolist()
        assert scored, "every window scores something"
        for j in scored:
            assert labels[j] == inputs[j] + 1  # the target is the next token
            if w > 0:
                assert j >= context  # >= context tokens before the predicting position
        seen += labels[labels != IGNORE_INDEX].tolist()
    assert sorted(seen) == list(range(1, n))  # every target exactly once


def test_windows_edge_cases():
    assert list(sliding_windows(np.arange(1), 8, 2)) == []
    with pytest.raises(ValueError, match="context must be in"):
        list(sliding_windows(np.arange(10), 8, 8))
    stream = eval_stream(np.array([5, 6, 7], dtype=np.int32), eos_id=1)
    assert stream.tolist() == [1, 5, 6, 7] and stream.dtype == np.int32


class Uniform(torch.nn.Module):
    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids):
        return torch.zeros(*input_ids.shape, self.vocab)


class NextIsPlusOne(torch.nn.Module):
    """Knows the stream: token t+1 = (token t + 1) mod V; puts probability p on it."""

    def __init__(self, vocab, p):
        super().__init__()
        self.vocab, self.p = vocab, p

    def forward(self, input_ids):
        probs = torch.full((*input_ids.shape, self.vocab), (1 - self.p) / (self.vocab - 1))
        probs.scatter_(-1, ((input_ids + 1) % self.vocab).unsqueeze(-1), self.p)

        class Out:
            logits = probs.log()

        return Out()


def test_perplexity_is_exp_mean_nll():
    v = 37
    ids = eval_stream(np.arange(900) % v, eos_id=0)
    res = evaluate_perplexity(Uniform(v), ids, seq_len=128, context=16, batch_size=3)
    assert res["tokens"] == 900
    assert res["nll"] == pytest.approx(math.log(v), rel=1e-6)
    assert res["ppl"] == pytest.approx(v, rel=1e-5)
    stream = np.arange(700) % v
    res = evaluate_perplexity(NextIsPlusOne(v, 0.8), stream, seq_len=50, context=10)
    assert res["tokens"] == 699
    assert res["ppl"] == pytest.approx(1 / 0.8, rel=1e-5)


@pytest.mark.parametrize("adaptive", [False, True])
def test_model_loss_path_equals_logits_path(adaptive):
    """A SpadeForCausalLM is scored through its own loss (the adaptive softmax's cheap path);
    the result must equal scoring its full log-probabilities."""
    from spadeformer.config import SpadeConfig
    from spadeformer.models import SpadeForCausalLM

    v = 40
    cfg = SpadeConfig.from_preset("spade-s4-window", size="tiny", vocab_size=v, d_model=16,
                                  n_heads=2, window_size=8, dropout=0.0,
                                  adaptive_cutoffs=[10, 20] if adaptive else None)
    model = SpadeForCausalLM(cfg).eval()
    ids = eval_stream(np.random.default_rng(0).integers(0, v, 300), eos_id=0)
    via_loss = evaluate_perplexity(model, ids, seq_len=64, context=16, batch_size=2)
    via_logits = evaluate_perplexity(lambda x: model(x), ids, seq_len=64, context=16,
                                     batch_size=2)
    assert via_loss["tokens"] == via_logits["tokens"] == 300
    # fp32 losses, summed in a different order (mean x count vs a sum): rounding only
    assert via_loss["nll"] == pytest.approx(via_logits["nll"], rel=1e-5)
