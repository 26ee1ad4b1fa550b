"""Shard plans: which rows and columns of every weight each node holds.

Node i holds query heads [h0, h1), FFN neurons [f0, f1) and vocabulary rows [v0, v1):

| tensor                              | split            | node i holds                                  |
|-------------------------------------|------------------|-----------------------------------------------|
| attn_q (and its bias)               | rows             | heads h0..h1 (head_dim rows each)             |
| attn_k, attn_v (and biases)         | rows             | the KV heads those query heads use            |
| attn_output                         | columns          | heads h0..h1 (head_dim_v columns each)        |
| ffn_gate, ffn_up                    | rows             | neurons f0..f1                                |
| ffn_down                            | columns          | neurons f0..f1                                |
| output (token_embd when tied)       | rows             | vocabulary v0..v1                             |
| norms, column-split biases          | replicated / once| all of it (biases of column splits: node 0)   |

Heads: boundaries follow the share weights, chosen (dynamic programming) so that each node's heads
use their KV heads evenly; then the node keeps those KV heads (replicated across nodes that share
them) and its local config has n_head_kv = that count. If no such split exists, a node keeps one
copy of the KV head per query head (exact, costs KV memory). FFN: boundaries on multiples of
ffn_down's quant block (256 for K-quants) whenever there are at least as many blocks as nodes.
A column range that still ends inside a quant block (e.g. 3 heads of 128 in Q4_K's 256-element
blocks) is stored as the whole blocks that cover it, and the node's activations are placed into a
zero-filled vector of that width: the other node's columns are multiplied by exact zeros, so the
product is exact (the only cost is the duplicated partial block). Vocabulary rows are fine-grained,
so they are split last to balance each node's bytes against its share.
"""
from __future__ import annotations

import dataclasses
import hashlib
import struct
from dataclasses import dataclass

import numpy as np

from ...loaders.gguf import GGUFFile, TensorInfo
from ...quant.ggml_types import kv_bytes
from ..config import ModelConfig
from .wire import VERSION, ClusterError

FIELDS = 6  # h0, h1, f0, f1, v0, v1
STAR_EXTRA = 0.4  # an all-reduce's cost of each peer beyond the slowest, in round trips (choose_nodes)
ROW = {"attn_q": "q", "attn_k": "k", "attn_v": "v", "ffn_gate": "f", "ffn_up": "f"}
COL = {"attn_output": "o", "ffn_down": "d"}


@dataclass(frozen=True)
class NodeShard:
    h0: int
    h1: int
    f0: int
    f1: int
    v0: int
    v1: int


@dataclass(frozen=True)
class Slice:
    """What a node keeps of one tensor. axis 0: row ranges; axis 1: ranges of quant blocks of every
    row, with `pad` = (zero columns before, after) the node's own columns inside those blocks."""

    axis: int
    ranges: tuple[tuple[int, int], ...]
    pad: tuple[int, int] = (0, 0)


@dataclass(frozen=True)
class Plan:
    nodes: tuple[NodeShard, ...]

    def table(self) -> np.ndarray:
        return np.array([dataclasses.astuple(n) for n in self.nodes], np.int64).reshape(-1, FIELDS)

    @staticmethod
    def from_table(t: np.ndarray) -> "Plan":
        return Plan(tuple(NodeShard(*map(int, row)) for row in t))

    def digest(self, model_digest: bytes, n_ctx: int, n_batch: int) -> bytes:
        """Binds protocol version, model hash, every node's shard and the context sizes."""
        h = hashlib.sha256(b"edgellm-plan" + struct.pack("<HII", VERSION, n_ctx, n_batch) + model_digest)
        h.update(self.table().astype("<i8").tobytes())
        return h.digest()


# ---- per node: KV heads, local config, tensor slices ----------------------------------------------

