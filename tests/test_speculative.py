"""Speculative decoding (runtime/speculative.py) on the real models: batch invariance of the
target's logits, KV rollback (gemma's ring caches included), greedy ids identical to plain
decoding with lookup and with a draft model, the accept/reject rule's distribution, refusals."""
from __future__ import annotations

import json

import numpy as np
import pytest

from edgellm.errors import EdgeLLMError
from edgellm.runtime import Engine, RuntimeConfig, bench
from edgellm.runtime.sampler import Sampler, SamplingParams
from edgellm.runtime.speculative import Controller, NgramLookup, accept, probabilities

from conftest import decode_steps, model_file
from test_cli import run_cli


@pytest.fixture(scope="module")
def qwen():
    e = Engine(model_file("qwen2.5-coder-0.5b"), RuntimeConfig(n_ctx=1024))
    yield e
    e.close()


def test_a_verification_pass_gives_the_bits_of_decode_steps(qwen):
    prompt = qwen.tokenizer.encode("def add(a, b):\n    return")
    toks = [264, 488, 293, 198, 750, 1186, 2877, 11]
    want = decode_steps(qwen, prompt, toks)  # logits after the prompt and after each token
    qwen.reset()
    first = qwen.prefill(prompt)
    got = qwen.verify(toks)  # one pass over all 8
    assert np.array_equal(first, want[0])
    assert np.array_equal(got[:-1], want[1:])


def test_rollback_then_decode_is_as_if_nothing_was_drafted(qwen):
    prompt = qwen.tokenizer.encode("x = [1, 2, 3]\nfor")
    plain = decode_steps(qwen, prompt, [856, 304, 279, 25])
    qwen.reset()
    qwen.prefill(prompt)
    n0 = len(qwen.tokens)
    qwen.verify([856, 9999, 8888, 7777])  # one good token, three bad drafts
    qwen.rollback(n0 + 1)
    assert np.array_equal(qwen.decode_one(304), plain[2])
    assert np.array_equal(qwen.decode_one(279), plain[3])


def test_rollback_across_gemma_ring_caches():
    """Sliding-window layers keep window + n_batch - 1 rows: drafted rows overwrite old ones that
    no query can see any more. Past the 512-token window, verify and roll back, then decode."""
    path = model_file("gemma3-270m")
    eng = Engine(path, RuntimeConfig(n_ctx=1024, n_batch=16))
    try:
        prompt = list(np.random.default_rng(0).integers(1000, 200000, 600))
        toks = [1000, 2000, 3000, 4000]
        plain = decode_steps(eng, prompt, toks + [0])
        eng.reset()
        eng.prefill(prompt)
        for bad in ([5, 6, 7], [8, 9, 10, 11, 12, 13, 14]):  # rejected drafts, then the real token
            n0 = len(eng.tokens)
            eng.verify([toks[0]] + bad)
            eng.rollback(n0)
        got = eng.verify(toks)
        assert np.array_equal(got, plain[1:])
    finally:
        eng.close()


def _rewrite_ids(eng):
    return bench.prompt_ids(eng, "rewrite")


def _greedy(eng, ids, n):
    eng.reset()
    return [e.token for e in eng.generate(ids, SamplingParams(temperature=0, max_tokens=n))]


def test_lookup_gives_the_greedy_ids_of_plain_decoding(qwen):
    ids = _rewrite_ids(qwen)
    want = _greedy(qwen, ids, 48)
    spec = Engine(model_file("qwen2.5-coder-0.5b"), RuntimeConfig(n_ctx=1024, lookup=3))
    try:
        assert _greedy(spec, ids, 48) == want
        st = spec.stats.speculative
        assert st["drafted"] > 0 and st["accepted"] > 0 and st["target_passes"] < 48
    finally:
        spec.close()


def test_a_draft_model_gives_the_greedy_ids_of_plain_decoding(qwen):
    """The model drafting for itself: every proposal is the target's own choice (acceptance ~1),
    so long drafts are verified, rolled back only at the end of the run."""
    ids = qwen.tokenizer.encode("def fibonacci(n):\n")
    want = _greedy(qwen, ids, 40)
    spec = Engine(model_file("qwen2.5-coder-0.5b"), RuntimeConfig(n_ctx=1024, draft="qwen2.5-coder-0.5b"))
    try:
        assert _greedy(spec, ids, 40) == want
        st = spec.stats.speculative
        assert st["drafted"] > 0 and st["acceptance"] > 0.9
    finally:
        spec.close()


