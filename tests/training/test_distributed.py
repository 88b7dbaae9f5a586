import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import TinyLM, make_tree

from spadeformer.data.corpus import ByteCorpus
from spadeformer.training import distributed as D
from spadeformer.training.checkpoint import CheckpointManager
from spadeformer.training.trainer import TrainConfig, Trainer

WORKER = Path(__file__).with_name("ddp_worker.py")


def test_shard_is_contiguous_and_covers_the_batch():
    idx = [7, 3, 9, 1, 4, 0, 2, 8]
    parts = [D.shard(idx, r, 2) for r in range(2)]
    assert parts == [[7, 3, 9, 1], [4, 0, 2, 8]]
    assert sum((D.shard(idx, r, 3, even=False) for r in range(3)), []) == idx
    assert [len(D.shard(idx[:2], r, 3, even=False)) for r in range(3)] == [0, 1, 1]
    with pytest.raises(ValueError, match="evenly"):
        D.shard(idx, 0, 3)


def test_single_process_environment_is_a_no_op(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    info = D.init_distributed("cpu")
    assert (info.rank, info.world_size, info.is_main, info.distributed) == (0, 1, True, False)
    model = torch.nn.Linear(2, 2)
    assert D.wrap_model(model, info) is model and D.unwrap_model(model) is model
    t = torch.ones(2)
    assert D.all_reduce_sum(t) is t and D.all_gather_objects(5) == [5]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="RANK"):
        D.init_distributed("cpu")


def test_resolve_device_refuses_cuda_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert D.resolve_device("auto") == torch.device("cpu")
    for device in ("cuda", "cuda:0", torch.device("cuda", 0)):
        with pytest.raises(ValueError, match="CUDA is not available"):
            D.resolve_device(device)
    for device in ("gpu", 3.5):
        with pytest.raises(ValueError, match="device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"):
            D.resolve_device(device)


def test_resolve_device_refuses_a_cuda_index_beyond_the_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert D.resolve_device("cuda:1") == torch.device("cuda", 1)
    assert D.resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)
    for device in ("cuda:2", torch.device("cuda", 5)):
        with pytest.raises(ValueError, match="has 2 CUDA device"):
            D.resolve_device(device)
    from spadeformer.bench import machine  # the benchmarks parse devices the same way

    with pytest.raises(ValueError, match="has 2 CUDA device"):
        machine.resolve_device("cuda:3")


def test_two_gloo_processes_match_one_process(tmp_path, monkeypatch):
    """torchrun with 2 CPU ranks (gloo) and the same global batch reproduces the 1-process
    losses to float32 rounding (each rank averages its half; DDP averages the gradients)."""
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    root = make_tree(tmp_path / "tree")
    config = TrainConfig(steps=8, batch_size=8, grad_accum=2, lr=1e-2, warmup_steps=1,
                         eval_every=4, eval_batches=3, log_every=1, save_every=4,
                         device="cpu", progress=False)

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", str(WORKER), "--root", str(root), "--out", str(tmp_path / "ddp"),
           "--config", json.dumps(config.to_dict())]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        corpus = ByteCorpus(root, fractions=(0.8, 0.1, 0.1))
        torch.manual_seed(0)
        model = TinyLM(dropout=0.0)
        Trainer(model, corpus.dataset("train", 32), corpus.dataset("val", 32), config,
                tmp_path / "single").fit()
    finally:
        torch.set_num_threads(n)

    def rows(out):
        lines = (out / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], r["split"], r["loss"]) for r in map(json.loads, lines)]

    single, ddp = rows(tmp_path / "single"), rows(tmp_path / "ddp")
    assert [r[:2] for r in ddp] == [r[:2] for r in single]  # rank 0 alone wrote, once per step
    for (_, _, a), (_, _, b) in zip(single, ddp, strict=True):
        assert b == pytest.approx(a, rel=1e-6, abs=1e-6)
    assert single[0][2] != single[-1][2]  # it trained

    ranks = [json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text()) for r in range(2)]
    assert [(r["rank"], r["world_size"]) for r in ranks] == [(0, 2), (1, 2)]
    assert ranks[0]["weights"] == ranks[1]["weights"]  # DDP kept the replicas identical
    # The checkpoint written by rank 0 holds the same weights as the single-process run.
    ddp_model = TinyLM(dropout=0.0)
    state = CheckpointManager(tmp_path / "ddp" / "checkpoints").load(ddp_model)
    assert state["step"] == 8 and state["world_size"] == 2 and len(state["rng"]) == 2
    for k, v in model.state_dict().items():
        torch.testing.assert_close(ddp_model.state_dict()[k], v, rtol=1e-5, atol=1e-6)


def test_synchronised_batch_norm_over_two_ranks_equals_one_batch(tmp_path, monkeypatch):
    """MaskedBatchNorm(sync=True) on 2 gloo ranks, half the batch each, gives the outputs,
    input gradients, summed parameter gradients and running statistics of one process
    normalising the whole batch; per-process statistics (sync=False) differ. A DDP Mega
    classifier with mega_norm="syncbatchnorm" trains to the weights of one process."""
    from sync_norm_worker import (
        all_but_rank0_padded,
        classifier_batch,
        global_batch,
        make_norm,
        mega_classifier,
        train_two_steps,
    )

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", str(WORKER.with_name("sync_norm_worker.py")), "--out", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    x, padding, w = global_batch()
    x.requires_grad_(True)
    norm = make_norm().train()  # no process group here: statistics over this whole batch
    y = norm(x, padding)
    (y * w).sum().backward()
    real = ~padding
    for r, got in enumerate(ranks):
        half = slice(2 * r, 2 * r + 2)
        torch.testing.assert_close(got["y"][real[half]], y.detach()[half][real[half]])
        torch.testing.assert_close(got["x_grad"], x.grad[half])
        assert not torch.allclose(got["y_local"][real[half]], got["y"][real[half]], atol=1e-3)
        torch.testing.assert_close(got["running_mean"], norm.running_mean)
        torch.testing.assert_close(got["running_var"], norm.running_var)
    for name in ("weight_grad", "bias_grad"):  # each rank's share; DDP would average them
        torch.testing.assert_close(ranks[0][name] + ranks[1][name],
                                   getattr(norm, name.removesuffix("_grad")).grad)
    x_pad = x.detach().clone().requires_grad_(True)  # a rank with no real token
    (make_norm().train()(x_pad, all_but_rank0_padded()) * w).sum().backward()
    torch.testing.assert_close(torch.cat([r["x_grad_rank1_padded"] for r in ranks]), x_pad.grad)

    model = mega_classifier()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_two_steps(model, *classifier_batch())
    replicas = [torch.load(tmp_path / f"model{r}.pt") for r in range(2)]
    for k, v in model.state_dict().items():
        torch.testing.assert_close(replicas[0][k], v, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(replicas[1][k], v, rtol=1e-9, atol=1e-9)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items()
               if k.endswith("norm_mix.weight"))  # the norms trained
