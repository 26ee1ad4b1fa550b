"""`edgellm serve`: an OpenAI-compatible HTTP server over one loaded `LLM` (FastAPI + uvicorn,
server-sent events by sse-starlette).

    app = create_app(llm, "qwen2.5-coder-0.5b", api_key=None, queue=8)
    uvicorn.run(app, host="127.0.0.1", port=8080)

Routes: POST /v1/chat/completions, POST /v1/completions (both with "stream": true as SSE chunks
ending in `data: [DONE]`), GET /v1/models, GET /health, POST /tokenize, POST /detokenize,
GET /metrics (Prometheus text: requests by route and status, tokens, queue depth, tokens/s),
ollama's POST /api/chat and /api/generate (NDJSON streams, durations in ns), GET /api/tags,
POST /api/show, GET /api/version, and a chat page at GET / (runtime/web: streams from
/v1/chat/completions, Stop aborts the request, the API key is asked for when the server has one).
Errors come in OpenAI's shape {"error": {"message", "type", "param", "code"}} with the right
status: 400 bad request, 401 missing or wrong key, 404 unknown model or route, 413 body too
large, 429 when the queue is full. One generation runs at a time (the LLM's lock), or with
`parallel` N up to N at once, batched token by token (runtime/batch.py); up to `queue` more
wait, and a client that disconnects mid-stream stops its generation at the next token.

Request fields: OpenAI's sampling fields (max_tokens / max_completion_tokens, temperature, top_p,
stop, seed, presence_penalty, frequency_penalty) and llama.cpp's extras (top_k, min_p,
repeat_penalty); `response_format` (json_object, json_schema: constrained decoding with llguidance,
ollama's `format`), `logprobs` / `top_logprobs` (chat) and `logprobs: N` (completions); `tools` /
`tool_choice` (chat: the model's own tool format, runtime/tools.py). Fields
this server does not implement (n > 1, logit_bias, the old `functions`, ...) are refused with
400 naming them rather than ignored.
"""

import asyncio
import contextlib
import hmac
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import EdgeLLMError
from .sampler import MAX_TOP_LOGPROBS
from .tools import ToolStream

