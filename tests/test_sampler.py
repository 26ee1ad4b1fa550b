"""Sampler tests: llama.cpp's chain against plain numpy references (and llama.cpp itself where cheap)."""
from __future__ import annotations

import ctypes
import math
import time

import numpy as np
import pytest

from edgellm.runtime.sampler import (
    Sampler,
    SamplingError,
    SamplingParams,
    StopMatcher,
    apply_penalties,
    filter_candidates,
)


# ---- plain references: slow, obviously correct ---------------------------------------------------

def ref_penalties(x, history, last_n, rep=1.0, freq=0.0, pres=0.0):
    x = [float(v) for v in x]
    window = list(history) if last_n < 0 else (list(history)[-last_n:] if last_n else [])
    for t in set(window):
        c = window.count(t)
        x[t] = x[t] * rep if x[t] <= 0 else x[t] / rep
        x[t] -= c * freq + pres
    return np.array(x)


def ref_candidates(x, top_k, top_p, min_p):
    """Ids surviving top-k -> top-p -> min-p, ordered by logit descending then id ascending."""
    order = sorted(range(len(x)), key=lambda i: (-float(x[i]), i))
    if top_k > 0:
        order = order[:top_k]
    if top_p < 1:
        p = np.exp(np.array([x[i] for i in order], np.float64) - float(x[order[0]]))
        cum = np.cumsum(p / p.sum())
        order = order[: int(np.argmax(cum >= top_p)) + 1 if (cum >= top_p).any() else len(order)]
    if min_p > 0:
        order = [i for i in order if x[i] >= x[order[0]] + math.log(min_p)]
    return order


def ref_probs(x, ids, temp):
    z = np.array([x[i] for i in ids], np.float64) / temp
    p = np.exp(z - z.max())
    return p / p.sum()


def logits(n, seed, scale=2.0, ties=False):
    x = np.random.default_rng(seed).standard_normal(n) * scale
    return (np.round(x) if ties else x).astype(np.float32)  # (n,)


# ---- params ---------------------------------------------------------------------------------------

def test_defaults_are_llama_cpp():
    p = SamplingParams()
    assert (p.temperature, p.top_k, p.top_p, p.min_p) == (0.8, 40, 0.95, 0.05)
    assert (p.repeat_penalty, p.repeat_last_n, p.frequency_penalty, p.presence_penalty) == (1.0, 64, 0.0, 0.0)
    assert (p.seed, p.max_tokens, p.stop, p.ignore_eos) == (None, -1, (), False)


@pytest.mark.parametrize("field, value", [
    ("temperature", float("nan")), ("temperature", "hot"), ("top_k", 1.5), ("top_k", True),
    ("top_p", 1.5), ("top_p", -0.1), ("min_p", 2), ("repeat_penalty", 0.0), ("repeat_penalty", -1.0),
    ("repeat_last_n", -2), ("frequency_penalty", float("inf")), ("presence_penalty", None),
    ("seed", -1), ("seed", 1.0), ("max_tokens", -2), ("stop", [""]), ("stop", [1]), ("ignore_eos", "yes"),
])
def test_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field} must be") as e:
        SamplingParams(**{field: value})
    assert isinstance(e.value, SamplingError)


def test_validation_message_gives_the_range():
    with pytest.raises(ValueError) as e:
        SamplingParams(top_p=1.5)
    assert str(e.value) == "top_p must be in [0, 1], got 1.5"


def test_normalises_types():
    p = SamplingParams(temperature=1, top_k=np.int64(5), stop="END", seed=np.uint32(7))
    assert type(p.temperature) is float and type(p.top_k) is int and p.stop == ("END",) and p.seed == 7
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")


