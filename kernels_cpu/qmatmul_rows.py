"""One GGUF row times up to 8 activation rows, per weight type, as numba intrinsics in LLVM IR.

Each intrinsic reads a row straight from its GGUF block bytes (no packing, no copy), unpacks each
block once, and writes the float32 dot product with each of ntok tokens of x, where x is given
per token as (see `qmatmul.quantize_x`):

    xq  int8 (2 Kp,)    x rounded per 32-element block to a 15-bit integer v = 128 hi + lo,
                        x ~ xd[b] * v (|hi| <= 127, |lo| <= 64), as two int8 parts, interleaved
                        per 64 elements: hi of elements 64g.. at byte 128g, lo at 128g + 64;
                        on a wide path (simd.wide: AVX2) v itself, int16, block b's 32 at
                        byte 64b in simd.WIDE_ORDER (the order simd.spread puts weights in)
    xd  f32 (Kp / 32,)  the block scales, amax / (127 * 128)
    xs  f32 (Kp / 32,)  the float sums of x over each block (Q4_K's mins use these: exact)
    x4n i32 (Kp / 4,)   minus the sums of v over each 4 elements (the constant offsets:
                        Q6_K -32, Q5_0 -16, Q4_0 -8, Q3_K -4, Q8_0 -128 but on generic, go into the
                        int32 accumulators; Q2_K's mins take their 16-element sums of v)

Kp is K padded to a multiple of 64 with zeros, so a pair of 32-blocks can always be read.

Per 64 weights: one unsigned 64-byte vector of quants against both parts of x through
`simd.dp4x2` (two vpdpbusd on VNNI CPUs, four vpmaddwd on AVX2), 16 int32 lanes of 4-element
sums (exact), converted to float and multiplied lane by lane by the (weight scale x activation
scale) of the block each lane belongs to, and accumulated (Q4_K, Q6_K, Q8_0, Q5_0: two sets,
alternate 64-weight groups or pairs of blocks, so a row's fma chain is half as long; Q4_K's mins
go into the first), added and summed in a fixed order per row. On AVX-512 (32 registers) the
accumulators have 16 lanes, one fma per 64 weights; elsewhere 8 lanes, the high half's product
then the low half's, so that a call of 4 tokens keeps its sums in 16 registers (Zen 4, 2 threads:
the 16-lane form cut the Q4_K loop from 97 to 78 instructions per super-block at one token and
252 to 176 at four; qwen 1.5B's matmuls 46.5 -> 42.8 ms per token, 107 -> 80 ms per 4-token pass).
The result is a function of the row and the token's x alone: no dependence on threads or on the
rows or tokens sharing the call; all paths compute the same integers, and paths with accumulators
of the same width (simd.acc_lanes) the same floats.

Block layouts (bytes): Q4_K 144 = d, dmin (f16), 12 packed 6-bit scales/mins, 128 nibbles (4
chunks of 64 elements, low nibbles first); Q6_K 210 = 128 low nibbles, 64 bytes of 2-bit highs,
16 int8 scales, d; Q3_K 110 = 32 bytes of third bits, 64 of 2-bit lows, 12 packed 6-bit scales
(+32), d; Q2_K 84 = 16 scale/min nibble pairs, 64 bytes of 2-bit quants, d, dmin; Q8_0 34 = d,
32 int8; Q5_0 22 = d, 32 high bits (u32), 16 nibbles; Q4_0 18 = d, 16 nibbles.

Q2_K's mins, dmin * m per 16 elements, meet the sums of v over those elements (exact integers
from x4n; xs comes per 32 elements, too coarse), so its whole product is that of the rounded x:
one fma per super-block, row and token, into the same float lanes.
"""
from __future__ import annotations

from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

from . import simd
from .simd import F32, V8F, V16F, concat, const_vec, dp4x2, f16_to_f32, hsum, load_vec, shuffle, splat, vec

I64 = ir.IntType(64)
I8P = ir.IntType(8).as_pointer()
F32P = F32.as_pointer()
V2F = ir.VectorType(F32, 2)


def _i64(n):
    return ir.Constant(I64, n)


