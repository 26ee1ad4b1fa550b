"""Quantized products straight from GGUF blocks: the one kernel family of edgellm's CPU path.

    w = Weight(raw, GGMLType.Q4_K, k)      # raw uint8 (N, row_bytes): a view of the mapped file
    y = matmul(w, x)                       # x (T, K) f32 -> (T, N) f32
    p = Product([wq, wk, wv])              # several weights sharing x: one call, one quantization
    yq, yk, yv = p(x)

No packing and no copy: a resident weight is its file pages, a streamed one (offload/) is used the
moment its bytes arrive, and both go through the same kernels.

x is rounded per 32-element block to 15-bit integers carried as two int8 parts (`quantize_x`;
on AVX2 as int16, `simd.wide`),
and each row meets up to 8 tokens in one call of a `qmatmul_rows` intrinsic on the CPU's int8
dot-product instruction (`simd`): the row's blocks are unpacked once for all of them. Rows are
split across threads in items taken from a shared counter. A prompt chunk of more than
`qmatmul_tiles.TILE_T` tokens instead packs each item's rows 32 at a time into tiles whose lanes
are rows, and runs every token against them (Q4_K, Q6_K, Q5_0, Q8_0; the other types run their
row kernels against groups of tokens in turn while they stay in cache).

A row's result does not depend on the chunking, the thread count, the other tokens in the batch
(decode, speculative verification and batched parallel decode give a token the same bits; so do
any two tiled prompt chunks) or the CPU path.
15-bit activations cost two products per 64 weights and are ~100x closer to the exact path than
llama.cpp's 8-bit ones; 8 bits for prompts only (one product, ~1.35x their speed) measured GPL-3
perplexity 0.2-0.5% off the exact path, outside the 0.3% the accuracy rule allows.
On AVX2 (int16 activations) a decode row is bound by instructions, not DRAM: Q4_K 8960x1536 on
one Zen 2 thread runs ~135 instructions per 256-weight block at T = 1 (14.5 G weights/s, L3-warm
and from DRAM alike), 18 / 21.6 / 21.5 G weight-tokens/s at T = 2 / 4 / 8. A prototype with one
activation scale per 256 elements, the 6-bit sub-block scales folded into the int16 weights
(vpmullw) and int32 sums over each super-block measured T = 4 19 -> 24 G weight-tokens/s but T = 1
15 -> 13 (the multiplies share vpmaddwd's port), at ~7x this layout's rounding error (steps still
128x finer than llama.cpp's 8-bit ones); not adopted (2026-12-03).

Types: Q4_K, Q5_0, Q6_K, Q8_0 (what the shipped Q4_K_M models hold) and Q3_K, Q2_K, Q4_0 (what
the compressor emits) run fast; F32, F16 and every other type are dequantized by the numpy
reference (quant/) and multiplied by BLAS.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import numba
from numba import njit

from ..quant.ggml_types import GGMLType
from . import qmatmul_tiles as tiles
from . import simd, sparse, threads
from .jit import specialize
from .qmatmul_ref import dequantize_rows as _dequantize_ref
from .qmatmul_rows import (NO_PREFETCH, _row_q2_k, _row_q3_k, _row_q4_0, _row_q4_k, _row_q5_0, _row_q6_k, _row_q8_0,
                           quantize_block)
from .threads import ARGS, finish, take, voidptr

F32 = np.float32
I32 = np.int32
SMALL_T = 8  # tokens a row meets per kernel call (weights unpacked once for all of them)
_TILE_BYTES = 1 << 20  # float32 bytes of dequantized rows: the offload planner's row alignment
# bytes of weights per work item of a decode product: small items cost a 2-thread product on
# qwen 1.5B's ffn_gate (8960x1536 Q4_K) half its speed (17.9 GB/s with 14 KB items, 41 with
# 221 KB: each jump restarts the hardware prefetcher's stream), large ones leave a thread the OS
# preempts holding a big share; a product is cut into at least 4 items per thread
_ITEM_BYTES = 256 << 10

# type codes inside the kernels, and elements per block (the unit a row is counted in)
Q4_K, Q6_K, Q8_0, Q5_0, Q3_K, Q2_K, Q4_0 = range(7)
FAST = {GGMLType.Q4_K: Q4_K, GGMLType.Q6_K: Q6_K, GGMLType.Q8_0: Q8_0, GGMLType.Q5_0: Q5_0,
        GGMLType.Q3_K: Q3_K, GGMLType.Q2_K: Q2_K, GGMLType.Q4_0: Q4_0}
BLOCK = {GGMLType.Q4_K: 256, GGMLType.Q6_K: 256, GGMLType.Q8_0: 32, GGMLType.Q5_0: 32,
         GGMLType.Q3_K: 256, GGMLType.Q2_K: 256, GGMLType.Q4_0: 32}


@dataclass(frozen=True)
class Weight:
    """A GGUF matrix (N, K) as its raw rows; `raw` should be a view of the mapped file."""

    raw: np.ndarray  # uint8 (N, row_bytes)
    ggml_type: GGMLType
    k: int  # input columns

    @property
    def n(self) -> int:
        return self.raw.shape[0]

    @property
    def fast(self) -> bool:
        return self.ggml_type in FAST


def tile_rows(k: int) -> int:
    """A row count of ~1 MB of float32 that offload/ aligns streamed chunks of the output head to
    (any row chunks give bit-identical products; aligned ones keep the units even)."""
    return max(16, _TILE_BYTES // (4 * k) // 16 * 16)


# ---- activations --------------------------------------------------------------------------------

@njit(cache=True, nogil=True)
def _quantize_x(x, xq, xd, xs, x4n, wide):
    """x (T, K) f32 -> xq (T, 2 Kp) i8, xd and xs (T, Kp/32) f32, x4n (T, Kp/4) i32 (module doc
    of qmatmul_rows); the padding (K..Kp) must be zero on entry and stays so. Per 32-block:
    v = rint(x * 127 * 128 / amax) split as hi = rint(v / 128), lo = v - 128 hi (wide: v as
    int16 in simd.WIDE_ORDER, 64 bytes per block); the block sum in a fixed order (8 running
    sums of every 8th element, then their halves added pairwise).
    One vector intrinsic per block (qmatmul_rows.quantize_block)."""
    t_n, k = x.shape
    for t in range(t_n):
        xr, qr, nr, dr, sr = x[t], xq[t], x4n[t], xd[t], xs[t]
        for b in range(k // 32):
            if wide:
                quantize_block(xr, 32 * b, qr, 64 * b, dr, sr, nr, b, 1)
            else:
                quantize_block(xr, 32 * b, qr, 64 * b - (32 * b) % 64, dr, sr, nr, b, 0)


def quantize_x(x: np.ndarray, reuse: bool = False, isa: int | None = None):
    """x f32 (T, K), K a multiple of 32 -> (xq, xd, xs, x4n) as the kernels of CPU path isa
    (default: simd.chosen()) read them: xq as two int8 parts, or as int16 on a simd.wide path.
    reuse: into this thread's buffers for (T, K) when T <= SMALL_T (overwritten by its next
    call: for a product that is done with them when it returns; a decode step's four products
    per layer then allocate nothing)."""
    t_n, k = x.shape
    wide = simd.wide(simd.chosen() if isa is None else isa)
    key = (threading.get_ident(), t_n, k) if reuse and t_n <= SMALL_T else None
    bufs = _X_BUFFERS.get(key) if key is not None else None
    if bufs is None:
        kp = -(-k // 64) * 64
        bufs = (np.zeros((t_n, 2 * kp), np.int8), np.zeros((t_n, kp // 32), F32), np.zeros((t_n, kp // 32), F32),
                np.zeros((t_n, kp // 4), I32))  # (the padding K..Kp stays zero)
        if key is not None:
            if len(_X_BUFFERS) >= 256:  # (threads come and go: keep a bounded set)
                _X_BUFFERS.clear()
            _X_BUFFERS[key] = bufs
    _quantize_x(x, *bufs, wide)
    return bufs


_X_BUFFERS: dict = {}  # (thread, T, K) -> quantize_x's arrays, for reuse


# ---- decode kernels -----------------------------------------------------------------------------
# A decode product is a task of work items (weight, first row), taken from the board (threads.py)
# by every thread of the call. Its arguments travel on the board as addresses, so a worker that
# is polling picks a task up with no Python and no GIL: x's four arrays, the output (T, sum N)
# and a descriptor per weight (W, 8): raw address, raw bytes, type code, row bytes, blocks per
# row, first output column, rows. One function per CPU path (ISA is a constant of each copy).

_A_XQ, _A_XD, _A_XS, _A_X4, _A_OUT, _A_DESC, _A_IW, _A_IR = range(ARGS, ARGS + 16, 2)
# (the items: item_w (n,) weight index, item_r (2, n) first and end row)
_A_MODE, _A_SD = ARGS + 16, ARGS + 17  # 0: a product as above; 1: a sparse FFN (sparse.py) of descriptor sd
_A_X16, _A_X32 = ARGS + 18, ARGS + 19  # prompts for tiles: minus the sums of v per 16 and per 32 elements


@njit(cache=True, nogil=True)
def _write_args(board, xq, xd, xs, x4n, out, desc, item_w, item_r, x16, x32):
    board[_A_XQ], board[_A_XQ + 1] = xq.ctypes.data, xq.shape[0]
    board[_A_XD], board[_A_XD + 1] = xd.ctypes.data, xq.shape[1] // 2
    board[_A_XS] = xs.ctypes.data
    board[_A_X4] = x4n.ctypes.data
    board[_A_OUT], board[_A_OUT + 1] = out.ctypes.data, out.shape[0] // xq.shape[0]
    board[_A_DESC], board[_A_DESC + 1] = desc.ctypes.data, desc.shape[0]
    board[_A_IW], board[_A_IW + 1] = item_w.ctypes.data, item_w.shape[0]
    board[_A_IR] = item_r.ctypes.data  # (2, n_items): first and end row
    board[_A_MODE] = 0
    board[_A_X16], board[_A_X32] = x16.ctypes.data, x32.ctypes.data


def _rows(code, raw, r0, r1, rb, nb, xq, xd, xs, x4n, t0, kp, out, ooff, ostride, c, m):
    """Rows r0 .. r1 - 1 (of type `code`, rb bytes each), m at a time (the last ones one by one),
    against tokens t0 .. t0 + c - 1; row r's results at out[ooff + r + t * ostride]. c and m are
    compiled as constants: one copy per pair."""
    numba.literally(c)
    numba.literally(m)
    r = r0
    while r < r1:
        if r + m <= r1:
            _row(code, raw, r, rb, nb, xq, xd, xs, x4n, t0, kp, out, ooff, ostride, c, m)
            r += m
        else:
            _row(code, raw, r, rb, nb, xq, xd, xs, x4n, t0, kp, out, ooff, ostride, c, 1)
            r += 1


def _rows_at(code, raw, idx, n, rb, nb, xq, xd, xs, x4n, kp, out, ostride):
    """Rows idx[0 .. n - 1] (any order) against token 0 alone; row r's result at out[r]. (The
    sparse FFN's decode: one call per chunk of neurons, since a call costs as much as a row.)"""
    for j in range(min(sparse.AHEAD, n)):
        sparse._prefetch(raw, idx[j] * rb, rb)
    for j in range(n):
        if j + sparse.AHEAD < n:  # rows in no order: each asks for the one AHEAD after it
            sparse._prefetch(raw, idx[j + sparse.AHEAD] * rb, rb)
        _row(code, raw, idx[j], rb, nb, xq, xd, xs, x4n, 0, kp, out, 0, ostride, 1, 1)


