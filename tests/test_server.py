"""`edgellm serve` (runtime/server.py) on qwen2.5-coder-0.5b, driven by the real `openai` client and
by httpx for the error cases: answers equal the library's, streams end in [DONE], errors come in
OpenAI's shape with the right status, a full queue answers 429, a disconnect frees the model."""
from __future__ import annotations

import json
import socket
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

import edgellm  # noqa: E402
from edgellm.runtime import server  # noqa: E402

from conftest import model_file  # noqa: E402

MODEL = "qwen2.5-coder-0.5b"
KEY = "sk-test-0123456789"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def srv():
    model_file(MODEL)
    llm = edgellm.load(MODEL, ctx=512, threads=2)
    port = _free_port()
    app = server.create_app(llm, MODEL, api_key=KEY, queue=1, max_body=64 << 10)
    s = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=s.run, daemon=True)
    t.start()
    for _ in range(200):
        if s.started:
            break
        time.sleep(0.05)
    base = f"http://127.0.0.1:{port}"
    yield base, llm
    s.should_exit = True
    t.join(10)
    llm.close()


def _client(base):
    return openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=120)


MSG = [{"role": "user", "content": "What is 2 + 2? Answer with one number."}]


def test_chat_completion_equals_the_library(srv):
    base, llm = srv
    r = _client(base).chat.completions.create(model=MODEL, messages=MSG, temperature=0, max_tokens=8)
    want = llm.create_chat_completion(MSG, temperature=0, max_tokens=8)
    assert r.choices[0].message.content == want["choices"][0]["message"]["content"]
    assert "4" in r.choices[0].message.content
    assert r.usage.prompt_tokens == want["usage"]["prompt_tokens"] and r.usage.completion_tokens >= 1
    assert r.choices[0].finish_reason in ("stop", "length")


def test_streaming_chat_gives_the_same_text(srv):
    base, llm = srv
    stream = _client(base).chat.completions.create(model=MODEL, messages=MSG, temperature=0, max_tokens=8,
                                                   stream=True)
    parts, reasons = [], []
    for chunk in stream:
        parts.append(chunk.choices[0].delta.content or "")
        reasons.append(chunk.choices[0].finish_reason)
    want = llm.create_chat_completion(MSG, temperature=0, max_tokens=8)["choices"][0]["message"]["content"]
    assert "".join(parts) == want and reasons[-1] in ("stop", "length")


def test_text_completion_and_models(srv):
    base, llm = srv
    c = _client(base)
    r = c.completions.create(model=MODEL, prompt="def add(a, b):\n    return", temperature=0, max_tokens=6)
    want = llm.create_completion("def add(a, b):\n    return", temperature=0, max_tokens=6)
    assert r.choices[0].text == want["choices"][0]["text"]
    assert [m.id for m in c.models.list().data] == [MODEL]


def test_tokenize_round_trip(srv):
    base, llm = srv
    h = {"Authorization": f"Bearer {KEY}"}
    toks = httpx.post(base + "/tokenize", json={"content": "hello world"}, headers=h).json()["tokens"]
    assert toks == llm.tokenize("hello world", add_bos=False, special=True)
    assert httpx.post(base + "/detokenize", json={"tokens": toks}, headers=h).json()["content"] == "hello world"


