"""A small, model-agnostic training loop with exact resume.

Contract with the model: ``out = model(**batch)`` where ``batch`` is a dict of tensors
(``input_ids`` / ``labels`` for language modelling; ``labels`` of shape (batch,) and optionally
``padding_mask`` for classification), and ``out.loss`` is the scalar mean loss over the batch's
counted targets (labels != -100) and ``out.logits`` the predictions.

What a run writes to ``out_dir``:

    train_config.json     the TrainConfig
    metrics.jsonl         one JSON object per line: {step, split, loss, bpb | ppl | accuracy,
                          tokens_per_s, lr}; "train" lines average the steps since the last one.
                          Language models log bits per byte (bpb) when the tokens are bytes
                          and perplexity (ppl) when they are words (TrainConfig.lm_metric)
    checkpoints/          see training/checkpoint.py: "last" (every save_every steps and at the
                          end) and "best" (lowest validation loss) pointers

Exact resume: the checkpoint holds weights, optimiser and scheduler state, every rank's RNG
states and the data position (examples consumed; the order is a pure function of seed and
position, see data/batching.py), so a resumed run repeats the uninterrupted run's losses bit for
bit on CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from spadeformer.data.batching import EpochSampler, fetch_batch
from spadeformer.training import distributed as D
from spadeformer.training.checkpoint import (
    CheckpointManager,
    atomic_write,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
)
from spadeformer.training.evaluation import (  # evaluate_model, task_metric: re-exported
    LM_METRICS,
    TASKS,
    _is_int,
    checked_forward,
    count_correct,
    count_targets,
    count_tokens,
    evaluate_model,
    task_metric,
)
from spadeformer.training.optim import param_groups
from spadeformer.training.schedule import SCHEDULES, build_scheduler, lr_factor

__all__ = ["NonFiniteLossError", "TrainConfig", "Trainer", "evaluate_model", "seed_everything",
           "task_metric"]

PRECISIONS = ("fp32", "bf16")
# Fields that may differ between a checkpoint and a resumed run without changing the numbers.
_RESUME_SAFE = frozenset({"eval_every", "eval_batches", "log_every", "save_every", "device",
                          "progress"})


class NonFiniteLossError(RuntimeError):
    """Training hit a NaN / inf loss (or gradient norm); the weights were not updated with it."""

    def __init__(self, step: int, value: float, what: str = "loss") -> None:
        self.step, self.value, self.what = step, value, what
        super().__init__(f"{what} became {value} at step {step}; stopped before the update, "
                         f"the last good checkpoint is kept")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class TrainConfig:
    """Optimisation settings. ``batch_size`` is the *global* batch per update (summed over
    gradient-accumulation micro-batches and data-parallel ranks). ``eval_every`` /
    ``save_every`` = 0 mean only at the end; validation scores ``eval_batches`` batches of
    ``batch_size`` examples (None = the whole split), in micro-batches of ``batch_size //
    grad_accum`` (what fits in memory for training fits for scoring)."""

    steps: int = 1000
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 1e-3
    ssm_lr: float | None = None
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    schedule: str = "linear"
    min_lr_ratio: float = 0.0
    clip_norm: float | None = 1.0
    eval_every: int = 100
    eval_batches: int | None = None
    log_every: int = 10
    save_every: int = 500
    seed: int = 0
    task: str = "lm"
    lm_metric: str = "bpb"
    precision: str = "fp32"
    device: str = "auto"
    progress: bool = True
    # torch.compile the training forward (fused kernels on a GPU; the first steps compile,
    # minutes on a CPU); validation, checkpoints and the saved model stay the plain module
    compile: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.betas, (list, tuple)):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        self.betas = tuple(self.betas)  # JSON gives a list
        for name in ("progress", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("steps", "batch_size", "grad_accum", "log_every", "eval_every",
                     "save_every", "seed", "warmup_steps", "eval_batches"):
            v = getattr(self, name)  # train.steps=1e3 on the command line is a float
            if isinstance(v, float) and v.is_integer():
                setattr(self, name, int(v))
        for name in ("steps", "batch_size", "grad_accum", "log_every"):
            v = getattr(self, name)
            if not _is_int(v) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name in ("eval_every", "save_every", "seed"):
            v = getattr(self, name)
            if not _is_int(v) or v < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
        if not _is_int(self.warmup_steps) or not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"warmup_steps must be an integer in [0, steps={self.steps}], "
                             f"got {self.warmup_steps!r} (a short trial of a preset: lower "
                             "warmup_steps too, e.g. train.warmup_steps=0)")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size={self.batch_size} must be divisible by "
                             f"grad_accum={self.grad_accum}")
        if not _is_num(self.lr) or self.lr <= 0:
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if self.ssm_lr is not None and (not _is_num(self.ssm_lr) or self.ssm_lr <= 0):
            raise ValueError(f"ssm_lr must be None or a positive number, got {self.ssm_lr!r}")
        if not _is_num(self.weight_decay) or self.weight_decay < 0:
            raise ValueError(f"weight_decay must be a number >= 0, got {self.weight_decay!r}")
        if len(self.betas) != 2 or not all(_is_num(b) and 0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not _is_num(self.min_lr_ratio) or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio!r}")
        if self.clip_norm is not None and (not _is_num(self.clip_norm) or self.clip_norm <= 0):
            raise ValueError(f"clip_norm must be None (no clipping) or a positive number, "
                             f"got {self.clip_norm!r}")
        if self.eval_batches is not None and (not _is_int(self.eval_batches)
                                              or self.eval_batches <= 0):
            raise ValueError(f"eval_batches must be None (whole split) or a positive integer, "
                             f"got {self.eval_batches!r}")
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.lm_metric not in LM_METRICS:
            raise ValueError(f"lm_metric must be one of {LM_METRICS} (bits per byte for byte "
                             f"tokens, perplexity for words), got {self.lm_metric!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not isinstance(self.device, str):
            raise ValueError(f"device must be a string ('auto', 'cpu', 'cuda', 'cuda:N'), "
                             f"got {self.device!r}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {unknown}; allowed: {sorted(known)}")
        return cls(**d)


class _Window:
    """Running sums between two train log lines. Checkpoints hold them (``sums()``), so the
    first line after a resume averages the same steps as the uninterrupted run's."""

    def __init__(self, sums: dict[str, float] | None = None) -> None:
        self.steps, self.loss, self.tokens, self.correct, self.count = 0, 0.0, 0.0, 0.0, 0.0
        self.elapsed = 0.0  # seconds of training steps before t0 (restored with the sums)
        if sums:
            self.steps = int(sums["steps"])
            self.loss, self.tokens = float(sums["loss"]), float(sums["tokens"])
            self.correct, self.count = float(sums["correct"]), float(sums["count"])
            self.elapsed = float(sums["elapsed"])
        self.t0 = time.perf_counter()

    def seconds(self) -> float:
        return self.elapsed + time.perf_counter() - self.t0

    def sums(self) -> dict[str, float]:
        return {"steps": self.steps, "loss": self.loss, "tokens": self.tokens,
                "correct": self.correct, "count": self.count, "elapsed": self.seconds()}

    def add(self, loss: float, tokens: float, correct: float, count: float) -> None:
        self.steps += 1
        self.loss += loss
        self.tokens += tokens
        self.correct += correct
        self.count += count


