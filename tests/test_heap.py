"""glibc's mmap threshold, fixed by the CLI (icl_probe.models.heap)."""

import os
import subprocess
import sys

import pytest

CHILD = """
import sys, torch
from icl_probe.models.heap import return_freed_memory
took = return_freed_memory()
def rss():
    return int(open('/proc/self/status').read().split('VmRSS:')[1].split()[0])
first = torch.ones(2 * 1024 * 1024)
del first               # glibc's defaults now raise their threshold above 8 MiB
base = rss()
blocks = [torch.ones(2 * 1024 * 1024) for _ in range(32)]   # 32 blocks of 8 MiB
del blocks[:-1]                                             # free all but the last (on top)
print(took, (rss() - base) // 1024)
"""


def _run(env_extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    return out[0] == "True", int(out[1])


def test_freed_blocks_leave_the_rss_with_the_threshold_fixed():
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc only")
    took, kept_mib = _run({})
    if not took:
        pytest.skip("not glibc")
    assert kept_mib < 32, kept_mib  # 248 MiB freed: back to the system
    took, kept_mib = _run({"ICL_PROBE_HEAP": "glibc"})
    assert not took  # the opt-out leaves glibc's defaults, which keep the freed blocks
    assert kept_mib > 128, kept_mib
