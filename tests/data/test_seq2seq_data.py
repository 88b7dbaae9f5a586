"""Source -> target JSONL pairs (the encoder-decoder's data), and the seq2seq task end to end."""

import io
import json
import math

import pytest
import torch

from spadeformer.cli import evaluate, generate_text, main
from spadeformer.data.lra_common import CorruptFileError, PadCollate
from spadeformer.data.seq2seq import (
    EOS_ID,
    SEQ2SEQ_VOCAB_SIZE,
    Seq2SeqDataset,
    decode_target,
    encode_source,
)
from spadeformer.tasks import SOURCES


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def test_pairs_become_byte_ids_with_an_end_token(tmp_path):
    write(tmp_path / "train.jsonl", [{"source": "héllo world", "target": "hi"},
                                     {"source": "x" * 50, "target": "y" * 50}])
    ds = Seq2SeqDataset(tmp_path / "train.jsonl", max_source_length=20, max_target_length=10)
    item = ds[0]
    assert item["input_ids"].tolist() == [b + 1 for b in "héllo world".encode()]
    assert item["labels"].tolist() == [ord("h") + 1, ord("i") + 1, EOS_ID]
    assert len(ds[1]["input_ids"]) == 20 and len(ds[1]["labels"]) == 10  # cut
    assert EOS_ID not in ds[1]["labels"].tolist()  # a cut target does not claim its end
    assert decode_target(item["labels"]) == "hi"
    assert decode_target(encode_source("héllo").tolist() + [EOS_ID, 66]) == "héllo"
    batch = PadCollate()([ds[0], ds[1]])
    assert batch["padding_mask"].shape == (2, 20) and batch["labels"][0, 3:].eq(-100).all()
    assert SOURCES["seq2seq"].task.vocab_size == SEQ2SEQ_VOCAB_SIZE == 514


def test_corrupt_lines_name_the_file_and_line(tmp_path):
    path = tmp_path / "val.jsonl"
    for text, match in [('{"source": "a", "target": "b"}\n[1, 2]\n', r"val.jsonl:2: expected"),
                        ('{"source": "a"}\n', r":1: 'target' must be a non-empty string, got "
                                               r"missing \(keys: \['source'\]"),
                        ('{"source": "", "target": "b"}\n', r"'source' must be a non-empty"),
                        ('{"source": "a", "target": "b"\n', r":1: not a JSON object"),
                        ("\n\n", "no JSON lines")]:
        path.write_text(text)
        with pytest.raises(CorruptFileError, match=match):
            Seq2SeqDataset(path)
    path.write_bytes(b'{"source": "a", "target": "b"}\n{"source": "\xff", "target": "b"}\n')
    with pytest.raises(CorruptFileError, match=r"val.jsonl:2: not UTF-8 text"):
        Seq2SeqDataset(path)
    path.write_text('{"source": "a\\ud800", "target": "b"}\n')  # an escaped lone surrogate
    with pytest.raises(CorruptFileError, match=r":1: 'source' holds an unpaired surrogate"):
        Seq2SeqDataset(path)
    write(path, [{"article": "long text", "abstract": "short"}])
    ds = Seq2SeqDataset(path, source_key="article", target_key="abstract")
    assert decode_target(ds[0]["labels"]) == "short"
    with pytest.raises(FileNotFoundError, match="train,val,test"):
        Seq2SeqDataset(tmp_path / "missing.jsonl")


TINY = ["model.preset=spade-s4-window", "model.size=tiny", "model.causal=false",
        "model.d_model=32", "model.n_heads=2", "model.d_ff=64", "model.n_layers=2",
        "model.n_decoder_layers=2", "model.window_size=8", "model.dropout=0.0",
        "model.ssm_options.trainable=false", "data.name=seq2seq",
        "data.max_source_length=64", "data.max_target_length=12", "train.batch_size=4",
        "train.lr=3e-3", "train.warmup_steps=0", "train.eval_batches=2",
        "train.log_every=5", "train.progress=false"]


