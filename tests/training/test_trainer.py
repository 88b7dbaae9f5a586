import json
import math

import pytest
import torch
from tiny_models import TinyClassifier, TinyLM, make_tree

from spadeformer.data.corpus import ByteCorpus
from spadeformer.training.checkpoint import CheckpointManager
from spadeformer.training.schedule import lr_factor
from spadeformer.training.trainer import NonFiniteLossError, TrainConfig, Trainer, task_metric

SEQ = 32


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny ops: intra-op threads only fight the other jobs on a shared 2-core machine (10x
    slower measured), and results must not depend on the thread count anyway."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = make_tree(tmp_path_factory.mktemp("tree"))
    c = ByteCorpus(root, fractions=(0.8, 0.1, 0.1))
    assert c.files("val"), "the generated tree must give a non-empty val split"
    return c


@pytest.fixture
def data(corpus):
    return corpus.dataset("train", SEQ), corpus.dataset("val", SEQ)


def cfg(**kw):
    base = dict(steps=20, batch_size=8, lr=1e-2, warmup_steps=2, eval_every=10,
                eval_batches=4, log_every=1, save_every=10, seed=0, device="cpu",
                progress=False)
    base.update(kw)
    return TrainConfig(**base)


def read_metrics(out_dir, split="train"):
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_twenty_steps_reduce_loss_and_write_metrics(tmp_path, data):
    train, val = data
    torch.manual_seed(0)
    model = TinyLM(d=32, dropout=0.0)
    trainer = Trainer(model, train, val, cfg(), tmp_path)
    before = trainer.evaluate(val)
    result = trainer.fit()
    after = trainer.evaluate(val)
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 21))
    assert set(rows[0]) == {"step", "split", "loss", "bpb", "tokens_per_s", "lr"}
    assert rows[0]["loss"] == pytest.approx(math.log(256), abs=0.3)  # ~uniform at init
    assert sum(r["loss"] for r in rows[-5:]) / 5 < rows[0]["loss"] - 1.0
    assert after["loss"] < before["loss"] - 1.0
    for r in rows:
        assert r["bpb"] == pytest.approx(r["loss"] / math.log(2), rel=1e-12)
        want_lr = 1e-2 * lr_factor(r["step"] - 1, total_steps=20, warmup_steps=2)
        assert r["lr"] == pytest.approx(want_lr, rel=1e-12)
        assert r["tokens_per_s"] > 0
    vals = read_metrics(tmp_path, "val")
    assert [v["step"] for v in vals] == [10, 20] and vals[1]["loss"] < vals[0]["loss"]
    assert result["step"] == 20 and result["val_loss"] == vals[1]["loss"]
    assert result["best_val_loss"] == min(v["loss"] for v in vals)
    mgr = CheckpointManager(tmp_path / "checkpoints")
    assert mgr.pointer("last")["step"] == 20 and mgr.pointer("best")["step"] == 20
    assert json.loads((tmp_path / "train_config.json").read_text())["steps"] == 20


def test_lm_metric_is_bits_per_byte_or_perplexity():
    assert task_metric("lm", 2.0, 0, 0) == {"bpb": pytest.approx(2.0 / math.log(2))}
    assert task_metric("lm", 2.0, 0, 0, "ppl") == {"ppl": pytest.approx(math.exp(2.0))}
    assert math.isfinite(task_metric("lm", 1e6, 0, 0, "ppl")["ppl"])  # no overflow
    assert task_metric("classify", 0.3, 3, 4, "ppl") == {"accuracy": 0.75}
    with pytest.raises(ValueError, match="lm_metric must be one of.*got 'bits'"):
        TrainConfig(steps=1, lm_metric="bits")


def test_evaluate_is_the_exact_token_mean(tmp_path, data):
    train, val = data
    model = TinyLM(dropout=0.0)
    trainer = Trainer(model, train, val, cfg(batch_size=6), tmp_path)
    got = trainer.evaluate(val)
    model.eval()
    with torch.no_grad():
        total, count = 0.0, 0
        for i in range(len(val)):  # one block at a time: a different batching
            item = val[i]
            out = model(input_ids=item["input_ids"][None], labels=item["labels"][None])
            total += float(out.loss) * SEQ
            count += SEQ
    assert got["loss"] == pytest.approx(total / count, rel=1e-5)
    assert got["bpb"] == pytest.approx(got["loss"] / math.log(2), rel=1e-12)
    assert trainer.evaluate(val, max_batches=1)["loss"] != pytest.approx(got["loss"], rel=1e-9)