class Trainer:
    """Train ``model`` on ``train_data`` (a map-style dataset of example dicts), validating on
    ``val_data`` (or None), writing logs and checkpoints to ``out_dir``.

    ``resume=True`` continues from ``out_dir``'s last checkpoint (it must exist);
    ``resume=False`` refuses an ``out_dir`` that already holds one. ``collate_fn`` turns a list
    of examples into a batch dict (default: :func:`spadeformer.data.batching.collate_batch`,
    or the dataset's own vectorised ``get_batch``).
    """

    def __init__(self, model: nn.Module, train_data: Any, val_data: Any | None,
                 config: TrainConfig, out_dir: str | Path, resume: bool = False, *,
                 collate_fn: Callable[[list[Any]], dict[str, torch.Tensor]] | None = None) -> None:
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        for name, data in (("train_data", train_data), ("val_data", val_data)):
            if data is None and name == "val_data":
                continue
            if not (hasattr(data, "__len__") and hasattr(data, "__getitem__")) or len(data) == 0:
                raise ValueError(f"{name} must be a non-empty map-style dataset "
                                 f"(__len__ and __getitem__), got {type(data).__name__}")
        self.config = cfg = config
        self.train_data, self.val_data, self.collate_fn = train_data, val_data, collate_fn
        self.out_dir = Path(out_dir)
        self.dist = D.init_distributed(cfg.device)
        self.device = self.dist.device
        if cfg.precision == "bf16" and self.device.type != "cuda":
            raise ValueError(f"precision='bf16' needs a CUDA device (bf16 autocast is CUDA-only "
                             f"here), got device={str(self.device)!r}; use precision='fp32' "
                             "(train.precision=fp32 on the command line)")
        per_update = cfg.batch_size // cfg.grad_accum
        if per_update % self.dist.world_size:
            raise ValueError(
                f"batch_size / grad_accum = {per_update} must be divisible by the "
                f"world size {self.dist.world_size} so every rank gets an equal shard"
            )
        self.micro_batch = per_update  # global examples per micro-step (all ranks together)
        self.ckpt = CheckpointManager(self.out_dir / "checkpoints")
        seed_everything(cfg.seed + self.dist.rank)  # dropout masks differ across ranks

        self.raw_model = model.to(self.device)
        self.step = 0
        self.position = 0  # training examples consumed (global, all ranks)
        self.best_val_loss = math.inf
        self.validation_pending = False  # True: resumed from a save whose validation failed
        self._window = _Window()
        self._print_lines = False  # fit() decides: log lines on stderr when it is no terminal
        state = self._load_for_resume() if resume else None
        if not resume and self.ckpt.pointer("last") is not None:
            raise FileExistsError(
                f"out_dir {str(self.out_dir)!r} already holds a checkpoint (step "
                f"{self.ckpt.pointer('last')['step']}); pass resume=True to continue it or use "
                f"an empty out_dir"
            )
        self.model = D.wrap_model(self.raw_model, self.dist)
        # what the training forward calls: the same parameters, compiled or not
        self.step_model = torch.compile(self.model) if cfg.compile else self.model
        self.optimizer = self._build_optimizer()
        self.scheduler = self._build_scheduler()
        self.sampler = EpochSampler(len(train_data), seed=cfg.seed)
        if state is not None:
            self._restore(state)
            self._drop_best_of_abandoned_steps()
        self.last_metrics: dict[str, Any] = {}
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._write_text(self.out_dir / "train_config.json",
                             json.dumps(cfg.to_dict(), indent=2, sort_keys=True))
            self._prepare_metrics_file()
        D.barrier()

    # ------------------------------------------------------------------ setup helpers

    def _build_optimizer(self, no_decay_marks: bool = True) -> torch.optim.Optimizer:
        cfg = self.config
        groups = param_groups(self.raw_model, cfg.lr, cfg.weight_decay, ssm_lr=cfg.ssm_lr,
                              no_decay_marks=no_decay_marks)
        if not any(g["params"] for g in groups):
            raise ValueError("the model has no trainable parameters")
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas,
                                 weight_decay=cfg.weight_decay)

    def _build_scheduler(self):
        cfg = self.config
        return build_scheduler(self.optimizer, total_steps=cfg.steps,
                               warmup_steps=cfg.warmup_steps, schedule=cfg.schedule,
                               min_lr_ratio=cfg.min_lr_ratio)

    def _load_for_resume(self) -> dict[str, Any]:
        path = self.ckpt.path("last")
        if path is None:
            raise FileNotFoundError(f"resume=True but {str(self.ckpt.root)!r} holds no 'last' "
                                    f"checkpoint; start with resume=False")
        state = load_checkpoint(path, self.raw_model, map_location="cpu")
        old = state.get("config", {})
        changed = sorted(k for k, v in self.config.to_dict().items()
                         if k not in _RESUME_SAFE and k in old and old[k] != v)
        if changed and self.dist.is_main:
            warnings.warn(f"resuming with changed settings {changed}: they apply from the next "
                          f"step, so the run will not repeat the original exactly", stacklevel=3)
        return state

    def _restore(self, state: dict[str, Any]) -> None:
        # The checkpoint's optimiser state brings back its own lr, weight decay and betas; a
        # resumed run's config may change them, and the config wins (the warning of
        # _load_for_resume names them). Unchanged settings give back the same numbers.
        saved = [len(g["params"]) for g in state["optimizer"]["param_groups"]]
        now = [len(g["params"]) for g in self.optimizer.param_groups]
        if saved != now:
            # a checkpoint from before per-channel vectors (S4's D, Hyena's filter bias) left
            # weight decay: resume it with the grouping it was written with
            legacy = self._build_optimizer(no_decay_marks=False)
            if [len(g["params"]) for g in legacy.param_groups] == saved:
                if self.dist.is_main:
                    warnings.warn("the checkpoint groups the optimiser as spadeformer did before "
                                  "SSM skip vectors (D, Hyena's filter bias) left weight decay; "
                                  "this run keeps that grouping to resume exactly",
                                  stacklevel=3)
                self.optimizer, now = legacy, saved
                self.scheduler = self._build_scheduler()
        fresh = [{k: g[k] for k in ("initial_lr", "weight_decay", "betas")}
                 for g in self.optimizer.param_groups]
        if saved != now:
            raise ValueError(
                f"the checkpoint's optimiser has parameter groups of sizes {saved}, this model "
                f"and config give {now} (another trainable set or other SSM hints, e.g. a "
                "checkpoint of an older spadeformer, whose Hyena filter had no SSM hint): it "
                "cannot be resumed; start a new run from its weights instead")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scheduler.base_lrs = [f["initial_lr"] for f in fresh]
        for group, settings, fn in zip(self.optimizer.param_groups, fresh,
                                       self.scheduler.lr_lambdas, strict=True):
            group.update(settings)
            group["lr"] = settings["initial_lr"] * fn(self.scheduler.last_epoch)
        self.step = int(state["step"])
        self.position = int(state["data"]["position"])
        self.best_val_loss = float(state["best_val_loss"])
        self.validation_pending = bool(state.get("validation_pending", False))
        self._window = _Window(state.get("train_window"))  # absent in older checkpoints
        if int(state["data"].get("num_items", len(self.train_data))) != len(self.train_data):
            warnings.warn("train_data has a different length than when the checkpoint was "
                          "written; the data order will differ", stacklevel=3)
        rngs = state["rng"]
        if len(rngs) == self.dist.world_size:
            restore_rng_state(rngs[self.dist.rank])
        else:  # a different world size cannot continue the per-rank streams; stay deterministic
            warnings.warn(f"checkpoint has RNG states for {len(rngs)} ranks, this run has "
                          f"{self.dist.world_size}; reseeding", stacklevel=3)
            seed_everything(self.config.seed + self.dist.rank + 1_000_003 * self.step)

    def _drop_best_of_abandoned_steps(self) -> None:
        """A "best" pointer past the resumed step (a run dir from before "last" followed every
        best save) names a model of steps this run redoes: drop it, keep the score to beat."""
        best = self.ckpt.pointer("best")
        D.barrier()  # every rank has read the pointer before rank 0 may remove it
        if best is None or best["step"] <= self.step:
            return
        if self.dist.is_main:
            warnings.warn(f"the 'best' checkpoint (step {best['step']}) lies past the resumed "
                          f"step {self.step}: it belongs to the interrupted steps and is "
                          "dropped; a later validation that beats the best loss of the steps "
                          "kept becomes the best", stacklevel=3)
            (self.ckpt.root / "best.json").unlink()
            self.ckpt.collect_garbage()

    def _prepare_metrics_file(self) -> None:
        """Fresh run: empty metrics.jsonl. Resume: drop lines past the checkpoint's step (they
        belong to the abandoned tail and are about to be recomputed)."""
        path = self.out_dir / "metrics.jsonl"
        keep: list[str] = []
        if self.step > 0 and path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(ValueError):
                    if json.loads(line)["step"] <= self.step:
                        keep.append(line)
        self._write_text(path, "".join(line + "\n" for line in keep))

    @staticmethod
    def _write_text(path: Path, text: str) -> None:
        def write(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)

        atomic_write(path, write)

    # ------------------------------------------------------------------ batches

    def _batch(self, data: Any, indices: list[int]) -> dict[str, torch.Tensor]:
        batch = fetch_batch(data, indices, self.collate_fn)
        return {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                for k, v in batch.items()}

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.config.precision == "bf16":
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return count_tokens(batch)

    def _forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> Any:
        return checked_forward(model, batch)

    def _correct(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
        return count_correct(logits, labels)

    # ------------------------------------------------------------------ training

    def _train_step(self, step: int) -> tuple[float, float, float, float]:
        """One optimiser update over grad_accum micro-batches -> (loss, tokens, correct,
        count), each summed over ranks except loss (the global mean).

        The update's loss is the mean over every counted target (labels != -100) of the
        global batch, whatever the split into micro-batches and ranks: each micro-batch's
        mean loss is weighted by its share of the update's targets (equal shares when every
        item has as many targets, e.g. LM blocks or one label per example). A micro-batch
        without any target has no mean loss: refused, naming the step."""
        cfg, info = self.config, self.dist
        self.model.train()
        batches = []  # inputs of the whole update first: their target counts set the weights
        for _ in range(cfg.grad_accum):
            indices = self.sampler.indices(self.position, self.micro_batch)
            self.position += self.micro_batch
            batches.append(self._batch(self.train_data,
                                       D.shard(indices, info.rank, info.world_size)))
        counts = torch.tensor([count_targets(b) for b in batches], dtype=torch.float64,
                              device=self.device)
        totals = torch.stack([counts.sum(), (counts == 0).sum().double()])
        D.all_reduce_sum(totals)  # (all targets, empty micro-batches) over every rank
        if totals[1] > 0:  # a mean over no target is 0/0: the model's loss would be NaN
            raise ValueError(
                f"update {step}: {int(totals[1])} micro-batch(es) hold no counted target "
                "(every label -100), so their mean loss is undefined; drop examples without "
                "targets from the data (or use fewer gradient-accumulation steps)")
        weights = counts / totals[0]
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # loss, tok, corr, cnt
        for micro, batch in enumerate(batches):
            last = micro == cfg.grad_accum - 1
            # Skip DDP's gradient all-reduce on all but the last micro-batch.
            sync = (contextlib.nullcontext() if last or not info.distributed
                    else self.model.no_sync())
            with sync:
                with self._autocast():
                    out = self._forward(self.step_model, batch)
                # DDP averages gradients over ranks: world_size undoes that into a sum
                (out.loss * (weights[micro] * info.world_size).to(out.loss.dtype)).backward()
            sums[0] += out.loss.detach().double() * weights[micro]
            sums[1] += self._tokens(batch)
            if cfg.task == "classify":
                c, n = self._correct(out.logits.detach(), batch["labels"])
                sums[2] += c
                sums[3] += n
        D.all_reduce_sum(sums)  # every rank sees the same numbers, so all stop together
        loss = float(sums[0])
        if not math.isfinite(loss):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(step, loss)
        params = [p for p in self.raw_model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm or math.inf)
        if not math.isfinite(float(norm)):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(step, float(norm), what="gradient norm")
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, float(sums[1]), float(sums[2]), float(sums[3])

    def _lr(self, step: int) -> float:
        """Base learning rate used by update ``step`` (1-based)."""
        c = self.config
        return c.lr * lr_factor(step - 1, total_steps=c.steps, warmup_steps=c.warmup_steps,
                                schedule=c.schedule, min_lr_ratio=c.min_lr_ratio)

    def _task_metric(self, loss: float, correct: float, count: float) -> dict[str, float]:
        return task_metric(self.config.task, loss, correct, count, self.config.lm_metric)

    def _log(self, record: dict[str, Any]) -> None:
        if self.dist.is_main:
            with open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        if self._print_lines:
            shown = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                             for k, v in record.items() if k not in ("step", "split"))
            print(f"step {record['step']}/{self.config.steps} {record['split']}: {shown}",
                  file=sys.stderr, flush=True)

    def _save(self, tags: list[str], info: dict[str, Any], window: dict[str, float],
              validation_pending: bool = False) -> None:
        """Checkpoint ``tags``; ``window`` = the log window's sums to resume with;
        ``validation_pending``: this step's validation failed, a resume runs it first."""
        # Every rank contributes its RNG state (a collective), rank 0 writes.
        rngs = D.all_gather_objects(capture_rng_state())
        if self.dist.is_main:
            state = {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "rng": rngs,
                "data": {"position": self.position, "seed": self.config.seed,
                         "num_items": len(self.train_data)},
                "best_val_loss": self.best_val_loss,
                "train_window": window,
                "world_size": self.dist.world_size,
                "config": self.config.to_dict(),
                "validation_pending": validation_pending,
            }
            self.ckpt.save(self.raw_model, state, self.step, tags=tags, info=info)
        D.barrier()

    def fit(self) -> dict[str, Any]:
        """Train to ``config.steps``; returns the final metrics (last train window, last
        validation, best validation loss). Raises NonFiniteLossError on a NaN / inf loss."""
        cfg = self.config
        # a progress bar on a terminal; one line per log record otherwise (pipes, CI, nohup)
        show = cfg.progress and self.dist.is_main and sys.stderr.isatty()
        self._print_lines = cfg.progress and self.dist.is_main and not show
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not show, desc="train",
                   dynamic_ncols=True)
        self._window.t0 = time.perf_counter()  # what ran before fit() is no training time
        try:
            if self.validation_pending:  # the validation a failure interrupted comes first
                self.validation_pending = False
                self._checkpoint_step(self.step, validate=True, save_last=True)
            while self.step < cfg.steps:
                step = self.step + 1
                window = self._window
                stats = self._train_step(step)
                self.step = step
                window.add(*stats)
                bar.update(1)
                final = step == cfg.steps
                if step % cfg.log_every == 0 or final:
                    loss = window.loss / window.steps
                    rec = {"step": step, "split": "train", "loss": loss,
                           **self._task_metric(loss, window.correct, window.count),
                           "tokens_per_s": window.tokens / max(window.seconds(), 1e-9),
                           "lr": self._lr(step)}
                    self._log(rec)
                    self.last_metrics["train"] = rec
                    bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}")
                    self._window = _Window()
                self._checkpoint_step(
                    step, validate=final or bool(cfg.eval_every and step % cfg.eval_every == 0),
                    save_last=final or bool(cfg.save_every and step % cfg.save_every == 0))
        finally:
            bar.close()
            # stop the window's clock: a later fit() (after an interruption) starts it again
            self._window.elapsed, self._window.t0 = self._window.seconds(), time.perf_counter()
        out: dict[str, Any] = {"step": self.step, "best_val_loss": self.best_val_loss}
        for split, rec in self.last_metrics.items():
            out.update({f"{split}_{k}": v for k, v in rec.items() if k not in ("step", "split")})
        return out

    def _checkpoint_step(self, step: int, validate: bool, save_last: bool) -> None:
        """Validation and checkpoints after update ``step`` (kept out of tokens/s and out of
        the log window a checkpoint stores: they are not training time)."""
        cfg = self.config
        paused = time.perf_counter()
        window_sums = self._window.sums()
        tags: list[str] = []
        info: dict[str, Any] = {}
        if validate and self.val_data is not None:
            # eval_batches counts batches of batch_size examples, scored in micro-batches
            max_batches = None if cfg.eval_batches is None else cfg.eval_batches * cfg.grad_accum
            try:
                val = self.evaluate(self.val_data, max_batches=max_batches)
            except Exception:
                # A validation that fails (too long for learned positions, out of memory)
                # would fail again at the same step: keep the training done so far, marked
                # so that a --resume with a fixed config validates this step first. Not
                # under DDP: the other ranks may be inside a collective of their own.
                if not self.dist.distributed:
                    self._save(["last"], {}, window_sums, validation_pending=True)
                raise
            rec = {"step": step, "split": "val", **val, "lr": self._lr(step)}
            self._log(rec)
            self.last_metrics["val"] = rec
            if val["loss"] < self.best_val_loss:
                self.best_val_loss = val["loss"]
                tags.append("best")
                info["val_loss"] = val["loss"]
        # a best checkpoint is a resume point too: "last" never trails "best", so a resumed
        # run cannot inherit a best from steps it is about to redo
        if tags or save_last:
            tags.append("last")
            self._save(tags, info, window_sums)
        self._window.t0 += time.perf_counter() - paused

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, data: Any, max_batches: int | None = None) -> dict[str, float]:
        """Mean loss over ``data`` in order, in batches of one training micro-step
        (``batch_size // grad_accum``: what fits in memory for training fits for scoring);
        see :func:`evaluate_model`. Every rank scores its shard; the sums are all-reduced."""
        return evaluate_model(self.raw_model, data, batch_size=self.micro_batch,
                              task=self.config.task, lm_metric=self.config.lm_metric,
                              device=self.device,
                              max_batches=max_batches, collate_fn=self.collate_fn,
                              autocast=self._autocast, rank=self.dist.rank,
                              world_size=self.dist.world_size)
