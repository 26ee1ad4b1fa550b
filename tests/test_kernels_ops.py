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
