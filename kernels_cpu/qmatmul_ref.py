"""Numpy references for the quantized products, and the one decoding step every backend packs from.

Every supported quantized type is an integer matrix times per-block float scales, minus per-block
float offsets:

    w[n, b*bs + i] = scale[n, b] * q[n, b*bs + i] - mins[n, b]

| type | bs | q (int8)        | scale        | mins        |
|------|----|-----------------|--------------|-------------|
| Q8_0 | 32 | q       -128..127 | d          | -           |
| Q5_0 | 32 | q5 - 16  -16..15  | d          | -           |
| Q4_K | 32 | q4        0..15   | d * sc[j]  | dmin * m[j] |
| Q6_K | 16 | q6 - 32  -32..31  | d * sc[j]  | -           |

`split(raw, t, k)` decodes GGUF rows into those fields; the float32 products are computed in the same
order as `edgellm.quant.formats` (and gguf-py), so `scale * q - mins` reproduces the GGUF values
bit for bit (tests check it). The backends repack these fields into their own layouts.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..quant.ggml_types import GGMLType

F32 = np.float32

# types with a fused integer path; the block size is that of their per-block scales
SPLIT_BLOCK = {GGMLType.Q8_0: 32, GGMLType.Q5_0: 32, GGMLType.Q4_K: 32, GGMLType.Q6_K: 16}
SPLIT_MINS = frozenset({GGMLType.Q4_K})  # the types whose split has per-block mins


class Split(NamedTuple):
    """A quantized matrix as integers and per-block scales: w = scale * q - mins."""

    q: np.ndarray  # int8 (N, K)
    scale: np.ndarray  # float32 (N, K // bs)
    mins: np.ndarray | None  # float32 (N, K // bs), or None where the type has no offset
    bs: int  # elements per scale block


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The little-endian f16 at bytes [start, start+2) of each block, widened -> float32 (n, 1)."""
    return np.ascontiguousarray(blocks[:, start:start + 2]).view(np.float16).astype(F32)


