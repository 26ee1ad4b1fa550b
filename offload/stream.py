"""A streaming weight store: the interface of runtime/weights.py's `Weights`, with most layers on disk.

    store = StreamingWeights(f, plan, make_linear)    # plan from offload.planner
    store.load_all()                                  # small tensors, resident units, first reads
    store.linear("blk.3.attn_q.weight")(x)            # waits for layer 3, schedules 4..3+window

Asking for any `blk.{i}.*` matrix makes layer i the current unit: the previous one's buffer goes
back to the ring, layer i is waited for (time counted in `io_wait_s`), and the next `window`
streamed units (wrapping past the output head to the next token's first layers) are queued for
the I/O threads. The ring is `window + 1` buffers allocated once (anonymous memory, page
aligned); nothing is allocated per token. The output head streams in chunks of whole rows: its
`linear` computes chunk by chunk into one output. Resident units are read once at load into
anonymous memory, norms and biases are kept as float32, and the token embedding is read a few
rows at a time (`RowTable`): no weight lives in the page cache, which a cgroup would charge.

Reads: O_DIRECT into the aligned buffers, each unit (contiguous in the file) cut into requests of
`chunk_bytes` served by `queue_depth` threads in order, which keeps that many requests at the
device. Where O_DIRECT is refused (tmpfs, some network file systems) reads fall back to pread
followed by posix_fadvise(DONTNEED) of what was read.

Kernels: `make_linear(rows, type, k)` is called for each matrix each time its unit arrives, so it
must be cheap (the GGUF-direct kernels only wrap the view; packing for onnxruntime costs ~120 ms
a layer). Matrices of one unit share the unit's buffer; a callable kept past its unit's turn
notices the buffer moved on and re-acquires the unit (slow but never wrong).

Towards activation-sparse streaming (the next step): a *unit* here is any set of byte ranges read
as one, and the store only asks "make unit u current, prefetch the next ones". To stream FFN
neurons instead of whole matrices, a converter would rewrite each layer's FFN as neuron records
-- row j of ffn_gate, row j of ffn_up and column j of ffn_down (stored as row j of ffn_down's
transpose, same quant type), contiguous -- so that neuron j is one range of ~3 rows of bytes. A
predictor (a small low-rank classifier per layer, as in PowerInfer/Deja Vu) picks the neurons a
token will activate; the store then becomes: resident hot neurons (a fixed set per layer chosen
from activation statistics, the planner's "resident" share spent on neurons instead of layers),
plus a per-token gather of the predicted cold neurons, issued as many small reads at queue depth
8+ (random 64 KiB reads reach ~880 MB/s here at QD8, MACHINE.md). The kernels need a matvec over a
row subset (`matvec_rows`) and a transposed down projection accumulating neuron columns; the
ring's buffers become a neuron cache with per-neuron slots. Nothing in the model files changes:
`linear(name)` returns a callable that computes only the selected rows and scatters zeros.
"""
from __future__ import annotations

import mmap
import os
import queue
import threading
import time
from typing import Callable

import numpy as np

from ..errors import EdgeLLMError
from ..loaders.gguf import GGUFFile, RowTable
from ..quant.formats import dequantize
from .planner import ALIGN, Plan, Unit

FREE, LOADING, READY = 0, 1, 2
# Measured with bench/offload.py (qwen2.5-coder-1.5b, 800M, decode tok/s, two runs each): window 2,
# queue depth 4, 4 MiB: 5.75, 5.80; 16 MiB: 4.91, 5.71; depth 2, 16 MiB: 5.19, 5.84; depth 8,
# 8 MiB: 4.11, 5.03 (more threads contend with the kernels for 2 cores); window 1: 4.66, 4.15.
CHUNK_BYTES = 4 << 20  # bytes per read request
QUEUE_DEPTH = 4  # read requests in flight (one thread each)


class StreamError(EdgeLLMError):
    """A read of the model file failed while streaming."""


HUGE = 2 << 20  # transparent huge page size (x86-64, arm64 with 4K base pages)


