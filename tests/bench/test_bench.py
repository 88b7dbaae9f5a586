"""The benchmark runs end to end at tiny sizes, and its FLOP formula counts what runs.

No timing or performance assertions: only structure (CSV columns and rows, files), the
analytic FLOP count (by hand and against the matmuls the models really execute), skipping,
and the decoding states the generation benchmark builds.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import time
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

from spadeformer.bench.generate_bench import (
    GENERATE_COLUMNS,
    run_generate_model,
    state_nbytes,
    state_signature,
    synthetic_state,
)
from spadeformer.bench.generate_bench import _child_main as generate_child_main
from spadeformer.bench.machine import out_of_memory
from spadeformer.bench.plots import ratio_table, spade_targets
from spadeformer.bench.train_bench import (
    MODELS,
    TRAIN_COLUMNS,
    BenchShape,
    attention_pairs,
    build_model,
    model_config,
    run_train_bench,
    split_model,
    train_flops,
)
from spadeformer.cli import main
from spadeformer.ops import cpu_window_attn

HAS_MPL = importlib.util.find_spec("matplotlib") is not None
TINY = ["--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--window", "16",
        "--chunk", "16", "--d-state", "8", "--threads", "1"]
SHAPE = BenchShape(d_model=32, n_layers=1, n_heads=2, d_state=8, window_size=16, chunk_size=16)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread avoids OpenMP oversubscription on a shared, loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _read(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


# ------------------------------------------------------------------------------ end to end
def test_bench_train_end_to_end_in_process(tmp_path, capsys):
    out = tmp_path / "train"
    rc = main(["bench", "train", "--lengths", "64,128", "--repeats", "1", "--warmup", "0",
               "--peak-size", "64", "--peak-repeats", "1", "--in-process", "--out", str(out),
               *TINY])
    assert rc == 0
    columns, rows = _read(out / "train.csv")
    assert tuple(columns) == TRAIN_COLUMNS
    assert [(r["model"], int(r["length"])) for r in rows] == [
        (m, n) for n in (64, 128) for m in MODELS]
    for r in rows:
        assert r["status"] == "ok", r
        assert float(r["median_s"]) > 0 and float(r["tokens_per_s"]) > 0
        flop = train_flops(r["model"], SHAPE, int(r["length"])).train_step
        assert float(r["gflop_per_step"]) == pytest.approx(flop / 1e9, rel=1e-5)
        assert float(r["gflops"]) == pytest.approx(
            flop / 1e9 / float(r["median_s"]), rel=1e-4)
        assert float(r["matmul_peak_gflops"]) > 0 and r["device"] == "cpu"
    printed = capsys.readouterr().out
    assert "relative to spade-s4-window" in printed and "| transformer-full-eager |" in printed
    assert (out / "train_table.md").read_text().strip() == printed.strip()
    command = (out / "command.txt").read_text()
    assert command.startswith("spadeformer bench train --lengths 64,128 --models "
                              + ",".join(MODELS))
    assert "--in-process" in command and "--d-model 32" in command
    assert (out / "train.png").is_file() == HAS_MPL


def test_bench_train_subprocess_cell_and_memory_skip(tmp_path):
    out = tmp_path / "sub"
    assert main(["bench", "train", "--lengths", "64", "--models", "spade-s4-window",
                 "--repeats", "1", "--peak-size", "64", "--peak-repeats", "1", "--no-plot",
                 "--out", str(out), *TINY]) == 0
    _, (row,) = _read(out / "train.csv")
    assert row["status"] == "ok" and "in-process" not in row["note"]
    # a fresh process: its peak is measured against its own baseline
    assert float(row["peak_rss_mb"]) >= float(row["baseline_rss_mb"]) > 0
    assert float(row["peak_mem_mb"]) == pytest.approx(
        float(row["peak_rss_mb"]) - float(row["baseline_rss_mb"]), abs=1e-3)

    # a 1 MB budget cannot hold the model: recorded as skipped, the longer length too
    out = tmp_path / "oom"
    assert main(["bench", "train", "--lengths", "64,128", "--models", "transformer-full",
                 "--max-memory-mb", "1", "--peak-size", "64", "--peak-repeats", "1",
                 "--no-plot", "--out", str(out), *TINY]) == 1
    _, rows = _read(out / "train.csv")
    assert [r["status"] for r in rows] == ["skipped", "skipped"]
    assert "memory" in rows[0]["note"] and rows[1]["note"] == "skipped at L=64"


def test_bench_train_interleave_memory_per_cell_time_together(tmp_path):
    """--interleave: each cell's memory from its own one-step subprocess, the timed steps
    from one process per length that steps the models in turn."""
    out = tmp_path / "inter"
    models = "transformer-window,spade-s4-window"
    assert main(["bench", "train", "--lengths", "64,128", "--models", models, "--interleave",
                 "--repeats", "2", "--warmup", "1", "--peak-size", "64", "--peak-repeats",
                 "1", "--no-plot", "--out", str(out), *TINY]) == 0
    _, rows = _read(out / "train.csv")
    assert [(r["model"], int(r["length"])) for r in rows] == [
        (m, n) for n in (64, 128) for m in models.split(",")]
    for r in rows:
        assert r["status"] == "ok" and "timed interleaved" in r["note"], r
        assert int(r["repeats"]) == 2 and float(r["median_s"]) > 0
        assert float(r["peak_rss_mb"]) >= float(r["baseline_rss_mb"]) > 0
        assert float(r["faults_per_step"]) >= 0  # page faults of the timed steps, counted
    assert "--interleave" in (out / "command.txt").read_text()


def _fake_steps(monkeypatch, fake_step):
    """Real models (built as the bench builds them), but ``step`` replaced by ``fake_step``,
    which can read the model's name from ``self.name``."""
    from spadeformer.bench import train_bench

    real_init = train_bench._Trainee.__init__

    def init(self, name, *args, **kwargs):
        real_init(self, name, *args, **kwargs)
        self.name = name

    monkeypatch.setattr(train_bench._Trainee, "__init__", init)
    monkeypatch.setattr(train_bench._Trainee, "step", fake_step)