def _row(code, raw, r, rb, nb, xq, xd, xs, x4n, t0, kp, out, ooff, ostride, c, m):
    if code == Q4_K:
        _row_q4_k(raw, r * rb, rb, nb, xq, xd, xs, x4n, t0, kp, out, ooff + r, ostride, m, c, ISA)
    elif code == Q6_K:
        _row_q6_k(raw, r * rb, rb, nb, xq, xd, xs, x4n, t0, kp, out, ooff + r, ostride, m, c, ISA)
    elif code == Q8_0:
        _row_q8_0(raw, r * rb, rb, nb, xq, xd, xs, x4n, t0, kp, out, ooff + r, ostride, m, c, ISA)
    elif code == Q5_0:
        _row_q5_0(raw, r * rb, rb, nb, xq, xd, xs, x4n, t0, kp, out, ooff + r, ostride, m, c, ISA)
    elif code == Q3_K:
        _row_q3_k(raw, r * rb, rb, nb, xq, xd, xs, x4n, t0, kp, out, ooff + r, ostride, m, c, ISA)
    elif code == Q2_K:
        _row_q2_k(raw, r * rb, rb, nb, xq, xd, xs, x4n, t0, kp, out, ooff + r, ostride, m, c, ISA)
    else:
        _row_q4_0(raw, r * rb, rb, nb, xq, xd, xs, x4n, t0, kp, out, ooff + r, ostride, m, c, ISA)