def _row_intrinsic(body):
    """Wrap body(builder, isa, rows, toks) -> [[float per token] per row] into an intrinsic with
    the common signature (raw, roff, rb, nb, xq, xd, xs, x4n, t0, kp, out, ooff, ostride, nrow,
    ntok, isa): nrow consecutive rows of rb bytes from raw[roff], nb blocks each, against tokens
    t0 .. t0 + ntok - 1 of x (K padded to kp); row i's result for token t goes to
    out[t * ostride + ooff + i]. nrow, ntok and isa are literals: one copy each (isa + NO_PREFETCH: no
    prefetch of the bytes after the row, for rows read in no order). A block's weights
    are unpacked once for all tokens and a token's activations loaded once for all rows; every
    (row, token) does the arithmetic it does alone: results do not depend on nrow or ntok."""

    def impl(typingctx, raw, roff, rb, nb, xq, xd, xs, x4n, t0, kp, out, ooff, ostride, nrow, ntok, isa):
        if not all(isinstance(a, types.IntegerLiteral) for a in (nrow, ntok, isa)):
            return None
        path, n_row, n_tok = isa.literal_value % NO_PREFETCH, nrow.literal_value, ntok.literal_value
        fetch = isa.literal_value < NO_PREFETCH
        sig = types.void(raw, roff, rb, nb, xq, xd, xs, x4n, t0, kp, out, ooff, ostride, nrow, ntok, isa)

        def codegen(context, builder, sig, args):
            def data(i, ty):
                a = context.make_array(sig.args[i])(context, builder, args[i])
                return builder.bitcast(a.data, ty)

            def i64(i):
                return context.cast(builder, args[i], sig.args[i], types.int64)
            rawp, xqp, xdp, xsp, x4p = data(0, I8P), data(4, I8P), data(5, F32P), data(6, F32P), data(7, I8P)
            outp = data(10, F32P)
            roff_, rb_, nb_, t0_, kp_, ooff_, ostride_ = (i64(i) for i in (1, 2, 3, 8, 9, 11, 12))
            toks = []
            for c in range(n_tok):
                t = builder.add(t0_, _i64(c))
                tk = builder.mul(t, kp_)  # t * Kp: x4n's byte offset; twice it is xq's
                nbx = builder.mul(t, builder.sdiv(kp_, _i64(32)))
                toks.append(dict(xq=builder.gep(xqp, [builder.mul(tk, _i64(2))]), xd=builder.gep(xdp, [nbx]),
                                 xs=builder.gep(xsp, [nbx]), x4n=builder.gep(x4p, [tk]), t=t))
            rows = [builder.gep(rawp, [builder.add(roff_, builder.mul(rb_, _i64(i)))]) for i in range(n_row)]
            # fetch: the prefetch hint's kind, by row length (None: no prefetch)
            far = builder.icmp_signed(">=", rb_, _i64(LONG_ROW)) if fetch else None
            for i, vals in enumerate(body(builder, path, rows, nb_, toks, far)):
                for tok, v in zip(toks, vals):
                    at = builder.add(builder.mul(tok["t"], ostride_), builder.add(ooff_, _i64(i)))
                    builder.store(v, builder.gep(outp, [at]))
            return context.get_dummy_value()

        return sig, codegen

    impl.__name__ = body.__name__.lstrip("_")
    return intrinsic(impl)


def _acc(builder, isa):
    """A chain's float accumulator: simd.acc_lanes(isa) lanes, zero."""
    ty = V16F if simd.acc_lanes(isa) == 16 else V8F
    return cgutils.alloca_once_value(builder, ir.Constant(ty, [0.0] * ty.count))


def _fmuladd(builder, n):
    vt = V16F if n == 16 else V8F
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(vt, [vt] * 3), f"llvm.fmuladd.v{n}f32")


def _fma_halves(builder, slot, a, b):
    """slot += a * b for a, b <16 x float>. A 16-lane slot (AVX-512: 32 registers) takes it in
    one fused step; an 8-lane one (16 registers: a pass of 4 tokens keeps two per (row, token)
    without spilling) takes the high halves' product first, then the low halves'. Either way
    the order is the same for any pass, so a token's bits stay its own; llvm.fmuladd is one
    fused instruction in every copy compiled for this CPU."""
    if slot.type.pointee.count == 16:
        builder.store(builder.call(_fmuladd(builder, 16), [a, b, builder.load(slot)]), slot)
        return

    def half(v, h):
        return shuffle(builder, v, v, range(8 * h, 8 * h + 8))
    mid = builder.call(_fmuladd(builder, 8), [half(a, 1), half(b, 1), builder.load(slot)])
    builder.store(builder.call(_fmuladd(builder, 8), [half(a, 0), half(b, 0), mid]), slot)


def _fma8_to(builder, slot, a, b):
    """slot += a * b for a, b <8 x float>, fused (into a 16-lane slot's first 8 lanes)."""
    if slot.type.pointee.count == 16:
        zero = ir.Constant(V8F, [0.0] * 8)
        a, b = (shuffle(builder, v, zero, range(16)) for v in (a, b))
        builder.store(builder.call(_fmuladd(builder, 16), [a, b, builder.load(slot)]), slot)
        return
    builder.store(builder.call(_fmuladd(builder, 8), [a, b, builder.load(slot)]), slot)


PREFETCH = 4096  # bytes ahead of the block being read that each block asks the memory for
NO_PREFETCH = 100  # isa + NO_PREFETCH: the same kernel without it (rows read out of order: the sparse FFN's)


