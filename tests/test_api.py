"""The Python API on the real gemma3-270m: greedy output equals `edgellm run --temp 0`, OpenAI-shaped
results, streams equal non-streamed results, concurrent calls are serialised, bad arguments are named."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import edgellm
from edgellm.errors import EdgeLLMError, GGUFError

import gguf_builder as gb
from conftest import model_file

PROMPT = "The capital of France is"
HI = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def llm():
    model_file("gemma3-270m")
    with edgellm.load("gemma3-270m", threads=2, ctx=1024) as m:
        yield m


def test_greedy_generate_equals_cli_run(llm):
    # in-process first: a cold numba cache compiles here (minutes on 2 cores) and the CLI then loads it
    text, ids = llm.generate(PROMPT, temperature=0, max_tokens=16), llm.stats.ids
    cli = subprocess.run([sys.executable, "-c", "from edgellm.cli import main; main()", "run", "gemma3-270m",
                          PROMPT, "--temp", "0", "-n", "16", "--json"],
                         capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert cli.returncode == 0, cli.stderr
    want = json.loads(cli.stdout)
    assert text == want["text"] and ids == want["ids"]
    llm.reset()  # a reused cache prefix may change greedy picks at near-ties (numerics differ by batch)
    assert llm.generate(PROMPT, temp=0, max_new_tokens=16) == want["text"]  # aliases
    assert llm.tokenize(PROMPT) == want["prompt_ids"] and llm.detokenize(want["prompt_ids"]) == PROMPT


def test_stream_events(llm):
    llm.reset()
    evs = list(llm.stream(PROMPT, temperature=0, max_tokens=5))
    assert len(evs) == 5 and evs[-1].finish_reason == "length" and all(e.finish_reason is None for e in evs[:-1])
    assert all(isinstance(e.token, int) and e.tokens_per_s >= 0 for e in evs)
    llm.reset()
    assert "".join(e.text for e in evs) == llm.generate(PROMPT, temperature=0, max_tokens=5)


def test_create_completion_shape(llm):
    r = llm.create_completion(PROMPT, temperature=0, max_tokens=4, echo=True)
    assert r["object"] == "text_completion" and r["id"].startswith("cmpl-") and r["model"] == "gemma3-270m"
    assert isinstance(r["created"], int)
    c = r["choices"][0]
    assert c["text"].startswith(PROMPT) and c["finish_reason"] == "length" and c["index"] == 0
    assert r["usage"] == {"prompt_tokens": 6, "completion_tokens": 4, "total_tokens": 10}
    llm.reset()
    chunks = list(llm.create_completion(PROMPT, temperature=0, max_tokens=4, stream=True))
    assert "".join(ch["choices"][0]["text"] for ch in chunks) == c["text"][len(PROMPT):]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_create_chat_completion_and_stream(llm):
    r = llm.create_chat_completion(HI, temperature=0, max_tokens=12)
    assert r["object"] == "chat.completion" and r["id"].startswith("chatcmpl-")
    c = r["choices"][0]
    assert c["message"]["role"] == "assistant" and c["finish_reason"] in ("stop", "length")
    u = r["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] and 0 < u["completion_tokens"] <= 12
    assert u["prompt_tokens"] == len(llm.chat_ids(HI))
    llm.reset()
    chunks = list(llm.create_chat_completion(HI, temperature=0, max_tokens=12, stream=True))
    assert all(ch["object"] == "chat.completion.chunk" for ch in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks) == c["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == c["finish_reason"]
    llm.reset()
    assert llm.chat(HI, temperature=0, max_tokens=12) == c["message"]["content"]


def test_follow_up_reuses_kv_cache(llm):
    reply = llm.chat(HI, temperature=0, max_tokens=8)
    first = llm.chat_ids(HI)
    llm.chat(HI + [{"role": "assistant", "content": reply}, {"role": "user", "content": "More?"}],
             temperature=0, max_tokens=2)
    assert llm.stats.cached_tokens >= len(first)


def test_concurrent_calls_equal_serial(llm):
    # Every call below reuses exactly the cached BOS, whatever the threads' order, so greedy picks
    # cannot differ through batch numerics; only a corrupted cache would change them.
    prompts = ["Once upon a time", "def fibonacci(n):"]
    llm.generate("Hello", max_tokens=1)
    serial = [llm.generate(p, temperature=0, max_tokens=8) for p in prompts]
    llm.generate("Hello", max_tokens=1)
    got = [None, None]

    def work(i):
        got[i] = llm.generate(prompts[i], temperature=0, max_tokens=8)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert got == serial


def test_open_stream_holds_the_lock(llm):
    s = llm.stream(PROMPT, temperature=0, max_tokens=50)
    next(s)
    other = threading.Thread(target=llm.generate, args=(PROMPT,), kwargs={"max_tokens": 2})
    other.start()
    other.join(0.5)
    assert other.is_alive()  # waits for the open stream
    with pytest.raises(EdgeLLMError, match="still open in this thread"):
        llm.generate(PROMPT, max_tokens=1)
    s.close()
    other.join(30)
    assert not other.is_alive()


@pytest.mark.parametrize("kw, match", [
    ({"max_tokens": -3}, "max_tokens"),
    ({"max_new_tokens": 1.5}, "max_new_tokens"),
    ({"temprature": 0}, "temprature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 2}, "top_p"),
    ({"temp": 0, "temperature": 0}, "temperature"),
])
def test_bad_sampling_arguments(llm, kw, match):
    with pytest.raises(ValueError, match=match):
        llm.generate(PROMPT, **kw)


def test_bad_prompts_and_messages(llm):
    with pytest.raises(ValueError, match="prompt has 2000 tokens; the context holds 1024"):
        llm.generate([2] * 2000)
    with pytest.raises(ValueError, match="prompt holds -1"):
        llm.generate([2, -1])
    with pytest.raises(ValueError, match="messages must be"):
        llm.chat("hello")
    with pytest.raises(ValueError, match=r"messages\[1\]"):
        llm.chat([{"role": "user", "content": "a"}, {"content": "b"}])
    with pytest.raises(ValueError, match="tools"):
        llm.create_chat_completion(HI, tools=[])


def test_bad_load_arguments(tmp_path):
    with pytest.raises(EdgeLLMError, match="unknown model 'no-such-model'"):
        edgellm.load("no-such-model")
    with pytest.raises(ValueError, match="unknown setting 'thread'"):
        edgellm.load("gemma3-270m", thread=2)
    with pytest.raises(ValueError, match="threads"):
        edgellm.load("gemma3-270m", threads=0)
    with pytest.raises(ValueError, match="memory_budget"):
        edgellm.load("gemma3-270m", memory_budget="lots")
    with pytest.raises(ValueError, match="cluster"):
        edgellm.load("gemma3-270m", cluster=["no-port"])


def test_failed_load_leaves_nothing_open(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(gb.sample().build()[:-1])
    with pytest.raises(GGUFError):
        edgellm.load(bad, memory_budget="2G")
    maps = Path("/proc/self/maps")
    if maps.exists():
        assert str(bad) not in maps.read_text()
    assert str(bad) not in {f.path for f in __import__("psutil").Process().open_files()}


def test_close_last(llm):  # runs last: closes the module's model
    with llm:
        pass
    with pytest.raises(EdgeLLMError, match="closed"):
        llm.generate(PROMPT, max_tokens=1)
    llm.close()  # twice is fine