def _tiles(code, raw, r0, r1, rb, nb, xq, xd, xs, t_n, kp, out, ooff, ostride, scratch):
    """Rows r0 .. r1 - 1 against all t_n tokens through packed tiles of 32 rows (qmatmul_tiles)."""
    wt, sc, mn, y, x16, x32 = scratch
    s_len = 16 if code == Q6_K else 32
    xo = x16 if code == Q6_K else x32
    nsub = kp // s_len
    per = tiles.K_CHUNK // s_len
    for r in range(r0, r1, tiles.ROWS):
        n = min(tiles.ROWS, r1 - r)
        tiles.pack(code, raw, r, n, rb, nb, kp, wt, sc, mn)
        for s0 in range(0, nsub, per):  # K in chunks, each against all tokens (activations stay in L1)
            ns = min(per, nsub - s0)
            t0 = 0
            while t0 < t_n:
                yt = y[t0 * tiles.ROWS:]
                if t_n - t0 >= tiles.NT:
                    _tile_call(code, wt, sc, mn, xq, xd, xs, xo, t0, kp, ns, s0, yt, 8, 1)
                    _tile_call(code, wt, sc, mn, xq, xd, xs, xo, t0, kp, ns, s0, yt, 8, 2)
                    t0 += tiles.NT
                else:
                    _tile_call(code, wt, sc, mn, xq, xd, xs, xo, t0, kp, ns, s0, yt, 1, 3)
                    t0 += 1
        for t in range(t_n):
            for i in range(n):
                out[t * ostride + ooff + r + i] = y[t * tiles.ROWS + i]


