"""The block pool: errors reach the caller, interrupts stop it, and it survives nesting,
numpy error states and fork."""

from __future__ import annotations

import gc
import multiprocessing
import signal
import threading
import time

import numpy as np
import pytest

import lora_deploy.merge.blocks as blocks
from lora_deploy.merge.blocks import for_each_block


@pytest.fixture(autouse=True)
def several_workers(monkeypatch):
    monkeypatch.setattr(blocks, "worker_count", lambda: 4)  # the pool, even on a one-core machine


def test_every_block_runs_once_on_the_pool():
    seen, names = [], set()

    def work(i):
        seen.append(i)
        names.add(threading.current_thread().name)

    for_each_block(work, range(0, 100, 3))
    assert sorted(seen) == list(range(0, 100, 3))
    assert all(n.startswith("lora-deploy-block-") for n in names)


def test_a_failing_block_raises_in_the_caller():
    ran = []

    def work(i):
        if i == 3:
            raise ValueError("block 3")
        time.sleep(0.01)
        ran.append(i)

    with pytest.raises(ValueError, match="block 3"):
        for_each_block(work, range(400))
    when_raised = len(ran)
    time.sleep(0.3)
    assert when_raised == len(ran) < 399  # the rest skipped, none still running


def test_called_from_a_block_it_runs_serially():
    inner = []

    def work(i):
        for_each_block(inner.append, range(4))  # waiting on the pool from inside it would deadlock

    done = threading.Thread(target=for_each_block, args=(work, range(8)), daemon=True)
    done.start()
    done.join(timeout=30)
    assert not done.is_alive() and len(inner) == 32


def test_on_this_thread_keeps_the_blocks_on_the_caller():
    """merge --onnx-like's math stays on its thread while the kernel copy has the other core."""
    names = []

    def work(i):
        names.append(threading.current_thread().name)

    with blocks.on_this_thread():
        for_each_block(work, range(8))
    assert names == [threading.current_thread().name] * 8
    names.clear()
    for_each_block(work, range(8))  # and back on the pool after
    assert all(n.startswith("lora-deploy-block-") for n in names)


def test_the_callers_numpy_error_state_holds_in_blocks():
    def work(i):
        np.float32(3e38) * np.float32(10)  # overflows

    with np.errstate(over="raise"), pytest.raises(FloatingPointError):
        for_each_block(work, range(8))


def test_an_interrupt_skips_the_blocks_still_queued(ctrl_c):
    ran = []

    def work(i):
        time.sleep(0.001)
        ran.append(i)

    def interrupt_soon():
        time.sleep(0.1)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)  # a real Ctrl-C

    threading.Thread(target=interrupt_soon, daemon=True).start()
    # A Ctrl-C landing in a gc callback (hypothesis installs one once its tests have run in
    # this process) is "unraisable" and lost, so no collection runs while it may land.
    gc.disable()
    try:
        with pytest.raises(KeyboardInterrupt):
            for_each_block(work, range(4000))  # ~1 s of blocks on 4 threads
    finally:
        gc.enable()
    when_interrupted = len(ran)
    time.sleep(0.5)
    assert 0 < when_interrupted == len(ran) < 4000  # none was left running, none ran later


def merge_blocks_in_child(result):
    out = []
    for_each_block(out.append, range(16))
    result.put(sorted(out))


def test_a_forked_child_starts_its_own_threads():
    for_each_block(lambda i: None, range(8))  # the parent's threads exist now
    context = multiprocessing.get_context("fork")
    result = context.Queue()
    child = context.Process(target=merge_blocks_in_child, args=(result,))
    child.start()
    child.join(timeout=60)
    alive = child.is_alive()
    if alive:
        child.kill()
    assert not alive and result.get(timeout=5) == list(range(16))


def test_blas_stays_limited_while_any_caller_has_blocks_running():
    """(threadpoolctl lets only one thread, normally the main one, change a pthreads
    OpenBLAS's limit: here the main thread merges while another thread merges too.)"""
    from threadpoolctl import threadpool_info, threadpool_limits

    def blas_threads():
        return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]

    # Two BLAS threads to begin with, so a limit of one is visible even on a one-core machine.
    with threadpool_limits(limits=2, user_api="blas"):
        check_blas_limited_while_blocks_run(blas_threads)


def check_blas_limited_while_blocks_run(blas_threads):
    before = blas_threads()
    assert before and all(n == 2 for n in before), before  # numpy's BLAS is found and not yet limited
    seen = []
    long_started, short_done = threading.Event(), threading.Event()

    def long_work(i):  # the main thread's blocks: still running after the other caller finished
        long_started.set()
        short_done.wait(timeout=10)
        seen.append(blas_threads())

    def other_caller():
        long_started.wait(timeout=10)
        for_each_block(lambda i: None, range(4))
        short_done.set()

    threading.Thread(target=other_caller, daemon=True).start()
    for_each_block(long_work, range(2))
    assert seen and all(t and t == [1] * len(t) for t in seen), (seen, before)
    assert blas_threads() == before
