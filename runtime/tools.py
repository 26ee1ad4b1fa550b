"""OpenAI tool calls over the model's own chat template (qwen2.5's `<tool_call>` format).

The request's `tools` go to the GGUF's chat template (qwen2.5 lists them in the system turn);
the model answers with blocks of
    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>
which `split_tool_calls` turns into OpenAI `tool_calls` (arguments as a JSON string) and the
text around them. Small models often answer with the same JSON object bare or in a ```json fence
instead; a reply that is only that, naming one of the request's functions, is a call too (as
llama.cpp's Hermes-format parser accepts). `tool_choice` "required" or a named function constrains decoding (llguidance)
to one such block whose JSON matches the function's parameter schema; "none" renders no tools.
A template without a tool format is refused rather than guessed at.
"""
from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import EdgeLLMError

MAX_TOOLS = 64
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*" + re.escape(CLOSE), re.S)
_FENCED = re.compile(r"\s*(?:```(?:json)?\s*)?(\{.*\})\s*(?:```)?\s*", re.S)


class ToolError(EdgeLLMError, ValueError):
    """Malformed `tools` / `tool_choice`, or a model whose chat template has no tool format."""


def check_tools(tools: Any) -> list[dict]:
    """OpenAI `tools` (a list of {"type": "function", "function": {"name", "description",
    "parameters"}}), checked and copied."""
    if not isinstance(tools, list) or not 1 <= len(tools) <= MAX_TOOLS:
        raise ToolError(f"tools must be a list of 1..{MAX_TOOLS} tools")
    out, names = [], set()
    for i, t in enumerate(tools):
        f = t.get("function") if isinstance(t, Mapping) else None
        if not isinstance(t, Mapping) or t.get("type", "function") != "function" or not isinstance(f, Mapping):
            raise ToolError(f'tools[{i}] must be {{"type": "function", "function": {{...}}}}')
        name = f.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ToolError(f"tools[{i}].function.name must be 1-64 letters, digits, '_', '-' or '.'")
        if name in names:
            raise ToolError(f"tools[{i}]: the function name {name!r} is given twice")
        names.add(name)
        params = f.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, Mapping):
            raise ToolError(f"tools[{i}].function.parameters must be a JSON schema object")
        desc = f.get("description", "")
        if not isinstance(desc, str):
            raise ToolError(f"tools[{i}].function.description must be a string")
        out.append({"type": "function", "function": {"name": name, "description": desc, "parameters": dict(params)}})
    return out


def check_tool_choice(choice: Any, tools: list[dict]) -> str:
    """"none", "auto", "required", or the name of one of `tools`."""
    if choice is None:
        return "auto"
    if choice in ("none", "auto", "required"):
        return choice
    f = choice.get("function") if isinstance(choice, Mapping) else None
    name = f.get("name") if isinstance(f, Mapping) else None
    if not isinstance(name, str):
        raise ToolError('tool_choice must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}')
    if name not in {t["function"]["name"] for t in tools}:
        raise ToolError(f"tool_choice names {name!r}, which is not among the tools")
    return name


def supports_tools(template_source: str) -> bool:
    """Whether a chat template renders `tools` (and so knows a tool-call format)."""
    return "tools" in template_source and OPEN in template_source


def template_messages(messages: Sequence[Mapping]) -> list[dict]:
    """OpenAI messages as the template wants them: assistant `tool_calls` with arguments as
    objects (OpenAI sends them as JSON strings), tool results as role "tool"."""
    out = []
    for m in messages:
        m = dict(m)
        calls = m.get("tool_calls")
        if calls:
            fixed = []
            for c in calls:
                f = dict(c.get("function", c)) if isinstance(c, Mapping) else {}
                args = f.get("arguments", {})
                if isinstance(args, str):
                    try:
                        args = json.loads(args)
                    except ValueError:
                        raise ToolError("an assistant tool call's arguments are not valid JSON") from None
                fixed.append({"type": "function", "function": {"name": f.get("name", ""), "arguments": args}})
            m["tool_calls"] = fixed
        if m.get("content") is None:
            m["content"] = ""
        out.append(m)
    return out


