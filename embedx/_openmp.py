"""How long OpenMP's idle worker threads busy-wait, and so whether decode threads can run.

After each parallel region (every op of a forward pass), GNU libgomp's workers (torch's intra-op
threads on Linux) spin GOMP_SPINCOUNT times before they sleep: 300,000 by default, which on
the 2-core machine here outlasted a whole batch's decode between two forward passes. A thread
decoding there shares its core with a spinning worker, so a second decode thread gained
nothing (loader_wait 0.39-0.43 s for 512 photos with 2 threads, 0.41 s with one). With 30,000
spins the workers sleep soon after the forward pass and 2 threads decode the same photos in
0.25 s, while the model's own time stays within the noise (benchmarks/README.md, "decode
threads"); fewer spins (3,000) or none (OMP_WAIT_POLICY=passive) slowed the model.

libgomp reads the variable once, when torch loads it: `shorten_spin_wait` sets it only before
torch is imported and only where the user has not set it. The CLI calls it first thing; a
program using the library sets `GOMP_SPINCOUNT=30000` itself before importing torch.
"""

from __future__ import annotations

import os
import sys

SPIN_COUNT = 30_000
#: at most this many spins counts as "idle workers leave the cores soon"
_SHORT = 100_000


def shorten_spin_wait() -> None:
    """Set GOMP_SPINCOUNT to `SPIN_COUNT` if torch is not loaded yet and the variable is unset."""
    if "torch" not in sys.modules:
        os.environ.setdefault("GOMP_SPINCOUNT", str(SPIN_COUNT))


_SELF_MAPS = "/proc/self/maps"
_loaded: str | None = None  # this process's runtime once found (a loaded library stays loaded)


def runtime(maps: str = _SELF_MAPS) -> str | None:
    """The OpenMP runtime loaded in this process: "gnu" (libgomp: torch's pip wheels on Linux),
    "intel" (libiomp5), "llvm" (libomp), or None when none is loaded or it cannot be told (no
    /proc: macOS, Windows). Reading the maps takes ~0.8 ms, so this process's answer is kept
    once a runtime is found (a server asks on every query)."""
    global _loaded
    if maps == _SELF_MAPS and _loaded is not None:
        return _loaded
    try:
        with open(maps) as fh:
            names = {line.rsplit("/", 1)[-1].strip() for line in fh if "omp" in line}
    except OSError:
        return None
    for prefix, name in (("libgomp", "gnu"), ("libiomp", "intel"), ("libomp", "llvm")):
        if any(n.startswith(prefix) for n in names):
            if maps == _SELF_MAPS:
                _loaded = name
            return name
    return None


def spin_wait_is_short(environ=os.environ, openmp: str | None = "gnu") -> bool:
    """Whether idle OpenMP workers leave their cores soon after a parallel region: OMP_WAIT_POLICY
    is passive, or, under GNU libgomp (`openmp`, see `runtime`), GOMP_SPINCOUNT is at most 100,000
    (as the environment says; it must have said so when torch loaded). Intel's and LLVM's runtimes
    keep their workers awake for KMP_BLOCKTIME (200 ms by default), not measured here: not short."""
    if environ.get("OMP_WAIT_POLICY", "").strip().lower() == "passive":
        return True
    if openmp != "gnu":
        return False
    value = environ.get("GOMP_SPINCOUNT", "").strip()
    try:
        return int(value) <= _SHORT
    except ValueError:  # unset (300,000), "infinite", or a form we do not parse
        return False
