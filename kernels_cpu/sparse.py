"""Activation-sparse FFN: gate dense, then only the active neurons' up rows and down columns.

For one FFN (SwiGLU / GeGLU) and a token x (the normalised hidden state):

    g = W_gate x                      dense, every neuron (GGUF rows, the int8 row kernels)
    a = act(g)                        silu or gelu_tanh
    active: |a_i| > thr               thr calibrated per layer (runtime/sparsity.py)
    h_i = a_i * (W_up[i] . x)         only for active i (GGUF rows, the same kernels)
    y = sum over active i of h_i * W_down[:, i]

The down product needs W_down by *column*: `DownT` holds it neuron-major, built once from the
file's Q4_K / Q6_K blocks with no requantization: every weight keeps its 4 or 6 bits and the
scales of its sub-block, so sparse and dense read the same values. A sub-block of Q4_K spans
32 neurons (16 for Q6_K) of one output row, so the scales are stored per (neuron group, row):

    w[n, i] = D[g, n] * q[i, n] - M[g, n]      g = i // G (G = 32 Q4_K, 16 Q6_K)
    y[n]   += D[g, n] * sum_i h_i q[i, n] - M[g, n] * sum_i h_i     (over the group's active i)

with D = d * sc, M = dmin * min for Q4_K and M = 32 D for Q6_K, all exact in float32. A group
with no active neuron is skipped, scales included.

The work is split into chunks of 256 neurons (a down super-block). A chunk's partial sums go to
their own row of `part` and are added in chunk order, so a token's result does not depend on the
threads, or on the other tokens of a batch (a token's up row and down columns depend on its own
mask only): teacher-forced scoring of a batch gives every token what sparse decode gives it.

The numba task here is compiled into qmatmul's task (one kernel per thread pool) with that
module's row kernel `_row`; `ffn_ref` is the numpy reference.
"""
from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

from ..quant.bits import f16_field, unpack_bits
from ..quant.formats_k import _scale_min_6bit
from ..quant.ggml_types import GGMLType
from . import simd
from .ops import _exp
from .ops_ref import GELU_COEF_A, SQRT_2_OVER_PI
from .threads import finish, take, voidptr

F32 = np.float32
CHUNK = 256  # neurons per work item (one super-block of a down row)
SILU, GELU_TANH = 0, 1
ACTS = {"silu": SILU, "gelu_tanh": GELU_TANH}
D_Q4_K, D_Q6_K = 0, 1
DOWN_TYPES = {GGMLType.Q4_K: D_Q4_K, GGMLType.Q6_K: D_Q6_K}