@pytest.mark.slow
def test_qwen_0_5b_drafting_for_1_5b_keeps_its_greedy_ids():
    path = model_file("qwen2.5-coder-1.5b")
    plain = Engine(path, RuntimeConfig(n_ctx=1024))
    spec = Engine(path, RuntimeConfig(n_ctx=1024, draft="qwen2.5-coder-0.5b"))
    try:
        ids = bench.prompt_ids(plain, "complete")
        assert _greedy(spec, ids, 64) == _greedy(plain, ids, 64)
    finally:
        plain.close()
        spec.close()


def test_a_draft_with_another_vocabulary_is_refused():
    with pytest.raises(EdgeLLMError, match="another vocabulary than qwen2.5-coder-0.5b"):
        Engine(model_file("qwen2.5-coder-0.5b"), RuntimeConfig(n_ctx=256, draft="gemma3-270m"))


def test_sampling_keeps_the_target_distribution():
    """accept() with point-mass proposals: the first emitted token is distributed as the target's
    p0 whatever the draft, and after an accepted draft the next one as p1 (chi-square, fixed seed)."""
    rng = np.random.default_rng(0)
    v = 6
    logits = rng.standard_normal((2, v)).astype(np.float32) * 1.5
    params = SamplingParams(temperature=0.9, top_k=0, top_p=1.0, min_p=0.0, seed=1)
    sampler = Sampler(params, v)
    _, p0 = probabilities(sampler, logits[0], [])
    ids0, _ = probabilities(sampler, logits[0], [])
    p0 = p0[np.argsort(ids0)]
    ids1, p1 = probabilities(sampler, logits[1], [])
    p1 = p1[np.argsort(ids1)]
    n = 30000
    first, second = np.zeros(v), np.zeros(v)
    draft = int(np.argsort(p0)[v // 2])  # a middling proposal
    for _ in range(n):
        n_ok, nxt = accept(sampler, logits, [draft], [])
        if n_ok == 0:
            first[nxt] += 1
        else:
            first[draft] += 1
            second[nxt] += 1

    def chi2(counts, p):
        e = counts.sum() * p
        return float(((counts - e) ** 2 / e).sum())
    # 5 degrees of freedom: P(chi2 > 25) ~ 1e-4
    assert chi2(first, p0) < 25
    assert chi2(second, p1) < 25
    assert abs(first[draft] / n - p0[draft]) < 0.02


def test_lookup_proposes_what_followed_the_latest_match():
    lk = NgramLookup(3)
    h = [1, 2, 3, 4, 5, 9, 1, 2, 3, 7, 8, 0, 1, 2, 3]
    assert lk.propose(h, 2) == [7, 8]  # the most recent earlier "1 2 3" is followed by 7 8
    assert lk.propose([5, 6, 7], 4) == []
    assert lk.propose([4, 1, 4], 3) == [1, 4]  # falls back to shorter matches


def test_the_controller_stops_drafting_when_drafts_do_not_pay():
    c = Controller(8)
    chosen = []
    for _ in range(264):
        k = c.k
        chosen.append(k)
        c.update(k, k, 0, 0.01 * (1 + 0.5 * k))  # every draft rejected; longer passes cost more
    assert chosen[-64:].count(0) > 48  # plain decoding, with a neighbour probed now and then


@pytest.mark.parametrize("args, msg", [
    (["--lookup", "3", "--draft", "qwen2.5-coder-0.5b"], "choose a draft model or lookup, not both"),
    (["--lookup", "3", "--draft-max", "99"], "draft-max"),
])
def test_bad_speculative_options_are_one_line_errors(args, msg):
    r = run_cli("run", "qwen2.5-coder-0.5b", "hi", "-n", "2", *args)
    assert r.returncode != 0 and msg in r.stderr and "Traceback" not in r.stderr


def test_run_reports_the_speculative_counts():
    model_file("qwen2.5-coder-0.5b")
    r = run_cli("run", "qwen2.5-coder-0.5b", "a b c a b c a b c a b", "-n", "12", "--temp", "0",
                "--lookup", "2", "--json")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)["speculative"]
    assert st["target_passes"] >= 1 and 0 <= st["accepted"] <= st["drafted"]


def test_the_controller_takes_lengths_cut_by_the_context():
    c = Controller(8)
    c.update(5, 5, 5, 0.01)  # near the end of the context 8 became 5: not a ladder length
    c.update(8, 8, 8, 0.02)
    for _ in range(40):
        c.update(c.k, c.k, c.k, 0.01 * (1 + 0.2 * c.k))
    assert c.k in c.ladder
