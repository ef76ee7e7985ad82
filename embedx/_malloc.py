"""Keep freed heap memory for reuse, so CPU inference stops page-faulting.

glibc's malloc serves large blocks (the activations of a CNN batch: megabytes each) with fresh
`mmap`s and hands freed memory at the top of the heap back to the OS. A forward pass that
allocates and frees the same large blocks every batch then pays a zero-filled page fault per
4 KiB, every batch: measured on 2 cores with EfficientNet-Lite0 at batch 4, 3,500 minor faults
per image and a quarter of the CPU time in the kernel. Raising both thresholds makes malloc keep
and reuse those blocks (the effect the PyTorch CPU tuning guide gets by preloading jemalloc or
tcmalloc), with no preload and no dependency. The price: the process keeps its peak heap until
it exits instead of returning it between batches.

Process-wide and one-way (glibc has no call that restores its adaptive thresholds); child
processes forked afterwards (the decoder workers) inherit it. A no-op where the C library is not
glibc.
"""

from __future__ import annotations

import ctypes
import logging
import platform
import sys

log = logging.getLogger(__name__)

HEAP_CHOICES = ("auto", "keep", "release")

# mallopt(3) parameters
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# blocks up to this size come from the heap instead of their own mmap: larger than the
# activations of any CPU batch; older glibc caps it at HEAP_MAX_SIZE / 2 = 32 MiB (tried next)
_MMAP_THRESHOLDS = (1 << 30, 32 << 20)
_TRIM_THRESHOLD = 2**31 - 1  # (mallopt takes an int) the heap's free top is kept up to 2 GiB

_kept: bool | None = None  # None: not tried yet in this process


def is_glibc() -> bool:
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def keep_freed_memory() -> bool:
    """Make glibc keep and reuse freed blocks from now on. True if it is in effect."""
    global _kept
    if _kept is not None:
        return _kept
    _kept = False
    if not is_glibc():
        log.debug("heap: not glibc (%s); leaving the allocator as it is", platform.libc_ver()[0] or sys.platform)
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError) as e:  # pragma: no cover - glibc always has mallopt
        log.warning("heap: mallopt unavailable (%s); leaving the allocator as it is", e)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not any(mallopt(_M_MMAP_THRESHOLD, t) for t in _MMAP_THRESHOLDS):
        log.warning("heap: glibc refused a larger mmap threshold; leaving the allocator as it is")
        return False
    if not mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD):  # pragma: no cover - accepted by every glibc
        log.warning("heap: glibc refused the trim threshold; large frees may still page-fault")
        return False
    _kept = True
    return True


def check_heap(choice: str) -> None:
    """Refuse a --heap value that is not one of HEAP_CHOICES (before any work is done)."""
    if choice not in HEAP_CHOICES:
        from .errors import InputError

        raise InputError(f"--heap must be one of {', '.join(HEAP_CHOICES)}, not {choice!r}.")


def resolve_heap(choice: str, device: str) -> bool:
    """Whether a run keeps freed memory: `keep`, `release` (glibc's default), or `auto`: keep on
    CPU devices, where the model's own activations are the large blocks (measured there).
    `choice` is one of HEAP_CHOICES (see check_heap)."""
    if choice == "auto":
        return device == "cpu" and is_glibc()
    return choice == "keep"


def apply_heap(choice: str, device: str) -> bool:
    """Keep freed memory from now on if the run's --heap choice says so. True if it is in effect."""
    return resolve_heap(choice, device) and keep_freed_memory()
