"""Decoding in a process of its own, for callers that must outlive a crashing image: `embedx serve`.

A decoding library that segfaults on a crafted or damaged file takes its process with it.
`extract` and `finetune` decode in worker processes and find the culprit after a death
(`_loader.find_crashing`); a server decoding uploads in its own process would simply be gone.
`DecodeProcess` keeps one decoder process for the server's lifetime: batches of query images go
to it through a pipe (their ~150 KB of pixels each come back the same way) and, when it dies,
the batch's images are decoded again one at a time in a fresh process, so that the one that
killed it is reported as `decoder_crashed` and the others are answered.

The process is a fresh interpreter (`python -m embedx._isolated`, talking over two pipes of its
own), not a fork: the server runs threads (HTTP handlers, the micro-batcher), and a fork of a
multi-threaded process may inherit a lock that no thread will release; and not multiprocessing's
"spawn", which runs the caller's main script again in the child — a script calling
`embedx.predict` without an `if __name__ == "__main__":` guard would fail. Starting one costs
~2-3 s of imports (2.7 s on 2 cores here), in the background while the caller loads its backbone
(`start`), and again only after a crash.
"""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger("embedx")


class DecoderDied(Exception):
    """The decoder process ended (or was ended, hung) while decoding; `why` says so, for the image's
    error record ("decoding it killed the decoder process (killed by signal SIGSEGV)")."""

    def __init__(self, why: str):
        super().__init__(why)
        self.why = why


def _serve(conn, threads: int) -> None:
    """The decoder process: (dataset, positions) in, the dataset's items for them out, until None;
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
            dataset, positions = msg
            conn.send(list(pool.map(dataset.__getitem__, positions)) if len(positions) > 1
                      else [dataset[i] for i in positions])


#: seconds a batch may take in the decoder process before the process is taken for hung and
#: killed: then the batch's images are tried alone, each with this long
TIMEOUT = 60.0
#: seconds a new decoder process may take to start (its imports)
STARTUP_TIMEOUT = 300.0


class DecodeProcess:
    """One decoder process, started on first use and again after it dies, decoding each batch with
    `threads` threads. Thread-safe: one batch at a time. A decode that hangs (no answer in
    `timeout` seconds) is ended like a crash, its image reported as `decoder_crashed`."""

    def __init__(self, threads: int = 1, timeout: float = TIMEOUT):
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
            self._conn.send((_part(dataset, positions), list(range(len(positions)))))
            if not self._conn.poll(self.timeout):
                self._reap(hung=True)
                raise DecoderDied(f"decoding it did not end in {self.timeout:g} s (the decoder process was ended)")
            return [(positions[item[0]], *item[1:]) for item in self._conn.recv()]
        except (EOFError, OSError):  # the process died (mid-answer, or before the question)
            raise DecoderDied(f"decoding it killed the decoder process ({self._reap()})") from None

    def _start(self) -> None:
        import os
        import subprocess
        import sys
        from multiprocessing.connection import Connection
        from pathlib import Path

        self._reap()
        to_child, from_parent = os.pipe()  # (read end, write end) each
        from_child, to_parent = os.pipe()
        env = dict(os.environ)
        here = str(Path(__file__).resolve().parent.parent)  # this embedx, wherever it is imported from
        env["PYTHONPATH"] = os.pathsep.join([here] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        try:
            proc = subprocess.Popen([sys.executable, "-m", "embedx._isolated", str(to_child), str(to_parent),
                                     str(self.threads)], pass_fds=(to_child, to_parent), env=env,
                                    stdin=subprocess.DEVNULL)
        finally:
            os.close(to_child)  # (the child's ends live in the child now: its death closes the pipes)
            os.close(to_parent)
        self._proc, self._ready = proc, False
        self._conn = _Duplex(Connection(from_child, writable=False), Connection(from_parent, readable=False))
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
        if hung:
            proc.kill()
            proc.wait(5)
            return "killed"
        try:
            code = proc.wait(5)
        except Exception:  # noqa: BLE001 - alive but its pipe broke: do not leave it behind
            proc.kill()
            proc.wait(5)
            return "its pipe broke"
        if code < 0:
            try:
                return f"killed by signal {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"it exited with code {code}"

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


class _Duplex:
    """Two one-way Connections (a pipe each way) as one: send, recv, poll, close."""

    def __init__(self, reader, writer):
        self.reader, self.writer = reader, writer

    def send(self, obj) -> None:
        self.writer.send(obj)

    def recv(self):
        return self.reader.recv()

    def poll(self, timeout: float) -> bool:
        return self.reader.poll(timeout)

    def close(self) -> None:
        self.reader.close()
        self.writer.close()


def _main(argv: list[str]) -> None:
    """`python -m embedx._isolated READ_FD WRITE_FD THREADS`: the decoder process."""
    from multiprocessing.connection import Connection

    read_fd, write_fd, threads = (int(a) for a in argv)
    _serve(_Duplex(Connection(read_fd, writable=False), Connection(write_fd, readable=False)), threads)


if __name__ == "__main__":
    import sys

    _main(sys.argv[1:])
