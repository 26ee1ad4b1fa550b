"""The Python library API: `edgellm.load(model) -> LLM`.

    import edgellm
    with edgellm.load("gemma3-270m", threads=4) as llm:
        print(llm.generate("The capital of France is", temperature=0, max_tokens=16))
        print(llm.chat([{"role": "user", "content": "Hi!"}]))
        for ev in llm.stream_chat([{"role": "user", "content": "Tell me a joke"}]):
            print(ev.text, end="", flush=True)
        r = llm.create_chat_completion([{"role": "user", "content": "Hi"}])   # OpenAI-shaped dict
        r["choices"][0]["message"]["content"]

Sampling keywords are `SamplingParams`' fields and their usual aliases (`temp`, `max_new_tokens`,
`repetition_penalty`, ...). `max_tokens=None` (or 0, as llama-cpp-python) means "until the end of
generation or a full context". One lock serialises calls: a web app's handlers may share one `LLM`;
a stream holds the lock until it is exhausted or closed. Later turns of a chat reuse the KV cache
of the common prefix, so only the new tokens are processed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from ..errors import EdgeLLMError
from ..loaders.store import DEFAULT_MODEL
from .chat_template import ChatTemplate
from .config import ConfigError, RuntimeConfig
from .engine import Engine, Event
from .grammar import grammar_for_response_format
from .tools import (CLOSE, OPEN, ToolError, ToolStream, call_grammar, check_tool_choice, check_tools,
                    split_tool_calls, supports_tools, template_messages)
from .sampler import SamplingParams


class InvalidArgument(EdgeLLMError, ValueError):
    """A call to the Python API got a bad argument; the message names it."""


def load(model: str | Path = DEFAULT_MODEL, *, progress=None, **settings) -> "LLM":
    """Load a catalog model (fetched on first use) or a GGUF file into an `LLM`.

    Settings are `RuntimeConfig`'s fields: `threads`, `ctx` (or `n_ctx`), `n_batch`, `backend`, `cluster`
    (a list of "host:port" workers), `cluster_key`, `cluster_allow`, `cluster_split`, ...; and `memory_budget` (bytes, or a size such as
    "400M" or "1.5G": weights that do not fit stream from disk; without a `ctx` the context is the
    longest up to 4096 that fits, down to 256), `cache_type` ("f16", "q8_0", "q4_0"), `parallel` (N
    generations at once from any threads, batched token by token). Unknown or bad settings raise
    `ValueError` naming them.
    `progress(stage, done_bytes, total_bytes)` is called while a catalog model is downloaded.
    """
    rcfg = _runtime_config(settings)
    return LLM(Engine.load(str(model), rcfg, progress=progress), str(model))


def _runtime_config(settings: dict) -> RuntimeConfig:
    known = {f.name for f in dataclasses.fields(RuntimeConfig)}
    unknown = sorted(set(settings) - known - {"ctx"})
    if unknown:
        raise InvalidArgument(f"unknown setting{'s' * (len(unknown) > 1)} {', '.join(map(repr, unknown))}; "
                              f"known: {', '.join(sorted(known | {'ctx'}))}")
    kw = dict(settings)
    if kw.get("ctx") is None and kw.get("n_ctx") is None:  # no context asked for: fit a memory budget
        kw.pop("ctx", None)
        kw.pop("n_ctx", None)
        kw.setdefault("fit_ctx", True)
    if "ctx" in kw:
        if "n_ctx" in kw:
            raise InvalidArgument("give ctx or n_ctx, not both")
        kw["n_ctx"] = kw.pop("ctx")
    try:
        return RuntimeConfig(**kw)
    except ConfigError as e:  # names the setting; a ValueError like every other bad argument here
        raise InvalidArgument(str(e)) from None


class LLM:
    """A loaded model with generation, chat and llama-cpp-python-compatible completion calls.
    Build it with `edgellm.load`; close it (or use `with`) to release the model file."""

    def __init__(self, engine: Engine, name: str):
        self._engine = engine
        self.model = name                      # the name or path it was loaded from
        self.tokenizer = engine.tokenizer
        self.n_ctx = engine.n_ctx              # context length in tokens
        self._template: ChatTemplate | None = None
        self._lock = threading.Lock()
        self._owner: int | None = None         # thread id holding the lock
        self._closed = False
        self._batch = None                     # runtime/batch.Batcher with parallel > 1: no lock, N slots
        if engine.rcfg.parallel > 1:
            from .batch import Batcher
            self._batch = Batcher(engine, engine.rcfg.parallel)

    # --- properties ---

    @property
    def metadata(self) -> dict:
        """The GGUF file's metadata."""
        return self._engine.file.metadata

    @property
    def chat_template(self) -> ChatTemplate:
        """The model's chat template (the file's own, or a built-in fallback), compiled on first use."""
        if self._template is None:
            self._template = ChatTemplate.for_model(self.metadata, self.tokenizer)
        return self._template

    @property
    def stats(self):
        """Timings of the last generation (`Stats`: prompt/generated tokens, tokens/s, time to first token)."""
        return self._batch.last_stats if self._batch is not None else self._engine.stats

    @property
    def info(self) -> dict:
        """Architecture, layers, context, kernels and threads in use."""
        cfg, r = self._engine.config, self._engine.rcfg
        return {"model": self.model, "path": str(self._engine.path), "architecture": cfg.arch,
                "layers": cfg.n_layer, "n_ctx": self.n_ctx, "threads": r.threads, "kernels": self._engine.backend}

    # --- tokens ---

    def tokenize(self, text: str | bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        """Token ids of `text`; `add_bos` adds the model's BOS/EOS, `special` parses control tokens."""
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        if not isinstance(text, str):
            raise InvalidArgument(f"text must be str or bytes, not {type(text).__name__}")
        return self.tokenizer.encode(text, add_special=add_bos, parse_special=special)

    def detokenize(self, tokens: Sequence[int], special: bool = False) -> str:
        """Text of token ids; control tokens are written out only when `special`."""
        return self.tokenizer.decode(self._check_ids(tokens, "tokens"), special=special)

    # --- generation ---

    def generate(self, prompt: str | Sequence[int], **sampling) -> str:
        """The continuation of `prompt` (text, or token ids) as one string."""
        return "".join(ev.text for ev in self.stream(prompt, **sampling))

    def stream(self, prompt: str | Sequence[int], **sampling) -> Iterator[Event]:
        """Events (`token`, `text` piece, `tokens_per_s` so far, `finish_reason` on the last) as
        tokens are generated. Arguments are checked now; close the iterator to stop early."""
        return self._events(self._prompt_ids(prompt), self._params(sampling))

    def chat(self, messages: Sequence[Mapping], **sampling) -> str:
        """The assistant's reply to `messages` (dicts with `role` and `content`), rendered with the
        model's chat template."""
        return "".join(ev.text for ev in self.stream_chat(messages, **sampling))

    def stream_chat(self, messages: Sequence[Mapping], **sampling) -> Iterator[Event]:
        """The assistant's reply to `messages` as `Event`s, like `stream`."""
        ids = self._prompt_ids(self.chat_ids(messages))
        return self._events(ids, self._params(sampling, self.chat_template.stop))

    def chat_ids(self, messages: Sequence[Mapping], tools: list[dict] | None = None) -> list[int]:
        """Token ids of `messages` rendered with the chat template, ending with the assistant's turn;
        `tools` (checked OpenAI tools) go to the template, which must have a tool format."""
        tpl = self.chat_template
        msgs = _check_messages(messages)
        if tools:
            if not supports_tools(tpl.source):
                raise ToolError(f"{self.model}'s chat template has no tool-call format; tools cannot be used")
            return tpl.encode(self.tokenizer, tpl.render(template_messages(msgs), tools=tools))
        return tpl.encode(self.tokenizer, tpl.render(msgs))

    # --- llama-cpp-python compatible ---

    def create_completion(self, prompt: str | Sequence[int], *, stream: bool = False, echo: bool = False,
                          model: str | None = None, logprobs: int | None = None, response_format=None,
                          **sampling):
        """llama-cpp-python's `create_completion` (`max_tokens` defaults to 16 as there): an OpenAI
        `text_completion` dict, or with `stream=True` an iterator of chunks (`choices[0]["text"]`).
        `logprobs=N` (0..20): each token's log-probability and the N likeliest alternatives, in
        OpenAI's completions shape; `response_format` as in `create_chat_completion`."""
        ids = self._prompt_ids(prompt)
        events = self._events(ids, self._params(sampling, default_max=16, logprobs=logprobs,
                                                response_format=response_format))
        head = self._head("cmpl", "text_completion", model)
        pre = (prompt if isinstance(prompt, str) else self.detokenize(ids)) if echo else ""
        lp = None if logprobs is None else self._completion_logprobs

        def choice(text, reason, evs=()):
            return {"text": text, "index": 0, "logprobs": lp(evs) if lp else None, "finish_reason": reason}

        if stream:
            return self._chunks(events, head, lambda t, r, evs: [choice(t, r, evs)], pre)
        text, reason, n, evs = self._drain(events)
        return {**head, "choices": [choice(pre + text, reason, evs)], "usage": _usage(len(ids), n)}

    def create_chat_completion(self, messages: Sequence[Mapping], *, stream: bool = False,
                               model: str | None = None, logprobs: bool = False, top_logprobs: int | None = None,
                               response_format=None, tools=None, tool_choice=None, **sampling):
        """llama-cpp-python's `create_chat_completion`: an OpenAI `chat.completion` dict
        (`choices[0]["message"]["content"]`, `usage`), or with `stream=True` an iterator of
        `chat.completion.chunk` dicts (`choices[0]["delta"]`).
        `response_format`: {"type": "json_object"} or {"type": "json_schema", "json_schema":
        {"name": ..., "schema": {...}}}: decoding is constrained (llguidance) so that the reply
        parses and matches the schema unless `max_tokens` cuts it. `logprobs=True` (with
        `top_logprobs` 0..20): `choices[0]["logprobs"]["content"]` as OpenAI gives it.
        `tools` / `tool_choice` ("auto", "none", "required" or {"type": "function", "function":
        {"name": ...}}): the model's own tool format (runtime/tools.py); calls come back as
        `message["tool_calls"]` with finish_reason "tool_calls" (streamed as `delta["tool_calls"]`)."""
        if not isinstance(logprobs, bool):
            raise InvalidArgument(f"logprobs must be true or false, not {logprobs!r}")
        if top_logprobs is not None and not logprobs:
            raise InvalidArgument("top_logprobs needs logprobs: true")
        tools = check_tools(tools) if tools is not None else None
        choice = check_tool_choice(tool_choice, tools or [])
        use_tools = bool(tools) and choice != "none"
        if use_tools and choice != "auto" and response_format is not None:
            raise InvalidArgument("tool_choice that forces a call and response_format cannot be combined")
        ids = self._prompt_ids(self.chat_ids(messages, tools if use_tools else None))
        n_top = (top_logprobs or 0) if logprobs else None
        params = self._params(sampling, self.chat_template.stop, logprobs=n_top, response_format=response_format)
        if use_tools and choice != "auto":
            vocab = self.tokenizer.vocab
            params = dataclasses.replace(params, grammar=call_grammar(tools, choice, vocab.get(OPEN), vocab.get(CLOSE)))
        events = self._events(ids, params)
        lp = self._chat_logprobs if logprobs else None
        if stream:
            head = self._head("chatcmpl", "chat.completion.chunk", model)
            first = {**head, "choices": [{"index": 0, "delta": {"role": "assistant"}, "logprobs": None,
                                          "finish_reason": None}]}
            if use_tools:
                return self._tool_chunks(events, head, first, lp, {t["function"]["name"] for t in tools})

            def delta(text, reason, evs):
                d = {} if reason else {"content": text}
                return [{"index": 0, "delta": d, "logprobs": lp(evs) if lp and evs else None, "finish_reason": reason}]

            return self._chunks(events, head, delta, first=first)
        text, reason, n, evs = self._drain(events)
        msg = {"role": "assistant", "content": text}
        if use_tools:
            content, calls = split_tool_calls(text, {t["function"]["name"] for t in tools})
            if calls:
                msg = {"role": "assistant", "content": content or None, "tool_calls": calls}
                reason = "tool_calls"
        return {**self._head("chatcmpl", "chat.completion", model),
                "choices": [{"index": 0, "message": msg, "logprobs": lp(evs) if lp else None, "finish_reason": reason}],
                "usage": _usage(len(ids), n)}

    def _tool_chunks(self, events, head, first, lp, names):
        """Stream chunks of a reply that may call tools: content as it comes, each call in one
        `delta["tool_calls"]` chunk once its block is complete."""
        split, n_calls, pending = ToolStream(names), 0, []

        def chunk(delta, reason=None, evs=()):
            return {**head, "choices": [{"index": 0, "delta": delta, "logprobs": lp(evs) if lp and evs else None,
                                         "finish_reason": reason}]}
        with contextlib.closing(events):
            yield first
            for ev in events:
                if not (ev.finish_reason == "stop" and self.tokenizer.is_eog(ev.token)):
                    pending.append(ev)
                text, calls = split.feed(ev.text)
                if ev.finish_reason:
                    rest, more = split.flush()
                    text, calls = text + rest, calls + more
                if text:
                    yield chunk({"content": text}, evs=pending)
                    pending = []
                for c in calls:
                    yield chunk({"tool_calls": [{"index": n_calls, **c}]}, evs=pending)
                    pending, n_calls = [], n_calls + 1
                if ev.finish_reason:
                    yield chunk({}, "tool_calls" if n_calls else ev.finish_reason, pending)

    def _token_entry(self, tok: int, logprob: float) -> dict:
        b = self.tokenizer.token_bytes(tok, special=True)
        return {"token": b.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(b)}

    def _chat_logprobs(self, evs) -> dict:
        return {"content": [{**self._token_entry(e.token, e.logprob),
                             "top_logprobs": [self._token_entry(i, lp) for i, lp in e.top_logprobs]} for e in evs]}

    def _completion_logprobs(self, evs) -> dict:
        text = lambda t: self._token_entry(t, 0.0)["token"]  # noqa: E731
        tokens = [text(e.token) for e in evs]
        offsets = list(itertools.accumulate((len(t) for t in tokens[:-1]), initial=0))[:len(tokens)]
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in evs],
                "top_logprobs": [{text(i): lp for i, lp in e.top_logprobs} for e in evs], "text_offset": offsets}

    def reset(self) -> None:
        """Forget the KV cache: the next call processes its whole prompt. (Greedy outputs can differ
        at near-ties between a prompt processed whole and one that reuses a cached prefix.)"""
        if self._batch is not None:
            self._batch.reset()
            return
        self._check_thread()
        with self._lock:
            self._engine.reset()

    # --- life cycle ---

    def close(self) -> None:
        """Release the model; later calls raise. Waits for a generation running in another thread."""
        if self._closed:
            return
        if self._batch is not None:
            self._closed = True
            self._batch.close()  # requests still running end with an error
            self._engine.close()
            return
        mine = self._owner == threading.get_ident()
        if not mine:
            self._lock.acquire()
        try:
            self._closed = True
            self._engine.close()
        finally:
            if not mine:
                self._lock.release()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LLM({self.model!r}, n_ctx={self.n_ctx}{', closed' if self._closed else ''})"

    # --- internals ---

    def _events(self, ids: list[int], params: SamplingParams) -> Iterator[Event]:
        """Generate under the lock, taken at the first step and released when done or closed; with
        parallel slots, through the batch scheduler (any number of threads at once)."""
        if self._batch is not None:
            if self._closed:
                raise EdgeLLMError("this LLM is closed")
            return self._batch.submit(ids, params)
        return self._locked_events(ids, params)

    def _locked_events(self, ids: list[int], params: SamplingParams) -> Iterator[Event]:
        self._check_thread()
        started = False
        with self._lock:
            self._owner = threading.get_ident()
            try:
                if self._closed:
                    raise EdgeLLMError("this LLM is closed")
                for ev in self._engine.generate(ids, params):
                    started = True
                    yield ev
            except BaseException as e:
                if not started and not isinstance(e, GeneratorExit):
                    self._engine.reset()  # interrupted mid-prefill: cache rows past engine.tokens may be torn
                raise
            finally:
                self._owner = None

    def _check_thread(self) -> None:
        if self._owner == threading.get_ident():  # waiting for the lock would wait forever
            raise EdgeLLMError("another generation of this LLM is still open in this thread; "
                               "finish or close it first")

    def _params(self, kw: dict, stop: tuple[str, ...] = (), default_max: int | None = None,
                logprobs: int | None = None, response_format=None) -> SamplingParams:
        kw = dict(kw)
        response_format = kw.pop("response_format", response_format)  # stream()/chat() take it too
        if logprobs is not None:
            kw["logprobs"] = logprobs
        if response_format is not None:
            kw["grammar"] = grammar_for_response_format(response_format)  # GrammarError: a ValueError
        aliases = ("max_tokens", "max_new_tokens", "n_predict")
        if default_max is not None and not any(a in kw for a in aliases):
            kw["max_tokens"] = default_max
        for alias in aliases:
            if alias in kw:
                v = kw[alias]
                if v is None or (isinstance(v, int) and not isinstance(v, bool) and v == 0):
                    kw[alias] = -1
                elif not isinstance(v, int) or isinstance(v, bool) or v < 0:
                    raise InvalidArgument(f"{alias} must be a positive integer or None (no limit), not {v!r}")
        if stop:
            given = kw.pop("stop", None) or ()
            kw["stop"] = ((given,) if isinstance(given, str) else tuple(given)) + stop
        return SamplingParams.from_kwargs(**kw)

    def _prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, bytes):
            ids = self.tokenizer.encode(prompt.decode("utf-8", "replace"))
        else:
            ids = self._check_ids(prompt, "prompt")
        if not ids:
            raise InvalidArgument("prompt is empty")
        if len(ids) >= self.n_ctx:
            raise InvalidArgument(f"prompt has {len(ids)} tokens; the context holds {self.n_ctx} "
                                  f"(load with a larger ctx, or shorten the prompt)")
        return ids

    def _check_ids(self, ids, name: str) -> list[int]:
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
            raise InvalidArgument(f"{name} must be text or a list of token ids, not {type(ids).__name__}")
        n = self.tokenizer.n_vocab
        for t in ids:
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < n:
                raise InvalidArgument(f"{name} holds {t!r}, not a token id in [0, {n})")
        return list(ids)

    def _head(self, prefix: str, obj: str, model: str | None) -> dict:
        return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": obj, "created": int(time.time()),
                "model": model or self.model}

    def _drain(self, events: Iterator[Event]) -> tuple[str, str | None, int, list[Event]]:
        """(text, finish reason, completion tokens, their events: an ending EOG token left out)."""
        pieces, reason, kept = [], None, []
        for ev in events:
            pieces.append(ev.text)
            reason = ev.finish_reason
            if not (reason == "stop" and self.tokenizer.is_eog(ev.token)):
                kept.append(ev)
        return "".join(pieces), reason, len(kept), kept

    def _chunks(self, events, head, choices, pre: str = "", first: dict | None = None):
        """Stream chunks: one per event with text, carrying the events since the last chunk."""
        with contextlib.closing(events):
            if first:
                yield first
            if pre:
                yield {**head, "choices": choices(pre, None, [])}
            pending = []
            for ev in events:
                if not (ev.finish_reason == "stop" and self.tokenizer.is_eog(ev.token)):
                    pending.append(ev)
                if ev.text:
                    yield {**head, "choices": choices(ev.text, None, pending)}
                    pending = []
                if ev.finish_reason:
                    yield {**head, "choices": choices("", ev.finish_reason, pending)}


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _check_messages(messages) -> list[dict]:
    """Messages as dicts with string `role` and `content`; OpenAI's list-of-parts content is joined."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence) or not messages:
        raise InvalidArgument("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise InvalidArgument(f"messages[{i}] must be a dict with a string 'role'")
        c = m.get("content")
        if isinstance(c, list) and all(isinstance(p, Mapping) and p.get("type") == "text" for p in c):
            c = "".join(str(p.get("text", "")) for p in c)
        if c is not None and not isinstance(c, str):
            raise InvalidArgument(f"messages[{i}]['content'] must be a string, not {type(c).__name__}")
        out.append({**m, "content": c if c is not None else ""})
    return out
