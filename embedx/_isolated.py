"""Decoding in a process of its own, for callers that must outlive a crashing image: `embedx serve`.

A decoding library that segfaults on a crafted or damaged file takes its process with it.
`extract` and `finetune` decode in worker processes and find the culprit after a death
(`_loader.find_crashing`); a server decoding uploads in its own process would simply be gone.
`DecodeProcess` keeps one decoder process for the server's lifetime: batches of query images go
to it through a pipe (their ~150 KB of pixels each come back the same way) and, when it dies,
the batch's images are decoded again one at a time in a fresh process, so that the one that
killed it is reported as `decoder_crashed` and the others are answered.

The process is a fresh interpreter (`python -m embedx._isolated`, talking over a socket pair of
its own), not a fork: the server runs threads (HTTP handlers, the micro-batcher), and a fork of a
multi-threaded process may inherit a lock that no thread will release; and not multiprocessing's
"spawn", which runs the caller's main script again in the child — a script calling
`embedx.predict` without an `if __name__ == "__main__":` guard would fail. Starting one costs
~2-3 s of imports (2.7 s on 2 cores here), in the background while the caller loads its backbone
(`start`), and again only after a crash.
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger("embedx")


class DecoderDied(Exception):
    """The decoder process ended (or was ended, hung) while decoding; `why` says so, for the image's
    error record ("decoding it killed the decoder process (killed by signal SIGSEGV)")."""

    def __init__(self, why: str):
        super().__init__(why)
        self.why = why


def _serve(conn, threads: int) -> None:
    """The decoder process: a dataset (one batch's records, `_part`) in, its items out, until None;
    a batch's images decoded by `threads` threads (as `_loader.ThreadedBatches` does in-process)."""
    from concurrent.futures import ThreadPoolExecutor

    from ._loader import _one_torch_thread, worker_init

    worker_init(0)
    with ThreadPoolExecutor(threads, thread_name_prefix="embedx-decode", initializer=_one_torch_thread) as pool:
        conn.send("ready")  # (imports done: time from here on is decoding)
        while True:
            try:
                msg = conn.recv()
            except EOFError:  # the server is gone
                return
            if msg is None:
                return
            conn.send(list(pool.map(msg.__getitem__, range(len(msg)))))


#: seconds a batch may take in the decoder process before the process is taken for hung and
#: killed: then the batch's images are tried alone, each with this long
TIMEOUT = 60.0
#: seconds a new decoder process may take to start (its imports)
STARTUP_TIMEOUT = 300.0


class DecodeProcess:
    """One decoder process, started on first use and again after it dies, decoding each batch with
    `threads` threads (default: as many as `embed_files` would decode with in this process; the
    model waits meanwhile). Thread-safe: one batch at a time. A decode that hangs (no answer in
    `timeout` seconds) is ended like a crash, its image reported as `decoder_crashed`."""

    def __init__(self, threads: int | None = None, timeout: float = TIMEOUT):
        if threads is None:
            from .extractor import default_decode_threads

            threads = default_decode_threads(0)
        self.threads = max(1, threads)  # decoding a batch's images at once
        self.timeout = timeout
        self._proc = None
        self._conn = None
        self._ready = False
        self._lock = threading.Lock()
        self._closed = False
        self.starts = 0  # processes started so far (the first, then one per death)

    def start(self) -> None:
        """Start the process now, not on first use (it imports for ~2-3 s, meanwhile the caller
        goes on)."""
        with self._lock:
            if self._proc is None and not self._closed:
                self._start()

    def decode(self, dataset, start: int, stop: int) -> list:
        """`dataset`'s items (as `_loader.ImageDataset` gives them) for positions [start, stop).
        An image whose decoding kills the process comes back as an error item
        `("decoder_crashed", "killed by signal ...")`; the others are decoded as usual. After
        `close()` (a server swapping backbones, with requests still queued) this still works,
        in a process ended when the call returns."""
        with self._lock:
            try:
                return self._decode(dataset, start, stop)
            finally:
                if self._closed:
                    self._stop()

    def _decode(self, dataset, start: int, stop: int) -> list:
        try:
            return self._ask(dataset, range(start, stop))
        except DecoderDied as died:
            if stop - start == 1:
                return [self._crashed(start, died.why)]
            log.warning("the decoder process failed on a batch of %d images: %s; decoding them one at a time to "
                        "find which", stop - start, died.why.replace("decoding it ", ""))
        items = []
        for i in range(start, stop):
            try:
                items += self._ask(dataset, [i])
            except DecoderDied as died:
                items.append(self._crashed(i, died.why))
        return items

    def _wait_ready(self) -> None:
        """Wait for a new process's "ready". A process that does not start is no image's fault:
        an error, not an image to retry alone."""
        if not self._conn.poll(STARTUP_TIMEOUT):
            self._reap(hung=True)
            raise RuntimeError(f"embedx's decoder process did not start in {STARTUP_TIMEOUT:g} s")
        try:
            said = self._conn.recv()
        except (EOFError, OSError):
            raise RuntimeError(f"embedx's decoder process ended while starting ({self._reap()}); its messages, "
                               "if any, are above") from None
        if said != "ready":
            raise RuntimeError(f"embedx's decoder process said {said!r} instead of that it was ready")
        self._ready = True

    @staticmethod
    def _crashed(position: int, why: str):
        return position, None, 0, 0, ("decoder_crashed", why)

    def _ask(self, dataset, positions) -> list:
        if self._proc is None or self._proc.poll() is not None:
            self._start()
        try:
            if not self._ready:  # its start-up does not count against the batch's time
                self._wait_ready()
            positions = list(positions)
            self._conn.send(_part(dataset, positions))
            if not self._conn.poll(self.timeout):
                self._reap(hung=True)
                raise DecoderDied(f"decoding it did not end in {self.timeout:g} s (the decoder process was ended)")
            return [(positions[j], *item[1:]) for j, item in enumerate(self._conn.recv())]
        except (EOFError, OSError):  # the process died (mid-answer, or before the question)
            raise DecoderDied(f"decoding it killed the decoder process ({self._reap()})") from None

    def _start(self) -> None:
        import os
        import socket
        import subprocess
        import sys
        from multiprocessing.connection import Connection
        from pathlib import Path

        self._reap()
        mine, theirs = socket.socketpair()
        env = dict(os.environ)
        here = str(Path(__file__).resolve().parent.parent)  # this embedx, wherever it is imported from
        env["PYTHONPATH"] = os.pathsep.join([here] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        with theirs:  # (its end lives in the child once started: the child's death closes the pair)
            proc = subprocess.Popen([sys.executable, "-m", "embedx._isolated", str(theirs.fileno()), str(self.threads)],
                                    pass_fds=(theirs.fileno(),), env=env, stdin=subprocess.DEVNULL)
        self._proc, self._ready = proc, False
        self._conn = Connection(mine.detach())
        self.starts += 1

    def _reap(self, hung: bool = False) -> str:
        """Forget the current process (after its death, or to replace it; `hung`: killing it,
        for not answering in time): how it ended."""
        proc, conn = self._proc, self._conn
        self._proc = self._conn = None
        if conn is not None:
            conn.close()
        if proc is None:
            return "it was not running"
        import subprocess

        from ._loader import how_it_ended

        if not hung:
            try:
                return how_it_ended(proc.wait(5))
            except subprocess.TimeoutExpired:  # alive but its end of the pair broke: do not leave it behind
                pass
        proc.kill()
        proc.wait(5)
        return "killed" if hung else "its pipe broke"

    def close(self) -> None:
        """End the process (after the batch it is decoding, if any) and wait for it."""
        self._closed = True
        with self._lock:
            self._stop()

    def _stop(self) -> None:
        if self._conn is not None and self._proc is not None and self._proc.poll() is None:
            try:
                self._conn.send(None)
            except OSError:
                pass
        self._reap()


def _part(dataset, positions: list[int]):
    """The records at `positions` of an `_loader.ImageDataset`, as a dataset of their own: what
    travels to the decoder process (not the whole folder's records with every batch)."""
    records = [dataset.records[i] for i in positions]
    ids = {r.row_id for r in records}
    return type(dataset)(records, dataset.spec, {k: v for k, v in dataset.crashed.items() if k in ids})


def _main(argv: list[str]) -> None:
    """`python -m embedx._isolated FD THREADS`: the decoder process, FD its end of the socket pair."""
    from multiprocessing.connection import Connection

    fd, threads = (int(a) for a in argv)
    _serve(Connection(fd), threads)


if __name__ == "__main__":
    import sys

    _main(sys.argv[1:])