@pytest.fixture
def pairs(tmp_path):
    # target = the source's first word: learnable in a few dozen steps
    words = ["alpha", "beta", "gamma", "delta", "omega"]
    g = torch.Generator().manual_seed(0)
    root = tmp_path / "data"
    root.mkdir()
    for split, n in (("train", 40), ("val", 8), ("test", 8)):
        rows = []
        for _ in range(n):
            picks = [words[int(i)] for i in torch.randint(0, 5, (6,), generator=g)]
            rows.append({"source": " ".join(picks), "target": picks[0]})
        write(root / f"{split}.jsonl", rows)
    return root


def test_train_eval_generate_an_encoder_decoder_from_the_cli(tmp_path, pairs, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), f"data.path={pairs}", *TINY, "train.steps=30",
                 "train.eval_every=15", "train.save_every=15"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert "bpb" in train[0] and train[-1]["loss"] < train[0]["loss"]  # it learns
    out = evaluate(str(run), "test")
    assert out["bpb"] == pytest.approx(out["loss"] / math.log(2))
    assert out["bpb"] < out["unigram_bpb"]  # beats the unigram model of the targets
    stream = io.StringIO()
    text = generate_text(str(run), "gamma beta alpha", max_new_tokens=12, temperature=0,
                         stream=stream, echo_prompt=True)
    assert stream.getvalue() == "gamma beta alpha\n=> " + text + "\n"
    stream = io.StringIO()
    generate_text(str(run), "x" * 100, max_new_tokens=2, temperature=0, stream=stream,
                  echo_prompt=True)
    assert stream.getvalue().startswith("x" * 64 + "\n=> ")  # what the model reads (64 bytes)
    assert len(text.encode()) <= 11  # stopped at the end token (or the budget)
    capsys.readouterr()
    assert main(["generate", "--run", str(run), "--prompt", "delta", "--max-new-tokens", "8",
                 "--temperature", "0"]) == 0
    assert "=> " in capsys.readouterr().out

    # ROUGE of batched (padded) greedy generation == ROUGE of one source at a time
    from spadeformer.metrics import rouge

    scored = evaluate(str(run), "test", max_batches=1, batch_size=5, rouge=True)
    rows = [json.loads(line) for line in (pairs / "test.jsonl").read_text().splitlines()][:5]
    one_by_one = [generate_text(str(run), r["source"], max_new_tokens=12, temperature=0)
                  for r in rows]
    expected = rouge(one_by_one, [r["target"] for r in rows])
    assert scored["rouge_examples"] == 5
    for name in ("rouge1", "rouge2", "rougeL"):
        assert scored[name] == pytest.approx(expected[name])


def test_learned_positions_name_the_seq2seq_length_option(tmp_path, pairs, capsys):
    assert main(["train", "--out", str(tmp_path / "r"), f"data.path={pairs}", *TINY,
                 "model.preset=transformer-window", "model.position=learned",
                 "model.max_position=32", "train.steps=1"]) == 2
    assert "data.max_source_length=64 is longer than model.max_position=32" in (
        capsys.readouterr().err)


def test_rouge_is_100_for_a_copy_and_0_for_disjoint_words():
    from spadeformer.metrics import rouge

    assert rouge(["the cats sat"], ["the cat sat"])["rouge1"] == 100.0  # stemmed
    assert rouge(["dogs run"], ["the cat sat"]) == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    with pytest.raises(ValueError, match="as many predictions as references"):
        rouge(["a"], [])


def test_span_corruption_pre_training_fine_tunes_on_pairs(tmp_path, pairs, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    for split in ("train", "val", "test"):
        write(docs / f"{split}.jsonl", [{"text": "the quick brown fox jumps " * 4}] * 6)
    model_args = [a for a in TINY if a.startswith("model.")]
    train_args = ["train.batch_size=4", "train.steps=2", "train.eval_batches=1",
                  "train.progress=false", "train.warmup_steps=0"]
    assert main(["train", "--out", str(tmp_path / "pre"), "data.name=span_corruption",
                 f"data.path={docs}", "data.seq_len=32", *model_args, *train_args]) == 0
    assert evaluate(str(tmp_path / "pre"), "val")["unigram_bpb"] > 0
    capsys.readouterr()
    assert main(["train", "--out", str(tmp_path / "sum"), f"data.path={pairs}", *TINY,
                 "train.steps=2", f"model.init_from={tmp_path / 'pre'}"]) == 0
    assert "fresh: none; not used: none" in capsys.readouterr().err  # one vocabulary, one model
