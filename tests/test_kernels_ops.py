"""kernels_cpu.ops (numba) against kernels_cpu.ops_ref (numpy), on seeded random inputs at the
real models' shapes, plus checks of the references' own semantics.

Tolerances, and why:
- rms_norm, softmax, silu: ops and ops_ref do the same float32 arithmetic; they differ only in the
  order of float64 sums and in libm vs numpy's SIMD exp/tanh (measured <= 4 ulp), so rtol 1e-6
  (8-16 ulp).
- gelu: as silu, but 1 + tanh(..) cancels for negative inputs, so the error is judged against
  the size of the terms: |fast - ref| <= 1e-6 * (|ref| + |gate * up|) (measured 2e-7 * |gate * up|).
- rope: same float32 angles and products in both (bitwise equal here); allowed 1e-6 * max|x|.
- attention: the reference is float64; the kernel sums in float32 with fastmath reordering over
  up to 4096 keys: max error <= 5e-6 * max(1, max|ref|) and normalised MSE <= 1e-10
  (measured <= 9e-7 and <= 1e-12; a masking or head-mapping bug gives errors of 1e-2 and up).
"""
from __future__ import annotations

import sys
import types

import numpy as np
import pytest
from numba import njit

from edgellm.kernels_cpu import ops
from edgellm.kernels_cpu import ops_ref as ref

# name: (dim, n_q_heads, n_kv_heads, head_dim, sliding window of the local layers, n_ff)
MODELS = {
    "gemma3-270m": (640, 4, 1, 256, 512, 2048),
    "qwen2.5-0.5b": (896, 14, 2, 64, 0, 4864),
    "qwen2.5-1.5b": (1536, 12, 2, 128, 0, 8960),
}


def randn(seed, *shape, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


# ---- rms_norm ----------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 640), (7, 896), (64, 1536), (5, 4, 256), (3, 14, 64),
                                   (2, 12, 128)])
def test_rms_norm_matches_reference(shape):
    x, w = randn(1, *shape, scale=3.0), randn(2, shape[-1])
    got, want = ops.rms_norm(x, w, 1e-6), ref.rms_norm(x, w, 1e-6)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-30)
    x64 = x.astype(np.float64)
    exact = x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-6) * w
    np.testing.assert_allclose(want, exact, rtol=1e-6, atol=1e-30)


# ---- rope --------------------------------------------------------------------------------------

ROPE_CASES = [  # (n_tokens, n_heads, head_dim, n_rot, theta_base, freq_scale)
    (1, 4, 256, 256, 1e6, 1.0),  # gemma3 global layers
    (9, 4, 256, 256, 1e4, 1.0),  # gemma3 local layers
    (9, 14, 64, 64, 1e6, 1.0),  # qwen2.5-0.5b
    (40, 12, 128, 128, 1e6, 1.0),  # qwen2.5-1.5b, parallel path
    (5, 2, 128, 64, 1e4, 0.25),  # partial rotation, linear scaling
]


@pytest.mark.parametrize("neox", [False, True])
@pytest.mark.parametrize("T,H,Dh,n_rot,base,fs", ROPE_CASES)
def test_rope_matches_reference(T, H, Dh, n_rot, base, fs, neox):
    x = randn(3, T, H, Dh)
    pos = np.random.default_rng(4).integers(0, 32768, T)
    got = ops.rope(x, pos, base, neox, n_rot, fs)
    want = ref.rope(x, pos, base, neox, n_rot, fs)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(x).max())
    np.testing.assert_array_equal(got[..., n_rot:], x[..., n_rot:])