def kv_map(cfg: ModelConfig, h0: int, h1: int) -> tuple[int, ...]:
    """The global KV head behind each local KV head of query heads [h0, h1)."""
    g = cfg.n_head // cfg.n_head_kv
    groups = [h // g for h in range(h0, h1)]
    counts = {k: groups.count(k) for k in groups}
    if len(set(counts.values())) == 1:
        return tuple(sorted(counts))  # each KV head serves the same number of local query heads
    return tuple(groups)  # uneven: one KV copy per query head (local group size 1)


def local_config(cfg: ModelConfig, s: NodeShard) -> ModelConfig:
    return dataclasses.replace(cfg, n_head=s.h1 - s.h0, n_head_kv=len(kv_map(cfg, s.h0, s.h1)),
                               n_ff=s.f1 - s.f0, n_vocab=s.v1 - s.v0)


def output_name(f: GGUFFile) -> str:
    return "output.weight" if "output.weight" in f.tensors else "token_embd.weight"


def _merge(ranges) -> tuple[tuple[int, int], ...]:
    out: list[list[int]] = []
    for a, b in ranges:
        if out and out[-1][1] == a:
            out[-1][1] = b
        else:
            out.append([a, b])
    return tuple((a, b) for a, b in out)


def _cols(t: TensorInfo, c0: int, c1: int) -> Slice:
    bs = t.type.block_size
    b0, b1 = c0 // bs, -(-c1 // bs)
    return Slice(1, ((b0, b1),), (c0 - b0 * bs, b1 * bs - c1))


def tensor_slice(cfg: ModelConfig, f: GGUFFile, s: NodeShard, rank: int, name: str) -> Slice | None:
    """The part of tensor `name` that node `rank` keeps (None: nothing). For 1-D tensors the ranges
    are element ranges; ClusterError for a matrix this module does not know how to split."""
    t = f.info(name)
    base, _, kind = name.rpartition(".")
    role = base.rpartition(".")[2]
    hd, hdv = cfg.head_dim, cfg.head_dim_v
    if name == output_name(f):
        return Slice(0, ((s.v0, s.v1),))
    if name == "token_embd.weight":
        return None  # looked up by the coordinator from its own file, never packed
    if role == "output" and kind == "bias":
        return Slice(0, ((s.v0, s.v1),))
    if role in ROW:
        r = ROW[role]
        if r == "q":
            ranges = ((s.h0 * hd, s.h1 * hd),)
        elif r in "kv":
            d = hd if r == "k" else hdv
            ranges = _merge((k * d, (k + 1) * d) for k in kv_map(cfg, s.h0, s.h1))
        else:
            ranges = ((s.f0, s.f1),)
        return Slice(0, ranges)
    if role in COL:
        if kind == "bias":
            return Slice(0, ((0, t.shape[0]),)) if rank == 0 else None  # added once
        c0, c1 = (s.h0 * hdv, s.h1 * hdv) if COL[role] == "o" else (s.f0, s.f1)
        return _cols(t, c0, c1)
    if len(t.shape) == 1:
        return Slice(0, ((0, t.shape[0]),))
    raise ClusterError(f"cannot shard tensor '{name}' {t.shape}: no tensor-parallel rule for it")


def slice_bytes(t: TensorInfo, sl: Slice) -> int:
    if len(t.shape) == 1:
        return sum(b - a for a, b in sl.ranges) * t.nbytes // t.shape[0]
    if sl.axis == 0:
        return sum(b - a for a, b in sl.ranges) * t.row_bytes
    return t.n_rows * sum(b - a for a, b in sl.ranges) * t.type.type_size


def node_tensors(cfg: ModelConfig, f: GGUFFile, s: NodeShard, rank: int) -> dict[str, Slice]:
    out = {}
    for name in f.tensors:
        sl = tensor_slice(cfg, f, s, rank, name)
        if sl is not None:
            out[name] = sl
    return out


def weight_bytes(cfg: ModelConfig, f: GGUFFile, s: NodeShard, rank: int) -> int:
    """Bytes of the node's slices as stored in the file (what it reads and what a worker without
    the file is sent); the kernels multiply the file bytes in place (the numpy path keeps a float32 split, ~2x)."""
    return sum(slice_bytes(f.info(n), sl) for n, sl in node_tensors(cfg, f, s, rank).items())


# ---- choosing the boundaries ---------------------------------------------------------------------

def _head_bounds(cfg: ModelConfig, cum: np.ndarray) -> list[int]:
    """Boundaries 0 = b0 < b1 < ... < bN = n_head near n_head * cum, preferring even KV use."""
    H, N = cfg.n_head, len(cum) - 1
    g = H // cfg.n_head_kv

    def clean(a, b):
        c = np.bincount(np.arange(a, b) // g)
        c = c[c > 0]
        return c.min() == c.max()

    INF = float("inf")
    best = {0: (0.0, [0])}  # boundary -> (cost, path)
    for i in range(1, N + 1):
        ideal = H * cum[i]
        nxt = {}
        for b in ([H] if i == N else range(i, H - (N - i) + 1)):
            cand = (INF, None)
            for a, (c, path) in best.items():
                if a < b:
                    cost = c + (b - ideal) ** 2 + (0 if clean(a, b) else 1000.0)
                    if cost < cand[0]:
                        cand = (cost, path + [b])
            if cand[1] is not None:
                nxt[b] = cand
        best = nxt
    return best[H][1]


def _bounds(total: int, cum: np.ndarray, unit: int) -> list[int]:
    """Multiples of `unit` near total * cum, strictly increasing, from 0 to total."""
    n, N = total // unit, len(cum) - 1
    b = [0]
    for i in range(1, N):
        x = int(round(total * cum[i] / unit))
        b.append(min(max(x, b[-1] + 1), n - (N - i)))
    return [v * unit for v in b] + [total]


def _plan(cfg: ModelConfig, f: GGUFFile, shares: np.ndarray) -> Plan:
    N = len(shares)
    cum = np.concatenate([[0.0], np.cumsum(shares) / shares.sum()])
    heads = _head_bounds(cfg, cum)
    downs = [t for n, t in f.tensors.items() if n.endswith("ffn_down.weight")]
    unit = max([t.type.block_size for t in downs] or [1])
    if cfg.n_ff // unit < N or cfg.n_ff % unit:
        unit = 32 if cfg.n_ff % 32 == 0 and cfg.n_ff // 32 >= N else 1
    ffn = _bounds(cfg.n_ff, cum, unit)
    out = f.info(output_name(f))
    V = out.n_rows
    # everything but the output head, per node; then vocabulary rows to even out the bytes
    other = []
    for r in range(N):
        s = NodeShard(heads[r], heads[r + 1], ffn[r], ffn[r + 1], 0, 0)
        other.append(sum(slice_bytes(f.info(n), sl) for n, sl in node_tensors(cfg, f, s, r).items()
                         if n != output_name(f)))
    total = sum(other) + out.nbytes
    want = np.maximum(shares / shares.sum() * total - np.array(other), out.row_bytes)
    vocab = _bounds(V, np.concatenate([[0.0], np.cumsum(want) / want.sum()]), 1)
    return Plan(tuple(NodeShard(heads[r], heads[r + 1], ffn[r], ffn[r + 1], vocab[r], vocab[r + 1])
                      for r in range(N)))


def node_sizes(cfg: ModelConfig, f: GGUFFile, s: NodeShard, rank: int, cache_type: str = "f16"):
    """offload.planner's ModelSizes of a node's shard, laid out as its shard file would be (each
    layer's slices contiguous, the head's vocabulary rows last): what its memory plan is made of."""
    from ...offload.planner import ALIGN, ModelSizes, Unit

    sl = node_tensors(cfg, f, s, rank)
    head = output_name(f)
    layers: dict[int, list[str]] = {}
    small = 0
    for n, x in sl.items():
        t = f.info(n)
        if len(t.shape) == 1:
            small += slice_bytes(t, x) // max(1, t.nbytes // t.shape[0]) * 4
        elif n != head:
            layers.setdefault(int(n.split(".")[1]), []).append(n)
    units, at = [], 0
    for i in range(cfg.n_layer):
        names = tuple(layers.get(i, ()))
        n = sum(slice_bytes(f.info(m), sl[m]) for m in names)
        units.append(Unit(f"blk.{i}", at, n, names))
        at += -(-n // ALIGN) * ALIGN
    t = f.info(head)
    rows = s.v1 - s.v0
    largest = max(u.nbytes for u in units)
    per = max(1, largest // t.row_bytes)
    for r0 in range(0, rows, per):
        r1 = min(rows, r0 + per)
        units.append(Unit(f"{head}[{r0}:{r1}]", at, (r1 - r0) * t.row_bytes, (head,), (r0, r1)))
        at += (r1 - r0) * t.row_bytes
    lc = local_config(cfg, s)
    kv = kv_bytes(cache_type, cfg.n_layer * lc.n_head_kv * (cfg.head_dim + cfg.head_dim_v))
    return ModelSizes(tuple(units), (), small, "token_embd.weight", cfg.n_embd, lc.n_ff, rows, kv, at)


def node_minimum(cfg, f, plan: "Plan", rank: int, n_ctx: int, n_batch: int, cache_type: str = "f16",
                 baseline: int | None = None) -> int:
    """The least memory node `rank` runs its shard in: process, KV cache, small tensors, one
    streaming buffer of its largest layer, a small batch's activations (offload.planner's minimum)."""
    from ...offload import planner

    sizes = node_sizes(cfg, f, plan.nodes[rank], rank, cache_type)
    base = planner.BASELINE + planner.FIRST_PASS if baseline is None else baseline
    kv = sizes.kv_bytes_per_token * min(n_ctx, cfg.n_ctx_train)
    slot = -(-max(u.span for u in sizes.units) // planner.HUGE) * planner.HUGE
    act = planner.activation_bytes(sizes, min(n_batch, planner.MIN_BATCH))
    return base + kv + sizes.small_bytes + planner.SLACK + slot + act


def make_plan(cfg: ModelConfig, f: GGUFFile, weights, budgets=None, n_ctx: int = 4096,
              n_batch: int = 512, names=None, cache_type: str = "f16", baselines=None) -> Plan:
    """The shard plan for nodes with share `weights` (node 0 = the coordinator) and memory
    `budgets` (bytes, None = unlimited). A node whose shard does not fit its budget streams it
    through offload's sliding window, so a budget only has to hold the node's resident minimum
    (`node_minimum`: process, KV cache, one layer's buffer); shares are capped until every node's
    minimum fits (water-filling), or ClusterError names each node's need and budget.
    `baselines`: each node's measured process memory (None: offload.planner's default)."""
    N = len(weights)
    names = names or [f"node {i}" for i in range(N)]
    if N > cfg.n_head:
        raise ClusterError(f"{N} nodes but the model has {cfg.n_head} attention heads: use at most {cfg.n_head}")
    w = np.asarray(weights, np.float64)
    if w.shape != (N,) or not np.all(w > 0):
        raise ClusterError(f"split weights must be {N} positive numbers, not {list(weights)}")
    budgets = [b if b else None for b in (budgets or [None] * N)]
    baselines = list(baselines or [None] * N)
    caps = np.full(N, np.inf)  # the largest share of the weights each node can take
    plan = None
    for _ in range(16):
        shares = _waterfill(w, caps)
        if shares is None:
            break
        plan = _plan(cfg, f, shares)
        need = [node_minimum(cfg, f, plan, r, n_ctx, n_batch, cache_type, baselines[r]) for r in range(N)]
        over = [r for r in range(N) if budgets[r] is not None and need[r] > budgets[r]]
        if not over:
            return plan
        for r in over:  # the minimum grows with the share (KV heads, layer buffer): shrink it
            caps[r] = min(caps[r], shares[r] * max(0.5, min(0.9, budgets[r] / need[r])))
    raise ClusterError(_budget_message(cfg, f, plan or _plan(cfg, f, w), budgets, names, n_ctx, n_batch, cache_type,
                                       baselines))


def choose_nodes(rates, rtts, n_reduce: int, model_bytes: int) -> tuple[list[int], list[str]]:
    """Speed-weighted membership (`--split auto`): node 0 (the coordinator) and the others,
    fastest first, as long as each makes the estimated token time shorter.

    A token's time with node set S is about model_bytes / sum(rate) (shares proportional to the
    rates, so every node finishes its share together) plus n_reduce star all-reduces, each waiting
    for the slowest link's round trip plus STAR_EXTRA of every other link's (the coordinator reads
    and answers the peers one by one: bench/cluster.py measured 0.18 ms per all-reduce with one
    peer and 0.25 ms with two on loopback, round trips 0.18 ms). `rates`: weight bytes per second
    each node's kernels measured; `rtts`: each node's round trip in seconds (0 for the
    coordinator). Returns (the nodes kept, a reason for each node left out)."""
    keep, why = [0], []
    order = sorted(range(1, len(rates)), key=lambda i: -rates[i])

    def t(members):
        r = [rtts[i] for i in members]
        return model_bytes / sum(rates[i] for i in members) + n_reduce * (max(r) + STAR_EXTRA * (sum(r) - max(r)))

    for i in order:
        before, after = t(keep), t(keep + [i])
        if after < before:
            keep.append(i)
        else:
            why.append((i, f"too slow to help: at {rates[i] / 1e9:.2f} GB/s of weights and a {rtts[i] * 1e3:.2f} ms "
                           f"round trip it would make a token {(after - before) * 1e3:.1f} ms slower, not faster"))
    return sorted(keep), why


def _waterfill(w: np.ndarray, caps: np.ndarray) -> np.ndarray | None:
    """Shares proportional to `w`, none above its cap, summing to 1 (None: the caps sum below 1)."""
    share = np.zeros_like(w)
    free = np.ones(len(w), bool)
    left = 1.0
    while free.any():
        s = w * free / w[free].sum() * left
        hit = free & (s > caps)
        if not hit.any():
            share[free] = s[free]
            return share
        share[hit] = caps[hit]
        left -= caps[hit].sum()
        free &= ~hit
    return None


def _budget_message(cfg, f, plan, budgets, names, n_ctx, n_batch, cache_type, baselines) -> str:
    parts = []
    for r, b in enumerate(budgets):
        need = node_minimum(cfg, f, plan, r, n_ctx, n_batch, cache_type, baselines[r])
        short = f", {(need - b) / 1e6:,.0f} MB short" if b is not None and need > b else ""
        parts.append(f"{names[r]}: needs at least {need / 1e6:,.0f} MB, budget "
                     f"{'unlimited' if b is None else f'{b / 1e6:,.0f} MB'}{short}")
    return ("the nodes cannot hold the model within their memory budgets, even streaming their shards ("
            + "; ".join(parts) + "); add nodes, raise budgets or lower --ctx")
