"""offload/: the memory-budget planner, the streaming weight store, the GGUF-direct kernels it
multiplies with, and a real run under a hard memory limit (tests/memory_limit.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from edgellm.kernels_cpu import qmatmul as G
from edgellm.loaders.gguf import GGUFFile
from edgellm.offload import planner as P
from edgellm.offload.stream import StreamingWeights

from conftest import model_file
from memory_limit import MemoryGroup

MB = 1 << 20


# ---- sizes and the planner (pure functions of sizes) --------------------------------------------

def test_parse_size():
    assert P.parse_size("400M") == 400 * MB
    assert P.parse_size("1.5G") == int(1.5 * 1024 * MB)
    assert P.parse_size("512k") == 512 * 1024
    assert P.parse_size("123") == 123
    assert P.parse_size("2GiB") == 2048 * MB
    with pytest.raises(ValueError, match="400X"):
        P.parse_size("400X")


def sizes(n_layer=24, layer=10 * MB, head_chunks=4, head_chunk=8 * MB):
    units, off = [], 4096
    for i in range(n_layer):
        units.append(P.Unit(f"blk.{i}", off, layer, (f"blk.{i}.ffn_up.weight",)))
        off += layer
    for c in range(head_chunks):
        units.append(P.Unit(f"output.weight[{c}]", off, head_chunk, ("output.weight",), (c * 160, c * 160 + 160)))
        off += head_chunk
    return P.ModelSizes(tuple(units), (), 300_000, "token_embd.weight", n_embd=896, n_ff=4864, n_vocab=151936,
                        kv_bytes_per_token=24 * 2 * 64 * 2 * 2)


def test_plan_refuses_below_the_minimum_and_names_it():
    s = sizes()
    minimum = P.BASELINE + s.kv_bytes_per_token * 512 + s.small_bytes + P.SLACK + P.activation_bytes(s, P.MIN_BATCH) \
        + max(u.span for u in s.units)
    with pytest.raises(P.BudgetError) as e:
        P.plan(minimum - 1, s, n_ctx=512, n_batch=512, baseline=P.BASELINE)
    assert f"the minimum is {P.fmt(minimum)}" in str(e.value)
    assert "raise --memory-budget" in str(e.value)
    p = P.plan(minimum, s, n_ctx=512, n_batch=512, baseline=P.BASELINE)  # exactly the minimum runs: window 0
    assert p.window == 0 and p.total <= minimum


def test_refusal_mentions_ctx_when_the_kv_cache_is_large():
    with pytest.raises(P.BudgetError, match="lower --ctx"):
        P.plan(300 * MB, sizes(), n_ctx=32768, n_batch=512)


def test_parallel_sequences_each_get_a_kv_cache_in_the_plan():
    """n_seq caches of n_ctx come out of the budget: less room for resident weights, and a budget
    that fits one sequence's cache but not four of them is refused, naming the caches."""
    s = sizes()
    one = P.plan(400 * MB, s, n_ctx=2048, n_batch=512, baseline=P.BASELINE)
    four = P.plan(400 * MB, s, n_ctx=2048, n_batch=512, baseline=P.BASELINE, n_seq=4)
    assert one.parts["KV cache"] * 4 == four.parts["KV caches (4 sequences)"] == s.kv_bytes_per_token * 2048 * 4
    assert four.total <= four.budget and len(four.resident) < len(one.resident)
    kv4 = 4 * s.kv_bytes_per_token * 2048
    tight = P.BASELINE + kv4 + s.small_bytes + P.SLACK + P.activation_bytes(s, P.MIN_BATCH) + max(u.span for u in s.units) - 1
    P.plan(tight, s, n_ctx=2048, n_batch=512, baseline=P.BASELINE)  # one cache fits
    with pytest.raises(P.BudgetError, match=r"KV caches \(4 sequences\)"):
        P.plan(tight, s, n_ctx=2048, n_batch=512, baseline=P.BASELINE, n_seq=4)


