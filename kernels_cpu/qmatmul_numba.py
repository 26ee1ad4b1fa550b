"""Numba kernels for quantized products, on the split fields of `qmatmul_ref` laid out in tiles.

Layout (`pack_tiles`): rows in tiles of LANES, element k of a tile's rows contiguous, so the inner
loop runs across rows with one accumulator per row (no horizontal sums, no float reassociation):
    qt int8 (NT, K, LANES), st / mt float32 (NT, nb, LANES)  (scale, mins)

Decode-sized products (few tokens) quantize the activations to int16 per scale block (llama.cpp
uses int8), so the block dot products are exact int32 sums (|q| <= 128, |xq| <= 32767, 32 terms:
< 2^28) and the rounding of x is 256x finer than int8's, which makes these products as accurate
as float32 ones at the same speed (the kernel widens both operands to int32 either way):

    y[t, n] = sum_b scale[n, b] * xd[t, b] * (q[n, b, :] . xq[t, b, :])  -  sum_b mins[n, b] * xsum[t, b]

where xsum is the float sum of x over the block, so the offsets add no rounding of their own.
Larger batches dequantize a few tiles at a time to float32 and leave the product to BLAS.
No fastmath anywhere: results do not depend on the thread count or the vector width.
"""
from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np
from numba import njit, prange

from ..quant.ggml_types import GGMLType
from .qmatmul_ref import SPLIT_BLOCK, SPLIT_MINS, split

F32 = np.float32
I32 = np.int32
U64 = np.uint64
SMALL_T = 8  # token counts up to this use the integer kernel; larger ones BLAS on dequantized tiles
XQ_MAX = 32767  # activations are rounded to int16: x = xd * xq, |xq| <= XQ_MAX
_TILE_BYTES = 1 << 20  # float32 bytes of dequantized rows per BLAS call (about one L2)


@njit(cache=True)
def quantize_x(x, bs, xq, xd, xsum):  # x (T, K) f32 -> xq (T, K) i16, xd (T, nb) f32, xsum (T, nb) f32
    t_n, k = x.shape
    nb = k // bs
    for t in range(t_n):  # serial: O(T*K) work, far below a parallel launch's cost at T <= 8
        for b in range(nb):
            amax = F32(0.0)
            s = F32(0.0)
            for i in range(bs):
                v = x[t, b * bs + i]
                s += v
                amax = max(amax, abs(v))
            d = amax / F32(XQ_MAX)
            inv = F32(1.0) / d if d != 0 else F32(0.0)
            for i in range(bs):
                xq[t, b * bs + i] = np.int16(np.rint(x[t, b * bs + i] * inv))
            xd[t, b] = d
            xsum[t, b] = s


LANES = 8  # rows per tile: 8 int32 accumulators fill one AVX2 register


