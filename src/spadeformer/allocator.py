"""Keep freed CPU memory in the process, so that long-sequence training does not page-fault.

PyTorch's CPU tensors come from the C library's ``malloc``. glibc serves every request above
its mmap threshold (at most 32 MiB on 64-bit Linux) with a fresh ``mmap`` and gives it back to
the kernel on free. A training step at 16k tokens allocates and frees dozens of such tensors
(a (16384, 512) fp32 activation is exactly 32 MiB), so every step faults all of them in again,
one zeroed 4 KiB page at a time. Measured on the 2-core development machine, SPADE (S4 +
window, d_model 512, 4 layers) at L=16384, steps 2-4: 2.15 million page faults and 8.3 s of
kernel time per step, 20.2 s wall (median); with :func:`reuse_freed_memory`: under 41
thousand faults, 0.5 s or less of kernel time, 15.4 s wall (-24%).

:func:`reuse_freed_memory` asks glibc (``mallopt``) to serve every size from its heap
(``M_MMAP_MAX = 0``) and never to trim the heap's free top (``M_TRIM_THRESHOLD`` = max), so a
freed block is reused by the next step instead of being returned and faulted in again. The
price is memory: the process keeps its high-water mark until it exits, and the heap fragments
(glibc 2.36's ``posix_memalign``, which torch uses, cannot reuse a free chunk of exactly the
requested size), so peak RSS grew 3493 -> 4348 MB (+24%) in the measurement above.

It changes the whole process, so the library never calls it on import; the ``spadeformer``
command and the training benchmark's timing subprocesses call it at start (Python users call
it themselves; the decoding benchmark keeps the system malloc, its RSS column is live memory).
``SPADEFORMER_MALLOC=system`` leaves malloc as it is: the choice when memory is tighter than
time. On platforms without glibc (macOS, Windows, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

__all__ = ["MALLOC_ENV", "malloc_policy", "reuse_freed_memory"]

MALLOC_ENV = "SPADEFORMER_MALLOC"
_CHOICES = ("reuse", "system")

# mallopt parameter numbers from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1

_applied = False


def malloc_policy() -> str:
    """The policy ``SPADEFORMER_MALLOC`` asks for: 'reuse' (the default) or 'system'."""
    choice = os.environ.get(MALLOC_ENV, "reuse").strip().lower() or "reuse"
    if choice not in _CHOICES:
        raise ValueError(f"{MALLOC_ENV} must be one of {list(_CHOICES)}, got "
                         f"{os.environ[MALLOC_ENV]!r}")
    return choice


def reuse_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse (see the module docstring). Process-wide.

    Returns True if this process now reuses freed memory (applied now or by an earlier call:
    setting ``SPADEFORMER_MALLOC=system`` afterwards cannot undo it), else False (the
    variable was set before any call, or the C library is not glibc).
    """
    global _applied
    if malloc_policy() == "system":
        return _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success; order matters little, both must hold for the effect
    _applied = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _INT_MAX))
    return _applied
