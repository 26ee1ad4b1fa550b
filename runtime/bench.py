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


def measure(engine, n_prompt: int = 512, n_gen: int = 64, reps: int = 3) -> dict[str, Any]:
    """Our pp/tg figures on a loaded engine."""
    ids = _prompt(engine.config.n_vocab, n_prompt)
    engine.reset()
    engine.prefill(ids[:8])  # warm-up: first calls compile / touch pages
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
import json, resource, statistics, sys, time
import numpy as np
from llama_cpp import Llama
path, n_prompt, n_gen, reps, threads, n_ctx = sys.argv[1], *map(int, sys.argv[2:7])
llm = Llama(model_path=path, n_ctx=n_ctx, n_batch=n_prompt, n_threads=threads, n_threads_batch=threads, verbose=False)
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
print(json.dumps({f"pp{n_prompt}_tokens_per_s": statistics.median(pp), f"tg{n_gen}_tokens_per_s": statistics.median(tg),
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def measure_llama_cpp(path: str, n_prompt: int = 512, n_gen: int = 64, reps: int = 3,
                      threads: int = 2, n_ctx: int = 1024) -> dict[str, Any] | None:
    """llama.cpp's figures from a child process, or None when llama-cpp-python is not installed."""
    try:
        import importlib.util

        if importlib.util.find_spec("llama_cpp") is None:
            return None
    except ValueError:
        return None
    r = subprocess.run(
        [sys.executable, "-c", _LLAMA_CPP_CHILD, str(path), str(n_prompt), str(n_gen), str(reps), str(threads), str(n_ctx)],
        capture_output=True, text=True, stdin=subprocess.DEVNULL, env=os.environ | {"OMP_NUM_THREADS": str(threads)},
    )
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])
