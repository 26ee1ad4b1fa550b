"""Dequantization of GGUF rows to float32 (the exact GGUF values), for the prefill tiles.

    w = dequantize_rows(raw, GGMLType.Q4_K, k, r0, r1)   # rows [r0, r1) -> float32 (r1 - r0, K)

Q4_K, Q6_K, Q8_0 and Q5_0 in numba (serial, GIL-free: the callers split rows across threads);
F32 and F16 by numpy; every other type through the numpy reference in quant/. The numba kernels
compute what the reference does (tests/test_kernels_qmatmul.py checks the bits).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from ..quant.ggml_types import GGMLType

F32 = np.float32
I32 = np.int32
U64 = np.uint64

# every float16 bit pattern -> float32 (exact), indexed by the little-endian u16
_F16 = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(F32)


@njit(cache=True, inline="always")
def _h(raw, p, f16):  # the f16 at byte p -> f32
    return f16[U64(raw[p]) | (U64(raw[p + U64(1)]) << U64(8))]


# ---- dequantization to float32 (the exact GGUF values) ------------------------------------------

@njit(cache=True, nogil=True)
def _dq_q4_k(raw, r0, k, f16, out):
    """Rows r0.. of raw (N * RB,) u8 -> out (R * K,) f32; R = out.size // K."""
    nb = k // 256
    for i in range(out.shape[0] // 256):  # super-blocks, row-major
        p = U64(r0 * nb + i) * U64(144)
        d = _h(raw, p, f16)
        dmin = _h(raw, p + U64(2), f16)
        s = p + U64(4)
        for j in range(4):
            if j < 2:
                sc0 = raw[s + U64(2 * j)] & 63
                m0 = raw[s + U64(2 * j + 4)] & 63
                sc1 = raw[s + U64(2 * j + 1)] & 63
                m1 = raw[s + U64(2 * j + 5)] & 63
            else:
                a = U64(2 * j - 4)
                sc0 = (raw[s + U64(8) + a] & 15) | ((raw[s + a] >> 6) << 4)
                m0 = (raw[s + U64(8) + a] >> 4) | ((raw[s + U64(4) + a] >> 6) << 4)
                sc1 = (raw[s + U64(9) + a] & 15) | ((raw[s + U64(1) + a] >> 6) << 4)
                m1 = (raw[s + U64(9) + a] >> 4) | ((raw[s + U64(5) + a] >> 6) << 4)
            d0 = d * F32(sc0)
            n0 = dmin * F32(m0)
            d1 = d * F32(sc1)
            n1 = dmin * F32(m1)
            q = p + U64(16 + 32 * j)
            o = U64(i * 256 + 64 * j)
            for l in range(32):
                v = raw[q + U64(l)]
                out[o + U64(l)] = d0 * F32(v & 15) - n0
                out[o + U64(32 + l)] = d1 * F32(v >> 4) - n1


@njit(cache=True, nogil=True)
def _dq_q6_k(raw, r0, k, f16, out):
    nb = k // 256
    for i in range(out.shape[0] // 256):
        p = U64(r0 * nb + i) * U64(210)
        d = _h(raw, p + U64(208), f16)
        for h in range(2):
            ql = p + U64(64 * h)
            qh = p + U64(128 + 32 * h)
            sc = p + U64(192 + 8 * h)
            o = U64(i * 256 + 128 * h)
            for g in range(2):
                d1 = d * F32(np.int8(raw[sc + U64(g)]))
                d2 = d * F32(np.int8(raw[sc + U64(2 + g)]))
                d3 = d * F32(np.int8(raw[sc + U64(4 + g)]))
                d4 = d * F32(np.int8(raw[sc + U64(6 + g)]))
                for l in range(16 * g, 16 * g + 16):
                    u = U64(l)
                    lq = raw[ql + u]
                    lq2 = raw[ql + U64(32) + u]
                    hq = raw[qh + u]
                    out[o + u] = d1 * F32(I32((lq & 15) | ((hq & 3) << 4)) - 32)
                    out[o + U64(32) + u] = d2 * F32(I32((lq2 & 15) | (((hq >> 2) & 3) << 4)) - 32)
                    out[o + U64(64) + u] = d3 * F32(I32((lq >> 4) | (((hq >> 4) & 3) << 4)) - 32)
                    out[o + U64(96) + u] = d4 * F32(I32((lq2 >> 4) | (((hq >> 6) & 3) << 4)) - 32)


@njit(cache=True, nogil=True)
def _dq_q8_0(raw, r0, k, f16, out):
    nb = k // 32
    for i in range(out.shape[0] // 32):
        p = U64(r0 * nb + i) * U64(34)
        d = _h(raw, p, f16)
        o = U64(i * 32)
        for l in range(32):
            out[o + U64(l)] = d * F32(np.int8(raw[p + U64(2 + l)]))


@njit(cache=True, nogil=True)
def _dq_q5_0(raw, r0, k, f16, out):
    nb = k // 32
    for i in range(out.shape[0] // 32):
        p = U64(r0 * nb + i) * U64(22)
        d = _h(raw, p, f16)
        qh = U64(raw[p + U64(2)]) | (U64(raw[p + U64(3)]) << U64(8)) \
            | (U64(raw[p + U64(4)]) << U64(16)) | (U64(raw[p + U64(5)]) << U64(24))
        o = U64(i * 32)
        for l in range(16):
            v = raw[p + U64(6 + l)]
            out[o + U64(l)] = d * F32(I32((v & 15) | (((qh >> U64(l)) & U64(1)) << U64(4))) - 16)
            out[o + U64(16 + l)] = d * F32(I32((v >> 4) | (((qh >> U64(l + 16)) & U64(1)) << U64(4))) - 16)


_DQ = {GGMLType.Q4_K: _dq_q4_k, GGMLType.Q6_K: _dq_q6_k, GGMLType.Q8_0: _dq_q8_0, GGMLType.Q5_0: _dq_q5_0}


def _flat(raw: np.ndarray) -> np.ndarray:
    return raw.reshape(-1) if raw.flags.c_contiguous else np.ascontiguousarray(raw).reshape(-1)


def dequantize_rows(raw: np.ndarray, ggml_type: GGMLType, k: int, r0: int = 0, r1: int | None = None,
                    out: np.ndarray | None = None) -> np.ndarray:
    """Rows [r0, r1) of raw uint8 (N, row_bytes) -> float32 (r1 - r0, K), the GGUF values."""
    t = GGMLType(ggml_type)
    r1 = raw.shape[0] if r1 is None else r1
    if t == GGMLType.F32:
        return raw[r0:r1].view(F32).reshape(r1 - r0, k)
    if t == GGMLType.F16:
        return raw[r0:r1].view(np.float16).astype(F32).reshape(r1 - r0, k)
    if t not in _DQ:
        from .qmatmul_ref import dequantize_rows as ref
        return ref(raw[r0:r1], t, k)
    out = np.empty((r1 - r0, k), F32) if out is None else out[: r1 - r0]
    _DQ[t](_flat(raw), r0, k, _F16, out.reshape(-1))
    return out