LONG_ROW = 6144  # bytes: rows at least this long prefetch into L2 only, not L1


def _prefetch(builder, blk, nbytes, far):
    """Ask for the cache lines PREFETCH bytes past a block of nbytes (the hardware prefetcher
    alone restarts slowly at each work item's first row): into L1, or into L2 where `far` (an
    i1: a long row, whose tokens' activations fill most of L1 and would be evicted by the
    weights streaming past; Zen 4, 2 threads, alternated runs: Q6_K 1536x8960 18-21 -> 25-29
    GB/s; rows of 1536 elements did not gain from it)."""
    f = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [I8P, simd.I32, simd.I32, simd.I32]),
                                       "llvm.prefetch.p0i8")
    with builder.if_else(far) as (l2, l1):
        for where, hint in ((l2, 2), (l1, 3)):
            with where:
                for off in range(0, nbytes, 64):
                    builder.call(f, [builder.gep(blk, [_i64(PREFETCH + off)]), ir.Constant(simd.I32, 0),
                                     ir.Constant(simd.I32, hint), ir.Constant(simd.I32, 1)])


def _x4(builder, x, elem):
    """<16 x i32> of x4n for the 64 activations starting at element `elem` (i64) of this row
    (int32 number elem / 4, at byte elem) of token x."""
    return load_vec(builder, x["x4n"], elem, vec(32, 16))


def _xv(builder, x, elem, isa):
    """The two int8 parts (hi, lo) of token x's 64 activations from element `elem` (i64): stored
    interleaved per 64 elements, hi at byte 2 * elem, lo 64 bytes after it. On a wide path
    (simd.wide) the four <16 x i16> from byte 2 * elem: the activations in WIDE_ORDER per 32-block."""
    at = builder.mul(elem, _i64(2))
    if simd.wide(isa):
        return [load_vec(builder, x["xq"], builder.add(at, _i64(32 * i)), vec(16, 16)) for i in range(4)]
    return (load_vec(builder, x["xq"], at, vec(8, 64)),
            load_vec(builder, x["xq"], builder.add(at, _i64(64)), vec(8, 64)))


def _lanes(builder, s, idx):
    """16 lanes of scale: lane i takes s[idx[i]]."""
    return shuffle(builder, s, s, idx)


ZERO16 = const_vec(32, [0] * 16)


def _nibbles(builder, blk, off):
    """The 32 bytes at blk + off as <64 x i8>: their low nibbles, then their high nibbles (one
    broadcast load, one variable dword shift, one mask: no shift and insert per half)."""
    v = builder.bitcast(_halves(builder, blk, off), vec(32, 16))
    v = builder.lshr(v, const_vec(32, [0] * 8 + [4] * 8))
    return builder.and_(builder.bitcast(v, vec(8, 64)), const_vec(8, [15] * 64))


@_row_intrinsic
def _row_q4_k(builder, isa, rows, nb, toks, fetch):
    acc = [[_acc(builder, isa) for _ in toks] for _ in rows]
    acc2 = [[_acc(builder, isa) for _ in toks] for _ in rows]  # odd groups: two fma chains per row
    low4 = ir.Constant(ir.VectorType(ir.IntType(1), 8), [1, 1, 1, 1, 0, 0, 0, 0])

    def c8(n):
        return const_vec(8, [n] * 8)
    with cgutils.for_range(builder, nb) as loop:
        b = loop.index
        o8 = builder.mul(b, _i64(8))
        dx = [load_vec(builder, x["xd"], o8, V8F) for x in toks]
        xs = [load_vec(builder, x["xs"], o8, V8F) for x in toks]
        blks, s8 = [], []
        for row, ar in zip(rows, acc):
            blk = builder.gep(row, [builder.mul(b, _i64(144))])
            if fetch:
                _prefetch(builder, blk, 144, fetch)
            # d and dmin as one vector (two scalar half loads become vpinsrw into a register whose
            # last writer is the mins' accumulator: a false dependency chaining every block)
            dd = builder.fpext(load_vec(builder, blk, _i64(0), ir.VectorType(ir.HalfType(), 2)), V2F)
            v = load_vec(builder, blk, _i64(4), vec(8, 16))  # the 12 scale bytes (and 4 of the quants)
            a = shuffle(builder, v, v, [0, 1, 2, 3, 8, 9, 10, 11])
            lo = shuffle(builder, v, v, [0, 1, 2, 3, 0, 1, 2, 3])
            mid = shuffle(builder, v, v, [4, 5, 6, 7, 4, 5, 6, 7])
            sc = builder.select(low4, builder.and_(a, c8(63)),
                                builder.or_(builder.and_(a, c8(15)), builder.shl(builder.lshr(lo, c8(6)), c8(4))))
            mn = builder.select(low4, builder.and_(mid, c8(63)),
                                builder.or_(builder.lshr(a, c8(4)), builder.shl(builder.lshr(mid, c8(6)), c8(4))))
            dsc = builder.fmul(builder.uitofp(sc, V8F), shuffle(builder, dd, dd, [0] * 8))
            dmn = builder.fmul(builder.uitofp(mn, V8F), builder.fneg(shuffle(builder, dd, dd, [1] * 8)))  # -dmin m_j
            s8.append([builder.fmul(dsc, dxt) for dxt in dx])  # (d * sc_j) * dx_j
            for ac, xst in zip(ar, xs):
                _fma8_to(builder, ac, dmn, xst)  # - dmin m_j * sum(x) over sub-block j
            blks.append(blk)
        for j in range(4):
            elem = builder.add(builder.mul(b, _i64(256)), _i64(64 * j))
            xv = [_xv(builder, x, elem, isa) for x in toks]
            for blk, ar, sr in zip(blks, acc if j % 2 == 0 else acc2, s8):
                w = _nibbles(builder, blk, _i64(16 + 32 * j))
                for xvt, ac, s in zip(xv, ar, sr):
                    f = builder.sitofp(dp4x2(builder, isa, ZERO16, w, xvt), V16F)
                    _fma_halves(builder, ac, f, _lanes(builder, s, [2 * j] * 8 + [2 * j + 1] * 8))
    return [[hsum(builder, builder.fadd(builder.load(ac), builder.load(a2))) for ac, a2 in zip(ar, ar2)]
            for ar, ar2 in zip(acc, acc2)]


