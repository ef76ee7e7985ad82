"""The one progress-bar constructor every long step uses (extract, finetune, index).

All bars go to stderr (stdout stays for results: tables, JSON, CSV) and are off with
`progress=False` / `--no-progress`; tqdm is imported only when a bar is made.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable


def progress_bar(iterable: Iterable | None = None, *, desc: str, unit: str, enabled: bool,
                 total: int | None = None, initial: int = 0, leave: bool = True, delay: float = 0.0):
    """A tqdm bar on stderr: `unit`/s is its rate (img/s for extraction), smoothed over recent
    updates; with `delay`, shown only once a step has taken that many seconds."""
    # not tqdm.auto: its asyncio mixin calls iter() on the iterable in the constructor and again when
    # iterated, so a DataLoader started its worker processes twice, the first set decoding batches
    # that nobody read (fine-tuning, every epoch). autonotebook: the notebook bar or the plain one
    from tqdm.autonotebook import tqdm

    return tqdm(iterable, total=total, initial=initial, desc=desc, unit=unit, unit_scale=False,
                dynamic_ncols=True, disable=not enabled, file=sys.stderr, leave=leave, smoothing=0.1,
                delay=delay)
