"""Scoring a model on a data set: the loss weighted by counted targets, the task's metric
(bits per byte, perplexity or accuracy) and the helpers the training loop shares with it."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from spadeformer.data.batching import fetch_batch
from spadeformer.training import distributed as D

__all__ = ["IGNORE_INDEX", "LM_METRICS", "TASKS", "checked_forward", "count_correct",
           "count_targets", "count_tokens", "evaluate_model", "task_metric"]

TASKS = ("lm", "classify")
LM_METRICS = ("bpb", "ppl")  # bits per byte (byte tokens), perplexity (word tokens)
IGNORE_INDEX = -100


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Real (unpadded) input tokens: every ``input_ids*`` tensor (retrieval has two) minus its
    ``padding_mask*``; without inputs named so, the number of examples."""
    total, found = 0, False
    for key, ids in batch.items():
        if key.startswith("input_ids") and isinstance(ids, torch.Tensor):
            found = True
            mask = batch.get("padding_mask" + key[len("input_ids"):])
            total += ids.numel() - (int(mask.sum()) if isinstance(mask, torch.Tensor) else 0)
    return total if found else int(batch["labels"].shape[0])


def count_targets(batch: dict[str, torch.Tensor]) -> int:
    """Labels the loss averages over (labels != -100): the weight of a batch's mean loss."""
    return int((batch["labels"] != IGNORE_INDEX).sum())


def checked_forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> Any:
    """``model(**batch)``, insisting that the result carries a scalar ``.loss``."""
    out = model(**batch)
    loss = getattr(out, "loss", None)
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise TypeError("model(**batch) must return an object whose .loss is a scalar "
                        f"tensor; got loss={loss!r}")
    return out


def count_correct(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(correct predictions, counted labels) for classification accuracy."""
    keep = labels != IGNORE_INDEX
    hits = (logits.argmax(-1) == labels) & keep
    return float(hits.sum()), float(keep.sum())


def task_metric(task: str, loss: float, correct: float, count: float,
                lm_metric: str = "bpb") -> dict[str, float]:
    """For "lm": bits per byte (``lm_metric="bpb"``: byte tokens, nats/token -> bits/byte) or
    perplexity (``"ppl"``: word tokens, exp of the mean loss); accuracy for "classify"."""
    if task == "lm":
        if lm_metric == "ppl":
            return {"ppl": math.exp(min(loss, 700.0))}  # 700: exp stays a finite float
        return {"bpb": loss / math.log(2)}
    return {"accuracy": correct / max(count, 1.0)}


@torch.no_grad()
def evaluate_model(model: nn.Module, data: Any, *, batch_size: int, task: str = "lm",
                   lm_metric: str = "bpb", device: str | torch.device | None = None,
                   max_batches: int | None = None,
                   collate_fn: Callable[[list[Any]], dict[str, torch.Tensor]] | None = None,
                   autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
                   rank: int = 0, world_size: int = 1) -> dict[str, float]:
    """Mean loss over ``data`` in order (batches of ``batch_size``, the first ``max_batches``
    only if given), plus bpb or ppl (lm, see :func:`task_metric`) or accuracy (classify) and
    tokens_per_s. The loss is weighted by counted targets (labels != -100), so it is the exact
    per-token (lm) / per-example (classify) mean however the batches fall. With
    ``world_size > 1`` each rank scores its shard and the sums are all-reduced."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if max_batches is not None and (not _is_int(max_batches) or max_batches < 1):
        raise ValueError(f"max_batches must be None (the whole split) or a positive integer, "
                         f"got {max_batches!r}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    autocast = autocast or contextlib.nullcontext
    n = len(data)
    num_batches = math.ceil(n / batch_size)
    if max_batches is not None:
        num_batches = min(num_batches, max_batches)
    was_training = model.training
    model.eval()
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # loss*w, w, tok, corr, cnt
    t0 = time.perf_counter()
    try:
        for b in range(num_batches):
            indices = list(range(b * batch_size, min(n, (b + 1) * batch_size)))
            mine = D.shard(indices, rank, world_size, even=False)
            if not mine:
                continue
            batch = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                     for k, v in fetch_batch(data, mine, collate_fn).items()}
            with autocast():
                out = checked_forward(model, batch)  # the raw model: no DDP hooks in eval
            weight = float(count_targets(batch))
            if weight == 0:  # nothing counted (the model's mean would be 0/0)
                continue
            sums[0] += out.loss.double() * weight
            sums[1] += weight
            sums[2] += count_tokens(batch)
            if task == "classify":
                c, k = count_correct(out.logits, batch["labels"])
                sums[3] += c
                sums[4] += k
    finally:
        model.train(was_training)
    if world_size > 1:
        D.all_reduce_sum(sums)
    if float(sums[1]) == 0:  # a loss of 0 here would read as a perfect model
        raise ValueError(f"nothing to score: the {min(n, num_batches * batch_size)} examples "
                         f"of the first {num_batches} batch(es) hold no counted target "
                         "(labels != -100)")
    loss = float(sums[0] / sums[1])
    return {"loss": loss, **task_metric(task, loss, float(sums[3]), float(sums[4]), lm_metric),
            "tokens_per_s": float(sums[2]) / max(time.perf_counter() - t0, 1e-9)}
