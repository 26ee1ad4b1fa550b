"""End-to-end speed, measured like llama-bench: pp512 (prompt processing of 512 tokens from an
empty cache) and tg64 (64 one-token decode steps from an empty cache), median of several runs,
and peak RSS. llama.cpp (llama-cpp-python, when installed) is measured the same way in a child
process, so both figures come from the same machine in the same minute.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import numpy as np

from .engine import peak_rss_bytes


def _prompt(n_vocab: int, n: int, seed: int = 42) -> list[int]:
    # random ids like llama-bench; avoid the first 1,000 (control and byte tokens)
    return np.random.default_rng(seed).integers(1000, n_vocab, n).tolist()


def _warm_up(engine, ids: list[int]) -> None:
    """Run every code path once (prefill and decode, short and long prompts: kernels compile or
    load from numba's cache on first use) so no timed run pays for it."""
    engine.reset()
    engine.prefill(ids[:16])
    engine.decode_one(ids[0])
    engine.reset()


def greedy(engine, prompt: list[int], n: int) -> tuple[list[int], list[np.ndarray]]:
    """n greedy ids after `prompt` (ties to the lowest id, as llama.cpp) and the logits each was
    picked from: what the accuracy rule's free-running check compares."""
    engine.reset()
    logits = engine.prefill(prompt)
    ids, seen = [], []
    for _ in range(n):
        t = int(np.argmax(logits))
        ids.append(t)
        seen.append(logits)
        logits = engine.decode_one(t)
    return ids, seen


def measure(engine, n_prompt: int = 512, n_gen: int = 64, reps: int = 3) -> dict[str, Any]:
    """Our pp/tg figures on a loaded engine."""
    ids = _prompt(engine.config.n_vocab, n_prompt)
    _warm_up(engine, ids)
    pp, tg = [], []
    for _ in range(reps):
        engine.reset()
        t = time.perf_counter()
        engine.prefill(ids)
        pp.append(n_prompt / (time.perf_counter() - t))
        engine.reset()
        tok = ids[0]
        t = time.perf_counter()
        for i in range(n_gen):
            logits = engine.decode_one(tok)
            tok = int(np.argmax(logits))
        tg.append(n_gen / (time.perf_counter() - t))
    engine.reset()
    return {
        f"pp{n_prompt}_tokens_per_s": statistics.median(pp),
        f"tg{n_gen}_tokens_per_s": statistics.median(tg),
        "peak_rss_bytes": peak_rss_bytes(),
    }


_LLAMA_CPP_CHILD = r"""
import json, statistics, sys, time
import numpy as np
from llama_cpp import Llama
path, n_prompt, n_gen, reps, threads, n_ctx, kv_type = sys.argv[1], *map(int, sys.argv[2:8])
kv = {"type_k": kv_type, "type_v": kv_type, "flash_attn": True} if kv_type != 1 else {}  # quantized V needs flash attention
llm = Llama(model_path=path, n_ctx=n_ctx, n_batch=n_prompt, n_threads=threads, n_threads_batch=threads, verbose=False, **kv)
ids = np.random.default_rng(42).integers(1000, llm.n_vocab(), n_prompt).tolist()
llm.eval(ids[:8])
pp, tg = [], []
for _ in range(reps):
    llm.reset(); llm._ctx.memory_clear(True) if hasattr(llm._ctx, "memory_clear") else None
    t = time.perf_counter(); llm.eval(ids); pp.append(n_prompt / (time.perf_counter() - t))
    llm.reset(); llm._ctx.memory_clear(True) if hasattr(llm._ctx, "memory_clear") else None
    t = time.perf_counter()
    for i in range(n_gen):
        llm.eval([ids[i]])
    tg.append(n_gen / (time.perf_counter() - t))
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork and exec
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({f"pp{n_prompt}_tokens_per_s": statistics.median(pp), f"tg{n_gen}_tokens_per_s": statistics.median(tg),
                  "peak_rss_bytes": hwm}))
"""


def measure_llama_cpp(path: str, n_prompt: int = 512, n_gen: int = 64, reps: int = 3,
                      threads: int = 2, n_ctx: int = 1024, cache_type: str = "f16") -> dict[str, Any] | None:
    """llama.cpp's figures from a child process (its KV cache of the same type), or None when
    llama-cpp-python is not installed."""
    from ..quant.ggml_types import kv_cache_type

    try:
        import importlib.util

        if importlib.util.find_spec("llama_cpp") is None:
            return None
    except ValueError:
        return None
    r = subprocess.run(
        [sys.executable, "-c", _LLAMA_CPP_CHILD, str(path), str(n_prompt), str(n_gen), str(reps), str(threads), str(n_ctx),
         str(int(kv_cache_type(cache_type)))],
        capture_output=True, text=True, stdin=subprocess.DEVNULL, env=os.environ | {"OMP_NUM_THREADS": str(threads)},
    )
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def profile_decode(engine, n_gen: int = 32) -> dict[str, float]:
    """Milliseconds per decoded token by op (matmuls by GGUF tensor kind, the other kernels by
    name); 'python' is what is left: the interpreter's own time between kernel calls."""
    model, ops = engine.model, engine.ops
    times: dict[str, float] = {}

    def timed(key_fn, fn):
        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                k = key_fn(*a)
                times[k] = times.get(k, 0.0) + time.perf_counter() - t
        return wrapper

    def matmul_kind(x, name):
        return "matmul " + name.split(".")[-2] if name.startswith("blk.") else "matmul head"

    def group_kind(x, *names):
        return "matmul " + "+".join(n.split(".")[-2] for n in names)

    orig_linear, orig_linears = model.linear, model.linears
    model.linear = timed(matmul_kind, orig_linear)
    model.linears = timed(group_kind, orig_linears)
    orig_ops = {}
    for op in ("rms_norm", "rope", "attention", "attention_ring", "silu_gate", "gelu_tanh_gate", "embedding_rows"):
        orig_ops[op] = getattr(ops, op)
        setattr(ops, op, timed(lambda *a, _op=op: _op, orig_ops[op]))
    try:
        _warm_up(engine, _prompt(engine.config.n_vocab, 32))
        engine.prefill([1, 2])
        times.clear()
        tok = 3
        t = time.perf_counter()
        for _ in range(n_gen):
            tok = int(np.argmax(engine.decode_one(tok)))
        total = time.perf_counter() - t
    finally:
        model.linear, model.linears = orig_linear, orig_linears
        for op, fn in orig_ops.items():
            setattr(ops, op, fn)
        engine.reset()
    out = {k: v / n_gen * 1e3 for k, v in sorted(times.items(), key=lambda kv: -kv[1])}
    # the timed calls never nest, so what is left is interpreter time
    out["python"] = total / n_gen * 1e3 - sum(out.values())
    out["total"] = total / n_gen * 1e3
    return out


# ---- speculative decoding: real prompts (random ids propose nothing) ----------------------------

_FUNCTION = '''def merge_intervals(intervals, gap=0):
    """Merge overlapping [start, end] intervals; ones closer than `gap` merge too."""
    if not intervals:
        return []
    for a, b in intervals:
        if a > b:
            raise ValueError(f"interval [{a}, {b}] ends before it starts")
    ordered = sorted(intervals, key=lambda iv: (iv[0], iv[1]))
    merged = [list(ordered[0])]
    for start, end in ordered[1:]:
        last = merged[-1]
        if start <= last[1] + gap:
            last[1] = max(last[1], end)
        else:
            merged.append([start, end])
    total = 0
    for start, end in merged:
        total += end - start
    widest = max(merged, key=lambda iv: iv[1] - iv[0])
    holes = []
    for (a0, a1), (b0, b1) in zip(merged, merged[1:]):
        holes.append([a1, b0])
    report = {
        "merged": merged,
        "count": len(merged),
        "covered": total,
        "widest": widest,
        "holes": holes,
    }
    if len(merged) > 1:
        first, last = merged[0][0], merged[-1][1]
        report["span"] = last - first
        report["density"] = total / (last - first) if last > first else 1.0
    else:
        report["span"] = merged[0][1] - merged[0][0]
        report["density"] = 1.0
    for key in ("covered", "span"):
        if report[key] < 0:
            raise AssertionError(f"{key} is negative")
    return report
'''

PROMPTS = {
    # a chat turn that asks to rewrite a 40-line function with one change (lookup's case)
    "rewrite": ("chat", "Rewrite this Python function with the variable `total` renamed to `covered_len`. "
                        "Change nothing else and reply with the code only.\n\n```python\n" + _FUNCTION + "```"),
    # plain code completion (a draft model's case)
    "complete": ("text", "import heapq\n\n\ndef dijkstra(graph, source):\n    \"\"\"Shortest distances from "
                         "source in a graph given as {node: [(neighbour, weight), ...]}.\"\"\"\n"),
}


def prompt_ids(engine, name: str) -> list[int]:
    kind, text = PROMPTS[name]
    if kind == "text":
        return engine.tokenizer.encode(text)
    from .chat_template import ChatTemplate

    tpl = ChatTemplate.for_model(engine.file.metadata, engine.tokenizer)
    return tpl.encode(engine.tokenizer, tpl.render([{"role": "user", "content": text}]))


def measure_speculative(engine, n_gen: int = 128, reps: int = 3) -> dict[str, Any]:
    """Greedy generation on each of PROMPTS with the engine's proposer and without it: tokens/s
    (medians), whether the ids are identical, and the proposer's counts."""
    from .sampler import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=n_gen)
    prop = engine.proposer
    out = {}
    try:
        for name in PROMPTS:
            ids = prompt_ids(engine, name)
            runs = {}
            for label, p in (("plain", None), ("speculative", prop)):
                engine.proposer = p
                speeds, got = [], None
                for _ in range(reps):
                    engine.reset()
                    got = [e.token for e in engine.generate(ids, params)]
                    speeds.append(engine.stats.tokens_per_s)
                runs[label] = (statistics.median(speeds), got, engine.stats.speculative)
            (tp, ids_p, _), (ts, ids_s, spec) = runs["plain"], runs["speculative"]
            out[name] = {"plain_tokens_per_s": tp, "speculative_tokens_per_s": ts, "speedup": ts / tp,
                         "identical": ids_p == ids_s, "tokens": len(ids_s), **(spec or {})}
    finally:
        engine.proposer = prop
        engine.reset()
    return out


