"""Throughput of the quantized products on the real shapes of the catalog models.

    python -m edgellm.kernels_cpu.bench [--threads 1 2] [--backends numba numpy] [--json]

Weights are random but valid GGUF blocks of each tensor's real type and shape. A decode product
(T = 1) cycles through enough copies of the matrix to overflow the L3 cache, so it measures DRAM
traffic as a real forward pass does; the bytes counted are the GGUF bytes of the weights. Each row
is the median of several timed passes. `models()` then sums the per-shape times over a model's
layers to give the matmul share of a decode step and of a 512-token prefill. The DRAM read
bandwidth is measured in the same run (`dram_gbs`: numpy summing 512 MB, 1 and 2 threads) and
each decode row states its share of it.
"""
from __future__ import annotations

import argparse
import json as _json
import os
import sys
import time

import numpy as np

from ..quant.ggml_types import GGMLType
from . import linear, threads
from .qmatmul_ref import random_raw

_L3_BYTES = 96 << 20  # bytes of weights to cycle through for decode (3x a 32 MiB L3)
Q = GGMLType

# (rows N, cols K, type, tensors of that shape in the model); output head last
MODELS = {
    "gemma3-270m": [(256, 640, Q.Q5_0, 27), (256, 640, Q.Q8_0, 9), (1024, 640, Q.Q5_0, 18),
                    (640, 1024, Q.Q4_K, 18), (2048, 640, Q.Q5_0, 36), (640, 2048, Q.Q4_K, 9),
                    (640, 2048, Q.Q6_K, 9), (262144, 640, Q.Q8_0, 1)],
    "qwen2.5-coder-0.5b": [(128, 896, Q.Q5_0, 36), (128, 896, Q.Q8_0, 12), (896, 896, Q.Q5_0, 48),
                           (4864, 896, Q.Q5_0, 48), (896, 4864, Q.Q4_K, 12), (896, 4864, Q.Q6_K, 12),
                           (151936, 896, Q.Q8_0, 1)],
    "qwen2.5-coder-1.5b": [(256, 1536, Q.Q4_K, 42), (256, 1536, Q.Q6_K, 14), (1536, 1536, Q.Q4_K, 56),
                           (8960, 1536, Q.Q4_K, 56), (1536, 8960, Q.Q4_K, 14), (1536, 8960, Q.Q6_K, 14),
                           (151936, 1536, Q.Q6_K, 1)],
}


def _time(fn, reps: int, min_s: float) -> float:
    """Median seconds of fn() over at least `reps` runs (and at least min_s in all), after one warm-up."""
    fn()
    ts: list[float] = []
    t_end = time.perf_counter() + min_s
    while len(ts) < reps or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
        if len(ts) >= 200:
            break
    return float(np.median(ts))


def dram_gbs(n_threads: int) -> float:
    """Read bandwidth: the best of 5 sums of a 512 MB array, split over n_threads threads (numpy's
    sum releases the GIL)."""
    import concurrent.futures as cf

    a = np.ones(64 << 20, np.float64)
    parts = np.array_split(a, n_threads)
    with cf.ThreadPoolExecutor(n_threads) as ex:
        best = 0.0
        for _ in range(5):
            t0 = time.perf_counter()
            list(ex.map(np.sum, parts))
            best = max(best, a.nbytes / (time.perf_counter() - t0) / 1e9)
    return best


