"""KV caches, one per layer, preallocated; float16 like llama.cpp's default cache type.

`LayerCache` holds every position of the context; `RingCache` (sliding-window layers) holds only
the last `window + n_batch - 1` positions, position p in row p % rows. Both share one interface:
`store(k, v, positions)` then `attend(q, positions, scale)`.
"""
from __future__ import annotations

import numpy as np

KV_DTYPE = np.float16


class LayerCache:
    def __init__(self, n_ctx: int, n_kv: int, head_dim: int, head_dim_v: int, ops):
        self.k = np.zeros((n_ctx, n_kv, head_dim), KV_DTYPE)  # (n_ctx, n_kv_heads, head_dim)
        self.v = np.zeros((n_ctx, n_kv, head_dim_v), KV_DTYPE)  # (n_ctx, n_kv_heads, head_dim_v)
        self.ops = ops
        self.window = 0

    def rows(self, positions: np.ndarray) -> np.ndarray:
        return positions

    def store(self, k: np.ndarray, v: np.ndarray, positions: np.ndarray) -> None:
        """k (T, n_kv, head_dim), v (T, n_kv, head_dim_v) at positions (T,) (consecutive)."""
        r = self.rows(positions)
        self.k[r] = k
        self.v[r] = v

    def attend(self, q: np.ndarray, positions: np.ndarray, scale: float) -> np.ndarray:
        """q (T, n_head, head_dim) -> (T, n_head, head_dim_v)."""
        return self.ops.attention(q, self.k, self.v, positions, scale, self.window)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class RingCache(LayerCache):
    """A sliding-window layer's cache: only the last `window + n_batch - 1` positions."""

    def __init__(self, window: int, n_batch: int, n_ctx: int, n_kv: int, head_dim: int, head_dim_v: int, ops):
        super().__init__(min(window + n_batch - 1, n_ctx), n_kv, head_dim, head_dim_v, ops)
        self.window = window
        self.ring = self.k.shape[0] < n_ctx

    def rows(self, positions: np.ndarray) -> np.ndarray:
        return positions % self.k.shape[0] if self.ring else positions

    def attend(self, q: np.ndarray, positions: np.ndarray, scale: float) -> np.ndarray:
        if not self.ring:
            return super().attend(q, positions, scale)
        return self.ops.attention_ring(q, self.k, self.v, positions, scale, self.window)

    def can_rewind_to(self, n_keep: int, n_past: int) -> bool:
        """Whether positions < n_keep are all still intact after positions < n_past were written."""
        return n_past - n_keep <= self.k.shape[0] - self.window


def make_caches(cfg, rcfg, n_ctx: int, ops) -> list[LayerCache]:
    """One cache per layer; sliding-window layers get a ring."""
    caches = []
    for i in range(cfg.n_layer):
        if cfg.sliding_window and cfg.swa_layers and cfg.swa_layers[i]:
            caches.append(RingCache(cfg.sliding_window, rcfg.n_batch, n_ctx, cfg.n_head_kv,
                                    cfg.head_dim, cfg.head_dim_v, ops))
        else:
            caches.append(LayerCache(n_ctx, cfg.n_head_kv, cfg.head_dim, cfg.head_dim_v, ops))
    return caches
