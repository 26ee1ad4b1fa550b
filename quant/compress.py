"""Size control: a per-tensor type choice under a byte budget, and low-rank error corrections.

    opts = options(rows, n, src_type, imp)    # the types a matrix may take, with bytes and error
    pick = allocate([opts, ...], budget)      # index of the chosen option per tensor
    a, b = low_rank(w, w_hat, imp, rank)      # w ~ w_hat + a @ b

A tensor's error under a type is the importance-weighted squared error of its requantized rows
relative to the tensor's own weighted energy, sum imp (w - w_hat)^2 / sum imp w^2, measured on a
sample of rows: the share of its product's output (to a diagonal approximation) the type loses.
(The absolute error, what the outputs lose per token, measured worse: qwen 1.5B at 85% of its
bytes, 2.31 GPL-3 perplexity against 1.88, since it lowered the matrices that write into the
large residual stream of deep layers, whose size it does not see.)
`allocate` spends the budget greedily: it keeps lowering the tensor whose next step down (to
any smaller type: the lower convex hull of its options) adds the least error per byte saved.

Low-rank corrections (QERA / LQER's closed form): the quantization error E = w - w_hat, scaled
column-wise by s = sqrt(imp), is cut to its best rank-r approximation U S V^T (randomized SVD);
then a = U S (N, r), b = V^T / s (r, K), and w_hat x + a (b x) recovers the directions the
activations use most. Both factors are stored as extra GGUF tensors and applied by the runtime.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

from .formats import dequantize
from .ggml_types import GGMLType
from .quantize import floored, quantize_rows

T = GGMLType
# the lower-bit types the CPU kernels run, smallest first; the K-quants need rows of 256 multiples
K_TYPES = (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_0, T.Q6_K, T.Q8_0)
BLOCK32_TYPES = (T.Q4_0, T.Q5_0, T.Q8_0)
SAMPLE_ROWS = 256  # rows a tensor's errors are measured on (the relative error varies little row to row)


@dataclass(frozen=True)
class Option:
    type: GGMLType
    nbytes: int  # the matrix's bytes, its low-rank factors' included
    error: float  # relative weighted squared error; 0 for the source's own bytes
    rank: int = 0  # rank of the low-rank correction this option carries (0: none)


def candidate_types(k: int, src: GGMLType) -> list[GGMLType]:
    """The types a matrix with rows of k values may be lowered to: fewer bytes than its source."""
    types = K_TYPES if k % 256 == 0 else BLOCK32_TYPES
    return [t for t in types if k % t.block_size == 0 and t.row_bytes(k) < src.row_bytes(k)]


def weighted_error(w: np.ndarray, w_hat: np.ndarray, imp: np.ndarray) -> float:
    """sum imp (w - w_hat)^2 / sum imp w^2 over rows (N, K), imp (K,)."""
    w = np.asarray(w, np.float64)
    imp = np.asarray(imp, np.float64)
    den = float(((w * w) @ imp).sum())
    return float((((w - w_hat) ** 2) @ imp).sum()) / den if den > 0 else 0.0


def sample_rows(n: int, limit: int = SAMPLE_ROWS) -> np.ndarray:
    return np.arange(n) if n <= limit else np.linspace(0, n - 1, limit).astype(np.int64)


def options(rows: np.ndarray, n: int, src: GGMLType, imp: np.ndarray, rank: int = 0) -> list[Option]:
    """A matrix of n rows whose sample `rows` (float32 (S, K), from `sample_rows(n)`) hold the
    source's values -> [the source itself, then each lower type, alone and (rank > 0) with a
    rank-`rank` correction], largest first, each with its relative error measured on the sample.
    A correction's error is estimated out of sample: the scaled error's top right singular
    vectors from the even rows, the error they leave on the odd rows."""
    k = rows.shape[1]
    s = np.sqrt(floored(imp)).astype(np.float64)  # (K,)
    out = [Option(src, n * src.row_bytes(k), 0.0)]
    for t in reversed(candidate_types(k, src)):
        back = dequantize(quantize_rows(rows, t, imp).reshape(-1), t).reshape(rows.shape)
        out.append(Option(t, n * t.row_bytes(k), weighted_error(rows, back, imp)))
        if rank > 0 and rows.shape[0] >= 4 * rank:
            e = (rows - back).astype(np.float64) * s  # (S, K)
            v = np.linalg.svd(e[0::2], full_matrices=False)[2][:rank]  # (r, K), orthonormal rows
            held = e[1::2]
            left = held - (held @ v.T) @ v
            energy = float(((rows[1::2].astype(np.float64) * s) ** 2).sum())
            if energy > 0:
                out.append(Option(t, n * t.row_bytes(k) + factor_bytes(n, k, rank), float((left ** 2).sum()) / energy,
                                  rank))
    return [out[0]] + sorted((o for o in out[1:] if o.nbytes < out[0].nbytes), key=lambda o: -o.nbytes)


def allocate(opts: list[list[Option]], budget: int) -> list[int]:
    """The option index per tensor whose bytes sum to at most `budget` with the least total error
    the greedy hull steps find; ValueError when even the smallest options exceed it."""
    choice = [0] * len(opts)
    total = sum(o[0].nbytes for o in opts)
    smallest = sum(min(x.nbytes for x in o) for o in opts)
    if smallest > budget:
        raise ValueError(f"the smallest type mix takes {smallest:,} bytes, more than {budget:,}")

    def step(t):
        """The best next option of tensor t: least added error per byte saved."""
        c = opts[t][choice[t]]
        best = None
        for j in range(choice[t] + 1, len(opts[t])):
            o = opts[t][j]
            if o.nbytes < c.nbytes:
                slope = (o.error - c.error) / (c.nbytes - o.nbytes)
                if best is None or slope < best[0]:
                    best = (slope, t, j)
        return best

    heap = [s for s in (step(t) for t in range(len(opts))) if s is not None]
    heapq.heapify(heap)
    while total > budget and heap:
        slope, t, j = heapq.heappop(heap)
        if j <= choice[t]:
            continue
        total -= opts[t][choice[t]].nbytes - opts[t][j].nbytes
        choice[t] = j
        nxt = step(t)
        if nxt is not None:
            heapq.heappush(heap, nxt)
    return upgrade(opts, choice, budget)


def upgrade(opts: list[list[Option]], choice: list[int], budget: int) -> list[int]:
    """Spend what `choice` leaves of the budget (a last step down overshoots) on the upgrades that
    fit, most error removed per byte first."""
    choice = list(choice)
    total = sum(o[c].nbytes for o, c in zip(opts, choice))
    while True:
        ups = [((opts[t][choice[t]].error - opts[t][j].error) / max(1, opts[t][j].nbytes - opts[t][choice[t]].nbytes), t, j)
               for t in range(len(opts)) for j in range(choice[t])
               if total + opts[t][j].nbytes - opts[t][choice[t]].nbytes <= budget
               and opts[t][j].error < opts[t][choice[t]].error]
        if not ups:
            return choice
        _, t, j = max(ups)
        total += opts[t][j].nbytes - opts[t][choice[t]].nbytes
        choice[t] = j


def low_rank(w: np.ndarray, w_hat: np.ndarray, imp: np.ndarray, rank: int, seed: int = 0,
             power: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """The rank-`rank` correction of w_hat (both float32 (N, K)) under importances imp (K,):
    -> a float32 (N, r), b float32 (r, K) with w_hat + a @ b ~ w (randomized SVD of the scaled error)."""
    n, k = w.shape
    r = min(rank, n, k)
    s = np.sqrt(floored(imp))  # (K,)
    m = (np.asarray(w, np.float32) - w_hat) * s  # (N, K)
    rng = np.random.default_rng(seed)
    y = m @ rng.standard_normal((k, min(k, r + 8)), dtype=np.float32)  # (N, r + p)
    for _ in range(power):
        y, _ = np.linalg.qr(y)
        y = m @ (m.T @ y)
    q, _ = np.linalg.qr(y)  # (N, r + p)
    u, sv, vt = np.linalg.svd(q.T @ m, full_matrices=False)  # (r + p, K) -> small SVD
    a = (q @ u[:, :r]) * sv[:r]  # (N, r)
    b = vt[:r] / s  # (r, K)
    return a.astype(np.float32), b.astype(np.float32)


def factor_type(k: int) -> GGMLType:
    """The type low-rank factors are stored in: Q8_0 where rows allow, else F16."""
    return T.Q8_0 if k % 32 == 0 else T.F16


def factor_bytes(n: int, k: int, rank: int) -> int:
    """Bytes of the factors a (N, r) and b (r, K) as stored (rows of r and of K values)."""
    return n * factor_type(rank).row_bytes(rank) + rank * factor_type(k).row_bytes(k)


def encode_factor(x: np.ndarray) -> np.ndarray:
    """A factor float32 (rows, cols) -> its bytes as stored (`factor_type(cols)`)."""
    t = factor_type(x.shape[1])
    if t == T.F16:
        return np.ascontiguousarray(x, np.float16).view(np.uint8)
    return quantize_rows(x, t)
