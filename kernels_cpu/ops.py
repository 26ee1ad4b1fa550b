"""Numba CPU kernels for the non-matmul ops: norms, RoPE, softmax, gated activations, attention.

Same functions and signatures as the numpy references in `ops_ref.py`; tests/test_kernels_ops.py
compares the two. Elementwise ops use the references' float32 arithmetic (no fastmath), so they
agree to a few ulp; attention uses fastmath (reassociated float32 sums) and agrees with the float64
reference to ~1e-6 relative.

Small inputs run on one thread: a parallel launch costs ~10 us, more than a decode-sized norm.
numba has no float16 on the CPU, so float16 KV caches are passed to the kernels as their uint16
bits and widened exactly in `_row_f32` (one instruction on F16C / ARMv8, a bit trick elsewhere).
Quantized caches (q8_0, q4_0: `kv_store`) are read a row at a time, dequantized into a float32 row.
"""
from __future__ import annotations

import math
import platform

import numba
import numpy as np
from llvmlite import binding as llvm
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

from .ops_ref import GELU_COEF_A, SQRT_2_OVER_PI, rope_theta_scale

F32 = np.float32
_FM = {"nsz", "arcp", "contract", "reassoc"}  # fastmath without nnan/ninf: -inf and 0-weights stay exact
_PAR_MIN = 1 << 15  # elements of work below which a kernel stays on one thread
_BLK = 1 << 13  # elements per parallel chunk of an elementwise op
_BK = 64  # keys per block in prefill attention
_Q_ROWS = 64  # (query, head) rows per prefill work item
DECODE_T = 16  # batches up to this many queries attend one query at a time (speculative verification)


# ---- norms, rope, softmax, gates -------------------------------------------------------------

@njit(cache=True, fastmath={"reassoc"})
def _rms_row(x, w, eps, out):  # x (D,), w (D,), out (D,)
    ss = 0.0
    for i in range(x.shape[0]):
        ss += np.float64(x[i] * x[i])
    scale = F32(1.0) / F32(math.sqrt(F32(ss / x.shape[0]) + eps))
    for i in range(x.shape[0]):
        out[i] = (x[i] * scale) * w[i]


@njit(cache=True, parallel=True)
def _rms_norm(x, w, eps, out):  # x (R, D), w (D,), out (R, D)
    if x.size < _PAR_MIN:
        for r in range(x.shape[0]):
            _rms_row(x[r], w, eps, out[r])
    else:
        for r in prange(x.shape[0]):
            _rms_row(x[r], w, eps, out[r])


def rms_norm(x, weight, eps):
    """x / sqrt(mean(x^2) + eps) * weight over the last axis (float64 sum, float32 rest).

    x      # (..., D) float32: (n_tokens, dim) or (n_tokens, n_heads, head_dim) for q/k norms
    weight # (D,) float32
    """
    x = np.ascontiguousarray(x, dtype=F32)
    out = np.empty_like(x)
    d = x.shape[-1]
    _rms_norm(x.reshape(-1, d), np.ascontiguousarray(weight, dtype=F32), F32(eps),
              out.reshape(-1, d))
    return out


@njit(cache=True)
def _rope_angles(p0, p1, ts, fs, half, cs, sn):  # rows p0..p1-1 of the tables (P, half)
    for p in range(p0, p1):
        theta = F32(p)
        for i in range(half):  # ggml_rope_cache_init: theta *= theta_scale in float32
            a = np.float64(fs * theta)
            cs[p, i] = F32(math.cos(a))
            sn[p, i] = F32(math.sin(a))
            theta = theta * ts


@njit(cache=True)
def _rope_token(x, cs, sn, neox, n_rot, out):  # x (H, Dh), cs, sn (half,), out (H, Dh)
    half = n_rot // 2
    for h in range(x.shape[0]):
        for i in range(half):
            i0 = i if neox else 2 * i
            i1 = i + half if neox else 2 * i + 1
            x0 = x[h, i0]
            x1 = x[h, i1]
            out[h, i0] = x0 * cs[i] - x1 * sn[i]
            out[h, i1] = x0 * sn[i] + x1 * cs[i]
        for d in range(n_rot, x.shape[1]):
            out[h, d] = x[h, d]


@njit(cache=True, parallel=True)
def _rope(x, pos, cs, sn, neox, n_rot, out):  # x (T, H, Dh), pos (T,), out (T, H, Dh)
    if x.size < _PAR_MIN:
        for t in range(x.shape[0]):
            _rope_token(x[t], cs[pos[t]], sn[pos[t]], neox, n_rot, out[t])
    else:
        for t in prange(x.shape[0]):
            _rope_token(x[t], cs[pos[t]], sn[pos[t]], neox, n_rot, out[t])


_ROPE_TABLES: dict = {}  # (theta_scale, freq_scale, n_rot) -> (cos, sin) (P, n_rot / 2) float32
_ROPE_SCALES: dict = {}  # (theta_base, n_rot, freq_scale) -> (theta_scale, freq_scale) float32