def test_interleaved_cells_shuffle_and_respect_budget(monkeypatch):
    from spadeformer.bench import train_bench

    calls = []

    def fake_step(self):
        calls.append(self.name)
        return {"transformer-full": 2.0}.get(self.name, 0.5)

    _fake_steps(monkeypatch, fake_step)
    names = ["transformer-window", "transformer-full", "spade-s4-window"]
    out = train_bench.run_interleaved_cells(names, SHAPE, 32, warmup=1, repeats=3,
                                            max_seconds=5.0)
    # a warm-up round and then timed rounds, each in a shuffled order; the full model's 2 s
    # steps stop once another would pass its own 5 s budget (1 warm-up + 1 timed = 4 s, next 6)
    assert sorted(calls[:3]) == sorted(names)
    assert sorted(calls[3:6]) == sorted(names)  # round 1: everyone once
    assert sorted(calls[6:]) == ["spade-s4-window"] * 2 + ["transformer-window"] * 2
    first = list(calls)  # the order is seeded: the same call repeats it
    calls.clear()
    train_bench.run_interleaved_cells(names, SHAPE, 32, warmup=1, repeats=3, max_seconds=5.0)
    assert calls == first
    assert out["transformer-full"]["repeats"] == 1
    assert "only 1/3 repeats" in out["transformer-full"]["note"]
    assert out["transformer-window"]["repeats"] == out["spade-s4-window"]["repeats"] == 3
    assert out["spade-s4-window"]["median_s"] == 0.5

    # min_seconds: quick models keep stepping until their timed steps add up to it
    calls.clear()
    out = train_bench.run_interleaved_cells(names, SHAPE, 32, warmup=0, repeats=2,
                                            min_seconds=3.0, max_seconds=100.0)
    assert out["transformer-window"]["repeats"] == out["spade-s4-window"]["repeats"] == 6
    assert out["transformer-full"]["repeats"] == 2  # 2 x 2 s already pass 3 s
    assert sorted(calls[:3]) == sorted(names) and calls.count("transformer-full") == 2
    # who goes first between the two quick models changes from round to round
    pairs = [name for name in calls if name != "transformer-full"]
    firsts = {pairs[i] for i in range(0, len(pairs), 2)}
    assert firsts == {"transformer-window", "spade-s4-window"}


