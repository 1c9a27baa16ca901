"""Keep freed host memory for the next step instead of handing it back to the kernel (glibc, CPU runs).

By default glibc's malloc serves requests above its mmap threshold with fresh mappings, and
returns the top of its heap to the kernel whenever more than its trim threshold lies free there
(both thresholds move with the largest block freed so far). A training or scoring step on the
CPU frees its activations, logits and gradients at the end and asks for the same sizes again
at the start of the next one, so the kernel takes those pages back and hands them out again,
zero-filled, one page fault per 4 KiB: 4,000-8,000 faults per step at `bench_train.py`'s
shape, and 4-13% of the step time measured in a process of its own.

`keep_freed_memory()` fixes the thresholds instead: blocks up to 32 MiB (the most glibc allows
on a 64-bit machine) come from the heap, and the heap keeps up to 1 GiB of free memory at its
top, which the next step reuses without a fault. The process's resident memory then stays at
its per-step peak, which every step reaches anyway; blocks above 32 MiB are still mapped and
unmapped each time.

Left alone where the user has chosen: glibc's own variables (MALLOC_TRIM_THRESHOLD_,
MALLOC_MMAP_THRESHOLD_, MALLOC_TOP_PAD_, GLIBC_TUNABLES with a malloc tunable) or another
allocator in LD_PRELOAD (jemalloc, tcmalloc, mimalloc); and where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys

M_TRIM_THRESHOLD = -1   # from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 1 << 30
GLIBC_VARIABLES = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")
_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")

_applied = False


def user_choice(environ: dict[str, str] | None = None) -> str | None:
    """The variable by which the user already chose how malloc behaves, if any."""
    env = os.environ if environ is None else environ
    for name in GLIBC_VARIABLES:
        if name in env:
            return name
    if "glibc.malloc." in env.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES"
    if any(allocator in env.get("LD_PRELOAD", "") for allocator in _ALLOCATORS):
        return "LD_PRELOAD"
    return None


def keep_freed_memory() -> bool:
    """Fix glibc's thresholds as above, once per process; whether they are now fixed by us."""
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc" or user_choice():
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    # mallopt returns 1 on success; the mmap threshold goes first, since fixing it stops glibc
    # from moving the trim threshold by itself.
    _applied = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _applied


def for_device(device) -> bool:
    """`keep_freed_memory()` where the step's tensors live in host memory (a CPU device)."""
    return device.type == "cpu" and keep_freed_memory()


def applied() -> bool:
    """Whether this process runs with the fixed thresholds."""
    return _applied
