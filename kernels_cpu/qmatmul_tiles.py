"""Prompt products as int8 GEMM tiles: 32 rows repacked once, then every token of the prompt.

A prompt chunk (T > TILE_T tokens) meets each row T times, so it pays to lay the row's quants out
for the dot-product instruction first. `pack` unpacks 32 GGUF rows into the tile

    wt  uint8 (Kp / 4, 32, 4)  the unsigned quants u of rows 0..31, four consecutive elements per
                               row in each 32-bit lane: one 64-byte load is 16 rows x 4 elements
    sc  f32 (Kp / S, 32)       per sub-block of S elements and row, the weight scale (d * sc_j)
    mn  f32 (Kp / S, 32)       Q4_K's mins (dmin * m_j); unused by the other types

so that `vpdpbusd` (simd.dp4) against one token's 4 activations broadcast to every lane adds 4
products to each of 16 rows: lanes are rows, and a sub-block's dot product is one exact int32
per row, with no horizontal sums. Per sub-block, row and token, in this order:

    I = 128 (u . hi) + (u . lo) - OFF * sum(v)      exact int32 (v = 128 hi + lo, qmatmul_rows)
    acc = fma(float(I) * sc, xd, acc)               xd: the token's 32-block scale
    acc = fma(mn, -xs, acc)                         (Q4_K) xs: the token's exact float block sum

| type | S  | u                | OFF | why                                    |
|------|----|------------------|-----|----------------------------------------|
| Q4_K | 32 | q (0..15)        | 0   | mins through xs, as the row kernels do |
| Q6_K | 16 | q (0..63)        | 32  | int8 sub-block scales                  |
| Q5_0 | 32 | q (0..31)        | 16  |                                        |
| Q8_0 | 32 | q + 128 (0..255) | 128 |                                        |

The integers are those of the row kernels; only the float order differs (one chain over the
sub-blocks instead of the row kernels' lanes and tree), so a prompt token's row is within float rounding of
its decode row, not the same bits. Products of T <= TILE_T tokens (decode, speculative
verification, batched decode of parallel requests) never come here and stay batch-invariant; a
token's tile result depends only on its own x (any tokens, rows or threads around it).
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import simd
from .simd import F32, V16F, concat, const_vec, dp4, dpw, load_vec, splat, spread, vec

I64 = ir.IntType(64)
I32 = ir.IntType(32)
I8P = ir.IntType(8).as_pointer()
ROWS = 32  # rows per tile: two 16-lane groups
NT = 8  # tokens per kernel call, against one 16-row group (8 int32 accumulator pairs, 8 float ones)
K_CHUNK = 2048  # elements per pass over the tokens: 8 tokens' activations (32 KB) stay in L1
TILE_T = 16  # prompt products of more tokens than this go through tiles
Q4_K, Q6_K, Q8_0, Q5_0 = 0, 1, 2, 3  # type codes as qmatmul's (which passes each type's S and OFF)


@njit(cache=True, nogil=True, inline="always")
def tiled(code):
    """Does type `code` go through tiles?"""
    return code == Q4_K or code == Q6_K or code == Q8_0 or code == Q5_0


def _i64(n):
    return ir.Constant(I64, n)


@intrinsic
def _tile(typingctx, wt, sc, mn, xq, xd, xs, xo, t0, kp, nsub, s0, y, ntok, groups, sub, off, mins, isa):
    """Rows 0..31 of a packed tile against tokens t0 .. t0 + ntok - 1, over the nsub sub-blocks
    from s0; row i's result for token t0 + c at y[c * 32 + i], where a call with s0 > 0 finds
    the one of the sub-blocks before s0 to go on from (the chain is the same as in one call);
    xo (T, Kp / S) int32: minus each token's sums of v per sub-block
    (`sums`). ntok, groups (the 16-row groups: 3 both, 1 the first, 2 the second),
    sub (S), off (OFF), mins (0/1) and isa are literals."""
    lits = (ntok, groups, sub, off, mins, isa)
    if not all(isinstance(a, types.IntegerLiteral) for a in lits):
        return None
    n_tok, gsel, s_len, offset, has_mins, path = (a.literal_value for a in lits)
    gs = [g for g in range(2) if gsel >> g & 1]
    wide = simd.wide(path)  # int16 activations (simd.dpw): one chain per token, the pairs of a step
    sig = types.void(wt, sc, mn, xq, xd, xs, xo, t0, kp, nsub, s0, y, ntok, groups, sub, off, mins, isa)

    def codegen(context, builder, sig, args):
        def data(i):
            a = context.make_array(sig.args[i])(context, builder, args[i])
            return builder.bitcast(a.data, I8P)

        def i64(i):
            return context.cast(builder, args[i], sig.args[i], types.int64)
        wtp, scp, mnp, xqp, xdp, xsp, x4p, yp = (data(i) for i in (0, 1, 2, 3, 4, 5, 6, 11))
        t0_, kp_, nsub_, s0_ = i64(7), i64(8), i64(9), i64(10)
        toks = []
        for c in range(n_tok):
            t = builder.add(t0_, _i64(c))
            tk = builder.mul(t, kp_)
            toks.append(dict(xq=builder.gep(xqp, [builder.mul(tk, _i64(2))]),
                             xo=builder.gep(x4p, [builder.mul(t, builder.mul(builder.sdiv(kp_, _i64(s_len)), _i64(4)))]),
                             xd=builder.gep(xdp, [builder.mul(t, builder.sdiv(kp_, _i64(8)))]),
                             xs=builder.gep(xsp, [builder.mul(t, builder.sdiv(kp_, _i64(8)))])))
        first = builder.icmp_signed("==", s0_, _i64(0))

        def start(c, g):
            at = builder.bitcast(builder.gep(yp, [_i64(4 * (ROWS * c + 16 * g))]), V16F.as_pointer())
            return cgutils.alloca_once_value(builder, builder.select(first, ir.Constant(V16F, [0.0] * 16),
                                                                     builder.load(at, align=4)))
        accs = [[start(c, g) for c in range(n_tok)] for g in range(2)]
        zero = const_vec(32, [0] * 16)
        steps = s_len // 4
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(V16F, [V16F] * 3), "llvm.fmuladd.v16f32")
        per_iter = max(1, 32 // s_len)  # sub-blocks per loop iteration (Q6_K: 2, so the loop's
        # address arithmetic for 8 tokens is paid per 32 elements); nsub must be a multiple of it

        def sub_block(s):
            e0 = builder.mul(s, _i64(s_len))  # first element of the sub-block
            # its hi byte (lo: + 64); wide: its (4m, 4m + 1) pair (the (4m + 2, 4m + 3) pair: + 32)
            xat = builder.sub(builder.mul(e0, _i64(2)), builder.srem(e0, _i64(32 if wide else 64)))
            hi = [[zero] * n_tok for _ in range(2)]
            lo = [[zero] * n_tok for _ in range(2)]
            if offset:  # the lo chains start at OFF * (minus the sums of v): exact int32
                for c, x in enumerate(toks):
                    v = builder.load(builder.bitcast(builder.gep(x["xo"], [builder.mul(s, _i64(4))]), I32.as_pointer()))
                    corr = splat(builder, builder.shl(v, ir.Constant(I32, offset.bit_length() - 1)), 16)
                    for g in gs:
                        lo[g][c] = corr
            for q in range(steps):
                k4 = builder.add(builder.mul(s, _i64(steps)), _i64(q))
                ws = [load_vec(builder, wtp, builder.add(builder.mul(k4, _i64(4 * ROWS)), _i64(64 * g)), vec(8, 64))
                      if g in gs else None for g in range(2)]
                if wide:
                    ws = [spread(builder, w) if w is not None else None for w in ws]
                for c, x in enumerate(toks):
                    parts = []
                    for extra in (0, 32) if wide else (0, 64):
                        at = builder.add(xat, _i64(4 * q + extra))
                        v = builder.load(builder.bitcast(builder.gep(x["xq"], [at]), I32.as_pointer()), align=1)
                        parts.append(builder.bitcast(splat(builder, v, 8 if wide else 16), vec(16, 16) if wide else vec(8, 64)))
                    for g in gs:
                        if wide:
                            lo[g][c] = dpw(builder, lo[g][c], ws[g], parts * 2)
                        else:
                            hi[g][c] = dp4(builder, path, hi[g][c], ws[g], parts[0])
                            lo[g][c] = dp4(builder, path, lo[g][c], ws[g], parts[1])
            for c, x in enumerate(toks):
                blk32 = builder.sdiv(e0, _i64(32))
                xd = builder.load(builder.bitcast(builder.gep(x["xd"], [builder.mul(blk32, _i64(4))]), F32.as_pointer()))
                xdv = splat(builder, xd, 16)
                if has_mins:
                    xs = builder.load(builder.bitcast(builder.gep(x["xs"], [builder.mul(blk32, _i64(4))]), F32.as_pointer()))
                    nxs = splat(builder, builder.fneg(xs), 16)
                for g in gs:
                    at = builder.mul(builder.add(builder.mul(s, _i64(ROWS)), _i64(16 * g)), _i64(4))
                    i32s = builder.add(builder.shl(hi[g][c], const_vec(32, [7] * 16)), lo[g][c])
                    p = builder.fmul(builder.sitofp(i32s, V16F), load_vec(builder, scp, at, V16F))
                    acc = builder.call(fma, [p, xdv, builder.load(accs[g][c])])
                    if has_mins:
                        acc = builder.call(fma, [load_vec(builder, mnp, at, V16F), nxs, acc])
                    builder.store(acc, accs[g][c])

        with cgutils.for_range(builder, builder.sdiv(nsub_, _i64(per_iter))) as loop:
            for j in range(per_iter):
                sub_block(builder.add(s0_, builder.add(builder.mul(loop.index, _i64(per_iter)), _i64(j))))
        for c in range(n_tok):
            for g in gs:
                dst = builder.gep(yp, [_i64(4 * (ROWS * c + 16 * g))])
                builder.store(builder.load(accs[g][c]), builder.bitcast(dst, V16F.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _f16(typingctx, raw, off):
    """The float16 at raw[off], as float32."""
    sig = types.float32(raw, off)

    def codegen(context, builder, sig, args):
        a = context.make_array(sig.args[0])(context, builder, args[0])
        return simd.f16_to_f32(builder, builder.bitcast(a.data, I8P), context.cast(builder, args[1], sig.args[1], types.int64))
    return sig, codegen


@njit(cache=True, nogil=True)
def sums(x4n, x16, x32):
    """x4n's minus-4-sums of v (flat) added per 16 elements into x16 and per 32 into x32 (flat:
    (T, Kp / 16) and (T, Kp / 32), Kp a multiple of 64)."""
    for n in range(x16.size):
        x16[n] = (x4n[4 * n] + x4n[4 * n + 1]) + (x4n[4 * n + 2] + x4n[4 * n + 3])
    for n in range(x32.size):
        x32[n] = x16[2 * n] + x16[2 * n + 1]


# ---- packing ------------------------------------------------------------------------------------

@njit(cache=True, nogil=True, inline="always")
def _scale_min(raw, at, j):
    """Q4_K's 6-bit scale and min j (0..7) from the 12 bytes at raw[at]."""
    if j < 4:
        return raw[at + j] & 63, raw[at + j + 4] & 63
    return (raw[at + j + 4] & 15) | ((raw[at + j - 4] >> 6) << 4), (raw[at + j + 4] >> 4) | ((raw[at + j] >> 6) << 4)


