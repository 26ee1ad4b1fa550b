"""Running models larger than the memory they may use: a planner (what stays resident, what
streams) and a streaming weight store with the `Weights` interface (the model files never know).

    plan, units = plan_for(f, cfg, n_ctx=512, n_batch=512, threads=2, budget=parse_size("400M"))
    store = StreamingWeights(f, plan, units, make_linear)
"""
from __future__ import annotations

import sys

from .planner import (BudgetError, Plan, fmt, full_memory, measure_baseline, memory_limit, model_sizes,
                      parse_size, plan)
from .stream import StreamingWeights

__all__ = ["BudgetError", "Plan", "StreamingWeights", "auto_budget", "fit_context", "parse_size", "plan_for"]

CTX_FLOOR = 256  # the shortest context auto-fit chooses


def plan_for(f, cfg, n_ctx: int, n_batch: int, threads: int, budget: int, window: int | None = None,
             row_align=None, cache_type: str = "f16", baseline: int | None = None, n_seq: int = 1):
    """The plan for GGUFFile `f` (ModelConfig `cfg`) under `budget` bytes, and its units;
    `row_align(K)`: the kernels' tile height, where output-head chunks must start; `cache_type`:
    the KV cache's element type; `baseline`: the process's own memory (default: measured now);
    `n_seq`: sequences generated in parallel, each with a KV cache of n_ctx."""
    sizes = model_sizes(f, cfg, row_align, cache_type)
    n_ctx = min(n_ctx, cfg.n_ctx_train)
    base = measure_baseline() if baseline is None else baseline
    p = plan(budget, sizes, n_ctx, n_batch, baseline=base, threads=threads, window=window, n_seq=n_seq)
    return p, sizes.units


def fit_context(f, cfg, n_ctx: int, n_batch: int, threads: int, budget: int, row_align=None,
                baseline: int | None = None, cache_type: str = "f16", n_seq: int = 1) -> int:
    """The longest context up to n_ctx (a multiple of 256, at least CTX_FLOOR) whose plan fits
    `budget` (with n_seq KV caches of it); BudgetError (naming the minimum) when not even the
    floor fits. `baseline`: the process's own memory (default: measured now)."""
    sizes = model_sizes(f, cfg, row_align, cache_type)
    base = measure_baseline() if baseline is None else baseline
    n_ctx = min(n_ctx, cfg.n_ctx_train)

    def fits(n):
        try:
            plan(budget, sizes, n, min(n_batch, n), baseline=base, threads=threads, n_seq=n_seq)
            return True
        except BudgetError:
            return False
    if fits(n_ctx):
        return n_ctx
    lo, hi = CTX_FLOOR // 256, n_ctx // 256  # in units of 256 tokens
    if not fits(lo * 256):
        plan(budget, sizes, lo * 256, min(n_batch, lo * 256), baseline=base, threads=threads, n_seq=n_seq)  # raises
    while lo < hi - 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid * 256) else (lo, mid)
    return lo * 256


def auto_budget(f, cfg, n_ctx: int, n_batch: int, quiet: bool = False, cache_type: str = "f16",
                n_seq: int = 1) -> int | None:
    """None when the whole model fits in the memory this process may use; otherwise that memory,
    as a budget to stream under (and a note on stderr saying so)."""
    sizes = model_sizes(f, cfg, cache_type=cache_type)
    need = full_memory(sizes, min(n_ctx, cfg.n_ctx_train), n_batch, measure_baseline(), n_seq=n_seq)
    have = memory_limit()
    if need <= have:
        return None
    budget = int(have * 0.95)
    if not quiet:
        print(f"edgellm: {f.path.name} needs about {fmt(need)} with every weight in memory but only {fmt(have)} "
              f"is available: streaming weights from disk within {fmt(budget)} (set --memory-budget to choose)",
              file=sys.stderr)
    return budget
