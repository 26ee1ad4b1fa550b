"""The command line: show/list/rm output, and one-line errors without tracebacks."""
from __future__ import annotations

import json
import subprocess
import sys

from typer.testing import CliRunner

from edgellm.cli import app
from edgellm.loaders.gguf import GGUFFile

import gguf_builder as gb
from conftest import model_file

runner = CliRunner()


def test_show_json_matches_file():
    path = model_file("gemma3-270m")
    r = runner.invoke(app, ["show", "gemma3-270m", "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    f = GGUFFile(path)
    assert info["architecture"] == "gemma3"
    assert info["parameters"] == sum(t.n_elements for t in f.tensors.values())
    assert info["quant_types"] == {"F32": 109, "Q5_0": 81, "Q4_K": 27, "Q8_0": 10, "Q6_K": 9}
    assert info["context_length"] == 32768 and info["block_count"] == 18
    assert info["file_size_bytes"] == path.stat().st_size
    assert info["weights_bytes"] < info["estimated_memory_bytes"] < 2 * info["file_size_bytes"]


def test_show_text_by_path():
    path = model_file("qwen2.5-coder-0.5b")
    r = runner.invoke(app, ["show", str(path)])
    assert r.exit_code == 0
    assert "qwen2" in r.stdout and "Q5_0 x133" in r.stdout


def test_list_json():
    model_file("gemma3-270m")
    r = runner.invoke(app, ["list", "--json"])
    data = json.loads(r.stdout)
    assert "gemma3-270m" in [m["name"] for m in data["cached"]]
    assert {m["name"] for m in data["catalog"]} == {"gemma3-270m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"}


def run_cli(*args, **kw):
    return subprocess.run([sys.executable, "-c", "from edgellm.cli import main; main()", *args],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60, **kw)


def test_malformed_file_is_one_line_error(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(gb.sample().build()[:-1])
    r = run_cli("show", str(bad))
    assert r.returncode == 1
    assert r.stdout == ""
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("edgellm: error: bad.gguf: tensor 'b.weight' data ends at byte")


def test_unknown_model_and_bad_rm(tmp_path):
    r = run_cli("show", "no-such-model")
    assert r.returncode == 1 and "unknown model 'no-such-model'" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("rm", "gemma3-270m", env={"EDGELLM_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 1 and "not in the cache" in r.stderr


def test_bad_option_exits_nonzero():
    r = run_cli("show", "gemma3-270m", "--ctx", "-5")
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_help_shows_the_gpu_extra_in_full():
    """Square brackets in help text are rich markup unless escaped: the extra's name must survive."""
    r = runner.invoke(app, ["run", "--help"], env={"COLUMNS": "240"}, terminal_width=240)
    assert r.exit_code == 0
    assert "pip install -e '.[gpu]'" in r.stdout and "HOST:PORT[,...]" in r.stdout