def _nib(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return (b & 0x0F).astype(np.int8), (b >> 4).astype(np.int8)


def _split_q8_0(blk: np.ndarray) -> tuple:  # blk (nb, 34)
    return blk[:, 2:].view(np.int8), _f16(blk, 0), None


def _split_q5_0(blk: np.ndarray) -> tuple:  # blk (nb, 22): d, qh (u32), qs (16)
    qh = np.unpackbits(blk[:, 2:6], axis=1, bitorder="little").astype(np.int8)  # (nb, 32)
    lo, hi = _nib(blk[:, 6:])
    q = np.concatenate([lo, hi], axis=1) | (qh << 4)
    return q - np.int8(16), _f16(blk, 0), None


def _scale_min_k4(sc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 12 packed bytes of a Q4_K/Q5_K super-block -> 8 six-bit scales and mins, uint8 (nb, 8)."""
    s = sc.astype(np.uint8)
    scales = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    mins = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    return scales, mins


def _split_q4_k(blk: np.ndarray) -> tuple:  # blk (nb, 144): d, dmin, scales (12), qs (128)
    d, dmin = _f16(blk, 0), _f16(blk, 2)
    sc, m = _scale_min_k4(blk[:, 4:16])
    qs = blk[:, 16:].reshape(-1, 4, 32)  # 4 chunks of 64 elements: low nibbles first, then high
    lo, hi = _nib(qs)
    q = np.stack([lo, hi], axis=2).reshape(-1, 256)
    return q, d * sc.astype(F32), dmin * m.astype(F32)


def _split_q6_k(blk: np.ndarray) -> tuple:  # blk (nb, 210): ql (128), qh (64), scales (16 x i8), d
    ql = blk[:, :128].reshape(-1, 2, 64)  # two halves of 128 elements
    qh = blk[:, 128:192].reshape(-1, 2, 1, 32)
    hi = (qh >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3  # (nb, 2, 4, 32)
    lo = np.stack([ql[:, :, :32] & 0x0F, ql[:, :, 32:] & 0x0F, ql[:, :, :32] >> 4, ql[:, :, 32:] >> 4], axis=2)
    q = (lo | (hi << 4)).astype(np.int8).reshape(-1, 256) - np.int8(32)
    sc = blk[:, 192:208].view(np.int8).astype(F32)
    return q, _f16(blk, 208) * sc, None


_SPLITTERS = {GGMLType.Q8_0: _split_q8_0, GGMLType.Q5_0: _split_q5_0,
              GGMLType.Q4_K: _split_q4_k, GGMLType.Q6_K: _split_q6_k}


def check_raw(raw: np.ndarray, ggml_type: GGMLType, k: int) -> np.ndarray:
    """raw bytes of any shape -> uint8 (N, row_bytes), or ValueError naming what does not fit."""
    t = GGMLType(ggml_type)
    if raw.dtype != np.uint8:
        raise ValueError(f"weights must be raw uint8 bytes, not {raw.dtype}")
    if k % t.block_size:
        raise ValueError(f"row length {k} is not a multiple of {t.name}'s block size {t.block_size}")
    rb = t.row_bytes(k)
    if raw.size % rb:
        raise ValueError(f"{raw.size} bytes are not whole {t.name} rows of {k} elements ({rb} bytes each)")
    return raw.reshape(-1, rb)


def split(raw: np.ndarray, ggml_type: GGMLType, k: int) -> Split:
    """GGUF rows uint8 (N, row_bytes) -> Split fields (q, scale, mins, bs)."""
    t = GGMLType(ggml_type)
    rows = check_raw(raw, t, k)
    n = rows.shape[0]
    q, scale, mins = _SPLITTERS[t](rows.reshape(-1, t.type_size))
    bs = SPLIT_BLOCK[t]
    scale = np.ascontiguousarray(scale, dtype=F32).reshape(n, k // bs)
    if mins is not None:
        mins = np.ascontiguousarray(mins, dtype=F32).reshape(n, k // bs)
    return Split(np.ascontiguousarray(q).reshape(n, k), scale, mins, bs)


def dequantize_split(s: Split, rows=slice(None)) -> np.ndarray:
    """Rows (a slice or int64 indices) of Split fields -> float32 (R, K), bit-identical to the GGUF
    reference dequantizer."""
    q = s.q[rows]
    w = q.reshape(q.shape[0], -1, s.bs).astype(F32) * s.scale[rows][:, :, None]
    if s.mins is not None:
        w -= s.mins[rows][:, :, None]
    return w.reshape(q.shape[0], -1)


def matmul_split(s: Split, x: np.ndarray) -> np.ndarray:
    """The numpy backend: x float32 (T, K) @ W.T -> (T, N), W dequantized ~1 MB of rows at a time
    (exact weights, float32 BLAS)."""
    n, k = s.q.shape
    out = np.empty((x.shape[0], n), F32)
    tile = max(16, (1 << 20) // (4 * k) // 16 * 16)
    for n0 in range(0, n, tile):
        n1 = min(n, n0 + tile)
        np.matmul(x, dequantize_split(s, slice(n0, n1)).T, out=out[:, n0:n1])
    return out


def dequantize_rows(raw: np.ndarray, ggml_type: GGMLType, k: int) -> np.ndarray:
    """GGUF rows uint8 (N, row_bytes) of any supported type -> float32 (N, K)."""
    t = GGMLType(ggml_type)
    rows = check_raw(raw, t, k)
    if t == GGMLType.F32:
        return rows.view(F32).reshape(rows.shape[0], k)
    if t == GGMLType.F16:
        return rows.view(np.float16).astype(F32).reshape(rows.shape[0], k)
    if t in _SPLITTERS:
        return dequantize_split(split(rows, t, k))
    from ..quant.formats import dequantize
    return dequantize(rows, t).reshape(rows.shape[0], k)


def matmul_ref(raw: np.ndarray, ggml_type: GGMLType, k: int, x: np.ndarray) -> np.ndarray:
    """The float64 reference product: x (T, K) @ dequantize(raw).T -> float64 (T, N)."""
    w = dequantize_rows(raw, ggml_type, k).astype(np.float64)  # (N, K)
    return np.asarray(x, np.float64) @ w.T


def quantize_activations(x: np.ndarray, bs: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """x float32 (T, K) -> int8 (T, K) and per-block scales float32 (T, K // bs), llama.cpp's q8_0
    rounding: d = amax / 127, q = round(x / d). Used by the integer matvec kernels."""
    t, k = x.shape
    xb = x.reshape(t, k // bs, bs)
    d = (np.abs(xb).max(axis=2) / F32(127)).astype(F32)  # (T, K // bs)
    inv = np.divide(F32(1), d, out=np.zeros_like(d), where=d != 0)
    q = np.rint(xb * inv[:, :, None]).astype(np.int8)
    return q.reshape(t, k), d


def int8_error_bound(w: np.ndarray, x: np.ndarray, bs: int = 32, qmax: int = 127) -> np.ndarray:
    """Worst-case |error| of a product whose activations were rounded to integers per block of `bs`
    (int8: qmax 127; int16: 32767): sum over blocks b of amax_b(x) / (2 qmax) * sum_i |w[n, b, i]|
    -> float64 (T, N).

    Rounding x to the grid amax/qmax moves each element by at most half a step; float32 accumulation
    adds ~1e-6 relative on top, which the callers' slack covers."""
    t, k = x.shape
    amax = np.abs(np.asarray(x, np.float64)).reshape(t, k // bs, bs).max(axis=2) / (2.0 * qmax)  # (T, nb)
    wabs = np.abs(np.asarray(w, np.float64)).reshape(w.shape[0], k // bs, bs).sum(axis=2)  # (N, nb)
    return amax @ wabs.T


# byte offsets of the f16 scale fields in each block, which random bytes must not fill with inf/NaN
_F16_FIELDS = {GGMLType.Q8_0: (0,), GGMLType.Q5_0: (0,), GGMLType.Q4_K: (0, 2), GGMLType.Q6_K: (208,),
               GGMLType.Q4_0: (0,), GGMLType.Q4_1: (0, 2), GGMLType.Q5_1: (0, 2), GGMLType.Q5_K: (0, 2),
               GGMLType.Q3_K: (108,), GGMLType.Q2_K: (80, 82)}


def random_raw(ggml_type: GGMLType, n: int, k: int, rng: np.random.Generator, d_max: float = 2 ** -5) -> np.ndarray:
    """Valid random GGUF rows uint8 (n, row_bytes): random quants, finite float16 scales
    uniform in [0, d_max) (~1/64 by default). F32/F16 rows hold standard normal values."""
    t = GGMLType(ggml_type)
    if t == GGMLType.F32:
        return rng.standard_normal((n, k), dtype=F32).view(np.uint8)
    if t == GGMLType.F16:
        return rng.standard_normal((n, k)).astype(np.float16).view(np.uint8)
    raw = rng.integers(0, 256, size=(n * (k // t.block_size), t.type_size), dtype=np.uint8)
    for off in _F16_FIELDS.get(t, ()):
        d = (rng.random(raw.shape[0]) * d_max).astype(np.float16)
        raw[:, off:off + 2] = d.view(np.uint8).reshape(-1, 2)
    return raw.reshape(n, t.row_bytes(k))
