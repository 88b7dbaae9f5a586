"""Data-parallel training under ``torchrun``: process group, DDP wrapping, sharding, reductions.

Launched by ``torchrun --nproc-per-node N ...`` the environment holds RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT; :func:`init_distributed` then joins the process group
(NCCL on CUDA, Gloo on CPU). Without those variables (or with WORLD_SIZE=1) everything here is
a no-op and a single process trains as usual.

Sharding rule (deterministic): every rank draws the same global batch of indices from the
sampler and keeps the contiguous slice ``[rank * n / W, (rank + 1) * n / W)``, so the union over
ranks is exactly the batch a single process would use, and averaging the per-rank mean losses
(DDP averages gradients the same way) reproduces the single-process mean.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = [
    "DistInfo",
    "all_gather_objects",
    "all_reduce_sum",
    "barrier",
    "cleanup",
    "init_distributed",
    "is_distributed",
    "resolve_device",
    "shard",
    "unwrap_model",
    "wrap_model",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: rank among world_size processes, and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs, writes metrics and checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def resolve_device(device: str | torch.device = "auto", local_rank: int = 0) -> torch.device:
    """"auto" -> cuda:local_rank when CUDA is available, else cpu; "cuda" -> cuda:local_rank.
    A CUDA device when CUDA is not available is refused here, not at the first tensor."""
    if isinstance(device, torch.device):
        out = device
    elif device == "auto":
        out = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    elif device == "cuda":
        out = torch.device("cuda", local_rank)
    else:
        try:
            out = torch.device(device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', "
                             f"got {device!r}") from None
    if out.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available; use 'cpu' or 'auto'")
    if out.type == "cuda" and out.index is not None and out.index >= torch.cuda.device_count():
        raise ValueError(f"device={device!r} but this machine has {torch.cuda.device_count()} "
                         f"CUDA device(s), numbered from 0")
    return out


def init_distributed(device: str | torch.device = "auto",
                     timeout_s: float = 600.0) -> DistInfo:
    """Join the process group if launched by torchrun (WORLD_SIZE > 1); idempotent."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= RANK < WORLD_SIZE, got RANK={rank}, WORLD_SIZE={world_size}")
    dev = resolve_device(device, local_rank)
    if world_size > 1:
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            backend = "nccl" if dev.type == "cuda" else "gloo"
            dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                    timeout=datetime.timedelta(seconds=timeout_s))
        elif dist.get_world_size() != world_size or dist.get_rank() != rank:
            raise RuntimeError(
                f"an existing process group has rank {dist.get_rank()} of "
                f"{dist.get_world_size()}, but the environment says {rank} of {world_size}"
            )
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def wrap_model(model: nn.Module, info: DistInfo) -> nn.Module:
    """DDP-wrap ``model`` (already on ``info.device``) when running distributed."""
    if not info.distributed:
        return model
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside a DDP wrapper (or the module itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def shard(indices: Sequence[int], rank: int, world_size: int, *, even: bool = True) -> list[int]:
    """This rank's contiguous slice of a global list of indices.

    ``even=True`` (training) requires ``len(indices)`` divisible by ``world_size`` so every rank
    holds the same number of examples; ``even=False`` (evaluation) allows the last ranks to hold
    one fewer (or none).
    """
    n = len(indices)
    if even and n % world_size:
        raise ValueError(f"cannot split {n} indices evenly over world_size={world_size}")
    start, stop = (rank * n) // world_size, ((rank + 1) * n) // world_size
    return list(indices[start:stop])


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (identity when not distributed); returns the tensor."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank ([obj] when not distributed)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group (call once at the end of a torchrun script)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