def measure_sparse(engine, n_gen: int = 128, reps: int = 3) -> dict[str, Any]:
    """Greedy generation (end-of-generation ignored) on each of PROMPTS, dense and with the
    engine's sparse FFN (runtime/sparsity.py), alternating: tokens/s (medians), the share of
    neurons computed, and for how many tokens the two agree."""
    from .sampler import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=n_gen, ignore_eos=True)
    sparse = engine.model.sparse
    out = {}
    try:
        for name in PROMPTS:
            ids = prompt_ids(engine, name)
            speeds, got = {"dense": [], "sparse": []}, {}
            active = 0.0
            for _ in range(reps):
                for label, sp in (("dense", None), ("sparse", sparse)):
                    engine.model.sparse = sp
                    engine.reset()
                    before = list(sparse.pairs)
                    got[label] = [e.token for e in engine.generate(ids, params)]
                    speeds[label].append(engine.stats.tokens_per_s)
                    if sp is not None:
                        active = (sparse.pairs[0] - before[0]) / max(sparse.pairs[1] - before[1], 1)
            agree = next((i for i, (a, b) in enumerate(zip(got["dense"], got["sparse"])) if a != b),
                         min(len(got["dense"]), len(got["sparse"])))
            td, ts = statistics.median(speeds["dense"]), statistics.median(speeds["sparse"])
            out[name] = {"dense_tokens_per_s": td, "sparse_tokens_per_s": ts, "speedup": ts / td,
                         "neurons_active": active, "agree": agree, "tokens": len(got["sparse"])}
    finally:
        engine.model.sparse = sparse
        engine.reset()
    return {"sparsity": sparse.s, "layers": sparse.describe()["layers"], "tokens": n_gen, "prompts": out}
