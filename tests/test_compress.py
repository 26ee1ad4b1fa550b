"""`edgellm compress`: the importance-weighted quantizers, the type choice, low-rank corrections, the
GGUF writer, and a real model rewritten, loaded and run."""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from edgellm.loaders.gguf import GGUFFile
from edgellm.loaders.gguf_write import OutTensor, write_gguf
from edgellm.quant import compress as qc
from edgellm.quant.formats import dequantize, quantize
from edgellm.quant.ggml_types import GGMLType as T
from edgellm.quant.quantize import QUANTIZERS, quantize_rows

from conftest import model_file

# relative RMS error of standard normal rows, the quantizers' ceiling (llama.cpp's reference
# quantizers reach about these on the same data: Q4_0 0.087, Q8_0 0.0054)
CEILING = {T.Q2_K: 0.33, T.Q3_K: 0.19, T.Q4_0: 0.087, T.Q4_K: 0.085, T.Q5_0: 0.045, T.Q6_K: 0.021, T.Q8_0: 0.0055}


def _rel(a, b, imp=None):
    imp = np.ones(a.shape[1]) if imp is None else imp
    return float(np.sqrt((((a - b) ** 2) @ imp).sum() / ((a * a) @ imp).sum()))


@pytest.mark.parametrize("t", list(QUANTIZERS), ids=lambda t: t.name)
def test_quantizer_bytes_decode_to_a_close_fit(t):
    """The bytes decode through the reference dequantizers (tested against gguf-py) to values
    within the type's ceiling: a layout mistake would land far outside it."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((48, 1024)).astype(np.float32) * np.exp(rng.standard_normal((48, 1)), dtype=np.float32)
    w[5, 77] = 40.0  # an outlier
    raw = quantize_rows(w, t)
    assert raw.shape == (48, t.row_bytes(1024))
    back = dequantize(raw.reshape(-1), t).reshape(w.shape)
    assert _rel(w, back) < CEILING[t]
    assert abs(back[5, 77] - 40.0) < 40.0 * 0.2  # the outlier keeps its block's scale


@pytest.mark.parametrize("t", [T.Q4_0, T.Q8_0], ids=lambda t: t.name)
def test_quantizer_no_worse_than_ggml_reference(t):
    rng = np.random.default_rng(2)
    w = rng.standard_normal((64, 512)).astype(np.float32)
    ours = dequantize(quantize_rows(w, t).reshape(-1), t).reshape(w.shape)
    ref = dequantize(quantize(w.reshape(-1), t).reshape(-1), t).reshape(w.shape)
    assert _rel(w, ours) <= _rel(w, ref)


@pytest.mark.parametrize("t", [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_0], ids=lambda t: t.name)
def test_importance_lowers_the_weighted_error(t):
    """Columns with large activations are fitted more closely when the importances say so."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((64, 512)).astype(np.float32)
    imp = np.exp(2.0 * rng.standard_normal(512)).astype(np.float32)
    plain = dequantize(quantize_rows(w, t).reshape(-1), t).reshape(w.shape)
    weighted = dequantize(quantize_rows(w, t, imp).reshape(-1), t).reshape(w.shape)
    assert _rel(w, weighted, imp) < 0.97 * _rel(w, plain, imp)


def test_quantizer_rejects_bad_rows():
    with pytest.raises(ValueError, match="whole number"):
        quantize_rows(np.zeros((2, 100), np.float32), T.Q4_K)
    with pytest.raises(ValueError, match="no quantizer"):
        quantize_rows(np.zeros((2, 256), np.float32), T.Q5_K)


def _brute(opts, budget):
    best = None
    for pick in itertools.product(*[range(len(o)) for o in opts]):
        b = sum(o[j].nbytes for o, j in zip(opts, pick))
        e = sum(o[j].error for o, j in zip(opts, pick))
        if b <= budget and (best is None or e < best[0]):
            best = (e, pick)
    return best