def test_aliases_and_unknown():
    p = SamplingParams.from_kwargs(temp=0.5, n_predict=10, repetition_penalty=1.2, penalty_last_n=32)
    assert (p.temperature, p.max_tokens, p.repeat_penalty, p.repeat_last_n) == (0.5, 10, 1.2, 32)
    assert SamplingParams.from_kwargs(max_new_tokens=7, top_k=3).max_tokens == 7
    with pytest.raises(ValueError, match=r"^unknown sampling parameter 'xyz'$"):
        SamplingParams.from_kwargs(xyz=1)
    with pytest.raises(ValueError, match="given twice"):
        SamplingParams.from_kwargs(temp=0.5, temperature=0.7)


# ---- greedy and penalties ------------------------------------------------------------------------

def greedy(x, history=(), **kw):
    return Sampler(SamplingParams(temperature=0, **kw), len(x)).sample(np.array(x, np.float32), history)


def test_greedy_is_argmax_ties_to_lowest_id():
    x = logits(1000, 0)
    assert greedy(x) == int(np.argmax(x))
    assert greedy([0.0, 3.0, 1.0, 3.0, 3.0]) == 1
    assert greedy([-1.0, -0.5, -0.5]) == 1


def test_penalties_change_greedy_choice():
    assert greedy([2.0, 1.9, 0.0]) == 0
    assert greedy([2.0, 1.9, 0.0], [0], repeat_penalty=1.1) == 1  # 2 / 1.1 = 1.82 < 1.9
    # negative logits are multiplied: -1 * 1.1 = -1.1 < -1.05 (dividing would have raised it to -0.91)
    assert greedy([-1.0, -1.05], [0], repeat_penalty=1.1) == 1
    assert greedy([3.0, 2.0], [0, 0, 0], frequency_penalty=0.4) == 1  # 3 - 3 * 0.4 = 1.8
    assert greedy([3.0, 2.0], [0, 0, 0], frequency_penalty=0.3) == 0  # 3 - 0.9 = 2.1
    assert greedy([3.0, 2.5], [0, 0, 0], presence_penalty=0.6) == 1  # once, not per occurrence
    assert greedy([3.0, 2.5], [0, 0, 0], presence_penalty=0.4) == 0
    # the window: only the last repeat_last_n tokens count; 0 disables, -1 is the whole history
    assert greedy([3.0, 2.5, 0.0], [0, 2, 2], presence_penalty=1.0, repeat_last_n=2) == 0
    assert greedy([3.0, 2.5, 0.0], [0, 2, 2], presence_penalty=1.0, repeat_last_n=3) == 1
    assert greedy([3.0, 2.5, 0.0], [0, 2, 2], presence_penalty=1.0, repeat_last_n=-1) == 1
    assert greedy([3.0, 2.5, 0.0], [0, 2, 2], presence_penalty=1.0, repeat_last_n=0) == 0


