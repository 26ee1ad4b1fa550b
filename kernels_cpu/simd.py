"""The CPU's int8 dot-product instruction, as LLVM IR for numba intrinsics, chosen at run time.

Every path computes the same exact integer function on 64 byte pairs (w unsigned 0..255 unless
said, x signed -127..127), 16 int32 lanes, lane i = acc[i] + sum_{j<4} w[4i+j] * x[4i+j]:

| ISA          | instruction                                   | picked when the CPU has       |
|--------------|-----------------------------------------------|-------------------------------|
| avx512vnni   | vpdpbusd zmm (one per 64 pairs)               | avx512vnni + avx512bw/vl      |
| avxvnni      | {vex} vpdpbusd ymm (two)                      | avxvnni (Alder Lake, Zen 5)   |
| avx2         | vpmaddubsw + vpmaddwd by ones (two each)      | avx2                          |
| generic      | widening multiply and add in plain vector IR  | anything (ARM, older x86)     |

vpmaddubsw saturates pair sums at int16, so on avx2 a weight must stay below 128: signed int8
weights (Q8_0) go through `dp4_signed` (vpsignb moves the sign onto x), which the VNNI paths do
as (w + 128) . x - 128 * sum(x) with the sums precomputed. All paths agree bit for bit.

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
    if isa == AVX2:
        maddubs = _fn(builder, "llvm.x86.avx2.pmadd.ub.sw", vec(16, 16), [vec(8, 32), vec(8, 32)])
        maddwd = _fn(builder, "llvm.x86.avx2.pmadd.wd", vec(32, 8), [vec(16, 16), vec(16, 16)])
        ones = const_vec(16, [1] * 16)
        parts = [builder.call(maddwd, [builder.call(maddubs, [half(builder, w, h), half(builder, x, h)]), ones])
                 for h in (0, 1)]
        return builder.add(acc, concat(builder, *parts))
    prod = builder.mul(builder.zext(w, vec(32, 64)), builder.sext(x, vec(32, 64)))
    return builder.add(acc, _sum4(builder, prod))


def _sum4(builder, p):
    """<64 x i32> -> <16 x i32>: lane i = p[4i] + p[4i+1] + p[4i+2] + p[4i+3]."""
    s = [shuffle(builder, p, p, range(j, 64, 4)) for j in range(4)]
    return builder.add(builder.add(s[0], s[1]), builder.add(s[2], s[3]))


def dp4_signed(builder, isa: int, acc, w, x, x4n):
    """As dp4 with signed weights w (<64 x i8>, -128..127). x4n <16 x i32>: minus the sums of x
    over each lane's 4 elements (the VNNI paths add 128 to w and take 128 * sum(x) back)."""
    if isa in (AVX512VNNI, AVXVNNI):
        acc = builder.add(acc, builder.shl(x4n, const_vec(32, [7] * 16)))
        return dp4(builder, isa, acc, builder.xor(w, const_vec(8, [0x80] * 64)), x)
    if isa == AVX2:
        sign = _fn(builder, "llvm.x86.avx2.psign.b", vec(8, 32), [vec(8, 32), vec(8, 32)])
        absf = _fn(builder, "llvm.abs.v64i8", vec(8, 64), [vec(8, 64), ir.IntType(1)])
        aw = builder.call(absf, [w, ir.Constant(ir.IntType(1), 0)])  # |-128| = 128 as u8: exact
        sx = concat(builder, *[builder.call(sign, [half(builder, x, h), half(builder, w, h)]) for h in (0, 1)])
        return dp4(builder, isa, acc, aw, sx)
    prod = builder.mul(builder.sext(w, vec(32, 64)), builder.sext(x, vec(32, 64)))
    return builder.add(acc, _sum4(builder, prod))


def dp4x2(builder, isa: int, acc, w, x, signed=False, x4n=None):
    """acc + dp4 of w with the two-part activations x = (hi, lo): 128 * (w . hi) + (w . lo), the
    products of w with x = 128 hi + lo (two int8 vectors carry a 15-bit activation). signed: w is
    signed int8 (dp4_signed, with x4n the negated 4-sums of 128 hi + lo)."""
    hi, lo = x
    zero, seven = const_vec(32, [0] * 16), const_vec(32, [7] * 16)
    if signed and isa in (AVX512VNNI, AVXVNNI):  # (w + 128) . x - 128 * sum(x), once for both parts
        w = builder.xor(w, const_vec(8, [0x80] * 64))
        acc = builder.add(acc, builder.shl(x4n, seven))
        signed = False
    if signed:
        first = dp4_signed(builder, isa, zero, w, hi, None)
        return dp4_signed(builder, isa, builder.add(acc, builder.shl(first, seven)), w, lo, None)
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
