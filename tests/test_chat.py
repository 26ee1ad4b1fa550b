"""`edgellm chat`: the conversation state (KV-cache reuse across turns, trimming, stopped replies), the
REPL through typer's test runner, and the real program in a terminal (tmux)."""
from __future__ import annotations

import builtins
import io
import shlex
import shutil
import subprocess
import sys
import time
import uuid

import pytest
from typer.testing import CliRunner

import edgellm
from edgellm.cli import app
from edgellm.runtime.chat_session import ChatSession, repl

from conftest import model_file


@pytest.fixture(scope="module")
def llm():
    model_file("gemma3-270m")
    with edgellm.load("gemma3-270m", threads=2, ctx=512) as m:
        yield m


def drain(events) -> str:
    return "".join(ev.text for ev in events)


def test_follow_up_processes_only_new_tokens(llm):
    s = ChatSession(llm, "Answer briefly.", temperature=0, max_tokens=12)
    drain(s.reply("Hi, who are you?"))
    known = len(s._ids)  # first prompt + generated tokens
    drain(s.reply("And what can you do?"))
    st = llm.stats
    assert st.cached_tokens == known - 1  # all but the last sampled token, which was never fed back
    assert st.prompt_tokens < 20
    ids = s.prompt_ids()  # the ids reused plus the new text's spell exactly the rendered conversation
    assert llm.tokenizer.decode(ids, special=True) == llm.chat_template.render(s.conversation())
    assert [m["role"] for m in s.conversation()] == ["system", "user", "assistant", "user", "assistant"]


def test_stopped_reply_stays_in_history(llm):
    s = ChatSession(llm, temperature=0, max_tokens=30)
    events = s.reply("Tell me a story.")
    partial = "".join(next(events).text for _ in range(3))
    events.close()
    assert s.messages[-1] == {"role": "assistant", "content": partial}
    drain(s.reply("Go on."))  # the conversation goes on
    assert len(s.messages) == 4 and llm.stats.cached_tokens > 0


def test_long_conversation_drops_oldest_turns(llm):
    s = ChatSession(llm, "Be brief.", temperature=0, max_tokens=4)
    dropped = []
    for i in range(6):
        drain(s.reply(f"Turn {i}: " + "tell me more about the sea " * 14))
        dropped.append(s.dropped)
    assert sum(dropped) >= 2 and s.conversation()[0] == {"role": "system", "content": "Be brief."}
    assert s.messages[-2]["content"].startswith("Turn 5") and len(s.prompt_ids()) <= llm.n_ctx
    assert dropped[-1] == 0 or dropped[-2] == 0  # a quarter of the context was freed: no trim every turn
    before = list(s.messages)
    with pytest.raises(edgellm.EdgeLLMError, match="too long"):
        s.reply("sea " * 600)
    assert s.messages == before  # the refused message is not kept, and nothing was dropped for it


def run_repl(llm, lines, **kw):
    feed = iter(lines)

    def fake_input(prompt=""):
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    out = io.StringIO()
    s = ChatSession(llm, temperature=0, max_tokens=4)
    orig, builtins.input = builtins.input, fake_input
    try:
        repl(s, out=out, interactive=False, **kw)
    finally:
        builtins.input = orig
    return s, out.getvalue()


def test_repl_commands_and_multiline(llm):
    s, out = run_repl(llm, ['"""first line', "second line", 'third"""', "/set top_k 5", "/set temp hot",
                            "/set foo 1", "/system Be kind.", "/system", "/show", "/clear", "/nope", "/stats"])
    assert s.params.top_k == 5 and s.system == "Be kind." and s.messages == []
    assert "[top_k = 5]" in out and "'hot' is not a float" in out and "cannot set 'foo'" in out
    assert "Be kind.\n" in out and "template      gemma" in out and "unknown command /nope" in out
    assert "reply: 4 tokens" in out  # /stats after the multi-line turn
    s, _ = run_repl(llm, ['"""a', 'b"""', "/bye", "never read"])
    assert s.messages[0]["content"] == "a\nb" and len(s.messages) == 2


def test_repl_ctrl_c_stops_the_reply(llm, monkeypatch):
    class Out(io.StringIO):
        writes = 0

        def write(self, text):
            Out.writes += 1
            if Out.writes == 3:
                raise KeyboardInterrupt
            return super().write(text)

    feed = iter(["Tell me a story.", "/show"])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(feed))
    s = ChatSession(llm, temperature=0, max_tokens=20)
    with pytest.raises(StopIteration):
        repl(s, out=Out(), interactive=False)
    assert [m["role"] for m in s.messages] == ["user", "assistant"]  # the partial reply is kept