@pytest.mark.parametrize("budget_mb", [260, 300, 350, 400, 600, 800])
def test_plan_fits_the_budget(budget_mb):
    s = sizes()
    p = P.plan(budget_mb * MB, s, n_ctx=512, n_batch=512, baseline=P.BASELINE)
    assert p.total <= p.budget
    names = [u.name for u in s.units]
    assert sorted(p.resident + p.streamed) == sorted(names)
    assert list(p.streamed) == [n for n in names if n in p.streamed]  # in order of use
    if p.streamed:
        assert p.slot_bytes >= max(u.span for u in s.units if u.name in p.streamed)
        assert p.parts[next(k for k in p.parts if k.startswith("streaming buffers"))] == (p.window + 1) * p.slot_bytes
        assert p.stream_bytes == sum(u.span for u in s.units if u.name in p.streamed)
    assert P.MIN_BATCH <= p.n_batch <= 512


def test_more_budget_never_reads_more():
    s = sizes()
    reads = [P.plan(b * MB, s, n_ctx=512, n_batch=512).stream_bytes for b in range(260, 900, 20)]
    assert reads == sorted(reads, reverse=True)
    assert reads[-1] == 0  # ~870 MB holds everything: nothing streams


def test_resident_units_are_spread_over_the_pass():
    s = sizes(n_layer=24)
    p = P.plan(320 * MB, s, n_ctx=512, n_batch=64)
    layers = sorted(int(n.split(".")[1]) for n in p.resident if n.startswith("blk."))
    assert len(layers) >= 3 and layers[-1] - layers[0] >= 12  # not clustered at one end


def test_model_sizes_of_a_real_file():
    path = model_file("qwen2.5-coder-0.5b")
    from edgellm.runtime.llama import Llama
    with GGUFFile(path) as f:
        cfg = Llama.config(f)
        s = P.model_sizes(f, cfg, G.tile_rows)
        layers = [u for u in s.units if u.rows is None]
        head = [u for u in s.units if u.rows is not None]
        assert len(layers) == cfg.n_layer
        for u in layers:  # a layer is exactly its tensors, back to back
            ts = sorted((f.info(n) for n in u.tensors), key=lambda t: t.offset)
            assert u.offset == ts[0].offset and u.offset + u.nbytes == ts[-1].offset + ts[-1].nbytes
            assert all(t.name.startswith(u.name + ".") for t in ts)
        h = f.info("output.weight")
        assert head[0].rows[0] == 0 and head[-1].rows[1] == h.n_rows
        assert all(a.rows[1] == b.rows[0] for a, b in zip(head, head[1:]))
        assert all(u.rows[0] % G.tile_rows(h.shape[0]) == 0 for u in head)
        assert max(u.nbytes for u in head) <= max(u.nbytes for u in layers)


# ---- the streaming store --------------------------------------------------------------------------

def test_streaming_store_hands_out_the_file_bytes():
    """Every matrix the store gives the kernels equals the mmap store's bytes, over two passes
    (the ring wraps and reuses its buffers), for a tied-head model (gemma3: token_embd is the head)."""
    path = model_file("gemma3-270m")
    from edgellm.runtime.gemma3 import Gemma3
    with GGUFFile(path) as f:
        cfg = Gemma3.config(f)
        s = P.model_sizes(f, cfg, G.tile_rows)
        seen: list[np.ndarray] = []  # the rows each product was computed from, in call order

        def make_linear(rows, t, k):
            def fn(x):
                seen.append(np.array(rows))
                return np.zeros((x.shape[0], rows.shape[0]), np.float32)
            return fn

        p = P.plan(P.BASELINE + 60 * MB, s, n_ctx=256, n_batch=16, baseline=P.BASELINE)
        assert p.streamed and p.resident
        w = StreamingWeights(f, p, s.units, make_linear, queue_depth=2, chunk_bytes=1 << 20)
        try:
            w.load_all()
            seen.clear()  # the warm-up's products
            mats = [n for n in f.tensors if n.startswith("blk.") and len(f.info(n).shape) == 2]
            for _ in range(2):
                for i in range(cfg.n_layer):
                    for n in [m for m in mats if m.startswith(f"blk.{i}.")]:
                        w.linear(n)(np.zeros((1, f.info(n).shape[0]), np.float32))
                        assert np.array_equal(seen[-1], f.rows(n)), n
                seen.clear()
                out = w.linear("token_embd.weight")(np.zeros((1, cfg.n_embd), np.float32))
                assert out.shape == (1, cfg.n_vocab)
                assert np.array_equal(np.concatenate(seen), f.rows("token_embd.weight"))
            for n in f.tensors:
                if len(f.info(n).shape) == 1:
                    assert np.array_equal(w.vector(n), f.array(n).astype(np.float32)), n
            table, _ = w.table("token_embd.weight")
            ids = np.array([0, 5, cfg.n_vocab - 1])
            assert np.array_equal(table[ids], f.rows("token_embd.weight")[ids])
            streamed = sum(u.nbytes for u in s.units if u.name in p.streamed)
            assert w.telemetry["bytes_read"] >= 2 * streamed
        finally:
            w.close()


