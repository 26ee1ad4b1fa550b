"""One GGUF row times one int8 activation row, per weight type, as numba intrinsics in LLVM IR.

Each intrinsic reads a row straight from its GGUF block bytes (no packing, no copy) and returns
the float32 dot product with x, where x is given as (see `qmatmul.quantize_x`):

    xq  int8 (2 Kp,)    x rounded per 32-element block to a 15-bit integer v = 128 hi + lo,
                        x ~ xd[b] * v (|hi| <= 127, |lo| <= 64), as two int8 parts, interleaved
                        per 64 elements: hi of elements 64g.. at byte 128g, lo at 128g + 64
    xd  f32 (Kp / 32,)  the block scales, amax / (127 * 128)
    xs  f32 (Kp / 32,)  the float sums of x over each block (Q4_K's mins use these: exact)
    x4n i32 (Kp / 4,)   minus the sums of v over each 4 elements (the constant offsets:
                        Q6_K -32, Q5_0 -16, Q8_0 -128 on VNNI, go into the int32 accumulators)

Kp is K padded to a multiple of 64 with zeros, so a pair of 32-blocks can always be read.

Per 64 weights: one unsigned 64-byte vector of quants against both parts of x through
`simd.dp4x2` (two vpdpbusd on VNNI CPUs), 16 int32 lanes of 4-element sums (exact), converted to float
and multiplied lane by lane by the (weight scale x activation scale) of the block each lane
belongs to, accumulated in 16 float lanes; one fixed-order horizontal sum per row. The result is
a function of the row and x alone: no dependence on threads, on the rows or tokens sharing the
call, or on the CPU path (all paths compute the same integers; the float work is identical).

Block layouts (bytes): Q4_K 144 = d, dmin (f16), 12 packed 6-bit scales/mins, 128 nibbles (4
chunks of 64 elements, low nibbles first); Q6_K 210 = 128 low nibbles, 64 bytes of 2-bit highs,
16 int8 scales, d; Q8_0 34 = d, 32 int8; Q5_0 22 = d, 32 high bits (u32), 16 nibbles.
"""
from __future__ import annotations

from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

from . import simd
from .simd import F32, V8F, V16F, concat, const_vec, dp4x2, f16_to_f32, hsum, load_vec, shuffle, splat, vec

I64 = ir.IntType(64)
I8P = ir.IntType(8).as_pointer()


def _i64(n):
    return ir.Constant(I64, n)


def _ptrs(context, builder, sig, args):
    """Base pointers of the intrinsic's array arguments: raw (i8*), xq (i8*), xd, xs (f32*), x4n (i8*)."""
    def data(i, ty):
        a = context.make_array(sig.args[i])(context, builder, args[i])
        return builder.bitcast(a.data, ty)
    return data(0, I8P), data(3, I8P), data(5, F32.as_pointer()), data(7, F32.as_pointer()), data(8, I8P)


def _row_intrinsic(body):
    """Wrap body(builder, isa, p) -> float into an intrinsic with the common signature
    (raw, roff, nb, xq, xoff, xd, doff, xs, x4n, isa): row bytes from raw[roff], nb blocks,
    x from xq[xoff] (xoff = 2 * t * Kp for token t), its scales and sums from xd[doff],
    xs[doff], x4n[xoff // 8]."""

    def impl(typingctx, raw, roff, nb, xq, xoff, xd, doff, xs, x4n, isa):
        if not isinstance(isa, types.IntegerLiteral):
            return None
        path = isa.literal_value

        def codegen(context, builder, sig, args):
            rawp, xqp, xdp, xsp, x4p = _ptrs(context, builder, sig, args)
            roff_, nb_, xoff_, doff_ = (context.cast(builder, args[i], sig.args[i], types.int64) for i in (1, 2, 4, 6))
            p = dict(raw=builder.gep(rawp, [roff_]), xq=builder.gep(xqp, [xoff_]), xd=builder.gep(xdp, [doff_]),
                     xs=builder.gep(xsp, [doff_]), x4n=builder.gep(x4p, [builder.sdiv(xoff_, _i64(2))]),
                     nb=nb_)
            return body(builder, path, p)

        return types.float32(raw, roff, nb, xq, xoff, xd, doff, xs, x4n, isa), codegen

    impl.__name__ = body.__name__.lstrip("_")
    return intrinsic(impl)


def _acc(builder, ty):
    return cgutils.alloca_once_value(builder, ir.Constant(ty, [0.0] * ty.count))


def _add_to(builder, slot, v):
    builder.store(builder.fadd(builder.load(slot), v), slot)


