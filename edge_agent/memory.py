"""Process memory on small devices: allocator tuning, RSS, and the OS's view of free memory.

glibc's malloc raises its mmap threshold after the first large free (up to 32 MB), after
which the per-layer temporaries of a training step (dequantized weights, logits chunks)
come from heap arenas that fragment and never shrink: measured here, the RSS of a LoRA
step on SmolLM2 peaked about 240 MB higher than with a fixed threshold. The agent fixes
the threshold and caps the number of arenas before it loads anything.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import resource

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MMAP_THRESHOLD_BYTES = 128 * 1024
ARENA_MAX = 2


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") else None


def tune_allocator() -> bool:
    """Fix glibc's mmap threshold and cap its arenas; False where the C library is not glibc."""
    libc = _libc()
    if libc is None:
        return False
    ok = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    ok &= bool(libc.mallopt(M_ARENA_MAX, ARENA_MAX))
    ok &= bool(libc.mallopt(M_TRIM_THRESHOLD, MMAP_THRESHOLD_BYTES))
    if not ok:
        log.debug("mallopt refused a setting; the allocator keeps its defaults")
    return ok


def release_free_memory() -> None:
    """Return freed heap pages to the OS (glibc ``malloc_trim``); a no-op elsewhere."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MB (10^6 bytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6