def _mapped_kib(path) -> int:
    """Resident KiB of this process's mappings of the file at path (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as fh:
        for line in fh:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5:  # a mapping's first line
                inside = line.rstrip().endswith(str(path))
            elif inside and head[0] == "Rss:":
                total += int(head[1])
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_resident_store_reads_an_untied_table_a_row_at_a_time():
    """qwen's token_embd is not its head: the resident store's lookups read rows (the file's bytes)
    and map no pages, where indexing the mapping maps each row's page (and, with the page cache
    warm, ~64 KiB around it)."""
    from edgellm.runtime.weights import Weights

    path = model_file("qwen2.5-coder-0.5b").resolve()
    ids = np.random.default_rng(0).integers(0, 151_000, 512)
    with GGUFFile(path) as f:
        table, t = Weights(f, lambda rows, t, k: None).table("token_embd.weight")
        before = _mapped_kib(path)
        got = table[ids]
        assert _mapped_kib(path) - before < 256
        assert t == f.info("token_embd.weight").type
        assert np.array_equal(got, f.rows("token_embd.weight")[ids])
        assert _mapped_kib(path) - before > 1024  # (the mapping's way: a page or more per row, for contrast)
    other = os.open(__file__, os.O_RDONLY)  # (takes the closed descriptor's number, as the next open does)
    try:
        with pytest.raises(OSError):  # closed with the file: no read through that reused number
            table[ids[:1]]
    finally:
        os.close(other)


def test_a_budget_below_the_minimum_is_refused_with_the_minimum():
    from edgellm.runtime import Engine, RuntimeConfig
    with pytest.raises(P.BudgetError, match=r"the minimum is [\d,.]+ MB"):
        Engine(model_file("gemma3-270m"), RuntimeConfig(n_ctx=256, memory_budget="50M"))


def test_memory_budget_setting_is_validated():
    from edgellm.runtime.config import ConfigError, RuntimeConfig
    assert RuntimeConfig(memory_budget="1.5G").memory_budget == int(1.5 * 1024 * MB)
    for bad in ("lots", -5, 0, 1.5):
        with pytest.raises(ConfigError, match="memory_budget"):
            RuntimeConfig(memory_budget=bad)


def test_streams_by_itself_when_the_model_does_not_fit(monkeypatch, capsys):
    from edgellm import offload
    from edgellm.runtime import Engine, RuntimeConfig
    monkeypatch.setattr(offload, "memory_limit", lambda: 330 * MB)
    monkeypatch.setattr(offload, "measure_baseline", lambda: P.BASELINE)  # not this test process' other models
    eng = Engine(model_file("gemma3-270m"), RuntimeConfig(n_ctx=256, threads=2))
    try:
        assert eng.plan is not None and eng.plan.streamed
        assert "streaming weights from disk" in capsys.readouterr().err
        logits = eng.prefill(eng.tokenizer.encode("Hello"))
        assert np.isfinite(logits).all() and eng.stats.bytes_read > 0
    finally:
        eng.close()


# ---- a real run under a hard memory limit ----------------------------------------------------------

def _run_json(args, group=None):
    cmd = [sys.executable, "-c", "from edgellm.cli import main; main()", "run", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=150, preexec_fn=group.enter if group else None)


def test_greedy_tokens_under_a_hard_limit_equal_the_unbudgeted_run():
    """qwen2.5-coder-0.5b (491 MB file) under a hard 300 MB limit (a memory cgroup) with
    --memory-budget 300M: not killed, and its greedy tokens equal the unbudgeted run's with the
    same (GGUF-direct) kernels, bit for bit by construction, and (checked here, not guaranteed)
    the default backend's."""
    path = str(model_file("qwen2.5-coder-0.5b"))
    common = [path, "def quicksort(arr):\n    ", "-n", "16", "--temp", "0", "--ctx", "512", "--json", "-t", "2"]
    with MemoryGroup(300 * MB) as g:
        limited = _run_json(common + ["--memory-budget", "300M"], g)
        assert not g.oom_killed and limited.returncode == 0, limited.stderr[-2000:]
        assert g.peak_bytes <= 300 * MB
    free = _run_json(common)
    assert free.returncode == 0, free.stderr[-2000:]
    a, b = json.loads(limited.stdout), json.loads(free.stdout)
    assert a["ids"] == b["ids"]
    assert len(a["ids"]) == 16
    assert a["bytes_read"] > 16 * 200 * MB and a["io_wait_s"] >= 0 and a["compute_s"] > 0
    assert b["bytes_read"] == 0


