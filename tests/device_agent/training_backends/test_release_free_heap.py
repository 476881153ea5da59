"""release_free_heap: glibc's malloc_trim where the C library has it, a no-op (False) elsewhere."""

from __future__ import annotations

import platform

import numpy as np

from device_agent.training_backends.runtime import release_free_heap


def test_release_free_heap_trims_on_glibc_and_is_a_no_op_elsewhere():
    kept = np.arange(1 << 16, dtype=np.float32)
    garbage = [np.ones(1 << 18, dtype=np.float32) for _ in range(8)]  # ~8 MB to give back
    del garbage
    assert release_free_heap() is (platform.libc_ver()[0] == "glibc")
    assert release_free_heap() is (platform.libc_ver()[0] == "glibc")  # the looked-up call is cached and still works
    assert float(kept.sum()) == float(np.arange(1 << 16, dtype=np.float64).sum())  # live memory untouched
