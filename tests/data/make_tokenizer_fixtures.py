"""Writes tests/data/tokenizer_cases.json: llama.cpp's token ids for hand-picked and random texts.

Needs llama-cpp-python (only this script does; the tests read the JSON) and the three models in the cache
($EDGELLM_HOME, default ~/.cache/edgellm). Deterministic; run from the repo root:
    python tests/data/make_tokenizer_fixtures.py
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
import random
import struct
from pathlib import Path

import llama_cpp

MODELS = ["gemma3-270m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"]
GPL3 = Path("/usr/share/common-licenses/GPL-3")
OUT = Path(__file__).with_name("tokenizer_cases.json")

CASES = [
    "", " ", "Hello world", " Hello", "   leading spaces", "trailing  ", "a  b   c    d", "x" + " " * 40 + "y",
    "\n", "\n\n\n", "a\n\nb", "\n" * 40 + "z", "\t\tindent", "\t" * 35, "\r\n windows\r\nline\r\n", "\x0b\x0c vt ff",
    "The year 1234567890 and 3.14159, 1,000,000", "٣٤٥ Arabic-Indic digits", "①②③ circled, Ⅻ roman", "0" * 50,
    "café naïve résumé", "e\u0301 combining", "Здравствуй, мир!", "Γειά σου Κόσμε", "שלום עולם", "مرحبا بالعالم",
    "नमस्ते दुनिया", "สวัสดีชาวโลก", "你好，世界！", "日本語のテキストです。", "한국어 텍스트", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟙𝟚𝟛",
    "👍🏽 🇫🇷 👨‍👩‍👧‍👦 😀😃", "\U0001F9EC\U0001FAE0", "\U000E0041 tag", "\uE000 private use", "\U0010FFFD",
    "\u200b zero\u200dwidth", "\u00a0nbsp\u3000ideographic\u2009thin", "\x00 nul \x01\x07", "\x1c\x1d\x1e\x1f",
    "\x85 NEL \u2028 LS", "I'm you're we've they'll he'd it's DON'T WE'LL", "'s 'S 're 'x",
    "Hello,world!How's it going?",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "int main(void) {\n\tprintf(\"%d\\n\", 42);\n\treturn 0;\n}\n", '{"key": [1, 2.5, null], "k2": {"a": true}}',
    "<table><tr><td>x</td></tr></table> <h1>Title</h1>", "## Markdown\n- item *em* **strong** `code`\n",
    "https://www.gnu.org/licenses/gpl-3.0.html?x=1&y=2#frag", r"[^\s]+$ \d{3}-\w+ (?:a|b)*", "!!!???...----====",
    "supercalifragilisticexpialidocious", "a" * 100, "ab" * 50, "Ωmega ∑ ∫ √2 ≈ 1.414 ≠ π",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n", "<bos>text<eos>", "a</s>b <s>c",
    "<|endoftext|><|endoftext|>", "<|im_start|", "<tool_call>{}</tool_call>", "<unused5> <mask> <pad>",
    "<|fim_prefix|>def f():<|fim_suffix|>\n<|fim_middle|>", "[multimodal] <start_of_image>", "<<|im_end|>>",
    "\n<end_of_turn>\n\n<start_of_turn>  x", "<unk> <0x41> <0xZZ>", "▁ already escaped ▁▁", "tab\tand\u3000space",
]

POOL = [
    "a", "b", "Z", "the", " the", "ing", "'", "'s", "'LL", "1", "42", "7777", ".", ",", "!", "?", "-", "_", "(", ")",
    "{", "}", "<", ">", "/", "\\", "\"", "#", "@", "$", "%", "^", "&", "*", "=", "+", "~", "`", "|", ";", ":",
    " ", "  ", "   ", "\t", "\n", "\n\n", "\r", "\r\n", "\x0b", "\x0c", "\u00a0", "\u3000", "\u2009", "\x85",
    "é", "ß", "Ω", "ж", "ي", "ह", "ก", "中", "文", "の", "한", "e\u0301", "٣", "²", "½", "Ⅻ", "😀", "👍🏽", "🇫🇷",
    "\u200d", "\uE000", "\U0010FFFD", "\x00", "\x1f", "▁", "<|im_start|>", "<|im_end|>", "<|endoftext|>",
    "<start_of_turn>", "<end_of_turn>", "<eos>", "<bos>", "</s>", "<s>", "<td>", "<unused0>", "<|", "|>", "<tool_call>",
]


def texts_random(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(POOL) for _ in range(rng.randint(1, 24))) for _ in range(n)]


def piece_digest(vocab, n_vocab: int, special: bool) -> str:
    """sha256 over (length, bytes) of every token's piece, as llama_token_to_piece gives them."""
    h = hashlib.sha256()
    buf = ctypes.create_string_buffer(256)
    for i in range(n_vocab):
        k = llama_cpp.llama_token_to_piece(vocab, i, buf, 256, 0, special)
        assert 0 <= k <= 256
        h.update(struct.pack("<I", k) + buf.raw[:k])
    return h.hexdigest()


def main() -> None:
    home = Path(os.environ.get("EDGELLM_HOME", Path.home() / ".cache" / "edgellm"))
    rand = texts_random(150, seed=4)
    out = {"llama_cpp_python": llama_cpp.__version__, "cases": CASES, "random": rand, "models": {}}
    for name in MODELS:
        llm = llama_cpp.Llama(model_path=str(home / "models" / f"{name}.gguf"), vocab_only=True, verbose=False)
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)

        def tok(text: str, add: bool, special: bool) -> list[int]:
            return llm.tokenize(text.encode("utf-8", "surrogatepass"), add_bos=add, special=special)

        out["models"][name] = {
            "n_vocab": n_vocab,
            "bos": llama_cpp.llama_vocab_bos(vocab),
            "eos": llama_cpp.llama_vocab_eos(vocab),
            "eog": [i for i in range(n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, i)],
            "cases": [tok(t, True, True) for t in CASES],                  # add_special, parse_special
            "cases_plain": [tok(t, False, False) for t in CASES],          # neither
            "random": [tok(t, True, True) for t in rand],
            "random_plain": [tok(t, False, False) for t in rand],
            "gpl3": tok(GPL3.read_text(), True, True),
            "pieces_sha256": piece_digest(vocab, n_vocab, True),
            "pieces_plain_sha256": piece_digest(vocab, n_vocab, False),
        }
        del llm
    OUT.write_text(json.dumps(out, ensure_ascii=False, separators=(",", ":")))
    print(f"wrote {OUT} ({OUT.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
