"""The three shipped models against llama.cpp's own outputs (../shared/reference/llamacpp-*.json).

Teacher forcing: the prompt plus llama.cpp's 32 greedy tokens go through the model in one pass;
at every step our argmax must be llama.cpp's token, except at near-ties (llama.cpp's top-2 logits
closer than NEAR_TIE), where our pick must be one of llama.cpp's top two and our top-5 set must
share at least four tokens with its top-5. Free-running greedy generation must then reproduce
llama.cpp's tokens up to the first near-tie step where the two legitimately part ways.

NEAR_TIE is 0.05 as the issue states, except for gemma3-270m: its logits are large (~20-30) and
llama.cpp itself, same version, on this machine, differs from its reference by up to 0.5 per
logit depending on flash attention and KV type, and picks another token at steps whose reference
gap is 0.078 and 0.278 (measured with llama-cpp-python 0.3.36, see the closing note of issue 4).
Exact float32 arithmetic lands closer than that: its largest missed gap is 0.071, so 0.1.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from edgellm.runtime import Engine, RuntimeConfig, SamplingParams

from conftest import MODELS, model_file, reference_file

NEAR_TIE = {"gemma3-270m": 0.1, "qwen2.5-coder-0.5b": 0.05, "qwen2.5-coder-1.5b": 0.05}


@pytest.fixture(scope="module", params=MODELS)
def loaded(request):
    name = request.param
    ref = json.loads(reference_file(f"llamacpp-{name}.json").read_text())
    eng = Engine(model_file(name), RuntimeConfig(n_ctx=512))
    yield name, eng, ref
    eng.close()


def check_step(name, s, logits, ref_step, ref_token):
    (a, la), (b, lb) = ref_step[0], ref_step[1]
    ours = int(np.argmax(logits))
    if la - lb >= NEAR_TIE[name]:
        assert ours == ref_token, (
            f"{name} step {s}: chose {ours}, llama.cpp {ref_token} (its gap {la - lb:.3f}; "
            f"our logits {logits[a]:.3f} vs {logits[b]:.3f})"
        )
        return True
    assert ours in (a, b), f"{name} step {s}: near-tie, but {ours} is not llama.cpp's top 2 ({a}, {b})"
    top5 = set(np.argsort(-logits)[:5].tolist())
    assert len(top5 & {t for t, _ in ref_step}) >= 4, f"{name} step {s}: top-5 sets differ"
    return ours == ref_token


def test_prompt_ids_match(loaded):
    name, eng, ref = loaded
    for p in ref["prompts"]:
        assert eng.tokenizer.encode(p["prompt"]) == p["prompt_ids"]


def test_teacher_forced_steps(loaded):
    name, eng, ref = loaded
    for p in ref["prompts"]:
        ids = p["prompt_ids"] + p["gen_ids"][:-1]
        logits = eng.prefill(ids, all_logits=True)[len(p["prompt_ids"]) - 1 :]
        assert logits.shape == (32, ref["n_vocab"])
        for s in range(32):
            check_step(name, s, logits[s], p["top5_per_step"][s], p["gen_ids"][s])


def test_greedy_generation(loaded):
    name, eng, ref = loaded
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    for p in ref["prompts"]:
        eng.reset()
        text = "".join(ev.text for ev in eng.generate(p["prompt_ids"], params))
        ids = eng.stats.ids
        assert len(ids) == 32
        for s, (ours, theirs) in enumerate(zip(ids, p["gen_ids"])):
            if ours != theirs:
                step = p["top5_per_step"][s]
                assert step[0][1] - step[1][1] < NEAR_TIE[name], f"{name}: diverged at step {s} with no near-tie"
                break
        else:
            assert text == p["gen_text"]


def test_numba_and_numpy_backends_agree():
    """The phone fallback (numpy) and the default (numba) give the same greedy tokens; their
    decode logits differ only by int16 activation rounding and summation order."""
    name = "gemma3-270m"
    ref = json.loads(reference_file(f"llamacpp-{name}.json").read_text())
    prompt = ref["prompts"][1]["prompt_ids"]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    runs = {}
    for backend in ("numba", "numpy"):
        eng = Engine(model_file(name), RuntimeConfig(n_ctx=256, backend=backend))
        try:
            list(eng.generate(prompt, params))
            eng.reset()
            logits = eng.prefill(prompt + eng.stats.ids[:3])
            runs[backend] = (eng.stats.ids, eng.decode_one(eng.stats.ids[3]), logits)
        finally:
            eng.close()
    (ids_a, dec_a, pre_a), (ids_b, dec_b, pre_b) = runs["numba"], runs["numpy"]
    assert ids_a == ids_b
    # numba rounds one-token products (decode, and the output head even after a prefill) to
    # int16 activations; numpy is exact float32: ~1e-4 relative on logits of magnitude ~30
    assert np.abs(pre_a - pre_b).max() < 0.05
    assert np.abs(dec_a - dec_b).max() < 0.05
    assert np.abs(pre_a - pre_b).max() > 0 or np.abs(dec_a - dec_b).max() > 0  # two real code paths