class _Slot:
    """One streaming buffer: private anonymous memory, aligned to and backed by 2 MiB pages where
    the kernel allows (madvise MADV_HUGEPAGE). Measured here (bench/offload.py): O_DIRECT reads
    into 4 KiB pages reach 1.1-2.2 GB/s at 0.09-0.14 s of system CPU per GB (the kernel pins and
    maps every page of every request); into 2 MiB pages 2.9-3.2 GB/s at 0.01-0.04 s per GB."""

    def __init__(self, nbytes: int):
        size = -(-max(ALIGN, nbytes) // HUGE) * HUGE
        flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
        self.map = mmap.mmap(-1, size + HUGE, flags=flags) if flags else mmap.mmap(-1, size + HUGE)
        base = np.frombuffer(self.map, np.uint8)
        a = -base.ctypes.data % HUGE  # the first 2 MiB boundary in the mapping
        if hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                self.map.madvise(mmap.MADV_HUGEPAGE, a, size)
            except OSError:
                pass
        self.view = memoryview(self.map)[a : a + nbytes]
        self.array = base[a : a + nbytes]
        self.unit: int | None = None
        self.state = FREE
        self.pending = 0
        self.gen = 0  # bumped whenever the slot takes a new unit
        self.at_load = False  # a resident unit's buffer: its reads count as load, not streaming


def _drop_cache(fd: int, off: int, n: int) -> None:
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, off, n, os.POSIX_FADV_DONTNEED)


