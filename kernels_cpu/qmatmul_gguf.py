"""Quantized products straight from GGUF blocks: no packing, so a weight can be used the moment
its bytes arrive (streamed layers, offload/), and resident weights cost exactly their file size.

    y = matmul(raw, GGMLType.Q4_K, k, x)   # raw uint8 (N, row_bytes), x (T, K) f32 -> (T, N) f32

Types: Q4_K, Q6_K, Q8_0, Q5_0 (the shipped models' types), F32 and F16 (numpy BLAS); others are
dequantized by the numpy reference and multiplied by BLAS.

- T <= SMALL_T (decode): activations are rounded to int8 as llama.cpp's CPU path does: per
  256-element super-block for the K-quants (q8_K: one scale, int sums per 16), per 32-element
  block for Q8_0/Q5_0 (q8_0). Each output row is one int32 dot product per sub-block, scaled in
  float32 in a fixed order, one row per thread iteration: a row's result does not depend on which
  other rows are computed with it, so a matrix computed in row chunks (a streamed output head)
  equals the same matrix computed whole, bit for bit.
- T > SMALL_T (prefill): tiles of TILE_ROWS(k) rows are dequantized to float32 (the exact GGUF
  values) and multiplied by BLAS. Tile boundaries sit at absolute row multiples of the tile
  height, so the same holds for any chunking at those multiples (`tile_rows`).

Block layouts (bytes): Q4_K 144 = d, dmin (f16), 12 packed 6-bit scales/mins, 128 nibbles (4
chunks of 64 elements, low nibbles first); Q6_K 210 = 128 low nibbles, 64 bytes of 2-bit highs,
16 int8 scales, d; Q8_0 34 = d, 32 int8; Q5_0 22 = d, 32 high bits (u32), 16 nibbles.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from ..quant.ggml_types import GGMLType

F32 = np.float32
I32 = np.int32
U64 = np.uint64
SMALL_T = 4  # measured crossover: int8 rows cost ~1.8 ms a token per 1.5B layer, float tiles ~6 ms + 0.4 ms a token
_TILE_BYTES = 1 << 20  # float32 bytes of dequantized rows per BLAS call (about one L2)
FUSED = (GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.Q8_0, GGMLType.Q5_0)

# every float16 bit pattern -> float32 (exact), indexed by the little-endian u16
_F16 = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(F32)


def tile_rows(k: int) -> int:
    """Rows per dequantized tile on the prefill path: a power of two from 64 to 1024 (so it divides
    1024), about _TILE_BYTES of float32. Row chunks of a matrix that start at multiples of it (of
    1024, say) give products bit-identical to the whole matrix's."""
    p = 64
    while p < 1024 and 2 * p * 4 * k <= _TILE_BYTES:
        p *= 2
    return p


# ---- activations --------------------------------------------------------------------------------

