"""Parallel-stream benchmark: `python bench/parallel.py [--model M] [--streams 1,2,4] [--tokens 128]`.

For each stream count N, an `edgellm.load(M, parallel=N)` model (a single-slot one for N = 1)
serves N greedy streams started together from N threads, each with its own code prompt and
`--tokens` tokens (end of generation ignored, so every stream runs the full length). Reported per
N, medians of `--reps` runs: the aggregate generated tokens/s over the wall time from the first
token of any stream to the last token of all (prompts excluded), and the ratio to N = 1.
The issue's bar: 4 streams >= 2.5x one stream on qwen2.5-coder-0.5b.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--streams", default="1,2,4")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", default="2")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    rows = []
    for n in [int(x) for x in a.streams.split(",")]:
        with edgellm.load(a.model, ctx=512, threads=int(a.threads), **({"parallel": n} if n > 1 else {})) as llm:
            run(llm, n, 8)  # warm-up
            rates = [run(llm, n, a.tokens) for _ in range(a.reps)]
        rows.append({"streams": n, "aggregate_tokens_per_s": statistics.median(rates)})
    base = rows[0]["aggregate_tokens_per_s"]
    for r in rows:
        r["ratio_to_first"] = r["aggregate_tokens_per_s"] / base
    if a.json:
        print(json.dumps({"model": a.model, "cpu": platform.processor() or platform.machine(), "rows": rows}))
        return
    print(f"{a.model}, {a.threads} threads, {a.tokens} tokens per stream, medians of {a.reps}")
    for r in rows:
        print(f"  {r['streams']:>2} streams: {r['aggregate_tokens_per_s']:7.1f} tok/s aggregate, "
              f"{r['ratio_to_first']:.2f}x {rows[0]['streams']} stream(s)")


if __name__ == "__main__":
    main()
