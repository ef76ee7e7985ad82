"""Prepare the next batch while the model runs this one: a thread, and on a GPU its own stream.

The extraction loop has two kinds of device work per batch: making the pixels (the host ->
device copy, and with `--decode device` the JPEG decode and resize) and running the model.
Done one after the other on one thread, the GPU idles while Python launches the decode and
the decode waits while the model runs. `Prefetcher` moves the first kind to a background
thread which, on CUDA, queues its work on a side stream; the consumer's stream waits on an
event recorded after each batch, so the model never reads pixels that are not ready, and the
pixel tensor is marked as used by the consumer's stream so the caching allocator does not
hand its memory back to the side stream early (the pattern of timm's PrefetchLoader).

Torch releases the GIL inside its operators, so the two threads overlap on the CPU side too.
Errors raised while preparing (a decoder worker dying, a CUDA error) are re-raised in the
consuming thread, at the batch where they happened.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from typing import Callable, Iterator

_DONE = object()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


class Prefetcher:
    """Iterate `(batch, pixels)` where `pixels = prepare(batch)` ran ahead on another thread.

    Args:
        batches: the loader's iterator (consumed only by the background thread).
        prepare: batch -> pixel tensor on `device` (may also fill in the batch's error records).
        device: the device `prepare` works on; "cuda..." gets a side stream.
        depth: batches prepared ahead (each holds a batch of pixels in device memory); 0
            prepares each batch inline, on the consumer's thread and stream, when it is asked for.
        timer: optional `timer(name)` context manager; the thread times "loader_wait" and
            "prepare", the consumer times nothing here.
    """

    def __init__(self, batches: Iterator, prepare: Callable, device: str, depth: int = 2, timer=None):
        self._batches = batches
        self._prepare = prepare
        self._device = device
        self._timer = timer or (lambda _name: contextlib.nullcontext())
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = None
        if depth > 0:
            self._thread = threading.Thread(target=self._work, name="embedx-prefetch", daemon=True)
            self._thread.start()

    def __iter__(self):
        import torch

        if self._thread is None:
            yield from self._inline()
            return
        cuda = self._device.startswith("cuda")
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.error
            batch, pixels, event = item
            if cuda and event is not None:
                stream = torch.cuda.current_stream(torch.device(self._device))
                stream.wait_event(event)
                if pixels.is_cuda:
                    pixels.record_stream(stream)
            yield batch, pixels

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread (after the batch it is preparing) and drop what it prepared."""
        self._stop.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _inline(self):
        batches = iter(self._batches)
        while True:
            with self._timer("loader_wait"):
                batch = next(batches, _DONE)
            if batch is _DONE:
                return
            with self._timer("prepare"):
                pixels = self._prepare(batch)
            yield batch, pixels

    def _work(self) -> None:
        import torch

        try:
            with torch.inference_mode(), self._stream_context() as stream:
                for batch, pixels in self._inline():
                    event = None
                    if stream is not None:  # marks the end of this batch's work on the side stream
                        event = torch.cuda.Event()
                        event.record(stream)
                    if not self._put((batch, pixels, event)):
                        return
            self._put(_DONE)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
            self._put(_Failure(e))

    @contextlib.contextmanager
    def _stream_context(self):
        import torch

        if not self._device.startswith("cuda"):
            yield None
            return
        device = torch.device(self._device)
        with torch.cuda.device(device):
            stream = torch.cuda.Stream(device)
            with torch.cuda.stream(stream):
                yield stream
