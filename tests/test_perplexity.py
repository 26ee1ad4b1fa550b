"""Perplexity on GPL-3 with llama-perplexity's method: within 1% of llama.cpp's figures (the
method is the same) and within 0.3% of the exact path's (the accuracy rule; the exact figures are
recorded in tests/data, `--backend numpy`; llama.cpp itself is 0.2-0.4% off them)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgellm.runtime import Engine, RuntimeConfig, perplexity

from conftest import model_file, reference_file

GPL3 = Path("/usr/share/common-licenses/GPL-3")
DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize("name", [
    "gemma3-270m",
    "qwen2.5-coder-0.5b",
    pytest.param("qwen2.5-coder-1.5b", marks=pytest.mark.slow),
])
def test_gpl3_perplexity_near_llama_cpp_and_the_exact_path(name):
    if not GPL3.exists():
        pytest.skip(f"{GPL3} is missing")
    ref = json.loads(reference_file("llamacpp-perplexity-gpl3-c512.json").read_text())["models"][name]
    eng = Engine(model_file(name), RuntimeConfig(n_ctx=512, n_batch=512))
    try:
        r = perplexity(eng, GPL3.read_text(), 512)
    finally:
        eng.close()
    assert r.n_chunks == ref["n_chunks"] and r.scored_tokens == ref["scored_tokens"]
    assert abs(r.ppl / ref["final_ppl"] - 1) < 0.01, f"{name}: {r.ppl:.4f} vs llama.cpp {ref['final_ppl']}"
    exact = json.loads((DATA / "exact-perplexity-gpl3-c512.json").read_text())["models"][name]
    print(f"\n{name}: ppl {r.ppl:.4f}, exact path {exact:.4f}, llama.cpp {ref['final_ppl']}")
    assert abs(r.ppl / exact - 1) < 0.003, f"{name}: {r.ppl:.4f} vs the exact path's {exact:.4f}"