@_row_intrinsic
def _row_q6_k(builder, isa, rows, nb, toks, fetch):
    acc = [[_acc(builder, isa) for _ in toks] for _ in rows]
    acc2 = [[_acc(builder, isa) for _ in toks] for _ in rows]  # odd groups: two fma chains per row

    def c32(n):
        return const_vec(8, [n] * 32)
    with cgutils.for_range(builder, nb) as loop:
        b = loop.index
        dx16 = []
        for x in toks:
            dx = load_vec(builder, x["xd"], builder.mul(b, _i64(8)), V8F)
            dx16.append(shuffle(builder, dx, dx, [i // 2 for i in range(16)]))  # 16-element sub-block i in 32-block i // 2
        blks, s16 = [], []
        for row in rows:
            blk = builder.gep(row, [builder.mul(b, _i64(210))])
            if fetch:
                _prefetch(builder, blk, 210, fetch)
            d = f16_to_f32(builder, blk, _i64(208))
            dsc = builder.fmul(builder.sitofp(load_vec(builder, blk, _i64(192), vec(8, 16)), V16F), splat(builder, d, 16))
            s16.append([builder.fmul(dsc, dxt) for dxt in dx16])
            blks.append(blk)
        for h in range(2):
            es = []
            for blk in blks:
                l0 = load_vec(builder, blk, _i64(64 * h), vec(8, 32))
                l1 = load_vec(builder, blk, _i64(64 * h + 32), vec(8, 32))
                hb = load_vec(builder, blk, _i64(128 + 32 * h), vec(8, 32))
                es.append([builder.or_(builder.and_(l0, c32(15)), builder.shl(builder.and_(hb, c32(3)), c32(4))),
                           builder.or_(builder.and_(l1, c32(15)), builder.shl(builder.and_(hb, c32(12)), c32(2))),
                           builder.or_(builder.lshr(l0, c32(4)), builder.and_(hb, c32(48))),
                           builder.or_(builder.lshr(l1, c32(4)), builder.lshr(builder.and_(hb, c32(192)), c32(2)))])
            for g in range(2):
                grp = 2 * h + g  # elements 64 grp .. 64 grp + 63: sub-blocks 4 grp .. 4 grp + 3
                elem = builder.add(builder.mul(b, _i64(256)), _i64(64 * grp))
                xv = [_xv(builder, x, elem, isa) for x in toks]
                init = [builder.shl(_x4(builder, x, elem), const_vec(32, [5] * 16)) for x in toks]  # -32 * sum(x)
                for e, ar, sr in zip(es, acc if grp % 2 == 0 else acc2, s16):
                    w = concat(builder, e[2 * g], e[2 * g + 1])
                    for xvt, it, ac, s in zip(xv, init, ar, sr):
                        f = builder.sitofp(dp4x2(builder, isa, it, w, xvt), V16F)
                        _fma_halves(builder, ac, f, _lanes(builder, s, [4 * grp + i // 4 for i in range(16)]))
    return [[hsum(builder, builder.fadd(builder.load(ac), builder.load(a2))) for ac, a2 in zip(ar, ar2)]
            for ar, ar2 in zip(acc, acc2)]


def _halves(builder, blk, off):
    """The 32 bytes at blk + off twice over, as <64 x i8> (one broadcast load)."""
    v = load_vec(builder, blk, off, vec(8, 32))
    return shuffle(builder, v, v, list(range(32)) * 2)


def _shr32(builder, v, n):
    """<64 x i8> v shifted right by n as 16 dwords (the caller masks each byte's field)."""
    return builder.bitcast(builder.lshr(builder.bitcast(v, vec(32, 16)), const_vec(32, [n] * 16)), vec(8, 64))


def _dx16(builder, x, b):
    """Token x's 32-block scales of super-block b as 16 lanes, one per 16-element sub-block."""
    dx = load_vec(builder, x["xd"], builder.mul(b, _i64(8)), V8F)
    return shuffle(builder, dx, dx, [i // 2 for i in range(16)])


def _sums16(builder, x, b):
    """<16 x i32>: minus the sums of token x's v over each 16-element sub-block of super-block b
    (x4n's 4-sums added in pairs, twice)."""
    xg = [_x4(builder, x, builder.add(builder.mul(b, _i64(256)), _i64(64 * g))) for g in range(4)]

    def pairs(a, c):
        return builder.add(shuffle(builder, a, c, range(0, 32, 2)), shuffle(builder, a, c, range(1, 32, 2)))
    return pairs(pairs(xg[0], xg[1]), pairs(xg[2], xg[3]))


# the 2-bit K-quants' 64 weights of a group hold two fields of a qs half, the second one (and its
# sub-blocks 4 grp + 2, 4 grp + 3) 4x over: one mask takes both; the scales take the 4 back (exact)
_FIELDS = const_vec(8, [3] * 32 + [12] * 32)
_QUARTER = ir.Constant(V16F, [1.0 if m % 4 < 2 else 0.25 for m in range(16)])


def _k16(builder, isa, rows, nb, toks, fetch, bytes_per_block, scales, weights, offset_log2):
    """The 2-bit-field K-quants (Q3_K, Q2_K) per super-block, as `_row_q6_k`:
    scales(blk) -> (<16 x float> d * sc, <16 x float> dmin * m or None where the type has no mins);
    weights(blk) -> 4 <64 x i8>, group grp's unsigned quants: elements 64 grp + i, the last 32
    times 4 (_FIELDS); offset_log2: the quants' constant offset (q - 2^offset_log2), or None.
    Mins meet each token's (sums of v) * dx per sub-block in one fma per super-block."""
    acc = [[_acc(builder, isa) for _ in toks] for _ in rows]
    with cgutils.for_range(builder, nb) as loop:
        b = loop.index
        dx16 = [_dx16(builder, x, b) for x in toks]
        ws, s16, m16 = [], [], []
        for row in rows:
            blk = builder.gep(row, [builder.mul(b, _i64(bytes_per_block))])
            if fetch:
                _prefetch(builder, blk, bytes_per_block, fetch)
            dsc, dmn = scales(blk)
            dsc = builder.fmul(dsc, _QUARTER)
            s16.append([builder.fmul(dsc, dxt) for dxt in dx16])
            m16.append(dmn)
            ws.append(weights(blk))
        if m16[0] is not None:
            xm = [builder.fmul(builder.sitofp(_sums16(builder, x, b), V16F), dxt) for x, dxt in zip(toks, dx16)]
            for dmn, ar in zip(m16, acc):
                for xmt, ac in zip(xm, ar):
                    _fma_halves(builder, ac, xmt, dmn)  # - dmin m * sum(x) per sub-block
        for grp in range(4):  # elements 64 grp .. 64 grp + 63: sub-blocks 4 grp .. 4 grp + 3
            elem = builder.add(builder.mul(b, _i64(256)), _i64(64 * grp))
            xv = [_xv(builder, x, elem, isa) for x in toks]
            if offset_log2 is None:
                init = [ZERO16] * len(toks)
            else:  # (the last 8 lanes' quants are 4x: so is their offset)
                sh = const_vec(32, [offset_log2] * 8 + [offset_log2 + 2] * 8)
                init = [builder.shl(_x4(builder, x, elem), sh) for x in toks]
            for w, ar, sr in zip(ws, acc, s16):
                for xvt, it, ac, s in zip(xv, init, ar, sr):
                    f = builder.sitofp(dp4x2(builder, isa, it, w[grp], xvt), V16F)
                    _fma_halves(builder, ac, f, _lanes(builder, s, [4 * grp + i // 4 for i in range(16)]))
    return [[hsum(builder, builder.load(ac)) for ac in ar] for ar in acc]


@_row_intrinsic
def _row_q3_k(builder, isa, rows, nb, toks, fetch):
    def scales(blk):
        v = load_vec(builder, blk, _i64(94), vec(8, 16))  # scale byte i at lane i + 2 (not past byte 110)
        low = builder.zext(shuffle(builder, v, v, [2 + s % 8 for s in range(16)]), vec(32, 16))
        low = builder.and_(builder.lshr(low, const_vec(32, [0] * 8 + [4] * 8)), const_vec(32, [15] * 16))
        top = builder.zext(shuffle(builder, v, v, [10 + s % 4 for s in range(16)]), vec(32, 16))
        top = builder.and_(builder.lshr(top, const_vec(32, [2 * (s // 4) for s in range(16)])), const_vec(32, [3] * 16))
        sc = builder.sub(builder.or_(low, builder.shl(top, const_vec(32, [4] * 16))), const_vec(32, [32] * 16))
        return builder.fmul(builder.sitofp(sc, V16F), splat(builder, f16_to_f32(builder, blk, _i64(108)), 16)), None

    def weights(blk):
        hm = _halves(builder, blk, _i64(0))  # bit i of byte j: the third bit of element 32 i + j
        qs = [_halves(builder, blk, _i64(32 + 32 * h)) for h in range(2)]
        out = []
        for grp in range(4):
            low = builder.and_(_shr32(builder, qs[grp // 2], 4 * (grp % 2)), _FIELDS)
            # hmask bits 2 grp, 2 grp + 1 (a test into a mask register: no shifts, which share one port with vpdpbusd)
            bit = builder.and_(hm, const_vec(8, [1 << 2 * grp] * 32 + [2 << 2 * grp] * 32))
            set_ = builder.icmp_unsigned("!=", bit, const_vec(8, [0] * 64))
            out.append(builder.or_(low, builder.select(set_, const_vec(8, [4] * 32 + [16] * 32), const_vec(8, [0] * 64))))
        return out
    return _k16(builder, isa, rows, nb, toks, fetch, 110, scales, weights, 2)


@_row_intrinsic
def _row_q2_k(builder, isa, rows, nb, toks, fetch):
    def scales(blk):
        v = load_vec(builder, blk, _i64(0), vec(8, 16))
        sc = builder.uitofp(builder.and_(v, const_vec(8, [15] * 16)), V16F)
        mn = builder.uitofp(builder.lshr(v, const_vec(8, [4] * 16)), V16F)
        return (builder.fmul(sc, splat(builder, f16_to_f32(builder, blk, _i64(80)), 16)),
                builder.fmul(mn, splat(builder, f16_to_f32(builder, blk, _i64(82)), 16)))

    def weights(blk):
        qs = [_halves(builder, blk, _i64(16 + 32 * h)) for h in range(2)]
        return [builder.and_(_shr32(builder, qs[grp // 2], 4 * (grp % 2)), _FIELDS) for grp in range(4)]
    return _k16(builder, isa, rows, nb, toks, fetch, 84, scales, weights, None)


def _d_pair(builder, blk0, blk1):
    """<2 x float> (d0, d1): the float16 scales at the start of two blocks (blk1 None: d1 = 0),
    from two 4-byte vector loads (scalar half loads become vpinsrw into whatever register is
    at hand: a false dependency on its last writer, here the fma accumulator; without it
    Q5_0 4096x896 on one thread, L3-warm on Zen 5: +5%)."""
    v2h = ir.VectorType(ir.HalfType(), 2)
    a = load_vec(builder, blk0, _i64(0), v2h)
    b = ir.Constant(v2h, None) if blk1 is None else load_vec(builder, blk1, _i64(0), v2h)
    d = builder.fpext(shuffle(builder, a, b, [0, 2]), V2F)
    return d if blk1 is not None else builder.insert_element(d, ir.Constant(F32, 0.0), ir.Constant(simd.I32, 1))


def _pairs(builder, isa, rows, nb, toks, fetch, bytes_per_block, weights, signed_shift):
    """The 32-block types: two blocks per 64-lane product, a lone last block against zeros.
    weights(blk0, blk1) -> <64 x i8>: the two blocks' quants (unsigned, or signed when
    signed_shift is None), blk1 None for a lone block (its quants zero);
    signed_shift: the offset's log2 for unsigned quants (q - 2^shift). Pairs 2i and 2i + 1 go
    into two accumulators (two fma chains per row), a last pair and a lone block into the first."""
    accs = [[[_acc(builder, isa) for _ in toks] for _ in rows] for _ in range(2)]

    def pair(i, lone, acc):
        b0 = builder.mul(i, _i64(2))
        elem = builder.mul(b0, _i64(32))
        xv = [_xv(builder, x, elem, isa) for x in toks]
        x4 = [_x4(builder, x, elem) for x in toks]
        # (dx0, dx1); a lone block's dx1 is the zero padding
        dx = [load_vec(builder, builder.bitcast(x["xd"], I8P), builder.mul(b0, _i64(4)), V2F) for x in toks]
        for row, ar in zip(rows, acc):
            blk0 = builder.gep(row, [builder.mul(b0, _i64(bytes_per_block))])
            blk1 = builder.gep(blk0, [_i64(bytes_per_block)])
            if fetch:
                _prefetch(builder, blk0, 2 * bytes_per_block, fetch)
            w = weights(blk0, None if lone else blk1)
            dw = _d_pair(builder, blk0, None if lone else blk1)
            for xvt, x4t, dxt, ac in zip(xv, x4, dx, ar):
                if signed_shift is None:
                    dots = dp4x2(builder, isa, ZERO16, w, xvt, signed=True, x4n=x4t)
                else:
                    dots = dp4x2(builder, isa, builder.shl(x4t, const_vec(32, [signed_shift] * 16)), w, xvt)
                s = builder.fmul(dw, dxt)  # (d0 dx0, d1 dx1)
                _fma_halves(builder, ac, builder.sitofp(dots, V16F), _lanes(builder, s, [0] * 8 + [1] * 8))

    with cgutils.for_range(builder, builder.sdiv(nb, _i64(4))) as loop:
        pair(builder.mul(loop.index, _i64(2)), False, accs[0])
        pair(builder.add(builder.mul(loop.index, _i64(2)), _i64(1)), False, accs[1])
    last = builder.mul(builder.sdiv(nb, _i64(4)), _i64(2))  # the pair after those
    with builder.if_then(builder.icmp_signed(">=", builder.srem(nb, _i64(4)), _i64(2)), likely=False):
        pair(last, False, accs[0])
    with builder.if_then(builder.icmp_signed("!=", builder.srem(nb, _i64(2)), _i64(0)), likely=False):
        pair(builder.sdiv(nb, _i64(2)), True, accs[0])
    return [[hsum(builder, builder.fadd(builder.load(ac), builder.load(a2))) for ac, a2 in zip(ar, ar2)]
            for ar, ar2 in zip(*accs)]


@_row_intrinsic
def _row_q8_0(builder, isa, rows, nb, toks, fetch):
    def weights(blk0, blk1):
        w0 = load_vec(builder, blk0, _i64(2), vec(8, 32))
        return concat(builder, w0, ir.Constant(w0.type, [0] * 32) if blk1 is None else load_vec(builder, blk1, _i64(2), vec(8, 32)))
    return _pairs(builder, isa, rows, nb, toks, fetch, 34, weights, None)


def _nibble_pair(builder, blk0, blk1, off):
    """<64 x i8>: the low then the high nibbles of the 16 bytes at blk0 + off, then those of
    blk1 + off (zeros when blk1 is None). Each half is broadcast and both are shifted as qwords
    (by 0 or 4) and masked at once: no shift, mask and insert per block."""
    a = load_vec(builder, blk0, off, vec(8, 16))
    b = ir.Constant(a.type, [0] * 16) if blk1 is None else load_vec(builder, blk1, off, vec(8, 16))
    v = builder.bitcast(shuffle(builder, a, b, list(range(16)) * 2 + list(range(16, 32)) * 2), vec(64, 8))
    v = builder.lshr(v, const_vec(64, [0, 0, 4, 4, 0, 0, 4, 4]))
    return builder.and_(builder.bitcast(v, vec(8, 64)), const_vec(8, [15] * 64))


@_row_intrinsic
def _row_q5_0(builder, isa, rows, nb, toks, fetch):
    def weights(blk0, blk1):
        def qh(blk):  # bit i: element i's fifth bit
            return builder.zext(builder.load(builder.bitcast(builder.gep(blk, [_i64(2)]), ir.IntType(32).as_pointer()),
                                             align=1), ir.IntType(64))
        bits = qh(blk0) if blk1 is None else builder.or_(qh(blk0), builder.shl(qh(blk1), ir.Constant(ir.IntType(64), 32)))
        fifth = builder.zext(builder.bitcast(bits, ir.VectorType(ir.IntType(1), 64)), vec(8, 64))
        return builder.or_(_nibble_pair(builder, blk0, blk1, _i64(6)), builder.shl(fifth, const_vec(8, [4] * 64)))
    return _pairs(builder, isa, rows, nb, toks, fetch, 22, weights, 4)


@_row_intrinsic
def _row_q4_0(builder, isa, rows, nb, toks, fetch):
    return _pairs(builder, isa, rows, nb, toks, fetch, 18, lambda blk0, blk1: _nibble_pair(builder, blk0, blk1, _i64(2)), 3)


@intrinsic
def quantize_block(typingctx, x, xoff, xq, qoff, xd, xs, x4n, b, wide):
    """One 32-block of activations (qmatmul.quantize_x's recipe) in vector IR: x[xoff .. xoff + 31]
    (float32) -> hi, lo at xq[qoff ..], xq[qoff + 64 ..]; the scale amax / (127 * 128) and the
    sum (8 running sums of every 8th element, then halves added pairwise) at xd[b], xs[b]; minus
    the 4-sums of v at x4n[8 b ..]. v = rint(x / scale), hi = rint(v / 128), lo = v - 128 hi.
    wide (a literal, 1 for a simd.wide path): v itself as 32 int16 in simd.WIDE_ORDER at xq[qoff ..]."""
    if not isinstance(wide, types.IntegerLiteral):
        return None
    as_int16 = bool(wide.literal_value)
    sig = types.void(x, xoff, xq, qoff, xd, xs, x4n, b, wide)

    def codegen(context, builder, sig, args):
        def data(i, ty):
            return builder.bitcast(context.make_array(sig.args[i])(context, builder, args[i]).data, ty)

        def i64(i):
            return context.cast(builder, args[i], sig.args[i], types.int64)
        xp, qp, dp, sp, np_ = data(0, F32P), data(2, I8P), data(4, F32P), data(5, F32P), data(6, ir.IntType(32).as_pointer())
        v32 = ir.VectorType(F32, 32)
        xv = builder.load(builder.bitcast(builder.gep(xp, [i64(1)]), v32.as_pointer()), align=4)
        fabs = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v32, [v32]), "llvm.fabs.v32f32")
        ax = builder.call(fabs, [xv])
        parts = [shuffle(builder, xv, xv, range(8 * i, 8 * i + 8)) for i in range(4)]
        tops = [shuffle(builder, ax, ax, range(8 * i, 8 * i + 8)) for i in range(4)]
        sm, tp = parts[0], tops[0]

        def fmax(a, c):  # max of non-negative floats (NaN-free inputs: an ordered compare is exact)
            return builder.select(builder.fcmp_ordered(">", c, a), c, a)
        for i in range(1, 4):
            sm = builder.fadd(sm, parts[i])
            tp = fmax(tp, tops[i])
        for h in (4, 2, 1):
            sm = builder.fadd(shuffle(builder, sm, sm, range(h)), shuffle(builder, sm, sm, range(h, 2 * h)))
            tp = fmax(shuffle(builder, tp, tp, range(h)), shuffle(builder, tp, tp, range(h, 2 * h)))
        total, amax = (builder.extract_element(v, ir.Constant(simd.I32, 0)) for v in (sm, tp))
        d = builder.fdiv(amax, ir.Constant(F32, 127.0 * 128.0))
        nz = builder.fcmp_ordered("!=", d, ir.Constant(F32, 0.0))
        inv = builder.select(nz, builder.fdiv(ir.Constant(F32, 1.0), d), ir.Constant(F32, 0.0))
        magic = ir.Constant(v32, [12582912.0] * 32)  # 1.5 * 2^23: adding and taking it back rounds half to even

        def rint(y):
            return builder.fsub(builder.fadd(y, magic), magic)
        q = builder.fptosi(rint(builder.fmul(xv, splat(builder, inv, 32))), vec(32, 32))
        hi = builder.fptosi(rint(builder.fmul(builder.sitofp(q, v32), ir.Constant(v32, [1.0 / 128.0] * 32))), vec(32, 32))
        lo = builder.sub(q, builder.shl(hi, const_vec(32, [7] * 32)))
        at = i64(3)
        if as_int16:
            v16 = builder.trunc(shuffle(builder, q, q, simd.WIDE_ORDER), vec(16, 32))
            builder.store(v16, builder.bitcast(builder.gep(qp, [at]), vec(16, 32).as_pointer()), align=1)
        for part, off in () if as_int16 else ((hi, 0), (lo, 64)):
            dst = builder.gep(qp, [builder.add(at, _i64(off))])
            builder.store(builder.trunc(part, vec(8, 32)), builder.bitcast(dst, vec(8, 32).as_pointer()), align=1)
        sums = builder.add(builder.add(shuffle(builder, q, q, range(0, 32, 4)), shuffle(builder, q, q, range(1, 32, 4))),
                           builder.add(shuffle(builder, q, q, range(2, 32, 4)), shuffle(builder, q, q, range(3, 32, 4))))
        b_ = i64(7)
        dst = builder.gep(np_, [builder.mul(b_, _i64(8))])
        builder.store(builder.sub(const_vec(32, [0] * 8), sums), builder.bitcast(dst, vec(32, 8).as_pointer()), align=4)
        builder.store(d, builder.gep(dp, [b_]))
        builder.store(total, builder.gep(sp, [b_]))
        return context.get_dummy_value()

    return sig, codegen

