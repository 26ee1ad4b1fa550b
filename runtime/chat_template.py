"""Chat templates: a list of messages -> the prompt text a chat model was trained on.

    tpl = ChatTemplate.for_model(gguf.metadata, tokenizer)   # the file's template, or a built-in one
    text = tpl.render([{"role": "user", "content": "Hi"}])   # ends with the assistant's turn opener
    ids = tpl.encode(tokenizer, text)                        # BOS added only if the text lacks it

The GGUF's `tokenizer.chat_template` (Jinja2) is rendered in Jinja2's `ImmutableSandboxedEnvironment`
with the variables transformers and llama-cpp-python pass (`messages`, `add_generation_prompt`,
`bos_token`, `eos_token`, `raise_exception`, `strftime_now`, a `tojson` that does not HTML-escape).
A template that reaches for an underscore attribute (`''.__class__`), calls `raise_exception`, has a
syntax error or fails while rendering gives a `ChatTemplateError`; nothing it does runs code.
Models without a template get ChatML, or gemma's turn format when the vocabulary has gemma's tokens.
"""
from __future__ import annotations

import json
import operator
from collections.abc import Mapping, Sequence
from datetime import datetime

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from ..errors import EdgeLLMError


class ChatTemplateError(EdgeLLMError):
    """A chat template is malformed, raised an error, or tried to leave Jinja2's sandbox."""


CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Gemma 3's template (google/gemma-3-*-it): the system prompt is folded into the first user turn.
GEMMA = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

_MAX_SEQUENCE = 1 << 20  # longest string or list a template may build with `*` (sandbox: no memory bombs)


def _raise_exception(message: str):
    raise ChatTemplateError(f"chat template error: {message}")


def _tojson(x, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja2's immutable sandbox, made strict: an unsafe attribute raises at once (instead of
    rendering as an empty undefined), and `*`/`**` cannot build huge values."""

    intercepted_binops = frozenset(["*", "**"])

    def unsafe_undefined(self, obj, attribute):
        raise SecurityError(f"access to attribute {attribute!r} of type {type(obj).__name__!r} is unsafe")

    def call_binop(self, context, operator_name, left, right):
        if operator_name == "**":
            if isinstance(right, (int, float)) and abs(right) > 64:
                raise SecurityError("exponent too large in a chat template")
            return operator.pow(left, right)
        for seq, n in ((left, right), (right, left)):
            if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > _MAX_SEQUENCE:
                raise SecurityError("a chat template tried to build a value too large")
        return operator.mul(left, right)


def _environment() -> _Sandbox:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class ChatTemplate:
    """A compiled chat template and the special-token texts it is rendered with."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "", name: str = "model",
                 stop: tuple[str, ...] = ()):
        self.source = source
        self.name = name            # "model" (from the GGUF), "chatml" or "gemma" (built in)
        self.bos_token, self.eos_token = bos_token, eos_token
        self.stop = stop            # stop strings the format needs when its end marker is plain text
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"chat template syntax error on line {e.lineno}: {e.message}") from None
        except Exception as e:  # noqa: BLE001  (any compile failure is the template's fault)
            raise ChatTemplateError(f"chat template does not compile: {e}") from None

    @classmethod
    def for_model(cls, metadata: Mapping, tokenizer) -> "ChatTemplate":
        """The GGUF's `tokenizer.chat_template`, else a built-in one picked by the vocabulary."""
        def text(tid):
            return tokenizer.tokens[tid] if tid is not None and 0 <= tid < tokenizer.n_vocab else ""

        bos, eos = text(tokenizer.bos_id), text(tokenizer.eos_id)
        source = metadata.get("tokenizer.chat_template")
        if isinstance(source, str) and source.strip():
            return cls(source, bos, eos, "model")
        return cls.builtin(tokenizer.vocab, bos, eos)

    @classmethod
    def builtin(cls, vocab: Mapping[str, int], bos_token: str = "", eos_token: str = "") -> "ChatTemplate":
        """Gemma's turn format if the vocabulary has `<start_of_turn>`/`<end_of_turn>`, else ChatML."""
        if "<start_of_turn>" in vocab and "<end_of_turn>" in vocab:
            return cls(GEMMA, bos_token, eos_token, "gemma")
        stop = () if "<|im_end|>" in vocab else ("<|im_end|>",)
        return cls(CHATML, bos_token, eos_token, "chatml", stop)

    def render(self, messages: Sequence[Mapping], add_generation_prompt: bool = True, **extra) -> str:
        """The prompt text of `messages` (dicts with `role` and `content`); `extra` variables
        (e.g. `tools`) are passed to the template as they are."""
        try:
            return self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token, eos_token=self.eos_token, **extra)
        except ChatTemplateError:
            raise
        except SecurityError as e:
            raise ChatTemplateError(f"chat template blocked by the sandbox: {e}") from None
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template failed: {e}") from None
        except Exception as e:  # noqa: BLE001  (a template's TypeError, IndexError, ... is its own error)
            raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from None

    def encode(self, tokenizer, text: str) -> list[int]:
        """Token ids of rendered text; special tokens are parsed, BOS is added unless the text has it."""
        has_bos = bool(self.bos_token) and text.startswith(self.bos_token)
        return tokenizer.encode(text, add_special=not has_bos, parse_special=True)
