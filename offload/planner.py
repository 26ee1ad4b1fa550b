"""The memory-budget planner: which weights stay resident, which stream from disk every token.

    sizes = model_sizes(f, cfg)                       # what the file holds, in order of use
    p = plan(parse_size("400M"), sizes, n_ctx=512, n_batch=512, baseline=measure_baseline())
    print(p.describe())

A pure function of sizes. The budget must hold everything the process holds:

    baseline (Python, numpy, numba, the tokenizer: measured)  + KV cache (full context)
    + activations (one batch of n_batch tokens)               + small tensors (norms, biases)
    + streaming buffers ((window + 1) x the largest streamed unit)
    + resident weights                                          + slack (page cache, allocator)

A *unit* is what streams as one read: a layer (all `blk.{i}.*` tensors, contiguous in the file),
or a chunk of rows of the output head (151,936 rows do not fit one buffer). Every unit is used
once per token, so a resident byte saves one byte of disk traffic per token whichever unit it
belongs to: the planner keeps the most bytes resident that fit, spread evenly over the pass so
the disk keeps streaming while resident units compute. The token embedding is a table of rows
read sparsely (a few rows per token), never streamed or held whole.

The minimum budget holds one streaming buffer (window 0: read, compute, read) and a batch of
MIN_BATCH tokens; below it `plan` raises `BudgetError` naming the minimum and its parts.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

from ..errors import EdgeLLMError
from ..quant.ggml_types import kv_bytes

MB = 1 << 20
ALIGN = 4096  # O_DIRECT alignment of offsets, lengths and buffers (covers 512-byte devices too)
HUGE = 2 << 20  # buffers are backed by 2 MiB pages (offload/stream.py): sizes round up to them
MIN_BATCH = 16
WINDOW = 2  # units read ahead of the one computing (window 1 decodes ~20% slower: offload/stream.py)
ACT_SHARE = 8  # activations get at most 1/ACT_SHARE of the budget (n_batch shrinks to fit)
BATCH_FOR_WINDOW = 64  # the batch shrinks to this (not below) to make room for the full window
SLACK = 24 * MB  # page cache the run causes (file header, row reads), allocator fragmentation
# The process without weights: what it holds when the plan is made (Python, numpy, numba, the
# tokenizer: VmRSS 151-159 MB measured for the shipped models, numba imported) plus what the first
# forward passes add besides weights, KV cache and activations: numba's compiled kernels loaded
# from its cache, the libraries' pages they touch, OpenBLAS buffers, allocator leftovers (+73 MB
# measured: VmRSS before the plan and after the first tokens, minus the plan's weights).
FIRST_PASS = 80 * MB
BASELINE = 160 * MB  # the floor, when /proc/self/status cannot be read


class BudgetError(EdgeLLMError):
    """The memory budget cannot hold the model's minimum working set."""


def parse_size(s: str | int) -> int:
    """'400M', '1.5G', '512K', '1000000' -> bytes (K/M/G are powers of 1024)."""
    if isinstance(s, int) and not isinstance(s, bool):
        return s
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)i?B?\s*", str(s), re.IGNORECASE)
    if not m:
        raise ValueError(f"memory size {s!r} is not a number with an optional K, M, G or T suffix (e.g. 400M, 1.5G)")
    mult = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m.group(2).upper()]
    return int(float(m.group(1)) * mult)


def fmt(n: int) -> str:
    return f"{n / MB:,.0f} MB" if n >= 10 * MB else f"{n / MB:,.1f} MB"


# ---- what the model holds -----------------------------------------------------------------------

