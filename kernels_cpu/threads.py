"""Threads for the products: a small pool, dynamic work items, and a thread count that adapts.

    configure(2)          # a fixed count (the calling thread is one of them)
    configure("auto")     # the default: at most the CPUs this process may use, adapted per call
    run_kernel(task, write_args, n, work, alone)   # task(board, epoch) runs on every thread of the call

Work is a list of n items; a kernel takes them one at a time from the board (`take`/`finish`
below, atomic), so a thread the OS preempts delays only the item it holds, not a
fixed share of the work. Between calls a worker polls briefly (the gaps between the products of
one forward pass), then sleeps on its queue; `rest()` at the end of a pass sends it to sleep at
once, so an idle engine takes no CPU from its neighbours. When the items run out, the caller
returns as soon as all *taken* items are done: a worker that has not woken up yet is not waited
for.

`auto` starts with every allowed CPU (sched_getaffinity, and a cgroup cpu.max quota), and measures
each call's seconds per unit of work per thread count (exponential averages); every
`_EXPLORE`-th large call tries another count, so it moves to one thread when another process takes
a core and back when the core frees up.
"""
from __future__ import annotations

import math
import os
import queue
import threading
import time

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from .jit import specialize

_EXPLORE = 16  # every this many large calls, try another thread count
_ALPHA = 0.15  # weight of a new measurement in the averages
_MIN_WORK = 1 << 18  # calls with less work (bytes x tokens) are not measured nor parallelised
_SPIN_SECONDS = 500e-6  # how long a worker polls for the next task before it sleeps (rest() ends it)


@intrinsic
def _fetch_add(typingctx, arr, idx, val):
    """Atomically arr[idx] += val (int64 array); returns the old value."""
    def codegen(context, builder, sig, args):
        a = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = builder.gep(a.data, [args[1]])
        return builder.atomic_rmw("add", ptr, context.cast(builder, args[2], sig.args[2], types.int64), "seq_cst")
    return types.int64(arr, types.intp, types.int64), codegen


@intrinsic
def _cas(typingctx, arr, idx, old, new):
    """Atomically: if arr[idx] == old, arr[idx] = new; whether it was swapped."""
    def codegen(context, builder, sig, args):
        a = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = builder.gep(a.data, [args[1]])
        pair = builder.cmpxchg(ptr, args[2], args[3], "seq_cst", "seq_cst")
        return builder.extract_value(pair, 1)
    return types.boolean(arr, types.intp, types.int64, types.int64), codegen


@intrinsic
def voidptr(typingctx, addr):
    """An int64 address as a void pointer (for numba.carray)."""
    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], ir.IntType(8).as_pointer())
    return types.voidptr(types.int64), codegen


@njit(cache=True, nogil=True)
def atomic_add(arr, idx, val):
    """arr[idx] += val atomically, from Python; the old value."""
    return _fetch_add(arr, idx, val)


# the board: one int64 array shared by the caller and the workers
EPOCH, NEXT, DONE, NITEMS, KIND, NWORK, TEPOCH = 0, 1, 2, 3, 4, 5, 6
SLEEP = 8  # SLEEP + i: worker i sleeps on its queue
ARGS = 32  # a task's arguments (addresses and sizes), written by its publisher
BOARD = 64
KERNEL, STOP, REST = 0, 2, 3


@njit(cache=True, nogil=True)
def take(board, epoch):
    """The next item of the task of `epoch`, or -1 when none is left or the task is over."""
    while True:
        v = _fetch_add(board, NEXT, 0)
        if (v >> 32) != epoch or (v & 0xFFFFFFFF) >= board[NITEMS]:
            return -1
        if _cas(board, NEXT, v, v + 1):
            return v & 0xFFFFFFFF


@njit(cache=True, nogil=True)
def finish(board):
    _fetch_add(board, DONE, 1)


def begin(board, epoch, n_items):
    """Make a private board ready for one kernel task run by the calling thread alone."""
    _begin(board, epoch, KERNEL, n_items, 0)


_OWN = threading.local()


def own_board() -> np.ndarray:
    """The calling thread's private board for the tasks it runs alone (one at a time, so one
    board serves them all: no allocation per product)."""
    b = getattr(_OWN, "board", None)
    if b is None:
        b = _OWN.board = np.zeros(BOARD, np.int64)
    return b


@njit(cache=True, nogil=True)
def _begin(board, epoch, kind, n_items, n_work):
    """Make `epoch` the current task (its arguments at ARGS are written by the caller first)."""
    board[DONE] = 0
    board[NITEMS] = n_items
    board[KIND] = kind
    board[NWORK] = n_work
    _fetch_add(board, NEXT, (epoch << 32) - _fetch_add(board, NEXT, 0))
    _fetch_add(board, TEPOCH, epoch - _fetch_add(board, TEPOCH, 0))
    _fetch_add(board, EPOCH, epoch - _fetch_add(board, EPOCH, 0))