@pytest.mark.parametrize("last_n, rep, freq, pres", [(64, 1.3, 0.0, 0.0), (5, 1.1, 0.2, 0.3), (-1, 0.8, -0.1, 0.5)])
def test_penalties_match_reference(last_n, rep, freq, pres):
    x = logits(50, 1)
    history = np.random.default_rng(2).integers(0, 50, 40).tolist()
    p = SamplingParams(repeat_last_n=last_n, repeat_penalty=rep, frequency_penalty=freq, presence_penalty=pres)
    before = x.copy()
    got = apply_penalties(x, history, p)
    np.testing.assert_allclose(got, ref_penalties(x, history, last_n, rep, freq, pres), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(x, before)


def test_sample_does_not_mutate_logits_and_bans_eog():
    x = logits(100, 3)
    x[7] = 50.0  # an end-of-generation token the model likes best
    before = x.copy()
    s = Sampler(SamplingParams(seed=1, repeat_penalty=1.5, ignore_eos=True), 100, eog_ids=[7])
    assert all(s.sample(x, [1, 2, 3]) != 7 for _ in range(50))
    np.testing.assert_array_equal(x, before)
    assert Sampler(SamplingParams(temperature=0), 100, eog_ids=[7]).sample(x) == 7  # not banned by default


def test_bad_inputs():
    s = Sampler(SamplingParams(seed=0, repeat_penalty=1.1), 10)
    with pytest.raises(SamplingError, match="shape"):
        s.sample(np.zeros(11, np.float32), [])
    with pytest.raises(SamplingError, match="NaN"):
        s.sample(np.full(10, np.nan, np.float32), [])
    with pytest.raises(SamplingError, match="outside the vocabulary"):
        s.sample(np.zeros(10, np.float32), [10])
    with pytest.raises(SamplingError, match="-inf"):
        s.sample(np.full(10, -np.inf, np.float32), [])
    x = np.zeros(10, np.float32)
    x[4] = np.inf
    assert s.sample(x, []) == 4


# ---- candidate filters ---------------------------------------------------------------------------

FILTERS = [(40, 0.95, 0.05), (10, 1.0, 0.0), (0, 0.5, 0.0), (0, 1.0, 0.1), (5, 0.3, 0.2), (0, 0.0, 0.0),
           (1000, 0.9, 0.0), (3, 1.0, 1.0), (0, 0.99, 0.01)]


@pytest.mark.parametrize("top_k, top_p, min_p", FILTERS)
@pytest.mark.parametrize("seed, ties", [(0, False), (1, False), (2, True)])
def test_candidates_match_reference(top_k, top_p, min_p, seed, ties):
    x = logits(300, seed, ties=ties)
    got = filter_candidates(x, SamplingParams(top_k=top_k, top_p=top_p, min_p=min_p)).tolist()
    assert got == ref_candidates(x, top_k, top_p, min_p)


def test_top_p_over_a_wide_nucleus():
    """No top-k or min-p and a flat distribution: the sorted prefix must widen past its first guess."""
    x = logits(5000, 4, scale=0.5)
    got = filter_candidates(x, SamplingParams(top_k=0, top_p=0.9, min_p=0.0)).tolist()
    assert len(got) > 1024 and got == ref_candidates(x, 0, 0.9, 0.0)


def _llama_cpp_apply(samplers, x):
    """Run llama.cpp's samplers (as a chain) on x (n,); returns {id: logit} of the survivors.

    Only top-k/top-p/min-p: llama-cpp-python 0.3.36 declares `llama_sampler_init_penalties` with a stale
    signature, so the penalties are checked against `ref_penalties` and hand computations instead."""
    lc = pytest.importorskip("llama_cpp").llama_cpp
    chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
    for smpl in samplers(lc):
        lc.llama_sampler_chain_add(chain, smpl)
    data = (lc.llama_token_data * len(x))(*[lc.llama_token_data(i, float(v), 0.0) for i, v in enumerate(x)])
    cur = lc.llama_token_data_array(data=data, size=len(x), selected=-1, sorted=False)
    lc.llama_sampler_apply(chain, ctypes.byref(cur))
    out = {data[i].id: data[i].logit for i in range(cur.size)}
    lc.llama_sampler_free(chain)
    return out


@pytest.mark.parametrize("top_k, top_p, min_p", FILTERS)
def test_candidates_match_llama_cpp(top_k, top_p, min_p):
    x = logits(300, 5)
    want = _llama_cpp_apply(lambda lc: [lc.llama_sampler_init_top_k(top_k), lc.llama_sampler_init_top_p(top_p, 0),
                                        lc.llama_sampler_init_min_p(min_p, 0)], x)
    got = filter_candidates(x, SamplingParams(top_k=top_k, top_p=top_p, min_p=min_p))
    assert sorted(got.tolist()) == sorted(want)


# ---- drawing -------------------------------------------------------------------------------------

def test_seeded_runs_reproduce_and_seeds_differ():
    x = logits(500, 8, scale=1.0)
    p = dict(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0)

    def run(seed):
        s = Sampler(SamplingParams(seed=seed, **p), 500)
        return [s.sample(x, []) for _ in range(50)]

    assert run(1) == run(1)
    assert run(1) != run(2)
    s = Sampler(SamplingParams(**p), 500)  # seed drawn from os.urandom, kept for replay
    first = [s.sample(x, []) for _ in range(50)]
    assert first == run(s.seed)


def test_frequencies_follow_filtered_tempered_distribution():
    x = logits(30, 9, scale=1.5)
    top_k, top_p, min_p, temp = 12, 0.9, 0.05, 0.7
    ids = ref_candidates(x, top_k, top_p, min_p)
    expected = ref_probs(x, ids, temp)  # (n_cand,)
    s = Sampler(SamplingParams(seed=1234, temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p), 30)
    n = 20000
    counts = np.bincount([s.sample(x, []) for _ in range(n)], minlength=30)
    assert counts.sum() == counts[ids].sum(), "drew a token outside the candidate set"
    chi2 = float((((counts[ids] - n * expected) ** 2) / (n * expected)).sum())
    df = len(ids) - 1
    assert len(ids) >= 4 and chi2 < df + 6 * math.sqrt(2 * df), (chi2, df)  # ~4 sigma above the mean


# ---- stop strings --------------------------------------------------------------------------------

def stream(stops, pieces):
    m = StopMatcher(stops)
    out, hit = [], False
    for piece in pieces:
        text, hit = m.feed(piece)
        out.append(text)
    return out, hit, m.flush()


def test_stop_across_piece_boundaries():
    assert stream(["</s>"], ["Hello <", "/", "s> world"]) == (["Hello ", "", ""], True, "")
    assert stream(["abc"], ["ab", "d"]) == (["", "abd"], False, "")
    assert stream(["aab"], list("aaab")) == (["", "", "a", ""], True, "")


def test_multiple_stops_earliest_wins():
    assert stream(["STOP", "END"], ["abc EN", "D more STOP"]) == (["abc ", ""], True, "")
    assert stream(["STOP", "END"], ["x END y STOP"]) == (["x "], True, "")
    assert stream(["abcd", "bc"], ["abc"]) == (["a"], True, "")


def test_stop_at_the_very_start_and_after_stopping():
    m = StopMatcher(["STOP"])
    assert m.feed("STOP and more") == ("", True)
    assert m.feed("anything") == ("", True)
    assert m.flush() == ""


def test_no_false_holds():
    assert stream(["xyz"], ["hello", " world"]) == (["hello", " world"], False, "")
    assert stream(["xyz"], ["abc x"]) == (["abc "], False, "x")  # flush gives back the held "x"
    assert stream([], ["a", "b"]) == (["a", "b"], False, "")


def test_stop_matcher_against_reference():
    rng = np.random.default_rng(10)
    for _ in range(300):
        text = "".join(rng.choice(list("abc"), int(rng.integers(0, 20))))
        stops = ["".join(rng.choice(list("abc"), int(rng.integers(1, 4)))) for _ in range(int(rng.integers(1, 3)))]
        cuts = sorted(rng.integers(0, len(text) + 1, int(rng.integers(0, 5))).tolist())
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        out, hit, rest = stream(stops, pieces)
        assert "".join(out) + rest == (text[: min(hits)] if hits else text) and hit == bool(hits)


# ---- speed (reported, not asserted) --------------------------------------------------------------

def test_sample_time_262k_vocab(capsys, record_property):
    n = 262144
    x = logits(n, 11, scale=3.0)
    history = np.random.default_rng(12).integers(0, n, 512).tolist()
    s = Sampler(SamplingParams(seed=0), n)
    s.sample(x, history)
    reps = 50
    t = time.perf_counter()
    for _ in range(reps):
        s.sample(x, history)
    ms = (time.perf_counter() - t) / reps * 1e3
    record_property("sample_ms_262k_defaults", ms)
    with capsys.disabled():
        print(f"\nsample(): {ms:.3f} ms per call, n_vocab=262144, default SamplingParams")
