"""The CPU's int8 dot-product instruction, as LLVM IR for numba intrinsics, chosen at run time.

Every path computes the same exact integer function on 64 byte pairs (w unsigned 0..255 unless
said, x signed -127..127), 16 int32 lanes, lane i = acc[i] + sum_{j<4} w[4i+j] * x[4i+j]:

| ISA          | instruction                                   | picked when the CPU has       |
|--------------|-----------------------------------------------|-------------------------------|
| avx512vnni   | vpdpbusd zmm (one per 64 pairs)               | avx512vnni + avx512bw/vl      |
| avxvnni      | {vex} vpdpbusd ymm (two)                      | avxvnni (Alder Lake, Zen 5)   |
| avx2         | vpmaddwd against int16 activations (four)     | avx2                          |
| generic      | widening multiply and add in plain vector IR  | anything (ARM, older x86)     |

The VNNI and generic paths take the 15-bit activations as two int8 parts (`dp4x2`); avx2 takes
them as int16 (`wide`): the weights' bytes spread to int16 by vpshufb, then vpmaddwd against the
whole activation (`dpw`). Per 64 weights and token that is 4 vpmaddwd where the two int8 parts
through vpmaddubsw and vpmaddwd by ones cost 8 multiplies and 2 shifts: Zen 2, one thread,
prompts of 512 tokens through Q4_K 8960x1536 tiles: 22.6 -> 34.8 G weight-tokens/s (decode
products gain little: their time goes elsewhere). Signed int8 weights (Q8_0) go in as w + 128,
with 128 * sum(x) taken back from the precomputed sums, on every path but generic. All paths
agree bit for bit.

`EDGELLM_ISA=avx2` (or another name) forces a path the CPU supports, for tests and comparisons.
"""
from __future__ import annotations

import functools
import os

from llvmlite import binding as llvm
from llvmlite import ir
from numba.core import cgutils

AVX512VNNI, AVXVNNI, AVX2, GENERIC = 0, 1, 2, 3
NAMES = {AVX512VNNI: "avx512vnni", AVXVNNI: "avxvnni", AVX2: "avx2", GENERIC: "generic"}


@functools.cache
def host_features() -> frozenset[str]:
    """The host CPU's features as LLVM names them ('avx2', 'avx512vnni', ...)."""
    try:
        return frozenset(f[1:] for f in llvm.get_host_cpu_features().flatten().split(",") if f.startswith("+"))
    except RuntimeError:  # LLVM cannot tell (some ARM kernels): assume nothing
        return frozenset()


def supported() -> list[int]:
    """The paths this CPU can run, best first."""
    f = host_features()
    out = []
    if {"avx512vnni", "avx512bw", "avx512vl"} <= f:
        out.append(AVX512VNNI)
    if "avxvnni" in f:
        out.append(AVXVNNI)
    if "avx2" in f:
        out.append(AVX2)
    out.append(GENERIC)
    return out


def chosen() -> int:
    """EDGELLM_ISA when set (ValueError if unknown or unsupported here), else the best path."""
    want = os.environ.get("EDGELLM_ISA", "").strip().lower()
    return _chosen(want)


@functools.cache
def _chosen(want: str) -> int:
    have = supported()
    if not want:
        return have[0]
    by_name = {v: k for k, v in NAMES.items()}
    if want not in by_name:
        raise ValueError(f"EDGELLM_ISA={want!r} is not one of {', '.join(NAMES.values())}")
    if by_name[want] not in have:
        raise ValueError(f"EDGELLM_ISA={want!r} is not supported by this CPU (have {', '.join(NAMES[i] for i in have)})")
    return by_name[want]


# ---- IR helpers ---------------------------------------------------------------------------------

def vec(bits: int, n: int) -> ir.VectorType:
    return ir.VectorType(ir.IntType(bits), n)


I32 = ir.IntType(32)
F32 = ir.FloatType()
V16F = ir.VectorType(F32, 16)
V8F = ir.VectorType(F32, 8)


def const_vec(bits: int, values) -> ir.Constant:
    return ir.Constant(vec(bits, len(values)), list(values))


def splat(builder, v, n: int):
    """Scalar v -> <n x typeof(v)>."""
    vt = ir.VectorType(v.type, n)
    one = builder.insert_element(ir.Constant(vt, None), v, ir.Constant(I32, 0))
    return builder.shuffle_vector(one, ir.Constant(vt, None), ir.Constant(vec(32, n), [0] * n))


def shuffle(builder, a, b, idx):
    return builder.shuffle_vector(a, b, ir.Constant(vec(32, len(idx)), list(idx)))


def concat(builder, a, b):
    n = a.type.count
    return shuffle(builder, a, b, range(2 * n))


def half(builder, v, which: int):
    n = v.type.count // 2
    return shuffle(builder, v, v, range(which * n, which * n + n))


def _fn(builder, name: str, ret, args):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), name)


def load_vec(builder, base_i8_ptr, off, ty):
    """Unaligned load of vector type ty from byte pointer base + off."""
    return builder.load(builder.bitcast(builder.gep(base_i8_ptr, [off]), ty.as_pointer()), align=1)


def dp4(builder, isa: int, acc, w, x):
    """acc <16 x i32> + 4-wide dot products of w (<64 x i8>, unsigned) and x (<64 x i8>, signed)."""
    if isa == AVX512VNNI:
        f = _fn(builder, "llvm.x86.avx512.vpdpbusd.512", vec(32, 16), [vec(32, 16)] * 3)
        return builder.call(f, [acc, builder.bitcast(w, vec(32, 16)), builder.bitcast(x, vec(32, 16))])
    if isa == AVXVNNI:
        f = _fn(builder, "llvm.x86.avx512.vpdpbusd.256", vec(32, 8), [vec(32, 8)] * 3)
        parts = [builder.call(f, [half(builder, acc, h), builder.bitcast(half(builder, w, h), vec(32, 8)),
                                  builder.bitcast(half(builder, x, h), vec(32, 8))]) for h in (0, 1)]
        return concat(builder, *parts)
    prod = builder.mul(builder.zext(w, vec(32, 64)), builder.sext(x, vec(32, 64)))
    return builder.add(acc, _sum4(builder, prod))


