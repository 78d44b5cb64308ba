"""Keep freed tensor memory in the process, so that a hot loop does not page-fault every step.

torch allocates CPU tensors with malloc. glibc hands a freed block back to the kernel when it is
large: by munmap above its mmap threshold, by trimming the heap above its trim threshold (both
adapt to what the process frees). A training step allocates and frees activations of a few MiB in
a pattern that keeps tripping them, so its next allocation comes back as fresh pages, a page fault
each on first touch. Measured on the census MMoE training step (2 cores, a VM): 3 to 800 minor
faults per step with glibc's defaults, under 6 with these settings, and 10% more samples/s on
average over five alternating pairs of runs (`benchmarks/results/reference.md` runs with them).

`retain_freed_memory()` sets the mmap threshold to 64 MiB (smaller blocks come from the heap, and
are reused once freed) and the trim threshold to 256 MiB (the heap keeps up to that much free
memory). Process-wide and for the rest of the process: the trainer and batch scoring call it, as
work that owns its process. RECSYS_MOE_MALLOC=default leaves glibc's settings alone (`retain`, the default, applies them).
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger(__name__)

ENV = "RECSYS_MOE_MALLOC"
MMAP_THRESHOLD = 64 << 20
TRIM_THRESHOLD = 256 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_applied = False


def retain_freed_memory() -> bool:
    """Apply the settings once (glibc only); whether they are in effect."""
    global _applied
    if _applied:
        return True
    value = os.environ.get(ENV, "").strip()
    if value == "default":
        return False
    if value not in ("", "retain"):
        log.warning("%s=%r: expected 'default' (glibc's own) or 'retain'; retaining freed memory", ENV, value)
    try:
        libc = ctypes.CDLL(None)  # the symbols this process already has, libc's among them
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # not glibc (macOS, musl): nothing to tune
        return False
    mallopt = libc.mallopt
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if _applied:
        log.debug("malloc: mmap threshold %d MiB, trim threshold %d MiB", MMAP_THRESHOLD >> 20, TRIM_THRESHOLD >> 20)
    return _applied
