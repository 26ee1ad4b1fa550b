"""Importance-weighted quantizers: float32 rows -> GGUF block bytes of Q2_K .. Q8_0.

    raw = quantize_rows(w, GGMLType.Q3_K, imp)   # w float32 (N, K), imp (K,) >= 0 -> uint8 (N, row_bytes)

Each block is fitted to minimise sum_i imp[i] * (w[i] - w_hat[i])^2, imp being the mean square of
the activation each input column meets (an importance matrix; all ones without one): an output's
error is then what the product's output loses, to a diagonal approximation.

A block (or sub-block) is fitted by trying a few grid scales around the one that maps its value
of largest magnitude to the end of the integer range, rounding, and solving the weighted least
squares scale for those integers (and offset, for types with a min); the best fit wins. The
K-quants then round their sub-block scales to the 4-, 6- or 8-bit fields under one f16 super
scale, and the integers are rounded again against the scales as stored, so the bytes decode
(quant/formats) to exactly the values the error was measured on.

The packers follow the layouts documented in `formats.py` and `formats_k.py`.
"""
from __future__ import annotations

import numpy as np

from .ggml_types import GGMLType

F32 = np.float32
QK_K = 256
_STEPS = (-0.6, -0.3, 0.0, 0.3, 0.6, 1.0)  # grid offsets of the integer range end tried per block


def _pos(d: np.ndarray) -> np.ndarray:
    return np.where(d == 0, F32(1), d)


def _fit_symmetric(x: np.ndarray, w: np.ndarray, nmax: int, nmin: int) -> np.ndarray:
    """Blocks x (n, bs) with weights w -> the weighted-LS scale d (n,) of integers in [nmin, nmax]
    (nmin = -nmax or -nmax - 1); the value of largest magnitude maps near nmin."""
    idx = np.abs(x).argmax(axis=1)
    xm = np.take_along_axis(x, idx[:, None], axis=1)[:, 0]  # (n,) signed
    best_d = np.zeros(x.shape[0], F32)
    best = np.full(x.shape[0], -1.0, np.float64)
    for s in _STEPS:
        iscale = F32(nmin - s) / _pos(xm)  # maps xm to about nmin
        q = np.clip(np.rint(x * iscale[:, None]), nmin, nmax)
        sumlx = (w * x * q).sum(axis=1, dtype=np.float64)
        suml2 = (w * q * q).sum(axis=1, dtype=np.float64)
        score = np.where(suml2 > 0, sumlx * sumlx / np.where(suml2 > 0, suml2, 1), 0.0)  # error drop
        better = score > best
        best = np.where(better, score, best)
        best_d = np.where(better, np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, 1), 0), best_d).astype(F32)
    return np.where(xm == 0, F32(0), best_d)