@pytest.mark.parametrize("neox", [False, True])
def test_rope_reference_angles_close_to_exact(neox):
    """The float32 theta chain stays within ~1e-3 rad of the exact angles below position 4096."""
    T, H, Dh, base = 16, 2, 128, 1e6
    x, pos = randn(5, T, H, Dh), np.random.default_rng(6).integers(0, 4096, T)
    ang = pos[:, None, None] * base ** (-2.0 * np.arange(Dh // 2) / Dh)  # (T, 1, Dh/2) float64
    i0 = np.arange(Dh // 2) if neox else 2 * np.arange(Dh // 2)
    i1 = i0 + Dh // 2 if neox else i0 + 1
    x64, exact = x.astype(np.float64), x.astype(np.float64).copy()
    exact[..., i0] = x64[..., i0] * np.cos(ang) - x64[..., i1] * np.sin(ang)
    exact[..., i1] = x64[..., i0] * np.sin(ang) + x64[..., i1] * np.cos(ang)
    np.testing.assert_allclose(ref.rope(x, pos, base, neox), exact, atol=1e-3 * np.abs(x).max())


def test_rope_properties():
    T, H, Dh = 6, 3, 64
    x, pos = randn(7, T, H, Dh), np.array([0, 1, 2, 100, 5000, 32767])
    for neox in (False, True):
        y = ops.rope(x, pos, 1e4, neox)
        np.testing.assert_array_equal(y[0], x[0])  # position 0 is the identity
        i0 = np.arange(Dh // 2) if neox else 2 * np.arange(Dh // 2)
        i1 = i0 + Dh // 2 if neox else i0 + 1
        np.testing.assert_allclose(np.hypot(y[..., i0], y[..., i1]), np.hypot(x[..., i0], x[..., i1]),
                                   rtol=1e-5)  # each pair keeps its norm
    # NeoX pairs (i, i + Dh/2) are normal pairs (2i, 2i+1) after interleaving the halves
    perm = np.stack([np.arange(Dh // 2), np.arange(Dh // 2) + Dh // 2], axis=1).reshape(-1)
    neox, normal = ops.rope(x, pos, 1e4, True), ops.rope(x[..., perm], pos, 1e4, False)
    np.testing.assert_array_equal(neox[..., perm], normal)
    assert not np.allclose(ops.rope(x, pos, 1e4, True)[1:], ops.rope(x, pos, 1e4, False)[1:])


# ---- softmax, gates ----------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(2, 3, 5), (14, 1, 512), (3, 4096), (64, 1000)])
def test_softmax_matches_reference(shape):
    x = randn(8, *shape, scale=30.0) + np.float32(1000.0)  # large offsets: must not overflow
    got, want = ops.softmax(x), ref.softmax(x)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-38)
    e = np.exp(x.astype(np.float64) - x.max(-1, keepdims=True))
    np.testing.assert_allclose(want, e / e.sum(-1, keepdims=True), rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(got.sum(-1, dtype=np.float64), 1.0, rtol=1e-6)


GATE_SHAPES = [(1, 2048), (1, 4864), (7, 8960), (64, 2048)]


def _gate_inputs(shape):
    g, u = randn(9, *shape, scale=4.0), randn(10, *shape)
    g.reshape(-1)[:4] = [-100.0, 100.0, -1e-30, 0.0]  # overflowing exp, tiny, zero
    return g, u


@pytest.mark.parametrize("shape", GATE_SHAPES)
def test_silu_gate_matches_reference(shape):
    g, u = _gate_inputs(shape)
    want = ref.silu_gate(g, u)
    np.testing.assert_allclose(ops.silu_gate(g, u), want, rtol=1e-6, atol=1e-30)
    g64 = g.astype(np.float64)
    np.testing.assert_allclose(want, g64 / (1 + np.exp(-g64)) * u, rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize("shape", GATE_SHAPES)
def test_gelu_tanh_gate_matches_reference(shape):
    g, u = _gate_inputs(shape)
    got, want = ops.gelu_tanh_gate(g, u), ref.gelu_tanh_gate(g, u)
    size = np.abs(g.astype(np.float64) * u)
    assert np.all(np.abs(got - want) <= 1e-6 * (np.abs(want) + size))
    g64 = g.astype(np.float64)
    exact = 0.5 * g64 * (1 + np.tanh(np.sqrt(2 / np.pi) * (g64 + 0.044715 * g64 ** 3))) * u
    assert np.all(np.abs(want - exact) <= 1e-6 * (np.abs(exact) + size))


# ---- attention ---------------------------------------------------------------------------------

def assert_attention_close(got, want):
    want64 = want.astype(np.float64)
    assert np.isfinite(got).all()
    err = np.abs(got - want64).max()
    assert err <= 5e-6 * max(1.0, np.abs(want64).max()), err
    nmse = ((got - want64) ** 2).sum() / (want64 ** 2).sum()
    assert nmse <= 1e-10, nmse


ATTN_CASES = [  # (n_tokens, last position, cache rows allocated, use the model's window, softcap)
    (1, 0, 1, False, 0.0),  # first token
    (1, 76, 128, False, 0.0),  # decode, cache preallocated past the query
    (1, 699, 700, True, 0.0),  # decode past gemma's window of 512
    (1, 4095, 4096, False, 0.0),  # long decode
    (33, 32, 64, False, 0.0),  # prompt prefill from position 0
    (33, 699, 700, True, 0.0),  # chunked prefill deep into the cache
    (64, 300, 301, False, 30.0),  # soft-capped logits (gemma2 style)
]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("T,p_last,S,windowed,softcap", ATTN_CASES)
@pytest.mark.parametrize("model", MODELS)
def test_attention_matches_reference(model, T, p_last, S, windowed, softcap, dtype):
    _, Hq, Hkv, Dh, window, _ = MODELS[model]
    window = window if windowed else 0
    q = randn(11, T, Hq, Dh)
    k, v = randn(12, S, Hkv, Dh).astype(dtype), randn(13, S, Hkv, Dh).astype(dtype)
    k[p_last + 1:], v[p_last + 1:] = np.nan, np.nan  # unwritten rows must never be read
    pos = np.arange(p_last + 1 - T, p_last + 1)
    scale = Dh ** -0.5
    got = ops.attention(q, k, v, pos, scale, window, softcap)
    want = ref.attention(q, k[:p_last + 1], v[:p_last + 1], pos, scale, window, softcap)
    assert_attention_close(got, want)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_attention_small_window_unsorted_queries(dtype):
    Hq, Hkv, Dh = 6, 2, 32
    q, k, v = randn(14, 9, Hq, Dh), randn(15, 50, Hkv, Dh).astype(dtype), randn(16, 50, Hkv, Dh).astype(dtype)
    pos = np.array([49, 3, 17, 0, 30, 31, 8, 44, 20])
    assert_attention_close(ops.attention(q, k, v, pos, 0.2, 7), ref.attention(q, k, v, pos, 0.2, 7))


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("T,p_last", [(1, 5), (1, 40), (1, 1000), (8, 7), (8, 100)])
def test_attention_ring_matches_contiguous(T, p_last, dtype):
    _, Hq, Hkv, Dh, _, _ = MODELS["gemma3-270m"]
    window = 16
    W = window + T - 1  # what the runtime allocates for chunks of T tokens
    k, v = randn(17, p_last + 1, Hkv, Dh).astype(dtype), randn(18, p_last + 1, Hkv, Dh).astype(dtype)
    k_ring, v_ring = np.full((W, Hkv, Dh), np.nan, dtype), np.full((W, Hkv, Dh), np.nan, dtype)
    for j in range(max(0, p_last + 1 - W), p_last + 1):
        k_ring[j % W], v_ring[j % W] = k[j], v[j]
    q, pos = randn(19, T, Hq, Dh), np.arange(p_last + 1 - T, p_last + 1)
    got = ops.attention_ring(q, k_ring, v_ring, pos, 0.0625, window)
    assert_attention_close(got, ref.attention_ring(q, k_ring, v_ring, pos, 0.0625, window))
    assert_attention_close(got, ref.attention(q, k, v, pos, 0.0625, window))
    if p_last >= W - 1:  # once the ring has wrapped, one row less is too small
        with pytest.raises(ValueError, match="ring"):
            ops.attention_ring(q, k_ring[:W - 1], v_ring[:W - 1], pos, 0.0625, window)


@pytest.mark.parametrize("n_chunks,par", [(1, False), (3, True), (100, True)])
def test_attention_decode_any_split(n_chunks, par):
    """Any key split merges to the same result (100 chunks of 150 keys leaves some empty)."""
    Hq, Hkv, Dh, p = 14, 2, 64, 149
    q, k, v = randn(25, 1, Hq, Dh), randn(26, p + 1, Hkv, Dh), randn(27, p + 1, Hkv, Dh)
    out = np.empty_like(q)
    ops._attn_decode(q[0], k, v, p, np.float32(0.125), 0, np.float32(0.0), 0, n_chunks, par, out[0])
    assert_attention_close(out, ref.attention(q, k, v, [p], 0.125))


@pytest.mark.parametrize("S,p,window,ring", [(64, 0, 0, False), (64, 40, 0, False), (20, 100, 16, True),
                                             (700, 699, 512, False)])
def test_decode_step_is_store_then_attend(S, p, window, ring):
    """The fused decode step writes the bits kv_store writes (numpy's float16 rounding) and returns
    the bits of attention / attention_ring with that one query."""
    Hq, Hkv, Dh = 14, 2, 64
    k0, v0 = randn(50, S, Hkv, Dh).astype(np.float16), randn(51, S, Hkv, Dh).astype(np.float16)
    q, k, v = randn(52, Hq, Dh), randn(53, Hkv, Dh, scale=30.0), randn(54, Hkv, Dh, scale=1e-3)
    kc, vc = k0.copy(), v0.copy()
    got = ops.decode_step(q, k, v, kc, vc, p, 0.125, window, ring)
    kw, vw = k0.copy(), v0.copy()
    ops.kv_store(kw, k[None], np.array([p % S]))
    ops.kv_store(vw, v[None], np.array([p % S]))
    np.testing.assert_array_equal(kc.view(np.uint16), kw.view(np.uint16))
    np.testing.assert_array_equal(vc.view(np.uint16), vw.view(np.uint16))
    fn = ops.attention_ring if ring else ops.attention
    np.testing.assert_array_equal(got, fn(q[None], kw, vw, [p], 0.125, window)[0])
    kr, vr = k0.copy(), v0.copy()  # the reference: kv_store then float64 attention
    assert_attention_close(got[None], ref.decode_step(q, k, v, kr, vr, p, 0.125, window, ring)[None])
    np.testing.assert_array_equal(kr.view(np.uint16), kw.view(np.uint16))
    with pytest.raises(ValueError, match="cannot take position"):
        ops.decode_step(q, k, v, kc, vc, S, 0.125)
    with pytest.raises(ValueError, match="do not fit"):  # numba would write past the rows unchecked
        ops.decode_step(q, k[:1], v, kc, vc, 0, 0.125)


def test_attention_rejects_bad_shapes():
    q, k = randn(20, 1, 5, 8), randn(21, 4, 2, 8)
    with pytest.raises(ValueError, match="multiple"):
        ops.attention(q, k, k, [3], 1.0)
    with pytest.raises(ValueError, match="outside the cache"):
        ops.attention(randn(22, 1, 4, 8), k, k, [4], 1.0)


@njit(cache=True)
def _widen_soft(bits, out):  # bits (65536,) uint16, out (65536,) float32
    for i in range(bits.shape[0]):
        out[i] = ops._f16_soft(bits[i])


@pytest.mark.parametrize("path", ["row_f32", "soft"])
def test_float16_widening_is_exact(path):
    """Every float16 bit pattern widens exactly, on the path in use and on the no-F16C fallback."""
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    got, want = np.empty(1 << 16, np.float32), bits.view(np.float16).astype(np.float32)
    (ops._row_f32 if path == "row_f32" else _widen_soft)(bits, got)
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))


# ---- quantized KV caches (q8_0, q4_0) ----------------------------------------------------------

KV_TYPES = {"q8_0": (np.int8, 1), "q4_0": (np.uint8, 2)}  # qs dtype, values per qs byte


def kv_cache(kind, S, H, D):
    dt, per = KV_TYPES[kind]
    return np.zeros((S, H, D // per), dt), np.zeros((S, H, D // 32), np.float16)


def kv_input(seed, T, H, D):
    """Values that reach every branch of the quantizers: a zero block, tiny blocks (subnormal
    float16 scales), huge ones (scales that overflow to inf), halves, ties of largest magnitude."""
    x = randn(seed, T, H, D, scale=3.0)
    x[0, 0, :32] = 0.0
    x[0, -1, 32:64] *= 1e-6
    if T > 1:
        x[1, 0, :32] *= 1e5
        x[1, -1, :32] = np.float32(0.5) * np.arange(-16, 16)
        x[1, -1, 32:64] = np.where(np.arange(32) % 2, 2.0, -2.0)
    return x


@pytest.mark.parametrize("kind", KV_TYPES)
def test_kv_store_matches_reference_quantizer(kind):
    """The numba store writes the same bytes as quant.formats' quantizer (itself checked against
    gguf-py), at scattered rows; other rows stay untouched."""
    S, H, D = 50, 2, 128
    got, want = kv_cache(kind, S, H, D), kv_cache(kind, S, H, D)
    x, rows = kv_input(30, 6, H, D), np.array([3, 4, 5, 44, 45, 0])
    ops.kv_store(got, x, rows)
    with np.errstate(over="ignore", invalid="ignore"):  # the huge block's scale overflows to inf, as in ggml
        ref.kv_store(want, x, rows)
        check_against_formats(kind, got, x, rows)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g.view(np.uint8), w.view(np.uint8))
    untouched = np.setdiff1d(np.arange(S), rows)
    assert not got[0][untouched].any() and not got[1][untouched].view(np.uint16).any()


def check_against_formats(kind, got, x, rows):
    """The stored scales are the GGML blocks' own, the values their dequantization."""
    from edgellm.quant import formats
    from edgellm.quant.ggml_types import GGMLType

    T, H, D = x.shape
    t = GGMLType.Q8_0 if kind == "q8_0" else GGMLType.Q4_0
    blocks = formats.quantize(x.reshape(-1), t).reshape(T, H, D // 32, t.type_size)
    np.testing.assert_array_equal(got[1][rows].view(np.uint8), blocks[..., :2].reshape(T, H, -1))
    values = formats.dequantize(blocks.reshape(-1), t).reshape(T, H, D)
    np.testing.assert_array_equal(ref.kv_values(got)[rows], values)


@njit(cache=True)
def _narrow(x, out):  # x (n,) float32 -> out (n,) float16 bits
    for i in range(x.shape[0]):
        out[i] = ops._f16_bits(x[i])


def test_float16_narrowing_rounds_as_numpy():
    """float32 -> float16 bits without F16C: numpy's rounding (to nearest even) for normal,
    subnormal, overflowing and halfway values."""
    rng = np.random.default_rng(31)
    x = rng.integers(0, 1 << 32, 1 << 20, dtype=np.uint64).astype(np.uint32).view(np.float32)
    halves = (np.arange(1 << 16, dtype=np.uint32) << 13 | 0x1000).view(np.float32)  # exact ties
    x = np.concatenate([x[np.isfinite(x)], halves[np.isfinite(halves)], np.float32([0.0, -0.0, 65504, 65519.99, 65520, 6e-8])])
    got = np.empty(x.size, np.uint16)
    _narrow(x, got)
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(got, x.astype(np.float16).view(np.uint16))


@pytest.mark.parametrize("n", [64, 128, 256])
def test_kv_rotate_is_the_hadamard_product_and_batch_invariant(n):
    h = ref.hadamard(n)
    np.testing.assert_allclose(h @ h, np.eye(n), atol=1e-12)
    np.testing.assert_array_equal(h, h.T)
    x = randn(41, 9, 2, 256, scale=5.0)
    got = ops.kv_rotate(x, n)
    np.testing.assert_allclose(got, ref.kv_rotate(x, n), rtol=0, atol=5e-6 * np.abs(x).max())
    np.testing.assert_allclose(ops.kv_rotate(got, n), x, rtol=0, atol=1e-5 * np.abs(x).max())  # its own inverse
    for t in (0, 4, 8):  # a row alone gives the bits it gives in a batch
        np.testing.assert_array_equal(ops.kv_rotate(x[t:t + 1], n), got[t:t + 1])
    with pytest.raises(ValueError, match="power of two"):
        ops.kv_rotate(x, 96)


@pytest.mark.parametrize("kind", KV_TYPES)
@pytest.mark.parametrize("T,p_last,windowed", [(1, 0, False), (1, 699, True), (3, 200, False), (33, 699, True)])
@pytest.mark.parametrize("model", MODELS)
def test_attention_on_quantized_cache(model, kind, T, p_last, windowed):
    """Attention reading a quantized cache row by row equals the float64 reference over the
    dequantized cache (so the only error of q8_0/q4_0 is the quantization itself)."""
    _, Hq, Hkv, Dh, window, _ = MODELS[model]
    window = window if windowed else 0
    S = p_last + 1
    k, v = kv_cache(kind, S + 5, Hkv, Dh), kv_cache(kind, S + 5, Hkv, Dh)
    ops.kv_store(k, randn(32, S, Hkv, Dh), np.arange(S))
    ops.kv_store(v, randn(33, S, Hkv, Dh), np.arange(S))
    q, pos = randn(34, T, Hq, Dh), np.arange(S - T, S)
    got = ops.attention(q, k, v, pos, Dh ** -0.5, window)
    kf, vf = ref.kv_values(k)[:S], ref.kv_values(v)[:S]
    assert_attention_close(got, ref.attention(q, kf, vf, pos, Dh ** -0.5, window))
    assert_attention_close(got, ref.attention(q, k, v, pos, Dh ** -0.5, window))


@pytest.mark.parametrize("kind", KV_TYPES)
def test_attention_ring_on_quantized_cache(kind):
    _, Hq, Hkv, Dh, _, _ = MODELS["gemma3-270m"]
    window, T, p_last = 16, 8, 100
    W = window + T - 1
    ring_k, ring_v = kv_cache(kind, W, Hkv, Dh), kv_cache(kind, W, Hkv, Dh)
    kx, vx = randn(35, p_last + 1, Hkv, Dh), randn(36, p_last + 1, Hkv, Dh)
    rows = np.arange(p_last + 1 - W, p_last + 1)
    ops.kv_store(ring_k, kx[rows], rows % W)
    ops.kv_store(ring_v, vx[rows], rows % W)
    full_k, full_v = kv_cache(kind, p_last + 1, Hkv, Dh), kv_cache(kind, p_last + 1, Hkv, Dh)
    ops.kv_store(full_k, kx, np.arange(p_last + 1))
    ops.kv_store(full_v, vx, np.arange(p_last + 1))
    q, pos = randn(37, T, Hq, Dh), np.arange(p_last + 1 - T, p_last + 1)
    got = ops.attention_ring(q, ring_k, ring_v, pos, 0.0625, window)
    assert_attention_close(got, ref.attention(q, ref.kv_values(full_k), ref.kv_values(full_v), pos, 0.0625, window))
    assert_attention_close(got, ref.attention_ring(q, ring_k, ring_v, pos, 0.0625, window))


def test_quantized_cache_error_is_the_format_error():
    """On random data q8_0 keeps attention within 2% of exact (measured 0.7%) and q4_0 within 30%
    (measured 13%); a wrong dequantization (scale or nibble order) would be off by 100% and more."""
    Hq, Hkv, Dh, S = 14, 2, 64, 300
    q, kx, vx = randn(38, 1, Hq, Dh), randn(39, S, Hkv, Dh), randn(40, S, Hkv, Dh)
    exact = ref.attention(q, kx, vx, [S - 1], 0.125)
    for kind, bound in (("q8_0", 0.02), ("q4_0", 0.3)):
        k, v = kv_cache(kind, S, Hkv, Dh), kv_cache(kind, S, Hkv, Dh)
        ops.kv_store(k, kx, np.arange(S))
        ops.kv_store(v, vx, np.arange(S))
        err = np.abs(ops.attention(q, k, v, [S - 1], 0.125) - exact).max() / np.abs(exact).max()
        assert 1e-5 < err < bound, (kind, err)


# ---- embedding_rows ----------------------------------------------------------------------------

@pytest.fixture
def dequantize_ready(monkeypatch):
    """quant.formats is written elsewhere; until it lands, stand gguf-py in for it."""
    gguf = pytest.importorskip("gguf")
    try:
        import edgellm.quant.formats  # noqa: F401
    except ImportError:
        stub = types.ModuleType("edgellm.quant.formats")
        stub.dequantize = lambda raw, t: gguf.quants.dequantize(
            np.asarray(raw, np.uint8), gguf.GGMLQuantizationType(int(t))).reshape(-1)
        monkeypatch.setitem(sys.modules, "edgellm.quant.formats", stub)
    return gguf


def _table(gguf, qtype, V, D):
    """A valid raw table: quantized by gguf-py where it can, else random blocks with sane scales."""
    from edgellm.quant.ggml_types import GGMLType

    t, rng = GGMLType(int(qtype)), np.random.default_rng(23)
    x = randn(24, V, D)
    if t == GGMLType.F32:
        return x.view(np.uint8)
    if t == GGMLType.F16:
        return x.astype(np.float16).view(np.uint8)
    if t == GGMLType.Q8_0:
        return gguf.quants.quantize(x, qtype)
    raw = rng.integers(0, 256, (V, D // t.block_size, t.type_size), dtype=np.uint8)
    fields = {GGMLType.Q4_K: (0, 2), GGMLType.Q6_K: (208,)}[t]  # byte offsets of f16 d / dmin
    for off in fields:
        raw[..., off:off + 2] = rng.uniform(1e-3, 0.1, raw.shape[:2]).astype(np.float16)[..., None].view(np.uint8)
    return raw.reshape(V, -1)


@pytest.mark.parametrize("qname,D", [("F32", 640), ("F16", 896), ("Q8_0", 640), ("Q8_0", 896),
                                     ("Q4_K", 1536), ("Q6_K", 1536)])
def test_embedding_rows(dequantize_ready, qname, D):
    gguf = dequantize_ready
    qtype = gguf.GGMLQuantizationType[qname]
    raw = _table(gguf, qtype, 50, D)
    ids = np.array([3, 0, 49, 3, 17])
    want = gguf.quants.dequantize(raw, qtype).reshape(50, D)[ids]
    try:
        got = ops.embedding_rows(raw, int(qtype), ids)
    except NotImplementedError:
        pytest.skip(f"quant.formats cannot dequantize {qname} yet")
    assert got.shape == (5, D) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
    np.testing.assert_array_equal(ref.embedding_rows(raw, int(qtype), ids), got)
    assert ops.embedding_rows(raw, int(qtype), []).shape == (0, D)
    with pytest.raises(IndexError):
        ops.embedding_rows(raw, int(qtype), [50])
