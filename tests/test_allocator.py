"""spadeformer.allocator: the malloc policy switch, and that 'reuse' really stops page faults.

mallopt changes the whole process, so the behaviour is checked in fresh subprocesses.
"""

import json
import os
import platform
import subprocess
import sys

import pytest

from spadeformer.allocator import MALLOC_ENV, malloc_policy
from spadeformer.cli import main

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"

# Allocate, fill and free a 64 MiB tensor (above glibc's largest mmap threshold, 32 MiB) and count
# the minor page faults of five such rounds after twelve warm-up rounds. (The heap needs a few
# rounds to settle: glibc 2.36's posix_memalign, which torch uses, wants a free chunk a little
# larger than the one just freed, so the first rounds grow the heap.)
_PROBE = """
import json, resource, torch
from spadeformer.allocator import reuse_freed_memory
applied = reuse_freed_memory()
def churn():
    x = torch.empty(16 * 2**20)
    x.fill_(1.0)
    del x
for _ in range(12):
    churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    churn()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"applied": applied, "faults": faults}))
"""


def _probe(policy: str) -> dict:
    env = {**os.environ, MALLOC_ENV: policy}
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True,
                         text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's; elsewhere the policy is a no-op")
def test_reuse_stops_page_faults_on_big_tensors():
    reuse, system = _probe("reuse"), _probe("system")
    assert reuse["applied"] is True and system["applied"] is False
    # 5 x 64 MiB = 81920 fresh 4 KiB pages if each tensor is mapped anew; reused heap: none
    assert reuse["faults"] < 1000, (reuse, system)
    assert reuse["faults"] < system["faults"], (reuse, system)


def test_policy_reads_the_environment(monkeypatch):
    monkeypatch.delenv(MALLOC_ENV, raising=False)
    assert malloc_policy() == "reuse"
    monkeypatch.setenv(MALLOC_ENV, " System ")
    assert malloc_policy() == "system"
    monkeypatch.setenv(MALLOC_ENV, "jemalloc")
    with pytest.raises(ValueError, match=r"SPADEFORMER_MALLOC must be one of .*'jemalloc'"):
        malloc_policy()


def test_cli_rejects_a_bad_policy(monkeypatch, capsys):
    monkeypatch.setenv(MALLOC_ENV, "jemalloc")
    assert main(["eval", "--run", "no-such-run"]) == 2  # fails on the policy before the run
    assert "SPADEFORMER_MALLOC must be one of ['reuse', 'system'], got 'jemalloc'" in (
        capsys.readouterr().err)