@intrinsic
def _pack_quants(typingctx, raw, roff, nb, wt, i, code):
    """Row i of the tile (the row at raw[roff], nb blocks of type `code`, a literal): its unsigned
    quants u, 64 elements at a time, each 4-element lane stored at wt[(e / 4) * 128 + 4 i]."""
    if not isinstance(code, types.IntegerLiteral):
        return None
    kind = code.literal_value
    sig = types.void(raw, roff, nb, wt, i, code)

    def codegen(context, builder, sig, args):
        def data(j):
            return builder.bitcast(context.make_array(sig.args[j])(context, builder, args[j]).data, I8P)

        def i64(j):
            return context.cast(builder, args[j], sig.args[j], types.int64)
        row = builder.gep(data(0), [i64(1)])
        wtp, nb_, i_ = data(3), i64(2), i64(4)

        def put(v, e0):  # v <64 x i8>: elements e0 .. e0 + 63
            lanes = builder.bitcast(v, vec(32, 16))
            base = builder.add(builder.mul(e0, _i64(32)), builder.mul(i_, _i64(4)))  # (e0 / 4) * 128 + 4 i
            for q in range(16):
                at = builder.gep(wtp, [builder.add(base, _i64(128 * q))])
                builder.store(builder.extract_element(lanes, ir.Constant(I32, q)),
                              builder.bitcast(at, I32.as_pointer()), align=4)

        def c8(n, width=32):
            return const_vec(8, [n] * width)
        if kind in (Q4_K, Q6_K):
            with cgutils.for_range(builder, nb_) as loop:
                b = loop.index
                e_b = builder.mul(b, _i64(256))
                if kind == Q4_K:
                    blk = builder.gep(row, [builder.mul(b, _i64(144))])
                    for g in range(4):
                        q = load_vec(builder, blk, _i64(16 + 32 * g), vec(8, 32))
                        put(concat(builder, builder.and_(q, c8(15)), builder.lshr(q, c8(4))),
                            builder.add(e_b, _i64(64 * g)))
                else:
                    blk = builder.gep(row, [builder.mul(b, _i64(210))])
                    for h in range(2):
                        l0 = load_vec(builder, blk, _i64(64 * h), vec(8, 32))
                        l1 = load_vec(builder, blk, _i64(64 * h + 32), vec(8, 32))
                        hb = load_vec(builder, blk, _i64(128 + 32 * h), vec(8, 32))
                        e = [builder.or_(builder.and_(l0, c8(15)), builder.shl(builder.and_(hb, c8(3)), c8(4))),
                             builder.or_(builder.and_(l1, c8(15)), builder.shl(builder.and_(hb, c8(12)), c8(2))),
                             builder.or_(builder.lshr(l0, c8(4)), builder.and_(hb, c8(48))),
                             builder.or_(builder.lshr(l1, c8(4)), builder.lshr(builder.and_(hb, c8(192)), c8(2)))]
                        put(concat(builder, e[0], e[1]), builder.add(e_b, _i64(128 * h)))
                        put(concat(builder, e[2], e[3]), builder.add(e_b, _i64(128 * h + 64)))
        else:
            size = 34 if kind == Q8_0 else 22

            def weights(blk):
                if kind == Q8_0:
                    return builder.xor(load_vec(builder, blk, _i64(2), vec(8, 32)), c8(0x80))
                qs = load_vec(builder, blk, _i64(6), vec(8, 16))
                e = concat(builder, builder.and_(qs, c8(15, 16)), builder.lshr(qs, c8(4, 16)))
                qh = builder.load(builder.bitcast(builder.gep(blk, [_i64(2)]), I32.as_pointer()), align=1)
                fifth = builder.zext(builder.bitcast(qh, ir.VectorType(ir.IntType(1), 32)), vec(8, 32))
                return builder.or_(e, builder.shl(fifth, c8(4)))

            def pair(p, lone):
                blk0 = builder.gep(row, [builder.mul(p, _i64(2 * size))])
                w0 = weights(blk0)
                w1 = ir.Constant(w0.type, [0] * 32) if lone else weights(builder.gep(blk0, [_i64(size)]))
                put(concat(builder, w0, w1), builder.mul(p, _i64(64)))
            with cgutils.for_range(builder, builder.sdiv(nb_, _i64(2))) as loop:
                pair(loop.index, False)
            with builder.if_then(builder.icmp_signed("!=", builder.srem(nb_, _i64(2)), _i64(0)), likely=False):
                pair(builder.sdiv(nb_, _i64(2)), True)
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, nogil=True)
def pack(code, raw, r0, n, rb, nb, kp, wt, sc, mn):
    """Rows r0 .. r0 + n - 1 (n <= 32; rb bytes and nb blocks each, of type `code`) into the tile
    (wt, sc, mn) for K padded to kp; rows n..31 and the padding get zero scales (they add 0)."""
    s_len = 16 if code == Q6_K else 32
    k_used = nb * (256 if code == Q4_K or code == Q6_K else 32)
    for i in range(ROWS):
        if i >= n:
            for s in range(kp // s_len):
                sc[s * ROWS + i] = 0.0
                mn[s * ROWS + i] = 0.0
            continue
        base = (r0 + i) * rb
        if code == Q4_K:
            _pack_quants(raw, base, nb, wt, i, Q4_K)
            for b in range(nb):
                blk = base + 144 * b
                d, dmin = _f16(raw, blk), _f16(raw, blk + 2)
                for j in range(8):
                    s_j, m_j = _scale_min(raw, blk + 4, j)
                    sc[(8 * b + j) * ROWS + i] = d * np.float32(s_j)
                    mn[(8 * b + j) * ROWS + i] = dmin * np.float32(m_j)
        elif code == Q6_K:
            _pack_quants(raw, base, nb, wt, i, Q6_K)
            for b in range(nb):
                blk = base + 210 * b
                d = _f16(raw, blk + 208)
                for j in range(16):
                    sc[(16 * b + j) * ROWS + i] = d * np.float32(np.int8(raw[blk + 192 + j]))
        elif code == Q8_0:
            _pack_quants(raw, base, nb, wt, i, Q8_0)
            for b in range(nb):
                sc[b * ROWS + i] = _f16(raw, base + 34 * b)
        else:
            _pack_quants(raw, base, nb, wt, i, Q5_0)
            for b in range(nb):
                sc[b * ROWS + i] = _f16(raw, base + 22 * b)
        for s in range(k_used // s_len, kp // s_len):  # (a lone last 32-block's pair partner: zeros)
            sc[s * ROWS + i] = 0.0
            mn[s * ROWS + i] = 0.0
