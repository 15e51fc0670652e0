"""Host-memory allocator setting for fast CPU runs.

PyTorch allocates CPU tensors with plain ``malloc``. glibc serves every block above its mmap
threshold (which it raises as it goes, to 32 MiB at most) with a fresh mapping and unmaps it
on free, so each large activation of every step is new memory whose pages the kernel
zero-fills on first touch. At PVT's sizes (a 32 x 3136 x 512 MLP activation is 196 MiB) that
page-faulting costs as much as the GELU or LayerNorm that touches the buffer first.
`reuse_freed_memory` makes glibc serve large blocks from its heap and keep what is freed, so
the next step reuses warm pages: the fix that jemalloc or tcmalloc give, without preloading a
library. The cost is that the process holds on to its peak memory until it exits.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

__all__ = ["freed_memory_is_reused", "reuse_freed_memory"]

log = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# Free memory at the heap's top that glibc keeps rather than returning to the system: the most
# mallopt's int argument takes (2 GiB).
_KEEP_BYTES = 2**31 - 1
# Environment variables through which a user has already chosen malloc's behaviour.
_USER_SETTINGS = (
    "MALLOC_MMAP_MAX_",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "GLIBC_TUNABLES",
)
# Whether `reuse_freed_memory` has set malloc up in this process.
_reusing = False


def freed_memory_is_reused() -> bool:
    """Whether `reuse_freed_memory` has taken effect in this process."""
    return _reusing


def reuse_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse (large blocks from the heap, no trimming).

    Process-wide and lasting: call it once, at the start of an entry point, before large
    allocations. Returns False (and changes nothing) where the C library is not glibc or the
    environment already chooses them (``MALLOC_MMAP_*``, ``MALLOC_TRIM_THRESHOLD_`` or
    ``GLIBC_TUNABLES``), which then win.
    """
    chosen = [key for key in _USER_SETTINGS if key in os.environ]
    if chosen:
        log.info("malloc settings left to the environment (%s)", ", ".join(chosen))
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - present in glibc only
    except (OSError, AttributeError, TypeError):
        log.info("malloc settings unchanged: the C library (%s) is not glibc", name)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(_M_MMAP_MAX, 0) == 1
    ok &= mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES) == 1
    global _reusing
    _reusing = _reusing or bool(ok)
    return bool(ok)