@njit(cache=True, nogil=True)
def _wait_done(board, n_items, spins):
    """Poll until n_items are done, at most `spins` times; whether they are."""
    for _ in range(spins):
        if _fetch_add(board, DONE, 0) >= n_items:
            return True
        _pause()
    return _fetch_add(board, DONE, 0) >= n_items


def allowed_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2/v1 CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    for path, parse in (("/sys/fs/cgroup/cpu.max", lambda s: s.split()),
                        ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", lambda s: [s.strip(), _read("/sys/fs/cgroup/cpu/cpu.cfs_period_us")])):
        try:
            quota, period = parse(_read(path))
            if quota not in ("max", "-1") and period:
                n = min(n, max(1, math.ceil(int(quota) / int(period))))
            break
        except (OSError, ValueError, TypeError):
            continue
    return max(1, n)


def set_blas_threads(n: int) -> None:
    """numpy's bundled OpenBLAS, found among the loaded libraries; silently nothing elsewhere.
    Called only when the count changes (setting OpenBLAS's count (re)starts its worker threads)."""
    import ctypes

    try:
        with open("/proc/self/maps") as f:
            libs = {line.split()[-1] for line in f if "openblas" in line.lower() and line.rstrip().endswith(".so")}
    except OSError:
        libs = set()
    for path in libs:
        lib = ctypes.CDLL(path)
        for suffix in ("64_", ""):
            get = getattr(lib, f"scipy_openblas_get_num_threads{suffix}", None) or getattr(lib, f"openblas_get_num_threads{suffix}", None)
            set_ = getattr(lib, f"scipy_openblas_set_num_threads{suffix}", None) or getattr(lib, f"openblas_set_num_threads{suffix}", None)
            if get is not None and set_ is not None:
                if get() != n:
                    set_(ctypes.c_int(n))
                break


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


@intrinsic
def _pause(typingctx):
    """The CPU's spin-loop hint (x86 pause; nothing elsewhere)."""
    def codegen(context, builder, sig, args):
        import platform
        if platform.machine().lower() in ("x86_64", "amd64", "i686"):
            fn = builder.module.declare_intrinsic("llvm.x86.sse2.pause", fnty=ir.FunctionType(ir.VoidType(), []))
            builder.call(fn, [])
        return context.get_dummy_value()
    return types.none(), codegen


@njit(cache=True, nogil=True)
def _await_epoch(board, seen, spins):
    """Poll board[0] (atomically) until it differs from `seen`, at most `spins` times; its value."""
    for _ in range(spins):
        e = _fetch_add(board, 0, 0)
        if e != seen:
            return e
        _pause()
    return _fetch_add(board, 0, 0)


def _idle_loop(board, i, seen, spins):
    """A worker between calls: run kernel tasks (the global kernel_task of this copy, see
    idle_loop) as they are posted (no Python, no GIL), return (epoch, kind) for a task it cannot
    run here (STOP, REST), or (seen, -1) after `spins` polls with nothing new."""
    while True:
        e = _await_epoch(board, seen, spins)
        if e == seen:
            return seen, -1
        seen = e
        kind = board[KIND]
        if kind != KERNEL:
            return e, kind
        if i < board[NWORK] and board[TEPOCH] == e:
            kernel_task(board, e)


_IDLE: dict = {}


def idle_loop(kernel_task):
    """The compiled idle loop of workers that run kernel_task (one copy per kernel)."""
    f = _IDLE.get(kernel_task)
    if f is None:
        f = _IDLE[kernel_task] = specialize(_idle_loop, kernel_task.py_func.__name__, kernel_task=kernel_task)
    return f


def _spins_for(seconds: float) -> int:
    """Polls of an unchanging board that take about `seconds` (a pause costs ~10 cycles on some
    CPUs and ~100 on others: counted, not assumed)."""
    board = np.zeros(BOARD, np.int64)
    _await_epoch(board, 0, 16)  # compiled (the board stays 0: every poll runs)
    t = time.perf_counter()
    _await_epoch(board, 0, 2000)
    per = max(time.perf_counter() - t, 1e-7) / 2000
    return max(64, min(200_000, int(seconds / per)))


class _Pool:
    """Worker threads for run(). A task is announced by writing its arguments to the board and
    bumping the epoch; a worker polls the epoch for `spins` pause instructions (_SPIN_SECONDS: the
    gap between two products of one forward pass) inside numba, where kernel tasks run with no
    GIL hand-over, and then sleeps on its queue, flagging board[SLEEP + i] so the next poster
    wakes it. Between forward passes the workers sleep."""

    def __init__(self, n: int, kernel_task):
        self.board = np.zeros(BOARD, np.int64)
        self.kernel_task = kernel_task
        self.loop = idle_loop(kernel_task)  # compiled here, before the threads start
        self.queues = [queue.SimpleQueue() for _ in range(n)]
        self.threads = [threading.Thread(target=self._work, args=(i,), daemon=True, name=f"edgellm-kernel-{i}")
                        for i in range(n)]
        self.epoch = 0
        self.spins = _spins_for(_SPIN_SECONDS)
        for t in self.threads:
            t.start()

    def post(self, kind: int, n_items: int, n_workers: int, write_args=None) -> int:
        """Start a task; returns its epoch. write_args(board) writes a kernel task's arguments."""
        self.epoch += 1
        e = self.epoch
        atomic_add(self.board, TEPOCH, -int(self.board[TEPOCH]))  # the old arguments are invalid now
        if write_args is not None:
            write_args(self.board)
        _begin(self.board, e, kind, n_items, n_workers)
        for i in range(n_workers):
            if atomic_add(self.board, SLEEP + i, 0):  # asleep: wake it
                self.board[SLEEP + i] = 0
                self.queues[i].put(e)
        return e

    def _work(self, i: int):
        board, seen, loop = self.board, 0, self.loop
        while True:
            seen, kind = loop(board, i, seen, self.spins)
            if kind == STOP:
                return
            # REST, or nothing new for a while: sleep until woken
            atomic_add(board, SLEEP + i, 1)
            if atomic_add(board, EPOCH, 0) == seen:
                self.queues[i].get()
            else:
                board[SLEEP + i] = 0

    def wait(self, n_items: int) -> None:
        """Until every item of the current task is done: poll briefly (an item a worker holds
        takes microseconds), then sleep in steps (a worker the OS preempted)."""
        if _wait_done(self.board, n_items, self.spins):
            return
        while not _wait_done(self.board, n_items, 0):
            time.sleep(20e-6)

    def rest(self):
        """Workers stop polling and sleep now (the caller has no task for a while)."""
        self.post(REST, 0, 0)

    def close(self):
        self.post(STOP, 0, len(self.queues))


_state = {"mode": "auto", "max": 1, "pool": None, "calls": 0, "avg": {}, "last": 1}


def configure(n: int | str = "auto") -> None:
    """A fixed thread count, or 'auto'."""
    if n == "auto":
        _state.update(mode="auto", max=allowed_cpus(), avg={}, calls=0)
    else:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"threads must be a positive integer or 'auto', not {n!r}")
        _state.update(mode="fixed", max=n)
    _state["last"] = _state["max"]


