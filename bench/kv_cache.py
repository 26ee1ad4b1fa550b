"""KV cache types against llama.cpp's: `python bench/kv_cache.py [--models M,...] [--types f16,q8_0,q4_0]`.

For each model and cache type, GPL-3 perplexity at ctx 512 (llama-perplexity's method: chunks of
512 tokens, the second half of each scored) from edgellm (`--cache-type`) and from llama.cpp
through llama-cpp-python (`type_k` / `type_v`, flash attention, which quantized V needs; its own
rotation of quantized caches on), on the same token ids. Each figure is also given relative to
the same engine's float16 cache. Without llama-cpp-python only edgellm's column is printed.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
from pathlib import Path

import numpy as np

from edgellm.loaders import store
from edgellm.quant.ggml_types import kv_cache_type
from edgellm.runtime import Engine, RuntimeConfig, perplexity
from edgellm.runtime.perplexity import log_softmax_at

TEXT = Path("/usr/share/common-licenses/GPL-3")
N_CTX = 512


def ours(path, cache_type: str, text: str) -> float:
    eng = Engine(path, RuntimeConfig(n_ctx=N_CTX, n_batch=N_CTX, cache_type=cache_type))
    try:
        return perplexity(eng, text, N_CTX).ppl
    finally:
        eng.close()


def llama_cpp(path, cache_type: str, ids: list[int], bos: int | None) -> float:
    from llama_cpp import Llama

    t = int(kv_cache_type(cache_type))
    llm = Llama(model_path=str(path), n_ctx=N_CTX, n_batch=N_CTX, n_threads=2, logits_all=True, verbose=False,
                type_k=t, type_v=t, flash_attn=True)
    nll, count = 0.0, 0
    for c in range(len(ids) // N_CTX):
        chunk = list(ids[c * N_CTX:(c + 1) * N_CTX])
        if bos is not None:
            chunk[0] = bos
        llm.reset()  # each chunk from position 0 (newer versions also clear the cache's memory)
        if hasattr(llm._ctx, "memory_clear"):
            llm._ctx.memory_clear(True)
        llm.eval(chunk)
        logits = np.asarray(llm.scores[:N_CTX], np.float32)
        lp = log_softmax_at(logits[N_CTX // 2:N_CTX - 1], np.asarray(chunk[N_CTX // 2 + 1:]))
        nll -= float(lp.sum())
        count += len(lp)
    return math.exp(nll / count)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="gemma3-270m,qwen2.5-coder-0.5b,qwen2.5-coder-1.5b")
    ap.add_argument("--types", default="f16,q8_0,q4_0")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    text = TEXT.read_text()
    have_ref = importlib.util.find_spec("llama_cpp") is not None
    rows = []
    for name in a.models.split(","):
        path = store.resolve(name)
        eng = Engine(path, RuntimeConfig(n_ctx=N_CTX))
        tok = eng.tokenizer
        ids, bos = tok.encode(text, add_special=True, parse_special=False), (tok.bos_id if tok.add_bos else None)
        eng.close()
        base = {}
        for t in a.types.split(","):
            row = {"model": name, "cache_type": t, "edgellm": ours(path, t, text),
                   "llama_cpp": llama_cpp(path, t, ids, bos) if have_ref else None}
            for k in ("edgellm", "llama_cpp"):
                base.setdefault(k, row[k])
                if row[k] is not None and base[k]:
                    row[k + "_vs_first"] = row[k] / base[k] - 1
            rows.append(row)
            if not a.json:
                ref = "" if row["llama_cpp"] is None else \
                    f"   llama.cpp {row['llama_cpp']:.4f} ({row['llama_cpp_vs_first']:+.2%})"
                print(f"{name:<20} {t:<5} edgellm {row['edgellm']:.4f} ({row['edgellm_vs_first']:+.2%}){ref}",
                      flush=True)
    if a.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
