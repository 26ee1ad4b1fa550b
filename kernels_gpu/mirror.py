"""numpy mirrors of kernels.cu: the same arithmetic, operation for operation, on the host.

Each function here has the name of the kernel it mirrors and gives its bits (integer sums
exactly, float32 sums in the kernel's order, no contracted multiply-adds), except where a kernel
calls expf / tanhf / cos / sin, whose last bits may differ from numpy's. They let CI check what
every kernel computes against quant/'s references without a GPU, and a device check
(bench/gpu.py) compare the kernels with them on the real shapes. `launch.MirrorDevice` runs a
whole model on them.

Weights are GGUF rows: raw # (n_rows, row_bytes) uint8.
"""
from __future__ import annotations

import numpy as np

from ..quant.ggml_types import GGMLType

F32 = np.float32
QK = 32
XMAX = F32(16256.0)  # 127 * 128
MAX_T = 8  # tokens per GEMV launch
ATT_CHUNK = 256  # keys per attention split
ATT_GROUP = 8  # query heads of one kv head per attention block, at most (the arithmetic is per head)
NORM_THREADS = 128
BLOCK_BYTES = {GGMLType.Q4_K: 144, GGMLType.Q6_K: 210, GGMLType.Q8_0: 34, GGMLType.Q5_0: 22}
ITEMS_PER_BLOCK = {GGMLType.Q4_K: 8, GGMLType.Q6_K: 8, GGMLType.Q8_0: 1, GGMLType.Q5_0: 1}
TYPES = tuple(BLOCK_BYTES)


def _butterfly(p: np.ndarray) -> np.ndarray:
    """warp_sum over the last axis (32 lanes): p + p[lane ^ off] for off = 16, 8, 4, 2, 1; lane 0's."""
    lanes = np.arange(32)
    for off in (16, 8, 4, 2, 1):
        p = p + p[..., lanes ^ off]
    return p[..., 0]


def _lanes(f: np.ndarray) -> np.ndarray:
    """Items (..., n) summed as a warp does: lane l adds items l, l + 32, ... in order from 0.0,
    then warp_sum. f float32 -> (...)."""
    n = f.shape[-1]
    acc = np.zeros(f.shape[:-1] + (32,), F32)
    for k in range(0, n, 32):
        part = f[..., k : k + 32]
        acc[..., : part.shape[-1]] += part
    return _butterfly(acc)


# ---- activations --------------------------------------------------------------------------------

