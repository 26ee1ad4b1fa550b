"""`edgellm chat`: a conversation with a model, and the read-eval-print loop around it.

`ChatSession` keeps the messages, the sampling settings and the token ids of the conversation so far
(prompt plus the generated tokens, as generated). A follow-up's prompt reuses those ids for the longest
part of the newly rendered conversation they spell out, and tokenizes only the rest; so its token prefix
is the one in the KV cache and only the new tokens are processed. When a conversation outgrows the
context the oldest turns are dropped (the system prompt stays). `repl` reads lines and commands.
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
from collections.abc import Callable, Iterator
from typing import TextIO

from ..errors import EdgeLLMError
from .api import LLM
from .engine import Event
from .sampler import SamplingParams
from .tokenizer import CONTROL

# /set NAME -> (SamplingParams field, parser)
SETTABLE: dict[str, tuple[str, Callable[[str], object]]] = {
    "temp": ("temperature", float), "temperature": ("temperature", float),
    "top_k": ("top_k", int), "top_p": ("top_p", float), "min_p": ("min_p", float),
    "seed": ("seed", lambda s: None if s.lower() in ("none", "random", "-1") else int(s)),
    "max_tokens": ("max_tokens", int),
}

HELP = """commands:
  /help                 this help
  /bye                  leave (or Ctrl+D)
  /clear                start a new conversation (the system prompt stays)
  /system TEXT          set the system prompt (starts a new conversation); /system alone shows it
  /set NAME VALUE       NAME: temp, top_k, top_p, min_p, seed (or none), max_tokens (-1: no limit)
  /show                 model information and current settings
  /stats                speed and memory of the last reply
  \"\"\"                   begin and end multi-line input
