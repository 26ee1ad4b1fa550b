"""Parallel generation (runtime/batch.py, `serve --parallel N`) on qwen2.5-coder-0.5b: replies
batched with others equal lone ones (greedy and seeded sampling), a dropped stream frees its slot,
a slot's cache serves the same conversation again, and a server under 50 concurrent requests
answers or refuses each one and stays healthy."""
from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import edgellm
from edgellm.runtime import RuntimeConfig
from edgellm.runtime.config import ConfigError

from conftest import model_file

MODEL = "qwen2.5-coder-0.5b"
PROMPTS = ["def fib(n):", "import numpy as np\n", "class Stack:\n", "# sort a list\n", "SELECT name FROM",
           "fn main() {"]


@pytest.fixture(scope="module")
def lone():
    model_file(MODEL)
    with edgellm.load(MODEL, ctx=512) as llm:
        yield llm


@pytest.fixture(scope="module")
def batched():
    with edgellm.load(MODEL, ctx=512, parallel=4) as llm:
        yield llm


def _together(llm, calls):
    """Run the calls (each a zero-argument function) from threads at once; their results."""
    with ThreadPoolExecutor(len(calls)) as ex:
        return [f.result(timeout=300) for f in [ex.submit(c) for c in calls]]


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=0.9, seed=7, top_k=0, top_p=1.0)])
def test_batched_replies_equal_lone_ones(lone, batched, sampling):
    """Six requests on four slots (two wait for a free one): each reply is the lone reply."""
    want = [lone.generate(p, max_tokens=20, **sampling) for p in PROMPTS]
    got = _together(batched, [lambda p=p: batched.generate(p, max_tokens=20, **sampling) for p in PROMPTS])
    assert got == want


def test_a_dropped_stream_frees_its_slot(batched):
    streams = [batched.stream(p, temperature=0, max_tokens=400) for p in PROMPTS[:4]]
    for s in streams:  # every slot busy with a long reply
        next(s)
    for s in streams:
        s.close()  # the reader leaves: each generation stops at its next pass
    t0 = time.monotonic()
    assert batched.generate("x = 1\n", temperature=0, max_tokens=4)
    assert time.monotonic() - t0 < 30
    assert not batched._batch.busy


def test_a_slot_reuses_its_cache_for_the_same_conversation(batched):
    msgs = [{"role": "user", "content": "Name a prime number."}]
    first = batched.create_chat_completion(msgs, temperature=0, max_tokens=8)
    again = batched.create_chat_completion(msgs, temperature=0, max_tokens=8)
    assert again["choices"][0]["message"] == first["choices"][0]["message"]
    assert batched.stats.cached_tokens >= len(batched.chat_ids(msgs)) - 1


def test_a_long_prompt_is_prefilled_in_chunks_between_decode_passes():
    """With n_batch 16, a 100-token prompt is seven chunks, each followed by a decode pass of the
    stream already running; both replies are still their lone bits."""
    long_prompt = "def f(x):\n    return x * 2\n\n" * 10
    with edgellm.load(MODEL, ctx=512, n_batch=16) as one:
        want = [one.generate(p, temperature=0, max_tokens=n) for p, n in ((long_prompt, 8), ("x = [", 40))]
    with edgellm.load(MODEL, ctx=512, n_batch=16, parallel=2) as llm:
        eng, log = llm._engine, []
        prefill, decode_rows = eng.prefill, eng.decode_rows
        eng.prefill = lambda ids, **kw: (log.append("P"), prefill(ids, **kw))[1]
        eng.decode_rows = lambda seqs, toks: (log.append(f"D{len(seqs)}"), decode_rows(seqs, toks))[1]
        short = llm.stream("x = [", temperature=0, max_tokens=40)
        first = next(short)
        got_long = llm.generate(long_prompt, temperature=0, max_tokens=8)
        got_short = first.text + "".join(ev.text for ev in short)
    assert [got_long, got_short] == want
    pattern = "".join(log)
    assert len(llm.tokenizer.encode(long_prompt)) > 96 and "PD1PD1PD1PD1PD1PD1P" in pattern, pattern


def test_parallel_streams_under_a_memory_budget(lone):
    """Three requests on three slots with weights streamed under a budget (three KV caches in the
    plan): one read of the window per pass serves them all, and each reply is the lone reply."""
    from edgellm.offload.planner import measure_baseline

    budget = measure_baseline() + 250 * (1 << 20)  # the 491 MB model cannot stay resident
    with edgellm.load(MODEL, ctx=512, parallel=3, memory_budget=budget) as llm:
        plan = llm._engine.plan
        assert plan.streamed and "KV caches (3 sequences)" in plan.parts
        before = llm._engine.weights.telemetry["bytes_read"]  # (a snapshot: what loading read so far)
        got = _together(llm, [lambda p=p: llm.generate(p, temperature=0, max_tokens=12) for p in PROMPTS[:3]])
        assert llm._engine.weights.telemetry["bytes_read"] > before  # the passes streamed weights
    assert got == [lone.generate(p, temperature=0, max_tokens=12) for p in PROMPTS[:3]]


def test_parallel_is_checked():
    with pytest.raises(ConfigError, match="parallel must be 1..16"):
        RuntimeConfig(parallel=17)
    with pytest.raises(ConfigError, match="speculative"):
        RuntimeConfig(parallel=2, lookup=3)
    with pytest.raises(ConfigError, match="a cluster"):
        RuntimeConfig(parallel=2, cluster="127.0.0.1:9000")


def test_fifty_concurrent_requests_are_answered_or_refused():
    """parallel 2, queue 8: every request gets 200 or 429 (never a hang or a 500), and the server
    answers normally afterwards."""
    httpx = pytest.importorskip("httpx")
    uvicorn = pytest.importorskip("uvicorn")
    from edgellm.runtime import server

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with edgellm.load(MODEL, ctx=512, parallel=2) as llm:
        srv = uvicorn.Server(uvicorn.Config(server.create_app(llm, MODEL, queue=8, parallel=2), host="127.0.0.1",
                                            port=port, log_level="warning"))
        t = threading.Thread(target=srv.run, daemon=True)
        t.start()
        while not srv.started:
            time.sleep(0.05)
        base = f"http://127.0.0.1:{port}"
        try:
            def one(i):
                body = {"prompt": f"# task {i}\ndef f():", "max_tokens": 8, "temperature": 0}
                return httpx.post(base + "/v1/completions", json=body, timeout=300).status_code
            codes = _together(llm, [lambda i=i: one(i) for i in range(50)])
            assert set(codes) <= {200, 429} and codes.count(200) >= 10, codes
            assert httpx.get(base + "/health").status_code == 200
            assert one(99) == 200
        finally:
            srv.should_exit = True
            t.join(10)