def _x4(builder, p, elem):
    """<16 x i32> of x4n for the 64 activations starting at element `elem` (i64) of this row
    (int32 number elem / 4, at byte elem)."""
    return load_vec(builder, p["x4n"], elem, vec(32, 16))


def _xv(builder, p, elem):
    """The two int8 parts (hi, lo) of the 64 activations from element `elem` (i64): stored
    interleaved per 64 elements, hi at byte 2 * elem, lo 64 bytes after it."""
    at = builder.mul(elem, _i64(2))
    return (load_vec(builder, p["xq"], at, vec(8, 64)),
            load_vec(builder, p["xq"], builder.add(at, _i64(64)), vec(8, 64)))


def _lanes(builder, s, idx):
    """16 lanes of scale: lane i takes s[idx[i]]."""
    return shuffle(builder, s, s, idx)


ZERO16 = const_vec(32, [0] * 16)


@_row_intrinsic
def _row_q4_k(builder, isa, p):
    raw, acc, macc = p["raw"], _acc(builder, V16F), _acc(builder, V8F)
    low4 = ir.Constant(ir.VectorType(ir.IntType(1), 8), [1, 1, 1, 1, 0, 0, 0, 0])
    with cgutils.for_range(builder, p["nb"]) as loop:
        b = loop.index
        blk = builder.gep(raw, [builder.mul(b, _i64(144))])
        d, dmin = f16_to_f32(builder, blk, _i64(0)), f16_to_f32(builder, blk, _i64(2))
        v = load_vec(builder, blk, _i64(4), vec(8, 16))  # the 12 scale bytes (and 4 of the quants)
        a = shuffle(builder, v, v, [0, 1, 2, 3, 8, 9, 10, 11])
        lo = shuffle(builder, v, v, [0, 1, 2, 3, 0, 1, 2, 3])
        mid = shuffle(builder, v, v, [4, 5, 6, 7, 4, 5, 6, 7])

        def c8(n):
            return const_vec(8, [n] * 8)
        sc = builder.select(low4, builder.and_(a, c8(63)),
                            builder.or_(builder.and_(a, c8(15)), builder.shl(builder.lshr(lo, c8(6)), c8(4))))
        mn = builder.select(low4, builder.and_(mid, c8(63)),
                            builder.or_(builder.lshr(a, c8(4)), builder.shl(builder.lshr(mid, c8(6)), c8(4))))
        o8 = builder.mul(b, _i64(8))
        dx = load_vec(builder, p["xd"], o8, V8F)
        xs = load_vec(builder, p["xs"], o8, V8F)
        s8 = builder.fmul(builder.fmul(builder.uitofp(sc, V8F), splat(builder, d, 8)), dx)  # (d * sc_j) * dx_j
        _add_to(builder, macc, builder.fmul(builder.fmul(builder.uitofp(mn, V8F), splat(builder, dmin, 8)), xs))
        for j in range(4):
            q = load_vec(builder, blk, _i64(16 + 32 * j), vec(8, 32))
            w = concat(builder, builder.and_(q, const_vec(8, [15] * 32)), builder.lshr(q, const_vec(8, [4] * 32)))
            xv = _xv(builder, p, builder.add(builder.mul(b, _i64(256)), _i64(64 * j)))
            f = builder.sitofp(dp4x2(builder, isa, ZERO16, w, xv), V16F)
            _add_to(builder, acc, builder.fmul(f, _lanes(builder, s8, [2 * j] * 8 + [2 * j + 1] * 8)))
    return builder.fsub(hsum(builder, builder.load(acc)), hsum(builder, builder.load(macc)))