def test_allocate_fits_the_budget_near_the_optimum():
    rng = np.random.default_rng(4)
    for _ in range(30):
        opts = []
        for _ in range(4):
            sizes = sorted(rng.choice(np.arange(10, 100), 4, replace=False))[::-1]
            errs = np.sort(rng.random(4))  # fewer bytes, more error; convex or not
            errs[0] = 0.0
            opts.append([qc.Option(T.Q4_K, int(s), float(e)) for s, e in zip(sizes, errs)])
        lo, hi = sum(o[-1].nbytes for o in opts), sum(o[0].nbytes for o in opts)
        budget = int(rng.integers(lo, hi + 1))
        pick = qc.allocate(opts, budget)
        used = sum(o[j].nbytes for o, j in zip(opts, pick))
        err = sum(o[j].error for o, j in zip(opts, pick))
        assert used <= budget
        opt = _brute(opts, budget)[0]
        assert err <= opt + 1.0  # greedy hull steps: never worse than one option's full error off
    with pytest.raises(ValueError, match="smallest type mix"):
        qc.allocate(opts, lo - 1)
    assert qc.allocate(opts, hi) == [0, 0, 0, 0]  # what fits stays as it was


def test_allocate_matches_brute_force_on_convex_options():
    opts = [[qc.Option(T.Q8_0, 100, 0.0), qc.Option(T.Q6_K, 80, 0.1), qc.Option(T.Q4_K, 60, 0.4)],
            [qc.Option(T.Q8_0, 50, 0.0), qc.Option(T.Q6_K, 40, 0.02), qc.Option(T.Q4_K, 30, 0.3)]]
    for budget in range(90, 151, 5):
        pick = qc.allocate(opts, budget)
        assert abs(sum(o[j].error for o, j in zip(opts, pick)) - _brute(opts, budget)[0]) < 1e-12


def test_low_rank_recovers_the_weighted_error_directions():
    rng = np.random.default_rng(5)
    n, k, r = 300, 256, 8
    w = rng.standard_normal((n, k)).astype(np.float32)
    planted = (rng.standard_normal((n, r)) @ rng.standard_normal((r, k))).astype(np.float32)
    noise = 0.01 * rng.standard_normal((n, k)).astype(np.float32)
    w_hat = w - planted - noise
    imp = np.exp(rng.standard_normal(k)).astype(np.float32)
    a, b = qc.low_rank(w, w_hat, imp, r)
    assert a.shape == (n, r) and b.shape == (r, k)
    before, after = _rel(w, w_hat, imp), _rel(w, w_hat + a @ b, imp)
    assert after < 0.02 * before
    # rank r of a full-rank error: the scaled error's best rank-r approximation (Eckart-Young)
    e = (w - w_hat + 0.3 * rng.standard_normal((n, k)).astype(np.float32))
    s = np.sqrt(imp)
    a, b = qc.low_rank(w, w - e, imp, r)
    sv = np.linalg.svd(e * s, compute_uv=False)
    got = np.linalg.norm((e - a @ b) * s)
    assert got <= np.sqrt((sv[r:] ** 2).sum()) * 1.001


def test_writer_round_trips_a_file(tmp_path):
    src = GGUFFile(model_file("gemma3-270m"))
    out = tmp_path / "copy.gguf"
    names = list(src.tensors)[:6]
    ts = [OutTensor(n, src.tensors[n].shape, src.tensors[n].type, lambda n=n: src.raw(n)) for n in names]
    write_gguf(out, src.metadata, src.metadata_types, ts)
    with GGUFFile(out) as g:
        assert list(g.tensors) == names
        for n in names:
            assert g.tensors[n].shape == src.tensors[n].shape and np.array_equal(g.raw(n), src.raw(n))
        assert set(g.metadata) == set(src.metadata)
        for k, v in src.metadata.items():
            assert g.metadata_types[k] == src.metadata_types[k]
            if isinstance(v, np.ndarray):
                assert np.array_equal(g.metadata[k], v)
            elif isinstance(v, list):
                assert [bytes(x) if not isinstance(x, str) else x for x in g.metadata[k]] == \
                       [bytes(x) if not isinstance(x, str) else x for x in v]
            else:
                assert g.metadata[k] == v
    src.close()