@pytest.mark.parametrize("body, headers, status, code", [
    ({"model": MODEL, "messages": MSG}, {}, 401, "invalid_api_key"),
    ({"model": MODEL, "messages": MSG}, {"Authorization": "Bearer nope"}, 401, "invalid_api_key"),
    ({"model": "gpt-9", "messages": MSG}, None, 404, "model_not_found"),
    ({"model": MODEL, "messages": "hi"}, None, 400, None),
    ({"model": MODEL, "messages": MSG, "temperature": "hot"}, None, 400, None),
    ({"model": MODEL, "messages": MSG, "max_tokens": 100000}, None, 400, "context_length_exceeded"),
    ({"model": MODEL, "messages": MSG, "tools": []}, None, 400, None),
    ({"model": MODEL, "messages": MSG, "frobnicate": 1}, None, 400, None),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x" * 70000}]}, None, 413, "body_too_large"),
])
def test_errors_have_openai_shape_and_status(srv, body, headers, status, code):
    base, _ = srv
    h = {"Authorization": f"Bearer {KEY}"} if headers is None else headers
    r = httpx.post(base + "/v1/chat/completions", json=body, headers=h, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"] and "Traceback" not in r.text
    if code:
        assert err["code"] == code


def test_malformed_json_and_unknown_route(srv):
    base, _ = srv
    h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(base + "/v1/chat/completions", content=b"{not json", headers=h)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    assert httpx.get(base + "/v1/nothing", headers=h).status_code == 404
    assert httpx.get(base + "/health").json() == {"status": "ok"}  # no key needed


def test_a_full_queue_answers_429_and_a_disconnect_frees_the_model(srv):
    """queue=1: one stream generating and one request waiting fill the server; a third is refused
    at once. Closing the stream mid-way lets the waiting request run."""
    base, _ = srv
    h = {"Authorization": f"Bearer {KEY}"}
    long = {"model": MODEL, "messages": [{"role": "user", "content": "Write a 2000-word essay on the history of Rome."}],
            "max_tokens": 400, "temperature": 0, "stream": True}
    with httpx.Client(timeout=120) as c1:
        with c1.stream("POST", base + "/v1/chat/completions", json=long, headers=h) as s:
            lines = s.iter_lines()
            first = next(ln for ln in lines if ln.startswith("data:"))
            assert json.loads(first[5:])["object"] == "chat.completion.chunk"
            waiting = {}

            def second():
                waiting["r"] = httpx.post(base + "/v1/chat/completions", headers=h, timeout=120,
                                          json={"model": MODEL, "messages": MSG, "max_tokens": 4})
            t = threading.Thread(target=second)
            t.start()
            time.sleep(1.0)
            third = httpx.post(base + "/v1/chat/completions", headers=h, timeout=60,
                               json={"model": MODEL, "messages": MSG, "max_tokens": 4})
            assert third.status_code == 429 and third.json()["error"]["type"] == "rate_limit_error"
        # the stream is closed here, long before 400 tokens
    t.join(60)
    assert not t.is_alive() and waiting["r"].status_code == 200
    assert httpx.get(base + "/health").status_code == 200


def test_serve_refuses_a_public_address_without_a_key():
    from test_cli import run_cli

    r = run_cli("serve", MODEL, "--host", "0.0.0.0")
    assert r.returncode != 0 and "without an API key" in r.stderr and "Traceback" not in r.stderr


def test_ollama_routes(srv):
    base, llm = srv
    h = {"Authorization": f"Bearer {KEY}"}
    body = {"model": MODEL, "messages": MSG, "options": {"temperature": 0, "num_predict": 8}}
    with httpx.stream("POST", base + "/api/chat", json=body, headers=h, timeout=120) as r:
        assert r.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(ln) for ln in r.iter_lines() if ln]
    text = "".join(d["message"]["content"] for d in lines if not d["done"])
    want = llm.create_chat_completion(MSG, temperature=0, max_tokens=8)["choices"][0]["message"]["content"]
    last = lines[-1]
    assert text == want and last["done"] and last["eval_count"] >= 1 and last["eval_duration"] > 0
    whole = httpx.post(base + "/api/generate", headers=h, timeout=120, json={
        "model": MODEL, "prompt": "def add(a, b):\n    return", "raw": True, "stream": False,
        "options": {"temperature": 0, "num_predict": 6}}).json()
    assert whole["done"] and whole["response"] == llm.generate("def add(a, b):\n    return", temperature=0, max_tokens=6)
    assert httpx.get(base + "/api/tags", headers=h).json()["models"][0]["name"] == MODEL
    assert httpx.post(base + "/api/show", json={"model": MODEL}, headers=h).json()["details"]["format"] == "gguf"
    assert httpx.get(base + "/api/version", headers=h).json()["version"] == edgellm.__version__
    assert httpx.post(base + "/api/chat", json={**body, "model": "llama9"}, headers=h).status_code == 404


def test_metrics_count_requests_and_tokens(srv):
    base, _ = srv
    h = {"Authorization": f"Bearer {KEY}"}
    _client(base).chat.completions.create(model=MODEL, messages=MSG, temperature=0, max_tokens=3)
    httpx.get(base + "/no/such/route/" + "x" * 50, headers=h)
    text = httpx.get(base + "/metrics", headers=h).text
    assert 'edgellm_requests_total{route="/v1/chat/completions",status="200"}' in text
    assert 'route="other",status="404"' in text and "/no/such" not in text
    gen = next(float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith("edgellm_generated_tokens_total"))
    assert gen >= 3 and "edgellm_queue_depth 0.0" in text
