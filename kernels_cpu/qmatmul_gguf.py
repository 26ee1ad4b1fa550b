"""Quantized products straight from GGUF blocks: no packing, so a weight can be used the moment
its bytes arrive (streamed layers, offload/), and resident weights cost exactly their file size.

    y = matmul(raw, GGMLType.Q4_K, k, x)   # raw uint8 (N, row_bytes), x (T, K) f32 -> (T, N) f32

Packing for the other backends costs ~60 ms (numba) to ~125 ms (onnxruntime) a layer of the 1.5B
model, more than reading it from disk (~10 ms): too slow to redo for every streamed layer.

- T <= SMALL_T (decode): x is rounded to int16 (the numba backend's `quantize_x`) per 256-element
  super-block for the K-quants, per 32-element block for Q8_0/Q5_0; block dot products and the
  K-quants' integer scales combine exactly in int32/int64 inside a super-block, and per row the
  super-blocks are summed in float32 in order: c += xd * (d * sum_j sc_j dot_j - dmin * sum_j
  m_j xsum_j) (Q4_K), c += (d * xd) * sum_j sc_j dot_j (Q6_K), c += d * (xd * dot) (Q8_0/Q5_0).
  As accurate as float32 products (int16 rounds x 256x finer than llama.cpp's int8), agreeing
  with the numba backend (int16 per 32 or 16 elements, its own float order) within rounding, not
  bit for bit. One row per loop iteration: a row's result does not depend on which rows share
  the call, so a matrix computed in row chunks (a streamed output head) equals it computed
  whole, and it does not depend on the thread count.
- T > SMALL_T (prefill): tiles of `tile_rows(k)` rows are dequantized to float32 (the exact GGUF
  values) and multiplied by single-threaded BLAS, one call per tile as the numba backend cuts
  them: bit-identical to it. Row chunks starting at multiples of `tile_rows(k)` issue the same
  calls as the whole matrix.

Types: Q4_K, Q6_K, Q8_0, Q5_0 (the shipped models' types); F32, F16 and others are dequantized
(numpy reference) and multiplied by BLAS. Block layouts (bytes): Q4_K 144 = d, dmin (f16), 12
packed 6-bit scales/mins, 128 nibbles (4 chunks of 64 elements, low nibbles first); Q6_K 210 =
128 low nibbles, 64 bytes of 2-bit highs, 16 int8 scales, d; Q8_0 34 = d, 32 int8; Q5_0 22 = d,
32 high bits (u32), 16 nibbles. Single-thread speed on the 1.5B model's matrices (decode, one
token): Q4_K ~16, Q6_K ~16 G weights/s; Q5_0 ~10, Q8_0 ~4 (LLVM keeps that loop scalar).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from ..quant.ggml_types import GGMLType
from . import qmatmul_numba as _nb
from .linear import _set_blas_threads

F32 = np.float32
I32 = np.int32
I64 = np.int64
U64 = np.uint64
SMALL_T = _nb.SMALL_T  # the numba backend's switch from integer kernels to float tiles + BLAS
FUSED = (GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.Q8_0, GGMLType.Q5_0)

# every float16 bit pattern -> float32 (exact), indexed by the little-endian u16
_F16 = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(F32)


def tile_rows(k: int) -> int:
    """Rows per BLAS call on the prefill path (~1 MB of float32), as the numba backend's matmul
    cuts them. Row chunks of a matrix that start at multiples of it give bit-identical products."""
    return max(16, _nb._TILE_BYTES // (4 * k) // 16 * 16)


def quantize_x(x: np.ndarray, bs: int):
    """x (T, K) -> int16 (T * K,), scales (T, K // bs), float sums (T, K // bs): the numba
    backend's rounding (its `quantize_x`) with blocks of `bs`."""
    t_n, k = x.shape
    xq = np.empty(t_n * k, np.int16)
    xd = np.empty((t_n, k // bs), F32)
    xs = np.empty((t_n, k // bs), F32)
    _nb.quantize_x(x, bs, xq, xd, xs)
    return xq, xd, xs


# activation blocks: K-quants round x per 256-element super-block (one float scale a super-block,
# integer sums inside it: 16 float operations fewer per 256 weights for Q6_K, 1.4x faster), the
# others per their 32-element block; int sums of xq per SUM_BLOCK elements serve the offsets
X_BLOCK = {GGMLType.Q4_K: 256, GGMLType.Q6_K: 256, GGMLType.Q8_0: 32, GGMLType.Q5_0: 32}
SUM_BLOCK = {GGMLType.Q4_K: 32, GGMLType.Q6_K: 16, GGMLType.Q8_0: 32, GGMLType.Q5_0: 32}


# ---- decode kernels: one output row per iteration ----------------------------------------------
# Indices are unsigned so numba emits no negative-index wraparound (which blocks vectorisation).
# Integer sums are cast back to int32 as they go: numba widens int32 arithmetic to int64, and the
# truncation lets LLVM keep 16 int32 lanes and use vpmaddwd / vpdpwssd (1.7-2.2x the int64 loop).
# Float operations in a fixed order, no fastmath (no reassociation, no FMA): tests/test_offload.py
# checks the bits against a numpy transcription.

@njit(cache=True, inline="always")
def _h(raw, p, f16):  # the f16 at byte p -> f32
    return f16[U64(raw[p]) | (U64(raw[p + U64(1)]) << U64(8))]


@njit(cache=True, inline="always")
def _q4k_scale_min(raw, s, j):
    """The 6-bit scale and min of sub-block j (0..7) from the 12 bytes at s."""
    if j < 4:
        return I32(raw[s + U64(j)] & 63), I32(raw[s + U64(j + 4)] & 63)
    a = U64(j - 4)
    sc = I32((raw[s + U64(8) + a] & 15) | ((raw[s + a] >> 6) << 4))
    m = I32((raw[s + U64(8) + a] >> 4) | ((raw[s + U64(4) + a] >> 6) << 4))
    return sc, m


@njit(cache=True, nogil=True)
def _mv_q4_k(raw, r0, r1, xq, xd, xs, xqs, f16, out):
    """Rows [r0, r1) of raw (N * RB,) u8; xq (T * K,) i16 and xd (T, K/256) (one scale per
    super-block), xqs (T, K/32) int32 sums of xq -> out (T, N)."""
    t_n = xd.shape[0]
    k = xq.shape[0] // t_n
    nb = k // 256
    rb = U64(nb * 144)
    xq1 = xq
    for r in range(r0, r1):
        for t in range(t_n):
            c = F32(0.0)
            for b in range(nb):
                p = U64(r) * rb + U64(b * 144)
                s = p + U64(4)
                sumi = I64(0)  # sum_j sc_j * (q_j . xq_j): up to 2^35, exact
                summ = I64(0)  # sum_j m_j * sum(xq_j)
                for j in range(4):  # chunk j: sub-block 2j in the low nibbles, 2j+1 in the high
                    q = p + U64(16 + 32 * j)
                    xa = U64(t * k + b * 256 + 64 * j)
                    lo = I32(0)
                    hi = I32(0)
                    for l in range(32):
                        v = I32(raw[q + U64(l)])
                        lo = I32(lo + I32(I32(v & I32(15)) * I32(xq1[xa + U64(l)])))
                        hi = I32(hi + I32(I32(v >> I32(4)) * I32(xq1[xa + U64(32 + l)])))
                    sc0, m0 = _q4k_scale_min(raw, s, 2 * j)
                    sc1, m1 = _q4k_scale_min(raw, s, 2 * j + 1)
                    g = b * 8 + 2 * j
                    sumi += I64(sc0) * I64(lo) + I64(sc1) * I64(hi)
                    summ += I64(m0) * I64(xqs[t, g]) + I64(m1) * I64(xqs[t, g + 1])
                c += xd[t, b] * (_h(raw, p, f16) * F32(sumi) - _h(raw, p + U64(2), f16) * F32(summ))
            out[t, r] = c


@njit(cache=True, nogil=True)
def _mv_q6_k(raw, r0, r1, xq, xd, xs, xqs, f16, out):
    """Rows [r0, r1) of raw (N * RB,) u8; xq (T * K,) i16 and xd (T, K/256) (one scale per
    super-block), xqs (T, K/16) int32 sums of xq -> out (T, N)."""
    t_n = xd.shape[0]
    k = xq.shape[0] // t_n
    nb = k // 256
    rb = U64(nb * 210)
    xq1 = xq
    for r in range(r0, r1):
        for t in range(t_n):
            c = F32(0.0)
            for b in range(nb):
                p = U64(r) * rb + U64(b * 210)
                sumi = I64(0)  # sum_i sc_i * ((q6 - 32)_i . xq_i), exact
                for h in range(2):  # halves of 128 elements: sub-blocks of 16, 8 per half
                    ql = p + U64(64 * h)
                    qh = p + U64(128 + 32 * h)
                    sc = p + U64(192 + 8 * h)
                    xa = U64(t * k + b * 256 + 128 * h)
                    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = I32(0)  # a_i: sub-block i of the half
                    for l in range(16):
                        u = U64(l)
                        lq = I32(raw[ql + u])
                        lq2 = I32(raw[ql + U64(32) + u])
                        hq = I32(raw[qh + u])
                        a0 = I32(a0 + I32(I32(I32(lq & I32(15)) | I32(I32(hq & I32(3)) << I32(4))) * I32(xq1[xa + u])))
                        a2 = I32(a2 + I32(I32(I32(lq2 & I32(15)) | I32(I32(hq & I32(12)) << I32(2))) * I32(xq1[xa + U64(32) + u])))
                        a4 = I32(a4 + I32(I32(I32(lq >> I32(4)) | I32(hq & I32(48))) * I32(xq1[xa + U64(64) + u])))
                        a6 = I32(a6 + I32(I32(I32(lq2 >> I32(4)) | I32(I32(hq & I32(192)) >> I32(2))) * I32(xq1[xa + U64(96) + u])))
                    for l in range(16, 32):
                        u = U64(l)
                        lq = I32(raw[ql + u])
                        lq2 = I32(raw[ql + U64(32) + u])
                        hq = I32(raw[qh + u])
                        a1 = I32(a1 + I32(I32(I32(lq & I32(15)) | I32(I32(hq & I32(3)) << I32(4))) * I32(xq1[xa + u])))
                        a3 = I32(a3 + I32(I32(I32(lq2 & I32(15)) | I32(I32(hq & I32(12)) << I32(2))) * I32(xq1[xa + U64(32) + u])))
                        a5 = I32(a5 + I32(I32(I32(lq >> I32(4)) | I32(hq & I32(48))) * I32(xq1[xa + U64(64) + u])))
                        a7 = I32(a7 + I32(I32(I32(lq2 >> I32(4)) | I32(I32(hq & I32(192)) >> I32(2))) * I32(xq1[xa + U64(96) + u])))
                    g = b * 16 + 8 * h  # q6 - 32: minus 32 * (the sub-block's sum of xq)
                    sumi += I64(np.int8(raw[sc])) * I64(a0 - 32 * xqs[t, g]) \
                        + I64(np.int8(raw[sc + U64(1)])) * I64(a1 - 32 * xqs[t, g + 1]) \
                        + I64(np.int8(raw[sc + U64(2)])) * I64(a2 - 32 * xqs[t, g + 2]) \
                        + I64(np.int8(raw[sc + U64(3)])) * I64(a3 - 32 * xqs[t, g + 3]) \
                        + I64(np.int8(raw[sc + U64(4)])) * I64(a4 - 32 * xqs[t, g + 4]) \
                        + I64(np.int8(raw[sc + U64(5)])) * I64(a5 - 32 * xqs[t, g + 5]) \
                        + I64(np.int8(raw[sc + U64(6)])) * I64(a6 - 32 * xqs[t, g + 6]) \
                        + I64(np.int8(raw[sc + U64(7)])) * I64(a7 - 32 * xqs[t, g + 7])
                c += (_h(raw, p + U64(208), f16) * xd[t, b]) * F32(sumi)
            out[t, r] = c


@njit(cache=True, nogil=True)
def _mv_q8_0(raw, r0, r1, xq, xd, xs, xqs, f16, out):
    """Rows [r0, r1) of raw (N * RB,) u8; xq (T * K,) i16, xd (T, K/32) -> out (T, N)."""
    t_n = xd.shape[0]
    k = xq.shape[0] // t_n
    nb = k // 32
    rb = U64(nb * 34)
    xq1 = xq
    for r in range(r0, r1):
        for t in range(t_n):
            c = F32(0.0)
            for b in range(nb):
                p = U64(r) * rb + U64(b * 34)
                xa = U64(t * k + b * 32)
                a = I32(0)
                for l in range(32):
                    a = I32(a + I32(I32(np.int8(raw[p + U64(2 + l)])) * I32(xq1[xa + U64(l)])))
                c += _h(raw, p, f16) * (xd[t, b] * F32(a))
            out[t, r] = c


@njit(cache=True, nogil=True)
def _mv_q5_0(raw, r0, r1, xq, xd, xs, xqs, f16, out):
    """Rows [r0, r1) of raw (N * RB,) u8; xq (T * K,) i16, xd (T, K/32) -> out (T, N)."""
    t_n = xd.shape[0]
    k = xq.shape[0] // t_n
    nb = k // 32
    rb = U64(nb * 22)
    xq1 = xq
    for r in range(r0, r1):
        for t in range(t_n):
            c = F32(0.0)
            for b in range(nb):
                p = U64(r) * rb + U64(b * 22)
                qh = I32(I32(raw[p + U64(2)]) | I32(I32(raw[p + U64(3)]) << I32(8))
                         | I32(I32(raw[p + U64(4)]) << I32(16)) | I32(I32(raw[p + U64(5)]) << I32(24)))
                xa = U64(t * k + b * 32)
                a = I32(0)
                for l in range(16):  # q in 0..31 here; the -16 comes below, exactly
                    v = I32(raw[p + U64(6 + l)])
                    lo = I32(I32(v & I32(15)) | I32(I32(I32(qh >> I32(l)) & I32(1)) << I32(4)))
                    hi = I32(I32(v >> I32(4)) | I32(I32(I32(qh >> I32(l + 16)) & I32(1)) << I32(4)))
                    a = I32(a + I32(lo * I32(xq1[xa + U64(l)])) + I32(hi * I32(xq1[xa + U64(l + 16)])))
                a = I32(a - I32(16 * xqs[t, b]))
                c += _h(raw, p, f16) * (xd[t, b] * F32(a))
            out[t, r] = c


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


_MV = {GGMLType.Q4_K: _mv_q4_k, GGMLType.Q6_K: _mv_q6_k, GGMLType.Q8_0: _mv_q8_0, GGMLType.Q5_0: _mv_q5_0}
_DQ = {GGMLType.Q4_K: _dq_q4_k, GGMLType.Q6_K: _dq_q6_k, GGMLType.Q8_0: _dq_q8_0, GGMLType.Q5_0: _dq_q5_0}


# ---- the public functions -----------------------------------------------------------------------
# Parallelism is a small pool of Python threads running the serial, GIL-free kernels above on
# disjoint row ranges, with single-threaded BLAS: no spinning OpenMP or BLAS threads, which on a
# shared 2-core machine cost more than they give (measured: a 2-thread BLAS call at T=64 was
# 3-100x slower than a 1-thread one while other processes ran).

_state = {"threads": 1, "pool": None}


def set_threads(n: int) -> None:
    """Threads for the products (the calling thread is one of them); BLAS is set to 1 thread."""
    if n < 1:
        raise ValueError(f"threads must be >= 1, not {n}")
    if n != _state["threads"] and _state["pool"] is not None:
        _state["pool"].shutdown()
        _state["pool"] = None
    _state["threads"] = int(n)
    _set_blas_threads(1)


def describe() -> str:
    return (f"gguf: products straight from GGUF blocks (int16 activations for T<={SMALL_T}, float tiles + "
            f"BLAS above), no packing; {_state['threads']} threads")


def _run(job, n_items: int) -> None:
    """Call job(i, scratch) for i in range(n_items) on this thread and the pool's: each thread pulls
    the next item when it finishes one, so a thread the OS preempts (other processes on a small
    machine) delays only its own item, not a fixed half of the work. `scratch` is a per-thread
    dict for buffers."""
    nt = min(_state["threads"], n_items)
    if nt <= 1:
        scratch: dict = {}
        for i in range(n_items):
            job(i, scratch)
        return
    if _state["pool"] is None:
        from concurrent.futures import ThreadPoolExecutor
        _state["pool"] = ThreadPoolExecutor(_state["threads"] - 1, thread_name_prefix="edgellm-gguf")
    items = iter(range(n_items))  # next() on a range iterator is atomic under the GIL

    def loop():
        scratch: dict = {}
        for i in items:
            job(i, scratch)

    futs = [_state["pool"].submit(loop) for _ in range(nt - 1)]
    loop()
    for f in futs:
        f.result()


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


def matmul(raw: np.ndarray, ggml_type: GGMLType, k: int, x: np.ndarray) -> np.ndarray:
    """x float32 (T, K) @ W.T -> (T, N), W given as GGUF rows raw uint8 (N, row_bytes)."""
    t = GGMLType(ggml_type)
    x = np.ascontiguousarray(x, dtype=F32)
    n = raw.shape[0]
    if x.ndim != 2 or x.shape[1] != k:
        raise ValueError(f"matmul: x has shape {x.shape}, expected (T, {k})")
    if t not in _MV:  # F32, F16, others: one float32 matrix and one BLAS call, as linear.py does
        return x @ dequantize_rows(raw, t, k).T
    flat = _flat(raw)
    if x.shape[0] <= SMALL_T:  # int16 activations; rows in ~4 pieces per thread
        xq, xd, xs = quantize_x(x, X_BLOCK[t])
        xqs = xq.reshape(x.shape[0], -1, SUM_BLOCK[t]).sum(axis=2, dtype=I32)  # (T, K / sub) int sums
        out = np.empty((x.shape[0], n), F32)
        kern = _MV[t]
        pieces = max(1, min(4 * _state["threads"], n // 256))
        cuts = [n * i // pieces for i in range(pieces + 1)]
        _run(lambda i, _: kern(flat, cuts[i], cuts[i + 1], xq, xd, xs, xqs, _F16, out), pieces)
        return out
    tile = tile_rows(k)  # float32 tiles + 1-thread BLAS, one tile per item
    out = np.empty((x.shape[0], n), F32)

    def work(i, scratch):
        buf = scratch.get("buf")
        if buf is None:
            buf = scratch["buf"] = np.empty((tile, k), F32)
        r0 = i * tile
        r1 = min(n, r0 + tile)
        w = dequantize_rows(raw, t, k, r0, r1, out=buf)
        np.matmul(x, w.T, out=out[:, r0:r1])

    _run(work, -(-n // tile))
    return out
