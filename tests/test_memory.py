"""gpt2lab.memory: freed blocks are reused without page faults (glibc only)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Allocate 32 blocks of 16 MiB, touch every page, free them, then do it again: count
# the minor page faults of the second round (4096 pages per block if served fresh).
SCRIPT = """
import resource, sys, torch
import gpt2lab
def round_():
    blocks = [torch.ones(4 << 20) for _ in range(32)]
    del blocks
round_()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
round_()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, gpt2lab.keep_freed_memory())
"""


def second_round_faults(keep: str) -> tuple[int, bool]:
    env = dict(os.environ, GPT2LAB_KEEP_FREED_MEMORY=keep)
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    faults, applied = out.stdout.split()
    return int(faults), applied == "True"


@pytest.mark.skipif(not GLIBC, reason="the malloc settings exist in glibc only")
def test_freed_blocks_are_reused_without_page_faults():
    pages = 32 * (16 << 20) // os.sysconf("SC_PAGESIZE")
    faults, applied = second_round_faults("1")
    print(f"second round: {faults} page faults for {pages} pages")
    assert applied
    # (a few blocks, 0-3 of the 32 in repeated runs, may still come back fresh)
    assert faults < 0.25 * pages
    # opted out: glibc's own thresholds hand (most of) the blocks back and fault again
    faults_off, applied_off = second_round_faults("0")
    print(f"opted out: {faults_off} page faults")
    assert not applied_off
    assert faults_off > 0.75 * pages
