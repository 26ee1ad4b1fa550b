"""KV caches, one per layer, preallocated: float16 (llama.cpp's default cache type), or q8_0 /
q4_0 blocks of 32 along head_dim (`--cache-type`, llama.cpp's -ctk/-ctv names).

`LayerCache` holds every position of the context; `RingCache` (sliding-window layers) holds only
the last `window + n_batch - 1` positions, position p in row p % rows. Both share one interface:
`store(k, v, positions)` then `attend(q, positions, scale)`. A quantized cache is the pair
(qs, d) that the ops' `kv_store` writes and their attention reads row by row.

Quantized caches store keys and values transformed so that they round better, in ways that
leave attention as it is (up to float rounding). A few channels of qwen2's keys reach 100-160
where the rest are near 1, and a 32-value block holding one of them rounds its neighbours away.
From the first batch written after a reset (position 0 left out: the attention sink is unlike
the other keys), each layer and kv head takes
- an offset mu (the mean key), subtracted from every key: it lowers all of a query's scores by
  the same q.mu, which softmax ignores (the runtime never soft-caps attention scores);
- channel scales s = (std of the channel / mean std) ** 0.5, clipped to [1/4, 16] (SmoothQuant's
  migration; 1 when the batch has fewer than SMOOTH_MIN such rows): keys are divided by s and
  queries multiplied by it;
- an orthonormal Walsh-Hadamard matrix H (symmetric, H H = I) per chunk of `head_dim`'s largest
  power-of-two divisor for keys and queries (q.k is unchanged), 64 wide for values, and the
  attention output times H again, which undoes it (llama.cpp rotates so too).
GPL-3 perplexity (ctx 512) of qwen 0.5B: float16 5.305; q8_0 rounded plainly 5.512 (+3.9%;
llama.cpp's own q8_0 cache is +3.6% against its float16), rotated and offset 5.338 (+0.6%),
with the channel scales too 5.300 (-0.1%).
"""
from __future__ import annotations

import numpy as np

from ..quant.ggml_types import GGMLType, kv_cache_type

SMOOTH_MIN = 16  # rows (past position 0) the first batch needs for channel scales; fewer: s = 1


