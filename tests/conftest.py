"""Shared fixtures: the real models, fetched into the cache on first use."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

MODELS = ["gemma3-270m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"]
# llama.cpp's outputs (copied from shared/reference, which a fresh clone does not have)
REFERENCE = Path(os.environ.get("EDGELLM_REFERENCE", Path(__file__).resolve().parent / "data" / "reference"))


def model_file(name: str) -> Path:
    """The cached GGUF of a catalog model, pulled if missing (set EDGELLM_OFFLINE=1 to skip instead)."""
    from edgellm.loaders import store

    if os.environ.get("EDGELLM_OFFLINE") and not store.is_cached(name):
        pytest.skip(f"{name} is not cached and EDGELLM_OFFLINE is set")
    return store.resolve(name)


def decode_steps(eng, prompt, tokens):
    """Logits (len(tokens), n_vocab) after the prompt, then after each of tokens[:-1], one decode
    step at a time."""
    import numpy as np

    eng.reset()
    out = [eng.prefill(prompt)]
    for t in tokens[:-1]:
        out.append(eng.decode_one(t))
    return np.stack(out)


def reference_file(name: str) -> Path:
    p = REFERENCE / name
    if not p.exists():
        pytest.skip(f"reference file {p} is missing")
    return p
