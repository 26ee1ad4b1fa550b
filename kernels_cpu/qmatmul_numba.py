"""Numba kernels for quantized products, on the split fields of `qmatmul_ref` kept row by row.

Layout (`pack`), one row of W after another, each scale block's quants contiguous:

| type | q                                        | qh                  | bytes a weight (GGUF) |
|------|------------------------------------------|---------------------|-----------------------|
| Q8_0 | int8 (N, K)                              | -                   | 1.125 (1.0625)        |
| Q6_K | int8 (N, K), blocks of 16                | -                   | 1.25  (0.82)          |
| Q4_K | uint8 (N, K // 2): byte i of a block of  | -                   | 0.75  (0.5625)        |
|      | 32 holds elements i (low) and 16 + i     |                     |                       |
| Q5_0 | as Q4_K, the low 4 bits of q + 16        | uint32 (N, nb): bit | 0.75  (0.6875)        |
|      |                                          | i = bit 4 of q + 16 |                       |

plus float32 scales (N, nb) and, for Q4_K, mins (N, nb).

Decode-sized products (T <= SMALL_T tokens) quantize the activations to int16 per scale block
(llama.cpp uses int8), so each block's dot product is an exact int32 sum (|q| <= 128,
|xq| <= 32767, 32 terms: < 2^28) and the rounding of x is 256x finer than int8's, which makes
these products as accurate as float32 ones:

    y[t, n] = sum_b scale[n, b] * (xd[t, b] * (q[n, b, :] . xq[t, b, :]))  -  sum_b mins[n, b] * xsum[t, b]

where xsum is the float sum of x over the block, so the offsets add no rounding of their own.
The block dot products are written as LLVM vector IR (`_dot`: widen, multiply, add-reduce), which
x86 lowers to vpmovsxbw + vpmaddwd on zmm registers (AVX-512) and other targets to their own
widening multiply-adds. Each output is summed block by block in a fixed order, one row per
iteration: results do not depend on the thread count, nor on which other rows are computed.
Larger batches dequantize ~1 MB of rows at a time to float32 and leave the product to BLAS.
No fastmath anywhere.
"""
from __future__ import annotations

from types import FunctionType
from typing import NamedTuple

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange
from numba.core import cgutils, types
from numba.extending import intrinsic

from ..quant.ggml_types import GGMLType
from .qmatmul_ref import SPLIT_BLOCK, SPLIT_MINS, split

F32 = np.float32
I32 = np.int32
SMALL_T = 8  # token counts up to this use the integer kernel; larger ones BLAS on dequantized tiles
XQ_MAX = 32767  # activations are rounded to int16: x = xd * xq, |xq| <= XQ_MAX
_TILE_BYTES = 1 << 20  # float32 bytes of dequantized rows per BLAS call (about one L2)
_PARALLEL_MIN = 1 << 19  # weights below which a product runs on the calling thread (launch ~10 us)

# how a row's quants are stored (Packed.kind)
INT8, NIB4, NIB5 = 0, 1, 2
_KIND = {GGMLType.Q8_0: INT8, GGMLType.Q6_K: INT8, GGMLType.Q4_K: NIB4, GGMLType.Q5_0: NIB5}


# ---- block dot products in LLVM vector IR -------------------------------------------------------

def _vec(bits: int, n: int) -> ir.VectorType:
    return ir.VectorType(ir.IntType(bits), n)


def _nibbles(builder, packed):
    """<16 x i8> packed bytes -> <32 x i8>: the 16 low nibbles, then the 16 high ones."""
    lo = builder.and_(packed, ir.Constant(_vec(8, 16), [15] * 16))
    hi = builder.lshr(packed, ir.Constant(_vec(8, 16), [4] * 16))
    return builder.shuffle_vector(lo, hi, ir.Constant(_vec(32, 32), list(range(32))))


INT8_32, INT8_16 = 3, 4  # _row_dot modes besides NIB4 and NIB5: int8 quants in blocks of 32 / 16


def _ptr(builder, context, arrty, arr, off, ty):
    """Pointer to element `off` of 1-D C array `arr`, as a pointer to `ty`."""
    a = context.make_array(arrty)(context, builder, arr)
    return builder.bitcast(builder.gep(a.data, [off]), ty.as_pointer())