def _tile_call(code, wt, sc, mn, xq, xd, xs, xo, t0, kp, nsub, s0, y, c, g):
    if code == Q4_K:
        tiles._tile(wt, sc, mn, xq, xd, xs, xo, t0, kp, nsub, s0, y, c, g, 32, 0, 1, ISA)
    elif code == Q6_K:
        tiles._tile(wt, sc, mn, xq, xd, xs, xo, t0, kp, nsub, s0, y, c, g, 16, 32, 0, ISA)
    elif code == Q8_0:
        tiles._tile(wt, sc, mn, xq, xd, xs, xo, t0, kp, nsub, s0, y, c, g, 32, 128, 0, ISA)
    else:
        tiles._tile(wt, sc, mn, xq, xd, xs, xo, t0, kp, nsub, s0, y, c, g, 32, 16, 0, ISA)


def _task(board, epoch):
    """Take items of the task `epoch` from the board until none is left (see above)."""
    if board[_A_MODE] == 1:
        _ffn_task(board, epoch, board[_A_SD])
        return
    t_n, kp = board[_A_XQ + 1], board[_A_XD + 1]
    n_out, n_w, n_items = board[_A_OUT + 1], board[_A_DESC + 1], board[_A_IW + 1]
    xq1 = numba.carray(voidptr(board[_A_XQ]), t_n * 2 * kp, np.int8)
    xd1 = numba.carray(voidptr(board[_A_XD]), t_n * kp // 32, np.float32)
    xs1 = numba.carray(voidptr(board[_A_XS]), t_n * kp // 32, np.float32)
    x4n1 = numba.carray(voidptr(board[_A_X4]), t_n * kp // 4, np.int32)
    out = numba.carray(voidptr(board[_A_OUT]), t_n * n_out, np.float32)
    desc = numba.carray(voidptr(board[_A_DESC]), (n_w, 8), np.int64)
    item_w = numba.carray(voidptr(board[_A_IW]), n_items, np.int64)
    item_r = numba.carray(voidptr(board[_A_IR]), (2, n_items), np.int64)
    use_tiles = t_n > tiles.TILE_T
    k_s = kp if use_tiles else 0  # (tiles' scratch: packed rows and their results)
    scratch = (np.empty(k_s * tiles.ROWS, np.uint8), np.empty(k_s // 16 * tiles.ROWS, np.float32),
               np.empty(k_s // 16 * tiles.ROWS, np.float32),
               np.empty(t_n * tiles.ROWS if use_tiles else 0, np.float32),
               numba.carray(voidptr(board[_A_X16]), (t_n, k_s // 16), np.int32),
               numba.carray(voidptr(board[_A_X32]), (t_n, k_s // 32), np.int32))
    while True:
        i = take(board, epoch)
        if i < 0:
            return
        w = item_w[i]
        raw = numba.carray(voidptr(desc[w, 0]), desc[w, 1], np.uint8)
        code, rb, nb, col, n_w_rows = desc[w, 2], desc[w, 3], desc[w, 4], desc[w, 5], desc[w, 6]
        r0, r1, o = item_r[0, i], item_r[1, i], t_n * col
        if use_tiles and tiles.tiled(code):
            _tiles(code, raw, r0, r1, rb, nb, xq1, xd1, xs1, t_n, kp, out, o, n_w_rows, scratch)
            finish(board)
            continue
        t0 = 0
        while t0 < t_n:  # the item's rows against groups of tokens, while they stay in cache
            left = t_n - t0
            if left >= 8 and code == Q4_K and nb < 16:  # (8 tokens x 1 row: measured best for short Q4_K rows)
                _rows(code, raw, r0, r1, rb, nb, xq1, xd1, xs1, x4n1, t0, kp, out, o, n_w_rows, 8, 1)
                t0 += 8
            elif left >= 4:  # 4 x 1 row: 8 accumulators stay in registers (4 x 2 rows spill them:
                # Zen 2, qwen 0.5B, bench/parallel.py 4 streams 56.8 -> 61.1 tok/s)
                _rows(code, raw, r0, r1, rb, nb, xq1, xd1, xs1, x4n1, t0, kp, out, o, n_w_rows, 4, 1)
                t0 += 4
            elif left >= 2:
                _rows(code, raw, r0, r1, rb, nb, xq1, xd1, xs1, x4n1, t0, kp, out, o, n_w_rows, 2, 1)
                t0 += 2
            elif code == Q3_K or code == Q2_K:  # 1 x 2 rows: they share the token's offsets and sums
                # (8960x1536, 1 thread: Q2_K 0.69 -> 0.48 ms, Q3_K 0.73 -> 0.62; Q4_K, Q4_0 gain nothing)
                _rows(code, raw, r0, r1, rb, nb, xq1, xd1, xs1, x4n1, t0, kp, out, o, n_w_rows, 1, 2)
                t0 += 1
            else:
                _rows(code, raw, r0, r1, rb, nb, xq1, xd1, xs1, x4n1, t0, kp, out, o, n_w_rows, 1, 1)
                t0 += 1
        finish(board)


def _compile(isa: int):
    name = simd.NAMES[isa]
    row = specialize(_row, name, {"inline": "always"}, ISA=isa)
    rows = specialize(_rows, name, _row=row, ISA=isa)
    tok = specialize(sparse._tok_rows, name, {"inline": "always"}, _row=row, _rows=rows)
    at = specialize(_rows_at, name, _row=specialize(_row, name + "_npf", {"inline": "always"}, ISA=isa + NO_PREFETCH))
    chunk = specialize(sparse._chunk, name, _tok_rows=tok, _rows_at=at)
    call = specialize(_tile_call, name, {"inline": "always"}, ISA=isa)
    tl = specialize(_tiles, name, _tile_call=call)
    return specialize(_task, name, _rows=rows, _tiles=tl, _ffn_task=specialize(sparse._ffn_task, name, _chunk=chunk),
                      ISA=isa)


_KERNELS: dict[int, object] = {}


def kernel(isa: int | None = None):
    """The decode task for a CPU path (default: simd.chosen()), compiled on first use."""
    isa = simd.chosen() if isa is None else isa
    k = _KERNELS.get(isa)
    if k is None:
        k = _KERNELS[isa] = _compile(isa)
    return k


def _flat(raw: np.ndarray) -> np.ndarray:
    return raw.reshape(-1) if raw.flags.c_contiguous else np.ascontiguousarray(raw).reshape(-1)


_NONE = np.empty(0, I32)  # the tiles' sums when a product has no tiles


class _Plan:
    """What a decode product over a group of weights needs besides x, built once per group."""

    def __init__(self, ws: list[Weight]):
        self.raws = [_flat(w.raw) for w in ws]  # kept: the descriptor holds their addresses
        self.cols = np.cumsum([0] + [w.n for w in ws])
        self.desc = np.zeros((len(ws), 8), np.int64)
        for i, (w, raw) in enumerate(zip(ws, self.raws)):
            self.desc[i, :7] = (raw.ctypes.data, raw.size, FAST[w.ggml_type], w.raw.shape[1],
                                w.k // BLOCK[w.ggml_type], self.cols[i], w.n)
        self.bytes = sum(w.raw.size for w in ws)
        self.n_out = int(self.cols[-1])
        self.spans = [(int(a), int(b)) for a, b in zip(self.cols[:-1], self.cols[1:])]  # (Python ints: cheap slicing)
        self.isa = simd.chosen()  # the CPU path, resolved once (EDGELLM_ISA is read at load)
        item = max(16 << 10, min(_ITEM_BYTES, self.bytes // (4 * threads.max_count())))
        # work items: rows by bytes for decode; whole 32-row tiles for prompts (a 35-row item
        # would pack a second tile for 3 rows: Q6_K 1536x8960 at 512 tokens ran at half speed)
        self.items = [self._items(ws, [max(16, item // w.raw.shape[1]) for w in ws]),
                      self._items(ws, [max(1, item // w.raw.shape[1] // tiles.ROWS) * tiles.ROWS for w in ws])]

    @staticmethod
    def _items(ws: list[Weight], step: list[int]):
        """(item_w (n,) weight index, item_r (2, n) first and end row) cutting each w every step rows."""
        cuts = [np.arange(0, w.n, s, dtype=np.int64) for w, s in zip(ws, step)]
        item_w = np.concatenate([np.full(c.size, i, np.int64) for i, c in enumerate(cuts)])
        return item_w, np.stack([np.concatenate(cuts), np.concatenate([np.append(c[1:], w.n) for c, w in zip(cuts, ws)])])

    def __call__(self, x: np.ndarray, isa: int | None) -> list[np.ndarray]:
        isa = self.isa if isa is None else isa
        xq, xd, xs, x4n = quantize_x(x, reuse=True, isa=isa)
        t_n = x.shape[0]
        tiled = t_n > tiles.TILE_T
        x16 = np.empty(x4n.size // 4, I32) if tiled else _NONE
        x32 = np.empty(x4n.size // 8, I32) if tiled else _NONE
        if tiled:
            tiles.sums(x4n.reshape(-1), x16, x32)
        out = np.empty(t_n * self.n_out, F32)  # weight w's (T, N_w) at T * cols[w]: each contiguous
        task = kernel(isa)
        item_w, item_r = self.items[tiled]
        n = item_w.shape[0]

        def write(board):
            _write_args(board, xq, xd, xs, x4n, out, self.desc, item_w, item_r, x16, x32)

        def alone():
            board = threads.own_board()
            write(board)
            threads.begin(board, 1, n)
            task(board, 1)

        threads.run_kernel(task, write, n, self.bytes * x.shape[0], alone)
        return [out[t_n * a:t_n * b].reshape(t_n, b - a) for a, b in self.spans]


# ---- dequantization to float32 (every other type) -----------------------------------------------

def dequantize_rows(w: Weight) -> np.ndarray:
    """w -> float32 (N, K), the GGUF values (the numpy reference, quant/)."""
    return _dequantize_ref(w.raw, w.ggml_type, w.k)


# ---- the public functions -----------------------------------------------------------------------

class Product:
    """x (T, K) f32 times each of a group of weights sharing K -> [(T, N_w) f32]; the group's
    fast weights go through one decode call (one quantization of x, one pass of the threads)."""

    def __init__(self, ws: list[Weight]):
        k = {w.k for w in ws}
        if len(k) != 1:
            raise ValueError(f"a product group needs weights with one K, not {sorted(k)}")
        self.ws, self.k = list(ws), k.pop()
        fast = [w for w in ws if w.fast]
        self.plan = _Plan(fast) if fast and self.k % 32 == 0 else None
        self.all_fast = self.plan is not None and len(fast) == len(self.ws)

    def __call__(self, x: np.ndarray, isa: int | None = None) -> list[np.ndarray]:
        x = np.ascontiguousarray(x, dtype=F32)
        if x.ndim != 2 or x.shape[1] != self.k:
            raise ValueError(f"matmul: x has shape {x.shape}, expected (T, {self.k})")
        if self.all_fast:
            return self.plan(x, isa)
        if self.plan is None:
            return [x @ dequantize_rows(w).T for w in self.ws]
        got = iter(self.plan(x, isa))
        return [next(got) if w.fast and self.plan is not None else x @ dequantize_rows(w).T for w in self.ws]


def matmul(w: Weight, x: np.ndarray, isa: int | None = None) -> np.ndarray:
    """x float32 (T, K) @ W.T -> (T, N) (for repeated products keep a `Product`)."""
    return Product([w])(x, isa)[0]


def describe() -> str:
    isa = simd.chosen()
    return (f"15-bit activations as {'int16' if simd.wide(isa) else 'two int8 parts'} on {simd.NAMES[isa]}, "
            f"up to {SMALL_T} tokens per row pass, "
            f"prompts over {tiles.TILE_T} tokens in packed 32-row tiles; straight from GGUF blocks; "
            f"threads {threads.describe()}")


def set_threads(n: int | str) -> None:
    """A fixed count or 'auto' (threads.configure); BLAS (other types) runs on one thread."""
    threads.configure(n)
    threads.set_blas_threads(1)