def test_cli_runner_turns_and_commands():
    model_file("gemma3-270m")
    r = CliRunner().invoke(app, ["chat", "gemma3-270m", "--max-tokens", "6", "--ctx", "512", "--seed", "1"],
                           input="Hello there\n/set temp 0\n/stats\n/bye\nnot read\n")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert "[temp = 0]" in lines and any(ln.startswith("prompt: ") and "reply: 6 tokens" in ln for ln in lines)
    assert lines.index("[temp = 0]") >= 1  # the reply came first


# --- a real terminal ---

def pane(name: str) -> str:
    return subprocess.run(["tmux", "capture-pane", "-p", "-t", name], capture_output=True, text=True).stdout


def wait_for(name: str, pred, timeout: float = 60.0) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        text = pane(name)
        if pred(text):
            return text
        time.sleep(0.2)
    raise AssertionError(f"timed out; the terminal shows:\n{pane(name)}")


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (apt-get install tmux)")
def test_real_terminal_with_tmux():
    model_file("gemma3-270m")
    exe = shutil.which("edgellm") or f"{shlex.quote(sys.executable)} -c 'from edgellm.cli import main; main()'"
    name = f"edgellm-test-{uuid.uuid4().hex[:8]}"
    cmd = f"{exe} chat gemma3-270m --temp 0 --max-tokens 8 --ctx 1024; echo EXITED $?; sleep 30"
    subprocess.run(["tmux", "new-session", "-d", "-s", name, "-x", "120", "-y", "40", cmd], check=True)
    try:
        wait_for(name, lambda t: ">>>" in t)  # capture-pane drops trailing spaces
        subprocess.run(["tmux", "send-keys", "-t", name, "Hello", "Enter"], check=True)
        text = wait_for(name, lambda t: t.rstrip().endswith(">>>") and t.count(">>>") >= 2)
        reply = text.split(">>> Hello", 1)[1].split(">>>")[0]
        assert reply.strip(), text  # a reply was streamed between the two prompts

        subprocess.run(["tmux", "send-keys", "-t", name, "/set max_tokens -1", "Enter"], check=True)
        wait_for(name, lambda t: "[max_tokens = -1]" in t)
        subprocess.run(["tmux", "send-keys", "-t", name, "Count from 1 to 1000.", "Enter"], check=True)
        wait_for(name, lambda t: len(t.split("Count from 1 to 1000.", 1)[-1].strip()) > 20)
        subprocess.run(["tmux", "send-keys", "-t", name, "C-c"], check=True)
        text = wait_for(name, lambda t: "[stopped]" in t and t.rstrip().endswith(">>>"), 20)
        subprocess.run(["tmux", "send-keys", "-t", name, "/bye", "Enter"], check=True)
        wait_for(name, lambda t: "EXITED 0" in t, 20)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", name], capture_output=True)


def test_the_default_chat_answers_and_stops():
    """`edgellm chat` with no model: an instruct model with its own chat template, whose reply ends
    at its end of turn (not at the context's end), then /stats shows real figures and /bye leaves."""
    from edgellm.loaders.store import DEFAULT_MODEL

    model_file(DEFAULT_MODEL)
    r = CliRunner().invoke(app, ["chat", "--temp", "0", "--ctx", "1024"],
                           input="What is the capital of France? Answer in one word.\n/stats\n/bye\nnot read\n")
    assert r.exit_code == 0, r.output
    assert "Paris" in r.stdout and "no chat template" not in r.stdout
    stats = next(ln for ln in r.stdout.splitlines() if ln.startswith("prompt: "))
    n = int(stats.split("reply: ")[1].split()[0])
    mb = float(stats.split("peak memory ")[1].split()[0].replace(",", ""))
    assert n < 64 and mb > 100


def test_a_base_model_is_named_and_its_replies_are_capped(llm):
    """gemma3-270m's file has no chat template: the chat says so once, and a reply ends at a blank
    line or after the cap, which /set max_tokens replaces."""
    s, out = run_repl(llm, ["Write a long story about the sea.", "/stats"])
    assert out.count("has no chat template (a base model)") == 1
    s2 = ChatSession(llm, temperature=0)
    assert s2.base and s2.cap == 256
    s2.set("max_tokens", "12")
    assert s2.cap is None
    got = [ev for ev in s2.reply("Write a long story about the sea.")]
    assert len(got) <= 12
    s3 = ChatSession(llm, temperature=0)
    got = [ev.token for ev in s3.reply("Write two paragraphs about the sea.")]
    assert len(got) <= 256 and "\n\n" not in s3.messages[-1]["content"]
