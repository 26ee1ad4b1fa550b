"""README's set-up commands stay true: CI runs exactly README's test command."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def code_blocks(text: str) -> list[str]:
    parts = text.split("```")
    return [p.split("\n", 1)[1].strip() for p in parts[1::2]]


def test_ci_runs_readme_test_command():
    blocks = code_blocks((ROOT / "README.md").read_text())
    test_cmd = blocks[1]
    assert "pytest" in test_cmd
    ci_lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_cmd in ci_lines


def test_first_command_uses_default_model():
    first = code_blocks((ROOT / "README.md").read_text())[0]
    assert first.startswith("pip install") and "edgellm" in first
    # `edgellm chat` with no MODEL runs the default model (loaders.store.DEFAULT_MODEL)
    assert "gemma3-270m" in first or first.endswith("edgellm chat")