def call_grammar(tools: list[dict], choice: str, open_id: int | None, close_id: int | None) -> str:
    """An llguidance grammar for exactly one tool call block (tool_choice "required" or a name):
    the open tag, a JSON object {"name": <one of the functions>, "arguments": <its parameters>},
    the close tag; the tags as their vocabulary tokens when the model has them."""
    import llguidance as ll

    chosen = [t for t in tools if choice == "required" or t["function"]["name"] == choice]
    alts = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
             "properties": {"name": {"const": t["function"]["name"]}, "arguments": t["function"]["parameters"]}}
            for t in chosen]
    schema = alts[0] if len(alts) == 1 else {"anyOf": alts}
    tag = lambda tid, text: f"<[{tid}]>" if tid is not None else json.dumps(text)  # noqa: E731
    lark = (f'start: {tag(open_id, OPEN)} "\\n" call "\\n" {tag(close_id, CLOSE)}\n'
            f"call: %json {json.dumps(schema)}\n")
    grammar = ll.LLMatcher.grammar_from_lark(lark)
    is_error, msgs = ll.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise ToolError(f"the tools' parameter schemas cannot be used: {msgs[0]}")
    return grammar


def _call(body: str, names: set[str] | None) -> dict | None:
    """An OpenAI tool call from a block's JSON, or None if it is not {"name": ..., "arguments": {...}}."""
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or (names is not None and obj["name"] not in names):
        return None
    args = obj.get("arguments", {})
    if not isinstance(args, dict):
        return None
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)}}


def split_tool_calls(text: str, names: set[str] | None = None) -> tuple[str, list[dict]]:
    """(the text outside tool-call blocks, the blocks as OpenAI tool_calls). A block whose JSON
    does not parse, lacks a name or names no function in `names` stays in the text: nothing is
    invented. Without blocks, a reply that is one such JSON object (bare or fenced) is a call."""
    calls, kept, at = [], [], 0
    for m in _BLOCK.finditer(text):
        c = _call(m.group(1), names)
        if c is None:
            continue
        kept.append(text[at:m.start()])
        at = m.end()
        calls.append(c)
    kept.append(text[at:])
    if not calls and names is not None:
        m = _FENCED.fullmatch(text)
        c = _call(m.group(1), names) if m else None
        if c is not None:
            return "", [c]
    return "".join(kept).strip() if calls else text, calls


class ToolStream:
    """Splits streamed text into content pieces and finished tool calls: text from an opening
    tag on is held back until its block closes (or the stream ends: then it is content). A reply
    that begins like a bare or fenced JSON object is held whole, and `flush` decides."""

    def __init__(self, names: set[str]):
        self.names = names
        self.buf = ""
        self.whole: str | None = None  # the reply so far while it may be one bare JSON call
        self.started = False

    def feed(self, piece: str) -> tuple[str, list[dict]]:
        """(content to send now, tool calls completed by this piece)."""
        if self.whole is not None or not self.started:
            lead = ((self.whole or "") + piece).lstrip()
            if not self.started and not lead:
                self.whole = (self.whole or "") + piece
                return "", []
            self.started = True
            if lead.startswith(("{", "`")):
                self.whole = (self.whole or "") + piece
                return "", []
            piece, self.whole = (self.whole or "") + piece, None
        self.buf += piece
        content, calls = "", []
        while True:
            i = self.buf.find(OPEN)
            if i < 0:  # keep back a suffix that could be the start of an opening tag
                keep = next((k for k in range(min(len(OPEN) - 1, len(self.buf)), 0, -1)
                             if OPEN.startswith(self.buf[-k:])), 0)
                content += self.buf[:len(self.buf) - keep]
                self.buf = self.buf[len(self.buf) - keep:]
                return content, calls
            j = self.buf.find(CLOSE, i)
            if j < 0:
                content += self.buf[:i]
                self.buf = self.buf[i:]
                return content, calls
            text, found = split_tool_calls(self.buf[i:j + len(CLOSE)], self.names)
            content += self.buf[:i] + ("" if found else text)
            calls += found
            self.buf = self.buf[j + len(CLOSE):]

    def flush(self) -> tuple[str, list[dict]]:
        """At the end: (the content held back, a bare JSON call if the whole reply was one)."""
        if self.whole is not None:
            whole, self.whole = self.whole, None
            content, calls = split_tool_calls(whole, self.names)
            if calls:
                return "", calls
            text, calls = self.feed_rest(whole)
            return text, calls
        rest, self.buf = self.buf, ""
        return rest, []

    def feed_rest(self, text: str) -> tuple[str, list[dict]]:
        """The held reply, not a bare call after all, through the block splitter."""
        self.started = True
        content, calls = self.feed(text)
        rest, more = self.flush()
        return content + rest, calls + more