@_row_intrinsic
def _row_q6_k(builder, isa, p):
    raw, acc = p["raw"], _acc(builder, V16F)

    def c32(n):
        return const_vec(8, [n] * 32)
    with cgutils.for_range(builder, p["nb"]) as loop:
        b = loop.index
        blk = builder.gep(raw, [builder.mul(b, _i64(210))])
        d = f16_to_f32(builder, blk, _i64(208))
        sc = builder.sitofp(load_vec(builder, blk, _i64(192), vec(8, 16)), V16F)
        dx = load_vec(builder, p["xd"], builder.mul(b, _i64(8)), V8F)
        dx16 = shuffle(builder, dx, dx, [i // 2 for i in range(16)])  # 16-element sub-block i in 32-block i // 2
        s16 = builder.fmul(builder.fmul(sc, splat(builder, d, 16)), dx16)
        for h in range(2):
            l0 = load_vec(builder, blk, _i64(64 * h), vec(8, 32))
            l1 = load_vec(builder, blk, _i64(64 * h + 32), vec(8, 32))
            hb = load_vec(builder, blk, _i64(128 + 32 * h), vec(8, 32))
            e = [builder.or_(builder.and_(l0, c32(15)), builder.shl(builder.and_(hb, c32(3)), c32(4))),
                 builder.or_(builder.and_(l1, c32(15)), builder.shl(builder.and_(hb, c32(12)), c32(2))),
                 builder.or_(builder.lshr(l0, c32(4)), builder.and_(hb, c32(48))),
                 builder.or_(builder.lshr(l1, c32(4)), builder.lshr(builder.and_(hb, c32(192)), c32(2)))]
            for g in range(2):
                grp = 2 * h + g  # elements 64 grp .. 64 grp + 63: sub-blocks 4 grp .. 4 grp + 3
                elem = builder.add(builder.mul(b, _i64(256)), _i64(64 * grp))
                init = builder.shl(_x4(builder, p, elem), const_vec(32, [5] * 16))  # -32 * sum(x)
                f = builder.sitofp(dp4x2(builder, isa, init, concat(builder, e[2 * g], e[2 * g + 1]), _xv(builder, p, elem)), V16F)
                _add_to(builder, acc, builder.fmul(f, _lanes(builder, s16, [4 * grp + i // 4 for i in range(16)])))
    return hsum(builder, builder.load(acc))


def _pairs(builder, isa, p, bytes_per_block, weights, signed_shift):
    """The 32-block types: two blocks per 64-lane product, a lone last block against zeros.
    weights(blk_ptr) -> <32 x i8> quants (unsigned, or signed when signed_shift is None);
    signed_shift: the offset's log2 for unsigned quants (q - 2^shift)."""
    raw, acc, nb = p["raw"], _acc(builder, V16F), p["nb"]

    def pair(i, lone):
        b0 = builder.mul(i, _i64(2))
        blk0 = builder.gep(raw, [builder.mul(b0, _i64(bytes_per_block))])
        blk1 = builder.gep(blk0, [_i64(bytes_per_block)])
        w0 = weights(blk0)
        w1 = ir.Constant(w0.type, [0] * 32) if lone else weights(blk1)
        elem = builder.mul(b0, _i64(32))
        xv = _xv(builder, p, elem)
        x4 = _x4(builder, p, elem)
        if signed_shift is None:
            dots = dp4x2(builder, isa, ZERO16, concat(builder, w0, w1), xv, signed=True, x4n=x4)
        else:
            dots = dp4x2(builder, isa, builder.shl(x4, const_vec(32, [signed_shift] * 16)), concat(builder, w0, w1), xv)
        s0 = builder.fmul(f16_to_f32(builder, blk0, _i64(0)), builder.load(builder.gep(p["xd"], [b0])))
        s1 = (ir.Constant(F32, 0.0) if lone else
              builder.fmul(f16_to_f32(builder, blk1, _i64(0)), builder.load(builder.gep(p["xd"], [builder.add(b0, _i64(1))]))))
        s = builder.insert_element(builder.insert_element(ir.Constant(ir.VectorType(F32, 2), None), s0, ir.Constant(simd.I32, 0)),
                                   s1, ir.Constant(simd.I32, 1))
        _add_to(builder, acc, builder.fmul(builder.sitofp(dots, V16F), _lanes(builder, s, [0] * 8 + [1] * 8)))

    with cgutils.for_range(builder, builder.sdiv(nb, _i64(2))) as loop:
        pair(loop.index, False)
    odd = builder.icmp_signed("!=", builder.srem(nb, _i64(2)), _i64(0))
    with builder.if_then(odd, likely=False):
        pair(builder.sdiv(nb, _i64(2)), True)
    return hsum(builder, builder.load(acc))


@_row_intrinsic
def _row_q8_0(builder, isa, p):
    return _pairs(builder, isa, p, 34, lambda blk: load_vec(builder, blk, _i64(2), vec(8, 32)), None)


@_row_intrinsic
def _row_q5_0(builder, isa, p):
    def weights(blk):
        qs = load_vec(builder, blk, _i64(6), vec(8, 16))
        e = concat(builder, builder.and_(qs, const_vec(8, [15] * 16)), builder.lshr(qs, const_vec(8, [4] * 16)))
        qh = builder.load(builder.bitcast(builder.gep(blk, [_i64(2)]), ir.IntType(32).as_pointer()), align=1)
        fifth = builder.zext(builder.bitcast(qh, ir.VectorType(ir.IntType(1), 32)), vec(8, 32))  # bit i: element i
        return builder.or_(e, builder.shl(fifth, const_vec(8, [4] * 32)))
    return _pairs(builder, isa, p, 22, weights, 4)
