"""Row blocks of a merge, run on every core.

numpy and BLAS release the GIL for a block's product, cast and add, so blocks run in
parallel on plain threads. BLAS is held to one thread meanwhile: the cores go to blocks
rather than to BLAS threads spinning between thin rank-r products.

The threads are daemons fed from one queue, not a concurrent.futures pool: a pool's
threads are joined at exit, and a Ctrl-C or SIGTERM landing while the pool starts a
thread can leave one it never tells to stop, so the process would hang on exit.
"""

from __future__ import annotations

import contextvars
import os
import queue
import threading
from collections.abc import Callable

from threadpoolctl import ThreadpoolController


def worker_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class Batch:
    """One call's blocks: how many are still to finish, and the first error.

    Once cancelled, blocks still queued are skipped; drain() returns when none is
    running, so no block touches the caller's arrays after the caller has moved on.
    """

    def __init__(self, count: int):
        self.left = count
        self.error: BaseException | None = None
        self.cancelled = False
        self._done = threading.Condition()

    def run(self, work: Callable[[int], None], start: int, context: contextvars.Context) -> None:
        if self.error is None and not self.cancelled:
            try:
                context.run(work, start)
            except BaseException as exc:
                self.error = self.error or exc
        with self._done:
            self.left -= 1
            self._done.notify_all()

    def wait(self) -> None:
        with self._done:
            self._done.wait_for(lambda: self.left <= 0 or self.error is not None)

    def cancel(self, never_queued: int = 0) -> None:
        """Skip what is queued and wait for the blocks already running."""
        self.cancelled = True
        with self._done:
            self.left -= never_queued
            self._done.wait_for(lambda: self.left <= 0)


class BlockPool:
    """Daemon threads, one per core, started on first use.

    A forked child inherits the pool's state but not its threads, so it starts afresh.
    """

    def __init__(self):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = 0
        self._blas: ThreadpoolController | None = None  # finding the BLAS libraries takes ~0.6 ms: once
        self._lock = threading.Lock()
        self.local = threading.local()  # .inside is set on the pool's own threads

    def run(self, work: Callable[[int], None], starts: range) -> None:
        self._start()
        batch, queued = Batch(len(starts)), 0
        # Limited before any block starts: a product's rounding depends on how many
        # threads BLAS splits it over, and every block must round the same way.
        with self._blas.limit(limits=1, user_api="blas"):
            try:
                for start in starts:
                    # Each block runs in a copy of the caller's context, so its numpy
                    # error state (np.errstate) holds in the block too.
                    self._queue.put((batch, work, start, contextvars.copy_context()))
                    queued += 1
                batch.wait()
            except BaseException:  # Ctrl-C, SIGTERM
                batch.cancel(never_queued=len(starts) - queued)
                raise
            if batch.error is not None:
                batch.cancel()
                raise batch.error

    def _start(self) -> None:
        with self._lock:
            if self._blas is None:
                self._blas = ThreadpoolController()
            while self._threads < worker_count():
                threading.Thread(target=self._serve, name=f"lora-deploy-block-{self._threads}", daemon=True).start()
                self._threads += 1

    def _serve(self) -> None:
        self.local.inside = True
        while True:
            batch, work, start, context = self._queue.get()
            batch.run(work, start, context)
            del batch, work, context  # a block's closure holds the weight's arrays


_pool = BlockPool()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_pool.__init__)


def for_each_block(work: Callable[[int], None], starts: range) -> None:
    """Run work(start) for every start, on all cores when there are several; the first
    error is raised here. Called from a block itself it runs serially (waiting on the
    pool from inside it could deadlock)."""
    if len(starts) < 2 or worker_count() < 2 or getattr(_pool.local, "inside", False):
        for start in starts:
            work(start)
        return
    _pool.run(work, starts)
