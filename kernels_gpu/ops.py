"""The runtime's ops interface (the functions of kernels_cpu/ops_ref.py, same signatures) on a
device of launch.py: arrays stay on the device between ops, vectors (norm weights) are uploaded
once, KV caches are float16 device arrays. Embedding rows are dequantized on the host (quant/)
and uploaded: a few rows per pass.

    ops = DeviceOps(open_device("cuda"))
    h = ops.rms_norm(x, w, 1e-6)          # x (T, D) device f32, w (D,) host or device f32
"""
from __future__ import annotations

import numpy as np

from ..quant.ggml_types import GGMLType
from .launch import DeviceError


class DeviceOps:
    def __init__(self, dev):
        self.dev = dev
        self.xp = dev.xp
        self._vectors: dict[int, tuple[np.ndarray, object]] = {}  # id(host vector) -> (it, device copy)
        self._index: dict[tuple, object] = {}  # positions / rows -> their device copy (a pass reuses them)

    def index(self, a, dtype):
        """A small host int array's device copy, cached: a pass's layers share their positions and
        cache rows, so each is copied once per pass instead of once per op."""
        a = np.asarray(a, dtype)
        key = (a.tobytes(), a.dtype.str)
        hit = self._index.get(key)
        if hit is None:
            if len(self._index) >= 16:
                self._index.clear()
            hit = self._index[key] = self.dev.asarray(a, dtype)
        return hit

    def vector(self, v):
        """A host float32 vector's device copy (cached while the host array lives)."""
        if isinstance(v, self.xp.ndarray):
            return v
        hit = self._vectors.get(id(v))
        if hit is None or hit[0] is not v:
            hit = self._vectors[id(v)] = (v, self.dev.asarray(v))
        return hit[1]

    def rms_norm(self, x, weight, eps):
        return self.dev.rms_norm(x, self.vector(weight), eps)

    def rope(self, x, positions, theta_base, neox, n_rot=None, freq_scale=1.0):
        n_rot = x.shape[-1] if n_rot is None else n_rot
        return self.dev.rope(x, positions, theta_base, neox, n_rot, freq_scale, self.index(positions, np.int32))

    def silu_gate(self, gate, up):
        return self.dev.silu_gate(gate, up)

    def gelu_tanh_gate(self, gate, up):
        return self.dev.gelu_tanh_gate(gate, up)

    def kv_allocate(self, n_rows: int, n_kv: int, head_dim: int, cache_type: str = "f16"):
        """An empty float16 cache (n_rows, n_kv, head_dim) on the device (the only cache type here)."""
        if cache_type not in ("f16", "float16"):
            raise DeviceError(f"--cache-type {cache_type} runs on the CPU backends only; the cuda backend keeps f16")
        return self.xp.zeros((n_rows, n_kv, head_dim), np.float16)

    def kv_store(self, cache, x, rows):
        """x (T, n_kv, head_dim) f32 into rows (T,) of a float16 cache (rounded to nearest even)."""
        cache[self.index(rows, np.int64)] = self.dev.asarray(x).astype(np.float16)

    def kv_rotate(self, x, n):
        raise DeviceError("quantized KV caches run on the CPU backends only")

    def attention(self, q, k_cache, v_cache, q_positions, scale, window=0, softcap=0.0):
        if softcap:
            raise DeviceError("attention soft-capping has no CUDA kernel")
        return self.dev.attention(q, k_cache, v_cache, q_positions, window, scale, self.index(q_positions, np.int32))

    attention_ring = attention  # key j lives in row j % n_rows either way

    def decode_step(self, q, k, v, k_cache, v_cache, position, scale, window=0, ring=False):
        """Store k, v (n_kv, head_dim) at `position` (row position % n_rows), attend with q (n_head, head_dim)."""
        p = np.array([position], np.int64)
        rows = p % k_cache.shape[0]
        self.kv_store(k_cache, k[None], rows)
        self.kv_store(v_cache, v[None], rows)
        return self.dev.attention(q[None], k_cache, v_cache, p, window, scale, self.index(p, np.int32))[0]

    def embedding_rows(self, table_raw, ggml_type, ids):
        """(n_tokens, D) f32 on the device: the requested rows dequantized on the host."""
        from ..quant.formats import dequantize

        t = GGMLType(int(ggml_type))
        rows = np.stack([dequantize(np.ascontiguousarray(table_raw[int(i)]), t) for i in ids])
        return self.dev.asarray(rows)