def quantize_x(x: np.ndarray):
    """x (T, K) f32, K a multiple of 32 -> xh, xl (T, K) int8 (v = 128 xh + xl), xd (T, K/32) f32,
    xs (T, K/32) int32 (sum of v): v = rint(x * (16256 / amax)) per block of 32."""
    x = np.ascontiguousarray(x, F32)
    T, K = x.shape
    b = x.reshape(T, K // QK, QK)
    amax = np.abs(b).max(axis=-1)  # (T, nb)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, XMAX / np.where(amax > 0, amax, F32(1)), F32(0)).astype(F32)
    q = np.rint(b * inv[..., None]).astype(F32)
    hi = np.rint(q / F32(128))
    lo = q - F32(128) * hi
    return (hi.astype(np.int8).reshape(T, K), lo.astype(np.int8).reshape(T, K), (amax / XMAX).astype(F32),
            q.astype(np.int64).sum(axis=-1).astype(np.int32))


# ---- weights as the kernels' items of 32 --------------------------------------------------------

def load_items(raw: np.ndarray, ggml_type: GGMLType):
    """raw (N, row_bytes) -> q (N, n_items, 32) int8 weights, sc0, sc1 (N, n_items) int32 (Q4_K: scale
    and min; Q6_K: the scales of elements 0-15 and 16-31), d, dmin (N, n_items) f32: load_item."""
    t = GGMLType(ggml_type)
    N = raw.shape[0]
    nb = raw.shape[1] // BLOCK_BYTES[t]
    blk = np.ascontiguousarray(raw).reshape(N, nb, BLOCK_BYTES[t])
    zeros = np.zeros((N, nb * ITEMS_PER_BLOCK[t]), np.int32)
    if t == GGMLType.Q8_0:
        d = blk[..., 0:2].copy().view(np.float16)[..., 0].astype(F32)
        return blk[..., 2:34].view(np.int8), zeros, zeros, d, np.zeros_like(d)
    if t == GGMLType.Q5_0:
        d = blk[..., 0:2].copy().view(np.float16)[..., 0].astype(F32)
        qh = blk[..., 2:6].copy().view("<u4")  # (N, nb, 1)
        qs = blk[..., 6:22]
        bits = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)  # (N, nb, 32)
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1) | (bits << 4)
        return (q.astype(np.int16) - 16).astype(np.int8), zeros, zeros, d, np.zeros_like(d)
    if t == GGMLType.Q4_K:
        d = np.repeat(blk[..., 0:2].copy().view(np.float16)[..., 0].astype(F32), 8, axis=1)
        dmin = np.repeat(blk[..., 2:4].copy().view(np.float16)[..., 0].astype(F32), 8, axis=1)
        sc = blk[..., 4:16].astype(np.int32)  # (N, nb, 12)
        s_lo = np.concatenate([sc[..., 0:4] & 63, (sc[..., 8:12] & 0xF) | ((sc[..., 0:4] >> 6) << 4)], axis=-1)
        m_lo = np.concatenate([sc[..., 4:8] & 63, (sc[..., 8:12] >> 4) | ((sc[..., 4:8] >> 6) << 4)], axis=-1)
        qs = blk[..., 16:144].reshape(N, nb, 4, 32)
        q = np.stack([qs & 0x0F, qs >> 4], axis=3).reshape(N, nb * 8, 32)  # item 2c: low, 2c + 1: high
        return q.astype(np.int8), s_lo.reshape(N, -1), m_lo.reshape(N, -1), d, dmin
    if t == GGMLType.Q6_K:
        d = np.repeat(blk[..., 208:210].copy().view(np.float16)[..., 0].astype(F32), 8, axis=1)
        sc = blk[..., 192:208].view(np.int8).astype(np.int32).reshape(N, nb, 2, 4, 2)  # half, group, 16-run
        ql = blk[..., 0:128].reshape(N, nb, 2, 2, 32)  # half, 32-byte run, byte
        qh = blk[..., 128:192].reshape(N, nb, 2, 32)
        q = np.empty((N, nb, 2, 4, 32), np.int16)
        for g in range(4):
            low = (ql[:, :, :, g % 2] >> (4 * (g // 2))) & 0x0F
            high = (qh >> (2 * g)) & 0x03
            q[:, :, :, g] = (low | (high << 4)).astype(np.int16) - 32
        return (q.reshape(N, nb * 8, 32).astype(np.int8), sc[..., 0].reshape(N, -1), sc[..., 1].reshape(N, -1),
                d, np.zeros_like(d))
    raise ValueError(f"no GPU kernel for {t.name}")


def _item_dot(items, t: GGMLType, xh, xl, xd, xs) -> np.ndarray:
    """item_dot for every (token, row, item): f32 (T, N, n_items)."""
    q, sc0, sc1, d, dmin = items
    qf = np.ascontiguousarray(q.transpose(1, 0, 2), np.float64)  # (n_items, N, 32): exact products
    T, K = xh.shape
    hf = xh.reshape(T, K // QK, QK).transpose(1, 2, 0).astype(np.float64)  # (n_items, 32, T)
    lf = xl.reshape(T, K // QK, QK).transpose(1, 2, 0).astype(np.float64)
    if t == GGMLType.Q6_K:
        half = [(qf[..., :16] @ hf[:, :16], qf[..., :16] @ lf[:, :16]), (qf[..., 16:] @ hf[:, 16:], qf[..., 16:] @ lf[:, 16:])]
        sa = (128 * half[0][0] + half[0][1]).astype(np.int64).transpose(2, 1, 0)  # (T, N, n_items)
        sb = (128 * half[1][0] + half[1][1]).astype(np.int64).transpose(2, 1, 0)
        s = (sc0[None] * sa + sc1[None] * sb).astype(np.int32)
        return (s.astype(F32) * d[None]) * xd[:, None, :]
    s = (128 * (qf @ hf) + qf @ lf).astype(np.int64).transpose(2, 1, 0)  # (T, N, n_items)
    if t == GGMLType.Q4_K:
        a = (sc0[None] * s).astype(np.int32).astype(F32) * d[None]
        b = (sc1[None] * xs[:, None, :].astype(np.int64)).astype(np.int32).astype(F32) * dmin[None]
        return (a - b) * xd[:, None, :]
    return (s.astype(np.int32).astype(F32) * d[None]) * xd[:, None, :]


def gemv(raw: np.ndarray, ggml_type: GGMLType, xh, xl, xd, xs, rows: int = 2048) -> np.ndarray:
    """gemv_<type>: y (T, N) f32 for x as quantize_x gives it (T <= MAX_T), `rows` at a time."""
    t = GGMLType(ggml_type)
    N = raw.shape[0]
    y = np.empty((xh.shape[0], N), F32)
    for r in range(0, N, rows):
        f = _item_dot(load_items(raw[r : r + rows], t), t, xh, xl, xd, xs)
        y[:, r : r + rows] = _lanes(f)
    return y


def dequant(raw: np.ndarray, ggml_type: GGMLType) -> np.ndarray:
    """dequant_<type>: W (N, K) f32 in gguf-py's order (the bits of quant.formats.dequantize)."""
    t = GGMLType(ggml_type)
    q, sc0, sc1, d, dmin = load_items(raw, t)
    qf = q.astype(F32)
    if t == GGMLType.Q4_K:
        w = (d * sc0.astype(F32))[..., None] * qf - (dmin * sc1.astype(F32))[..., None]
    elif t == GGMLType.Q6_K:
        sc = np.concatenate([np.repeat(sc0[..., None], 16, -1), np.repeat(sc1[..., None], 16, -1)], axis=-1)
        w = (d[..., None] * sc.astype(F32)) * qf
    else:
        w = d[..., None] * qf
    return w.reshape(raw.shape[0], -1)


# ---- norms, RoPE, gates -------------------------------------------------------------------------

def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """rms_norm over the last axis (D): f64 sums by 128 threads, then the halving tree."""
    x = np.ascontiguousarray(x, F32)
    D = x.shape[-1]
    r = x.reshape(-1, D)
    sq = (r * r).astype(np.float64)
    part = np.zeros((r.shape[0], NORM_THREADS))
    for k in range(0, D, NORM_THREADS):
        c = sq[:, k : k + NORM_THREADS]
        part[:, : c.shape[1]] += c
    h = NORM_THREADS // 2
    while h > 0:
        part[:, :h] += part[:, h : 2 * h]
        h //= 2
    mean = (part[:, 0] / D).astype(F32)
    scale = F32(1.0) / np.sqrt(mean + F32(eps))
    return ((r * scale[:, None]) * np.asarray(weight, F32)).reshape(x.shape)


def rope(x: np.ndarray, positions: np.ndarray, theta_scale: float, freq_scale: float, n_rot: int,
         neox: bool) -> np.ndarray:
    """rope: x (T, H, D) -> the rotated copy; theta_scale = base ** (-2 / n_rot) as ggml rounds it."""
    x = np.asarray(x, F32)
    half = n_rot // 2
    theta = np.asarray(positions).astype(F32)
    ang = np.empty((theta.shape[0], half), F32)
    for i in range(half):
        ang[:, i] = F32(freq_scale) * theta
        theta = theta * F32(theta_scale)
    a = ang.astype(np.float64)
    c, s = np.cos(a).astype(F32)[:, None, :], np.sin(a).astype(F32)[:, None, :]
    i0 = np.arange(half) if neox else 2 * np.arange(half)
    i1 = i0 + half if neox else i0 + 1
    out = x.copy()
    x0, x1 = x[..., i0], x[..., i1]
    out[..., i0] = x0 * c - x1 * s
    out[..., i1] = x0 * s + x1 * c
    return out


def silu_gate(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    g = np.asarray(gate, F32)
    with np.errstate(over="ignore"):
        return g / (F32(1.0) + np.exp(-g)) * np.asarray(up, F32)


def gelu_tanh_gate(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    g = np.asarray(gate, F32)
    inner = F32(0.79788456080286535587989211986876) * g * (F32(1.0) + F32(0.044715) * g * g)
    return F32(0.5) * g * (F32(1.0) + np.tanh(inner)) * np.asarray(up, F32)


# ---- attention ----------------------------------------------------------------------------------

def n_splits(positions: np.ndarray) -> int:
    return int(np.max(positions)) // ATT_CHUNK + 1


def attention(q: np.ndarray, kc: np.ndarray, vc: np.ndarray, positions: np.ndarray, window: int,
              scale: float) -> np.ndarray:
    """attention_split then attention_combine. q (T, n_head, D) f32; kc (n_rows, n_kv, D),
    vc (n_rows, n_kv, Dv) f16 with key j in row j % n_rows -> (T, n_head, Dv) f32."""
    q = np.asarray(q, F32)
    T, H, D = q.shape
    n_rows, n_kv, Dv = vc.shape
    G = H // n_kv
    pos = np.asarray(positions, np.int64)
    first = np.maximum(0, pos - window + 1) if window > 0 else np.zeros_like(pos)
    ns = n_splits(pos)
    acc = np.zeros((T, H, ns, Dv), F32)
    m = np.full((T, H, ns), -np.inf, F32)
    l = np.zeros((T, H, ns), F32)
    qr = q.reshape(T, H, D // 32, 32)
    for s in range(ns):
        j = np.arange(s * ATT_CHUNK, min((s + 1) * ATT_CHUNK, int(pos.max()) + 1))
        vis = (j[None] >= first[:, None]) & (j[None] <= pos[:, None])  # (T, n_j)
        if not vis.any():
            continue
        k = np.repeat(kc[j % n_rows].astype(F32), G, axis=1).reshape(len(j), H, D // 32, 32)  # (n_j, H, ., 32)
        part = np.zeros((T, H, len(j), 32), F32)
        for i in range(D // 32):  # lane sums over d = lane, lane + 32, ...
            part += qr[:, :, None, i, :] * k[None, :, :, i, :].transpose(0, 2, 1, 3)
        score = _butterfly(part) * F32(scale)  # (T, H, n_j)
        score = np.where(vis[:, None, :], score, -np.inf).astype(F32)
        ms = score.max(axis=-1)  # (T, H)
        with np.errstate(invalid="ignore"):
            p = np.where(vis[:, None, :], np.exp(score - ms[..., None]), F32(0)).astype(F32)
        lanes = np.zeros((T, H, 32), F32)  # warp 0: lane sums over visible keys a + lane, a + lane + 32, ...
        a = np.maximum(first, s * ATT_CHUNK) - s * ATT_CHUNK  # (T,) index of each query's first key
        for t in range(T):
            pt = p[t, :, a[t]:]
            for k0 in range(0, pt.shape[-1], 32):
                c = pt[:, k0 : k0 + 32]
                lanes[t, :, : c.shape[-1]] += c
        v = np.repeat(vc[j % n_rows].astype(F32), G, axis=1)  # (n_j, H, Dv)
        a_s = np.zeros((T, H, Dv), F32)
        for n in range(len(j)):
            a_s = np.where(vis[:, n, None, None], a_s + p[:, :, n, None] * v[n][None], a_s).astype(F32)
        has = vis.any(axis=1)
        acc[has, :, s] = a_s[has]
        m[has, :, s] = ms[has]
        l[has, :, s] = _butterfly(lanes)[has]
    M = m.max(axis=-1)  # (T, H)
    e = np.exp(m - M[..., None]).astype(F32)  # (T, H, ns): exp(-inf) = 0 for empty splits
    L = np.zeros((T, H), F32)
    out = np.zeros((T, H, Dv), F32)
    for s in range(ns):
        L = L + l[..., s] * e[..., s]
        out = out + acc[:, :, s] * e[..., s, None]
    return out / L[..., None]