def test_writer_leaves_nothing_behind_on_error(tmp_path):
    out = tmp_path / "x.gguf"
    out.write_bytes(b"keep me")

    def boom():
        raise RuntimeError("disk on fire")
    ts = [OutTensor("a", (32, 2), T.F32, lambda: np.zeros(64, np.float32)), OutTensor("b", (32,), T.F32, boom)]
    with pytest.raises(RuntimeError):
        write_gguf(out, {"general.architecture": "x"}, {"general.architecture": 8}, ts)
    assert out.read_bytes() == b"keep me"
    assert os.listdir(tmp_path) == ["x.gguf"]


# ---- a real model, end to end -------------------------------------------------------------------

def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "edgellm.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=1800)


@pytest.fixture(scope="module")
def compressed_gemma(tmp_path_factory):
    """gemma3-270m at 65% of its bytes, rank-32 corrections offered (a short calibration)."""
    src = model_file("gemma3-270m")
    out = tmp_path_factory.mktemp("compress") / "gemma-small.gguf"
    size = int(src.stat().st_size * 0.65)
    r = _cli("compress", str(src), "-o", str(out), "--size", str(size), "--rank", "32", "--calib-tokens", "256",
             "--json")
    assert r.returncode == 0, r.stderr
    return src, out, json.loads(r.stdout.strip().splitlines()[-1])


def test_compressed_model_is_smaller_and_loads(compressed_gemma):
    src, out, info = compressed_gemma
    assert out.stat().st_size <= int(src.stat().st_size * 0.65)
    assert info["bytes"] == out.stat().st_size and info["fraction"] > 0.6  # the budget is used
    with GGUFFile(out) as g, GGUFFile(src) as f:
        lr = [n for n in g.tensors if n.endswith((".lr_a", ".lr_b"))]
        assert len(lr) == 2 * info["corrected"]
        assert g.metadata["edgellm.compress.rank"] == 32
        assert [n for n in g.tensors if not n.endswith((".lr_a", ".lr_b"))] == list(f.tensors)
        lowered = [n for n, t in g.tensors.items() if n in f.tensors and t.type != f.tensors[n].type]
        assert len(lowered) >= 10
        for n in lowered:  # lowered means fewer bits
            assert g.tensors[n].nbytes < f.tensors[n].nbytes


@pytest.fixture(scope="module")
def corrected_gemma(tmp_path_factory):
    """gemma3-270m with rank-32 corrections forced on layer 3's lowered matrices (through the
    library: the choice itself rarely buys them for this model)."""
    from edgellm.loaders.gguf import ValueType
    from edgellm.runtime import compress as cp

    src = model_file("gemma3-270m")
    out = tmp_path_factory.mktemp("compress") / "gemma-lr.gguf"
    extra = {"edgellm.compress.rank": (32, ValueType.UINT32)}
    with GGUFFile(src) as f:
        p = cp.plan(f, {}, int(src.stat().st_size * 0.6), 32, extra)
        p.lr = [n for n, c in zip(p.names, p.choice) if c > 0 and n.startswith("blk.3.")]
        assert len(p.lr) >= 3
        cp.write(f, p, {}, out, extra)
    return out, p.lr


def test_low_rank_correction_is_applied(corrected_gemma):
    """Model.linear adds a (b x): compared with the product of the dequantized tensors."""
    from edgellm.runtime import Engine, RuntimeConfig

    out, lr = corrected_gemma
    eng = Engine(out, RuntimeConfig(n_ctx=64, backend="numpy"))
    try:
        f = eng.file
        for name in lr:
            a_name, b_name = name.replace(".weight", ".lr_a"), name.replace(".weight", ".lr_b")
            deq = {n: dequantize(f.raw(n), f.info(n).type).reshape(f.info(n).n_rows, f.info(n).shape[0])
                   for n in (name, a_name, b_name)}
            x = np.random.default_rng(6).standard_normal((3, deq[name].shape[1])).astype(np.float32)
            want = x @ (deq[name].astype(np.float64) + deq[a_name] @ deq[b_name]).T
            got = eng.model.linear(x, name)
            assert np.abs(got - want).max() < 1e-3 * np.abs(want).max()
            plain = x @ deq[name].T
            assert np.abs(plain - want).max() > 1e-2 * np.abs(want).max()  # the correction is not negligible
    finally:
        eng.close()


