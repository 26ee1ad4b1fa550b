"""The three shipped models: the fast kernels against the exact path, judged by llama.cpp's own
distance from it (the accuracy rule of the CPU kernels v2 issue).

The exact path is `--backend numpy`: float32 products over the dequantized GGUF weights.
llama.cpp's reference (tests/data/reference/llamacpp-*.json: its prompts, 32 greedy tokens and
the top-5 logits of each step, llama-cpp-python 0.3.36 on a Zen 3 CPU) gives its deviation.

- Teacher forcing: the prompt, then llama.cpp's tokens one decode step at a time (the int8
  kernels run at T=1; a prompt runs the float path). At each step, over llama.cpp's five ids,
  |logit - exact logit|: our max and median over all steps of all prompts must not exceed
  llama.cpp's. The figures are printed (pytest -s) and the measured ones are recorded below.
- Free running: our greedy tokens follow the exact path's up to the first end-of-generation
  token, or leave it first at a step whose exact top-2 gap is below 0.25 with our token in the
  exact top 5.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from edgellm.runtime import Engine, RuntimeConfig
from edgellm.runtime.bench import greedy as _greedy

from conftest import MODELS, decode_steps, model_file, reference_file

# measured on AMD EPYC (Zen 5, avx512vnni path), max / median over all steps (gemma: ours 0.009 / 0.003
# vs llama.cpp 0.863 / 0.274; see the closing note of issue 10 for all three):
GAP = 0.25
PARAMS = [pytest.param(m, marks=pytest.mark.slow) if m == "qwen2.5-coder-1.5b" else m for m in MODELS]


def _engines(name):
    path = model_file(name)
    return Engine(path, RuntimeConfig(n_ctx=512)), Engine(path, RuntimeConfig(n_ctx=512, backend="numpy"))


@pytest.fixture(scope="module", params=PARAMS)
def loaded(request):
    name = request.param
    ref = json.loads(reference_file(f"llamacpp-{name}.json").read_text())
    fast, exact = _engines(name)
    yield name, fast, exact, ref
    fast.close()
    exact.close()


def test_prompt_ids_match(loaded):
    name, fast, _, ref = loaded
    for p in ref["prompts"]:
        assert fast.tokenizer.encode(p["prompt"]) == p["prompt_ids"]


def test_teacher_forced_deviation_no_larger_than_llama_cpp(loaded):
    name, fast, exact, ref = loaded
    ours, theirs = [], []
    for p in ref["prompts"]:
        n = len(p["gen_ids"])
        ex = exact.prefill(p["prompt_ids"] + p["gen_ids"][:-1], all_logits=True)[len(p["prompt_ids"]) - 1:]
        fa = decode_steps(fast, p["prompt_ids"], p["gen_ids"])
        assert ex.shape == fa.shape == (n, ref["n_vocab"])
        for s, top5 in enumerate(p["top5_per_step"]):
            ids = [t for t, _ in top5]
            theirs.append(max(abs(lg - ex[s, t]) for t, lg in top5))
            ours.append(float(np.abs(fa[s, ids] - ex[s, ids]).max()))
    print(f"\n{name}: top-5 deviation from exact, max / median: ours {max(ours):.3f} / {np.median(ours):.3f}, "
          f"llama.cpp {max(theirs):.3f} / {np.median(theirs):.3f}")
    assert max(ours) <= max(theirs)
    assert np.median(ours) <= np.median(theirs)
    assert max(ours) > 0  # int8 activations: a real second code path


def test_greedy_follows_the_exact_path(loaded):
    name, fast, exact, ref = loaded
    eog = fast.tokenizer.eog_ids
    for p in ref["prompts"]:
        ours, _ = _greedy(fast, p["prompt_ids"], 32)
        want, logits = _greedy(exact, p["prompt_ids"], 32)
        for s, (a, b) in enumerate(zip(ours, want)):
            if a != b:
                top = np.argsort(-logits[s])[:5]
                gap = float(logits[s][top[0]] - logits[s][top[1]])
                assert gap < GAP and a in top, f"{name}: left the exact path at step {s} (exact gap {gap:.3f})"
                break
            if b in eog:
                break
