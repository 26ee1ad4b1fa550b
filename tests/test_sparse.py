"""Activation-sparse FFN: the neuron-major down layout, the sparse kernel against the numpy
reference (random and real tensors), batch invariance, calibration, its cache, and the engine."""
from __future__ import annotations

import json

import numpy as np
import pytest

from edgellm.kernels_cpu import sparse
from edgellm.kernels_cpu.ffn import SparseFFN
from edgellm.kernels_cpu.qmatmul import Weight
from edgellm.quant.formats import dequantize, quantize
from edgellm.quant.ggml_types import GGMLType

from conftest import model_file


def _random_k(rng, t: GGMLType, n: int, k: int) -> np.ndarray:
    """Random valid blocks of a K-quant (finite, modest scales): uint8 (n, row bytes)."""
    nb = k // 256
    raw = rng.integers(0, 256, (n * nb, t.type_size), dtype=np.uint8)
    scale = rng.uniform(1e-3, 2e-2, (n * nb, 1)).astype(np.float16).view(np.uint8)
    if t == GGMLType.Q4_K:
        raw[:, 0:2] = scale
        raw[:, 2:4] = (rng.uniform(1e-4, 2e-3, (n * nb, 1)).astype(np.float16)).view(np.uint8)
    else:
        raw[:, 208:210] = scale
    return raw.reshape(n, nb * t.type_size)


def _q8(rng, n: int, k: int) -> np.ndarray:
    return quantize(rng.standard_normal(n * k).astype(np.float32) * 0.05, GGMLType.Q8_0).reshape(n, -1)


def _deq(raw, t, k):
    return dequantize(np.ascontiguousarray(raw).reshape(-1), t).reshape(-1, k)


@pytest.mark.parametrize("t", [GGMLType.Q4_K, GGMLType.Q6_K])
def test_down_layout_holds_the_same_values(t):
    rng = np.random.default_rng(1)
    e, f = 96, 512
    raw = _random_k(rng, t, e, f)
    dt = sparse.down_t(raw, t, f)
    assert np.array_equal(dt.dequantize(), _deq(raw, t, f))


@pytest.mark.parametrize("t", [GGMLType.Q4_K, GGMLType.Q6_K])
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_sparse_ffn_matches_reference_and_is_batch_invariant(t, act):
    rng = np.random.default_rng(2)
    k, f, e = 256, 512, 96
    gate, up = _q8(rng, f, k), _q8(rng, f, k)
    down = _random_k(rng, t, e, f)
    ffn = SparseFFN(Weight(gate, GGMLType.Q8_0, k), Weight(up, GGMLType.Q8_0, k), sparse.down_t(down, t, f), act)
    x = rng.standard_normal((11, k)).astype(np.float32)
    wg, wu, wd = _deq(gate, GGMLType.Q8_0, k), _deq(up, GGMLType.Q8_0, k), _deq(down, t, f)
    for thr in (0.0, 0.05, 0.2):
        y, n = ffn(x, thr)
        ref, mask = sparse.ffn_ref(x, wg, wu, wd, sparse.ACTS[act], thr)
        assert abs(n - mask.sum()) <= 0.002 * mask.size  # neurons at the threshold may fall either way
        assert 0 < n < mask.size if thr else n == mask.size
        assert np.abs(y - ref).max() <= 2e-3 * np.abs(ref).max()
        one = np.concatenate([ffn(x[i:i + 1], thr)[0] for i in range(x.shape[0])])
        assert np.array_equal(one, y)  # a token's bits do not depend on its batch
    y, n = ffn(x, 1e30)
    assert n == 0 and not y.any()


def test_sparse_ffn_refuses_mismatched_shapes():
    rng = np.random.default_rng(3)
    gate = Weight(_q8(rng, 256, 256), GGMLType.Q8_0, 256)
    dt = sparse.down_t(_random_k(rng, GGMLType.Q4_K, 64, 512), GGMLType.Q4_K, 512)
    with pytest.raises(ValueError, match="do not match"):
        SparseFFN(gate, gate, dt, "silu")
    with pytest.raises(ValueError, match="activation"):
        SparseFFN(gate, gate, dt, "relu")
    with pytest.raises(ValueError, match="Q4_K and Q6_K"):
        sparse.down_t(_q8(rng, 64, 512), GGMLType.Q8_0, 512)


@pytest.fixture(scope="module")
def gemma():
    from edgellm.loaders.gguf import GGUFFile

    with GGUFFile(model_file("gemma3-270m")) as f:
        yield f


def test_real_layers_against_the_reference(gemma):
    f = gemma
    rng = np.random.default_rng(4)
    for i in (0, 2):  # one Q6_K down and one Q4_K down
        b = f"blk.{i}."
        ws = {n: (f.rows(b + n), f.info(b + n)) for n in ("ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")}
        (g, gi), (u, ui), (d, di) = ws["ffn_gate.weight"], ws["ffn_up.weight"], ws["ffn_down.weight"]
        dt = sparse.down_t(d, di.type, di.shape[0])
        wd = _deq(d, di.type, di.shape[0])
        assert np.array_equal(dt.dequantize(), wd)
        ffn = SparseFFN(Weight(g, gi.type, gi.shape[0]), Weight(u, ui.type, ui.shape[0]), dt, "gelu_tanh")
        x = rng.standard_normal((3, gi.shape[0])).astype(np.float32)
        y, n = ffn(x, 0.05)
        ref, mask = sparse.ffn_ref(x, _deq(g, gi.type, gi.shape[0]), _deq(u, ui.type, ui.shape[0]), wd,
                                   sparse.GELU_TANH, 0.05)
        assert abs(n - mask.sum()) <= 0.002 * mask.size
        assert np.abs(y - ref).max() <= 2e-3 * np.abs(ref).max()