def _rope_table(ts, fs, n_rot: int, p_max: int):
    """cos and sin of every position up to p_max (computed once, shared by q and k and by every
    layer of the same base: ggml's per-token angles, looked up)."""
    key = (float(ts), float(fs), n_rot)
    cs, sn = _ROPE_TABLES.get(key, (None, None))
    have = 0 if cs is None else cs.shape[0]
    if p_max >= have:
        n = max(1024, 2 * have, p_max + 1)
        cs2, sn2 = np.empty((n, n_rot // 2), F32), np.empty((n, n_rot // 2), F32)
        if have:
            cs2[:have], sn2[:have] = cs, sn
        _rope_angles(have, n, ts, fs, n_rot // 2, cs2, sn2)
        cs, sn = _ROPE_TABLES[key] = (cs2, sn2)
    return cs, sn


def rope(x, positions, theta_base, neox, n_rot=None, freq_scale=1.0):
    """Rotary embedding as ggml's rope (see ops_ref.rope); returns a new array.

    x         # (n_tokens, n_heads, head_dim) float32
    positions # (n_tokens,) int
    """
    x = np.ascontiguousarray(x, dtype=F32)
    n_rot = x.shape[-1] if n_rot is None else int(n_rot)
    if n_rot % 2 or not 0 < n_rot <= x.shape[-1]:
        raise ValueError(f"rope: n_rot={n_rot} must be even and within head_dim={x.shape[-1]}")
    pos = np.ascontiguousarray(positions, dtype=np.int64)
    lo, hi = (int(pos[0]), int(pos[0])) if pos.size == 1 else (int(pos.min()), int(pos.max())) if pos.size else (0, 0)
    if lo < 0 or hi >= 1 << 24:
        raise ValueError(f"rope: positions must be in 0..{(1 << 24) - 1}")
    key = (theta_base, n_rot, freq_scale)
    scales = _ROPE_SCALES.get(key)
    if scales is None:  # (a decode step's rope is mostly this Python: looked up, not recomputed)
        scales = _ROPE_SCALES[key] = (rope_theta_scale(theta_base, n_rot), F32(freq_scale))
    cs, sn = _rope_table(*scales, n_rot, hi)
    out = np.empty_like(x)
    _rope(x, pos, cs, sn, bool(neox), n_rot, out)
    return out


@njit(cache=True)
def _softmax_row(x, out):  # x (N,), out (N,)
    m = x[0]
    for i in range(1, x.shape[0]):
        m = max(m, x[i])
    s = 0.0
    for i in range(x.shape[0]):
        e = math.exp(x[i] - m)
        out[i] = e
        s += np.float64(e)
    inv = F32(1.0 / s)
    for i in range(x.shape[0]):
        out[i] *= inv


@njit(cache=True, parallel=True)
def _softmax(x, out):  # x (R, N), out (R, N)
    if x.size < _PAR_MIN:
        for r in range(x.shape[0]):
            _softmax_row(x[r], out[r])
    else:
        for r in prange(x.shape[0]):
            _softmax_row(x[r], out[r])


def softmax(x):
    """Numerically stable softmax over the last axis. x # (..., N) float32"""
    x = np.ascontiguousarray(x, dtype=F32)
    out = np.empty_like(x)
    _softmax(x.reshape(-1, x.shape[-1]), out.reshape(-1, x.shape[-1]))
    return out


@intrinsic
def _pow2(typingctx, n):
    """int32 n in [-126, 127] -> float32 2**n, built from its exponent bits."""
    def codegen(context, builder, sig, args):
        i32 = ir.IntType(32)
        bits = builder.shl(builder.add(args[0], ir.Constant(i32, 127)), ir.Constant(i32, 23))
        return builder.bitcast(bits, ir.FloatType())
    return types.float32(types.int32), codegen


_LOG2E, _LN2_HI, _LN2_LO = F32(1.4426950408889634), F32(0.693359375), F32(-2.12194440e-4)


@njit(cache=True, inline="always")
def _exp(x):
    """float32 exp(x), within ~2 ulp of libm's, as straight-line code the loop vectorizer turns
    into SIMD (libm's expf is a call per element): x = n ln2 + r, |r| <= ln2 / 2 (Cody-Waite
    with a two-part ln2), e^r by its Taylor series to r^7 (error < 1e-8), times 2^n. x is clamped
    to [-87, 88] (exp(-87) ~ 1.6e-38: the gates below then give 0 or x exactly as libm's would
    to float32)."""
    x = min(max(x, F32(-87.0)), F32(88.0))
    n = np.floor(x * _LOG2E + F32(0.5))
    r = (x - n * _LN2_HI) - n * _LN2_LO
    p = F32(1.0) + r * (F32(1.0) + r * (F32(1 / 2) + r * (F32(1 / 6) + r * (F32(1 / 24) + r * (
        F32(1 / 120) + r * (F32(1 / 720) + r * F32(1 / 5040)))))))
    return p * _pow2(np.int32(n))


@njit(cache=True, error_model="numpy")  # no zero-division checks: they stop the vectorizer
def _silu_row(g, u, out):  # g, u, out (n,)
    for i in range(g.shape[0]):
        x = g[i]
        out[i] = x / (F32(1.0) + _exp(-x)) * u[i]


@njit(cache=True, error_model="numpy")
def _gelu_row(g, u, out):  # g, u, out (n,)
    # 0.5 x (1 + tanh(y)) = x / (1 + exp(-2y)): the same function with no cancellation at y < 0
    for i in range(g.shape[0]):
        x = g[i]
        inner = SQRT_2_OVER_PI * x * (F32(1.0) + GELU_COEF_A * x * x)
        out[i] = x / (F32(1.0) + _exp(F32(-2.0) * inner)) * u[i]


@njit(cache=True, parallel=True)
def _silu_gate(g, u, out):  # g, u (T, n), rows may be strided; out (T, n)
    if g.size < _PAR_MIN:
        for t in range(g.shape[0]):
            _silu_row(g[t], u[t], out[t])
    else:
        nb = (g.shape[1] + _BLK - 1) // _BLK
        for it in prange(g.shape[0] * nb):
            t, b = it // nb, it % nb
            a, e = b * _BLK, min(g.shape[1], (b + 1) * _BLK)
            _silu_row(g[t, a:e], u[t, a:e], out[t, a:e])


@njit(cache=True, parallel=True)
def _gelu_gate(g, u, out):  # g, u (T, n), rows may be strided; out (T, n)
    if g.size < _PAR_MIN:
        for t in range(g.shape[0]):
            _gelu_row(g[t], u[t], out[t])
    else:
        nb = (g.shape[1] + _BLK - 1) // _BLK
        for it in prange(g.shape[0] * nb):
            t, b = it // nb, it % nb
            a, e = b * _BLK, min(g.shape[1], (b + 1) * _BLK)
            _gelu_row(g[t, a:e], u[t, a:e], out[t, a:e])


def _gate(kernel, gate, up):
    if gate.shape != up.shape:
        raise ValueError(f"gate {gate.shape} and up {up.shape} must have the same shape")
    shape = gate.shape
    g, u = (np.asarray(a, dtype=F32).reshape(-1, shape[-1]) for a in (gate, up))
    if g.strides[-1] != 4:
        g = np.ascontiguousarray(g)
    if u.strides[-1] != 4:
        u = np.ascontiguousarray(u)
    out = np.empty(g.shape, F32)
    kernel(g, u, out)
    return out.reshape(shape)


def silu_gate(gate, up):
    """silu(gate) * up. gate, up # (n_tokens, n_ff) float32"""
    return _gate(_silu_gate, gate, up)


def gelu_tanh_gate(gate, up):
    """gelu_tanh(gate) * up (ggml's constants; see ops_ref). gate, up # (n_tokens, n_ff) float32"""
    return _gate(_gelu_gate, gate, up)


# ---- attention ---------------------------------------------------------------------------------

def _native_f16() -> bool:
    """Can LLVM widen float16 with an instruction (x86 F16C, ARMv8) rather than a libcall that
    numba's JIT could not link?"""
    if platform.machine().lower() in ("aarch64", "arm64"):
        return True
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    features = numba.config.CPU_FEATURES or ""  # NUMBA_CPU_FEATURES overrides the host's
    return "+f16c" in features if features else bool(llvm.get_host_cpu_features().get("f16c"))


_NATIVE_F16 = _native_f16()


@intrinsic
def _bitcast_f32(typingctx, u):  # uint32 bits -> float32
    return types.float32(types.uint32), lambda c, b, sig, a: b.bitcast(a[0], ir.FloatType())


@intrinsic
def _fpext_f16(typingctx, h):  # uint16 holding float16 bits -> float32 (vcvtph2ps / fcvt)
    return types.float32(types.uint16), lambda c, b, sig, a: b.fpext(
        b.bitcast(a[0], ir.HalfType()), ir.FloatType())


@njit(cache=True)
def _f16_soft(x):  # uint16 holding float16 bits -> float32 without F16C; exact for every pattern
    h = np.uint32(x)
    f = _bitcast_f32((h & np.uint32(0x7FFF)) << np.uint32(13)) * F32(2.0 ** 112)  # rebias/renormalise
    if h & np.uint32(0x7C00) == np.uint32(0x7C00):  # inf, nan
        f = _bitcast_f32(np.uint32(0x7F800000) | ((h & np.uint32(0x3FF)) << np.uint32(13)))
    return -f if h & np.uint32(0x8000) else f


def _to_f32(x):
    """One cache element as float32: x is float32, or uint16 holding float16 bits."""


@overload(_to_f32)
def _to_f32_impl(x):
    if x == types.float32:
        return lambda x: x
    if x == types.uint16:
        return (lambda x: _fpext_f16(x)) if _NATIVE_F16 else (lambda x: _f16_soft(x))


@njit(cache=True)
def _row_f32(src, dst):  # src (Dh,) float32 or uint16 (float16 bits), dst (Dh,) float32
    for d in range(src.shape[0]):
        dst[d] = _to_f32(src[d])


def _load_row(c, j, h, dst):
    """Row j, kv head h of a cache as float32 into dst (Dh,): c is (S, Hkv, Dh) float32 or uint16
    (float16 bits), or a quantized cache (qs, d) (see `kv_store`), dequantized as quant.formats does."""


@overload(_load_row)
def _load_row_impl(c, j, h, dst):
    if isinstance(c, types.Array):
        return lambda c, j, h, dst: _row_f32(c[j, h], dst)
    if c.types[0].dtype == types.int8:  # q8_0
        def q8(c, j, h, dst):
            qs, d = c[0][j, h], c[1][j, h]
            for b in range(d.shape[0]):
                s = _to_f32(d[b])
                for i in range(32):
                    dst[32 * b + i] = F32(qs[32 * b + i]) * s
        return q8

    def q4(c, j, h, dst):  # q4_0: low nibbles are elements 0-15 of a block, high nibbles 16-31
        qs, d = c[0][j, h], c[1][j, h]
        for b in range(d.shape[0]):
            s = _to_f32(d[b])
            for i in range(16):
                x = qs[16 * b + i]
                dst[32 * b + i] = F32(np.int32(x & 15) - 8) * s
                dst[32 * b + 16 + i] = F32(np.int32(x >> 4) - 8) * s
    return q4


def _kv_heads(c):
    """n_kv_heads of a cache array or quantized cache."""


@overload(_kv_heads)
def _kv_heads_impl(c):
    if isinstance(c, types.Array):
        return lambda c: c.shape[1]
    return lambda c: c[0].shape[1]


# ---- storing into a cache ----------------------------------------------------------------------

@intrinsic
def _bitcast_u32(typingctx, f):  # float32 -> its uint32 bits
    return types.uint32(types.float32), lambda c, b, sig, a: b.bitcast(a[0], ir.IntType(32))


@njit(cache=True)
def _f16_bits(f):
    """float32 -> float16 bits, rounded to nearest even (numpy's astype), with no F16C needed."""
    u = _bitcast_u32(f)
    sign = np.uint16((u >> np.uint32(16)) & np.uint32(0x8000))
    a = u & np.uint32(0x7FFFFFFF)
    if a > np.uint32(0x7F800000):  # nan
        return sign | np.uint16(0x7E00)
    if a >= np.uint32(0x477FF000):  # 65520 and above round to inf
        return sign | np.uint16(0x7C00)
    if a < np.uint32(0x38800000):  # below 2^-14: a subnormal half; scaling by 2^24 is exact
        return sign | np.uint16(np.rint(abs(f) * F32(16777216.0)))
    h = ((a >> np.uint32(13)) - np.uint32(0x1C000))  # rebias the exponent 127 -> 15
    rest = a & np.uint32(0x1FFF)
    if rest > np.uint32(0x1000) or (rest == np.uint32(0x1000) and h & np.uint32(1)):
        h += np.uint32(1)  # a carry into the exponent is the right rounding too
    return sign | np.uint16(h)


@njit(cache=True)
def _roundf(v):  # C's roundf: halves away from zero (v - trunc(v) is exact)
    t = F32(math.trunc(v))
    if abs(v - t) >= F32(0.5):
        t += F32(1.0) if v > 0 else F32(-1.0)
    return t


@njit(cache=True)
def _store_q8_0(x, rows, qs, d):  # x (T, H, Dh) f32; qs (S, H, Dh) int8; d (S, H, Dh/32) uint16
    for t in range(x.shape[0]):
        for h in range(x.shape[1]):
            for b in range(d.shape[2]):
                xb = x[t, h, 32 * b:32 * b + 32]
                amax = F32(0.0)
                for i in range(32):
                    amax = max(amax, abs(xb[i]))
                db = amax / F32(127.0)
                inv = F32(1.0) / db if db != 0 else F32(0.0)
                d[rows[t], h, b] = _f16_bits(db)
                for i in range(32):
                    qs[rows[t], h, 32 * b + i] = np.int8(_roundf(xb[i] * inv))


@njit(cache=True)
def _store_q4_0(x, rows, qs, d):  # x (T, H, Dh) f32; qs (S, H, Dh/2) uint8; d (S, H, Dh/32) uint16
    for t in range(x.shape[0]):
        for h in range(x.shape[1]):
            for b in range(d.shape[2]):
                xb = x[t, h, 32 * b:32 * b + 32]
                m = xb[0]
                for i in range(1, 32):  # the first value of largest magnitude, sign kept
                    if abs(xb[i]) > abs(m):
                        m = xb[i]
                db = m / F32(-8.0)
                inv = F32(1.0) / db if db != 0 else F32(0.0)
                d[rows[t], h, b] = _f16_bits(db)
                for i in range(16):
                    lo = min(15, np.int32(xb[i] * inv + F32(8.5)))
                    hi = min(15, np.int32(xb[i + 16] * inv + F32(8.5)))
                    qs[rows[t], h, 16 * b + i] = np.uint8(lo | (hi << 4))


@njit(cache=True)
def _kv_rotate(x, n, out):  # x, out (R, D) float32; fast Walsh-Hadamard butterflies per chunk of n
    scale = F32(1.0 / math.sqrt(n))
    for r in range(x.shape[0]):
        for c0 in range(0, x.shape[1], n):
            b = out[r, c0:c0 + n]
            b[:] = x[r, c0:c0 + n]
            h = 1
            while h < n:
                for i in range(0, n, 2 * h):
                    for j in range(i, i + h):
                        u, w = b[j], b[j + h]
                        b[j], b[j + h] = u + w, u - w
                h *= 2
            for j in range(n):
                b[j] *= scale


def kv_rotate(x, n):
    """As ops_ref.kv_rotate (every chunk of n values of x (..., D) times the orthonormal Hadamard
    matrix), by butterflies in a fixed order per row: a row's result does not depend on how many
    rows share the call (a BLAS product's may, and a quantized cache would magnify the difference)."""
    x = np.ascontiguousarray(x, dtype=F32)
    if n & (n - 1) or x.shape[-1] % n:
        raise ValueError(f"kv_rotate: {x.shape[-1]} values do not split into chunks of a power of two {n}")
    out = np.empty_like(x)
    _kv_rotate(x.reshape(-1, x.shape[-1]), n, out.reshape(-1, x.shape[-1]))
    return out


def kv_store(cache, x, rows):
    """Write x (T, n_kv_heads, head_dim) float32 into rows (T,) of a cache, as ops_ref.kv_store:
    a float16/float32 array as is, a quantized cache (qs, d) quantized here, bit for bit as the
    reference quantizer of its GGML type."""
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    if not isinstance(cache, tuple):
        cache[rows] = x
        return
    qs, d = cache
    x = np.ascontiguousarray(x, dtype=F32)
    if x.ndim != 3 or x.shape[1] != d.shape[1] or x.shape[2] != 32 * d.shape[2] \
            or rows.shape != (x.shape[0],) or (rows.size and (rows.min() < 0 or rows.max() >= d.shape[0])):
        raise ValueError(f"kv_store: x {x.shape} at rows {rows.shape} does not fit a cache of {qs.shape}")
    (_store_q8_0 if qs.dtype == np.int8 else _store_q4_0)(x, rows, qs, d.view(np.uint16))


@njit(cache=True, fastmath=_FM)
def _score(q, k, scale, softcap):  # q (Dh,), k (Dh,) -> scaled, soft-capped q.k
    s = F32(0.0)
    for d in range(q.shape[0]):
        s += q[d] * k[d]
    s *= scale
    if softcap > 0:
        s = softcap * math.tanh(s / softcap)
    return s


@njit(cache=True)
def _first_key(p, window):
    return max(0, p - window + 1) if window > 0 else 0


@njit(cache=True, inline="always")
def _cap(s, softcap):
    return softcap * math.tanh(s / softcap) if softcap > 0 else s


@njit(cache=True, fastmath=_FM, inline="always")
def _scores4(qr, kb, c0, c1, scale, softcap, s):
    """s[c] = _score(qr, kb[c]) for keys c0..c1, four keys per pass over qr (one load of each
    of its vectors serves four dot products: 1.5B's prefill attention was ~35 G flop/s)."""
    c = c0
    while c + 3 <= c1:
        s0 = s1 = s2 = s3 = F32(0.0)
        for d in range(qr.shape[0]):
            x = qr[d]
            s0 += x * kb[c, d]
            s1 += x * kb[c + 1, d]
            s2 += x * kb[c + 2, d]
            s3 += x * kb[c + 3, d]
        s[c], s[c + 1], s[c + 2], s[c + 3] = (_cap(s0 * scale, softcap), _cap(s1 * scale, softcap),
                                              _cap(s2 * scale, softcap), _cap(s3 * scale, softcap))
        c += 4
    while c <= c1:
        s[c] = _score(qr, kb[c], scale, softcap)
        c += 1


@njit(cache=True, fastmath=_FM, inline="always")
def _scores4x2(qa, qb, kb, c0, c1, scale, softcap, sa, sb):
    """_scores4 for two query rows at once (two heads of one token: the same keys), each key
    vector loaded once for both."""
    c = c0
    while c + 3 <= c1:
        a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = F32(0.0)
        for d in range(qa.shape[0]):
            x, y = qa[d], qb[d]
            k0, k1, k2, k3 = kb[c, d], kb[c + 1, d], kb[c + 2, d], kb[c + 3, d]
            a0 += x * k0
            a1 += x * k1
            a2 += x * k2
            a3 += x * k3
            b0 += y * k0
            b1 += y * k1
            b2 += y * k2
            b3 += y * k3
        sa[c], sa[c + 1], sa[c + 2], sa[c + 3] = (_cap(a0 * scale, softcap), _cap(a1 * scale, softcap),
                                                  _cap(a2 * scale, softcap), _cap(a3 * scale, softcap))
        sb[c], sb[c + 1], sb[c + 2], sb[c + 3] = (_cap(b0 * scale, softcap), _cap(b1 * scale, softcap),
                                                  _cap(b2 * scale, softcap), _cap(b3 * scale, softcap))
        c += 4
    while c <= c1:
        sa[c] = _score(qa, kb[c], scale, softcap)
        sb[c] = _score(qb, kb[c], scale, softcap)
        c += 1


@njit(cache=True, fastmath=_FM, inline="always")
def _online(s, c0, c1, m, l, a, r):
    """Row r's online-softmax step over its scores s[c0..c1] of a key block: the running max
    m[r], sum l[r] and accumulator a rescaled, s[c] -> exp(s[c] - max)."""
    bm = -np.inf
    for c in range(c0, c1 + 1):
        bm = max(bm, s[c])
    m_new = max(m[r], bm)
    alpha = math.exp(m[r] - m_new)
    l[r] *= alpha
    for d in range(a.shape[0]):
        a[d] *= alpha
    ls = F32(0.0)
    for c in range(c0, c1 + 1):  # straight-line: vectorized
        e = _exp(s[c] - m_new)
        s[c] = e
        ls += e
    l[r] += ls
    m[r] = m_new


@njit(cache=True, fastmath=_FM, inline="always")
def _accumulate4(a, e, vb, c0, c1):
    """a (Dh,) += sum over keys c0..c1 of e[c] * vb[c], four keys per pass over a."""
    c = c0
    while c + 3 <= c1:
        e0, e1, e2, e3 = e[c], e[c + 1], e[c + 2], e[c + 3]
        for d in range(a.shape[0]):
            a[d] = a[d] + e0 * vb[c, d] + e1 * vb[c + 1, d] + e2 * vb[c + 2, d] + e3 * vb[c + 3, d]
        c += 4
    while c <= c1:
        e0 = e[c]
        for d in range(a.shape[0]):
            a[d] += e0 * vb[c, d]
        c += 1


@njit(cache=True, fastmath=_FM, inline="always")
def _accumulate4x2(aa, ab, ea, eb, vb, c0, c1):
    """_accumulate4 for two rows at once, each value vector loaded once for both."""
    c = c0
    while c + 3 <= c1:
        x0, x1, x2, x3 = ea[c], ea[c + 1], ea[c + 2], ea[c + 3]
        y0, y1, y2, y3 = eb[c], eb[c + 1], eb[c + 2], eb[c + 3]
        for d in range(aa.shape[0]):
            v0, v1, v2, v3 = vb[c, d], vb[c + 1, d], vb[c + 2, d], vb[c + 3, d]
            aa[d] = aa[d] + x0 * v0 + x1 * v1 + x2 * v2 + x3 * v3
            ab[d] = ab[d] + y0 * v0 + y1 * v1 + y2 * v2 + y3 * v3
        c += 4
    while c <= c1:
        x0, y0 = ea[c], eb[c]
        for d in range(aa.shape[0]):
            aa[d] += x0 * vb[c, d]
            ab[d] += y0 * vb[c, d]
        c += 1


@njit(cache=True, fastmath=_FM)
def _decode_item(q, k, v, kvh, j0, j1, scale, softcap, cap, c, m_part, l_part, acc_part):
    """Keys j0..j1-1 of kv head kvh for its G query heads, into partial softmax state c.

    q # (Hq, Dh); k, v # (S, Hkv, Dh); m_part, l_part # (Hq, n_chunks); acc_part # (n_chunks, Hq, Dh)
    """
    G = q.shape[0] // _kv_heads(k)
    h0 = kvh * G
    n = j1 - j0
    if n <= 0:  # an empty chunk (only with > 64 chunks) contributes nothing
        for g in range(G):
            m_part[h0 + g, c] = -np.inf
            l_part[h0 + g, c] = 0.0
            for d in range(q.shape[1]):
                acc_part[c, h0 + g, d] = 0.0
        return
    sc = np.empty((G, n), dtype=F32)
    kb = np.empty((min(n, _BK), q.shape[1]), dtype=F32)
    for b0 in range(0, n, _BK):  # keys in blocks, four at a time against two heads (as prefill)
        nb = min(_BK, n - b0)
        for i in range(nb):  # (c is this item's chunk)
            j = j0 + b0 + i
            _load_row(k, j % cap if cap > 0 else j, kvh, kb[i])
        g = 0
        while g < G:
            if g + 1 < G:
                _scores4x2(q[h0 + g], q[h0 + g + 1], kb, 0, nb - 1, scale, softcap, sc[g, b0:], sc[g + 1, b0:])
                g += 2
            else:
                _scores4(q[h0 + g], kb, 0, nb - 1, scale, softcap, sc[g, b0:])
                g += 1
    for g in range(G):
        m = sc[g, 0]
        for jj in range(1, n):
            m = max(m, sc[g, jj])
        s = F32(0.0)
        for jj in range(n):
            e = _exp(sc[g, jj] - m)
            sc[g, jj] = e
            s += e
        m_part[h0 + g, c] = m
        l_part[h0 + g, c] = s
        for d in range(q.shape[1]):
            acc_part[c, h0 + g, d] = 0.0
    for b0 in range(0, n, _BK):
        nb = min(_BK, n - b0)
        for i in range(nb):
            j = j0 + b0 + i
            _load_row(v, j % cap if cap > 0 else j, kvh, kb[i])
        g = 0
        while g < G:
            if g + 1 < G:
                _accumulate4x2(acc_part[c, h0 + g], acc_part[c, h0 + g + 1], sc[g, b0:], sc[g + 1, b0:], kb, 0, nb - 1)
                g += 2
            else:
                _accumulate4(acc_part[c, h0 + g], sc[g, b0:], kb, 0, nb - 1)
                g += 1


@njit(cache=True, parallel=True, fastmath=_FM)
def _attn_decode(q, k, v, p, scale, window, softcap, cap, n_chunks, par, out):
    """One query at position p: split-K over (kv head, key chunk) items, then merge.

    q, out # (Hq, Dh); k, v # (S, Hkv, Dh) float32 or uint16 (float16 bits)
    """
    Hq, Dh = q.shape
    Hkv = _kv_heads(k)
    lo = _first_key(p, window)
    chunk = (p - lo + n_chunks) // n_chunks
    m_part = np.empty((Hq, n_chunks), dtype=F32)
    l_part = np.empty((Hq, n_chunks), dtype=F32)
    acc_part = np.empty((n_chunks, Hq, Dh), dtype=F32)
    if par:
        for it in prange(Hkv * n_chunks):
            j0 = lo + (it % n_chunks) * chunk
            _decode_item(q, k, v, it // n_chunks, j0, min(j0 + chunk, p + 1), scale, softcap,
                         cap, it % n_chunks, m_part, l_part, acc_part)
    else:
        for it in range(Hkv * n_chunks):
            j0 = lo + (it % n_chunks) * chunk
            _decode_item(q, k, v, it // n_chunks, j0, min(j0 + chunk, p + 1), scale, softcap,
                         cap, it % n_chunks, m_part, l_part, acc_part)
    for h in range(Hq):
        m = m_part[h, 0]
        for c in range(1, n_chunks):
            m = max(m, m_part[h, c])
        s = F32(0.0)
        for d in range(Dh):  # explicit loops: an array expression here would become a parfor
            out[h, d] = 0.0
        for c in range(n_chunks):
            w = math.exp(m_part[h, c] - m)
            s += w * l_part[h, c]
            for d in range(Dh):
                out[h, d] += w * acc_part[c, h, d]
        inv = F32(1.0) / s
        for d in range(Dh):
            out[h, d] *= inv


@njit(cache=True, fastmath=_FM)
def _prefill_item(q, k, v, pos, scale, window, softcap, cap, kvh, t0, t1, out):
    """Flash-style online softmax for queries t0..t1-1 and the G query heads of kv head kvh.

    q, out # (T, Hq, Dh); k, v # (S, Hkv, Dh); pos # (T,)
    """
    Dh = q.shape[2]
    G = q.shape[1] // _kv_heads(k)
    h0 = kvh * G
    R = (t1 - t0) * G  # rows r = (t - t0) * G + g
    m = np.full(R, -np.inf, dtype=F32)
    l = np.zeros(R, dtype=F32)
    acc = np.zeros((R, Dh), dtype=F32)
    kb = np.empty((_BK, Dh), dtype=F32)
    vb = np.empty((_BK, Dh), dtype=F32)
    s, s2 = np.empty(_BK, dtype=F32), np.empty(_BK, dtype=F32)
    jlo, jhi = pos[t0], pos[t0]
    for t in range(t0, t1):
        jlo = min(jlo, _first_key(pos[t], window))
        jhi = max(jhi, pos[t])
    for b0 in range(jlo, jhi + 1, _BK):
        nb = min(_BK, jhi + 1 - b0)
        for c in range(nb):
            j = b0 + c
            _load_row(k, j % cap if cap > 0 else j, kvh, kb[c])
            _load_row(v, j % cap if cap > 0 else j, kvh, vb[c])
        r = 0
        while r < R:  # a token's heads two at a time (they read the same keys)
            t, h = t0 + r // G, h0 + r % G
            two = r % G + 1 < G
            c0 = max(b0, _first_key(pos[t], window)) - b0
            c1 = min(b0 + nb - 1, pos[t]) - b0
            if c1 >= c0 and two:
                _scores4x2(q[t, h], q[t, h + 1], kb, c0, c1, scale, softcap, s, s2)
                _online(s, c0, c1, m, l, acc[r], r)
                _online(s2, c0, c1, m, l, acc[r + 1], r + 1)
                _accumulate4x2(acc[r], acc[r + 1], s, s2, vb, c0, c1)
            elif c1 >= c0:
                _scores4(q[t, h], kb, c0, c1, scale, softcap, s)
                _online(s, c0, c1, m, l, acc[r], r)
                _accumulate4(acc[r], s, vb, c0, c1)
            r += 2 if two else 1
    for r in range(R):
        inv = F32(1.0) / l[r]
        for d in range(Dh):
            out[t0 + r // G, h0 + r % G, d] = acc[r, d] * inv


@njit(cache=True, parallel=True)
def _attn_prefill(q, k, v, pos, scale, window, softcap, cap, bq, out):
    """Work items (kv head, query block); blocks visited low/high alternately so that a static
    split of the item range gives each thread a similar share of the causal triangle."""
    Hkv = _kv_heads(k)
    nqb = (q.shape[0] + bq - 1) // bq
    for it in prange(Hkv * nqb):
        i = it // Hkv
        b = i // 2 if i % 2 == 0 else nqb - 1 - i // 2
        _prefill_item(q, k, v, pos, scale, window, softcap, cap, it % Hkv,
                      b * bq, min(q.shape[0], (b + 1) * bq), out)


def _cache_view(c, name):
    """(S, Hkv, Dh) float32 as is, float16 as its uint16 bits (no copy); a quantized cache (qs, d)
    with d as uint16 bits. Returns (the view, S, Hkv, Dh)."""
    if isinstance(c, tuple):
        qs, d = c
        S, Hkv, nb = d.shape
        if qs.dtype not in (np.int8, np.uint8) or d.dtype != np.float16 or qs.shape != (S, Hkv, nb * (32 if qs.dtype == np.int8 else 16)):
            raise TypeError(f"attention: {name} (qs {qs.dtype} {qs.shape}, d {d.dtype} {d.shape}) is not a q8_0 or q4_0 cache")
        return (np.ascontiguousarray(qs), np.ascontiguousarray(d).view(np.uint16)), S, Hkv, nb * 32
    if c.dtype == np.float16:
        c = np.ascontiguousarray(c).view(np.uint16)
    elif c.dtype != np.float32:
        raise TypeError(f"attention: {name} must be float32, float16 or quantized, got {c.dtype}")
    c = np.ascontiguousarray(c)
    return c, c.shape[0], c.shape[1], c.shape[2]


def _attention(q, k, v, q_positions, scale, window, softcap, cap):  # cap: ring rows, 0 = contiguous
    q = np.ascontiguousarray(q, dtype=F32)
    pos = np.ascontiguousarray(q_positions, dtype=np.int64)
    (k, S, Hkv, Dk), (v, Sv, Hv, Dv) = _cache_view(k, "k cache"), _cache_view(v, "v cache")
    T, Hq, Dh = q.shape
    if (Sv, Hv, Dv) != (S, Hkv, Dk) or Dk != Dh or Hq % Hkv or pos.shape != (T,) or T == 0:
        raise ValueError(f"attention: q {q.shape}, k ({S}, {Hkv}, {Dk}), v ({Sv}, {Hv}, {Dv}), positions {pos.shape}"
                         " do not fit (n_q_heads must be a multiple of n_kv_heads)")
    window = int(window)
    p_min, p_max = (int(pos[0]), int(pos[0])) if T == 1 else (int(pos.min()), int(pos.max()))
    if p_min < 0 or (cap == 0 and p_max >= S):
        raise ValueError(f"attention: positions {p_min}..{p_max} outside the cache of {S} rows")
    if cap and (max(0, p_min - window + 1) if window else 0) < p_max + 1 - cap:
        raise ValueError(f"attention_ring: a ring of {cap} rows cannot hold window {window} for"
                         f" positions {p_min}..{p_max}; it needs >= window + n_tokens - 1 rows")
    out = np.empty_like(q)
    scale, softcap = F32(scale), F32(softcap)
    if T <= DECODE_T:  # each query as a decode step: the same bits whatever shares its batch
        for t in range(T):  # on one thread: numba's parallel launch (~70 us) cost more than it
            # saved at every context up to 4096 keys (qwen 1.5B's heads, Zen 5, 2 threads)
            _attn_decode(q[t], k, v, int(pos[t]), scale, window, softcap, cap, 1, False, out[t])
    else:
        _attn_prefill(q, k, v, pos, scale, window, softcap, cap, max(1, _Q_ROWS // (Hq // Hkv)),
                      out)
    return out


@njit(cache=True)
def _decode_step(q, k, v, kc, vc, p, row, scale, window, cap, out):
    """Store k, v (Hkv, Dh) float32 as float16 bits into row `row` of kc, vc, then attend q at p."""
    for h in range(k.shape[0]):
        for d in range(k.shape[1]):
            kc[row, h, d] = _f16_bits(k[h, d])
        for d in range(v.shape[1]):
            vc[row, h, d] = _f16_bits(v[h, d])
    _attn_decode(q, kc, vc, p, scale, window, F32(0.0), cap, 1, False, out)


def decode_step(q, k, v, k_cache, v_cache, position, scale, window=0, ring=False):
    """One decode token: store k, v (n_kv_heads, head_dim) float32 at `position` of float16 caches
    (S, n_kv_heads, head_dim) (row position % S when `ring`), then attend with q (n_q_heads,
    head_dim) -> (n_q_heads, head_dim). The bits of kv_store then attention / attention_ring with
    one query (float16 rounding as numpy's), in one call instead of three: qwen 0.5B's attention
    per decoded token 1.5 -> 0.9 ms (24 layers; Zen 5), most of it the calls' Python overhead."""
    S, Hkv, Dh = k_cache.shape
    p = int(position)
    if k_cache.dtype != np.float16 or v_cache.dtype != np.float16 or not (0 <= p and (ring or p < S)) \
            or (ring and window > S):
        raise ValueError(f"decode_step: float16 caches of {S} rows cannot take position {p} (window {window})")
    if k.shape != (Hkv, Dh) or v.shape != (Hkv, v_cache.shape[2]) or v_cache.shape[:2] != (S, Hkv) \
            or q.ndim != 2 or q.shape[1] != Dh or q.shape[0] % Hkv:  # numba does not check bounds
        raise ValueError(f"decode_step: q {q.shape}, k {k.shape}, v {v.shape} do not fit caches "
                         f"{k_cache.shape}, {v_cache.shape}")
    out = np.empty((q.shape[0], v_cache.shape[2]), F32)  # (n_q_heads, head_dim_v)
    _decode_step(np.ascontiguousarray(q, F32), np.ascontiguousarray(k, F32), np.ascontiguousarray(v, F32),
                 k_cache.view(np.uint16), v_cache.view(np.uint16), p, p % S if ring else p, F32(scale),
                 int(window), S if ring else 0, out)
    return out


def attention(q, k_cache, v_cache, q_positions, scale, window=0, softcap=0.0):
    """Causal attention with grouped KV heads over a contiguous cache (row j = position j).

    q           # (n_tokens, n_q_heads, head_dim) float32
    k_cache     # (S, n_kv_heads, head_dim) float32 or float16, or a quantized cache (qs, d) as in
                # `kv_store` (rows dequantized one at a time as they are read, never as a whole);
                # rows 0..max(q_positions) written, S may be the whole preallocated context (rows
                # past the query are never read)
    v_cache     # (S, n_kv_heads, head_dim) likewise
    q_positions # (n_tokens,) int
    Key j is visible to a query at p iff j <= p and (window == 0 or p - j < window); query head h
    reads kv head h // (n_q_heads // n_kv_heads). Score = q.k * scale, then
    softcap * tanh(score / softcap) if softcap > 0. Up to DECODE_T tokens (decode, speculative
    verification) attend one at a time, each splitting its keys over threads, so a query's result
    does not depend on its batch; more (prefill) run blocked online-softmax over (kv head, query
    block) items.
    Returns     # (n_tokens, n_q_heads, head_dim) float32
    """
    return _attention(q, k_cache, v_cache, q_positions, scale, window, softcap, 0)


def attention_ring(q, k_ring, v_ring, q_positions, scale, window=0, softcap=0.0):
    """`attention` on a ring buffer (sliding-window layers): position j lives in row j % W.

    k_ring, v_ring # (W, n_kv_heads, head_dim) caches as in `attention`, positions up to
                   # max(q_positions) written, so row j % W holds the latest such j
    The ring must still hold every visible key: W >= window + n_tokens - 1 for a block of
    consecutive queries (W >= window for decode); a too-small ring raises ValueError. So a
    runtime that prefills in chunks of C tokens gives local layers a ring of window + C - 1 rows,
    writes a chunk's k/v, then calls this; memory stays bounded by the window, not the context.
    """
    W = (k_ring[1] if isinstance(k_ring, tuple) else k_ring).shape[0]
    return _attention(q, k_ring, v_ring, q_positions, scale, window, softcap, W)


# ---- embedding -------------------------------------------------------------------------------

def embedding_rows(table_raw, ggml_type, ids):
    """Gather the requested rows, then dequantize them in one call (quant.formats.dequantize).

    table_raw # (V, row_bytes) uint8, whole blocks per row
    ids       # (n_tokens,) int
    Returns   # (n_tokens, D) float32
    """
    from ..quant.formats import dequantize
    from ..quant.ggml_types import GGMLType

    t = GGMLType(int(ggml_type))
    ids = np.asarray(ids, dtype=np.int64)
    V, row_bytes = table_raw.shape
    if ids.size and (ids.min() < 0 or ids.max() >= V):
        raise IndexError(f"embedding_rows: token ids {ids.min()}..{ids.max()} outside vocab of {V}")
    d = row_bytes // t.type_size * t.block_size
    if ids.size == 0:
        return np.zeros((0, d), dtype=F32)
    rows = np.ascontiguousarray(table_raw[ids])  # (n_tokens, row_bytes)
    return np.asarray(dequantize(rows.reshape(-1), t), dtype=F32).reshape(ids.size, d)