def test_low_rank_correction_lowers_the_error_against_the_source(corrected_gemma):
    out, lr = corrected_gemma
    with GGUFFile(out) as g, GGUFFile(model_file("gemma3-270m")) as f:
        for name in lr:
            t = f.info(name)
            w = dequantize(f.raw(name), t.type).reshape(t.n_rows, -1)
            gt = g.info(name)
            w_hat = dequantize(g.raw(name), gt.type).reshape(t.n_rows, -1)
            a, b = (dequantize(g.raw(name.replace(".weight", x)), g.info(name.replace(".weight", x)).type)
                    .reshape(g.info(name.replace(".weight", x)).n_rows, -1) for x in (".lr_a", ".lr_b"))
            assert _rel(w, w_hat + a @ b) < 0.97 * _rel(w, w_hat)


def test_compressed_model_generates_and_keeps_its_perplexity(compressed_gemma, tmp_path):
    src, out, _ = compressed_gemma
    text = tmp_path / "t.txt"
    text.write_text(open("/usr/share/common-licenses/GPL-3").read()[:6000])
    ppl = {}
    for p in (src, out):
        r = _cli("perplexity", str(p), str(text), "--json")
        assert r.returncode == 0, r.stderr
        ppl[p] = json.loads(r.stdout)["ppl"]
    assert ppl[src] < ppl[out] < ppl[src] * 1.15  # (65% of the bytes: +8% measured)
    r = _cli("run", str(out), "The capital of France is", "-n", "8", "--temp", "0")
    assert r.returncode == 0 and r.stdout.strip(), r.stderr


def test_compress_bad_input(tmp_path, corrected_gemma):
    src = model_file("gemma3-270m")
    r = _cli("compress", str(src), "-o", str(tmp_path / "o.gguf"), "--size", "10M")
    assert r.returncode == 1 and "below what any type mix reaches" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o.gguf").exists()
    r = _cli("compress", str(src), "-o", str(tmp_path / "nodir" / "o.gguf"), "--size", "200M")
    assert r.returncode == 1 and "does not exist" in r.stderr
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if not os.access(ro, os.W_OK):  # (root may write anyway)
        r = _cli("compress", str(src), "-o", str(ro / "o.gguf"), "--size", "200M")
        assert r.returncode == 1 and "permission denied" in r.stderr
    bad = tmp_path / "cut.txt"
    bad.write_bytes("calibration text with a cut ending é".encode()[:-1])
    r = _cli("compress", str(src), "-o", str(tmp_path / "o.gguf"), "--size", "200M", "--calib", str(bad))
    assert r.returncode == 1 and "not UTF-8" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = _cli("compress", str(src), "-o", str(tmp_path / "o.gguf"))
    assert r.returncode == 1 and "exactly one of --size and --bpw" in r.stderr
    r = _cli("compress", str(src), "-o", str(tmp_path / "o.gguf"), "--size", "200M", "--calib-tokens", "100")
    assert r.returncode == 1 and "--calib-tokens 100 is out of range 256" in r.stderr
    r = _cli("compress", str(src), "-o", str(tmp_path / "o.gguf"), "--size", "2G")
    assert r.returncode == 1 and "nothing to compress" in r.stderr
    out, _ = corrected_gemma
    r = _cli("compress", str(out), "-o", str(tmp_path / "o.gguf"), "--size", "100M")
    assert r.returncode == 1 and "already compressed" in r.stderr
    assert sorted(os.listdir(tmp_path)) == ["cut.txt", "ro"]
    r = _cli("run", str(out), "Hello", "-n", "2", "--sparsity", "0.3")  # the sparse FFN would skip them
    assert r.returncode == 1 and "low-rank corrections" in r.stderr and "Traceback" not in r.stderr
