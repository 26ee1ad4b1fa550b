"""Perplexity as llama.cpp's `llama-perplexity` computes it.

The text is tokenized once (with BOS when the model adds one) and cut into floor(n / n_ctx)
chunks of n_ctx tokens; in each chunk the first token becomes BOS (if the model adds one), the
chunk is evaluated from an empty cache, and tokens n_ctx/2+1 .. n_ctx-1 are scored from the
logits one position earlier. PPL = exp(mean negative log-likelihood).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import EdgeLLMError


@dataclass
class PerplexityResult:
    ppl: float
    scored_tokens: int
    n_chunks: int
    chunk_ppl: list[float]  # running perplexity after each chunk


def log_softmax_at(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """logits (T, V), targets (T,) -> log p(target) (T,), in float64."""
    x = logits.astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(x - m).sum(axis=1))
    return x[np.arange(len(targets)), targets] - lse


def perplexity(engine, text: str, n_ctx: int = 512,
               on_chunk: Callable[[int, int, float], None] | None = None) -> PerplexityResult:
    tok = engine.tokenizer
    ids = tok.encode(text, add_special=True, parse_special=False)
    if n_ctx > engine.n_ctx:
        raise EdgeLLMError(f"--ctx {n_ctx} exceeds the loaded context of {engine.n_ctx}")
    n_chunks = len(ids) // n_ctx
    if n_chunks == 0:
        raise EdgeLLMError(f"the text has {len(ids)} tokens; perplexity needs at least {n_ctx} (one chunk)")
    first = n_ctx // 2
    sparse = getattr(engine.model, "sparse", None)
    if sparse is not None:  # every token scored as sparse decode computes it
        sparse.all_tokens = True
    try:
        return _chunks(engine, ids, n_ctx, n_chunks, first, on_chunk)
    finally:
        if sparse is not None:
            sparse.all_tokens = False


def _chunks(engine, ids, n_ctx, n_chunks, first, on_chunk) -> PerplexityResult:
    tok = engine.tokenizer
    nll, count, running = 0.0, 0, []
    for c in range(n_chunks):
        chunk = list(ids[c * n_ctx : (c + 1) * n_ctx])
        if tok.add_bos and tok.bos_id is not None:
            chunk[0] = tok.bos_id
        engine.reset()
        logits = engine.prefill(chunk, all_logits=True)  # (n_ctx, n_vocab)
        lp = log_softmax_at(logits[first : n_ctx - 1], np.asarray(chunk[first + 1 :]))
        nll -= float(lp.sum())
        count += len(lp)
        running.append(math.exp(nll / count))
        if on_chunk:
            on_chunk(c + 1, n_chunks, running[-1])
    engine.reset()
    return PerplexityResult(math.exp(nll / count), count, n_chunks, running)
