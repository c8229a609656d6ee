"""`keep_freed_memory`: on glibc, large blocks freed by one training step are reused by the next instead of being
unmapped and page-faulted afresh (measured in fresh processes, since the setting is process-wide)."""

import os
import platform
import subprocess
import sys

import pytest

from scldm_hf.training.allocator import KEEP_FREED_MEMORY

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="mallopt is glibc's")

# 10 "steps", each allocating, filling and freeing activations of 65 MB and 16 MB; prints minor faults per step
STEPS = """
import resource, sys, torch
from scldm_hf.training.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else []
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.ones(64, 2000, 128).mul_(2)
start = faults()
for _ in range(10):
    activations = [torch.empty(64, 2000, 128).fill_(1.0), torch.empty(16, 2000, 128).fill_(1.0)]
    del activations
print(len(applied), (faults() - start) / 10)
"""


def faults_per_step(mode: str, environment: dict) -> tuple[int, float]:
    result = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, check=True,
                            env=environment)
    applied, faults = result.stdout.split()
    return int(applied), float(faults)


def test_kept_memory_removes_most_page_faults_of_repeated_large_activations():
    environment = {name: value for name, value in os.environ.items() if name not in KEEP_FREED_MEMORY}
    environment["OMP_NUM_THREADS"] = "1"
    applied, kept = faults_per_step("keep", environment)
    _, default = faults_per_step("default", environment)
    assert applied == len(KEEP_FREED_MEMORY)
    assert kept < default / 3


def test_environment_variables_set_by_the_user_win():
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **{name: "131072" for name in KEEP_FREED_MEMORY}}
    applied, _ = faults_per_step("keep", environment)
    assert applied == 0
