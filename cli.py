"""The `edgellm` command line. User errors print one line on stderr and exit non-zero."""
from __future__ import annotations

import json
import sys
import time
from typing import Optional

import typer

from .errors import EdgeLLMError
from . import runtime as rt

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="edgellm: run GGUF language models on laptops, phones and LAN clusters.",
)


class _ProgressBar:
    """A one-line progress bar on stderr (plain lines when stderr is not a terminal)."""

    def __init__(self, label: str):
        self.label = label
        self.tty = sys.stderr.isatty()
        self.last_stage = None
        self.last_draw = 0.0

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        if stage != self.last_stage:
            if self.tty and self.last_stage is not None:
                sys.stderr.write("\n")
            elif not self.tty:
                sys.stderr.write(f"{self.label}: {stage}\n")
            self.last_stage = stage
        elif now - self.last_draw < 0.1 and done < total:
            return
        self.last_draw = now
        if self.tty:
            frac = done / total if total else 1.0
            bar = "#" * int(frac * 30)
            size = f" {done / 1e6:,.0f}/{total / 1e6:,.0f} MB" if total > 1000 else ""
            sys.stderr.write(f"\r{self.label}: {stage:<15} [{bar:<30}] {frac:6.1%}{size}")
        sys.stderr.flush()

    def close(self) -> None:
        if self.tty and self.last_stage is not None:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _resolve(model: str):
    bar = _ProgressBar(f"pull {model}")
    try:
        return rt.resolve(model, progress=bar)
    finally:
        bar.close()


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return str(n)


@app.command()
def pull(name: str = typer.Argument(..., help="catalog model name, e.g. gemma3-270m")) -> None:
    """Download, assemble and verify a catalog model into the cache."""
    bar = _ProgressBar(f"pull {name}")
    try:
        path = rt.pull(name, progress=bar)
    finally:
        bar.close()
    typer.echo(f"{name}: {path} ({_size(path.stat().st_size)}, sha256 verified)")


@app.command("list")
def list_models(as_json: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """List cached models and the catalog."""
    cached = rt.list_cached()
    if as_json:
        typer.echo(json.dumps({
            "cached": [{"name": n, "path": str(p), "size_bytes": s} for n, p, s in cached],
            "catalog": [{"name": e.name, "description": e.description} for e in rt.CATALOG.values()],
        }))
        return
    if cached:
        w = max(len(n) for n, _, _ in cached)
        for n, p, s in cached:
            typer.echo(f"{n:<{w}}  {_size(s):>10}  {p}")
    else:
        typer.echo(f"no models cached in {rt.home() / 'models'}")
    missing = [e for e in rt.CATALOG.values() if e.name not in {n for n, _, _ in cached}]
    if missing:
        typer.echo("available to pull: " + ", ".join(e.name for e in missing))


@app.command()
def show(
    model: str = typer.Argument(rt.DEFAULT_MODEL, help="catalog name or path to a GGUF file"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    ctx: Optional[int] = typer.Option(None, "--ctx", min=1, help="context length for the memory estimate"),
) -> None:
    """Show a model's architecture, size, quantization mix and estimated memory."""
    info = rt.describe_model(_resolve(model), n_ctx=ctx)
    if as_json:
        typer.echo(json.dumps(info))
        return
    rows = [
        ("name", info["name"]),
        ("path", info["path"]),
        ("architecture", info["architecture"]),
        ("parameters", f"{info['parameters'] / 1e6:,.1f} M"),
        ("context length", info["context_length"]),
        ("embedding length", info["embedding_length"]),
        ("layers", info["block_count"]),
        ("vocabulary", info["vocab_size"]),
        ("tensors", info["tensor_count"]),
        ("quant types", ", ".join(f"{k} x{v}" for k, v in info["quant_types"].items())),
        ("file size", _size(info["file_size_bytes"])),
        ("est. memory", f"{_size(info['estimated_memory_bytes'])} at ctx {info['estimated_memory_ctx']}"),
    ]
    for k, v in rows:
        typer.echo(f"{k:<17}{v}")


@app.command()
def rm(name: str = typer.Argument(..., help="cached model name")) -> None:
    """Remove a model from the cache."""
    freed = rt.remove(name)
    typer.echo(f"removed {name} ({_size(freed)})")


def main() -> None:
    try:
        app()
    except EdgeLLMError as e:
        typer.echo(f"edgellm: error: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.echo("edgellm: interrupted", err=True)
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(1)