def _block_weights(builder, mode, qp, hp, i):
    """The i-th 32 quants of a row as <32 x i8>: int8 as stored, or unpacked nibbles."""
    if mode in (INT8_32, INT8_16):
        return builder.load(builder.gep(qp, [i]), align=1)
    w = _nibbles(builder, builder.load(builder.gep(qp, [i]), align=1))
    if mode == NIB5:  # or in bit 4 from qh, subtract 16
        bits = builder.bitcast(builder.load(builder.gep(hp, [i]), align=4), _vec(1, 32))
        hi = builder.shl(builder.zext(bits, _vec(8, 32)), ir.Constant(_vec(8, 32), [4] * 32))
        w = builder.sub(builder.or_(w, hi), ir.Constant(_vec(8, 32), [16] * 32))
    return w


def _pair_sums(builder, w, x):
    """<32 x i8> w, <32 x i16> x -> <16 x i32> w[2j] x[2j] + w[2j+1] x[2j+1]: vpmaddwd's pattern."""
    even = ir.Constant(_vec(32, 16), list(range(0, 32, 2)))
    odd = ir.Constant(_vec(32, 16), list(range(1, 32, 2)))
    v32 = _vec(32, 16)

    def prod(idx):
        we = builder.sext(builder.shuffle_vector(w, ir.Constant(w.type, None), idx), v32)
        xe = builder.sext(builder.shuffle_vector(x, ir.Constant(x.type, None), idx), v32)
        return builder.mul(we, xe)
    return builder.add(prod(even), prod(odd))