@njit(cache=True)
def _tile_dot(q1, s1, m1, has_mins, xq, xd, xsum, tt, t, out, o):
    """out[t, o + r] = row r of tile tt times token t, r < LANES. The accumulators are unrolled
    into scalars so LLVM's SLP vectorizer packs them into one register (an array of them would
    live in memory that LLVM cannot prove unaliased, and stay scalar; 16 lanes did not pack).
    Indices are unsigned: numba then emits no negative-index wraparound, which also blocks it."""
    k = xq.shape[1]
    nb = xd.shape[1]
    bs = k // nb
    c0 = c1 = c2 = c3 = c4 = c5 = c6 = c7 = F32(0.0)
    for b in range(nb):
        a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = I32(0)
        for kk in range(bs):
            xk = I32(xq[t, b * bs + kk])
            p = U64((tt * k + b * bs + kk) * 8)  # qt[tt, b*bs + kk, :]
            a0 += I32(q1[p + U64(0)]) * xk
            a1 += I32(q1[p + U64(1)]) * xk
            a2 += I32(q1[p + U64(2)]) * xk
            a3 += I32(q1[p + U64(3)]) * xk
            a4 += I32(q1[p + U64(4)]) * xk
            a5 += I32(q1[p + U64(5)]) * xk
            a6 += I32(q1[p + U64(6)]) * xk
            a7 += I32(q1[p + U64(7)]) * xk
        p = U64((tt * nb + b) * 8)  # st[tt, b, :]
        d = xd[t, b]
        c0 += s1[p + U64(0)] * (d * F32(a0))
        c1 += s1[p + U64(1)] * (d * F32(a1))
        c2 += s1[p + U64(2)] * (d * F32(a2))
        c3 += s1[p + U64(3)] * (d * F32(a3))
        c4 += s1[p + U64(4)] * (d * F32(a4))
        c5 += s1[p + U64(5)] * (d * F32(a5))
        c6 += s1[p + U64(6)] * (d * F32(a6))
        c7 += s1[p + U64(7)] * (d * F32(a7))
    if has_mins:
        for b in range(nb):
            p = U64((tt * nb + b) * 8)
            xs = xsum[t, b]
            c0 -= m1[p + U64(0)] * xs
            c1 -= m1[p + U64(1)] * xs
            c2 -= m1[p + U64(2)] * xs
            c3 -= m1[p + U64(3)] * xs
            c4 -= m1[p + U64(4)] * xs
            c5 -= m1[p + U64(5)] * xs
            c6 -= m1[p + U64(6)] * xs
            c7 -= m1[p + U64(7)] * xs
    out[t, o + 0] = c0
    out[t, o + 1] = c1
    out[t, o + 2] = c2
    out[t, o + 3] = c3
    out[t, o + 4] = c4
    out[t, o + 5] = c5
    out[t, o + 6] = c6
    out[t, o + 7] = c7


@njit(cache=True, parallel=True)
def matvec_tiles(qt, st, mt, has_mins, xq, xd, xsum, tiles, out):
    """out[t, i*LANES + r] = row (tiles[i]*LANES + r) of W times x[t].
    qt (NT, K, LANES) i8, st/mt (NT, nb, LANES) f32 (mt ignored unless has_mins),
    xq (T, K) i16, xd/xsum (T, nb) f32, tiles (M,) i64, out (T, M*LANES) f32."""
    q1 = qt.reshape(-1)
    s1 = st.reshape(-1)
    m1 = mt.reshape(-1)
    for i in prange(tiles.shape[0]):
        for t in range(xq.shape[0]):
            _tile_dot(q1, s1, m1, has_mins, xq, xd, xsum, tiles[i], t, out, i * LANES)


