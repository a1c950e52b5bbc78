"""Row blocks of a merge, run on every core.

numpy and BLAS release the GIL for a block's product, cast and add, so blocks run in
parallel on plain threads. BLAS is held to one thread meanwhile: the cores go to blocks
rather than to BLAS threads spinning between thin rank-r products.

The threads are daemons fed from one queue, not a concurrent.futures pool: a pool's
threads are joined at exit, and a Ctrl-C or SIGTERM landing while the pool starts a
thread can leave one it never tells to stop, so the process would hang on exit.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import queue
import threading
from collections.abc import Callable, Iterator

from threadpoolctl import ThreadpoolController


def worker_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class Batch:
    """One call's blocks: how many are left to finish, how many are running, the first error.

    Once cancelled, blocks still queued are skipped, and cancel() returns when none is
    running: no block touches the caller's arrays after the caller has moved on.
    """

    def __init__(self, count: int):
        self.left = count
        self.running = 0
        self.error: BaseException | None = None
        self.cancelled = False
        self._state = threading.Condition()

    def run(self, work: Callable[[int], None], start: int, context: contextvars.Context) -> None:
        with self._state:  # decided under the lock, so cancel() cannot miss a block starting
            go = not self.cancelled and self.error is None
            self.running += go
        try:
            if go:
                context.run(work, start)
        except BaseException as exc:
            self.error = self.error or exc
        finally:
            with self._state:
                self.running -= go
                self.left -= 1
                self._state.notify_all()

    def wait(self) -> None:
        with self._state:
            self._state.wait_for(lambda: self.left <= 0 or self.error is not None)

    def cancel(self) -> None:
        """Skip what is queued and wait for the blocks already running."""
        with self._state:
            self.cancelled = True
            self._state.wait_for(lambda: self.running == 0)

    def raise_error(self) -> None:
        error, self.error = self.error, None  # the traceback holds this batch: no cycle keeps it alive
        if error is not None:
            raise error


class BlockPool:
    """Daemon threads, one per core, started on first use.

    A forked child inherits the pool's state but not its threads, so it starts afresh.
    """

    def __init__(self):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = 0
        self._blas: ThreadpoolController | None = None  # finding the BLAS libraries takes ~0.6 ms: once
        self._limit = None  # the BLAS limit while any caller has blocks running
        self._limit_users = 0
        self._lock = threading.Lock()
        self.local = threading.local()  # .inside is set on the pool's own threads

    def run(self, work: Callable[[int], None], starts: range) -> None:
        self._start()
        batch = Batch(len(starts))
        try:
            for start in starts:
                # Each block runs in a copy of the caller's context, so its numpy error
                # state (np.errstate) holds in the block too.
                self._queue.put((batch, work, start, contextvars.copy_context()))
            batch.wait()
        except BaseException:  # Ctrl-C, SIGTERM
            batch.cancel()
            raise
        if batch.error is not None:
            batch.cancel()
            batch.raise_error()

    @contextlib.contextmanager
    def one_blas_thread(self) -> Iterator[None]:
        """BLAS limited to one thread while any caller, on any thread, has blocks running.

        The limit is process-wide: the first caller sets it and the last one restores
        it, so two threads merging at once do not undo each other's limit.
        """
        with self._lock:
            if self._limit_users == 0:
                self._blas = self._blas or ThreadpoolController()
                self._limit = self._blas.limit(limits=1, user_api="blas")
            self._limit_users += 1
        try:
            yield
        finally:
            with self._lock:
                self._limit_users -= 1
                if self._limit_users == 0:
                    self._limit.restore_original_limits()

    def _start(self) -> None:
        with self._lock:
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


@contextlib.contextmanager
def on_this_thread() -> Iterator[None]:
    """for_each_block runs its blocks serially on the calling thread meanwhile: for a
    caller whose other core is busy with its own work (merge --onnx-like's kernel copy),
    which more threads would only take turns with."""
    previous = getattr(_pool.local, "serial", False)
    _pool.local.serial = True
    try:
        yield
    finally:
        _pool.local.serial = previous


def for_each_block(work: Callable[[int], None], starts: range) -> None:
    """Run work(start) for every start, on all cores when there are several; the first
    error is raised here. Called from a block itself it runs serially (waiting on the
    pool from inside it could deadlock), and so it does inside on_this_thread().

    BLAS is held to one thread either way, before any block starts: a product's rounding
    depends on how many threads BLAS splits it over, and every block must round alike.
    """
    with _pool.one_blas_thread():
        serial = getattr(_pool.local, "inside", False) or getattr(_pool.local, "serial", False)
        if len(starts) < 2 or worker_count() < 2 or serial:
            for start in starts:
                work(start)
        else:
            _pool.run(work, starts)