def test_interleaved_warmup_rounds_step_every_model_before_any_timed_step(monkeypatch):
    """Warm-up is interleaved too (the shared heap settles only once every model has stepped
    beside the others): no timed step before every warm-up round is done, and the timed
    steps' page faults are reported."""
    from spadeformer.bench import train_bench

    calls = []

    def fake_step(self):
        calls.append(self.name)
        self.last_faults = 3 if len(calls) > 6 else 1000  # warm-up steps fault the most
        return 0.5

    _fake_steps(monkeypatch, fake_step)
    names = ["transformer-window", "transformer-full", "spade-s4-window"]
    out = train_bench.run_interleaved_cells(names, SHAPE, 32, warmup=2, repeats=2)
    assert len(calls) == 3 * (2 + 2)
    for r in range(4):  # every round, warm-up or timed, steps each model once
        assert sorted(calls[3 * r : 3 * r + 3]) == sorted(names)
    for name in names:
        assert out[name]["repeats"] == 2 and out[name]["faults"] == [3, 3]
        assert out[name]["faults_per_step"] == 3


def test_interleaved_cells_flag_a_model_that_runs_out_of_memory(monkeypatch):
    from spadeformer.bench import train_bench

    def fake_step(self):
        if self.name == "transformer-full":
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried ...")
        return 0.5

    _fake_steps(monkeypatch, fake_step)
    out = train_bench.run_interleaved_cells(["transformer-full", "spade-s4-window"], SHAPE, 32,
                                            warmup=1, repeats=2)
    full, spade = out["transformer-full"], out["spade-s4-window"]
    assert full["status"] == "skipped" and full["out_of_memory"] is True
    assert full["note"].startswith("out of memory: DefaultCPUAllocator")
    assert spade["status"] == "ok" and spade["repeats"] == 2 and "out_of_memory" not in spade


def test_min_seconds_needs_interleave(tmp_path, capsys):
    assert main(["bench", "train", "--lengths", "64", "--min-seconds", "5", "--out",
                 str(tmp_path), *TINY]) == 2
    assert "--min-seconds must be >= 0 and needs --interleave" in capsys.readouterr().err


def test_bench_generate_end_to_end(tmp_path, capsys):
    out = tmp_path / "gen"
    rc = main(["bench", "generate", "--contexts", "32,64", "--models",
               "spade-s4-window,transformer-full", "--tokens", "3", "--warmup", "1",
               "--state", "stepped", "--in-process", "--out", str(out), *TINY])
    assert rc == 0
    columns, rows = _read(out / "generate.csv")
    assert tuple(columns) == GENERATE_COLUMNS
    assert [(r["model"], int(r["context"])) for r in rows] == [
        ("spade-s4-window", 32), ("spade-s4-window", 64),
        ("transformer-full", 32), ("transformer-full", 64)]
    assert all(r["status"] == "ok" and r["state_mode"] == "stepped" for r in rows)
    assert all(int(r["position"]) == int(r["context"]) and int(r["tokens"]) == 3 for r in rows)
    assert all(float(r["median_ms"]) > 0 for r in rows)
    spade, full = rows[:2], rows[2:]
    # constant-size SPADE state; the KV cache grows by one slot per token
    assert spade[0]["state_mb"] == spade[1]["state_mb"]
    assert float(full[1]["state_mb"]) > float(full[0]["state_mb"])
    assert "ms per decoded token" in capsys.readouterr().out
    assert (out / "generate.png").is_file() == HAS_MPL
    assert (out / "command.txt").read_text().startswith("spadeformer bench generate --contexts")


def test_generate_subprocess_entry_point(tmp_path):
    """What the per-model subprocess runs, called in this process (no memory limit)."""
    result = tmp_path / "result.json"
    payload = dict(model="s4", shape=asdict(SHAPE), contexts=[24, 8], tokens=2, warmup=1,
                   state="auto", device="cpu", threads=1, max_memory_mb=0,
                   deadline=time.time() + 600)
    assert generate_child_main(["--cell", json.dumps(payload), "--result", str(result)]) == 0
    saved = json.loads(result.read_text())
    assert saved["status"] == "ok"
    assert [(r["context"], r["state_mode"]) for r in saved["rows"]] == [
        (8, "stepped"), (24, "stepped")]