@njit(cache=True)
def dequantize_tiles(qt, st, mt, has_mins, tile0, out):
    """Rows of tiles [tile0, tile0 + out.shape[0] // LANES) -> out float32 (R, K), the GGUF values.
    Serial on purpose: it feeds multithreaded BLAS, and numba's OpenMP workers spinning after a
    parallel region starved OpenBLAS's threads (2 threads ran 10x slower than 1)."""
    k = qt.shape[1]
    nb = st.shape[1]
    bs = k // nb
    for i in range(out.shape[0] // LANES):
        tt = tile0 + i
        for b in range(nb):
            for r in range(LANES):
                s = st[tt, b, r]
                m = mt[tt, b, r] if has_mins else F32(0.0)
                for kk in range(b * bs, b * bs + bs):
                    out[i * LANES + r, kk] = s * F32(qt[tt, kk, r]) - m


def pack_tiles(n: int, k: int, bs: int, has_mins: bool, chunks):
    """Split fields, given as (n0, q (R, K) i8, scale (R, nb) f32, mins (R, nb) f32 | None) chunks
    whose n0 and R are multiples of LANES (R may end short at the last row), -> tiles of LANES
    rows, the rows zero-padded to a whole tile:
    qt (NT, K, LANES) i8, st and mt (NT, nb, LANES) f32 (mt is st when there are no mins)."""
    nt = -(-n // LANES)
    nb = k // bs
    qt = np.zeros((nt, k, LANES), np.int8)
    st = np.zeros((nt, nb, LANES), F32)
    mt = np.zeros((nt, nb, LANES), F32) if has_mins else st
    for n0, q, scale, mins in chunks:
        pad = -q.shape[0] % LANES
        t0, t1 = n0 // LANES, (n0 + q.shape[0] + pad) // LANES
        for dst, src in ((qt, q), (st, scale), (mt, mins)):
            if src is not None:
                src = np.pad(src, ((0, pad), (0, 0))) if pad else src
                dst[t0:t1] = src.reshape(t1 - t0, LANES, -1).transpose(0, 2, 1)
    return qt, st, mt


class Tiles(NamedTuple):
    """A packed weight: rows in tiles of LANES, the inner loop running across a tile's rows."""

    qt: np.ndarray  # int8 (NT, K, LANES)
    st: np.ndarray  # float32 (NT, nb, LANES)
    mt: np.ndarray  # float32 (NT, nb, LANES); st itself when the type has no mins
    has_mins: bool
    n: int  # rows before padding to whole tiles
    bs: int  # elements per scale block

    @property
    def nbytes(self) -> int:
        return self.qt.nbytes + self.st.nbytes + (self.mt.nbytes if self.has_mins else 0)


def pack(rows: np.ndarray, t: GGMLType, k: int) -> Tiles:
    """GGUF rows uint8 (N, row_bytes) of a type in SPLIT_BLOCK -> Tiles, decoded 4096 rows at a time."""
    n = rows.shape[0]
    bs, has_mins = SPLIT_BLOCK[t], t in SPLIT_MINS
    chunks = ((n0, *split(rows[n0:n0 + 4096], t, k)[:3]) for n0 in range(0, n, 4096))
    qt, st, mt = pack_tiles(n, k, bs, has_mins, chunks)
    return Tiles(qt, st, mt, has_mins, n, bs)


def _products(w: Tiles, x: np.ndarray, tiles: np.ndarray) -> np.ndarray:
    """x (T, K) -> the rows of the given tiles (T, len(tiles) * LANES), int16 activations."""
    t_n, k = x.shape
    nb = k // w.bs
    xq = np.empty((t_n, k), np.int16)
    xd = np.empty((t_n, nb), F32)
    xsum = np.empty((t_n, nb), F32)
    quantize_x(x, w.bs, xq, xd, xsum)
    out = np.empty((t_n, tiles.shape[0] * LANES), F32)
    matvec_tiles(w.qt, w.st, w.mt, w.has_mins, xq, xd, xsum, tiles, out)
    return out


def matmul(w: Tiles, x: np.ndarray) -> np.ndarray:
    """x float32 (T, K) -> x @ W.T (T, N): integer kernel up to SMALL_T tokens, else float tiles + BLAS."""
    nt, k = w.qt.shape[0], w.qt.shape[1]
    if x.shape[0] <= SMALL_T:
        return _products(w, x, np.arange(nt, dtype=np.int64))[:, :w.n]
    out = np.empty((x.shape[0], nt * LANES), F32)
    per = max(1, _TILE_BYTES // (4 * k * LANES))  # tiles per BLAS call
    buf = np.empty((min(per, nt) * LANES, k), F32)
    for t0 in range(0, nt, per):
        t1 = min(nt, t0 + per)
        wt = buf[:(t1 - t0) * LANES]
        dequantize_tiles(w.qt, w.st, w.mt, w.has_mins, t0, wt)
        np.matmul(x, wt.T, out=out[:, t0 * LANES:t1 * LANES])
    return out[:, :w.n]


def matvec_rows(w: Tiles, x: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """x float32 (K,), rows int64 (R,) -> (W @ x)[rows]: computes the tiles holding those rows."""
    tiles, where = np.unique(rows // LANES, return_inverse=True)
    y = _products(w, x[None, :], tiles)[0]
    return y[where * LANES + rows % LANES]


def set_threads(n: int) -> None:
    numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))
