"""Host memory: keep freed activation memory in the process instead of handing it back to the kernel.

A CPU training step allocates and frees the same large activation buffers every step. glibc's malloc
serves a block above its mmap threshold (128 kB at start, rising to at most 32 MB as blocks are freed;
EfficientNet-Lite0's largest activations at batch 32 and 224 px are ~25 MB in bf16, ~50 MB in fp32) with a fresh mmap and
returns it with munmap when freed, so every step faults those pages in again, zero-filled by the
kernel: ~130,000 minor page faults per step and 28-30% of the training process's CPU time in the kernel
in frozen-backbone steps here (issue 21; benchmarks/fit.py measures it). Two mallopt settings stop that,
with no change to any result:

- M_MMAP_MAX 0: no block is served by mmap, so freed blocks go back to malloc's free lists, and
- M_TRIM_THRESHOLD 1 GiB: free memory at the top of the heap is not trimmed back to the kernel
  until more than that is free.

The price: freed memory stays with the process, and its peak grows (by 150-400 MB in benchmarks/fit.py;
our reading: a reused heap fragments where fresh mappings do not). jemalloc or tcmalloc (LD_PRELOAD) do
the same job where they are installed; this needs nothing installed. Set TRAINER_MALLOC=system to keep glibc's defaults. Not glibc (musl,
macOS, Windows): nothing is changed.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD = 1 << 30
ENV = "TRAINER_MALLOC"  # keep (default) | system


def keep_freed_memory() -> bool:
    """Apply the two settings to this process (and to the loader workers it forks after); True when applied."""
    if os.environ.get(ENV, "keep") == "system" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # glibc only: musl's mallopt is a no-op stub
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
