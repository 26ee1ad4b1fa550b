"""Parallel-stream benchmark: `python bench/parallel.py [--model M] [--streams 1,2,4] [--tokens 128]
[--memory-budget SIZE]`.

For each stream count N, an `edgellm.load(M, parallel=N)` model (a single-slot one for N = 1)
serves N greedy streams started together from N threads, each with its own code prompt and
`--tokens` tokens (end of generation ignored, so every stream runs the full length). Reported per
N, medians of `--reps` runs: the aggregate generated tokens/s over the wall time from the first
token of any stream to the last token of all (prompts excluded), and the ratio to N = 1.
The issue's bar: 4 streams >= 2.5x one stream on qwen2.5-coder-0.5b.

With `--memory-budget`, every model streams the weights that do not fit (one read of the window
serves all streams of a pass), and each stream count runs in a process of its own, so each plan
sees the same process baseline. Run it under `../shared/tools/memlimit SIZE --drop-caches --`
for a hard limit that counts the page cache too.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import threading
import time

import edgellm

PROMPTS = ["def quicksort(xs):\n", "class LinkedList:\n", "import os\n\ndef walk(root):\n", "# parse a CSV file\n",
           "def matmul(a, b):\n", "async def fetch(url):\n", "struct Point {\n", "SELECT id, name FROM users\n"]


def run(llm, n: int, tokens: int) -> float:
    """Aggregate decode tokens/s of n streams at once."""
    first, last, counts = [], [], [0] * n
    start = threading.Barrier(n)

    def one(i):
        start.wait()
        for ev in llm.stream(PROMPTS[i % len(PROMPTS)], temperature=0, max_tokens=tokens, ignore_eos=True):
            if counts[i] == 0:
                first.append(time.perf_counter())
            counts[i] += 1
        last.append(time.perf_counter())

    ts = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    # the first token of each stream comes after its prompt; count from the latest of them
    t0 = max(first)
    return (sum(counts) - n) / (max(last) - t0)


def measure(a, n: int) -> dict:
    """One stream count: the median aggregate rate over a.reps runs, after a warm-up."""
    opts = {"parallel": n} if n > 1 else {}
    if a.memory_budget:
        opts["memory_budget"] = a.memory_budget
    with edgellm.load(a.model, ctx=a.ctx, threads=int(a.threads), **opts) as llm:
        run(llm, n, 8)  # warm-up
        rates = [run(llm, n, a.tokens) for _ in range(a.reps)]
        tel = getattr(llm._engine.weights, "telemetry", None)
        return {"streams": n, "aggregate_tokens_per_s": statistics.median(rates),
                **({"bytes_read": int(tel["bytes_read"])} if tel else {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--streams", default="1,2,4")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", default="2")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--memory-budget", default=None, help="stream weights within this budget, e.g. 1000M")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # (a child: one count, one JSON row)
    a = ap.parse_args()
    counts = [int(x) for x in a.streams.split(",")]
    if a.one:
        print(json.dumps(measure(a, counts[0])))
        return
    rows = []
    for n in counts:
        if a.memory_budget:  # a fresh process per count: the same baseline for every plan
            args = [sys.executable, __file__, "--one", "--streams", str(n)] + [
                f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items()
                if k not in ("streams", "json", "one") and v is not None]
            rows.append(json.loads(subprocess.run(args, check=True, capture_output=True, text=True).stdout))
        else:
            rows.append(measure(a, n))
    base = rows[0]["aggregate_tokens_per_s"]
    for r in rows:
        r["ratio_to_first"] = r["aggregate_tokens_per_s"] / base
    if a.json:
        print(json.dumps({"model": a.model, "cpu": platform.processor() or platform.machine(),
                          "memory_budget": a.memory_budget, "rows": rows}))
        return
    budget = f", --memory-budget {a.memory_budget}" if a.memory_budget else ""
    print(f"{a.model}, {a.threads} threads, {a.tokens} tokens per stream{budget}, medians of {a.reps}")
    for r in rows:
        read = f", {r['bytes_read'] / 1e9:.1f} GB read" if "bytes_read" in r else ""
        print(f"  {r['streams']:>2} streams: {r['aggregate_tokens_per_s']:7.1f} tok/s aggregate, "
              f"{r['ratio_to_first']:.2f}x {rows[0]['streams']} stream(s){read}")


if __name__ == "__main__":
    main()
