"""Grammar-constrained generation with llguidance (a maintained engine: JSON Schema, Lark, regex).

    g = grammar_for_response_format({"type": "json_schema", "json_schema": {"schema": {...}}})
    c = Constraint(tokenizer, n_vocab, g)    # one per generation
    allowed = c.allowed()                    # (n_vocab,) bool: tokens the grammar lets come next
    c.consume(token)                         # after sampling; c.stopped once nothing but EOS may follow

The sampler sets the logits of disallowed tokens to -inf, so every output of a finished
generation matches the grammar (a `max_tokens` cut can still leave it unfinished, as OpenAI's).
llguidance is an optional dependency (the `serve` extra); without it a constrained request is
refused with a line saying what to install.
"""
from __future__ import annotations

import json
import threading
from typing import Any

import numpy as np

from ..errors import EdgeLLMError
from .tokenizer import CONTROL, UNKNOWN, USER_DEFINED

MAX_GRAMMAR = 1 << 16  # characters of a JSON schema or grammar from outside


class GrammarError(EdgeLLMError, ValueError):
    """A response_format or schema that cannot be used; the message names the problem."""


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise GrammarError("structured output needs llguidance: pip install 'edgellm[serve]'") from None
    return llguidance


def grammar_for_response_format(rf: Any) -> str | None:
    """OpenAI's `response_format` -> an llguidance grammar, or None for plain text.

    {"type": "text"}; {"type": "json_object"} (any JSON object); {"type": "json_schema",
    "json_schema": {"name": ..., "schema": {...}, "strict": ...}}. GrammarError names what is wrong."""
    if rf is None:
        return None
    if not isinstance(rf, dict) or not isinstance(rf.get("type"), str):
        raise GrammarError('response_format must be an object with a "type"')
    kind = rf["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return json_schema_grammar({"type": "object"})
    if kind == "json_schema":
        spec = rf.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise GrammarError('response_format json_schema must be {"name": ..., "schema": {...}}')
        return json_schema_grammar(spec.get("schema", {"type": "object"}))
    raise GrammarError(f"response_format type {kind!r} is not one of text, json_object, json_schema")


def json_schema_grammar(schema: dict) -> str:
    """A grammar for JSON values matching `schema` (compact separators, no whitespace between
    tokens beyond what the model may add), checked by llguidance; GrammarError if it cannot."""
    text = json.dumps(schema)
    if len(text) > MAX_GRAMMAR:
        raise GrammarError(f"the JSON schema has {len(text):,} characters; at most {MAX_GRAMMAR:,}")
    ll = _llguidance()
    try:
        grammar = ll.LLMatcher.grammar_from_json_schema(text, defaults={"whitespace_flexible": False})
    except Exception as e:  # llguidance raises ValueError/RuntimeError with the reason
        raise GrammarError(f"the JSON schema cannot be used: {e}") from None
    is_error, msgs = ll.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise GrammarError(f"the JSON schema cannot be used: {msgs[0]}")
    return grammar


class _Wrapper:
    """What llguidance's TokenizerWrapper needs from a tokenizer: ids -> bytes (special tokens
    marked by a leading 0xFF, as llguidance expects), and text -> ids."""

    def __init__(self, tok, n_vocab: int):
        self.eos_token_id = tok.eos_id
        self.bos_token_id = tok.bos_id
        special = CONTROL | USER_DEFINED | UNKNOWN
        self.tokens = []
        self.special_token_ids = []
        for i in range(n_vocab):
            if i >= tok.n_vocab:
                self.tokens.append(b"")
                continue
            b = tok.token_bytes(i, special=True)
            if int(tok.attrs[i]) & special and b.startswith(b"<") and b.endswith(b">"):
                b = b"\xff" + b
                self.special_token_ids.append(i)
            self.tokens.append(b)
        self._tok = tok

    def __call__(self, s) -> list[int]:
        text = s.decode("utf-8", "replace") if isinstance(s, bytes) else s
        return self._tok.encode(text, add_special=False, parse_special=False)


_TOKENIZERS: dict[int, Any] = {}  # id(Tokenizer) -> (Tokenizer, LLTokenizer): built once (~1 s)
_LOCK = threading.Lock()


def ll_tokenizer(tok, n_vocab: int):
    """The llguidance tokenizer for `tok`, built once per tokenizer."""
    ll = _llguidance()
    with _LOCK:
        hit = _TOKENIZERS.get(id(tok))
        if hit is None or hit[0] is not tok:
            eos = sorted(tok.eog_ids) or ([tok.eos_id] if tok.eos_id is not None else [])
            w = ll.TokenizerWrapper(_Wrapper(tok, n_vocab))
            hit = _TOKENIZERS[id(tok)] = (tok, ll.LLTokenizer(w, n_vocab=n_vocab, eos_token=eos))
        return hit[1]


class Constraint:
    """One generation's grammar state over a vocabulary of `n_vocab` logits."""

    def __init__(self, tok, n_vocab: int, grammar: str):
        ll = _llguidance()
        self.n_vocab = n_vocab
        self.matcher = ll.LLMatcher(ll_tokenizer(tok, n_vocab), grammar)
        if self.matcher.is_error():
            raise GrammarError(f"the grammar cannot be used: {self.matcher.get_error()}")

    def allowed(self) -> np.ndarray:
        """(n_vocab,) bool: the tokens the grammar accepts next."""
        bias = np.frombuffer(self.matcher.compute_logit_bias(), dtype=np.uint8)  # 0 or 200 per token
        out = np.zeros(self.n_vocab, dtype=bool)
        n = min(self.n_vocab, bias.size)
        out[:n] = bias[:n] != 0
        return out

    def consume(self, token: int) -> None:
        if not self.matcher.consume_token(int(token)):
            raise GrammarError(f"the grammar refused token {token}: {self.matcher.get_error()}")

    @property
    def stopped(self) -> bool:
        """True once the grammar is complete and accepts nothing but end of generation."""
        return self.matcher.is_stopped()