def test_bad_model_name_is_a_cli_error(tmp_path, capsys):
    assert main(["bench", "train", "--models", "spade-s4-window,nope", "--out",
                 str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "transformer-full-eager" in err
    assert main(["bench", "generate", "--models", "transformer-full-eager", "--out",
                 str(tmp_path)]) == 2


def test_model_options_name_a_variant_of_a_model():
    assert split_model("mega-chunk") == ("mega-chunk", {})
    assert split_model("mega-chunk:mega_attention_fn=laplace:mega_hidden_dropout=0") == (
        "mega-chunk", {"mega_attention_fn": "laplace", "mega_hidden_dropout": 0})
    cfg = model_config("mega-chunk:position=rotary:mega_norm=rmsnorm", SHAPE)
    assert (cfg.position, cfg.mega_norm, cfg.d_model) == ("rotary", "rmsnorm", 32)
    for bad, match in (("mega-chunk:laplace", r"must be NAME\[:FIELD=VALUE"),
                       ("mega-chunk:colour=red", "must be FIELD=VALUE"),
                       ("mega-chunk:d_model=64", "d_model is part of the shape")):
        with pytest.raises(ValueError, match=match):
            split_model(bad)


def test_bench_runs_model_variants_and_names_them(tmp_path, capsys):
    variant = "mega-chunk:mega_attention_fn=laplace:position=rotary"
    out = tmp_path / "variants"
    assert main(["bench", "train", "--lengths", "64", "--models", f"mega-chunk,{variant}",
                 "--repeats", "1", "--warmup", "0", "--peak-size", "64", "--peak-repeats", "1",
                 "--in-process", "--no-plot", "--out", str(out), *TINY]) == 0
    _, rows = _read(out / "train.csv")
    assert [(r["model"], r["status"]) for r in rows] == [("mega-chunk", "ok"), (variant, "ok")]
    assert f"| {variant} |" in capsys.readouterr().out
    # the same matmuls: laplace changes the weights' function, rotary the bias
    assert rows[0]["gflop_per_step"] == rows[1]["gflop_per_step"]
    assert main(["bench", "generate", "--contexts", "16", "--models", variant, "--tokens", "2",
                 "--warmup", "1", "--in-process", "--no-plot", "--out", str(tmp_path / "g"),
                 *TINY]) == 0
    _, (row,) = _read(tmp_path / "g" / "generate.csv")
    assert (row["model"], row["status"]) == (variant, "ok")


@pytest.mark.parametrize("models, match", [
    ("mega-chunk:mega_norm=batchnorm", "model 'mega-chunk:mega_norm=batchnorm': "
                                       "mega_norm='batchnorm' needs causal=False"),
    ("transformer-chunk:mega_attention_fn=laplace", "only used with block='mega'"),
    ("mega-chunk,mega-chunk", "must not repeat"),
    ("mega-chunk:position=[", "its value is not valid YAML"),
    ("mega-chunk:position=rotary:position=simple", "'position' appears twice"),
    ("s4:ssm_options={d_state: 4}", "d_state is part of the shape"),
])
def test_bad_model_variants_fail_before_anything_runs(tmp_path, capsys, models, match):
    assert main(["bench", "train", "--lengths", "64", "--models", models, "--peak-size", "64",
                 "--out", str(tmp_path / "bad"), *TINY]) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()  # nothing measured, nothing written


def test_model_option_values_may_hold_colons_and_commas():
    from spadeformer.bench.cli import _name_list

    specs = _name_list("s4:ssm_options={trainable: false, lr: 0.01}:dropout=0.1,mega-chunk")
    assert specs == ["s4:ssm_options={trainable: false, lr: 0.01}:dropout=0.1", "mega-chunk"]
    name, options = split_model(specs[0])
    assert (name, options) == ("s4", {"ssm_options": {"trainable": False, "lr": 0.01},
                                      "dropout": 0.1})
    cfg = model_config(specs[0], SHAPE)  # added to the bench's own S4 options
    assert cfg.ssm_options == {"d_state": 8, "trainable": False, "lr": 0.01}
    assert model_config("mega-chunk:position=none", SHAPE).position == "none"


# ------------------------------------------------------------------------------ FLOPs
def test_flops_hand_count_tiny():
    # d=32, d_ff=128, vocab 256, 1 layer, L=64, window 16: 4 blocks of 16 queries, the first
    # causal over its own 16 keys, the other 3 against 16 + 16 keys
    d, f, V, L = 32, 128, 256, 64
    spade = train_flops("spade-s4-window", SHAPE, L)
    trainable = (4 * d * f + 8 * d * d + 4 * d * d + 2 * d * V) * L  # ffn, qkvo, mix, head
    attention = 4 * d * (3 * 16 * 32 + 16 * 17 // 2)
    # SPADE's S4 has no pointwise block, so nothing frozen is a matmul
    assert (spade.trainable_matmul, spade.frozen_matmul, spade.attention) == (
        trainable, 0, attention)
    assert spade.train_step == 3 * trainable + 3 * attention == 9_292_800
    s4 = train_flops("s4", SHAPE, L)  # the S4 stack keeps its output linear (d -> d)
    assert s4.trainable_matmul + s4.frozen_matmul == (4 * d * f + 2 * d * d + 2 * d * V) * L

    eager = train_flops("transformer-full-eager", SHAPE, L)
    assert eager.train_step == 3 * ((4 * d * f + 8 * d * d + 2 * d * V) * L + 4 * d * L * L)
    full = train_flops("transformer-full", SHAPE, L)
    assert full.attention == 4 * d * L * (L + 1) // 2


def test_attention_pairs_edge_cases():
    # ragged last block padded; 7 blocks of 16 queries, the first of them causal over 16 keys
    assert attention_pairs("window", 100, 16, 16) == 6 * 16 * 32 + 16 * 17 // 2
    # two sequences flattened: 13 banded blocks, 2 causal sequence starts
    assert attention_pairs("window", 100, 16, 16, batch=2) == 13 * 16 * 32 + 2 * 16 * 17 // 2
    assert attention_pairs("window", 10, 16, 16) == 10 * (10 + 9)  # window wider than L
    assert attention_pairs("chunk", 100, 16, 16, batch=3) == 3 * 7 * 16 * 17 // 2
    assert attention_pairs("chunk", 100, 16, 16) == 7 * 16 * 17 // 2
    assert attention_pairs("eager", 5, 1, 1) == 25
    assert attention_pairs("chunk", 100, 16, 16, with_bias=True) == 7 * 16 * 16  # whole blocks
    # a bias makes every pair of the blocks count (a dense mask, no causal skipping)
    assert attention_pairs("window", 100, 16, 16, with_bias=True) == 7 * 16 * 32
    assert attention_pairs("window", 10, 16, 16, with_bias=True) == 10 * 19
    assert attention_pairs("full", 100, 16, 16, batch=2, with_bias=True) == 2 * 100 * 100
    with pytest.raises(ValueError, match="kind must be one of"):
        attention_pairs("dense", 5, 1, 1)


@pytest.mark.parametrize("name", [*MODELS, "mega-chunk:attention=window",
                                  "mega-chunk:attention=full"])
def test_flops_match_the_matmuls_the_model_runs(name, monkeypatch):
    """Count every F.linear, SDPA / CPU flash call and eager einsum of a real forward pass."""
    shape = BenchShape(d_model=32, n_layers=2, n_heads=2, d_state=8, window_size=16,
                       chunk_size=16, batch_size=2)
    L = 100  # not a multiple of the window / chunk: the padded last block counts
    model = build_model(name, shape)
    seen = {"trainable": 0, "frozen": 0, "attention": 0}
    linear, sdpa, einsum = F.linear, F.scaled_dot_product_attention, torch.einsum
    flash = cpu_window_attn._flash_forward

    def count_linear(x, weight, bias=None):
        kind = "trainable" if weight.requires_grad else "frozen"
        seen[kind] += 2 * x.numel() * weight.shape[0]
        return linear(x, weight, bias)

    def count_attention(q, k, v, is_causal):
        n, lq, lk = q.shape[:-2].numel(), q.shape[-2], k.shape[-2]
        pairs = lq * (lq + 1) // 2 if is_causal else lq * lk
        seen["attention"] += 2 * n * pairs * (q.shape[-1] + v.shape[-1])  # QK^T, PV

    def count_sdpa(q, k, v, *args, **kwargs):
        count_attention(q, k, v, kwargs.get("is_causal", False))
        return sdpa(q, k, v, *args, **kwargs)

    def count_flash(q, k, v, is_causal, attn_mask=None):  # the CPU window path's kernel
        count_attention(q, k, v, is_causal)
        return flash(q, k, v, is_causal, attn_mask)

    def count_einsum(eq, *ops):
        out = einsum(eq, *ops)
        if eq in ("bhid,bhjd->bhij", "bhij,bhjd->bhid"):  # QK^T and PV of attention_ref
            seen["attention"] += 2 * out.numel() * ops[0].shape[-1]
        return out

    monkeypatch.setattr(F, "linear", count_linear)
    monkeypatch.setattr(F, "scaled_dot_product_attention", count_sdpa)
    monkeypatch.setattr(cpu_window_attn, "_flash_forward", count_flash)
    monkeypatch.setattr(torch, "einsum", count_einsum)
    ids = torch.randint(0, shape.vocab_size, (shape.batch_size, L))
    model(ids, labels=ids)
    flops = train_flops(name, shape, L)
    assert seen == {"trainable": flops.trainable_matmul, "frozen": flops.frozen_matmul,
                    "attention": flops.attention}


# ------------------------------------------------------------------------------ decoding
@pytest.mark.parametrize("name", ["spade-s4-window", "transformer-full", "transformer-chunk",
                                  "mega-chunk"])
def test_synthetic_state_has_the_structure_of_a_stepped_state(name):
    model = build_model(name, SHAPE).eval()
    state = model.initial_state(2)
    with torch.inference_mode():
        for _ in range(40):  # past the window (16 + 1 slots) and two chunk boundaries
            _, state = model.step(torch.randint(0, 256, (2,)), state)
    fake = synthetic_state(model, 2, 40)
    assert state_signature(fake) == state_signature(state)
    assert state_nbytes(fake) == state_nbytes(state)
    with torch.inference_mode():
        logits, fake = model.step(torch.zeros(2, dtype=torch.long), fake)
    assert torch.isfinite(logits).all() and fake["position"] == 41


def test_generate_synthetic_mode_measures_at_the_context():
    rows = run_generate_model("transformer-full", SHAPE, [48, 16], tokens=2, warmup=1,
                              state_mode="synthetic")
    assert [(r["context"], r["position"], r["state_mode"]) for r in rows] == [
        (16, 16, "synthetic"), (48, 48, "synthetic")]
    # after warm-up + timed tokens the full cache holds 48 + 3 tokens in a capacity of 64
    # (doubling from 16; k and v, 1 layer)
    per_slot = 2 * 1 * SHAPE.d_model * 4 / 2**20  # k + v of one token, one layer, fp32
    assert rows[1]["state_mb"] == pytest.approx(per_slot * 64)
    with pytest.raises(ValueError, match="state_mode must be one of"):
        run_generate_model("s4", SHAPE, [8], state_mode="exact")


# ------------------------------------------------------------------------------ tables
def _fake(model, length, seconds, mb, pct=""):
    return {"model": model, "length": length, "status": "ok", "median_s": seconds,
            "peak_mem_mb": mb, "pct_of_peak": pct}


def test_ratio_table_and_targets_from_rows():
    rows = [_fake("spade-s4-window", 2048, 1.0, 100.0, 50.0),
            _fake("transformer-full", 2048, 2.0, 400.0),
            _fake("transformer-window", 2048, 0.8, 90.0),
            _fake("spade-s4-window", 8192, 4.0, 400.0, 40.0),
            _fake("transformer-full", 8192, 16.0, 1600.0),
            {"model": "transformer-window", "length": 8192, "status": "skipped",
             "note": "timed out", "median_s": "", "peak_mem_mb": "", "pct_of_peak": ""}]
    table = ratio_table(rows)
    assert "| transformer-full | 2.00x / 4.00x | 4.00x / 4.00x |" in table
    assert "| transformer-window | 0.80x / 0.90x | skipped |" in table
    targets = spade_targets(rows, peak_gflops=100.0)
    assert "| SPADE / full (SDPA) step time, L=8192 | 0.25x | <= 0.50x | yes |" in targets
    assert "| SPADE / window-only step time, L=2048 | 1.25x | <= 1.10x | no |" in targets
    assert "L=16384 | not measured" in targets
    assert "| 50% | >= 45% | yes |" in targets
    short = spade_targets([_fake("spade-s4-window", 1024, 1.0, 100.0, 50.0)], peak_gflops=None)
    assert "| SPADE / window-only step time, every L >= 2048 | not measured |" in short


def test_rounds_pool_the_timed_steps_of_every_round():
    logs = []
    rows = run_train_bench(["transformer-window"], [32], SHAPE, warmup=0, repeats=2, rounds=2,
                           isolate=False, device="cpu", log=logs.append)
    (row,) = rows
    assert row["status"] == "ok" and row["repeats"] == 4
    assert row["min_s"] <= row["median_s"] <= row["max_s"]
    assert sum("round" in line for line in logs) == 2
    with pytest.raises(ValueError, match="rounds must be an integer >= 1"):
        run_train_bench(["s4"], [32], SHAPE, rounds=0, isolate=False)


def test_a_later_round_still_measures_the_lengths_below_a_failure(monkeypatch):
    from spadeformer.bench import train_bench

    calls = []

    def fake_cell(name, shape, length, **kwargs):
        calls.append(length)
        if length >= 64:
            return {"status": "skipped", "note": "out of memory"}
        return {"status": "ok", "median_s": 1.0, "times": [1.0], "peak_mem_mb": 1.0,
                "peak_rss_mb": 2.0}

    monkeypatch.setattr(train_bench, "run_train_cell", fake_cell)
    rows = run_train_bench(["s4"], [32, 64, 128], SHAPE, rounds=2, isolate=False,
                           device="cpu", log=lambda _: None)
    assert calls == [32, 64, 32]  # 64 fails once and is not retried, 128 never runs
    assert [(r["status"], r["repeats"]) for r in rows] == [("ok", 2), ("skipped", ""),
                                                          ("skipped", "")]
    assert rows[2]["note"] == "skipped at L=64"


def test_interleave_times_alone_a_model_that_runs_out_of_memory_beside_the_others(monkeypatch):
    """Memory cells run with the system malloc; a model that fitted alone but ran out of memory
    in the shared timing process is timed alone in its own subprocess (reuse malloc)."""
    from spadeformer.bench import train_bench

    payloads = []

    def fake_subprocess(module, payload, timeout, log):
        payloads.append(payload)
        ok = {"status": "ok", "median_s": 2.0, "min_s": 2.0, "max_s": 2.0, "repeats": 3,
              "times": [2.0] * 3, "peak_mem_mb": 5.0, "peak_rss_mb": 9.0, "first_step_s": 0.1,
              "faults_per_step": 7, "faults": [7] * 3}
        if payload.get("mode") == "interleave":
            return {"status": "ok", "cells": {
                m: (out_of_memory("out of memory: can't allocate memory")
                    if m == "transformer-full" else {**ok, "median_s": 1.0, "times": [1.0] * 3,
                                                     "faults_per_step": 3, "faults": [3] * 3})
                for m in payload["models"]}}
        if payload["repeats"] == 1:  # a memory cell (system malloc) faults far more
            return {**ok, "faults_per_step": 9999, "faults": [9999]}
        return ok

    monkeypatch.setattr(train_bench, "run_subprocess", fake_subprocess)
    rows = run_train_bench(["transformer-full", "spade-s4-window"], [64], SHAPE, repeats=3,
                           interleave=True, device="cpu", log=lambda _: None)
    memory_cells = [p for p in payloads if p.get("mode") is None and p["repeats"] == 1]
    alone = [p for p in payloads if p.get("mode") is None and p["repeats"] == 3]
    assert [p["malloc"] for p in memory_cells] == ["system", "system"]
    assert [(p["model"], p["malloc"]) for p in alone] == [("transformer-full", "reuse")]
    full, spade = rows
    assert full["status"] == "ok" and full["median_s"] == 2.0
    assert "timed alone (out of memory beside the other models)" in full["note"]
    assert spade["median_s"] == 1.0 and "timed interleaved" in spade["note"]
    # page faults come from the timed steps, never from the memory cell's system-malloc steps
    assert (full["faults_per_step"], spade["faults_per_step"]) == (7, 3)


def test_a_subprocess_peak_memory_is_its_own():
    # Linux hands ru_maxrss across fork + exec: a cell subprocess must not start from the
    # parent's peak (the CLI's matmul-peak measurement raised it before every cell)
    import subprocess
    import sys

    from spadeformer.bench.machine import peak_rss_mb

    big = torch.ones(256 * 2**20 // 4 * 4)  # 1 GiB, touched
    parent = peak_rss_mb()
    code = "from spadeformer.bench.machine import peak_rss_mb; print(peak_rss_mb())"
    child = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                 check=True).stdout)
    del big
    assert parent > 1024 and child < parent - 512, (parent, child)


def test_no_plot_removes_a_stale_plot(tmp_path, capsys):
    out = tmp_path / "b"
    out.mkdir()
    (out / "train.png").write_bytes(b"an earlier run's plot")
    assert main(["bench", "train", "--lengths", "32", "--models", "s4", "--repeats", "1",
                 "--warmup", "0", "--peak-size", "32", "--peak-repeats", "1", "--in-process",
                 "--no-plot", "--out", str(out), *TINY]) == 0
    assert not (out / "train.png").exists()
    assert "removed the old train.png: it showed an earlier run" in capsys.readouterr().err
