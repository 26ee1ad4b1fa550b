"""Plain numpy references for the non-matmul ops; `ops.py` holds the numba versions.

Both modules define the same functions with the same signatures, so the runtime can pick one.
These follow ggml's CPU arithmetic where it decides the result (float32 values, float64 sums,
RoPE angles by repeated float32 multiplication) so `ops.py` can be checked against them tightly;
`attention` is the exception: it is the obvious masked softmax in float64, the ground truth.
"""
from __future__ import annotations

import numpy as np

F32 = np.float32
GELU_COEF_A = F32(0.044715)  # ggml's constants for GELU, tanh approximation
SQRT_2_OVER_PI = F32(0.79788456080286535587989211986876)


def rms_norm(x, weight, eps):
    """y = x / sqrt(mean(x^2) + eps) * weight over the last axis, as ggml's rms_norm then mul.

    x      # (..., D) float32: (n_tokens, dim), or (n_tokens, n_heads, head_dim) for per-head q/k norms
    weight # (D,) float32 (gemma's "+1" is already folded into the GGUF weight by the converter)
    Squares are float32, summed in float64; mean, scale and products are float32 (ggml does this).
    """
    x = np.asarray(x, dtype=F32)
    ss = np.sum((x * x).astype(np.float64), axis=-1, keepdims=True)
    mean = (ss / x.shape[-1]).astype(F32)
    scale = F32(1.0) / np.sqrt(mean + F32(eps))
    return (x * scale) * np.asarray(weight, dtype=F32)


def rope_theta_scale(theta_base, n_rot):
    """ggml's theta_scale = powf(base, -2.0f / n_dims), as a float32."""
    return F32(np.float64(theta_base) ** np.float64(F32(-2.0) / F32(n_rot)))


