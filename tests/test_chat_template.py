"""Chat templates: qwen's own template and the built-in fallbacks render the expected prompts; templates
that try to leave Jinja2's sandbox, raise or do not parse give ChatTemplateError, and run no code."""
from __future__ import annotations

import pytest

from edgellm.loaders.gguf import GGUFFile
from edgellm.runtime.chat_template import ChatTemplate, ChatTemplateError
from edgellm.runtime.tokenizer import Tokenizer

from conftest import model_file

CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! "},
        {"role": "user", "content": "2+2?"}]


def model_template(name):
    with GGUFFile(model_file(name)) as f:
        tok = Tokenizer.from_metadata(f.metadata)
        return ChatTemplate.for_model(f.metadata, tok), tok


@pytest.fixture(scope="module")
def qwen():
    return model_template("qwen2.5-coder-0.5b")


@pytest.fixture(scope="module")
def gemma():
    return model_template("gemma3-270m")


def test_qwen_own_template(qwen):
    tpl, tok = qwen
    assert tpl.name == "model"
    assert tpl.render(CHAT[:1]) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    sys_chat = [{"role": "system", "content": "Be brief."}] + CHAT
    assert tpl.render(sys_chat) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello! <|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert tpl.render(sys_chat, add_generation_prompt=False).endswith("2+2?<|im_end|>\n")
    ids = tpl.encode(tok, tpl.render(CHAT[:1]))
    assert ids[0] == tok.vocab["<|im_start|>"] and ids.count(tok.vocab["<|im_end|>"]) == 2
    assert tok.vocab["<|im_end|>"] in tok.eog_ids


def test_gemma_fallback(gemma):
    tpl, tok = gemma
    assert tpl.name == "gemma" and tpl.bos_token == "<bos>"  # gemma3-270m's GGUF has no template
    text = tpl.render([{"role": "system", "content": "Be brief."}] + CHAT)
    assert text == ("<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
                    "<start_of_turn>user\n2+2?<end_of_turn>\n<start_of_turn>model\n")
    ids = tpl.encode(tok, text)
    assert ids[:3] == [tok.bos_id, tok.vocab["<start_of_turn>"], tok.vocab["user"]] and ids.count(tok.bos_id) == 1
    assert tok.vocab["<end_of_turn>"] in tok.eog_ids
    with pytest.raises(ChatTemplateError, match="must alternate"):
        tpl.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_chatml_fallback():
    tpl = ChatTemplate.builtin({"<|im_start|>": 0, "<|im_end|>": 1})
    assert tpl.name == "chatml" and tpl.stop == ()
    assert tpl.render(CHAT) == ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello! <|im_end|>\n"
                                "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert ChatTemplate.builtin({"a": 0}).stop == ("<|im_end|>",)  # end marker is plain text there


def test_globals_and_filters():
    tpl = ChatTemplate("{{ bos_token }}{{ messages[0] | tojson }}|{{ strftime_now('%Y')|length }}|"
                       "{{ tools is defined }}|{{ eos_token }}", bos_token="<s>", eos_token="</s>")
    assert tpl.render([{"role": "user", "content": "<é>"}]) == '<s>{"role": "user", "content": "<é>"}|4|False|</s>'
    assert ChatTemplate("{{ tools[0].name }}").render(CHAT, tools=[{"name": "f"}]) == "f"


ESCAPES = [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.system('touch {marker}') }}",
    "{{ joiner.__init__.__globals__ }}",
    "{{ lipsum.__globals__['os'].system('touch {marker}') }}",
    "{{ namespace.__init__ }}",
    "{{ messages.__class__ }}",
    "{{ '{0.__class__}'.format(messages) }}",
    "{% set x = messages.append(1) %}{{ x }}",
    "{{ messages[0].update({'role': 'x'}) }}",
    "{{ raise_exception.__globals__ }}",
    "{{ 'a' * 100000000 }}",
    "{{ 10 ** 100000 }}",
]


@pytest.mark.parametrize("source", ESCAPES)
def test_sandbox_escapes_are_errors(source, tmp_path):
    marker = tmp_path / "pwned"
    tpl = ChatTemplate(source.replace("{marker}", str(marker)))
    with pytest.raises(ChatTemplateError, match="sandbox"):
        tpl.render(CHAT)
    assert not marker.exists()


@pytest.mark.parametrize("source, message", [
    ("{{ raise_exception('no tools here') }}", "chat template error: no tools here"),
    ("{{ messages[9].content }}", "chat template failed"),
    ("{{ 1 + 'a' }}", "chat template failed"),
    ("{{ undefined_thing.x }}", "chat template failed"),
])
def test_template_exceptions(source, message):
    with pytest.raises(ChatTemplateError, match=message):
        ChatTemplate(source).render(CHAT)


@pytest.mark.parametrize("source", ["{% for m in messages %}", "{{ messages[0 }}", "{% endif %}"])
def test_syntax_errors(source):
    with pytest.raises(ChatTemplateError, match="syntax error on line 1"):
        ChatTemplate(source)
