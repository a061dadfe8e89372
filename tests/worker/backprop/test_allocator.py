"""The engine keeps freed memory for reuse (worker/backprop/allocator.py)."""

from __future__ import annotations

import platform
import resource
import sys

import numpy as np
import pytest

from worker.backprop import allocator

glibc_only = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="the thresholds are glibc's malloc settings",
)


@glibc_only
def test_keep_freed_memory_is_applied_on_glibc():
    assert allocator.keep_freed_memory() is True


@glibc_only
def test_a_freed_activation_sized_array_is_reused_without_page_faults():
    allocator.keep_freed_memory()
    np.ones(2**20, np.float32)  # 4 MiB, allocated and freed once
    faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    for _ in range(20):
        np.ones(2**20, np.float32)

    # Memory handed back to the OS would fault each of its 1024 pages in again.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before < 100
