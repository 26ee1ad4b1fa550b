"""Threads for the products: a small pool, dynamic work items, and a thread count that adapts.

    configure(2)          # a fixed count (the calling thread is one of them)
    configure("auto")     # the default: at most the CPUs this process may use, adapted per call
    run(kernel_call, n)   # kernel_call(counter) runs on every thread of the call

Work is a list of n items; a kernel takes them one at a time from `counter` (int64 [next, done],
`take`/`finish` below, atomic), so a thread the OS preempts delays only the item it holds, not a
fixed share of the work. The workers sleep on queues between calls: nothing spins, so a busy
neighbour on a shared core costs what it takes and no more. When the items run out, the caller
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

_EXPLORE = 16  # every this many large calls, try another thread count
_ALPHA = 0.15  # weight of a new measurement in the averages
_MIN_WORK = 1 << 20  # calls with less work (bytes x tokens) are not measured nor parallelised


@intrinsic
def _fetch_add(typingctx, arr, idx, val):
    """Atomically arr[idx] += val (int64 array); returns the old value."""
    def codegen(context, builder, sig, args):
        a = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = builder.gep(a.data, [args[1]])
        return builder.atomic_rmw("add", ptr, context.cast(builder, args[2], sig.args[2], types.int64), "seq_cst")
    return types.int64(arr, types.intp, types.int64), codegen


@njit(cache=True, nogil=True, inline="always")
def take(counter):
    """The next item index (>= n when there are none left)."""
    return _fetch_add(counter, 0, 1)


@njit(cache=True, nogil=True, inline="always")
def finish(counter):
    _fetch_add(counter, 1, 1)


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


class _Pool:
    """Worker threads, each waiting on its own queue for (fn, counter, done_event)."""

    def __init__(self, n: int):
        self.queues = [queue.SimpleQueue() for _ in range(n)]
        self.threads = [threading.Thread(target=self._work, args=(q,), daemon=True, name=f"edgellm-kernel-{i}")
                        for i, q in enumerate(self.queues)]
        for t in self.threads:
            t.start()

    @staticmethod
    def _work(q):
        while True:
            task = q.get()
            if task is None:
                return
            fn, counter, done = task
            try:
                fn(counter)
            finally:
                done.set()

    def close(self):
        for q in self.queues:
            q.put(None)


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


def count() -> int:
    """The thread count the most recent large call used (the fixed count when not 'auto')."""
    return _state["last"]


def describe() -> str:
    if _state["mode"] == "fixed":
        return f"{_state['max']} (fixed)"
    return f"auto (up to {_state['max']}, now {_state['last']})"


def _pool(n_workers: int) -> _Pool | None:
    p = _state["pool"]
    if n_workers <= 0:
        return p
    if p is None or len(p.queues) < n_workers:
        if p is not None:
            p.close()
        p = _state["pool"] = _Pool(n_workers)
    return p


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


def run(fn, n_items: int, work: int) -> None:
    """Call fn(counter) on this thread and on up to (threads - 1) workers; fn takes items with
    `take(counter)` until it gets one >= n_items and calls `finish(counter)` after each. Returns
    once every item is done. `work` (bytes x tokens) sizes the call for the thread choice."""
    n = max(1, min(_choose(work), n_items))
    counter = np.zeros(2, np.int64)
    t0 = time.perf_counter()
    if n == 1:
        fn(counter)
        _record(1, work, time.perf_counter() - t0)
        return
    _state["last"] = n
    pool = _pool(n - 1)
    events = []
    for q in pool.queues[: n - 1]:
        ev = threading.Event()
        q.put((fn, counter, ev))
        events.append(ev)
    fn(counter)
    for ev in events:  # wait only while an item a worker took is unfinished
        if counter[1] >= n_items:
            break
        ev.wait()
    _record(n, work, time.perf_counter() - t0)


def run_python(job, n_items: int, work: int) -> None:
    """As run, for a Python job(i) per item (it should release the GIL: BLAS, nogil kernels)."""
    lock = threading.Lock()
    items = iter(range(n_items))

    def fn(counter):
        for i in items:  # next() on a range iterator is atomic under the GIL
            job(i)
            with lock:
                counter[1] += 1
    run(fn, n_items, work)


configure("auto")