@dataclass(frozen=True)
class Unit:
    """Bytes [offset, offset + nbytes) of the file, read as one; `tensors` are the matrices in it.
    A head chunk holds rows [rows[0], rows[1]) of its one tensor."""

    name: str  # "blk.3" or "output.weight[0:23552]"
    offset: int
    nbytes: int
    tensors: tuple[str, ...]
    rows: tuple[int, int] | None = None

    @property
    def span(self) -> int:
        """Bytes of the aligned read covering the unit (what a buffer must hold)."""
        a = self.offset // ALIGN * ALIGN
        return -(-(self.offset + self.nbytes) // ALIGN) * ALIGN - a


@dataclass(frozen=True)
class ModelSizes:
    units: tuple[Unit, ...]  # layers then head chunks, in order of use in a forward pass
    small: tuple[str, ...]  # 1-D tensors (norms, biases), always resident as float32
    small_bytes: int
    table: str  # the token embedding, read a few rows at a time
    n_embd: int
    n_ff: int
    n_vocab: int
    kv_bytes_per_token: int  # all layers' K and V for one position
    file_bytes: int = 0

    @property
    def weight_bytes(self) -> int:
        return sum(u.nbytes for u in self.units)


def model_sizes(f, cfg, row_align: Callable[[int], int] | None = None, cache_type: str = "f16") -> ModelSizes:
    """Units of a GGUFFile `f` (with its ModelConfig `cfg`): each layer's matrices must be one
    contiguous run of the file (checked; GGUF writers group a layer's tensors), the head is cut
    into chunks of whole rows no larger than the largest layer, each starting at a multiple of
    `row_align(K)` rows (the kernels' tile height: chunked products then equal whole ones)."""
    layers: dict[int, list] = {}
    small, small_bytes = [], 0
    for t in f.tensors.values():
        if len(t.shape) == 1:
            small.append(t.name)
            small_bytes += t.n_elements * 4
            continue
        m = re.match(r"blk\.(\d+)\.", t.name)
        if m:
            layers.setdefault(int(m.group(1)), []).append(t)
    by_offset = sorted(f.tensors.values(), key=lambda t: t.offset)
    units = []
    for i in range(cfg.n_layer):
        ts = sorted(layers.get(i, []), key=lambda t: t.offset)
        if not ts:
            raise EdgeLLMError(f"layer {i} has no matrices in {f.path.name}")
        start, end = ts[0].offset, max(t.offset + t.nbytes for t in ts)
        foreign = [t.name for t in by_offset if start <= t.offset < end and not t.name.startswith(f"blk.{i}.")]
        if foreign:
            raise EdgeLLMError(f"layer {i}'s tensors are not contiguous in {f.path.name} ('{foreign[0]}' lies "
                               f"between them): this file cannot be streamed layer by layer")
        units.append(Unit(f"blk.{i}", start, end - start, tuple(t.name for t in ts)))
    head = "output.weight" if "output.weight" in f.tensors else "token_embd.weight"
    h = f.tensors[head]
    largest = max(u.nbytes for u in units)
    align = row_align(h.shape[0]) if row_align else 1
    rows_per = max(align, largest // h.row_bytes // align * align)
    n_rows = h.n_rows
    for r0 in range(0, n_rows, rows_per):
        r1 = min(n_rows, r0 + rows_per)
        units.append(Unit(f"{head}[{r0}:{r1}]", h.offset + r0 * h.row_bytes, (r1 - r0) * h.row_bytes, (head,), (r0, r1)))
    kv = kv_bytes(cache_type, cfg.n_layer * cfg.n_head_kv * (cfg.head_dim + cfg.head_dim_v))
    return ModelSizes(tuple(units), tuple(small), small_bytes, "token_embd.weight", cfg.n_embd, cfg.n_ff,
                      cfg.n_vocab, kv, getattr(f, "file_size", 0))


def activation_bytes(s: ModelSizes, n_tokens: int, n_logits: int = 1, threads: int = 2) -> int:
    """Peak transient memory of one forward pass of `n_tokens`: the FFN's gate, up and gated
    outputs (n_ff wide) and about eight n_embd-wide arrays per token, the logits (and a copy), a
    1 MB float tile per kernel thread, 2 MB for the rest. An upper bound: tracemalloc's peak of a
    warm prefill was 55-75% of it at 64 and 256 tokens (qwen2.5-coder-0.5b, gemma3-270m)."""
    per_token = (3 * s.n_ff + 8 * s.n_embd) * 4
    return n_tokens * per_token + 2 * n_logits * s.n_vocab * 4 + threads * MB + 2 * MB


# ---- the plan -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    budget: int
    resident: tuple[str, ...]  # unit names held in memory
    streamed: tuple[str, ...]  # unit names read every pass, in order of use
    window: int  # units read ahead of the one computing
    slot_bytes: int  # one streaming buffer
    n_batch: int
    parts: dict[str, int] = field(default_factory=dict)  # what the budget holds, by part
    stream_bytes: int = 0  # bytes read from disk per forward pass

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        lines = [f"memory plan for a budget of {fmt(self.budget)}:"]
        for k, v in self.parts.items():
            lines.append(f"  {k:<28}{fmt(v):>10}")
        lines.append(f"  {'total':<28}{fmt(self.total):>10}")
        n = len(self.resident) + len(self.streamed)
        lines.append(f"  resident: {len(self.resident)} of {n} units; streamed: {len(self.streamed)} units, "
                     f"{fmt(self.stream_bytes)} read per token, window {self.window}, batch {self.n_batch} tokens")
        return "\n".join(lines)


def _huge(n: int) -> int:
    return -(-n // HUGE) * HUGE


def _spread(units: list[Unit], budget: int) -> set[str]:
    """Names of units to keep resident within `budget` bytes: the most bytes, spread evenly."""
    chosen: set[str] = set()
    left = budget
    # evenly spaced picks first (every k-th unit), then whatever else still fits, largest first
    n = len(units)
    fit_count = min(n, int(max(0, budget) // max(1, max(u.span for u in units)))) if units else 0
    order = [units[int(i * n / fit_count)] for i in range(fit_count)] if fit_count else []
    order += sorted(units, key=lambda u: -u.span)
    for u in order:
        if u.name not in chosen and u.span <= left:
            chosen.add(u.name)
            left -= u.span
    return chosen


def plan(budget: int, s: ModelSizes, n_ctx: int, n_batch: int, baseline: int = BASELINE,
         window: int | None = None, threads: int = 2, n_logits: int = 1, slack: int = SLACK, n_seq: int = 1) -> Plan:
    """Fit the model into `budget` bytes (see the module docstring); BudgetError if it cannot.
    `n_logits`: tokens whose logits one pass returns (1 for generation, n_batch for perplexity);
    `n_seq`: sequences with a KV cache each (parallel generation)."""
    kv = s.kv_bytes_per_token * n_ctx * n_seq
    fixed = {"process (Python, numpy, numba)": baseline, "KV cache" if n_seq == 1 else f"KV caches ({n_seq} sequences)": kv,
             "small tensors (norms, biases)": s.small_bytes, "slack (page cache, allocator)": slack}
    slot = _huge(max(u.span for u in s.units))
    want_batch = max(1, min(n_batch, n_ctx))

    def act(b):
        return activation_bytes(s, b, min(b, n_logits) if n_logits > 1 else 1, threads)

    min_batch = min(want_batch, MIN_BATCH)
    minimum = sum(fixed.values()) + act(min_batch) + slot
    if budget < minimum:
        parts = ", ".join(f"{k} {fmt(v)}" for k, v in fixed.items() if k != "slack (page cache, allocator)")
        raise BudgetError(
            f"a memory budget of {fmt(budget)} cannot run this model: the minimum is {fmt(minimum)} "
            f"({parts}, one layer's buffer {fmt(slot)}, activations of {min_batch} tokens {fmt(act(min_batch))}, "
            f"slack {fmt(slack)}); raise --memory-budget to at least {fmt(minimum)}"
            + (f" or lower --ctx (the KV cache takes {s.kv_bytes_per_token / 1024:,.0f} KB per token)"
               if kv > 32 * MB else ""))
    # the batch: as asked, unless its activations would take more than 1/ACT_SHARE of the budget
    b = want_batch
    while b > min_batch and (act(b) > budget // ACT_SHARE or sum(fixed.values()) + act(b) + 2 * slot > budget):
        b = max(min_batch, b // 2)
    # the window before a big batch: down to BATCH_FOR_WINDOW tokens if that lets the window fit
    w_target = WINDOW if window is None else window
    while b > min(want_batch, BATCH_FOR_WINDOW) and sum(fixed.values()) + act(b) + (w_target + 1) * slot > budget:
        b = max(min(want_batch, BATCH_FOR_WINDOW), b // 2)
    left = budget - sum(fixed.values()) - act(b)
    # the window: WINDOW units ahead if they fit (fewer if not), then resident weights
    w = max(0, min(w_target, left // slot - 1))
    if left >= _huge(sum(u.span for u in s.units)):  # the whole model fits: nothing streams
        resident, w, slots = {u.name for u in s.units}, 0, 0
    else:
        room = left - (w + 1) * slot - HUGE  # HUGE: the resident arena rounds up to 2 MiB pages
        resident = _spread(list(s.units), room)
        # buffers sized to the largest unit still streamed may leave room for more residents
        streamed_units = [u for u in s.units if u.name not in resident]
        smaller = _huge(max(u.span for u in streamed_units))
        used = sum(u.span for u in s.units if u.name in resident)
        resident |= _spread(streamed_units, room + (w + 1) * (slot - smaller) - used)
        streamed_units = [u for u in s.units if u.name not in resident]
        if not streamed_units:
            resident, w, slots = {u.name for u in s.units}, 0, 0
        else:
            slot, slots = _huge(max(u.span for u in streamed_units)), w + 1
    streamed = tuple(u.name for u in s.units if u.name not in resident)
    parts = dict(fixed)
    parts[f"activations ({b} tokens)"] = act(b)
    parts[f"streaming buffers ({slots} x {fmt(slot)})" if slots else "streaming buffers"] = slots * slot if slots else 0
    parts["resident weights"] = _huge(sum(u.span for u in s.units if u.name in resident)) if resident else 0
    return Plan(budget, tuple(u.name for u in s.units if u.name in resident), streamed, w if slots else 0,
                slot if slots else 0, b, parts, sum(u.span for u in s.units if u.name in streamed))


def full_memory(s: ModelSizes, n_ctx: int, n_batch: int, baseline: int = BASELINE, n_seq: int = 1) -> int:
    """Bytes the model needs with every weight resident (for choosing streaming automatically)."""
    return baseline + s.kv_bytes_per_token * n_ctx * n_seq + s.small_bytes + SLACK + s.weight_bytes \
        + activation_bytes(s, max(1, min(n_batch, n_ctx)))


# ---- the machine --------------------------------------------------------------------------------

def process_bytes(field: str = "VmRSS") -> int | None:
    """A size from /proc/self/status in bytes (VmRSS: resident now, VmHWM: the peak); None without /proc."""
    try:
        with open("/proc/self/status") as fh:
            return int(re.search(field + r":\s+(\d+) kB", fh.read()).group(1)) * 1024
    except (OSError, AttributeError):
        return None


def measure_baseline(without_mapped_models: bool = False) -> int:
    """The process' share of the budget: its resident memory now (/proc/self/status VmRSS) plus
    what the first forward pass adds (FIRST_PASS), at least BASELINE. `without_mapped_models`:
    leave out resident pages of mapped .gguf files (a cluster worker that wrote its shard file
    from the mapped model holds hundreds of MB of them, clean and reclaimable)."""
    try:
        import numba  # noqa: F401  (measured with it loaded, as the kernels will load it)
    except ImportError:  # pragma: no cover - phones without numba
        pass
    rss = process_bytes()
    if rss is None:
        return BASELINE
    return max(BASELINE, rss - (_mapped_model_bytes() if without_mapped_models else 0) + FIRST_PASS)


def _mapped_model_bytes() -> int:
    """Resident bytes of mapped .gguf files (/proc/self/smaps)."""
    total, mine = 0, False
    try:
        with open("/proc/self/smaps") as fh:
            for line in fh:
                if not line[0].isupper():  # a mapping's header: "addr-addr perms offset dev inode path"
                    mine = line.rstrip().endswith(".gguf")
                elif mine and line.startswith("Rss:"):
                    total += int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return 0
    return total


def memory_limit() -> int:
    """The most memory this process can hold: what it holds now plus psutil's available memory,
    capped by a cgroup limit (v1 memory.limit_in_bytes, v2 memory.max) where one applies (a
    container, `memlimit`): psutil does not see those."""
    rss = process_bytes() or 0
    try:
        import psutil
        limit = rss + int(psutil.virtual_memory().available)
    except Exception:  # pragma: no cover - psutil is a dependency
        limit = 1 << 62
    try:
        with open("/proc/self/cgroup") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return limit
    for line in lines:
        _, ctrl, path = line.split(":", 2)
        if ctrl == "":
            f = "/sys/fs/cgroup" + path + "/memory.max"
        elif "memory" in ctrl.split(","):
            f = "/sys/fs/cgroup/memory" + path + "/memory.limit_in_bytes"
        else:
            continue
        try:
            with open(f) as fh:
                v = fh.read().strip()
        except OSError:
            continue
        if v.isdigit() and int(v) < (1 << 60):
            limit = min(limit, int(v))
    return limit
