"""Tool calls (runtime/tools.py): splitting replies into text and calls, the streaming splitter
(same result whatever the piece boundaries), checks of `tools`, and a model without a tool format."""
from __future__ import annotations

import json

import pytest

from edgellm.runtime.tools import ToolError, ToolStream, check_tool_choice, check_tools, split_tool_calls

from conftest import model_file

NAMES = {"add", "get_weather"}
BLOCK = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
REPLIES = [  # (reply, text left, names of the calls)
    ("Sure. " + BLOCK, "Sure.", ["add"]),
    (BLOCK + "\n" + BLOCK.replace("add", "get_weather"), "", ["add", "get_weather"]),
    ('```json\n{"name": "add", "arguments": {"a": 1}}\n```', "", ["add"]),
    ('  {"name": "get_weather", "arguments": {"city": "Oslo"}}', "", ["get_weather"]),
    ('{"name": "rm_rf", "arguments": {}}', '{"name": "rm_rf", "arguments": {}}', []),  # not a given function
    ("<tool_call>\n{broken json\n</tool_call>", "<tool_call>\n{broken json\n</tool_call>", []),
    ("The answer is <b>4</b>.", "The answer is <b>4</b>.", []),
    ('Here: {"name": "add", "arguments": {}} (bare JSON inside prose is text)',
     'Here: {"name": "add", "arguments": {}} (bare JSON inside prose is text)', []),
]


@pytest.mark.parametrize("reply, text, names", REPLIES)
def test_split_tool_calls(reply, text, names):
    content, calls = split_tool_calls(reply, NAMES)
    assert content == text and [c["function"]["name"] for c in calls] == names
    for c in calls:
        assert c["type"] == "function" and c["id"].startswith("call_")
        assert isinstance(json.loads(c["function"]["arguments"]), dict)


@pytest.mark.parametrize("reply, text, names", REPLIES)
@pytest.mark.parametrize("size", [1, 3, 7, 1000])
def test_streaming_split_matches_whole_reply(reply, text, names, size):
    s = ToolStream(NAMES)
    content, calls = "", []
    for i in range(0, len(reply), size):
        c, k = s.feed(reply[i:i + size])
        content, calls = content + c, calls + k
    c, k = s.flush()
    content, calls = content + c, calls + k
    assert [x["function"]["name"] for x in calls] == names
    assert content.strip() == text.strip()


def test_tool_checks():
    tools = check_tools([{"type": "function", "function": {"name": "add"}}])
    assert tools[0]["function"]["parameters"] == {"type": "object", "properties": {}}
    assert check_tool_choice({"type": "function", "function": {"name": "add"}}, tools) == "add"
    assert check_tool_choice(None, tools) == "auto"
    for bad, msg in ([[], "1..64"], [[{"function": {"name": "a"}}, {"function": {"name": "a"}}], "twice"],
                     [[{"type": "code"}], "must be"], [[{"function": {"name": "a", "parameters": 3}}], "JSON schema"]):
        with pytest.raises(ToolError, match=msg):
            check_tools(bad)
    with pytest.raises(ToolError, match="not among"):
        check_tool_choice({"type": "function", "function": {"name": "zz"}}, tools)


def test_a_template_without_a_tool_format_is_refused():
    import edgellm

    with edgellm.load(str(model_file("gemma3-270m")), ctx=256) as llm:
        with pytest.raises(ToolError, match="no tool-call format"):
            llm.create_chat_completion([{"role": "user", "content": "hi"}], max_tokens=2,
                                       tools=[{"type": "function", "function": {"name": "add"}}])
        r = llm.create_chat_completion([{"role": "user", "content": "hi"}], max_tokens=2, tool_choice="none",
                                       tools=[{"type": "function", "function": {"name": "add"}}])
        assert r["choices"][0]["finish_reason"] in ("stop", "length")