class StreamingWeights:
    def __init__(self, f: GGUFFile, plan: Plan, units: tuple[Unit, ...], make_linear: Callable,
                 queue_depth: int | None = None, chunk_bytes: int | None = None, direct: bool = True):
        self.f, self.plan, self.make_linear = f, plan, make_linear
        self.units = {u.name: u for u in units}
        self.order = [self.units[n] for n in plan.streamed]  # streamed units, in order of use
        self.pos = {u.name: p for p, u in enumerate(self.order)}
        self.window = plan.window
        self.chunk_bytes = max(ALIGN, (chunk_bytes or CHUNK_BYTES) // ALIGN * ALIGN)
        self.queue_depth = max(1, queue_depth or QUEUE_DEPTH)
        self._unit_of: dict[str, str] = {}  # matrix name -> unit name (layers); head: several units
        self.head_units: dict[str, list[Unit]] = {}
        for u in units:
            if u.rows is None:
                for t in u.tensors:
                    self._unit_of[t] = u.name
            else:
                self.head_units.setdefault(u.tensors[0], []).append(u)
        self.direct = False
        self.fd_buffered = os.open(f.path, os.O_RDONLY)
        self.fd = self.fd_buffered
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self.fd = os.open(f.path, os.O_RDONLY | os.O_DIRECT)
                self.direct = True
            except OSError:
                pass
        self._vector: dict[str, np.ndarray] = {}
        self._resident: dict[str, np.ndarray] = {}  # resident unit name -> its bytes
        self._resident_linear: dict[str, Callable] = {}
        self._linear_cache: dict[tuple[str, int], Callable] = {}  # (matrix, slot gen) -> callable
        self.slots = [_Slot(plan.slot_bytes) for _ in range(plan.window + 1)] if self.order else []
        self._slot_of: dict[int, _Slot] = {}  # stream position -> slot
        self._cur: int | None = None
        self._cv = threading.Condition()
        self._q: queue.Queue = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._error: BaseException | None = None
        t = f.tensors.get("token_embd.weight")  # absent from a cluster node's shard file (cluster/shard.py)
        self._table = RowTable(self.fd_buffered, t.offset, t.n_rows, t.row_bytes) if t is not None else None
        # telemetry (cumulative; the engine takes differences per forward pass)
        self.bytes_read = 0  # streamed bytes read from disk
        self.load_bytes_read = 0  # bytes read at load (resident units, small tensors)
        self.io_wait_s = 0.0
        self.closed = False

    # ---- the Weights interface ------------------------------------------------------------------

    def has(self, name: str) -> bool:
        return name in self.f.tensors

    def vector(self, name: str) -> np.ndarray:
        v = self._vector.get(name)
        if v is None:
            t = self.f.info(name)
            raw = self._read_small(t.offset, t.nbytes)
            v = self._vector[name] = np.ascontiguousarray(dequantize(raw, t.type), np.float32)
        return v

    def table(self, name: str):
        if name != "token_embd.weight":
            t = self.f.info(name)
            return RowTable(self.fd_buffered, t.offset, t.n_rows, t.row_bytes), t.type
        return self._table, self.f.info(name).type

    def linear(self, name: str) -> Callable:
        if name in self.head_units:
            return self._head(name)
        u = self._unit_of.get(name)
        if u is None:
            raise EdgeLLMError(f"tensor '{name}' is not a matrix of any layer")
        fn = self._resident_linear.get(name)
        if fn is not None:
            return fn
        slot = self._enter(self.pos[u])
        return self._slot_linear(name, self.units[u], slot)

    def load_all(self) -> None:
        """Small tensors, resident units (read now, into anonymous memory), then the I/O threads."""
        for name in self.f.tensors:
            if len(self.f.info(name).shape) == 1:
                self.vector(name)
        self._warm_up()
        self._start_threads()
        arena = _Slot(sum(self.units[n].span for n in self.plan.resident)) if self.plan.resident else None
        at = 0
        for name in self.plan.resident:  # one after another in one arena
            u = self.units[name]
            self._read_now(u, arena, at)
            data = arena.array[at + u.offset - u.offset // ALIGN * ALIGN:][: u.nbytes]
            at += u.span
            self._resident[name] = data
            if u.rows is None:
                for t in u.tensors:
                    self._resident_linear[t] = self.make_linear(self._view(t, u, data), self.f.info(t).type,
                                                                self.f.info(t).shape[0])
        if self.order:
            with self._cv:
                self._schedule(0)  # the first units of the first pass

    def _warm_up(self) -> None:
        """Run the kernels once per weight type on a tiny zero matrix (one token and a batch), so
        the first token does not pay for loading compiled code while its layers stream."""
        for t in sorted({self.f.info(n).type for u in self.units.values() for n in u.tensors}):
            k = 256
            rows = np.zeros((64, t.row_bytes(k)), np.uint8)
            fn = self.make_linear(rows, t, k)
            for n_tok in (1, 16):
                fn(np.zeros((n_tok, k), np.float32))

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for _ in self._threads:
            self._q.put(None)
        for th in self._threads:
            th.join(timeout=10)
        for fd in {self.fd, self.fd_buffered}:
            try:
                os.close(fd)
            except OSError:
                pass

    @property
    def telemetry(self) -> dict:
        table = self._table.bytes_read if self._table is not None else 0
        return {"bytes_read": self.bytes_read + table, "io_wait_s": self.io_wait_s}

    # ---- matrices in buffers --------------------------------------------------------------------

    def _view(self, tensor: str, u: Unit, data: np.ndarray) -> np.ndarray:
        """tensor's rows inside a unit's bytes `data` (uint8 (u.nbytes,)) -> (n_rows, row_bytes)."""
        t = self.f.info(tensor)
        if u.rows is not None:
            return data[: u.nbytes].reshape(u.rows[1] - u.rows[0], t.row_bytes)
        a = t.offset - u.offset
        return data[a : a + t.nbytes].reshape(t.n_rows, t.row_bytes)

    def _slot_data(self, u: Unit, slot: _Slot) -> np.ndarray:
        return slot.array[u.offset - u.offset // ALIGN * ALIGN:][: u.nbytes]

    def _slot_linear(self, name: str, u: Unit, slot: _Slot) -> Callable:
        key = (name, id(slot), slot.gen)
        fn = self._linear_cache.get(key)
        if fn is None:
            t = self.f.info(name)
            inner = self.make_linear(self._view(name, u, self._slot_data(u, slot)), t.type, t.shape[0])
            gen, p = slot.gen, self.pos[u.name]

            def fn(x, inner=inner, gen=gen, slot=slot, p=p, name=name):
                if slot.gen != gen or slot.unit != p or slot.state != READY:  # the buffer moved on
                    return self.linear(name)(x)
                return inner(x)

            if len(self._linear_cache) > 64 * max(1, len(self.slots)):
                self._linear_cache.clear()
            self._linear_cache[key] = fn
        return fn

    def _head(self, name: str) -> Callable:
        t = self.f.info(name)
        chunks = self.head_units[name]

        def head(x: np.ndarray) -> np.ndarray:  # x (T, K) -> (T, n_rows), chunk by chunk
            out = np.empty((x.shape[0], t.n_rows), np.float32)
            for u in chunks:
                data = self._resident.get(u.name)
                if data is None:
                    data = self._slot_data(u, self._enter(self.pos[u.name]))
                rows = self._view(name, u, data)
                out[:, u.rows[0]:u.rows[1]] = self.make_linear(rows, t.type, t.shape[0])(x)
            return out

        return head

    # ---- the ring -------------------------------------------------------------------------------

    def _enter(self, p: int) -> _Slot:
        """Make stream position p current: release the previous one, queue the next `window`,
        wait until p is in a buffer."""
        with self._cv:
            if self._cur == p:
                s = self._slot_of.get(p)
                if s is not None and s.state == READY:
                    return s
            if self._cur is not None and self._cur != p:
                s = self._slot_of.pop(self._cur, None)
                if s is not None and s.state == READY:
                    s.state, s.unit = FREE, None
            self._cur = p
            t0 = time.perf_counter()
            while True:
                if self._error is not None:
                    raise StreamError(f"reading {self.f.path.name} failed: {self._error}") from self._error
                self._schedule(p)
                s = self._slot_of.get(p)
                if s is not None and s.state == READY:
                    break
                self._cv.wait(0.5)
            self.io_wait_s += time.perf_counter() - t0
            return s

    def _schedule(self, p: int) -> None:
        """With the lock held: free buffers of units outside [p, p + window], queue reads of the
        units inside it that have none, nearest first."""
        n = len(self.order)
        want = [(p + j) % n for j in range(min(self.window + 1, n))]
        for q, s in list(self._slot_of.items()):
            if q not in want and s.state == READY:
                del self._slot_of[q]
                s.state, s.unit = FREE, None
        for q in want:
            if q in self._slot_of:
                continue
            free = next((s for s in self.slots if s.state == FREE), None)
            if free is None:
                return
            free.state, free.unit, free.gen = LOADING, q, free.gen + 1
            self._slot_of[q] = free
            self._submit(self.order[q], free)

    # ---- reading --------------------------------------------------------------------------------

    def _requests(self, u: Unit):
        """(file offset, length, offset in the buffer) of the aligned read covering u."""
        a = u.offset // ALIGN * ALIGN
        end = a + u.span
        for off in range(a, end, self.chunk_bytes):
            yield off, min(self.chunk_bytes, end - off), off - a

    def _submit(self, u: Unit, slot: _Slot, at: int = 0) -> None:
        reqs = list(self._requests(u))
        slot.pending = len(reqs)
        for off, n, boff in reqs:
            self._q.put((slot, slot.gen, off, n, at + boff))

    def _start_threads(self) -> None:
        for i in range(self.queue_depth if self.order or self.plan.resident else 0):
            th = threading.Thread(target=self._io_loop, name=f"edgellm-io-{i}", daemon=True)
            th.start()
            self._threads.append(th)

    def _pread(self, buf: memoryview, off: int) -> int:
        """Fill buf from the file at off (short only at the end of the file)."""
        n = len(buf)
        done = 0
        while done < n:
            try:
                got = os.preadv(self.fd, [buf[done:]], off + done)
            except OSError as e:
                if self.direct and e.errno == 22 and done == 0:  # EINVAL: O_DIRECT refused here
                    self.direct = False
                    self.fd = self.fd_buffered
                    continue
                raise
            if got == 0:
                break
            done += got
        if not self.direct:
            _drop_cache(self.fd, off, n)
        return done

    def _io_loop(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            slot, gen, off, n, boff = item
            try:
                got = self._pread(slot.view[boff : boff + n], off)
            except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
                with self._cv:
                    self._error = e
                    self._cv.notify_all()
                continue
            with self._cv:
                if slot.at_load:
                    self.load_bytes_read += got
                else:
                    self.bytes_read += got
                slot.pending -= 1
                if slot.pending == 0 and slot.gen == gen and slot.state == LOADING:
                    slot.state = READY
                    self._cv.notify_all()

    def _read_now(self, u: Unit, buf: _Slot, at: int) -> None:
        """Read unit u into buf at byte `at` through the I/O threads and wait (resident units, at load)."""
        buf.at_load = True
        with self._cv:
            buf.state, buf.unit, buf.gen = LOADING, -1, buf.gen + 1
            self._submit(u, buf, at)
            while buf.state != READY:
                if self._error is not None:
                    raise StreamError(f"reading {self.f.path.name} failed: {self._error}") from self._error
                self._cv.wait(0.5)

    def _read_small(self, off: int, n: int) -> np.ndarray:
        out = np.empty(n, np.uint8)
        got = os.preadv(self.fd_buffered, [out], off)
        if got != n:
            raise StreamError(f"short read of {n} bytes at byte {off:,} of {self.f.path.name}")
        _drop_cache(self.fd_buffered, off, n)
        self.load_bytes_read += n
        return out