def allocate(n_rows: int, n_kv: int, head_dim: int, cache_type: str = "f16"):
    """An empty cache of `cache_type`: float16 (n_rows, n_kv, head_dim), or for q8_0 / q4_0
    (qs (n_rows, n_kv, head_dim) int8 | (n_rows, n_kv, head_dim // 2) uint8, d (n_rows, n_kv, head_dim // 32) float16)."""
    t = kv_cache_type(cache_type)
    if t == GGMLType.F16:
        return np.zeros((n_rows, n_kv, head_dim), np.float16)
    if head_dim % 32:
        raise ValueError(f"a {cache_type} cache needs head_dim a multiple of 32, not {head_dim}")
    qs = (np.zeros((n_rows, n_kv, head_dim), np.int8) if t == GGMLType.Q8_0
          else np.zeros((n_rows, n_kv, head_dim // 2), np.uint8))
    return qs, np.zeros((n_rows, n_kv, head_dim // 32), np.float16)


def rotation(head_dim: int, widest: bool) -> int:
    """The Hadamard size for a head of `head_dim`: the widest power of two dividing it (keys), or
    64 (values); 0 (no rotation) when head_dim is not a multiple of 64."""
    if head_dim % 64:
        return 0
    n = 64
    while widest and head_dim % (2 * n) == 0:
        n *= 2
    return n


def key_transform(k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The offset and channel scales, each (1, n_kv, head_dim) float32, from a first batch of keys
    k (T, n_kv, head_dim): see the module's docstring."""
    rest = (k[1:] if k.shape[0] > 1 else k).astype(np.float64)
    mu = rest.mean(axis=0, keepdims=True)
    if rest.shape[0] < SMOOTH_MIN:
        return mu.astype(np.float32), np.ones_like(mu, dtype=np.float32)
    sd = rest.std(axis=0, keepdims=True) + 1e-6
    s = np.clip(np.sqrt(sd / sd.mean(axis=2, keepdims=True)), 0.25, 16.0)
    return mu.astype(np.float32), s.astype(np.float32)


def _nbytes(c) -> int:
    return sum(a.nbytes for a in c) if isinstance(c, tuple) else c.nbytes


def _n_rows(c) -> int:
    return (c[1] if isinstance(c, tuple) else c).shape[0]


class LayerCache:
    def __init__(self, n_ctx: int, n_kv: int, head_dim: int, head_dim_v: int, ops, cache_type: str = "f16"):
        alloc = getattr(ops, "kv_allocate", allocate)  # a device's ops keep their caches on the device
        self.k = alloc(n_ctx, n_kv, head_dim, cache_type)  # (n_ctx, n_kv_heads, head_dim) values
        self.v = alloc(n_ctx, n_kv, head_dim_v, cache_type)  # (n_ctx, n_kv_heads, head_dim_v) values
        self.cache_type = cache_type
        quantized = isinstance(self.k, tuple)
        self.k_rot = rotation(head_dim, True) if quantized else 0  # Hadamard sizes, 0: none
        self.v_rot = rotation(head_dim_v, False) if quantized else 0
        self.k_shift = None  # (1, n_kv, head_dim) float32: subtracted from the keys of a quantized cache
        self.k_scale = None  # (1, n_kv, head_dim) float32: keys divided by it, queries multiplied
        self.ops = ops
        self.window = 0

    def rows(self, positions: np.ndarray) -> np.ndarray:
        return positions

    def store(self, k: np.ndarray, v: np.ndarray, positions: np.ndarray) -> None:
        """k (T, n_kv, head_dim), v (T, n_kv, head_dim_v) at positions (T,) (consecutive)."""
        r = self.rows(positions)
        if isinstance(self.k, tuple):
            if positions[0] == 0 or self.k_shift is None:  # a new sequence: its first batch decides
                self.k_shift, self.k_scale = key_transform(k)
            k = (k - self.k_shift) / self.k_scale
        self.ops.kv_store(self.k, self._rotate(k, self.k_rot), r)
        self.ops.kv_store(self.v, self._rotate(v, self.v_rot), r)

    def attend(self, q: np.ndarray, positions: np.ndarray, scale: float) -> np.ndarray:
        """q (T, n_head, head_dim) -> (T, n_head, head_dim_v)."""
        if self.k_scale is not None:
            G = q.shape[1] // self.k_scale.shape[1]
            q = q * (np.repeat(self.k_scale, G, axis=1) if G > 1 else self.k_scale)
        return self._rotate(self._attend(self._rotate(q, self.k_rot), positions, scale), self.v_rot)

    def step(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, position: int, scale: float) -> np.ndarray:
        """One decode token: store k (n_kv, head_dim), v (n_kv, head_dim_v) at `position`, attend
        with q (n_head, head_dim) -> (n_head, head_dim_v); the bits of store then attend."""
        if not isinstance(self.k, tuple):  # float16: one kernel call
            return self.ops.decode_step(q, k, v, self.k, self.v, position, scale, self.window,
                                        getattr(self, "ring", False))
        p = np.array([position], np.int64)
        self.store(k[None], v[None], p)
        return self.attend(q[None], p, scale)[0]

    def _rotate(self, x: np.ndarray, n: int) -> np.ndarray:
        return self.ops.kv_rotate(x, n) if n else x

    def _attend(self, q: np.ndarray, positions: np.ndarray, scale: float) -> np.ndarray:
        return self.ops.attention(q, self.k, self.v, positions, scale, self.window)

    @property
    def nbytes(self) -> int:
        return _nbytes(self.k) + _nbytes(self.v)


class RingCache(LayerCache):
    """A sliding-window layer's cache: only the last `window + n_batch - 1` positions."""

    def __init__(self, window: int, n_batch: int, n_ctx: int, n_kv: int, head_dim: int, head_dim_v: int, ops,
                 cache_type: str = "f16"):
        super().__init__(min(window + n_batch - 1, n_ctx), n_kv, head_dim, head_dim_v, ops, cache_type)
        self.window = window
        self.n_rows = _n_rows(self.k)
        self.ring = self.n_rows < n_ctx

    def rows(self, positions: np.ndarray) -> np.ndarray:
        return positions % self.n_rows if self.ring else positions

    def _attend(self, q: np.ndarray, positions: np.ndarray, scale: float) -> np.ndarray:
        if not self.ring:
            return super()._attend(q, positions, scale)
        return self.ops.attention_ring(q, self.k, self.v, positions, scale, self.window)

    def can_rewind_to(self, n_keep: int, n_past: int) -> bool:
        """Whether positions < n_keep are all still intact after positions < n_past were written."""
        return n_past - n_keep <= self.n_rows - self.window


def make_caches(cfg, rcfg, n_ctx: int, ops) -> list[LayerCache]:
    """One cache per layer; sliding-window layers get a ring. ops: one ops module, or one per
    layer (runtime/gpu.py places layers on two sides)."""
    caches = []
    per_layer = ops if isinstance(ops, (list, tuple)) else [ops] * cfg.n_layer
    for i, ops in enumerate(per_layer):
        if cfg.sliding_window and cfg.swa_layers and cfg.swa_layers[i]:
            caches.append(RingCache(cfg.sliding_window, rcfg.n_batch, n_ctx, cfg.n_head_kv,
                                    cfg.head_dim, cfg.head_dim_v, ops, rcfg.cache_type))
        else:
            caches.append(LayerCache(n_ctx, cfg.n_head_kv, cfg.head_dim, cfg.head_dim_v, ops, rcfg.cache_type))
    return caches
