"""`edgellm serve` (runtime/server.py) on qwen2.5-coder-0.5b, driven by the real `openai` client and
by httpx for the error cases: answers equal the library's, streams end in [DONE], errors come in
OpenAI's shape with the right status, a full queue answers 429, a disconnect frees the model."""
from __future__ import annotations

import json
import socket
import threading
import time

import numpy as np
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


PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "languages"],
          "properties": {"name": {"type": "string", "maxLength": 24},
                         "age": {"type": "integer", "minimum": 18, "maximum": 99},
                         "languages": {"type": "array", "items": {"enum": ["python", "c", "rust", "go"]},
                                       "minItems": 1, "maxItems": 3}}}


@pytest.mark.parametrize("temperature,seed", [(0, None), (1.0, 1), (1.0, 2)])
def test_json_schema_output_parses_and_validates(srv, temperature, seed):
    """Constrained decoding (llguidance): greedy and sampled replies parse and validate against the
    schema, and end by themselves (finish_reason stop) well inside max_tokens."""
    jsonschema = pytest.importorskip("jsonschema")
    base, _ = srv
    r = _client(base).chat.completions.create(
        model=MODEL, temperature=temperature, seed=seed, max_tokens=120,
        messages=[{"role": "user", "content": "Describe a fictional programmer."}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
    text = r.choices[0].message.content
    jsonschema.validate(json.loads(text), PERSON)
    assert r.choices[0].finish_reason == "stop", text


def test_json_object_and_ollama_format(srv):
    base, llm = srv
    r = _client(base).chat.completions.create(model=MODEL, temperature=0, max_tokens=80, messages=MSG,
                                              response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    h = {"Authorization": f"Bearer {KEY}"}
    body = {"model": MODEL, "stream": False, "messages": MSG, "format": PERSON, "options": {"temperature": 0}}
    out = httpx.post(base + "/api/chat", json=body, headers=h, timeout=120).json()
    assert set(json.loads(out["message"]["content"])) == {"name", "age", "languages"}
    lib = llm.create_chat_completion(MSG, temperature=0, max_tokens=80, response_format={"type": "json_object"})
    assert lib["choices"][0]["message"]["content"] == r.choices[0].message.content


@pytest.mark.parametrize("rf, msg", [
    ({"type": "xml"}, "not one of"),
    ({"type": "json_schema", "json_schema": {"schema": {"$ref": "#/nowhere"}}}, "cannot be used"),
    ("json", "must be an object"),
])
def test_bad_response_format_is_400(srv, rf, msg):
    base, _ = srv
    h = {"Authorization": f"Bearer {KEY}"}
    for stream in (False, True):
        r = httpx.post(base + "/v1/chat/completions", headers=h, timeout=60,
                       json={"model": MODEL, "messages": MSG, "response_format": rf, "stream": stream})
        assert r.status_code == 400 and msg in r.json()["error"]["message"], r.text


def test_logprobs_are_the_models_and_match_the_tokens(srv):
    """Chat logprobs: one entry per generated token, its bytes joining to the reply, its logprob the
    first of its top alternatives under greedy decoding, all of them log-probabilities (<= 0)
    that agree with a softmax of the model's own logits; completions give OpenAI's legacy shape."""
    base, llm = srv
    r = _client(base).chat.completions.create(model=MODEL, messages=MSG, temperature=0, max_tokens=6,
                                              logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert b"".join(bytes(t.bytes) for t in content).decode() == r.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token
        assert t.logprob == pytest.approx(t.top_logprobs[0].logprob) and t.logprob <= 0
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob >= t.top_logprobs[2].logprob
    ids = llm.chat_ids(MSG)
    logits = llm._engine.prefill(ids).astype(np.float64)  # (n_vocab,)
    first = -np.log(np.exp(logits - logits.max()).sum())  # log-softmax of the top token
    assert content[0].logprob == pytest.approx(first, abs=1e-4)
    c = _client(base).completions.create(model=MODEL, prompt="def add(a, b):", temperature=0, max_tokens=4, logprobs=2)
    lp = c.choices[0].logprobs
    assert "".join(lp.tokens) == c.choices[0].text and len(lp.token_logprobs) == 4
    assert all(len(d) <= 2 for d in lp.top_logprobs) and lp.text_offset[0] == 0


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "required": ["city"], "additionalProperties": False,
                   "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}}}}},
    {"type": "function", "function": {
        "name": "add", "description": "Add two integers",
        "parameters": {"type": "object", "required": ["a", "b"], "additionalProperties": False,
                       "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}]
WEATHER = [{"role": "user", "content": "What is the weather in Paris right now?"}]


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}])
def test_forced_tool_calls_follow_the_schema(srv, choice):
    """tool_choice required / named: one call through the model's <tool_call> format, constrained
    so that its arguments validate against the function's parameters; streamed, the same call
    arrives as a delta.tool_calls chunk and the stream ends with finish_reason tool_calls."""
    jsonschema = pytest.importorskip("jsonschema")
    base, _ = srv
    c = _client(base)
    r = c.chat.completions.create(model=MODEL, messages=WEATHER, tools=TOOLS, tool_choice=choice,
                                  temperature=0, max_tokens=80)
    assert r.choices[0].finish_reason == "tool_calls"
    (call,) = r.choices[0].message.tool_calls
    want = "add" if isinstance(choice, dict) else call.function.name
    assert call.function.name == want and call.id.startswith("call_")
    schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == want)
    jsonschema.validate(json.loads(call.function.arguments), schema)
    chunks = list(c.chat.completions.create(model=MODEL, messages=WEATHER, tools=TOOLS, tool_choice=choice,
                                            temperature=0, max_tokens=80, stream=True))
    deltas = [d for ch in chunks for d in (ch.choices[0].delta.tool_calls or [])]
    assert [(d.function.name, d.function.arguments) for d in deltas] == [(want, call.function.arguments)]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_a_tool_result_turn_renders_and_answers(srv):
    """The assistant's call (arguments as OpenAI's JSON string) and the tool's result go back
    through the chat template; the model answers in text."""
    base, llm = srv
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                             "arguments": '{"city": "Paris"}'}}
    msgs = WEATHER + [{"role": "assistant", "content": None, "tool_calls": [call]},
                      {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"}]
    text = llm.detokenize(llm.chat_ids(msgs, TOOLS), special=True)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}' in text
    assert "<tool_response>\n18 C, sunny\n</tool_response>" in text and '"name": "add"' in text
    r = _client(base).chat.completions.create(model=MODEL, messages=msgs, tools=TOOLS, tool_choice="none",
                                              temperature=0, max_tokens=24)
    assert r.choices[0].message.content and not r.choices[0].message.tool_calls


def test_ollama_chat_calls_tools(srv):
    """ollama's /api/chat takes `tools` too and answers with message.tool_calls (arguments as an
    object, ollama's shape), streamed or not; greedy qwen 0.5B calls get_weather for Paris."""
    base, _ = srv
    h = {"Authorization": f"Bearer {KEY}"}
    body = {"model": MODEL, "messages": WEATHER, "tools": TOOLS, "options": {"temperature": 0}}
    whole = httpx.post(base + "/api/chat", json=body | {"stream": False}, headers=h, timeout=120).json()
    (call,) = whole["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather" and call["function"]["arguments"]["city"] == "Paris"
    want = whole["message"]["tool_calls"]
    lines = [json.loads(x) for x in httpx.post(base + "/api/chat", json=body | {"stream": True}, headers=h,
                                                timeout=120).text.splitlines()]
    assert [c for d in lines for c in d["message"].get("tool_calls", [])] == want and lines[-1]["done"]


@pytest.mark.parametrize("tools, choice, msg", [
    ([{"type": "function", "function": {"name": "bad name!"}}], None, "name must be"),
    (TOOLS, {"type": "function", "function": {"name": "nope"}}, "not among the tools"),
    ("add", None, "must be a list"),
])
def test_bad_tools_are_400(srv, tools, choice, msg):
    base, _ = srv
    h = {"Authorization": f"Bearer {KEY}"}
    body = {"model": MODEL, "messages": MSG, "tools": tools, **({"tool_choice": choice} if choice else {})}
    r = httpx.post(base + "/v1/chat/completions", headers=h, json=body, timeout=60)
    assert r.status_code == 400 and msg in r.json()["error"]["message"], r.text


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
    ({"model": MODEL, "messages": MSG, "functions": []}, None, 400, None),
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


def test_health_is_503_while_the_model_loads(srv):
    from starlette.testclient import TestClient

    _, llm = srv
    state = server.Loading()
    client = TestClient(server.create_app(state, MODEL))
    r = client.get("/health")
    assert r.status_code == 503 and r.json() == {"status": "loading"}
    r = client.post("/v1/chat/completions", json={"messages": MSG})
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
    assert client.get("/").status_code == 200  # the page itself is there at once
    state.llm = llm
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/v1/models").json()["data"][0]["id"] == MODEL


def test_serve_listens_at_once_then_answers_and_stops_on_ctrl_c():
    import signal
    import subprocess
    import sys

    port = _free_port()
    p = subprocess.Popen([sys.executable, "-c", "from edgellm.cli import main; main()", "serve", "gemma3-270m",
                          "--port", str(port), "--ctx", "256"], stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = set()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
            except httpx.TransportError:
                time.sleep(0.05)
                continue
            seen.add(r.status_code)
            if r.status_code == 200:
                break
            time.sleep(0.02)
        assert 200 in seen and seen <= {200, 503}, seen
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "The sky is", "max_tokens": 3,
                                                                       "temperature": 0}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=30)
        assert p.returncode in (0, 130) and "Traceback" not in err, err  # 130: the shell's code for Ctrl+C
        assert "loading gemma3-270m" in err and "serving gemma3-270m" in err
    finally:
        if p.poll() is None:
            p.kill()


def test_serve_on_a_taken_port_is_one_line_before_loading():
    from test_cli import run_cli

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        r = run_cli("serve", "gemma3-270m", "--port", str(s.getsockname()[1]))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("edgellm: error: cannot listen on 127.0.0.1:")
    assert "loading" not in r.stderr


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