def test_without_a_ctx_the_context_shrinks_to_fit_the_budget():
    """qwen2.5-coder-1.5b at 300 MB (with the planner's fixed process baseline): 4096 tokens do not fit (the planner refuses them), the longest
    multiple of 256 that does is chosen; a budget that fits 4096 keeps it; one that fits not even
    256 tokens is refused, naming the minimum."""
    from edgellm import offload
    from edgellm.runtime.config import ModelConfig

    f = GGUFFile(model_file("qwen2.5-coder-1.5b"))
    try:
        cfg = ModelConfig.read(f)
        s = P.model_sizes(f, cfg, G.tile_rows)
        base = P.BASELINE  # (a process that loaded other models measures more)
        budget = 300 * MB
        with pytest.raises(P.BudgetError):
            P.plan(budget, s, n_ctx=4096, n_batch=512, baseline=base)
        n = offload.fit_context(f, cfg, 4096, 512, 2, budget, row_align=G.tile_rows, baseline=base)
        assert 256 <= n < 4096 and n % 256 == 0
        P.plan(budget, s, n_ctx=n, n_batch=512, baseline=base)  # fits
        with pytest.raises(P.BudgetError):
            P.plan(budget, s, n_ctx=n + 256, n_batch=512, baseline=base)  # the next step up does not
        assert offload.fit_context(f, cfg, 4096, 512, 2, 2000 * MB, row_align=G.tile_rows, baseline=base) == 4096
        with pytest.raises(P.BudgetError, match="the minimum is"):
            offload.fit_context(f, cfg, 4096, 512, 2, 200 * MB, row_align=G.tile_rows, baseline=base)
    finally:
        f.close()


def test_run_without_ctx_says_which_context_it_chose():
    from test_cli import run_cli

    model_file("qwen2.5-coder-1.5b")
    r = run_cli("run", "qwen2.5-coder-1.5b", "def add(a, b):", "-n", "2", "--temp", "0", "--memory-budget", "400M")
    assert r.returncode == 0, r.stderr
    assert "does not fit a memory budget of 400 MB; using" in r.stderr and "(--ctx sets it)" in r.stderr
    r = run_cli("run", "qwen2.5-coder-1.5b", "hi", "-n", "2", "--memory-budget", "400M", "--ctx", "4096")
    assert r.returncode != 0 and "lower --ctx" in r.stderr and "Traceback" not in r.stderr


def test_show_prints_the_plan_for_a_budget():
    from test_cli import run_cli

    model_file("qwen2.5-coder-1.5b")
    r = run_cli("show", "qwen2.5-coder-1.5b", "--memory-budget", "400M", "--json")
    assert r.returncode == 0, r.stderr
    p = json.loads(r.stdout)["memory_plan"]
    assert 256 <= p["n_ctx"] < 4096 and p["n_ctx"] % 256 == 0 and p["budget_bytes"] == 400 * MB
    assert sum(p["parts"].values()) <= 400 * MB and p["streamed_units"] > 0
    r = run_cli("show", "qwen2.5-coder-1.5b", "--memory-budget", "400M", "--ctx", "4096")
    assert r.returncode != 0 and "lower --ctx" in r.stderr and "Traceback" not in r.stderr