Ctrl+C stops a reply and keeps the conversation."""


BASE_CAP = 256  # tokens a base model's reply may take unless /set max_tokens says otherwise


class ChatSession:
    """A conversation over an `LLM`: messages, settings, and the token ids already in the KV cache.

    A base model (no chat template in its file) has no end-of-turn habit: its replies end at a
    blank line or after BASE_CAP tokens (`/set max_tokens` replaces the cap)."""

    def __init__(self, llm: LLM, system: str | None = None, **sampling):
        self.llm = llm
        self.system = system or None
        self.messages: list[dict] = []      # user/assistant turns, oldest first (system kept apart)
        self.params = SamplingParams.from_kwargs(**sampling)
        self.base = llm.chat_template.name != "model"
        self.cap = BASE_CAP if self.base and self.params.max_tokens < 0 else None
        self._ids: list[int] = []           # the last prompt's ids + the tokens generated after it
        self.dropped = 0                    # turns dropped to fit the context by the last `reply`

    # --- state ---

    def clear(self) -> None:
        """Forget the turns (the system prompt stays)."""
        self.messages = []

    def set_system(self, text: str | None) -> None:
        """Replace the system prompt and start a new conversation."""
        self.system = text or None
        self.clear()

    def set(self, name: str, value: str) -> SamplingParams:
        """`/set NAME VALUE`: parse and validate, keep the old settings on error."""
        if name not in SETTABLE:
            raise EdgeLLMError(f"cannot set '{name}'; settable: {', '.join(k for k in SETTABLE if k != 'temperature')}")
        field, parse = SETTABLE[name]
        try:
            v = parse(value)
        except ValueError:
            raise EdgeLLMError(f"{name}: '{value}' is not a {parse.__name__ if parse in (int, float) else 'number'}") from None
        self.params = dataclasses.replace(self.params, **{field: v})
        if field == "max_tokens":
            self.cap = None  # the user's limit replaces a base model's cap
        return self.params

    def conversation(self) -> list[dict]:
        """The messages the template renders: the system prompt, then the turns."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.messages

    # --- prompt ---

    def prompt_ids(self) -> list[int]:
        """Token ids of the rendered conversation; the longest prefix spelt by the previous turn's ids
        (generated tokens included) is reused as is, only the rest is tokenized."""
        tpl, tok = self.llm.chat_template, self.llm.tokenizer
        text = tpl.render(self.conversation())
        target = text.encode("utf-8")
        keep, pos, ends = 0, 0, [0]
        for i in self._ids:
            b = tok.token_bytes(i)
            if target[pos:pos + len(b)] != b or not b:
                break
            keep, pos = keep + 1, pos + len(b)
            ends.append(pos)
        # the rest must start on a character boundary, and after a special token where SPM adds a space
        while keep and ((target[pos:pos + 1] and (target[pos] & 0xC0) == 0x80) or
                        (tok.add_space_prefix and not tok.attrs[self._ids[keep - 1]] & CONTROL)):
            keep -= 1
            pos = ends[keep]
        if keep == 0:
            return tpl.encode(tok, text)
        return self._ids[:keep] + tok.encode(target[pos:].decode("utf-8"), add_special=False, parse_special=True)

    def _fit(self) -> list[int]:
        """The prompt ids. When they and room for a reply exceed the context, the oldest turns are
        dropped until a quarter of the context is free besides (so the next turns reuse the cache
        again instead of each shifting it); a message that cannot fit even alone is refused."""
        n_ctx = self.llm.n_ctx
        room = min(self.params.max_tokens if self.params.max_tokens > 0 else 256, n_ctx // 4)
        self.dropped = 0
        ids = self.prompt_ids()
        if len(ids) + room <= n_ctx:
            return ids
        kept = self.messages
        try:
            while len(self.messages) >= 3 and len(ids) + room > n_ctx - (n_ctx // 4 if self.dropped else 0):
                self.messages = self.messages[2:]  # the oldest user turn and its reply
                self.dropped += 1
                ids = self.prompt_ids()
            if len(ids) >= n_ctx:
                raise EdgeLLMError(f"the message is too long: {len(ids)} tokens, and the context holds {n_ctx}")
        except BaseException:
            self.messages, self.dropped = kept, 0
            raise
        return ids

    # --- a turn ---

    def reply(self, user_text: str) -> Iterator[Event]:
        """Add a user turn and stream the assistant's reply; the reply (or, if stopped early, the part
        generated so far) joins the conversation when the stream ends or is closed."""
        if self.messages and self.messages[-1]["role"] == "user":
            self.messages.pop()  # a turn whose stream was dropped unstarted
        self.messages.append({"role": "user", "content": user_text})
        try:
            ids = self._fit()
            kw = dataclasses.asdict(self.params)
            kw["stop"] = self.params.stop + self.llm.chat_template.stop + (("\n\n",) if self.base else ())
            kw["max_tokens"] = self.cap or (kw["max_tokens"] if kw["max_tokens"] > 0 else None)
            events = self.llm.stream(ids, **kw)
        except BaseException:
            if self.messages and self.messages[-1]["role"] == "user":
                self.messages.pop()
            raise
        return self._run(ids, events)

    def _run(self, ids: list[int], events: Iterator[Event]) -> Iterator[Event]:
        pieces, gen = [], []
        try:
            with contextlib.closing(events):
                for ev in events:
                    pieces.append(ev.text)
                    gen.append(ev.token)
                    yield ev
        finally:
            self._ids = ids + gen
            if gen:
                self.messages.append({"role": "assistant", "content": "".join(pieces)})
            else:                              # stopped before any token: the turn never happened
                self.messages.pop()


def stats_text(st) -> str:
    """One line about the last reply: prompt and generation speed, time to first token, peak memory."""
    cached = f" (+{st.cached_tokens} reused from the KV cache)" if st.cached_tokens else ""
    return (f"prompt: {st.prompt_tokens} tokens{cached} at {st.prompt_tokens_per_s:.1f} tok/s | "
            f"reply: {st.gen_tokens} tokens at {st.tokens_per_s:.1f} tok/s | "
            f"first token after {st.ttft_s:.2f} s | peak memory {st.peak_rss_bytes / 1e6:,.0f} MB")


def _read_input(read: Callable[[str], str], prompt: str, more: str) -> str:
    """One message: a line, or the lines between triple quotes."""
    line = read(prompt)
    if not line.lstrip().startswith('"""'):
        return line
    body = line.lstrip()[3:]
    lines = []
    while True:
        if body.rstrip().endswith('"""'):
            lines.append(body.rstrip()[:-3])
            return "\n".join(lines)
        lines.append(body)
        body = read(more)


def repl(session: ChatSession, out: TextIO | None = None, verbose: bool = False, interactive: bool | None = None) -> None:
    """Read messages and commands until /bye or end of input; stream each reply to `out` (stdout)."""
    out = out or sys.stdout
    if interactive is None:
        interactive = sys.stdin.isatty()
    if interactive:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and history for input())
    prompt, more = (">>> ", "... ") if interactive else ("", "")

    def say(text: str) -> None:
        out.write(text + "\n")
        out.flush()

    if interactive:
        say(f"edgellm chat with {session.llm.model}. /help for commands, /bye or Ctrl+D to leave.")
    if session.base:
        say(f"[{session.llm.model} has no chat template (a base model): replies use the built-in "
            f"{session.llm.chat_template.name} turn format and end at a blank line"
            f"{f' or after {session.cap} tokens (/set max_tokens N)' if session.cap else ''}]")
    while True:
        try:
            text = _read_input(input, prompt, more)
        except EOFError:
            if interactive:
                say("")
            return
        except KeyboardInterrupt:
            say("\n(Ctrl+D or /bye to leave)")
            continue
        if not text.strip():
            continue
        if text.startswith("/") and not text.startswith("//"):
            if _command(session, text, say) == "bye":
                return
            continue
        _turn(session, text[1:] if text.startswith("//") else text, out, say, verbose)


def _turn(session: ChatSession, text: str, out: TextIO, say, verbose: bool) -> None:
    try:
        events = session.reply(text)
    except EdgeLLMError as e:
        say(f"error: {e}")
        return
    if session.dropped:
        say(f"[the conversation is longer than the context ({session.llm.n_ctx} tokens): "
            f"dropped the {session.dropped} oldest turn{'s' * (session.dropped > 1)}]")
    try:
        with contextlib.closing(events):
            for ev in events:
                out.write(ev.text)
                out.flush()
        say("")
    except KeyboardInterrupt:
        say("\n[stopped]")
    except EdgeLLMError as e:
        say(f"\nerror: {e}")
    if verbose:
        say(f"[{stats_text(session.llm.stats)}]")


def _command(session: ChatSession, text: str, say) -> str | None:
    cmd, _, arg = text.strip().partition(" ")
    arg = arg.strip()
    if cmd in ("/bye", "/exit", "/quit"):
        return "bye"
    if cmd in ("/help", "/?"):
        say(HELP)
    elif cmd == "/clear":
        session.clear()
        say("[new conversation]")
    elif cmd == "/system":
        if arg:
            session.set_system(arg)
            say("[system prompt set; new conversation]")
        else:
            say(session.system or "[no system prompt]")
    elif cmd == "/set":
        name, _, value = arg.partition(" ")
        if not value.strip():
            say("usage: /set temp|top_k|top_p|min_p|seed|max_tokens VALUE")
            return None
        try:
            session.set(name.replace("-", "_"), value.strip())
            say(f"[{name} = {value.strip()}]")
        except EdgeLLMError as e:
            say(f"error: {e}")
    elif cmd == "/show":
        p = session.params
        for k, v in session.llm.info.items():
            say(f"{k:<14}{v}")
        say(f"{'template':<14}{session.llm.chat_template.name}")
        say(f"{'system':<14}{session.system or '-'}")
        say(f"{'settings':<14}temp {p.temperature:g}, top_k {p.top_k}, top_p {p.top_p:g}, min_p {p.min_p:g}, "
            f"seed {p.seed if p.seed is not None else 'random'}, max_tokens {p.max_tokens}")
        say(f"{'conversation':<14}{len(session.messages)} messages")
    elif cmd == "/stats":
        st = session.llm.stats
        say(stats_text(st) if st.gen_tokens else "[no reply yet]")
    else:
        say(f"unknown command {cmd}; /help lists them (start a message with // to send a literal /)")
    return None
