"""A node's weight store: the Weights interface over only the slices its shard plan gives it.

Row slices are views of the mapped file (like the resident store); column slices are read with
pread into their own arrays, so the other nodes' columns are never mapped into this process.
A column slice that was widened to whole quant blocks (plan.py) multiplies a zero-padded input.
Packed weights live in `cache`, keyed by (name, slice): a re-planned node keeps what did not change.
"""
from __future__ import annotations

import os
from typing import Callable

import numpy as np

from ...loaders.gguf import GGUFFile, TensorInfo
from ...quant.formats import dequantize
from ..config import ModelConfig
from .plan import NodeShard, Slice, node_tensors, slice_bytes

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


def _padded(fn: Callable, k: int, before: int, after: int) -> Callable:
    """x (T, k) -> fn(x placed at columns [before, before + k) of zeros (T, before + k + after))."""
    width = before + k + after
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
        return self.f.rows(name), self.f.info(name).type

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
