"""A node's weight store: the Weights interface over only the slices its shard plan gives it.

Row slices are views of the mapped file (like the resident store); column slices are read with
pread into their own arrays, so the other nodes' columns are never mapped into this process.
A column slice that was widened to whole quant blocks (plan.py) multiplies a zero-padded input.
Packed weights live in `cache`, keyed by (name, slice): a re-planned node keeps what did not change.

A node whose budget cannot hold its shard streams it (TPI-LLM's setting): `write_shard_file` lays
its slices out as a GGUF of their own, each layer contiguous (column slices as whole-block
matrices), and offload's StreamingWeights reads that file through its sliding window under the
node's budget. `StreamedShard` puts the zero padding of widened column slices back and serves
the token embedding from the model file itself.
"""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np

from ...loaders.gguf import GGUFFile, TensorInfo, ValueType
from ...loaders.gguf_write import OutTensor, write_gguf
from ...loaders.store import home
from ...quant.formats import dequantize
from ..config import ModelConfig
from ..weights import untied_table
from .plan import NodeShard, Slice, node_tensors, slice_bytes
from .wire import ClusterError

F32 = np.float32


def read_columns(path, t: TensorInfo, b0: int, b1: int) -> np.ndarray:
    """Quant blocks [b0, b1) of every row of tensor `t` -> uint8 (n_rows, (b1 - b0) * type_size)."""
    rb, ts = t.row_bytes, t.type.type_size
    out = np.empty((t.n_rows, (b1 - b0) * ts), np.uint8)
    per = max(1, (8 << 20) // rb)
    buf = np.empty(per * rb, np.uint8)
    with open(path, "rb", buffering=0) as fh:
        for r0 in range(0, t.n_rows, per):
            r1 = min(t.n_rows, r0 + per)
            n = (r1 - r0) * rb
            if os.preadv(fh.fileno(), [memoryview(buf)[:n]], t.offset + r0 * rb) != n:
                raise OSError(f"short read of '{t.name}' in {path}")
            out[r0:r1] = buf[:n].reshape(r1 - r0, rb)[:, b0 * ts:b1 * ts]
    return out


def slice_raw(f: GGUFFile, name: str, sl: Slice) -> np.ndarray:
    """The raw bytes of a slice: uint8 (rows, bytes per row)."""
    t = f.info(name)
    if sl.axis == 1:
        (b0, b1), = sl.ranges
        return read_columns(f.path, t, b0, b1)
    rows = f.rows(name)
    if len(sl.ranges) == 1:
        a, b = sl.ranges[0]
        return rows[a:b]
    return np.concatenate([rows[a:b] for a, b in sl.ranges])


def _padded(fn: Callable, k: int, before: int, after: int, one: np.ndarray | None = None) -> Callable:
    """x (T, k) -> fn(x placed at columns [before, before + k) of zeros (T, before + k + after)).
    `one`: the (1, width) zero buffer single tokens use (kept by a caller that wraps often)."""
    width = before + k + after
    if one is None:
        one = np.zeros((1, width), F32)  # (1, width): the decode step's buffer, zeros outside the slice

    def call(x: np.ndarray) -> np.ndarray:
        buf = one if x.shape[0] == 1 else np.zeros((x.shape[0], width), F32)
        buf[:, before:before + k] = x
        return fn(buf)

    return call


class ShardedWeights:
    """has/linear/vector/table over one node's slices (see plan.tensor_slice)."""

    def __init__(self, f: GGUFFile, cfg: ModelConfig, shard: NodeShard, rank: int, make_linear,
                 cache: dict | None = None):
        self.f, self.make_linear = f, make_linear
        self.slices = node_tensors(cfg, f, shard, rank)
        self.cache = cache if cache is not None else {}
        self._vector: dict[str, np.ndarray] = {}

    def has(self, name: str) -> bool:
        return name in self.slices

    def linear(self, name: str) -> Callable:
        sl = self.slices[name]
        fn = self.cache.get((name, sl))
        if fn is None:
            t = self.f.info(name)
            raw = slice_raw(self.f, name, sl)
            if sl.axis == 0:
                fn = self.make_linear(raw, t.type, t.shape[0])
            else:
                k = raw.shape[1] // t.type.type_size * t.type.block_size
                fn = self.make_linear(raw, t.type, k)
                if sl.pad != (0, 0):
                    fn = _padded(fn, k - sum(sl.pad), *sl.pad)
            self.cache[(name, sl)] = fn
        return fn

    def vector(self, name: str) -> np.ndarray:
        v = self._vector.get(name)
        if v is None:
            t = self.f.info(name)
            full = np.asarray(dequantize(self.f.raw(name), t.type), F32).reshape(-1)
            v = np.ascontiguousarray(np.concatenate([full[a:b] for a, b in self.slices[name].ranges]))
            self._vector[name] = v
        return v

    def table(self, name: str):
        return untied_table(self.f, name), self.f.info(name).type

    def matrices(self) -> list[str]:
        return [n for n in self.slices if len(self.f.info(n).shape) == 2]

    def load_all(self, progress: Callable[[], None] | None = None) -> None:
        """Drop cached packs this shard no longer uses, then pack everything it does."""
        mats = set(self.matrices())
        keep = {(n, self.slices[n]) for n in mats}
        for key in list(self.cache):
            if key not in keep:
                del self.cache[key]
        for n in self.slices:
            if n in mats:
                self.linear(n)
            else:
                self.vector(n)
            if progress:
                progress()

    @property
    def weight_bytes(self) -> int:
        """Bytes of this node's slices as stored in the file (what it holds, before packing)."""
        return sum(slice_bytes(self.f.info(n), sl) for n, sl in self.slices.items())


# ---- streaming a shard under a memory budget -------------------------------------------------------

def _slice_type_shape(t: TensorInfo, sl: Slice) -> tuple[int, ...]:
    if len(t.shape) == 1:
        return (sum(b - a for a, b in sl.ranges),)
    if sl.axis == 0:
        return (t.shape[0], sum(b - a for a, b in sl.ranges))
    (b0, b1), = sl.ranges
    return ((b1 - b0) * t.type.block_size, t.n_rows)


def _vector_bytes(f: GGUFFile, name: str, sl: Slice) -> np.ndarray:
    t = f.info(name)
    per = t.nbytes // t.shape[0]  # bytes per element of a 1-D tensor (F32, F16)
    raw = np.asarray(f.raw(name)).view(np.uint8).reshape(-1)
    return np.concatenate([raw[a * per:b * per] for a, b in sl.ranges])


def write_shard_file(f: GGUFFile, slices: dict[str, Slice], digest: str, progress: Callable[[], None] | None = None) -> Path:
    """The node's slices as a GGUF of their own in $EDGELLM_HOME/cluster/shards (kept for the next
    run with the same shard; other shards of the model are removed): layers in order, each
    contiguous, then the rest. Nothing is written when the file is there already."""
    key = hashlib.sha256(repr(sorted(slices.items())).encode()).hexdigest()[:16]
    d = home() / "cluster" / "shards"
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{digest[:16]}-{key}.gguf"
    if path.exists():
        return path
    for old in d.glob(f"{digest[:16]}-*.gguf"):
        old.unlink(missing_ok=True)

    def layer(n):
        return int(n.split(".")[1]) if n.startswith("blk.") else 1 << 30

    names = sorted(slices, key=lambda n: (layer(n), list(f.tensors).index(n)))
    out = []
    for n in names:
        t, sl = f.info(n), slices[n]

        def make(n=n, sl=sl, t=t):
            if progress:
                progress()
            return _vector_bytes(f, n, sl) if len(t.shape) == 1 else slice_raw(f, n, sl)
        out.append(OutTensor(n, _slice_type_shape(t, sl), t.type, make))
    meta = {"general.architecture": f.metadata.get("general.architecture", ""),
            "general.name": f"edgellm shard of {digest[:16]}"}
    write_gguf(path, meta, {k: ValueType.STRING for k in meta}, out)
    return path


class StreamedShard:
    """has/linear/vector/table over a streaming store of a shard file (offload.StreamingWeights):
    widened column slices get their zero padding back; the token embedding (the coordinator's
    lookups) is read from the model file a few rows at a time."""

    def __init__(self, store, f: GGUFFile, slices: dict[str, Slice]):
        from ...loaders.gguf import RowTable

        self.store, self.slices = store, slices
        self.plan = store.plan
        self._pads: dict[str, tuple[int, int, int, np.ndarray]] = {}  # name -> _padded's k, before, after, buffer
        for n, sl in slices.items():
            if sl.axis == 1 and sl.pad != (0, 0):
                t = f.info(n)
                (b0, b1), = sl.ranges
                width = (b1 - b0) * t.type.block_size
                self._pads[n] = (width - sum(sl.pad), *sl.pad, np.zeros((1, width), F32))
        self._fd = os.open(f.path, os.O_RDONLY)
        t = f.info("token_embd.weight")
        self._table = RowTable(self._fd, t.offset, t.n_rows, t.row_bytes), t.type

    def has(self, name: str) -> bool:
        return name in self.slices

    def vector(self, name: str) -> np.ndarray:
        return self.store.vector(name)

    def table(self, name: str):
        return self._table

    def linear(self, name: str) -> Callable:
        fn = self.store.linear(name)  # a new callable each time: the unit's current buffer
        pad = self._pads.get(name)
        return fn if pad is None else _padded(fn, *pad)

    def load_all(self, progress=None) -> None:
        self.store.load_all()

    @property
    def telemetry(self) -> dict:
        return self.store.telemetry

    def close(self) -> None:
        self.store.close()
        try:
            os.close(self._fd)
        except OSError:
            pass


def stream_shard(f: GGUFFile, cfg: ModelConfig, shard: NodeShard, rank: int, make_linear, digest: str, rcfg,
                 budget: int, progress: Callable[[], None] | None = None) -> StreamedShard:
    """A node's shard streamed from its shard file under `budget` (BudgetError if it cannot fit)."""
    from ... import offload
    from ...kernels_cpu.qmatmul import tile_rows
    from ...offload.planner import measure_baseline
    from ...offload.stream import StreamingWeights
    from .plan import local_config

    slices = node_tensors(cfg, f, shard, rank)
    sf = GGUFFile(write_shard_file(f, slices, digest, progress))
    plan, units = offload.plan_for(sf, local_config(cfg, shard), rcfg.n_ctx, rcfg.n_batch, rcfg.max_threads, budget,
                                   row_align=tile_rows, cache_type=rcfg.cache_type,
                                   baseline=measure_baseline(without_mapped_models=True))
    return StreamedShard(StreamingWeights(sf, plan, units, make_linear), f, slices)


def shard_store(f: GGUFFile, cfg: ModelConfig, shard: NodeShard, rank: int, make_linear, digest: str, rcfg,
                budget: int | None, cache: dict, who: str, progress: Callable[[], None] | None = None):
    """A node's weight store: ShardedWeights when its shard fits `budget` (None: no limit) with the
    process, KV cache and activations, else the shard streamed under it (ClusterError naming `who`
    when not even that fits)."""
    from ...offload.planner import BudgetError

    if not budget or resident_bytes(cfg, f, shard, rank, rcfg.n_ctx, rcfg.n_batch, rcfg.cache_type) <= budget:
        return ShardedWeights(f, cfg, shard, rank, make_linear, cache)
    cache.clear()  # packed resident slices of an earlier session would count against the budget
    try:
        return stream_shard(f, cfg, shard, rank, make_linear, digest, rcfg, budget, progress)
    except BudgetError as e:
        raise ClusterError(f"{who}: its shard does not fit its memory budget even streamed: {e}") from None


def resident_bytes(cfg: ModelConfig, f: GGUFFile, shard: NodeShard, rank: int, n_ctx: int, n_batch: int,
                   cache_type: str) -> int:
    """What the node's process holds with its whole shard resident (offload.full_memory, measured baseline)."""
    from ...offload.planner import full_memory, measure_baseline
    from .plan import node_sizes

    return full_memory(node_sizes(cfg, f, shard, rank, cache_type), n_ctx, n_batch,
                       measure_baseline(without_mapped_models=True))


def matvec_rate(make_linear, seconds: float = 0.3) -> float:
    """Weight bytes per second this node's kernels multiply one token by (a Q4_K matrix of 16 MB,
    beyond the caches: the memory-bound rate decoding runs at), the best of repeated runs."""
    from ...quant.ggml_types import GGMLType

    t, k = GGMLType.Q4_K, 1536
    rows = np.zeros(((16 << 20) // t.row_bytes(k), t.row_bytes(k)), np.uint8)
    fn = make_linear(rows, t, k)
    x = np.ones((1, k), F32)
    fn(x)
    best, end = float("inf"), time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        fn(x)
        best = min(best, time.perf_counter() - t0)
        if t0 > end:
            return rows.nbytes / best