def _sum4(builder, p):
    """<64 x i32> -> <16 x i32>: lane i = p[4i] + p[4i+1] + p[4i+2] + p[4i+3]."""
    s = [shuffle(builder, p, p, range(j, 64, 4)) for j in range(4)]
    return builder.add(builder.add(s[0], s[1]), builder.add(s[2], s[3]))


def dp4_signed(builder, acc, w, x):
    """As dp4 with signed weights w (<64 x i8>, -128..127), in plain vector IR (the generic
    path's; the others take w + 128 and 128 * sum(x) back, `dp4x2`)."""
    prod = builder.mul(builder.sext(w, vec(32, 64)), builder.sext(x, vec(32, 64)))
    return builder.add(acc, _sum4(builder, prod))


def acc_lanes(isa: int) -> int:
    """Float lanes of a row kernel's accumulators on path isa: 16 where AVX-512 gives 32 vector
    registers, else 8 (a 16-lane product added as two halves; see qmatmul_rows._fma_halves)."""
    return 16 if isa == AVX512VNNI else 8


def wide(isa: int) -> bool:
    """Does path isa take its activations as int16 (`dpw`) rather than as two int8 parts?"""
    return isa == AVX2


# WIDE_ORDER: the elements of a 32-block in the order a wide path stores their int16 activations:
# the pairs (4m, 4m + 1), m = 0..7, then the pairs (4m + 2, 4m + 3) (what `spread` makes of bytes)
WIDE_ORDER = [4 * m + p + q for p in (0, 2) for m in range(8) for q in (0, 1)]
# vpshufb masks (per 128-bit lane): bytes (4j + p, 4j + p + 1) of its four 4-byte groups, each
# zero-extended to int16 (index 0x80 writes a zero byte)
_SPREAD = [[(4 * (i // 4) + p + i // 2 % 2) if i % 2 == 0 else 0x80 for i in range(16)] * 2 for p in (0, 2)]


def spread(builder, w):
    """<64 x i8> unsigned -> four <16 x i16> (two vpshufb per 32-byte half): for each half, the
    bytes (4j, 4j + 1) of its 4-byte groups j = 0..7, then the bytes (4j + 2, 4j + 3), zero-extended."""
    f = _fn(builder, "llvm.x86.avx2.pshuf.b", vec(8, 32), [vec(8, 32)] * 2)
    return [builder.bitcast(builder.call(f, [half(builder, w, h), const_vec(8, m)]), vec(16, 16))
            for h in (0, 1) for m in _SPREAD]


def dpw(builder, acc, ws, xs):
    """acc <16 x i32> + the 4-byte-group dot products of spread weights ws with int16 activations
    xs (four <16 x i16> each, in spread's order): lane 8 h + j = acc + sum over the 4 bytes of
    group j of half h of w times x (two vpmaddwd per half, exact: |w| < 256, |x| < 2^14)."""
    maddwd = _fn(builder, "llvm.x86.avx2.pmadd.wd", vec(32, 8), [vec(16, 16), vec(16, 16)])
    parts = [builder.add(builder.call(maddwd, [ws[2 * h], xs[2 * h]]), builder.call(maddwd, [ws[2 * h + 1], xs[2 * h + 1]]))
             for h in (0, 1)]
    return builder.add(acc, concat(builder, *parts))


def dp4x2(builder, isa: int, acc, w, x, signed=False, x4n=None):
    """acc + dp4 of w with the two-part activations x = (hi, lo): 128 * (w . hi) + (w . lo), the
    products of w with x = 128 hi + lo (two int8 vectors carry a 15-bit activation); on a `wide`
    path x is instead the activations as int16 (four <16 x i16> in WIDE_ORDER per 32-block), the
    same integers through `dpw`. signed: w is signed int8, x4n the negated 4-sums of x (but on
    the generic path: dp4_signed)."""
    zero, seven = const_vec(32, [0] * 16), const_vec(32, [7] * 16)
    if signed and isa != GENERIC:  # (w + 128) . x - 128 * sum(x), once for both parts
        w = builder.xor(w, const_vec(8, [0x80] * 64))
        acc = builder.add(acc, builder.shl(x4n, seven))
        signed = False
    if wide(isa):
        return dpw(builder, acc, spread(builder, w), x)
    hi, lo = x
    if signed:
        first = dp4_signed(builder, zero, w, hi)
        return dp4_signed(builder, builder.add(acc, builder.shl(first, seven)), w, lo)
    first = dp4(builder, isa, zero, w, hi)
    return dp4(builder, isa, builder.add(acc, builder.shl(first, seven)), w, lo)


def hsum(builder, v):
    """Sum of a float vector's lanes in a fixed tree (halves added lane by lane)."""
    n = v.type.count
    while n > 1:
        n //= 2
        v = builder.fadd(shuffle(builder, v, v, range(n)), shuffle(builder, v, v, range(n, 2 * n)))
    return builder.extract_element(v, ir.Constant(I32, 0))


def f16_to_f32(builder, i8ptr, off):
    """The little-endian float16 at byte i8ptr + off, widened to float32 (exact)."""
    h = builder.load(builder.bitcast(builder.gep(i8ptr, [off]), ir.HalfType().as_pointer()), align=1)
    return builder.fpext(h, F32)