MAX_BODY = 1 << 20  # bytes of a request body
WEB = Path(__file__).parent / "web"  # the chat page's files
PUBLIC = {"/health", "/", "/app.js", "/app.css"}  # paths served without the API key
PAGE_HEADERS = {  # the page loads nothing from elsewhere and runs no inline script
    "Content-Security-Policy": "default-src 'self'; connect-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}
MAX_STOP = 8  # stop strings per request (OpenAI allows 4)

_SAMPLING = {"temperature": "temperature", "top_p": "top_p", "seed": "seed", "stop": "stop",
             "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
             "top_k": "top_k", "min_p": "min_p", "repeat_penalty": "repeat_penalty"}
_IGNORED = {"model", "stream", "user", "stream_options", "n", "max_tokens", "max_completion_tokens",
            "messages", "prompt", "echo"}
_UNSUPPORTED = {"functions", "function_call", "logit_bias", "suffix", "best_of"}
_OUTPUT = {"response_format", "logprobs", "top_logprobs", "tools", "tool_choice", "parallel_tool_calls"}  # _output


class HTTPError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code


def _error_body(e: HTTPError) -> dict:
    return {"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.code}}


def _sampling(body: dict, n_ctx: int, n_prompt: int, default_max: int | None = None) -> dict:
    """The LLM's sampling keywords from a request body, every value checked."""
    bad = sorted(set(body) & _UNSUPPORTED)
    if bad:
        raise HTTPError(400, f"{', '.join(bad)}: not supported by this server yet", param=bad[0])
    unknown = sorted(set(body) - _UNSUPPORTED - _IGNORED - _OUTPUT - set(_SAMPLING))
    if unknown:
        raise HTTPError(400, f"unknown field{'s' * (len(unknown) > 1)}: {', '.join(unknown)}", param=unknown[0])
    if body.get("n", 1) != 1:
        raise HTTPError(400, "n: only 1 choice per request is supported", param="n")
    kw: dict[str, Any] = {}
    for field, name in _SAMPLING.items():
        v = body.get(field)
        if v is None:
            continue
        if field == "stop":
            v = [v] if isinstance(v, str) else v
            if not isinstance(v, list) or not all(isinstance(s, str) and 0 < len(s) <= 256 for s in v) \
                    or len(v) > MAX_STOP:
                raise HTTPError(400, f"stop must be a string or at most {MAX_STOP} non-empty strings", param="stop")
            v = tuple(v)
        elif field == "seed":
            if not isinstance(v, int) or isinstance(v, bool):
                raise HTTPError(400, "seed must be an integer", param="seed")
            v = v % (1 << 63)
        elif not isinstance(v, (int, float)) or isinstance(v, bool):
            raise HTTPError(400, f"{field} must be a number", param=field)
        kw[name] = v
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    room = n_ctx - n_prompt
    if limit is None and default_max is not None:
        limit = min(default_max, room)
    if limit is None:
        kw["max_tokens"] = room
    elif not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise HTTPError(400, "max_tokens must be a positive integer", param="max_tokens")
    elif limit > room:
        raise HTTPError(400, f"the prompt ({n_prompt} tokens) and max_tokens ({limit}) exceed the context of "
                             f"{n_ctx} tokens", param="max_tokens", code="context_length_exceeded")
    else:
        kw["max_tokens"] = limit
    return kw


def _output(body: dict, kind: str) -> dict:
    """The LLM's output keywords (response_format, logprobs, tools) from a request body, checked
    (a response_format is compiled once, by the LLM: its GrammarError answers 400 there)."""
    from .tools import ToolError, check_tool_choice, check_tools

    kw: dict[str, Any] = {}
    if kind != "chat" and (body.get("tools") is not None or body.get("tool_choice") is not None):
        raise HTTPError(400, "tools are a chat field", param="tools")
    if body.get("tools") is not None or body.get("tool_choice") is not None:
        try:
            tools = check_tools(body["tools"]) if body.get("tools") is not None else []
            check_tool_choice(body.get("tool_choice"), tools)
            kw["tool_choice"] = body.get("tool_choice")
        except ToolError as e:
            raise HTTPError(400, str(e), param="tools") from None
        if tools:
            kw["tools"] = tools
        if not isinstance(body.get("parallel_tool_calls", True), bool):
            raise HTTPError(400, "parallel_tool_calls must be true or false", param="parallel_tool_calls")
    if body.get("response_format") is not None:
        kw["response_format"] = body["response_format"]
    lp, top = body.get("logprobs"), body.get("top_logprobs")
    if kind == "chat":
        if lp is not None and not isinstance(lp, bool):
            raise HTTPError(400, "logprobs must be true or false", param="logprobs")
        if top is not None:
            if not lp:
                raise HTTPError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
            if not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= MAX_TOP_LOGPROBS:
                raise HTTPError(400, f"top_logprobs must be an integer in 0..{MAX_TOP_LOGPROBS}", param="top_logprobs")
            kw["top_logprobs"] = top
        if lp:
            kw["logprobs"] = True
    else:
        if top is not None:
            raise HTTPError(400, "top_logprobs is a chat field; completions take logprobs: N", param="top_logprobs")
        if lp is not None:
            if not isinstance(lp, int) or isinstance(lp, bool) or not 0 <= lp <= MAX_TOP_LOGPROBS:
                raise HTTPError(400, f"logprobs must be an integer in 0..{MAX_TOP_LOGPROBS}", param="logprobs")
            kw["logprobs"] = lp
    return kw


class _Admission:
    """`running` generations at a time, up to `queue` waiting: a full queue answers 429 at once."""

    def __init__(self, queue: int, running: int = 1):
        self.queue, self.running = queue, running
        self.lock = threading.Lock()
        self.count = 0  # running + waiting

    def enter(self) -> None:
        with self.lock:
            if self.count >= self.running + self.queue:
                raise HTTPError(429, f"the server is busy: {self.count - self.running} requests are waiting "
                                     f"(queue {self.queue})", kind="rate_limit_error", code="queue_full")
            self.count += 1

    def leave(self) -> None:
        with self.lock:
            self.count -= 1


class _Metrics:
    """Prometheus series of one server (a registry of its own: tests run several servers)."""

    def __init__(self, gate: "_Admission"):
        from prometheus_client import CollectorRegistry, Counter, Gauge

        self.registry = CollectorRegistry()
        self.requests = Counter("edgellm_requests", "HTTP requests", ["route", "status"], registry=self.registry)
        self.prompt_tokens = Counter("edgellm_prompt_tokens", "prompt tokens processed", registry=self.registry)
        self.tokens = Counter("edgellm_generated_tokens", "tokens generated", registry=self.registry)
        self.speed = Gauge("edgellm_tokens_per_second", "generation speed of the last request", registry=self.registry)
        depth = Gauge("edgellm_queue_depth", "requests waiting for the model", registry=self.registry)
        depth.set_function(lambda: max(0, gate.count - gate.running))

    def generation(self, st) -> None:
        self.prompt_tokens.inc(st.prompt_tokens)
        self.tokens.inc(st.gen_tokens)
        self.speed.set(st.tokens_per_s)


class Loading:
    """Stands in for the LLM while `edgellm serve` loads it: /health answers 503 {"status":
    "loading"} and every model route 503 until `llm` is set (or `error`, if loading failed)."""

    def __init__(self):
        self.llm = None
        self.error: str | None = None

    def __getattr__(self, name):  # reached only for what Loading itself lacks: the LLM's attributes
        llm = self.__dict__.get("llm")
        if llm is None:
            msg = f"the model failed to load: {self.error}" if self.error else "the model is loading"
            raise HTTPError(503, msg, kind="server_error", code="model_loading")
        return getattr(llm, name)

    @property
    def ready(self) -> bool:
        return self.llm is not None


def run(model: str, settings: dict, host: str, port: int, api_key: str | None, queue: int, echo=print) -> None:
    """`edgellm serve`: listen at once (/health answers 503 while the model loads), load `model`
    with `settings` (`edgellm.load`'s keywords, checked before anything listens) in a thread,
    serve until Ctrl+C. A failed load stops the server and raises its error."""
    import uvicorn

    from .api import _runtime_config, load

    _runtime_config(dict(settings))  # bad settings fail here, not in the loading thread
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:  # bound before loading: a taken port is one line, not a load for nothing
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise EdgeLLMError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    state = Loading()
    parallel = int(settings.get("parallel", 1))
    srv = uvicorn.Server(uvicorn.Config(create_app(state, model, api_key=api_key, queue=queue, parallel=parallel),
                                        host=host, port=port, log_level="warning"))

    def _load():
        try:
            state.llm = load(model, **settings)
            echo(f"edgellm serving {model} on http://{host}:{port}/ (the API under /v1; Ctrl+C stops)")
        except BaseException as e:  # noqa: BLE001  (reported by the main thread)
            state.error = str(e) or type(e).__name__
            srv.should_exit = True

    echo(f"edgellm loading {model}; http://{host}:{port}/health answers 503 until it is ready")
    t = threading.Thread(target=_load, name="edgellm-load", daemon=True)
    t.start()
    try:
        srv.run(sockets=[sock])
    finally:
        sock.close()
        t.join()
        if state.llm is not None:
            state.llm.close()
    if state.error:
        raise EdgeLLMError(state.error)


def create_app(llm, model_name: str, api_key: str | None = None, queue: int = 8, max_body: int = MAX_BODY,
               parallel: int = 1):
    """The ASGI app over `llm` (an `LLM`, or a `Loading` that gets one later), generating for up
    to `parallel` requests at once (the LLM's slots) with `queue` more waiting."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from sse_starlette.sse import EventSourceResponse
    from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="edgellm", docs_url=None, redoc_url=None, openapi_url=None)
    gate = _Admission(queue, parallel)
    metrics = _Metrics(gate)

    @app.exception_handler(HTTPError)
    async def _http_error(request, e: HTTPError):
        return JSONResponse(_error_body(e), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _starlette_error(request, e):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(_error_body(HTTPError(e.status_code, str(e.detail), kind)), status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e):
        return JSONResponse(_error_body(HTTPError(400, "malformed request")), status_code=400)

    @app.exception_handler(Exception)
    async def _internal(request, e):  # never a traceback to a client
        return JSONResponse(_error_body(HTTPError(500, "internal error", "server_error")), status_code=500)

    @app.middleware("http")
    async def _auth_and_size(request: Request, call_next):
        try:
            if api_key is not None and request.url.path not in PUBLIC:
                got = request.headers.get("authorization", "")
                token = got[7:] if got.lower().startswith("bearer ") else ""
                if not hmac.compare_digest(token.encode(), api_key.encode()):
                    raise HTTPError(401, "missing or wrong API key (Authorization: Bearer KEY)",
                                    kind="authentication_error", code="invalid_api_key")
            length = request.headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > max_body):
                raise HTTPError(413, f"the request body exceeds {max_body} bytes", code="body_too_large")
        except HTTPError as e:
            metrics.requests.labels(_route(request), str(e.status)).inc()
            return JSONResponse(_error_body(e), status_code=e.status)
        response = await call_next(request)
        metrics.requests.labels(_route(request), str(response.status_code)).inc()
        return response

    def _route(request) -> str:  # a bounded label set, whatever paths clients send
        p = request.url.path
        return p if p in known else "other"

    async def _json(request: Request) -> dict:
        data = b""
        async for chunk in request.stream():
            data += chunk
            if len(data) > max_body:
                raise HTTPError(413, f"the request body exceeds {max_body} bytes", code="body_too_large")
        try:
            body = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            raise HTTPError(400, "the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise HTTPError(400, "the body must be a JSON object")
        return body

    def _model(body: dict) -> None:
        m = body.get("model")
        if m is not None and m != model_name:
            raise HTTPError(404, f"the model '{m}' does not exist here; this server has '{model_name}'",
                            param="model", code="model_not_found")

    def _stream_flag(body: dict, default: bool) -> bool:
        stream = body.get("stream", default)
        if not isinstance(stream, bool):
            raise HTTPError(400, "stream must be true or false", param="stream")
        return stream

    def _chat_ids(messages, out: dict | None = None) -> list[int]:
        out = out or {}
        tools = out.get("tools") if out.get("tool_choice", "auto") != "none" else None
        try:
            return llm.chat_ids(messages, tools)
        except EdgeLLMError as e:
            raise HTTPError(400, str(e), param="messages") from None

    async def _complete(kind: str, body: dict, request: Request):
        _model(body)
        stream = _stream_flag(body, False)
        out = _output(body, kind)
        if kind == "chat":
            ids = _chat_ids(body.get("messages"), out)
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if not isinstance(prompt, str) or not prompt:
                raise HTTPError(400, "prompt must be a non-empty string", param="prompt")
            ids = llm.tokenize(prompt)
        if not ids or len(ids) >= llm.n_ctx:
            raise HTTPError(400, f"the prompt has {len(ids)} tokens; the context holds {llm.n_ctx}",
                            code="context_length_exceeded")
        kw = _sampling(body, llm.n_ctx, len(ids), None if kind == "chat" else 16)  # OpenAI's completions default
        kw |= out
        gate.enter()
        try:
            call = llm.create_chat_completion if kind == "chat" else llm.create_completion
            arg = body["messages"] if kind == "chat" else ids
            if not stream:
                try:
                    r = await run_in_threadpool(call, arg, model=model_name, **kw)
                except EdgeLLMError as e:
                    raise HTTPError(400, str(e)) from None
                gate.leave()
                metrics.generation(llm.stats)
                return JSONResponse(r)
            try:
                chunks = call(arg, stream=True, model=model_name, **kw)
            except EdgeLLMError as e:
                raise HTTPError(400, str(e)) from None
        except BaseException:
            gate.leave()
            raise
        done = (lambda: metrics.generation(llm.stats))
        return EventSourceResponse(_sse(chunks, request, gate, iterate_in_threadpool, done), ping=15,
                                   sep="\n")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _complete("chat", await _json(request), request)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _complete("text", await _json(request), request)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "edgellm"}]}

    @app.get("/health")
    async def health():
        if isinstance(llm, Loading) and not llm.ready:
            return JSONResponse({"status": "error" if llm.error else "loading"}, status_code=503)
        return {"status": "ok"}

    # --- the web chat page (runtime/web): static files, public; its API calls carry the key ---

    def _page(name: str, media_type: str):
        body = (WEB / name).read_bytes()
        return lambda: Response(body, media_type=media_type, headers=PAGE_HEADERS)

    for path, name, media in (("/", "index.html", "text/html; charset=utf-8"),
                              ("/app.js", "app.js", "text/javascript; charset=utf-8"),
                              ("/app.css", "app.css", "text/css; charset=utf-8")):
        app.add_api_route(path, _page(name, media), methods=["GET"], include_in_schema=False)

    @app.get("/metrics")
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # --- ollama ---

    def _ollama_sampling(body: dict, n_prompt: int) -> dict:
        opts = body.get("options") or {}
        if not isinstance(opts, dict):
            raise HTTPError(400, "options must be an object", param="options")
        names = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
                 "seed": "seed", "stop": "stop", "repeat_penalty": "repeat_penalty",
                 "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty"}
        unknown = sorted(set(opts) - set(names) - {"num_predict", "num_ctx", "num_thread"})
        if unknown:
            raise HTTPError(400, f"unsupported options: {', '.join(unknown)}", param="options")
        fields = {names[k]: v for k, v in opts.items() if k in names}
        if "num_predict" in opts and opts["num_predict"] not in (None, -1):
            fields["max_tokens"] = opts["num_predict"]
        kw = _sampling(fields, llm.n_ctx, n_prompt)
        fmt = body.get("format")  # ollama: "json", or a JSON schema
        if fmt not in (None, ""):
            if fmt == "json":
                rf = {"type": "json_object"}
            elif isinstance(fmt, dict):
                rf = {"type": "json_schema", "json_schema": {"name": "format", "schema": fmt}}
            else:
                raise HTTPError(400, 'format must be "json" or a JSON schema object', param="format")
            kw["response_format"] = rf
        return kw

    async def _ollama(kind: str, request: Request):
        body = await _json(request)
        m = body.get("model")
        if m is not None and m not in (model_name, model_name + ":latest"):
            raise HTTPError(404, f"model '{m}' not found", code="model_not_found")
        stream = _stream_flag(body, True)
        tools = None
        if kind == "chat" and body.get("tools") is not None:  # ollama: no tool_choice, arguments as objects
            tools = _output({"tools": body["tools"]}, "chat").get("tools")
        if kind == "chat":
            ids = _chat_ids(body.get("messages"), {"tools": tools})
        else:
            prompt = body.get("prompt")
            if not isinstance(prompt, str) or not prompt:
                raise HTTPError(400, "prompt must be a non-empty string", param="prompt")
            raw = body.get("raw", False)
            ids = llm.tokenize(prompt) if raw else _chat_ids(
                ([{"role": "system", "content": body["system"]}] if isinstance(body.get("system"), str) else [])
                + [{"role": "user", "content": prompt}])
        if len(ids) >= llm.n_ctx:
            raise HTTPError(400, f"the prompt has {len(ids)} tokens; the context holds {llm.n_ctx}")
        kw = _ollama_sampling(body, len(ids))
        stop = llm.chat_template.stop if (kind == "chat" or not body.get("raw")) else ()
        if stop:
            kw["stop"] = tuple(kw.get("stop", ())) + stop
        gate.enter()
        try:
            try:
                events = llm.stream(ids, **kw)
            except EdgeLLMError as e:
                raise HTTPError(400, str(e)) from None
        except BaseException:
            gate.leave()
            raise
        t0 = time.time()

        def piece(text: str) -> dict:
            head = {"model": model_name, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            return head | ({"message": {"role": "assistant", "content": text}} if kind == "chat" else {"response": text})

        def final(reason) -> dict:
            st = llm.stats
            metrics.generation(st)
            return piece("") | {"done": True, "done_reason": reason or "stop",
                                "total_duration": int((time.time() - t0) * 1e9), "load_duration": 0,
                                "prompt_eval_count": st.prompt_tokens, "prompt_eval_duration": int(st.prompt_s * 1e9),
                                "eval_count": st.gen_tokens, "eval_duration": int(st.gen_s * 1e9)}

        def calls_piece(calls) -> dict:
            out = [{"function": {"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}}
                   for c in calls]
            return piece("") | {"message": {"role": "assistant", "content": "", "tool_calls": out}, "done": False}

        def lines():
            reason = None
            split = ToolStream({t["function"]["name"] for t in tools}) if tools else None
            with contextlib.closing(events):
                for ev in events:
                    reason = ev.finish_reason or reason
                    text, calls = (ev.text, []) if split is None else split.feed(ev.text)
                    if split is not None and ev.finish_reason:
                        rest, more = split.flush()
                        text, calls = text + rest, calls + more
                    if text:
                        yield piece(text) | {"done": False}
                    if calls:
                        yield calls_piece(calls)
            yield final(reason)

        if not stream:
            def whole():
                try:
                    parts, last, calls = [], None, []
                    for d in lines():
                        if d["done"]:
                            last = d
                        else:
                            parts.append(d["message"]["content"] if kind == "chat" else d["response"])
                            calls += d.get("message", {}).get("tool_calls", [])
                    text = "".join(parts)
                    msg = {"role": "assistant", "content": text, **({"tool_calls": calls} if calls else {})}
                    return last | ({"message": msg} if kind == "chat" else {"response": text})
                finally:
                    gate.leave()
            return JSONResponse(await run_in_threadpool(whole))
        gen = lines()

        async def ndjson():
            try:
                async for d in iterate_in_threadpool(gen):
                    if await request.is_disconnected():
                        break
                    yield json.dumps(d) + "\n"
            finally:
                await asyncio.get_running_loop().run_in_executor(None, _close, gen)
                gate.leave()
        return StreamingResponse(ndjson(), media_type="application/x-ndjson")

    @app.post("/api/chat")
    async def ollama_chat(request: Request):
        return await _ollama("chat", request)

    @app.post("/api/generate")
    async def ollama_generate(request: Request):
        return await _ollama("generate", request)

    def _details() -> dict:
        md = llm.metadata
        return {"format": "gguf", "family": md.get("general.architecture", ""),
                "parameter_size": str(md.get("general.size_label", "")),
                "quantization_level": "Q4_K_M" if md.get("general.file_type") == 15 else str(md.get("general.file_type", ""))}

    @app.get("/api/tags")
    async def ollama_tags():
        path = llm.info["path"]
        import os
        st = os.stat(path)
        return {"models": [{"name": model_name, "model": model_name,
                            "modified_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(st.st_mtime)),
                            "size": st.st_size, "digest": "", "details": _details()}]}

    @app.post("/api/show")
    async def ollama_show(request: Request):
        body = await _json(request)
        m = body.get("model", body.get("name"))
        if m not in (model_name, model_name + ":latest"):
            raise HTTPError(404, f"model '{m}' not found", code="model_not_found")
        info = llm.info
        return {"details": _details(), "template": llm.metadata.get("tokenizer.chat_template", ""),
                "parameters": f"num_ctx {info['n_ctx']}",
                "model_info": {"general.architecture": info["architecture"], "block_count": info["layers"]}}

    @app.get("/api/version")
    async def ollama_version():
        from .. import __version__

        return {"version": __version__}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await _json(request)
        text = body.get("content")
        if not isinstance(text, str):
            raise HTTPError(400, "content must be a string", param="content")
        add_special = body.get("add_special", False)
        return {"tokens": llm.tokenize(text, add_bos=bool(add_special), special=True)}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = await _json(request)
        toks = body.get("tokens")
        n = llm.tokenizer.n_vocab
        if not isinstance(toks, list) or len(toks) > llm.n_ctx * 4 or not all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < n for t in toks):
            raise HTTPError(400, f"tokens must be a list of token ids in [0, {n})", param="tokens")
        return {"content": llm.detokenize(toks)}

    known = {r.path for r in app.routes}
    return app


async def _sse(chunks: Iterator[dict], request, gate: _Admission, iterate, done):
    """The chunks as SSE data lines, then [DONE]; a disconnect closes the generation."""
    try:
        async for c in iterate(chunks):
            if await request.is_disconnected():
                break
            yield {"data": json.dumps(c)}
        else:
            done()
            yield {"data": "[DONE]"}
    except asyncio.CancelledError:
        raise
    finally:
        await asyncio.get_running_loop().run_in_executor(None, _close, chunks)
        gate.leave()


def _close(chunks) -> None:
    close = getattr(chunks, "close", None)
    if close is not None:
        try:
            close()
        except Exception:  # a generation interrupted mid-step: nothing to report to a gone client
            pass


def is_loopback(host: str) -> bool:
    return host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")