def measure(n: int, k: int, t: GGMLType, tokens: int, n_threads: int, backend: str,
            rng: np.random.Generator) -> dict:
    kern = linear.select(backend, n_threads)
    row_bytes = t.row_bytes(k)
    copies = 1 if tokens > 1 else max(1, min(16, _L3_BYTES // (n * row_bytes)))
    ws = [kern.make_linear(random_raw(t, n, k, rng), t, k) for _ in range(copies)]
    x = rng.standard_normal((tokens, k)).astype(np.float32)

    def run():
        for w in ws:
            w(x)
    reps = 3 if tokens * n * k > 1e9 else 7
    sec = _time(run, reps, 0.2) / copies
    return {"op": "matvec" if tokens == 1 else "matmul", "type": t.name.lower(), "rows": n, "cols": k,
            "tokens": tokens, "threads": n_threads, "backend": backend,
            "seconds": sec, "gweights_per_s": n * k * tokens / sec / 1e9,
            "gbytes_per_s": n * row_bytes / sec / 1e9}


def run(threads_list=(1, 2), json: bool = False, backends=None, tokens_list=(1, 512),
        model_names=None) -> list[dict]:
    """Measure every distinct shape of the models; print a table (or JSON lines) and return the rows."""
    backends = list(backends or linear.available_backends())
    rng = np.random.default_rng(0)
    shapes = sorted({(n, k, t) for m in (model_names or MODELS) for n, k, t, _ in MODELS[m]},
                    key=lambda s: (s[2], s[0] * s[1]))
    rows = []
    old = threads.max_count()
    try:
        for n_threads in threads_list:
            bw = dram_gbs(n_threads)
            line = {"op": "dram", "threads": n_threads, "gbytes_per_s": bw}
            rows.append(line)
            print(_json.dumps(line) if json else f"dram   read bandwidth thr={n_threads} {bw:6.1f} GB/s", flush=True)
            for backend in backends:
                for tokens in tokens_list:
                    for n, k, t in shapes:
                        r = measure(n, k, t, tokens, n_threads, backend, rng)
                        r["dram_share"] = r["gbytes_per_s"] / bw if tokens == 1 else None
                        rows.append(r)
                        print(_json.dumps(r) if json else _format(r), flush=True)
    finally:
        threads.configure(old)
    for line in models(rows):
        print(_json.dumps(line) if json else _format_model(line), flush=True)
    return rows


def _format(r: dict) -> str:
    return (f"{r['op']:6s} {r['type']:5s} {r['rows']:>6d}x{r['cols']:<5d} T={r['tokens']:<3d} "
            f"thr={r['threads']} {r['backend']:6s} {r['seconds'] * 1e6:10.0f} us  "
            f"{r['gweights_per_s']:7.1f} Gw/s  {r['gbytes_per_s']:6.1f} GB/s"
            + (f"  ({r['dram_share']:4.0%} of DRAM)" if r["dram_share"] else ""))


def models(rows: list[dict]) -> list[dict]:
    """Per (model, backend, threads, tokens): the summed matmul time of one forward pass. A prefill
    runs the output head on its last token only, so its head is counted at T = 1 (when measured)."""
    out = []
    rows = [r for r in rows if r["op"] != "dram"]
    index = {(r["rows"], r["cols"], r["type"], r["tokens"], r["threads"], r["backend"]): r["seconds"] for r in rows}
    keys = {(r["tokens"], r["threads"], r["backend"]) for r in rows}  # (threads: a count here)
    for name, shapes in MODELS.items():
        for tokens, n_thr, backend in sorted(keys):
            secs = [index.get((n, k, t.name.lower(), tokens, n_thr, backend)) for n, k, t, _ in shapes[:-1]]
            n, k, t, _ = shapes[-1]
            secs.append(index.get((n, k, t.name.lower(), 1, n_thr, backend)))
            if any(s is None for s in secs):
                continue
            total = sum(s * c for s, (_, _, _, c) in zip(secs, shapes))
            out.append({"op": "model", "model": name, "tokens": tokens, "threads": n_thr, "backend": backend,
                        "matmul_seconds": total, "tokens_per_s": tokens / total})
    return out


def _format_model(m: dict) -> str:
    what = "decode" if m["tokens"] == 1 else f"prefill {m['tokens']}"
    return (f"model  {m['model']:20s} {what:12s} thr={m['threads']} {m['backend']:11s} matmuls only: "
            f"{m['matmul_seconds'] * 1e3:8.1f} ms/pass = {m['tokens_per_s']:7.1f} tok/s (`edgellm bench MODEL` compares whole models with llama.cpp)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--backends", nargs="+", default=None, choices=linear.BACKENDS)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 512])
    p.add_argument("--models", nargs="+", default=None, choices=list(MODELS))
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    header = sys.stderr if a.json else sys.stdout  # --json: stdout holds only JSON lines
    print("#", linear.select(None, a.threads[-1]).describe, file=header)
    try:
        load = open("/proc/loadavg").read().split()[0]
        print(f"# load average {load} on {os.cpu_count()} cores (other work skews multi-thread rows)", file=header)
    except OSError:
        pass
    run(a.threads, a.json, a.backends, a.tokens, a.models)


if __name__ == "__main__":
    main()