@dataclass(frozen=True)
class DownT:
    """A down matrix W (E, F) by input neuron, the same values as its GGUF rows.

    qn    uint8 (F, E / 2)    low 4 bits of q[i, n]: rows 32c + j (low nibble), 32c + j + 16 (high) at byte 16c + j
    qh    uint8 (F, E / 4)    Q6_K: high 2 bits of row 32c + r at byte 8c + r % 8, bits 2 (r // 8); (0, 0) for Q4_K
    sc    uint8 / int8 (F / G, E)   sub-block scale of neuron group g in row n (Q6_K: signed)
    mn    uint8 (F / 32, E)   Q4_K sub-block mins; (0, 0) for Q6_K
    d     f32 (F / 256, E)    super-block scale
    dmin  f32 (F / 256, E)    Q4_K super-block min scale; (0, 0) for Q6_K
    """

    code: int
    qn: np.ndarray
    qh: np.ndarray
    sc: np.ndarray
    mn: np.ndarray
    d: np.ndarray
    dmin: np.ndarray

    @property
    def f(self) -> int:
        return self.qn.shape[0]

    @property
    def e(self) -> int:
        return self.qn.shape[1] * 2

    @property
    def group(self) -> int:
        return 32 if self.code == D_Q4_K else 16

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays())

    def arrays(self) -> tuple[np.ndarray, ...]:
        return self.qn, self.qh, self.sc, self.mn, self.d, self.dmin

    def dequantize(self) -> np.ndarray:
        """float32 (E, F): the matrix (the reference; tests compare it with the GGUF rows)."""
        f, e, g = self.f, self.e, self.group
        low = unpack_bits(self.qn.reshape(f, e // 32, 16), 4).reshape(f, e)  # (F, E)
        q = low.astype(np.float32)
        if self.code == D_Q6_K:
            hi = unpack_bits(self.qh.reshape(f, e // 32, 8), 2).reshape(f, e)
            q = (low | (hi << 4)).astype(np.float32)
        d = np.repeat(self.d, 256 // g, axis=0)  # (F / G, E)
        dsc = d * self.sc.astype(np.float32)
        if self.code == D_Q4_K:
            m = np.repeat(self.dmin, 256 // g, axis=0) * self.mn.astype(np.float32)
        else:
            m = 32 * dsc
        return (np.repeat(dsc, g, axis=0) * q - np.repeat(m, g, axis=0)).T


def down_t(raw: np.ndarray, ggml_type: GGMLType, f: int) -> DownT:
    """A GGUF down matrix, raw uint8 (E, row_bytes) of F inputs each, -> DownT (no requantization)."""
    code = DOWN_TYPES.get(GGMLType(ggml_type))
    if code is None:
        raise ValueError(f"sparse FFN: a down matrix of type {GGMLType(ggml_type).name} (Q4_K and Q6_K are supported)")
    e = raw.shape[0]
    if f % 256 or e % 32:
        raise ValueError(f"sparse FFN: a down matrix of {e} x {f} (inputs a multiple of 256, outputs of 32)")
    nsb = f // 256
    blocks = np.ascontiguousarray(raw).reshape(e * nsb, -1)  # (E * nsb, block bytes)
    n = blocks.shape[0]
    if code == D_Q4_K:
        d, dmin = f16_field(blocks, 0), f16_field(blocks, 2)  # (E nsb, 1)
        sc, mn = _scale_min_6bit(blocks[:, 4:16])  # (E nsb, 8)
        q = unpack_bits(blocks[:, 16:144].reshape(n, 4, 32), 4).reshape(e, f)
        qh = np.zeros((0, 0), np.uint8)
        mn = np.ascontiguousarray(mn.reshape(e, f // 32).T)
        dmin = np.ascontiguousarray(dmin.reshape(e, nsb).T)
    else:
        low = unpack_bits(blocks[:, 0:128].reshape(n, 2, 64), 4).reshape(e, f)
        high = unpack_bits(blocks[:, 128:192].reshape(n, 2, 32), 2).reshape(e, f)
        sc = blocks[:, 192:208].view(np.int8)  # (E nsb, 16)
        d = f16_field(blocks, 208)
        q = low | (high << 4)
        qt = q.T.reshape(f, e // 32, 4, 8) >> 4  # row 32c + 8k + j: bits 2k of byte 8c + j
        qh = np.ascontiguousarray((qt[:, :, 0] | (qt[:, :, 1] << 2) | (qt[:, :, 2] << 4) | (qt[:, :, 3] << 6))
                                  .reshape(f, e // 4))
        mn = np.zeros((0, 0), np.uint8)
        dmin = np.zeros((0, 0), F32)
    groups = f // (32 if code == D_Q4_K else 16)
    qt = (q & 15).T.reshape(f, e // 32, 2, 16)  # (F, chunks of 32 rows, halves, 16)
    qn = np.ascontiguousarray((qt[:, :, 0] | (qt[:, :, 1] << 4)).reshape(f, e // 2))
    sc = np.ascontiguousarray(sc.reshape(e, groups).T)
    d = np.ascontiguousarray(d.reshape(e, nsb).T)
    return DownT(code, qn, qh, sc, mn, d, dmin)


# ---- the numpy reference -------------------------------------------------------------------------

def act_ref(g: np.ndarray, act: int) -> np.ndarray:
    g = g.astype(np.float64)
    if act == SILU:
        return g / (1 + np.exp(-g))
    return 0.5 * g * (1 + np.tanh(SQRT_2_OVER_PI * (g + GELU_COEF_A * g ** 3)))


def ffn_ref(x, w_gate, w_up, w_down, act: int, thr: float):
    """x (T, K), w_gate / w_up (F, K), w_down (E, F) float -> (y (T, E), mask (T, F)), float64."""
    x = x.astype(np.float64)
    a = act_ref(x @ w_gate.T.astype(np.float64), act)
    mask = np.abs(a) > thr
    h = np.where(mask, a * (x @ w_up.T.astype(np.float64)), 0.0)
    return h @ w_down.T.astype(np.float64), mask


# ---- the numba task (compiled into qmatmul's, which supplies _row) ------------------------------
# Its arguments: a descriptor sd (int64, SD_LEN) whose address is on the board.

(S_XQ, S_T, S_KP, S_XD, S_XS, S_X4, S_GRAW, S_GSIZE, S_GCODE, S_GRB, S_GNB, S_URAW, S_USIZE, S_UCODE, S_URB,
 S_UNB, S_DCODE, S_QN, S_QH, S_SC, S_MN, S_D, S_DMIN, S_E, S_F, S_THR, S_ACT, S_GBUF, S_UBUF, S_HBUF, S_PART,
 S_COUNT) = range(32)
SD_LEN = 32
# qmatmul's row kernels, given to the compiled copies of the functions below (jit.specialize)
_row = _rows = _rows_at = None


def _tok_rows(code, raw, r0, r1, rb, nb, xq, xd, xs, x4n, t_n, kp, out, ostride):
    """Rows r0 .. r1 - 1 one by one against every token, in the token groups the dense decode
    uses; row r's result for token t at out[t * ostride + r]. (Called per row: compiled inline,
    as is qmatmul's _row, since a call would cost as much as the row.)"""
    if t_n == 1:  # decode
        _rows(code, raw, r0, r1, rb, nb, xq, xd, xs, x4n, 0, kp, out, 0, ostride, 1, 1)
        return
    for r in range(r0, r1):
        t0 = 0
        while t0 < t_n:
            left = t_n - t0
            if left >= 8:
                _row(code, raw, r, rb, nb, xq, xd, xs, x4n, t0, kp, out, 0, ostride, 8, 1)
                t0 += 8
            elif left >= 4:
                _row(code, raw, r, rb, nb, xq, xd, xs, x4n, t0, kp, out, 0, ostride, 4, 1)
                t0 += 4
            elif left >= 2:
                _row(code, raw, r, rb, nb, xq, xd, xs, x4n, t0, kp, out, 0, ostride, 2, 1)
                t0 += 2
            else:
                _row(code, raw, r, rb, nb, xq, xd, xs, x4n, t0, kp, out, 0, ostride, 1, 1)
                t0 += 1


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _acts(g, n, act, out):
    """out[:n] = act(g[:n]) in float32, vectorized (ops' exp; gelu_tanh as ops writes it)."""
    if act == 0:
        for i in range(n):
            x = g[i]
            out[i] = x / (F32(1.0) + _exp(-x))
    else:
        for i in range(n):
            x = g[i]
            inner = F32(SQRT_2_OVER_PI) * x * (F32(1.0) + F32(GELU_COEF_A) * x * x)
            out[i] = x / (F32(1.0) + _exp(F32(-2.0) * inner))


@intrinsic
def _axpy(typingctx, acc, h, qn, qh, i, e, code):
    """acc (E,) f32 += h * q[i, :] (the unsigned quants of neuron i, low nibbles from qn and, for
    Q6_K (code 1, a literal), the high bits from qh), 32 rows per step as float vectors."""
    if not isinstance(code, types.IntegerLiteral):
        return None
    q6 = code.literal_value == 1
    sig = types.void(acc, h, qn, qh, i, e, code)

    def codegen(context, builder, sig, args):
        def data(k, ty):
            return builder.bitcast(context.make_array(sig.args[k])(context, builder, args[k]).data, ty)
        accp, qnp, qhp = data(0, simd.F32.as_pointer()), data(2, I8P), data(3, I8P)
        hv = simd.splat(builder, args[1], 16)
        i64 = [context.cast(builder, args[k], sig.args[k], types.int64) for k in (4, 5)]
        n_i, n_e = i64
        qbase = builder.mul(n_i, builder.sdiv(n_e, _c(2)))
        hbase = builder.mul(n_i, builder.sdiv(n_e, _c(4)))
        with cgutils.for_range(builder, builder.sdiv(n_e, _c(32))) as loop:
            c = loop.index
            b = simd.load_vec(builder, qnp, builder.add(qbase, builder.mul(c, _c(16))), simd.vec(8, 16))
            lo, hi = builder.and_(b, simd.const_vec(8, [15] * 16)), builder.lshr(b, simd.const_vec(8, [4] * 16))
            if q6:  # rows 32c + 8k + j: bits 2k of byte 8c + j of qh (uniform shifts of 8 bytes)
                k = simd.load_vec(builder, qhp, builder.add(hbase, builder.mul(c, _c(8))), simd.vec(8, 8))

                def bits(sh):
                    return builder.and_(builder.lshr(k, simd.const_vec(8, [sh] * 8)), simd.const_vec(8, [3] * 8))
                lo = builder.or_(lo, builder.shl(simd.concat(builder, bits(0), bits(2)), simd.const_vec(8, [4] * 16)))
                hi = builder.or_(hi, builder.shl(simd.concat(builder, bits(4), bits(6)), simd.const_vec(8, [4] * 16)))
            for half, q in enumerate((lo, hi)):
                at = builder.gep(accp, [builder.add(builder.mul(c, _c(32)), _c(16 * half))])
                ptr = builder.bitcast(at, simd.V16F.as_pointer())
                old = builder.load(ptr, align=4)
                builder.store(builder.fadd(old, builder.fmul(hv, builder.uitofp(q, simd.V16F))), ptr, align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _fold(typingctx, p, acc, dd, sc, mn, dm, sb, g, hsum, e, code):
    """p (E,) += D acc - M hsum for neuron group g of super-block sb (module doc), 16 rows a
    step: Q4_K (code 0) D = d sc, M = dmin mn; Q6_K (code 1, sc signed) D = d sc, M = 32 D."""
    if not isinstance(code, types.IntegerLiteral):
        return None
    q6 = code.literal_value == 1
    sig = types.void(p, acc, dd, sc, mn, dm, sb, g, hsum, e, code)

    def codegen(context, builder, sig, args):
        def data(k, ty):
            return builder.bitcast(context.make_array(sig.args[k])(context, builder, args[k]).data, ty)
        fp = simd.F32.as_pointer()
        pp, ap, dp, scp, mnp, dmp = data(0, fp), data(1, fp), data(2, fp), data(3, I8P), data(4, I8P), data(5, fp)
        n_sb, n_g, n_e = (context.cast(builder, args[k], sig.args[k], types.int64) for k in (6, 7, 9))
        hv = simd.splat(builder, args[8], 16)
        so, go = builder.mul(n_sb, n_e), builder.mul(n_g, n_e)

        def fvec(ptr, off):
            return builder.load(builder.bitcast(builder.gep(ptr, [off]), simd.V16F.as_pointer()), align=4)
        with cgutils.for_range(builder, builder.sdiv(n_e, _c(16))) as loop:
            n = builder.mul(loop.index, _c(16))
            s8 = simd.load_vec(builder, scp, builder.add(go, n), simd.vec(8, 16))
            dsc = builder.fmul(fvec(dp, builder.add(so, n)), builder.sitofp(s8, simd.V16F) if q6 else builder.uitofp(s8, simd.V16F))
            a = fvec(ap, n)
            if q6:
                v = builder.fmul(dsc, builder.fsub(a, builder.fmul(ir.Constant(simd.V16F, [32.0] * 16), hv)))
            else:
                m8 = simd.load_vec(builder, mnp, builder.add(go, n), simd.vec(8, 16))
                m = builder.fmul(fvec(dmp, builder.add(so, n)), builder.uitofp(m8, simd.V16F))
                v = builder.fsub(builder.fmul(dsc, a), builder.fmul(m, hv))
            ptr = builder.bitcast(builder.gep(pp, [n]), simd.V16F.as_pointer())
            builder.store(builder.fadd(builder.load(ptr, align=4), v), ptr, align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _prefetch(typingctx, arr, start, nbytes):
    """Ask the memory for arr's bytes start .. start + nbytes (a uint8 array), one request per
    64-byte line: the rows of active neurons are read in no order the hardware would foresee."""
    sig = types.void(arr, start, nbytes)

    def codegen(context, builder, sig, args):
        base = builder.bitcast(context.make_array(sig.args[0])(context, builder, args[0]).data, I8P)
        a, n = (context.cast(builder, args[k], sig.args[k], types.int64) for k in (1, 2))
        f = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [I8P] + [ir.IntType(32)] * 3),
                                           "llvm.prefetch.p0i8")
        i32 = ir.IntType(32)
        with cgutils.for_range(builder, builder.sdiv(builder.add(n, _c(63)), _c(64))) as loop:
            at = builder.gep(base, [builder.add(a, builder.mul(loop.index, _c(64)))])
            builder.call(f, [at, ir.Constant(i32, 0), ir.Constant(i32, 1), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return sig, codegen


AHEAD = 8  # active neurons whose bytes are asked for before they are reached (rows read in no order)


@numba.njit(cache=True, nogil=True, inline="always")
def _prefetch_column(qn, qh, i, e, code):
    _prefetch(qn, i * (e // 2), e // 2)
    if code == 1:
        _prefetch(qh, i * (e // 4), e // 4)


def _c(n):
    return ir.Constant(ir.IntType(64), n)


I8P = ir.IntType(8).as_pointer()


def _chunk(c, sd):
    t_n, kp = sd[S_T], sd[S_KP]
    e, f = sd[S_E], sd[S_F]
    xq = numba.carray(voidptr(sd[S_XQ]), t_n * 2 * kp, np.int8)
    xd = numba.carray(voidptr(sd[S_XD]), t_n * kp // 32, np.float32)
    xs = numba.carray(voidptr(sd[S_XS]), t_n * kp // 32, np.float32)
    x4n = numba.carray(voidptr(sd[S_X4]), t_n * kp // 4, np.int32)
    graw = numba.carray(voidptr(sd[S_GRAW]), sd[S_GSIZE], np.uint8)
    uraw = numba.carray(voidptr(sd[S_URAW]), sd[S_USIZE], np.uint8)
    gbuf = numba.carray(voidptr(sd[S_GBUF]), t_n * f, np.float32)
    ubuf = numba.carray(voidptr(sd[S_UBUF]), t_n * f, np.float32)
    hbuf = numba.carray(voidptr(sd[S_HBUF]), t_n * f, np.float32)
    n_chunks = f // 256
    part = numba.carray(voidptr(sd[S_PART]), n_chunks * t_n * e, np.float32)
    count = numba.carray(voidptr(sd[S_COUNT]), n_chunks, np.int64)
    code = sd[S_DCODE]
    g_size = 32 if code == 0 else 16
    qn = numba.carray(voidptr(sd[S_QN]), f * e // 2, np.uint8)
    qh = numba.carray(voidptr(sd[S_QH]), f * e // 4 if code == 1 else 0, np.uint8)
    sc = numba.carray(voidptr(sd[S_SC]), f // g_size * e, np.uint8)  # (int8 for Q6_K)
    mn = numba.carray(voidptr(sd[S_MN]), f // 32 * e if code == 0 else 0, np.uint8)
    dd = numba.carray(voidptr(sd[S_D]), f // 256 * e, np.float32)
    dm = numba.carray(voidptr(sd[S_DMIN]), f // 256 * e if code == 0 else 0, np.float32)
    thr = np.array([sd[S_THR]], np.int64).view(np.float32)[0]
    act = sd[S_ACT]
    r0, r1 = c * 256, c * 256 + 256

    _tok_rows(sd[S_GCODE], graw, r0, r1, sd[S_GRB], sd[S_GNB], xq, xd, xs, x4n, t_n, kp, gbuf, f)
    for t in range(t_n):
        _acts(gbuf[t * f + r0:t * f + r1], CHUNK, act, hbuf[t * f + r0:t * f + r1])
    n_on = 0
    if t_n == 1:  # decode: the active rows of up in one call, their bytes asked for first
        idx = np.empty(CHUNK, np.int64)
        for r in range(r0, r1):
            if abs(hbuf[r]) > thr:
                idx[n_on] = r
                n_on += 1
            else:
                hbuf[r] = F32(0.0)
        _rows_at(sd[S_UCODE], uraw, idx, n_on, sd[S_URB], sd[S_UNB], xq, xd, xs, x4n, kp, ubuf, f)
        for j in range(n_on):
            hbuf[idx[j]] *= ubuf[idx[j]]
    else:  # a batch: each active row of up against every token, each token keeping its own mask
        for r in range(r0, r1):
            hit = False
            for t in range(t_n):
                if abs(hbuf[t * f + r]) > thr:
                    hit = True
                else:
                    hbuf[t * f + r] = F32(0.0)
            if hit:
                _tok_rows(sd[S_UCODE], uraw, r, r + 1, sd[S_URB], sd[S_UNB], xq, xd, xs, x4n, t_n, kp, ubuf, f)
                for t in range(t_n):
                    if hbuf[t * f + r] != 0:
                        hbuf[t * f + r] *= ubuf[t * f + r]
                        n_on += 1
    count[c] = n_on

    acc = np.empty(e, np.float32)
    if t_n == 1:  # the first columns' bytes; each column then asks for the one AHEAD after it
        for j in range(min(AHEAD, n_on)):
            _prefetch_column(qn, qh, idx[j], e, code)
    nxt = AHEAD
    for t in range(t_n):
        p = part[(c * t_n + t) * e:(c * t_n + t + 1) * e]
        p[:] = 0
        for g in range(r0 // g_size, r1 // g_size):
            sb = g * g_size // 256
            hsum = F32(0.0)
            seen = False
            for i in range(g * g_size, (g + 1) * g_size):
                h = hbuf[t * f + i]
                if h != 0:
                    if not seen:
                        acc[:] = 0
                        seen = True
                    hsum += h
                    if t_n == 1 and nxt < n_on:
                        _prefetch_column(qn, qh, idx[nxt], e, code)
                        nxt += 1
                    if code == 0:
                        _axpy(acc, h, qn, qh, i, e, 0)
                    else:
                        _axpy(acc, h, qn, qh, i, e, 1)
            if seen:
                if code == 0:
                    _fold(p, acc, dd, sc, mn, dm, sb, g, hsum, e, 0)
                else:
                    _fold(p, acc, dd, sc, mn, dm, sb, g, hsum, e, 1)


def _ffn_task(board, epoch, sd_addr):
    """Take chunks of the sparse FFN task `epoch` until none is left."""
    sd = numba.carray(voidptr(sd_addr), SD_LEN, np.int64)
    while True:
        c = take(board, epoch)
        if c < 0:
            return
        _chunk(c, sd)
        finish(board)


@numba.njit(cache=True, nogil=True)
def reduce_parts(part, out):
    """out (T, E) = sum over chunks, in chunk order, of part (C, T, E)."""
    out[:] = part[0]
    for c in range(1, part.shape[0]):
        out += part[c]