def test_grad_accumulation_matches_one_big_batch(tmp_path, data):
    train, val = data
    losses, finals = [], []
    for accum in (1, 2, 4):
        torch.manual_seed(0)
        model = TinyLM(dropout=0.0)
        Trainer(model, train, None, cfg(steps=6, grad_accum=accum), tmp_path / f"a{accum}").fit()
        losses.append([r["loss"] for r in read_metrics(tmp_path / f"a{accum}")])
        finals.append(weights(model))
    for other in (1, 2):
        assert losses[other] == pytest.approx(losses[0], rel=1e-5, abs=1e-6)
        for k in finals[0]:
            torch.testing.assert_close(finals[other][k], finals[0][k], rtol=1e-4, atol=1e-6)


class _VariableLengthLM(torch.utils.data.Dataset):
    """LM items of 2 to 30 targets: collate_batch pads their labels with -100, so
    micro-batches of one update hold different numbers of counted targets."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.items = [torch.randint(0, 256, (n + 1,), generator=g)
                      for n in (2, 30, 3, 29, 2, 2, 30, 17)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return {"input_ids": self.items[i][:-1], "labels": self.items[i][1:]}


def test_grad_accumulation_weights_micro_batches_by_their_targets(tmp_path):
    # The update is the mean over all counted targets of the global batch, however it is
    # split: averaging micro-batch means instead gave a 2-target micro-batch the weight of a
    # 30-target one (loss and weights then changed with grad_accum).
    losses, finals = [], []
    for accum in (1, 2, 4):
        torch.manual_seed(0)
        model = TinyLM(dropout=0.0)
        Trainer(model, _VariableLengthLM(), None,
                cfg(steps=3, grad_accum=accum, warmup_steps=0, eval_every=0, save_every=0),
                tmp_path / f"a{accum}").fit()
        losses.append([r["loss"] for r in read_metrics(tmp_path / f"a{accum}")])
        finals.append(weights(model))
    for other in (1, 2):
        assert losses[other] == pytest.approx(losses[0], rel=1e-5)
        for k in finals[0]:
            torch.testing.assert_close(finals[other][k], finals[0][k], rtol=1e-4, atol=1e-6)


def test_a_failing_validation_keeps_the_training_done(tmp_path, data):
    train, val = data

    class BadVal(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            raise OSError("val shard unreadable")

    torch.manual_seed(0)
    trainer = Trainer(TinyLM(dropout=0.0), train, BadVal(),
                      cfg(steps=4, eval_every=0, save_every=0), tmp_path / "run")
    with pytest.raises(OSError, match="unreadable"):
        trainer.fit()  # the final validation fails after 4 steps of training
    assert CheckpointManager(tmp_path / "run" / "checkpoints").pointer("last")["step"] == 4
    resumed = Trainer(TinyLM(dropout=0.0), train, val, cfg(steps=4, eval_every=0, save_every=0),
                      tmp_path / "run", resume=True)
    assert resumed.step == 4 and resumed.validation_pending
    resumed.fit()  # nothing left to train, but the failed validation runs now
    assert [r["step"] for r in read_metrics(tmp_path / "run", "val")] == [4]
    best = CheckpointManager(tmp_path / "run" / "checkpoints").pointer("best")
    assert best["step"] == 4 and not resumed.validation_pending


def test_a_micro_batch_without_targets_is_refused_by_name(tmp_path):
    class HalfIgnored(_VariableLengthLM):
        def __getitem__(self, i):
            item = super().__getitem__(i)
            return item if i % 2 else {**item, "labels": torch.full_like(item["labels"], -100)}

    sampler_free = cfg(steps=1, batch_size=2, grad_accum=2, warmup_steps=0, eval_every=0,
                       save_every=0)
    trainer = Trainer(TinyLM(dropout=0.0), HalfIgnored(), None, sampler_free, tmp_path / "r")
    with pytest.raises(ValueError, match=r"update 1: [12] micro-batch\(es\) hold no counted"):
        trainer.fit()


def test_validation_scores_the_same_examples_whatever_grad_accum(tmp_path, data):
    train, val = data
    losses = []
    for accum in (1, 2):
        torch.manual_seed(0)
        trainer = Trainer(TinyLM(dropout=0.0), train, val,
                          cfg(steps=2, grad_accum=accum, eval_batches=2, eval_every=0,
                              save_every=0), tmp_path / f"a{accum}")
        trainer.fit()
        losses.append(read_metrics(tmp_path / f"a{accum}", "val")[-1]["loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_a_checkpoint_with_the_older_weight_decay_grouping_resumes(tmp_path, data, monkeypatch):
    import spadeformer.training.optim as optim
    from spadeformer.config import SpadeConfig
    from spadeformer.models import SpadeForCausalLM

    def model():
        torch.manual_seed(0)
        return SpadeForCausalLM(SpadeConfig.from_preset("spade-s4-window", size="tiny",
                                                        d_model=16, n_heads=2, d_ff=32))

    train, val = data
    config = cfg(steps=4, eval_every=0, save_every=2, warmup_steps=0)
    with monkeypatch.context() as m:  # S4's (1, d) D was decayed before _no_weight_decay
        m.setattr(optim, "_no_decay_ids", lambda model: set())
        Trainer(model(), train, None, cfg(steps=2, eval_every=0, save_every=2, warmup_steps=0),
                tmp_path / "run").fit()
    with pytest.warns(UserWarning) as record:  # (and: steps changed from 2 to 4)
        resumed = Trainer(model(), train, None, config, tmp_path / "run", resume=True)
    assert any("keeps that grouping to resume exactly" in str(w.message) for w in record)
    assert resumed.step == 2
    resumed.fit()
    assert resumed.step == 4


def test_best_never_outruns_last_and_a_stale_best_is_dropped(tmp_path, data):
    import json as _json

    train, val = data
    torch.manual_seed(0)
    config = cfg(steps=6, eval_every=1, save_every=100, lr=1e-2)
    Trainer(TinyLM(dropout=0.0), train, val, config, tmp_path / "run").fit()
    ckpt = CheckpointManager(tmp_path / "run" / "checkpoints")
    best, last = ckpt.pointer("best"), ckpt.pointer("last")
    assert best["step"] <= last["step"]  # every best save is also a resume point
    # a run dir of an older version: "best" from steps after "last" (an abandoned tail)
    stale = {**best, "step": last["step"] + 3}
    (ckpt.root / "best.json").write_text(_json.dumps(stale))
    with pytest.warns(UserWarning, match="lies past the resumed step"):
        resumed = Trainer(TinyLM(dropout=0.0), train, val, config, tmp_path / "run",
                          resume=True)
    assert ckpt.pointer("best") is None and resumed.best_val_loss < math.inf


@pytest.mark.parametrize("log_every", [1, 5])  # 5: a log window spans the resumed save
def test_resume_repeats_the_uninterrupted_run_bit_for_bit(tmp_path, data, log_every):
    train, val = data
    config = cfg(steps=24, grad_accum=2, save_every=6, eval_every=4, warmup_steps=3,
                 schedule="cosine", min_lr_ratio=0.1, log_every=log_every)

    torch.manual_seed(0)
    ref_model = TinyLM(dropout=0.2)  # dropout: the RNG state must be restored too
    Trainer(ref_model, train, val, config, tmp_path / "ref").fit()
    ref_rows = (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()

    torch.manual_seed(0)
    crashing = TinyLM(dropout=0.2)
    crashing.crash_at = 2 * 15 + 1  # first micro-batch of step 16; last save was step 12
    with pytest.raises(KeyboardInterrupt):
        Trainer(crashing, train, val, config, tmp_path / "run").fit()
    assert CheckpointManager(tmp_path / "run" / "checkpoints").pointer("last")["step"] == 12

    torch.manual_seed(123)  # a restarted process builds a different fresh model
    resumed = TinyLM(dropout=0.2)
    trainer = Trainer(resumed, train, val, config, tmp_path / "run", resume=True)
    assert trainer.step == 12 and trainer.position == 12 * 8
    trainer.fit()
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()

    def strip(lines):  # everything but wall-clock throughput must be identical
        return [{k: v for k, v in json.loads(x).items() if k != "tokens_per_s"} for x in lines]

    assert len(rows) == len(ref_rows) == -(-24 // log_every) + 6  # + the final step
    assert strip(rows) == strip(ref_rows)  # exact float equality, every step
    ref_w, got_w = weights(ref_model), weights(resumed)
    assert all(torch.equal(ref_w[k], got_w[k]) for k in ref_w)


def test_resume_refuses_other_parameter_groups(tmp_path, data):
    train, val = data
    Trainer(TinyLM(), train, val, cfg(steps=2, save_every=2), tmp_path).fit()
    other = TinyLM()
    next(p for p in other.parameters() if p.ndim >= 2).requires_grad_(False)
    with pytest.raises(ValueError, match="parameter groups of sizes .* cannot be resumed"):
        Trainer(other, train, val, cfg(steps=2, save_every=2), tmp_path, resume=True)


def test_resume_applies_changed_optimiser_settings(tmp_path, data):
    train, val = data
    Trainer(TinyLM(), train, val, cfg(steps=4, save_every=4, weight_decay=0.01), tmp_path).fit()
    config = cfg(steps=8, lr=3e-3, weight_decay=0.2, betas=(0.8, 0.9))
    with pytest.warns(UserWarning, match="they apply from the next step"):
        trainer = Trainer(TinyLM(), train, val, config, tmp_path, resume=True)
    factor = lr_factor(4, total_steps=8, warmup_steps=config.warmup_steps)
    for group in trainer.optimizer.param_groups:
        assert group["lr"] == pytest.approx(3e-3 * factor, rel=1e-12)
        assert group["betas"] == (0.8, 0.9)
        assert group["weight_decay"] in (0.2, 0.0)  # 0 for biases and norms
    assert any(g["weight_decay"] == 0.2 for g in trainer.optimizer.param_groups)
    trainer.fit()
    logged = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in logged if r["step"] == 5 and r["split"] == "train"] == [
        pytest.approx(3e-3 * factor, rel=1e-12)]


def test_nan_loss_stops_with_the_step_and_keeps_last_good_checkpoint(tmp_path, data):
    train, val = data
    model = TinyLM()
    model.poison_at = 7
    trainer = Trainer(model, train, val, cfg(save_every=5, eval_every=5), tmp_path)
    with pytest.raises(NonFiniteLossError, match=r"loss became nan at step 7") as err:
        trainer.fit()
    assert err.value.step == 7
    assert all(torch.isfinite(p).all() for p in model.parameters())  # never updated with NaN
    assert max(r["step"] for r in read_metrics(tmp_path)) == 6
    mgr = CheckpointManager(tmp_path / "checkpoints")
    assert mgr.pointer("last")["step"] == 5
    good = TinyLM()
    assert mgr.load(good)["step"] == 5
    assert all(torch.isfinite(p).all() for p in good.parameters())


def test_config_validation_names_the_field():
    bad = [dict(steps=0), dict(batch_size=10, grad_accum=3), dict(lr=-1.0),
           dict(schedule="poly"), dict(task="seq2seq"), dict(precision="fp16"),
           dict(warmup_steps=50), dict(clip_norm=0.0), dict(min_lr_ratio=2.0),
           dict(eval_batches=0), dict(betas=0.9), dict(progress="maybe")]
    names = ["steps", "grad_accum", "lr", "schedule", "task", "precision", "warmup_steps",
             "clip_norm", "min_lr_ratio", "eval_batches", "betas", "progress"]
    for kw, name in zip(bad, names, strict=True):
        with pytest.raises(ValueError, match=name):
            cfg(**kw)
    with pytest.raises(ValueError, match="unknown TrainConfig fields"):
        TrainConfig.from_dict({"stepz": 3})
    c = cfg(schedule="cosine")
    assert TrainConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_evaluate_model_refuses_to_score_nothing(data):
    from spadeformer.training.trainer import evaluate_model

    _, val = data
    model = TinyLM()
    for kwargs, match in ((dict(batch_size=0), "batch_size must be a positive integer"),
                          (dict(batch_size=4, max_batches=0), "max_batches must be None"),
                          (dict(batch_size=-4), "batch_size")):
        with pytest.raises(ValueError, match=match):
            evaluate_model(model, val, **kwargs)

    class AllIgnored(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return {"input_ids": torch.ones(4, dtype=torch.long),
                    "labels": torch.full((4,), -100)}

    with pytest.raises(ValueError, match="nothing to score"):
        evaluate_model(model, AllIgnored(), batch_size=2)


def test_bf16_on_cpu_and_out_dir_misuse_are_refused(tmp_path, data):
    train, val = data
    with pytest.raises(ValueError, match="bf16"):
        Trainer(TinyLM(), train, val, cfg(precision="bf16"), tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="resume"):
        Trainer(TinyLM(), train, val, cfg(), tmp_path / "b", resume=True)
    Trainer(TinyLM(), train, None, cfg(steps=2), tmp_path / "c").fit()
    with pytest.raises(FileExistsError, match="resume=True"):
        Trainer(TinyLM(), train, None, cfg(steps=2), tmp_path / "c")
    with pytest.raises(ValueError, match="train_data"):
        Trainer(TinyLM(), [], None, cfg(), tmp_path / "d")


class _Parity(torch.utils.data.Dataset):
    """Variable-length sequences of 1s and 2s; label = whether the count of 2s is odd."""

    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for _ in range(n):
            length = int(torch.randint(3, 9, (1,), generator=g))
            ids = torch.randint(1, 3, (length,), generator=g)
            self.items.append({"input_ids": ids, "labels": (ids == 2).sum() % 2})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_classification_task_reports_accuracy(tmp_path):
    train, val = _Parity(64, 0), _Parity(21, 1)
    model = TinyClassifier()
    trainer = Trainer(model, train, val, cfg(task="classify", steps=4, eval_every=2), tmp_path)
    trainer.fit()
    rows = read_metrics(tmp_path)
    assert "accuracy" in rows[0] and "bpb" not in rows[0]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    got = trainer.evaluate(val)
    model.eval()
    with torch.no_grad():  # independent: one example at a time, no padding involved
        preds = [int(model(input_ids=x["input_ids"][None], labels=x["labels"][None]).logits
                     .argmax(-1)) for x in val.items]
    want = sum(p == int(x["labels"]) for p, x in zip(preds, val.items, strict=True)) / len(val)
    assert got["accuracy"] == pytest.approx(want, abs=1e-12)


def test_progress_lines_when_stderr_is_not_a_terminal(tmp_path, data, capsys):
    train, val = data
    Trainer(TinyLM(), train, val, cfg(steps=4, log_every=2, eval_every=4, progress=True),
            tmp_path).fit()
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("step ")]
    assert [x.split(":")[0] for x in lines] == ["step 2/4 train", "step 4/4 train",
                                                "step 4/4 val"]
    assert "loss " in lines[0] and "lr " in lines[0]


@pytest.mark.parametrize("clip_norm", [1e-3, None])
def test_clip_norm_bounds_the_gradient_the_optimiser_sees(tmp_path, data, clip_norm):
    train, val = data
    torch.manual_seed(0)
    model = TinyLM(d=32, dropout=0.0)
    trainer = Trainer(model, train, val, cfg(steps=3, eval_every=3, save_every=3,
                                             clip_norm=clip_norm), tmp_path)
    norms = []

    def before_step(optimizer, args, kwargs):
        grads = [p.grad.norm() for p in model.parameters() if p.grad is not None]
        norms.append(float(torch.stack(grads).norm()))

    trainer.optimizer.register_step_pre_hook(before_step)
    trainer.fit()
    assert len(norms) == 3
    if clip_norm is None:
        assert min(norms) > 1e-2  # unclipped gradients of a fresh model are far larger
    else:
        assert max(norms) <= clip_norm * (1 + 1e-4)


def test_compile_wraps_the_training_forward_only(tmp_path, data, monkeypatch):
    """train.compile: the training steps call torch.compile's module (a spy here); validation,
    checkpoints and the caller's model stay the plain module."""
    calls = {"train": 0, "eval": 0}

    class Spy(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, **batch):
            calls["train" if self.module.training else "eval"] += 1
            return self.module(**batch)

    compiled = []
    monkeypatch.setattr(torch, "compile", lambda m: compiled.append(m) or Spy(m))
    model = TinyLM(dropout=0.0)
    trainer = Trainer(model, *data, cfg(steps=3, grad_accum=2, eval_every=0, compile=True),
                      tmp_path)
    assert compiled == [model]  # one process: the module itself (DDP would wrap it first)
    trainer.fit()
    assert calls == {"train": 3 * 2, "eval": 0}  # every micro-batch; validation not compiled
    state = CheckpointManager(tmp_path / "checkpoints").load(TinyLM(dropout=0.0))
    assert state["step"] == 3  # the checkpoint holds the plain module's weights
    with pytest.raises(ValueError, match="compile must be true or false"):
        cfg(compile="yes")


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path, data):
    """A real torch.compile on the CPU (it compiles for about a minute): the same losses."""
    losses = []
    for name, compile_ in (("eager", False), ("compiled", True)):
        torch.manual_seed(0)
        Trainer(TinyLM(dropout=0.0), *data, cfg(steps=4, compile=compile_), tmp_path / name
                ).fit()
        losses.append([r["loss"] for r in read_metrics(tmp_path / name)])
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