def _splat(builder, v, n):
    vec = builder.insert_element(ir.Constant(ir.VectorType(v.type, n), None), v, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(vec, vec, ir.Constant(_vec(32, n), [0] * n))


@intrinsic
def _row_dot(typingctx, q, qoff, qh, hoff, st, soff, xq, xoff, xd, doff, nblocks, mode):
    """float32 sum over the scale blocks b < nblocks of a row of
    st[soff + b] * xd[doff + b] * (quants of block b . xq[xoff + bs*b : ...]).

    Quants from q at element qoff (int8, or packed nibbles for NIB4/NIB5 with qh[hoff + b] the
    fifth bits), mode a literal: INT8_32, INT8_16 (blocks of 16), NIB4, NIB5. The integer sums run
    32 elements at a time into 16 pair sums (vpmaddwd; each < 2^23, so exact in float32), which are
    scaled and accumulated in 16 float32 lanes, then summed in a fixed tree: no horizontal sum per
    block, and the same result for any thread count."""
    if not isinstance(mode, types.IntegerLiteral):
        return None
    m = mode.literal_value

    def codegen(context, builder, sig, args):
        q_, qoff_, qh_, hoff_, st_, soff_, xq_, xoff_, xd_, doff_, nb_, _ = args
        f32, i64 = ir.FloatType(), ir.IntType(64)
        qp = _ptr(builder, context, sig.args[0], q_, qoff_, _vec(8, 16 if m in (NIB4, NIB5) else 32))
        hp = _ptr(builder, context, sig.args[2], qh_, hoff_, ir.IntType(32)) if m == NIB5 else None
        sp = _ptr(builder, context, sig.args[4], st_, soff_, f32)
        xp = _ptr(builder, context, sig.args[6], xq_, xoff_, _vec(16, 32))
        dp = _ptr(builder, context, sig.args[8], xd_, doff_, f32)
        acc = cgutils.alloca_once_value(builder, ir.Constant(ir.VectorType(f32, 16), [0.0] * 16))
        steps = builder.sdiv(nb_, ir.Constant(i64, 2)) if m == INT8_16 else nb_
        with cgutils.for_range(builder, steps) as loop:
            i = loop.index
            p = builder.sitofp(_pair_sums(builder, _block_weights(builder, m, qp, hp, i),
                                          builder.load(builder.gep(xp, [i]), align=2)), ir.VectorType(f32, 16))
            if m == INT8_16:  # lanes 0..7 from block 2i, 8..15 from block 2i + 1
                b0 = builder.mul(i, ir.Constant(i64, 2))
                b1 = builder.add(b0, ir.Constant(i64, 1))
                s0 = builder.fmul(builder.load(builder.gep(sp, [b0])), builder.load(builder.gep(dp, [b0])))
                s1 = builder.fmul(builder.load(builder.gep(sp, [b1])), builder.load(builder.gep(dp, [b1])))
                scale = builder.shuffle_vector(_splat(builder, s0, 8), _splat(builder, s1, 8),
                                               ir.Constant(_vec(32, 16), list(range(16))))
            else:
                scale = _splat(builder, builder.fmul(builder.load(builder.gep(sp, [i])),
                                                     builder.load(builder.gep(dp, [i]))), 16)
            builder.store(builder.fadd(builder.load(acc), builder.fmul(p, scale)), acc)
        v = builder.load(acc)
        for n in (8, 4, 2, 1):  # fixed-order tree: halves added lane by lane
            lo = builder.shuffle_vector(v, v, ir.Constant(_vec(32, n), list(range(n))))
            hi = builder.shuffle_vector(v, v, ir.Constant(_vec(32, n), list(range(n, 2 * n))))
            v = builder.fadd(lo, hi)
        return builder.extract_element(v, ir.Constant(ir.IntType(32), 0))
    return types.float32(q, qoff, qh, hoff, st, soff, xq, xoff, xd, doff, nblocks, mode), codegen


# ---- kernels ------------------------------------------------------------------------------------

@njit(cache=True)
def quantize_x(x, bs, xq, xd, xsum):  # x (T, K) f32 -> xq (T*K,) i16, xd (T, nb) f32, xsum (T, nb) f32
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
                xq[t * k + b * bs + i] = np.int16(np.rint(x[t, b * bs + i] * inv))
            xd[t, b] = d
            xsum[t, b] = s


def _rows(kind, q1, qh, st, mt, has_mins, xq, xd, xsum, rows, out):
    """out[t, i] = row rows[i] (i itself when rows is empty) of W times x[t].
    q1 the quants of all rows, flat (int8 N*K or uint8 N*K/2); qh uint32 (N, nb) (Q5_0) or (1, 1);
    st/mt (N, nb) f32 (mt ignored unless has_mins); xq (T*K,) i16; xd/xsum (T, nb) f32;
    rows (R,) i64; out (T, R) f32."""
    t_n, nb = xd.shape
    k = xq.shape[0] // t_n
    bs = k // nb
    every = rows.shape[0] == 0
    qh1 = qh.reshape(-1)
    st1 = st.reshape(-1)
    xd1 = xd.reshape(-1)
    for i in prange(out.shape[1]):
        r = np.int64(i) if every else rows[i]
        for t in range(t_n):
            if kind == NIB5:
                c = _row_dot(q1, r * k // 2, qh1, r * nb, st1, r * nb, xq, t * k, xd1, t * nb, nb, NIB5)
            elif kind == NIB4:
                c = _row_dot(q1, r * k // 2, qh1, 0, st1, r * nb, xq, t * k, xd1, t * nb, nb, NIB4)
            elif bs == 32:
                c = _row_dot(q1, r * k, qh1, 0, st1, r * nb, xq, t * k, xd1, t * nb, nb, INT8_32)
            else:
                c = _row_dot(q1, r * k, qh1, 0, st1, r * nb, xq, t * k, xd1, t * nb, nb, INT8_16)
            if has_mins:
                for b in range(nb):
                    c -= mt[r, b] * xsum[t, b]
            out[t, i] = c


def _renamed(f, name: str):
    """A copy of function f under another name: numba's cache files are named by the function, so
    a serial and a parallel compilation of one function would overwrite each other's."""
    g = FunctionType(f.__code__, f.__globals__, name, f.__defaults__, f.__closure__)
    g.__qualname__ = name
    return g


_rows_serial = njit(cache=True)(_renamed(_rows, "_rows_serial"))
_rows_parallel = njit(cache=True, parallel=True)(_renamed(_rows, "_rows_parallel"))


@njit(cache=True)
def dequantize(kind, q, qh, st, mt, has_mins, r0, out):
    """Rows [r0, r0 + R) -> out float32 (R, K), the GGUF values (scale * q - mins, as the reference).
    Serial on purpose: it feeds multithreaded BLAS, and numba's OpenMP workers spinning after a
    parallel region starved OpenBLAS's threads (2 threads ran 10x slower than 1)."""
    k = out.shape[1]
    nb = st.shape[1]
    bs = k // nb
    for i in range(out.shape[0]):
        r = r0 + i
        for b in range(nb):
            s = st[r, b]
            m = mt[r, b] if has_mins else F32(0.0)
            o = b * bs
            if kind == INT8:
                for j in range(bs):
                    out[i, o + j] = s * F32(np.int8(q[r, o + j])) - m
            else:
                h = np.uint32(qh[r, b]) if kind == NIB5 else np.uint32(0)
                sub = 16 if kind == NIB5 else 0
                for j in range(16):
                    byte = np.int32(q[r, o // 2 + j])
                    lo = (byte & 15) | np.int32(((h >> np.uint32(j)) & np.uint32(1)) << np.uint32(4))
                    hi = (byte >> 4) | np.int32(((h >> np.uint32(j + 16)) & np.uint32(1)) << np.uint32(4))
                    out[i, o + j] = s * F32(lo - sub) - m
                    out[i, o + 16 + j] = s * F32(hi - sub) - m


# ---- packing and products -----------------------------------------------------------------------

class Packed(NamedTuple):
    """A packed weight: rows of quants (see the module's table), scales and mins per block."""

    kind: int  # INT8 | NIB4 | NIB5
    q: np.ndarray  # int8 (N, K) | uint8 (N, K // 2)
    qh: np.ndarray  # uint32 (N, nb): Q5_0's fifth bits; (1, 1) zeros otherwise
    st: np.ndarray  # float32 (N, nb)
    mt: np.ndarray  # float32 (N, nb); st itself when the type has no mins
    has_mins: bool
    n: int  # rows
    k: int  # columns
    bs: int  # elements per scale block

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.qh.nbytes + self.st.nbytes + (self.mt.nbytes if self.has_mins else 0)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """int8 (R, K) in 0..15 -> uint8 (R, K // 2): per block of 32, byte i = q[i] | q[16 + i] << 4."""
    b = q.reshape(q.shape[0], -1, 2, 16).astype(np.uint8)
    return (b[:, :, 0] | (b[:, :, 1] << 4)).reshape(q.shape[0], -1)


def pack(rows: np.ndarray, t: GGMLType, k: int) -> Packed:
    """GGUF rows uint8 (N, row_bytes) of a type in SPLIT_BLOCK -> Packed, decoded 4096 rows at a time."""
    n = rows.shape[0]
    bs, has_mins, kind = SPLIT_BLOCK[t], t in SPLIT_MINS, _KIND[t]
    nb = k // bs
    q = np.empty((n, k) if kind == INT8 else (n, k // 2), np.int8 if kind == INT8 else np.uint8)
    qh = np.zeros((n, nb) if kind == NIB5 else (1, 1), np.uint32)
    st = np.empty((n, nb), F32)
    mt = np.empty((n, nb), F32) if has_mins else st
    for n0 in range(0, n, 4096):
        s = split(rows[n0:n0 + 4096], t, k)
        n1 = n0 + s.q.shape[0]
        st[n0:n1] = s.scale
        if has_mins:
            mt[n0:n1] = s.mins
        if kind == INT8:
            q[n0:n1] = s.q
        elif kind == NIB4:
            q[n0:n1] = _pack_nibbles(s.q)
        else:  # Q5_0: q + 16 in 0..31, low four bits packed, bit 4 in qh
            u = (s.q + np.int8(16)).view(np.uint8)
            q[n0:n1] = _pack_nibbles(u & 15)
            bits = (u >> 4).reshape(n1 - n0, nb, 32)
            qh[n0:n1] = np.packbits(bits, axis=2, bitorder="little").view("<u4")[:, :, 0]
    return Packed(kind, q, qh, st, mt, has_mins, n, k, bs)


_ALL = np.empty(0, np.int64)


def _products(w: Packed, x: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """x (T, K) -> (T, R) the given rows (all of them when rows is empty), int16 activations."""
    t_n, k = x.shape
    nb = k // w.bs
    xq = np.empty(t_n * k, np.int16)
    xd = np.empty((t_n, nb), F32)
    xsum = np.empty((t_n, nb), F32)
    quantize_x(x, w.bs, xq, xd, xsum)
    r = rows.shape[0] or w.n
    out = np.empty((t_n, r), F32)
    kernel = _rows_parallel if r * k >= _PARALLEL_MIN and numba.get_num_threads() > 1 else _rows_serial
    kernel(w.kind, w.q.reshape(-1), w.qh, w.st, w.mt, w.has_mins, xq, xd, xsum, rows, out)
    return out


def matmul(w: Packed, x: np.ndarray) -> np.ndarray:
    """x float32 (T, K) -> x @ W.T (T, N): integer kernel up to SMALL_T tokens, else float tiles + BLAS."""
    if x.shape[0] <= SMALL_T:
        return _products(w, x, _ALL)
    out = np.empty((x.shape[0], w.n), F32)
    per = max(16, _TILE_BYTES // (4 * w.k) // 16 * 16)  # rows per BLAS call
    buf = np.empty((min(per, w.n), w.k), F32)
    for r0 in range(0, w.n, per):
        r1 = min(w.n, r0 + per)
        wt = buf[:r1 - r0]
        dequantize(w.kind, w.q, w.qh, w.st, w.mt, w.has_mins, r0, wt)
        np.matmul(x, wt.T, out=out[:, r0:r1])
    return out


def matvec_rows(w: Packed, x: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """x float32 (K,), rows int64 (R,) -> (W @ x)[rows]."""
    if rows.shape[0] == 0:
        return np.empty(0, F32)
    return _products(w, x[None, :], rows)[0]


def set_threads(n: int) -> None:
    numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))
