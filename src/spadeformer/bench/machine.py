"""Machine-level helpers of the benchmarks: devices, memory accounting and limits, the matmul
peak, and running one benchmark cell in a fresh subprocess (so its peak memory is its own)."""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# one device parser for the library: the benchmarks accept what training accepts
from spadeformer.training.distributed import resolve_device

__all__ = [
    "available_memory_mb",
    "current_rss_mb",
    "is_oom",
    "limit_memory",
    "matmul_peak",
    "minor_faults",
    "peak_rss_mb",
    "resolve_device",
    "run_subprocess",
    "sync",
    "warm_libraries",
]

MB = 1024.0 * 1024.0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_rss_mb() -> float:
    """Peak resident set of this process so far.

    Linux: ``VmHWM`` of /proc/self/status, this process's own high-water mark. Not
    ``ru_maxrss``: Linux carries it across fork + exec, so a fresh bench subprocess started
    from a CLI that had just measured the matmul peak began at the CLI's peak (every cell's
    baseline was the parent's 426 MB instead of its own ~306 MB). Elsewhere ``ru_maxrss``.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0  # kB
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MB if sys.platform == "darwin" else peak / 1024.0


def minor_faults() -> int:
    """Minor page faults of this process so far: each is a fresh page the kernel mapped and
    zeroed, ~8 us apiece on the 2-core VM, so a step that faults a 64 MiB tensor in (16k
    faults) pays ~0.13 s for it. The bench reports them per step to tell noise from work."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def current_rss_mb() -> float:
    """Current resident set (Linux /proc); falls back to the peak elsewhere."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / MB
    except (OSError, ValueError, IndexError):
        return peak_rss_mb()


def available_memory_mb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError):
        pass
    return None


def limit_memory(max_mb: float) -> bool:
    """Cap this process's data segment at its current size + max_mb (Linux RLIMIT_DATA), so
    that an oversized allocation raises instead of invoking the OOM killer. True if set."""
    if max_mb <= 0 or not sys.platform.startswith("linux"):
        return False
    try:
        status = Path("/proc/self/status").read_text()
        vm_data_kb = next(int(ln.split()[1]) for ln in status.splitlines()
                          if ln.startswith("VmData:"))
    except (OSError, StopIteration, ValueError):
        return False
    soft = int(vm_data_kb * 1024 + max_mb * MB)
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))
    return True


def out_of_memory(note: str, **extra: Any) -> dict[str, Any]:
    """A skipped cell that ran out of memory: ``out_of_memory`` says so to the code (the
    interleaved bench retries such a model alone), the note to the reader."""
    return {"status": "skipped", "note": note, "out_of_memory": True, **extra}


def is_oom(err: BaseException) -> bool:
    """Allocation failures: Python, the CPU / CUDA allocators, and OpenMP failing to map its
    thread stacks (which count against RLIMIT_DATA)."""
    text = str(err).lower()
    markers = ("out of memory", "can't allocate memory", "cannot allocate memory",
               "thread creation failed", "memoryerror")
    return isinstance(err, MemoryError) or any(m in text for m in markers)


def warm_libraries() -> None:
    """Touch the lazily initialised parts of torch a training step uses (autograd, GEMM, FFT,
    SDPA, AdamW) on tiny tensors, so that a memory baseline taken afterwards leaves out their
    one-off setup (~85 MB of RSS on CPU) and only the model's own memory is counted."""
    import torch.nn.functional as F

    lin = torch.nn.Linear(16, 16)
    x = torch.randn(8, 16, requires_grad=True)
    q = torch.randn(1, 2, 8, 4, requires_grad=True)
    loss = lin(x).sum() + F.scaled_dot_product_attention(q, q, q, is_causal=True).sum()
    loss = loss + torch.fft.irfft(torch.fft.rfft(x, n=32), n=32).sum()
    loss.backward()
    torch.optim.AdamW(lin.parameters()).step()


def matmul_peak(size: int = 4096, repeats: int = 5, device: str | torch.device = "cpu"
                ) -> dict[str, Any]:
    """fp32 (size x size) @ (size x size) throughput: median GFLOP/s over ``repeats``."""
    device = torch.device(device)
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    out = torch.empty(size, size, device=device)
    torch.mm(a, b, out=out)  # warm-up (thread pool, allocator)
    samples = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        sync(device)
        samples.append(2.0 * size**3 / (time.perf_counter() - t0) / 1e9)
    return {"size": size, "gflops_median": statistics.median(samples),
            "samples_gflops": [round(s, 3) for s in samples]}


def run_subprocess(module: str, payload: dict[str, Any], timeout: float,
                   log: Callable[[str], None]) -> dict[str, Any]:
    """Run ``python -m module --cell JSON --result FILE``; always returns a result dict.

    A child killed by the timeout, by a signal, or failing with an allocation error gives
    status "skipped" with the reason; any other failure gives status "error". A child may
    write partial results (key "rows") before it dies; they are returned too.
    """
    with tempfile.TemporaryDirectory(prefix="spadeformer-bench-") as tmp:
        result_path = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", module, "--cell", json.dumps(payload),
               "--result", str(result_path)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            outcome: dict[str, Any] | None = None
        except subprocess.TimeoutExpired:
            proc = None
            outcome = {"status": "skipped", "note": f"timed out after {timeout:.0f}s"}
        saved = json.loads(result_path.read_text()) if result_path.is_file() else None
    if proc is not None and proc.returncode == 0 and saved is not None:
        return saved
    if outcome is None:
        err = (proc.stderr or "").strip().splitlines()
        last = err[-1] if err else ""
        if proc.returncode < 0:
            outcome = out_of_memory(f"killed by signal {-proc.returncode} "
                                    "(likely out of memory)")
        elif any(is_oom(RuntimeError(line)) for line in err[-5:]):
            outcome = out_of_memory(f"out of memory: {last[:160]}")
        else:
            outcome = {"status": "error", "note": f"rc={proc.returncode}: {last[:200]}"}
            log("\n".join(err[-15:]))
    if saved is not None and "rows" in saved:
        outcome["rows"] = saved["rows"]
    return outcome