def rope_cos_sin(positions, theta_base, n_rot, freq_scale=1.0):
    """cos and sin of every (token, pair) angle, each (n_tokens, n_rot // 2) float32.

    positions # (n_tokens,) int
    As ggml_rope_cache_init: theta = float(pos); per pair use freq_scale * theta, then
    theta *= theta_scale, all in float32; cos/sin are rounded from float64 (= a correctly
    rounded cosf/sinf).
    """
    ts = rope_theta_scale(theta_base, n_rot)
    theta = np.asarray(positions).astype(F32)  # (n_tokens,)
    ang = np.empty((theta.shape[0], n_rot // 2), dtype=F32)
    for i in range(n_rot // 2):
        ang[:, i] = F32(freq_scale) * theta
        theta = theta * ts
    a = ang.astype(np.float64)
    return np.cos(a).astype(F32), np.sin(a).astype(F32)


def rope(x, positions, theta_base, neox, n_rot=None, freq_scale=1.0):
    """Rotary position embedding; returns a new array.

    x         # (n_tokens, n_heads, head_dim) float32
    positions # (n_tokens,) int, absolute position of each token
    neox=False (GGML_ROPE_TYPE_NORM, llama): pair i is (x[2i], x[2i+1]).
    neox=True  (GGML_ROPE_TYPE_NEOX, qwen2, gemma3): pair i is (x[i], x[i + n_rot/2]).
    Pair i turns by pos * freq_scale * theta_base^(-2i/n_rot); dims from n_rot on are copied.
    """
    x = np.asarray(x, dtype=F32)
    n_rot = x.shape[-1] if n_rot is None else n_rot
    half = n_rot // 2
    cos, sin = rope_cos_sin(positions, theta_base, n_rot, freq_scale)
    cos, sin = cos[:, None, :], sin[:, None, :]  # (n_tokens, 1, half)
    out = x.copy()
    if neox:
        i0, i1 = np.arange(half), np.arange(half) + half
    else:
        i0, i1 = np.arange(half) * 2, np.arange(half) * 2 + 1
    x0, x1 = x[..., i0], x[..., i1]
    out[..., i0] = x0 * cos - x1 * sin
    out[..., i1] = x0 * sin + x1 * cos
    return out


def softmax(x):
    """Numerically stable softmax over the last axis, as ggml: exp in float32, sum in float64.

    x # (..., N) float32
    """
    x = np.asarray(x, dtype=F32)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    s = e.astype(np.float64).sum(axis=-1, keepdims=True)
    return e * (1.0 / s).astype(F32)


def silu_gate(gate, up):
    """silu(gate) * up = gate / (1 + exp(-gate)) * up, float32.

    gate, up # (n_tokens, n_ff) float32 (any equal shapes)
    """
    g = np.asarray(gate, dtype=F32)
    with np.errstate(over="ignore"):
        return g / (F32(1.0) + np.exp(-g)) * np.asarray(up, dtype=F32)


def gelu_tanh_gate(gate, up):
    """gelu_tanh(gate) * up with 0.5*x*(1 + tanh(sqrt(2/pi)*x*(1 + 0.044715*x^2))), float32.

    gate, up # (n_tokens, n_ff) float32 (any equal shapes)
    Note: ggml's CPU GELU (GGML_GELU_FP16) instead rounds x to float16 and reads a float16
    table, a relative difference of up to ~1e-3 from this formula.
    """
    g = np.asarray(gate, dtype=F32)
    inner = SQRT_2_OVER_PI * g * (F32(1.0) + GELU_COEF_A * g * g)
    return F32(0.5) * g * (F32(1.0) + np.tanh(inner)) * np.asarray(up, dtype=F32)


def _attend(q, k, v, q_pos, k_pos, scale, window, softcap):
    """float64 masked softmax(q k^T * scale) v; keys carry absolute positions k_pos (S,)."""
    T, Hq, Dh = q.shape
    G = Hq // k.shape[1]
    q64 = q.astype(np.float64)
    k64 = np.repeat(k.astype(np.float64), G, axis=1)  # (S, Hq, Dh): q head h reads kv head h // G
    v64 = np.repeat(v.astype(np.float64), G, axis=1)
    s = np.einsum("thd,shd->hts", q64, k64) * scale  # (Hq, T, S)
    if softcap > 0:
        s = softcap * np.tanh(s / softcap)
    p, j = np.asarray(q_pos)[:, None], np.asarray(k_pos)[None, :]
    visible = (j <= p) & ((window == 0) | (p - j < window))  # (T, S)
    s = np.where(visible[None], s, -np.inf)
    w = np.exp(s - s.max(axis=-1, keepdims=True))
    w /= w.sum(axis=-1, keepdims=True)
    return np.einsum("hts,shd->thd", w, v64).astype(F32)


def kv_store(cache, x, rows):
    """Write x (T, n_kv_heads, head_dim) float32 into rows (T,) of a cache: a float16/float32
    array as is, a quantized cache (qs, d) by the reference quantizer of its type:
      q8_0: qs (S, n_kv_heads, head_dim) int8, d (S, n_kv_heads, head_dim // 32) float16;
      q4_0: qs (S, n_kv_heads, head_dim // 2) uint8, block b's element i in the low nibble of
            byte 16 b + i and element i + 16 in its high nibble, d as for q8_0.
    Element for element the GGML block types of the same names (quant.formats)."""
    x = np.asarray(x, dtype=F32)
    rows = np.asarray(rows)
    if not isinstance(cache, tuple):
        cache[rows] = x
        return
    from ..quant.formats import quantize
    qs, d = cache
    t = _kv_type(qs)
    T, H, D = x.shape
    blocks = quantize(x.reshape(-1), t).reshape(T, H, D // 32, t.type_size)
    d[rows] = np.ascontiguousarray(blocks[..., :2]).view(np.float16)[..., 0]
    qs[rows] = np.ascontiguousarray(blocks[..., 2:]).view(qs.dtype).reshape(qs[rows].shape)


def hadamard(n):
    """The orthonormal Sylvester-Walsh-Hadamard matrix, float64 (n, n), n a power of two:
    symmetric, and its own inverse."""
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)


def kv_rotate(x, n):
    """x (..., D) float32, D a multiple of n: every chunk of n values times hadamard(n)."""
    x = np.asarray(x, dtype=F32)
    return (x.reshape(-1, n).astype(np.float64) @ hadamard(n)).astype(F32).reshape(x.shape)


def _kv_type(qs):
    from ..quant.ggml_types import GGMLType
    return GGMLType.Q8_0 if qs.dtype == np.int8 else GGMLType.Q4_0


def kv_values(cache):
    """A cache's values as float32 (S, n_kv_heads, head_dim): quantized caches dequantized."""
    if not isinstance(cache, tuple):
        return np.asarray(cache, dtype=F32)
    from ..quant.formats import dequantize
    qs, d = cache
    S, H, nb = d.shape
    blocks = np.concatenate([np.ascontiguousarray(d).view(np.uint8).reshape(S, H, nb, 2),
                             np.ascontiguousarray(qs).view(np.uint8).reshape(S, H, nb, -1)], axis=-1)
    return dequantize(blocks.reshape(-1), _kv_type(qs)).reshape(S, H, nb * 32)


def decode_step(q, k, v, k_cache, v_cache, position, scale, window=0, ring=False):
    """One decode token: store k, v (n_kv_heads, head_dim) at `position` of float16 caches (S,
    n_kv_heads, head_dim) (row position % S when `ring`), then attend with q (n_q_heads, head_dim)."""
    S = k_cache.shape[0]
    p = np.array([position])
    kv_store(k_cache, np.asarray(k)[None], p % S if ring else p)
    kv_store(v_cache, np.asarray(v)[None], p % S if ring else p)
    fn = attention_ring if ring else attention
    return fn(np.asarray(q)[None], k_cache, v_cache, p, scale, window)[0]


def attention(q, k_cache, v_cache, q_positions, scale, window=0, softcap=0.0):
    """Causal attention with grouped KV heads over a contiguous cache (row j = position j).

    q           # (n_tokens, n_q_heads, head_dim) float32
    k_cache     # (S, n_kv_heads, head_dim) float32 or float16, or a quantized cache (qs, d) as in
                # `kv_store`; rows 0..max(q_positions) written
    v_cache     # (S, n_kv_heads, head_dim) likewise
    q_positions # (n_tokens,) int
    Key j is visible to a query at p iff j <= p and (window == 0 or p - j < window).
    Scores are q.k * scale, then softcap * tanh(score / softcap) when softcap > 0.
    Returns     # (n_tokens, n_q_heads, head_dim) float32
    """
    k, v = kv_values(k_cache), kv_values(v_cache)
    return _attend(q, k, v, q_positions, np.arange(k.shape[0]), scale, window, softcap)


def attention_ring(q, k_ring, v_ring, q_positions, scale, window=0, softcap=0.0):
    """As `attention`, on a ring buffer: position j lives in row j % W.

    k_ring, v_ring # (W, n_kv_heads, head_dim); positions up to max(q_positions) written,
                   # so rows hold positions max(q_positions) + 1 - W .. max(q_positions)
    """
    k_ring, v_ring = kv_values(k_ring), kv_values(v_ring)
    W = k_ring.shape[0]
    n_total = int(np.max(q_positions)) + 1
    k_pos = np.arange(max(0, n_total - W), n_total)
    return _attend(q, k_ring[k_pos % W], v_ring[k_pos % W], q_positions, k_pos,
                   scale, window, softcap)


def embedding_rows(table_raw, ggml_type, ids):
    """Dequantize only the requested rows of a (quantized) embedding table.

    table_raw # (V, row_bytes) uint8, whole blocks per row
    ids       # (n_tokens,) int
    Returns   # (n_tokens, D) float32
    """
    from ..quant.formats import dequantize
    from ..quant.ggml_types import GGMLType

    t = GGMLType(int(ggml_type))
    out = np.empty((len(ids), table_raw.shape[1] // t.type_size * t.block_size), dtype=F32)
    for r, i in enumerate(ids):
        out[r] = dequantize(np.ascontiguousarray(table_raw[int(i)]), t)
    return out