def max_count() -> int:
    """The most threads a call may use (the fixed count, or the allowed CPUs under 'auto')."""
    return _state["max"]


def count() -> int:
    """The thread count the most recent large call used (the fixed count when not 'auto')."""
    return _state["last"]


def describe() -> str:
    if _state["mode"] == "fixed":
        return f"{_state['max']} (fixed)"
    return f"auto (up to {_state['max']}, now {_state['last']})"


def _choose(work: int) -> int:
    mx = _state["max"]
    if mx == 1 or work < _MIN_WORK:
        return 1
    if _state["mode"] == "fixed":
        return mx
    avg = _state["avg"]
    _state["calls"] += 1
    untried = [c for c in range(mx, 0, -1) if c not in avg]
    if untried:
        return untried[0]
    best = min(avg, key=avg.get)
    if _state["calls"] % _EXPLORE == 0:  # try a neighbour of the best count
        return best - 1 if best == mx else best + 1
    return best


def _record(n: int, work: int, seconds: float) -> None:
    if _state["mode"] != "auto" or work < _MIN_WORK:
        return
    per = seconds / work
    avg = _state["avg"]
    avg[n] = per if n not in avg else (1 - _ALPHA) * avg[n] + _ALPHA * per


def workers(kernel_task, n_workers: int) -> _Pool:
    """The pool, (re)made with n_workers threads whose idle loop runs kernel_task(board, epoch)."""
    p = _state["pool"]
    if p is None or len(p.queues) != n_workers or p.kernel_task is not kernel_task:
        if p is not None:
            p.close()
        p = _state["pool"] = _Pool(n_workers, kernel_task)
    return p


def rest() -> None:
    """The end of a burst of calls (a forward pass): idle workers sleep now rather than poll for
    _SPIN_SECONDS, so they take no CPU from the caller's next work or from other processes."""
    p = _state["pool"]
    if p is not None:
        p.rest()


def run_kernel(kernel_task, write_args, n_items: int, work: int, alone) -> None:
    """Run a kernel task: write_args(board) puts its arguments at board[ARGS:], then this thread
    and up to (threads - 1) workers call kernel_task(board, epoch), which takes items with
    `take(board, epoch)` and calls `finish(board)` after each. With one thread, alone() instead.
    `work` (bytes x tokens) sizes the call for the thread choice."""
    n = max(1, min(_choose(work), n_items))
    t0 = time.perf_counter()
    if n == 1:
        alone()
    else:
        _state["last"] = n
        pool = workers(kernel_task, _state["max"] - 1)
        e = pool.post(KERNEL, n_items, n - 1, write_args)
        kernel_task(pool.board, e)
        pool.wait(n_items)
    _record(n, work, time.perf_counter() - t0)


configure("auto")