# ---- calibration, allocation, cache, engine ------------------------------------------------------

CALIB = ("The licensor grants you a worldwide, royalty-free, non-exclusive license to reproduce and "
         "distribute the work. ") * 40 + "\n".join(f"def f{i}(x):\n    return x * {i} + {i * i}\n" for i in range(60))


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    import os

    from edgellm.runtime.config import RuntimeConfig
    from edgellm.runtime.engine import Engine

    path = model_file("gemma3-270m")  # from the usual cache; calibrations go to a fresh one
    home = tmp_path_factory.mktemp("home")
    old = os.environ.get("EDGELLM_HOME")
    os.environ["EDGELLM_HOME"] = str(home)
    calib = home / "calib.txt"
    calib.write_text(CALIB)
    try:
        eng = Engine(path, RuntimeConfig(threads=2, n_ctx=512, sparsity=0.1, sparsity_calib=str(calib)))
        yield eng, calib
        eng.close()
    finally:
        if old is None:
            os.environ.pop("EDGELLM_HOME")
        else:
            os.environ["EDGELLM_HOME"] = old


def test_calibration_is_deterministic_cached_and_checked(engine):
    from edgellm.loaders.store import file_sha256
    from edgellm.runtime import sparsity as sp

    eng, calib = engine
    text = calib.read_text()
    sha = file_sha256(eng.path)
    cached = sp.load_cached(sha, sp.hashlib.sha256(text.encode()).hexdigest())
    assert cached is not None  # written by the engine's first use
    saved, eng.model.sparse = eng.model.sparse, None
    try:
        again = sp.calibrate(eng, text)
    finally:
        eng.model.sparse = saved
    assert again.thr == cached.thr and again.err == cached.err
    # thresholds rise with the level, errors too (more neurons skipped, larger error)
    for thr, err in zip(again.thr, again.err):
        assert thr == sorted(thr) and err[1] <= err[-1]
    # another text is stale; a corrupt file is not used
    assert sp.load_cached(sha, "0" * 64) is None
    p = sp.cache_path(sha)
    d = json.loads(p.read_text())
    d["thr"][0][3] *= 0.5
    p.write_text(json.dumps(d))
    assert sp.load_cached(sha, sp.hashlib.sha256(text.encode()).hexdigest()) is None
    p.write_text("{not json")
    assert sp.load_cached(sha, sp.hashlib.sha256(text.encode()).hexdigest()) is None
    sp.save(cached)


def test_allocation_reaches_the_target_cheapest_first(engine):
    from edgellm.runtime import sparsity as sp

    eng, calib = engine
    cal = sp.calibration(eng, str(calib))
    prev = None
    for target in (0.03, 0.06, 0.1):
        levels = cal.allocate(target)
        assert cal.skipped(levels) >= target
        if prev is not None:  # a larger target never lowers a layer
            assert all((b or 0) >= (a or 0) for a, b in zip(prev, levels))
        prev = levels
    assert max(lv or 0 for lv in cal.allocate(0.03)) <= sp.CAPS[0]  # spread before deepening
    assert cal.allocate(0.0) == [None] * len(cal.layers)
    with pytest.raises(sp.SparsityError, match="beyond"):
        cal.allocate(0.5)  # gemma's head alone is 63% of its reads


def test_sparse_scoring_is_what_sparse_decode_computes(engine):
    """perplexity --sparsity scores a batch of tokens with their own masks: the logits equal
    those of sparse decode, token by token."""
    from conftest import decode_steps

    eng, _ = engine
    sp = eng.model.sparse
    assert sp is not None and any(lv for lv in sp.levels)
    ids = eng.tokenizer.encode("The quick brown fox jumps over the lazy dog because it")
    prompt, rest = ids[:1], ids[1:13]
    steps = decode_steps(eng, prompt, rest + [0])  # (13, V): after the prompt, then after each token
    sp.all_tokens = True
    try:
        eng.reset()
        batch = eng.prefill(prompt + rest, all_logits=True)
    finally:
        sp.all_tokens = False
        eng.reset()
    assert np.array_equal(batch, steps[:batch.shape[0]])
    before = list(sp.pairs)
    eng.decode_one(ids[0])
    computed, possible = sp.pairs[0] - before[0], sp.pairs[1] - before[1]
    assert 0 < computed < possible  # some neurons skipped, some computed


def test_sparsity_zero_is_dense_and_bad_settings_are_refused():
    from edgellm.runtime.config import ConfigError, RuntimeConfig

    assert RuntimeConfig().sparsity == 0.0
    for bad in (-0.1, 0.95, "x", True):
        with pytest.raises(ConfigError, match="sparsity"):
            RuntimeConfig(sparsity=bad)
    with pytest.raises(ConfigError, match="memory budget"):
        RuntimeConfig(sparsity=0.2, memory_budget="400M")