@njit(cache=True)
def _quantize_x(x, bs, sub, xq, xd, xs):
    """x (T, K) f32 -> xq (T, K) i8, xd (T, K // bs) f32 scales (amax / 127), xs (T, K // sub)
    int32 sums of xq per `sub` elements."""
    t_n, k = x.shape
    for t in range(t_n):
        for b in range(k // bs):
            amax = F32(0.0)
            for i in range(b * bs, b * bs + bs):
                amax = max(amax, abs(x[t, i]))
            d = amax / F32(127.0)
            inv = F32(127.0) / amax if amax > 0 else F32(0.0)
            xd[t, b] = d
            for i in range(b * bs, b * bs + bs):
                xq[t, i] = np.int8(min(F32(127.0), max(F32(-127.0), np.rint(x[t, i] * inv))))
        for s in range(k // sub):
            acc = I32(0)
            for i in range(s * sub, s * sub + sub):
                acc += I32(xq[t, i])
            xs[t, s] = acc


def quantize_x(x: np.ndarray, bs: int, sub: int):
    """x (T, K) -> int8 (T, K), scales (T, K // bs), int sums (T, K // sub)."""
    t_n, k = x.shape
    xq = np.empty((t_n, k), np.int8)
    xd = np.empty((t_n, k // bs), F32)
    xs = np.empty((t_n, k // sub), I32)
    _quantize_x(x, bs, sub, xq, xd, xs)
    return xq, xd, xs


# ---- decode kernels: one output row per iteration ----------------------------------------------
# Indices are unsigned so numba emits no negative-index wraparound (which blocks vectorisation).

@njit(cache=True, inline="always")
def _h(raw, p, f16):  # the f16 at byte p -> f32
    return f16[U64(raw[p]) | (U64(raw[p + U64(1)]) << U64(8))]


@njit(cache=True, nogil=True)
def _mv_q4_k(raw, r0, r1, xq, xd, xs, f16, out):
    """raw (N * RB,) u8, xq (T, K) i8, xd (T, K/256), xs (T, K/16) -> out (T, N)."""
    t_n, k = xq.shape
    nb = k // 256
    rb = U64(nb * 144)
    xq1 = xq.reshape(-1)
    for r in range(r0, r1):
        for t in range(t_n):
            acc = F32(0.0)
            for b in range(nb):
                p = U64(r) * rb + U64(b * 144)
                d = _h(raw, p, f16)
                dmin = _h(raw, p + U64(2), f16)
                s = p + U64(4)
                xo = U64(t * k + b * 256)
                sumi = I32(0)
                summ = I32(0)
                for j in range(4):  # chunk j: elements 64j..64j+31 (low nibbles), 64j+32.. (high)
                    if j < 2:
                        sc0 = I32(raw[s + U64(2 * j)] & 63)
                        m0 = I32(raw[s + U64(2 * j + 4)] & 63)
                        sc1 = I32(raw[s + U64(2 * j + 1)] & 63)
                        m1 = I32(raw[s + U64(2 * j + 5)] & 63)
                    else:
                        a = U64(2 * j - 4)
                        sc0 = I32((raw[s + U64(8) + a] & 15) | ((raw[s + a] >> 6) << 4))
                        m0 = I32((raw[s + U64(8) + a] >> 4) | ((raw[s + U64(4) + a] >> 6) << 4))
                        sc1 = I32((raw[s + U64(9) + a] & 15) | ((raw[s + U64(1) + a] >> 6) << 4))
                        m1 = I32((raw[s + U64(9) + a] >> 4) | ((raw[s + U64(5) + a] >> 6) << 4))
                    q = p + U64(16 + 32 * j)
                    xa = xo + U64(64 * j)
                    lo = I32(0)
                    hi = I32(0)
                    for l in range(32):
                        v = raw[q + U64(l)]
                        lo += I32(v & 15) * I32(xq1[xa + U64(l)])
                        hi += I32(v >> 4) * I32(xq1[xa + U64(32 + l)])
                    sumi += sc0 * lo + sc1 * hi
                    g = U64(b * 16 + 4 * j)
                    summ += m0 * (xs[t, g] + xs[t, g + U64(1)]) + m1 * (xs[t, g + U64(2)] + xs[t, g + U64(3)])
                acc += xd[t, b] * (d * F32(sumi) - dmin * F32(summ))
            out[t, r] = acc


@njit(cache=True, nogil=True)
def _mv_q6_k(raw, r0, r1, xq, xd, xs, f16, out):
    """raw (N * RB,) u8, xq (T, K) i8, xd (T, K/256) -> out (T, N)."""
    t_n, k = xq.shape
    nb = k // 256
    rb = U64(nb * 210)
    xq1 = xq.reshape(-1)
    for r in range(r0, r1):
        for t in range(t_n):
            acc = F32(0.0)
            for b in range(nb):
                p = U64(r) * rb + U64(b * 210)
                d = _h(raw, p + U64(208), f16)
                sumi = I32(0)
                for h in range(2):  # halves of 128 elements
                    ql = p + U64(64 * h)
                    qh = p + U64(128 + 32 * h)
                    sc = p + U64(192 + 8 * h)
                    xa = U64(t * k + b * 256 + 128 * h)
                    for g in range(2):  # l in [16g, 16g + 16): one scale per 16 elements per quarter
                        a1 = I32(0)
                        a2 = I32(0)
                        a3 = I32(0)
                        a4 = I32(0)
                        for l in range(16 * g, 16 * g + 16):
                            u = U64(l)
                            lq = raw[ql + u]
                            lq2 = raw[ql + U64(32) + u]
                            hq = raw[qh + u]
                            q1 = I32((lq & 15) | ((hq & 3) << 4)) - 32
                            q2 = I32((lq2 & 15) | (((hq >> 2) & 3) << 4)) - 32
                            q3 = I32((lq >> 4) | (((hq >> 4) & 3) << 4)) - 32
                            q4 = I32((lq2 >> 4) | (((hq >> 6) & 3) << 4)) - 32
                            a1 += q1 * I32(xq1[xa + u])
                            a2 += q2 * I32(xq1[xa + U64(32) + u])
                            a3 += q3 * I32(xq1[xa + U64(64) + u])
                            a4 += q4 * I32(xq1[xa + U64(96) + u])
                        s1 = I32(np.int8(raw[sc + U64(g)]))
                        s2 = I32(np.int8(raw[sc + U64(2 + g)]))
                        s3 = I32(np.int8(raw[sc + U64(4 + g)]))
                        s4 = I32(np.int8(raw[sc + U64(6 + g)]))
                        sumi += s1 * a1 + s2 * a2 + s3 * a3 + s4 * a4
                acc += xd[t, b] * (d * F32(sumi))
            out[t, r] = acc


@njit(cache=True, nogil=True)
def _mv_q8_0(raw, r0, r1, xq, xd, xs, f16, out):
    """raw (N * RB,) u8, xq (T, K) i8, xd (T, K/32) -> out (T, N)."""
    t_n, k = xq.shape
    nb = k // 32
    rb = U64(nb * 34)
    xq1 = xq.reshape(-1)
    for r in range(r0, r1):
        for t in range(t_n):
            acc = F32(0.0)
            for b in range(nb):
                p = U64(r) * rb + U64(b * 34)
                xa = U64(t * k + b * 32)
                s = I32(0)
                for l in range(32):
                    s += I32(np.int8(raw[p + U64(2 + l)])) * I32(xq1[xa + U64(l)])
                acc += xd[t, b] * (_h(raw, p, f16) * F32(s))
            out[t, r] = acc


@njit(cache=True, nogil=True)
def _mv_q5_0(raw, r0, r1, xq, xd, xs, f16, out):
    """raw (N * RB,) u8, xq (T, K) i8, xd (T, K/32) -> out (T, N)."""
    t_n, k = xq.shape
    nb = k // 32
    rb = U64(nb * 22)
    xq1 = xq.reshape(-1)
    for r in range(r0, r1):
        for t in range(t_n):
            acc = F32(0.0)
            for b in range(nb):
                p = U64(r) * rb + U64(b * 22)
                qh = U64(raw[p + U64(2)]) | (U64(raw[p + U64(3)]) << U64(8)) \
                    | (U64(raw[p + U64(4)]) << U64(16)) | (U64(raw[p + U64(5)]) << U64(24))
                xa = U64(t * k + b * 32)
                s = I32(0)
                for l in range(16):
                    v = raw[p + U64(6 + l)]
                    lo = I32((v & 15) | (((qh >> U64(l)) & U64(1)) << U64(4))) - 16
                    hi = I32((v >> 4) | (((qh >> U64(l + 16)) & U64(1)) << U64(4))) - 16
                    s += lo * I32(xq1[xa + U64(l)]) + hi * I32(xq1[xa + U64(l + 16)])
                acc += xd[t, b] * (_h(raw, p, f16) * F32(s))
            out[t, r] = acc


# ---- dequantization to float32 (the exact GGUF values) ------------------------------------------

@njit(cache=True, nogil=True)
def _dq_q4_k(raw, r0, k, f16, out):
    """Rows r0.. of raw (N * RB,) u8 -> out (R * K,) f32; R = out.size // K."""
    nb = k // 256
    for i in range(out.shape[0] // 256):  # super-blocks, row-major
        p = U64(r0 * nb + i) * U64(144)
        d = _h(raw, p, f16)
        dmin = _h(raw, p + U64(2), f16)
        s = p + U64(4)
        for j in range(4):
            if j < 2:
                sc0 = raw[s + U64(2 * j)] & 63
                m0 = raw[s + U64(2 * j + 4)] & 63
                sc1 = raw[s + U64(2 * j + 1)] & 63
                m1 = raw[s + U64(2 * j + 5)] & 63
            else:
                a = U64(2 * j - 4)
                sc0 = (raw[s + U64(8) + a] & 15) | ((raw[s + a] >> 6) << 4)
                m0 = (raw[s + U64(8) + a] >> 4) | ((raw[s + U64(4) + a] >> 6) << 4)
                sc1 = (raw[s + U64(9) + a] & 15) | ((raw[s + U64(1) + a] >> 6) << 4)
                m1 = (raw[s + U64(9) + a] >> 4) | ((raw[s + U64(5) + a] >> 6) << 4)
            d0 = d * F32(sc0)
            n0 = dmin * F32(m0)
            d1 = d * F32(sc1)
            n1 = dmin * F32(m1)
            q = p + U64(16 + 32 * j)
            o = U64(i * 256 + 64 * j)
            for l in range(32):
                v = raw[q + U64(l)]
                out[o + U64(l)] = d0 * F32(v & 15) - n0
                out[o + U64(32 + l)] = d1 * F32(v >> 4) - n1


@njit(cache=True, nogil=True)
def _dq_q6_k(raw, r0, k, f16, out):
    nb = k // 256
    for i in range(out.shape[0] // 256):
        p = U64(r0 * nb + i) * U64(210)
        d = _h(raw, p + U64(208), f16)
        for h in range(2):
            ql = p + U64(64 * h)
            qh = p + U64(128 + 32 * h)
            sc = p + U64(192 + 8 * h)
            o = U64(i * 256 + 128 * h)
            for g in range(2):
                d1 = d * F32(np.int8(raw[sc + U64(g)]))
                d2 = d * F32(np.int8(raw[sc + U64(2 + g)]))
                d3 = d * F32(np.int8(raw[sc + U64(4 + g)]))
                d4 = d * F32(np.int8(raw[sc + U64(6 + g)]))
                for l in range(16 * g, 16 * g + 16):
                    u = U64(l)
                    lq = raw[ql + u]
                    lq2 = raw[ql + U64(32) + u]
                    hq = raw[qh + u]
                    out[o + u] = d1 * F32(I32((lq & 15) | ((hq & 3) << 4)) - 32)
                    out[o + U64(32) + u] = d2 * F32(I32((lq2 & 15) | (((hq >> 2) & 3) << 4)) - 32)
                    out[o + U64(64) + u] = d3 * F32(I32((lq >> 4) | (((hq >> 4) & 3) << 4)) - 32)
                    out[o + U64(96) + u] = d4 * F32(I32((lq2 >> 4) | (((hq >> 6) & 3) << 4)) - 32)


@njit(cache=True, nogil=True)
def _dq_q8_0(raw, r0, k, f16, out):
    nb = k // 32
    for i in range(out.shape[0] // 32):
        p = U64(r0 * nb + i) * U64(34)
        d = _h(raw, p, f16)
        o = U64(i * 32)
        for l in range(32):
            out[o + U64(l)] = d * F32(np.int8(raw[p + U64(2 + l)]))


@njit(cache=True, nogil=True)
def _dq_q5_0(raw, r0, k, f16, out):
    nb = k // 32
    for i in range(out.shape[0] // 32):
        p = U64(r0 * nb + i) * U64(22)
        d = _h(raw, p, f16)
        qh = U64(raw[p + U64(2)]) | (U64(raw[p + U64(3)]) << U64(8)) \
            | (U64(raw[p + U64(4)]) << U64(16)) | (U64(raw[p + U64(5)]) << U64(24))
        o = U64(i * 32)
        for l in range(16):
            v = raw[p + U64(6 + l)]
            out[o + U64(l)] = d * F32(I32((v & 15) | (((qh >> U64(l)) & U64(1)) << U64(4))) - 16)
            out[o + U64(16 + l)] = d * F32(I32((v >> 4) | (((qh >> U64(l + 16)) & U64(1)) << U64(4))) - 16)


_MV = {GGMLType.Q4_K: _mv_q4_k, GGMLType.Q6_K: _mv_q6_k, GGMLType.Q8_0: _mv_q8_0, GGMLType.Q5_0: _mv_q5_0}
_DQ = {GGMLType.Q4_K: _dq_q4_k, GGMLType.Q6_K: _dq_q6_k, GGMLType.Q8_0: _dq_q8_0, GGMLType.Q5_0: _dq_q5_0}


# ---- the public functions -----------------------------------------------------------------------
# Parallelism is a small pool of Python threads running the serial, GIL-free kernels above on
# disjoint row ranges, with single-threaded BLAS: no spinning OpenMP or BLAS threads, which on a
# shared 2-core machine cost more than they give (measured: a 2-thread BLAS call at T=64 was
# 3-100x slower than a 1-thread one while other processes ran).

_state = {"threads": 1, "pool": None}


def set_threads(n: int) -> None:
    """Threads for the products (the calling thread is one of them); BLAS is set to 1 thread."""
    if n < 1:
        raise ValueError(f"threads must be >= 1, not {n}")
    if n != _state["threads"] and _state["pool"] is not None:
        _state["pool"].shutdown()
        _state["pool"] = None
    _state["threads"] = int(n)
    _set_blas_threads(1)


def _set_blas_threads(n: int) -> None:
    """numpy's bundled OpenBLAS, found among the loaded libraries; silently nothing elsewhere."""
    import ctypes
    try:
        with open("/proc/self/maps") as f:
            libs = {line.split()[-1] for line in f if "openblas" in line.lower() and line.rstrip().endswith(".so")}
    except OSError:
        libs = set()
    for path in libs:
        lib = ctypes.CDLL(path)
        for sym in ("scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_", "openblas_set_num_threads"):
            fn = getattr(lib, sym, None)
            if fn is not None:
                fn(ctypes.c_int(n))
                break


def describe() -> str:
    return (f"gguf: products straight from GGUF blocks (int8 activations for T<={SMALL_T}, float tiles + "
            f"BLAS above), no packing; {_state['threads']} threads")


def _run(job, n_items: int) -> None:
    """Call job(i, scratch) for i in range(n_items) on this thread and the pool's: each thread pulls
    the next item when it finishes one, so a thread the OS preempts (other processes on a small
    machine) delays only its own item, not a fixed half of the work. `scratch` is a per-thread
    dict for buffers."""
    nt = min(_state["threads"], n_items)
    if nt <= 1:
        scratch: dict = {}
        for i in range(n_items):
            job(i, scratch)
        return
    if _state["pool"] is None:
        from concurrent.futures import ThreadPoolExecutor
        _state["pool"] = ThreadPoolExecutor(_state["threads"] - 1, thread_name_prefix="edgellm-gguf")
    items = iter(range(n_items))  # next() on a range iterator is atomic under the GIL

    def loop():
        scratch: dict = {}
        for i in items:
            job(i, scratch)

    futs = [_state["pool"].submit(loop) for _ in range(nt - 1)]
    loop()
    for f in futs:
        f.result()


def _flat(raw: np.ndarray) -> np.ndarray:
    return raw.reshape(-1) if raw.flags.c_contiguous else np.ascontiguousarray(raw).reshape(-1)


def dequantize_rows(raw: np.ndarray, ggml_type: GGMLType, k: int, r0: int = 0, r1: int | None = None,
                    out: np.ndarray | None = None) -> np.ndarray:
    """Rows [r0, r1) of raw uint8 (N, row_bytes) -> float32 (r1 - r0, K), the GGUF values."""
    t = GGMLType(ggml_type)
    r1 = raw.shape[0] if r1 is None else r1
    if t == GGMLType.F32:
        return raw[r0:r1].view(F32).reshape(r1 - r0, k)
    if t == GGMLType.F16:
        return raw[r0:r1].view(np.float16).astype(F32).reshape(r1 - r0, k)
    if t not in _DQ:
        from .qmatmul_ref import dequantize_rows as ref
        return ref(raw[r0:r1], t, k)
    out = np.empty((r1 - r0, k), F32) if out is None else out[: r1 - r0]
    _DQ[t](_flat(raw), r0, k, _F16, out.reshape(-1))
    return out


def matmul(raw: np.ndarray, ggml_type: GGMLType, k: int, x: np.ndarray) -> np.ndarray:
    """x float32 (T, K) @ W.T -> (T, N), W given as GGUF rows raw uint8 (N, row_bytes)."""
    t = GGMLType(ggml_type)
    x = np.ascontiguousarray(x, dtype=F32)
    n = raw.shape[0]
    if x.ndim != 2 or x.shape[1] != k:
        raise ValueError(f"matmul: x has shape {x.shape}, expected (T, {k})")
    out = np.empty((x.shape[0], n), F32)
    flat = _flat(raw)
    if t in _MV and x.shape[0] <= SMALL_T:  # int8 activations; rows in ~4 pieces per thread
        bs = 256 if t in (GGMLType.Q4_K, GGMLType.Q6_K) else 32
        xq, xd, xs = quantize_x(x, bs, 16 if bs == 256 else 32)
        kern = _MV[t]
        pieces = max(1, min(4 * _state["threads"], n // 256))
        cuts = [n * i // pieces for i in range(pieces + 1)]
        _run(lambda i, _: kern(flat, cuts[i], cuts[i + 1], xq, xd, xs, _F16, out), pieces)
        return out
    tile = tile_rows(k)  # float32 tiles + 1-thread BLAS, one tile per item

    def work(i, scratch):
        buf = scratch.get("buf")
        if buf is None:
            buf = scratch["buf"] = np.empty((tile, k), F32)
        r0 = i * tile
        r1 = min(n, r0 + tile)
        w = dequantize_rows(raw, t, k, r0, r1, out=buf)
        np.matmul(x, w.T, out=out[:, r0:r1])

    _run(work, -(-n // tile))
    return out