def _fit_min(x: np.ndarray, w: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Blocks x (n, bs) -> (d, m) (n,) each, d >= 0, m >= 0: x ~ d * q - m with q in [0, nmax]."""
    lo = np.minimum(x.min(axis=1), 0)
    hi = x.max(axis=1)
    rng_ = np.where(hi > lo, hi - lo, F32(1))
    best_d = np.zeros(x.shape[0], F32)
    best_m = -lo.astype(F32)
    best_err = (w * (x - lo[:, None]) ** 2).sum(axis=1, dtype=np.float64)  # all q = 0
    sw = w.sum(axis=1, dtype=np.float64)
    swx = (w * x).sum(axis=1, dtype=np.float64)
    for s in _STEPS:
        iscale = F32(nmax + s) / rng_
        q = np.clip(np.rint((x - lo[:, None]) * iscale[:, None]), 0, nmax)
        swq = (w * q).sum(axis=1, dtype=np.float64)
        swq2 = (w * q * q).sum(axis=1, dtype=np.float64)
        swxq = (w * x * q).sum(axis=1, dtype=np.float64)
        det = sw * swq2 - swq * swq
        ok = det > 0
        det_ = np.where(ok, det, 1)
        d = np.where(ok, (sw * swxq - swq * swx) / det_, 0)
        b = np.where(ok, (swq2 * swx - swq * swxq) / det_, 0)  # x ~ d q + b
        pos = b > 0  # a min must be subtracted: refit d with b = 0
        d = np.where(pos, swxq / np.where(swq2 > 0, swq2, 1), d)
        b = np.where(pos, 0, b)
        d = np.maximum(d, 0)
        err = (w * (x - d[:, None] * q - b[:, None]) ** 2).sum(axis=1, dtype=np.float64)
        better = ok & (err < best_err)
        best_err = np.where(better, err, best_err)
        best_d = np.where(better, d, best_d).astype(F32)
        best_m = np.where(better, -b, best_m).astype(F32)
    return best_d, best_m


def _f16(v: np.ndarray) -> np.ndarray:
    return v.astype(np.float16).astype(F32)


def _round_q(x, scale, mins, nmin, nmax):
    """Integers for x (n, bs) against stored scale/min (n, 1): x ~ scale * q - mins."""
    inv = np.divide(F32(1), scale, out=np.zeros_like(scale), where=scale != 0)
    return np.clip(np.rint((x + mins) * inv), nmin, nmax).astype(np.int8)


def _sub_scales(d: np.ndarray, lo: int, hi: int, signed: bool) -> tuple[np.ndarray, np.ndarray]:
    """Sub-block scales d (n, nsub) -> (super scale (n, 1) as f16 values, integer scales (n, nsub))
    in [lo, hi]: the largest maps to hi (or, signed, the largest magnitude to lo)."""
    if signed:
        idx = np.abs(d).argmax(axis=1)[:, None]
        dm = np.take_along_axis(d, idx, axis=1)
        sup = _f16(dm / F32(lo))
    else:
        sup = _f16(d.max(axis=1, keepdims=True) / F32(hi))
    inv = np.divide(F32(1), sup, out=np.zeros_like(sup), where=sup != 0)
    return sup, np.clip(np.rint(d * inv), lo, hi).astype(np.int16)


# ---- the 2-bit fields of Q2_K / Q3_K: byte j of half h holds elements 128h + j + 32f at bits 2f ----

def _pack2(q: np.ndarray) -> np.ndarray:
    """uint8 (n, 256) of 0..3 -> (n, 64)."""
    q = q.reshape(-1, 2, 4, 32).astype(np.uint8)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(-1, 64)


def _nib_pairs(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return (lo.astype(np.uint8) & 15) | (hi.astype(np.uint8) << 4)


# ---- one function per type: x (n_blocks, block_size) f32, w the same shape -> (n_blocks, type_size) ----

def _q8_0(x, w):
    d = _f16(_fit_symmetric(x, w, 127, -127))[:, None]
    q = _round_q(x, d, 0, -127, 127)
    return np.concatenate([d.astype(np.float16).view(np.uint8), q.view(np.uint8)], axis=1)


def _q5_0(x, w):
    d = _f16(_fit_symmetric(x, w, 15, -16))[:, None]
    q = (_round_q(x, d, 0, -16, 15) + 16).astype(np.uint8)  # (n, 32) 0..31
    qh = np.packbits((q >> 4) & 1, axis=1, bitorder="little")  # (n, 4): bit j = fifth bit of element j
    return np.concatenate([d.astype(np.float16).view(np.uint8), qh, _nib_pairs(q[:, :16], q[:, 16:])], axis=1)


def _q4_0(x, w):
    d = _f16(_fit_symmetric(x, w, 7, -8))[:, None]
    q = (_round_q(x, d, 0, -8, 7) + 8).astype(np.uint8)
    return np.concatenate([d.astype(np.float16).view(np.uint8), _nib_pairs(q[:, :16], q[:, 16:])], axis=1)


def _q6_k(x, w):
    n = x.shape[0]
    xs, ws = x.reshape(n * 16, 16), w.reshape(n * 16, 16)
    sup, sc = _sub_scales(_fit_symmetric(xs, ws, 31, -32).reshape(n, 16), -128, 127, True)
    scale = (sup * sc.astype(F32)).reshape(n * 16, 1)  # d * sc, as the dequantizer multiplies
    q = (_round_q(xs, scale, 0, -32, 31) + 32).astype(np.uint8).reshape(n, 2, 128)  # halves
    ql = _nib_pairs(q[:, :, :64], q[:, :, 64:]).reshape(n, 128)
    h = (q >> 4).reshape(n, 2, 4, 32)
    qh = (h[:, :, 0] | (h[:, :, 1] << 2) | (h[:, :, 2] << 4) | (h[:, :, 3] << 6)).reshape(n, 64)
    return np.concatenate([ql, qh, sc.astype(np.int8).view(np.uint8), sup.astype(np.float16).view(np.uint8)], axis=1)


def _q3_k(x, w):
    n = x.shape[0]
    xs, ws = x.reshape(n * 16, 16), w.reshape(n * 16, 16)
    sup, sc = _sub_scales(_fit_symmetric(xs, ws, 3, -4).reshape(n, 16), -32, 31, True)
    scale = (sup * sc.astype(F32)).reshape(n * 16, 1)
    q = (_round_q(xs, scale, 0, -4, 3) + 4).astype(np.uint8).reshape(n, 256)  # 0..7
    hmask = np.zeros((n, 32), np.uint8)
    for i in range(8):  # bit i of byte j: the high bit of element 32 i + j
        hmask |= ((q[:, 32 * i:32 * i + 32] >> 2) & 1) << i
    s = (sc + 32).astype(np.uint8)  # (n, 16) 0..63
    low = _nib_pairs(s[:, :8], s[:, 8:])  # (n, 8)
    top = (s >> 4).reshape(n, 4, 4)  # [k, j]: scale 4k + j -> bits 2k of byte 8 + j
    high = top[:, 0] | (top[:, 1] << 2) | (top[:, 2] << 4) | (top[:, 3] << 6)
    return np.concatenate([hmask, _pack2(q & 3), low, high, sup.astype(np.float16).view(np.uint8)], axis=1)


def _fit_k_min(x, w, nsub, nmax, smax):
    """Shared by Q4_K / Q2_K: -> (d, dmin f16 values (n, 1), sc, mn integer (n, nsub), q (n, 256))."""
    n, bs = x.shape[0], QK_K // nsub
    xs, ws = x.reshape(n * nsub, bs), w.reshape(n * nsub, bs)
    d, m = _fit_min(xs, ws, nmax)
    sup, sc = _sub_scales(d.reshape(n, nsub), 0, smax, False)
    msup, mn = _sub_scales(m.reshape(n, nsub), 0, smax, False)
    scale = (sup * sc.astype(F32)).reshape(n * nsub, 1)
    mins = (msup * mn.astype(F32)).reshape(n * nsub, 1)
    q = _round_q(xs, scale, mins, 0, nmax).astype(np.uint8).reshape(n, QK_K)
    return sup, msup, sc.astype(np.uint8), mn.astype(np.uint8), q


def _q4_k(x, w):
    n = x.shape[0]
    sup, msup, sc, mn, q = _fit_k_min(x, w, 8, 15, 63)
    packed = np.concatenate([(sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6), (mn[:, :4] & 63) | ((mn[:, 4:] >> 4) << 6),
                             (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)], axis=1)  # (n, 12)
    q = q.reshape(n, 4, 2, 32)  # chunk c: sub-block 2c in low nibbles, 2c + 1 in high
    qs = _nib_pairs(q[:, :, 0], q[:, :, 1]).reshape(n, 128)
    return np.concatenate([sup.astype(np.float16).view(np.uint8), msup.astype(np.float16).view(np.uint8), packed, qs],
                          axis=1)


def _q2_k(x, w):
    sup, msup, sc, mn, q = _fit_k_min(x, w, 16, 3, 15)
    return np.concatenate([_nib_pairs(sc, mn), _pack2(q), sup.astype(np.float16).view(np.uint8),
                           msup.astype(np.float16).view(np.uint8)], axis=1)


def floored(imp: np.ndarray) -> np.ndarray:
    """Importances (K,) with a floor of 1e-3 of their mean: a channel never seen in calibration
    still matters a little (and no weight is zero where it is divided by)."""
    imp = np.asarray(imp, F32)
    return np.maximum(imp, F32(1e-3) * max(float(imp.mean()), 1e-30)).astype(F32)


QUANTIZERS = {GGMLType.Q2_K: _q2_k, GGMLType.Q3_K: _q3_k, GGMLType.Q4_0: _q4_0, GGMLType.Q4_K: _q4_k,
              GGMLType.Q5_0: _q5_0, GGMLType.Q6_K: _q6_k, GGMLType.Q8_0: _q8_0}
_CHUNK = 1 << 20  # elements quantized at a time (bounds the temporaries)


def quantize_rows(w: np.ndarray, ggml_type: GGMLType, imp: np.ndarray | None = None) -> np.ndarray:
    """float32 (N, K) -> uint8 (N, row_bytes) of `ggml_type`, fitted under the column importances
    imp (K,) (None: all equal). K must be a multiple of the type's block size."""
    t = GGMLType(ggml_type)
    fn = QUANTIZERS.get(t)
    if fn is None:
        raise ValueError(f"no quantizer for {t.name}; have {', '.join(q.name for q in QUANTIZERS)}")
    n, k = w.shape
    if k % t.block_size:
        raise ValueError(f"rows of {k} values are not a whole number of {t.name} blocks of {t.block_size}")
    imp = np.ones(k, F32) if imp is None else floored(imp)
    out = np.empty((n, t.row_bytes(k)), np.uint8)
    nb = k // t.block_size
    wb = np.broadcast_to(imp.reshape(nb, t.block_size), (max(1, _CHUNK // k), nb, t.block_size))
    step = max(1, _CHUNK // k)
    for r in range(0, n, step):
        x = np.ascontiguousarray(w[r:r + step], F32)
        rows = x.shape[0]
        blocks = fn(x.reshape(rows * nb, t.block_size), np.ascontiguousarray(wb[:rows]).reshape(rows * nb, -1))
        out[r:r + rows] = blocks.reshape(rows, -1)
    return out
