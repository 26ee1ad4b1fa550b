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


CACHE_TYPE = typer.Option("f16", "--cache-type", help="KV cache type: f16, q8_0 (half the bytes) or q4_0 "
                          "(blocks of 32 values, as llama.cpp's -ctk/-ctv)")
BACKEND = typer.Option(None, "--backend", help="kernels: numba (default), numpy (the exact path), cuda (the GPU: "
                       "pip install -e '.\\[gpu]'), cuda-mirror (the cuda backend on numpy mirrors of its kernels)")
GPU_LAYERS = typer.Option(None, "--gpu-layers", "-ngl", min=0, help="--backend cuda: the first N blocks on the GPU, "
                          "the rest and the output head on the CPU (default: all)")
GPU_BUDGET = typer.Option(None, "--gpu-memory-budget", help="--backend cuda: GPU memory to use, e.g. 512M; blocks "
                          "that do not fit are copied in from host memory each pass")


def _gpu(gpu_layers: Optional[int], gpu_memory_budget: Optional[str]) -> dict:
    return ({"gpu_layers": gpu_layers} if gpu_layers is not None else {}) | (
        {"gpu_memory_budget": gpu_memory_budget} if gpu_memory_budget else {})


def _cache(cache_type: str) -> dict:
    return {"cache_type": cache_type} if cache_type != "f16" else {}


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
    memory_budget: Optional[str] = typer.Option(None, "--memory-budget", help="also print the plan for this "
                                                "budget, e.g. 400M (without --ctx: the context that fits)"),
    cache_type: str = CACHE_TYPE,
) -> None:
    """Show a model's architecture, size, quantization mix and estimated memory."""
    path = _resolve(model)
    info = rt.describe_model(path, n_ctx=ctx, cache_type=cache_type)
    plan = _show_plan(path, ctx, memory_budget, cache_type) if memory_budget else None
    if as_json:
        if plan:
            info["memory_plan"] = {"budget_bytes": plan[1].budget, "n_ctx": plan[0], "parts": plan[1].parts,
                                   "resident_units": len(plan[1].resident), "streamed_units": len(plan[1].streamed),
                                   "bytes_read_per_token": plan[1].stream_bytes, "window": plan[1].window}
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
        ("est. memory", f"{_size(info['estimated_memory_bytes'])} at ctx {info['estimated_memory_ctx']}, "
                        f"KV cache {_size(info['kv_cache_bytes'])} ({info['kv_cache_type']})"),
    ]
    for k, v in rows:
        typer.echo(f"{k:<17}{v}")
    if plan:
        typer.echo(f"context {plan[0]} tokens" + ("" if ctx else " (the longest up to 4096 that fits, with this "
                                                            "process's memory; `run` measures its own)"))
        typer.echo(plan[1].describe())


def _show_plan(path, ctx: Optional[int], budget: str, cache_type: str = "f16"):
    """(n_ctx, offload Plan) of `run --memory-budget` for this model, without loading it."""
    from . import offload
    from .kernels_cpu.qmatmul import tile_rows
    from .loaders.gguf import GGUFFile
    from .runtime.model import model_class

    rcfg = _runtime_config(None, ctx, memory_budget=budget, spec=_cache(cache_type))
    with GGUFFile(path) as f:
        cfg = model_class(f.metadata.get("general.architecture")).config(f)
        n = rcfg.n_ctx
        if rcfg.fit_ctx:
            n = offload.fit_context(f, cfg, n, rcfg.n_batch, rcfg.max_threads, rcfg.memory_budget, row_align=tile_rows,
                                    cache_type=rcfg.cache_type)
        p, _ = offload.plan_for(f, cfg, n, min(rcfg.n_batch, n), rcfg.max_threads, rcfg.memory_budget,
                                row_align=tile_rows, cache_type=rcfg.cache_type)
    return n, p


@app.command()
def rm(name: str = typer.Argument(..., help="cached model name")) -> None:
    """Remove a model from the cache."""
    freed = rt.remove(name)
    typer.echo(f"removed {name} ({_size(freed)})")


def _runtime_config(threads, ctx, backend=None, n_batch=None, memory_budget=None, spec=None):
    kw = {"n_ctx": ctx or 4096, "fit_ctx": ctx is None, **(spec or {})}
    if memory_budget:
        kw["memory_budget"] = memory_budget
    if threads is not None:
        kw["threads"] = threads
    if backend:
        kw["backend"] = backend
    if n_batch:
        kw["n_batch"] = n_batch
    return rt.RuntimeConfig(**kw)


def _load(model: str, rcfg, verbose: bool = False):
    eng = rt.Engine(_resolve(model), rcfg)
    if verbose:
        typer.echo(f"[{eng.config.arch}, {eng.config.n_layer} layers, ctx {eng.n_ctx}, "
                   f"{rcfg.threads} threads, kernels: {eng.backend}]", err=True)
        if eng.draft_bytes:
            typer.echo(f"draft model {rcfg.draft}: resident, ~{eng.draft_bytes / 1e6:,.0f} MB of --memory-budget "
                       f"{rcfg.memory_budget / 1e6:,.0f} MB; the target gets the rest:", err=True)
        if eng.plan is not None:
            typer.echo(eng.plan.describe(), err=True)
    return eng


def _step_line(i: int, step: dict) -> str:
    """One forward pass's telemetry (--verbose with a memory budget)."""
    return (f"[token {i}: {step['tokens']} in, compute {step['compute_s'] * 1e3:,.0f} ms, "
            f"io wait {step['io_wait_s'] * 1e3:,.0f} ms, read {step['bytes_read'] / 1e6:,.0f} MB]")


def _prompt_text(prompt: Optional[str], file: Optional[str]) -> str:
    if file is not None:
        try:
            with open(file, encoding="utf-8") as f:
                return f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise rt.EdgeLLMError(f"cannot read {file}: {getattr(e, 'strerror', None) or e}") from None
    if prompt is None:
        raise rt.EdgeLLMError("give a prompt or --file")
    return prompt


THREADS = typer.Option(None, "--threads", "-t", help="CPU threads: a number 1-256, or auto (the default: "
                       "the cores this process may use, fewer while another program keeps one busy)")
CTX = typer.Option(None, "--ctx", "-c", min=1, help="context length (default 4096, bounded by the model's; "
                   "under --memory-budget the longest that fits, down to 256)")
DRAFT = typer.Option(None, "--draft", help="speculative decoding: a smaller model with the same vocabulary "
                     "(e.g. qwen2.5-coder-0.5b for qwen2.5-coder-1.5b)")
LOOKUP = typer.Option(0, "--lookup", min=0, max=16, help="speculative decoding without a model: propose what "
                      "followed the last N tokens earlier in the prompt or output (e.g. 3)")
DRAFT_MAX = typer.Option(7, "--draft-max", min=1, max=15, help="tokens proposed per pass at most (the length "
                         "used is the one measured fastest)")
SPARSITY = typer.Option(0.0, "--sparsity", min=0.0, max=0.9, help="activation-sparse FFN: the fraction of weight "
                        "reads a decoded token skips (0: dense; calibrated on first use, see `edgellm sparsify`)")
SPARSITY_CALIB = typer.Option(None, "--sparsity-calib", help="calibration text for --sparsity (default: license "
                              "texts and Python sources, never GPL-3)")


def _sparse(sparsity: float, calib: Optional[str]) -> dict:
    return {"sparsity": sparsity, **({"sparsity_calib": calib} if calib else {})} if sparsity else {}


def _speculative(draft: Optional[str], lookup: int, draft_max: int) -> dict:
    if draft:
        _resolve(draft)  # fetch with a progress bar first
    if not draft and not lookup:
        return {}
    return {k: v for k, v in (("draft", draft), ("lookup", lookup)) if v} | {"draft_max": draft_max}


def _spec_line(spec: Optional[dict]) -> str:
    if not spec:
        return ""
    return (f", drafted {spec['drafted']}, accepted {spec['accepted']} ({spec['acceptance']:.0%}), "
            f"{spec['target_passes']} target passes")


@app.command()
def run(
    model: str = typer.Argument(..., help="catalog name or path to a GGUF file"),
    prompt: Optional[str] = typer.Argument(None, help="the prompt text"),
    file: Optional[str] = typer.Option(None, "--file", "-f", help="read the prompt from a file"),
    n: int = typer.Option(-1, "-n", "--max-tokens", min=-1, help="tokens to generate (-1: until end of generation)"),
    temp: float = typer.Option(0.8, "--temp", min=0.0, help="temperature (0 = greedy)"),
    top_k: int = typer.Option(40, "--top-k"),
    top_p: float = typer.Option(0.95, "--top-p"),
    min_p: float = typer.Option(0.05, "--min-p"),
    repeat_penalty: float = typer.Option(1.0, "--repeat-penalty"),
    seed: Optional[int] = typer.Option(None, "--seed", min=0, help="random seed (default: random)"),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="keep generating past end-of-generation tokens"),
    stop: list[str] = typer.Option([], "--stop", help="stop string (repeatable)"),
    threads: Optional[str] = THREADS,
    ctx: int = CTX,
    backend: Optional[str] = BACKEND,
    gpu_layers: Optional[int] = GPU_LAYERS,
    gpu_memory_budget: Optional[str] = GPU_BUDGET,
    as_json: bool = typer.Option(False, "--json", help="print one JSON object instead of streaming text"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="print kernels and speed on stderr"),
    memory_budget: Optional[str] = typer.Option(None, "--memory-budget", help="memory the run may use, e.g. 400M, 1.5G; weights that do not fit stream from disk"),
    cluster: Optional[str] = typer.Option(None, "--cluster", help="workers HOST:PORT[,...] to run tensor-parallel with"),
    key: Optional[str] = typer.Option(None, "--key", help="this node's cluster key (`edgellm keygen`); needed off loopback"),
    allow: Optional[str] = typer.Option(None, "--allow", help="certificates of the workers to accept (PEM; default: --key's own)"),
    split: Optional[str] = typer.Option(None, "--split", help="cluster share weights, this node first, e.g. 2,1,1 (default auto: by measured speed)"),
    cluster_timeout: float = typer.Option(5.0, "--cluster-timeout", min=0.05, help="seconds before a silent node counts as lost"),
    draft: Optional[str] = DRAFT,
    lookup: int = LOOKUP,
    draft_max: int = DRAFT_MAX,
    sparsity: float = SPARSITY,
    sparsity_calib: Optional[str] = SPARSITY_CALIB,
    cache_type: str = CACHE_TYPE,
) -> None:
    """Generate a continuation of PROMPT, streaming it to stdout."""
    text = _prompt_text(prompt, file)
    params = rt.SamplingParams(temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p,
                               repeat_penalty=repeat_penalty, seed=seed, max_tokens=n,
                               stop=tuple(stop), ignore_eos=ignore_eos)
    rcfg = _cluster_config(_runtime_config(threads, ctx, backend, memory_budget=memory_budget,
                                           spec=_speculative(draft, lookup, draft_max) | _sparse(sparsity, sparsity_calib)
                                           | _cache(cache_type) | _gpu(gpu_layers, gpu_memory_budget)),
                           cluster, key, split,
                           cluster_timeout, allow)
    eng = _load(model, rcfg, verbose and not as_json)
    try:
        ids = eng.tokenizer.encode(text)
        pieces = []
        shown = 0  # forward passes whose telemetry is printed (--verbose, streaming)
        for ev in eng.generate(ids, params):
            pieces.append(ev.text)
            if not as_json:
                sys.stdout.write(ev.text)
                sys.stdout.flush()
            if verbose and eng.plan is not None:
                for step in eng.stats.steps[shown:]:
                    typer.echo(_step_line(shown, step), err=True)
                    shown += 1
        st = eng.stats
        nodes = eng.model.node_stats() if hasattr(eng.model, "node_stats") else None
        if as_json:
            typer.echo(json.dumps({
                "prompt_ids": ids, "ids": st.ids, "text": "".join(pieces),
                "prompt_tokens_per_s": st.prompt_tokens_per_s, "tokens_per_s": st.tokens_per_s,
                "time_to_first_token_s": st.ttft_s, "peak_rss_bytes": st.peak_rss_bytes,
                "compute_s": st.compute_s, "io_wait_s": st.io_wait_s, "bytes_read": st.bytes_read,
                "speculative": st.speculative,
                "sparsity": eng.model.sparse.describe() if getattr(eng.model, "sparse", None) else None,
                **({"cluster": nodes} if nodes is not None else {}),
            }))
        else:
            sys.stdout.write("\n")
            if verbose:
                typer.echo(_stats_line(st), err=True)
                for n in nodes or []:
                    typer.echo(f"[cluster {n['node']}: {n['weight_bytes'] / 1e6:,.0f} MB of weights"
                               + (f", {n['streamed_per_pass'] / 1e6:,.0f} MB streamed per pass" if n['streamed_per_pass'] else "")
                               + f", peak RSS {n['peak_rss_bytes'] / 1e6:,.0f} MB]", err=True)
    finally:
        eng.close()


def _stats_line(st) -> str:
    return (f"[prompt {st.prompt_tokens} tok at {st.prompt_tokens_per_s:.1f} tok/s"
            f"{f' (+{st.cached_tokens} cached)' if st.cached_tokens else ''}, "
            f"generated {st.gen_tokens} tok at {st.tokens_per_s:.1f} tok/s, "
            f"first token {st.ttft_s:.2f} s, peak RSS {st.peak_rss_bytes / 1e6:,.0f} MB"
            f"{_spec_line(st.speculative)}]")


@app.command()
def tokenize(
    model: str = typer.Argument(..., help="catalog name or path to a GGUF file"),
    text: Optional[str] = typer.Argument(None, help="text to tokenize"),
    file: Optional[str] = typer.Option(None, "--file", "-f", help="read the text from a file"),
    no_special: bool = typer.Option(False, "--no-special", help="do not add BOS/EOS nor parse special tokens"),
    as_json: bool = typer.Option(False, "--json", help='print {"ids": [...]}'),
) -> None:
    """Print the token ids of TEXT (llama.cpp's tokenization)."""
    s = _prompt_text(text, file)
    with rt.GGUFFile(_resolve(model)) as f:
        tok = rt.Tokenizer.from_metadata(f.metadata)
    ids = tok.encode(s, add_special=not no_special, parse_special=not no_special)
    if as_json:
        typer.echo(json.dumps({"ids": ids}))
        return
    for i in ids:
        typer.echo(f"{i:>8} {tok.token_bytes(i)!r}")


@app.command()
def perplexity(
    model: str = typer.Argument(..., help="catalog name or path to a GGUF file"),
    file: str = typer.Argument(..., help="text file to score"),
    ctx: int = typer.Option(512, "--ctx", "-c", min=2, help="chunk length in tokens"),
    threads: Optional[str] = THREADS,
    backend: Optional[str] = BACKEND,
    gpu_layers: Optional[int] = GPU_LAYERS,
    gpu_memory_budget: Optional[str] = GPU_BUDGET,
    as_json: bool = typer.Option(False, "--json", help='print {"ppl": float, "scored_tokens": int}'),
    memory_budget: Optional[str] = typer.Option(None, "--memory-budget", help="memory the run may use, e.g. 400M, 1.5G; weights that do not fit stream from disk"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="print kernels and the memory plan on stderr"),
    sparsity: float = SPARSITY,
    sparsity_calib: Optional[str] = SPARSITY_CALIB,
    cache_type: str = CACHE_TYPE,
) -> None:
    """Perplexity of FILE, scored as llama.cpp's llama-perplexity does (with --sparsity: every token as sparse
    decode computes it)."""
    text = _prompt_text(None, file)
    rcfg = _runtime_config(threads, ctx, backend, n_batch=min(ctx, 4096), memory_budget=memory_budget,
                           spec=_sparse(sparsity, sparsity_calib) | _cache(cache_type) | _gpu(gpu_layers, gpu_memory_budget))
    if rcfg.memory_budget:  # a chunk's logits are scored outside the model: leave room for them
        import dataclasses

        n_vocab = rt.describe_model(_resolve(model))["vocab_size"]
        reserve = 4 * ctx * n_vocab * 4  # float32 logits, their copy, float64 log-softmax temporaries
        if reserve >= rcfg.memory_budget:
            raise rt.EdgeLLMError(f"--memory-budget {memory_budget} cannot hold the logits of one {ctx}-token chunk "
                                  f"(~{reserve / 2**20:,.0f} MB); lower --ctx or raise the budget")
        if verbose:
            typer.echo(f"[{reserve / 2**20:,.0f} MB of the budget kept for a chunk's logits]", err=True)
        rcfg = dataclasses.replace(rcfg, memory_budget=rcfg.memory_budget - reserve)
    eng = _load(model, rcfg, verbose)
    try:
        def progress(i, n, ppl):
            if not as_json:
                typer.echo(f"[{i}/{n}] {ppl:.4f}", err=True)

        r = rt.perplexity(eng, text, ctx, on_chunk=progress)
        sparse_info = eng.model.sparse.describe() if getattr(eng.model, "sparse", None) else None
    finally:
        eng.close()
    if as_json:
        typer.echo(json.dumps({"ppl": r.ppl, "scored_tokens": r.scored_tokens, "sparsity": sparse_info}))
    else:
        typer.echo(f"perplexity {r.ppl:.4f} over {r.scored_tokens} tokens ({r.n_chunks} chunks of {ctx})")


@app.command()
def bench(
    target: str = typer.Argument(rt.DEFAULT_MODEL, help="a model (catalog name or GGUF path), or 'kernels'"),
    threads: Optional[str] = typer.Option("2", "--threads", "-t", help="CPU threads: a number (llama.cpp gets the "
                                          "same), or auto"),
    reps: int = typer.Option(3, "--reps", min=1, max=50, help="runs per figure (the median is reported)"),
    n_prompt: int = typer.Option(512, "--n-prompt", "-p", min=1, help="prompt tokens (pp)"),
    n_gen: int = typer.Option(64, "--n-gen", "-n", min=1, help="generated tokens (tg)"),
    backend: Optional[str] = BACKEND,
    gpu_layers: Optional[int] = GPU_LAYERS,
    gpu_memory_budget: Optional[str] = GPU_BUDGET,
    no_llama_cpp: bool = typer.Option(False, "--no-llama-cpp", help="skip the llama.cpp comparison"),
    profile: bool = typer.Option(False, "--profile", help="also print milliseconds per decoded token by op"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    memory_budget: Optional[str] = typer.Option(None, "--memory-budget", help="memory our run may use, e.g. 400M (llama.cpp runs unlimited; bench/offload.py compares both under memlimit)"),
    draft: Optional[str] = DRAFT,
    lookup: int = LOOKUP,
    draft_max: int = DRAFT_MAX,
    sparsity: float = SPARSITY,
    sparsity_calib: Optional[str] = SPARSITY_CALIB,
    cache_type: str = CACHE_TYPE,
) -> None:
    """Measure prompt processing and generation speed (and llama.cpp's, when llama-cpp-python is installed)."""
    if target == "kernels":
        return _bench_kernels(threads, as_json)
    from .runtime import bench as rb

    path = _resolve(target)
    n_ctx = max(1024, n_prompt + n_gen)
    spec = _speculative(draft, lookup, draft_max)
    rcfg = _runtime_config(threads, n_ctx, backend, n_batch=min(n_prompt, 4096), memory_budget=memory_budget,
                           spec=spec | _sparse(sparsity, sparsity_calib) | _cache(cache_type)
                           | _gpu(gpu_layers, gpu_memory_budget))
    eng = _load(target, rcfg)
    try:
        ours = rb.measure(eng, n_prompt, n_gen, reps)
        breakdown = rb.profile_decode(eng) if profile else None
        speculative = rb.measure_speculative(eng, max(n_gen, 256), reps) if spec else None
        sparse = rb.measure_sparse(eng, max(n_gen, 128), reps) if sparsity else None
    finally:
        eng.close()
    ref = None if no_llama_cpp else rb.measure_llama_cpp(str(path), n_prompt, n_gen, reps, rcfg.max_threads, n_ctx,
                                                         rcfg.cache_type)
    out = dict(ours, llama_cpp=ref)
    if breakdown:
        out["decode_ms_per_token_by_op"] = breakdown
    if speculative:
        out["speculative"] = speculative
    if sparse:
        out["sparsity"] = sparse
    if as_json:
        typer.echo(json.dumps(out))
        return
    pp, tg = f"pp{n_prompt}_tokens_per_s", f"tg{n_gen}_tokens_per_s"
    typer.echo(f"{target}: {threads} threads, median of {reps}, kernels: {eng.backend}")
    typer.echo(f"{'':12}{'pp' + str(n_prompt) + ' tok/s':>14}{'tg' + str(n_gen) + ' tok/s':>14}{'peak RSS':>12}")
    typer.echo(f"{'edgellm':12}{ours[pp]:14.1f}{ours[tg]:14.1f}{ours['peak_rss_bytes'] / 1e6:10,.0f} MB")
    if ref and "error" not in ref:
        typer.echo(f"{'llama.cpp':12}{ref[pp]:14.1f}{ref[tg]:14.1f}{ref['peak_rss_bytes'] / 1e6:10,.0f} MB")
        typer.echo(f"{'ratio':12}{ours[pp] / ref[pp]:13.2f}x{ours[tg] / ref[tg]:13.2f}x"
                   f"{ours['peak_rss_bytes'] / ref['peak_rss_bytes']:11.2f}x")
    elif ref:
        typer.echo(f"llama.cpp: {ref['error']}")
    elif no_llama_cpp:
        typer.echo("llama.cpp: skipped (--no-llama-cpp)")
    else:
        typer.echo("llama.cpp: not measured (pip install llama-cpp-python to compare)")
    if speculative:
        typer.echo(f"speculative decoding ({', '.join(f'{k} {v}' for k, v in spec.items())}), greedy, "
                   f"{max(n_gen, 256)} tokens, median of {reps}:")
        for name, r in speculative.items():
            typer.echo(f"  {name:<10} plain {r['plain_tokens_per_s']:6.1f} tok/s, speculative "
                       f"{r['speculative_tokens_per_s']:6.1f} ({r['speedup']:.2f}x), acceptance "
                       f"{r.get('acceptance', 0):.0%}, {r['tokens']} tokens in {r.get('target_passes', 0)} "
                       f"passes, ids {'identical' if r['identical'] else 'DIFFER'}")
    if sparse:
        typer.echo(f"sparsity {sparse['sparsity']:.2f} (weight reads skipped per token; target {sparsity}), greedy "
                   f"decode of {sparse['tokens']} tokens on {len(sparse['prompts'])} prompts, median of {reps}:")
        for name, r in sparse["prompts"].items():
            typer.echo(f"  {name:<10} dense {r['dense_tokens_per_s']:6.1f} tok/s, sparse {r['sparse_tokens_per_s']:6.1f} "
                       f"({r['speedup']:.2f}x), neurons active {r['neurons_active']:.0%}, same greedy tokens as dense "
                       f"for the first {r['agree']} of {r['tokens']}")
    if breakdown:
        typer.echo("decode, ms per token by op:")
        for k, v in breakdown.items():
            typer.echo(f"  {k:<22}{v:8.3f}")


@app.command()
def sparsify(
    model: str = typer.Argument(..., help="catalog name or path to a GGUF file"),
    calib: Optional[str] = typer.Option(None, "--calib", help="calibration text (default: license texts and Python "
                                        "sources, never GPL-3)"),
    sparsity: float = typer.Option(0.35, "--sparsity", min=0.0, max=0.9, help="show the per-layer allocation for "
                                   "this fraction of weight reads skipped"),
    force: bool = typer.Option(False, "--force", help="calibrate again even when a cached calibration exists"),
    threads: Optional[str] = THREADS,
    as_json: bool = typer.Option(False, "--json", help="print the calibration and the allocation as JSON"),
) -> None:
    """Calibrate activation sparsity for MODEL (cached; --sparsity in run/chat/bench/perplexity uses it)."""
    from .runtime import sparsity as sp

    eng = _load(model, _runtime_config(threads, 512))
    try:
        cal = sp.calibration(eng, calib, progress=sp.bar("calibrating sparsity"), force=force)
        path = sp.cache_path(cal.model_sha256)
    finally:
        eng.close()
    most = cal.max_skipped()
    if sparsity > most:
        typer.echo(f"--sparsity {sparsity} is beyond this model (at most {most:.0%} of a token's reads can be "
                   f"skipped, every layer at neuron sparsity {sp.LEVELS[-1]}); showing {int(most * 100) / 100}", err=True)
        sparsity = int(most * 100) / 100
    levels = cal.allocate(sparsity)
    if as_json:
        typer.echo(json.dumps({"cache": str(path), "calibration": cal.to_json(), "sparsity": sparsity,
                               "skipped": cal.skipped(levels), "layers": [lv or 0.0 for lv in levels]}))
        return
    loc = cal.locality
    typer.echo(f"calibrated on {cal.n_tokens} tokens; cached in {path}")
    typer.echo(f"locality at neuron sparsity {loc['level']}: {loc['shared_with_previous_token']:.0%} of a token's "
               f"active neurons were active for the previous token; the most active 20% of neurons carry "
               f"{loc['activity_in_top_20pct_neurons']:.0%} of the activity")
    typer.echo(f"--sparsity {sparsity}: {cal.skipped(levels):.1%} of weight reads skipped; per layer (neurons "
               f"skipped, FFN output error at that level):")
    for i, lv in enumerate(levels):
        err = cal.err[i][sp.LEVELS.index(lv)] if lv else 0.0
        typer.echo(f"  blk.{i:<3} {lv or 0.0:4.1f}  {err:8.4f}")


@app.command()
def compress(
    model: str = typer.Argument(..., help="catalog name or path to a GGUF file (e.g. the Q4_K_M one)"),
    out: str = typer.Option(..., "--output", "-o", help="the GGUF file to write"),
    size: Optional[str] = typer.Option(None, "--size", help="the output's size, in bytes or as 800M / 1.2G"),
    bpw: Optional[float] = typer.Option(None, "--bpw", help="bits per matrix weight instead of --size, e.g. 3.5"),
    rank: int = typer.Option(0, "--rank", help="offer low-rank corrections of this rank (0-64) of each layer "
                             "matrix's quantization error; a matrix takes one where it pays for its bytes"),
    calib: Optional[str] = typer.Option(None, "--calib", help="calibration text, UTF-8 (default: license texts and "
                                        "Python sources, never GPL-3)"),
    calib_tokens: int = typer.Option(4096, "--calib-tokens",
                                     help="tokens of the calibration text the importance matrix reads (256 or more)"),
    threads: Optional[str] = THREADS,
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:
    """Rewrite MODEL at a smaller size: a type per matrix chosen by an importance matrix (and optional
    low-rank corrections); the output loads, streams and serves like any GGUF file."""
    from pathlib import Path

    from .runtime import compress as cp
    from .runtime.sparsity import bar

    if (size is None) == (bpw is None):
        raise rt.EdgeLLMError("give exactly one of --size and --bpw")
    try:
        nbytes = cp.parse_size(size) if size is not None else None
    except ValueError as e:
        raise rt.EdgeLLMError(str(e).replace("memory size", "--size")) from None
    src = Path(_resolve(model))
    r = cp.compress(src, Path(out), nbytes, bpw, rank, calib, calib_tokens, threads or "auto",
                    progress=bar, log=lambda m: typer.echo(m, err=True))
    if as_json:
        typer.echo(json.dumps({"path": str(r.path), "bytes": r.size, "source_bytes": r.source_size,
                               "fraction": r.size / r.source_size, "bits_per_weight": r.bpw, "mix": r.mix,
                               "rank": r.rank, "corrected": r.corrected, "calib_tokens": r.calib_tokens, "seconds": r.seconds}))
    else:
        typer.echo(cp.describe(r))


def _bench_kernels(threads: Optional[str], as_json: bool) -> None:
    from .kernels_cpu import bench as kb

    n = _runtime_config(threads, 512).max_threads
    rows = kb.run(threads_list=(1, 2) if n == 2 else (n,), json=as_json)
    if as_json:
        typer.echo(json.dumps(rows))


@app.command()
def chat(
    model: str = typer.Argument(rt.DEFAULT_MODEL, help="catalog name or path to a GGUF file"),
    system: Optional[str] = typer.Option(None, "--system", "-s", help="system prompt"),
    temp: float = typer.Option(0.8, "--temp", min=0.0, help="temperature (0 = greedy)"),
    top_k: int = typer.Option(40, "--top-k"),
    top_p: float = typer.Option(0.95, "--top-p"),
    min_p: float = typer.Option(0.05, "--min-p"),
    seed: Optional[int] = typer.Option(None, "--seed", min=0, help="random seed (default: random)"),
    n: int = typer.Option(-1, "-n", "--max-tokens", min=-1, help="tokens per reply at most (-1: until end of turn)"),
    threads: Optional[str] = THREADS,
    ctx: int = CTX,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="print speed and memory after each reply"),
    memory_budget: Optional[str] = typer.Option(None, "--memory-budget", help="memory the chat may use, e.g. 400M, 1.5G; weights that do not fit stream from disk"),
    draft: Optional[str] = DRAFT,
    lookup: int = LOOKUP,
    draft_max: int = DRAFT_MAX,
    sparsity: float = SPARSITY,
    sparsity_calib: Optional[str] = SPARSITY_CALIB,
    cache_type: str = CACHE_TYPE,
    backend: Optional[str] = BACKEND,
    gpu_layers: Optional[int] = GPU_LAYERS,
    gpu_memory_budget: Optional[str] = GPU_BUDGET,
) -> None:
    """Chat with MODEL in the terminal (/help lists the commands; Ctrl+C stops a reply)."""
    rt.RuntimeConfig(**_cache(cache_type))  # a bad cache type fails before the model loads
    from .runtime.api import load
    from .runtime.chat_session import ChatSession, repl

    sampling = dict(temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed, max_tokens=n)
    rt.SamplingParams(**sampling)  # bad values fail before the model loads
    _resolve(model)  # fetch with a progress bar first
    settings = {"ctx": ctx, **({"threads": threads} if threads is not None else {}),
                **({"memory_budget": memory_budget} if memory_budget else {}),
                **_speculative(draft, lookup, draft_max), **_sparse(sparsity, sparsity_calib), **_cache(cache_type),
                **({"backend": backend} if backend else {}), **_gpu(gpu_layers, gpu_memory_budget)}
    with load(model, **settings) as llm:
        if verbose:
            typer.echo("[" + ", ".join(f"{k} {v}" for k, v in llm.info.items() if k != "path") + "]", err=True)
        repl(ChatSession(llm, system, **sampling), verbose=verbose)


@app.command()
def serve(
    model: str = typer.Argument(rt.DEFAULT_MODEL, help="catalog name or path to a GGUF file"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on (loopback unless an API key is set)"),
    port: int = typer.Option(8080, "--port", min=1, max=65535),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="require Authorization: Bearer KEY"),
    api_key_file: Optional[str] = typer.Option(None, "--api-key-file", help="read the API key from a file"),
    queue: int = typer.Option(8, "--queue", min=0, max=1024, help="requests that may wait while others generate"),
    parallel: int = typer.Option(1, "--parallel", "-np", min=1, max=16, help="requests generated at once, batched "
                                 "token by token (each holds a KV cache of --ctx tokens)"),
    threads: Optional[str] = THREADS,
    ctx: int = CTX,
    memory_budget: Optional[str] = typer.Option(None, "--memory-budget", help="memory the server may use, e.g. 800M"),
    draft: Optional[str] = DRAFT,
    lookup: int = LOOKUP,
    draft_max: int = DRAFT_MAX,
    sparsity: float = SPARSITY,
    sparsity_calib: Optional[str] = SPARSITY_CALIB,
    cache_type: str = CACHE_TYPE,
    backend: Optional[str] = BACKEND,
    gpu_layers: Optional[int] = GPU_LAYERS,
    gpu_memory_budget: Optional[str] = GPU_BUDGET,
) -> None:
    """Serve MODEL over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, ...)."""
    from .runtime import server

    if api_key_file:
        try:
            api_key = open(api_key_file, encoding="utf-8").read().strip()
        except OSError as e:
            raise rt.EdgeLLMError(f"cannot read {api_key_file}: {e.strerror}") from None
        if not api_key:
            raise rt.EdgeLLMError(f"{api_key_file} is empty")
    if not server.is_loopback(host) and not api_key:
        raise rt.EdgeLLMError(f"refusing to listen on {host} without an API key: give --api-key or --api-key-file "
                              "(or keep the default 127.0.0.1)")
    try:
        import uvicorn  # noqa: F401
    except ImportError:
        raise rt.EdgeLLMError("the server needs its extra: pip install 'edgellm[serve]'") from None

    _resolve(model)
    settings = {"ctx": ctx, **({"threads": threads} if threads is not None else {}),
                **({"memory_budget": memory_budget} if memory_budget else {}), **_speculative(draft, lookup, draft_max),
                **_sparse(sparsity, sparsity_calib), **_cache(cache_type), **({"parallel": parallel} if parallel > 1 else {}),
                **({"backend": backend} if backend else {}), **_gpu(gpu_layers, gpu_memory_budget)}
    server.run(model, settings, host, port, api_key, queue, echo=lambda m: typer.echo(m, err=True))


# ---- the LAN cluster (edgellm.runtime.cluster): `worker`, `keygen`, and --cluster on `run` ----


def _cluster_config(rcfg, cluster: Optional[str], key: Optional[str], split: Optional[str], timeout: float = 5.0,
                    allow: Optional[str] = None):
    """`rcfg` with the --cluster, --key, --allow, --split and --cluster-timeout options applied."""
    import dataclasses

    if not cluster:
        return rcfg
    try:
        weights = tuple(float(w) for w in split.split(",")) if split and split != "auto" else ()
    except ValueError:
        raise rt.EdgeLLMError(f"--split must be comma-separated numbers, not {split!r}") from None
    nodes = tuple(a.strip() for a in cluster.split(",") if a.strip())
    return dataclasses.replace(rcfg, cluster=nodes, cluster_key=key, cluster_allow=allow, cluster_split=weights,
                               cluster_timeout=timeout)


@app.command()
def worker(
    listen: str = typer.Option("127.0.0.1:7370", "--listen", help="HOST:PORT to listen on (off loopback: needs --key)"),
    key: Optional[str] = typer.Option(None, "--key", help="this node's cluster key (`edgellm keygen`)"),
    allow: Optional[str] = typer.Option(None, "--allow", help="certificates of the coordinators to accept (PEM; default: --key's own)"),
    memory_budget: Optional[str] = typer.Option(None, "--memory-budget", help="memory this node may use, e.g. 500M; a shard that does not fit streams from disk"),
    threads: Optional[str] = THREADS,
) -> None:
    """Serve a share of a model to a coordinator (`edgellm run MODEL --cluster HOST:PORT`)."""
    import logging

    from .runtime import cluster

    logging.basicConfig(level=logging.INFO, format="edgellm worker: %(message)s")
    host, port = cluster.parse_address(listen)
    w = cluster.Worker(host, port, cluster.load_identity(key, allow), cluster.parse_size(memory_budget),
                       _runtime_config(threads, 512).max_threads if threads else None)
    typer.echo(f"edgellm worker listening on {w.address[0]}:{w.address[1]}")
    sys.stdout.flush()
    try:
        w.serve_forever()
    finally:
        w.close()


@app.command()
def keygen(
    file: str = typer.Argument(..., help="where to write the new key"),
    force: bool = typer.Option(False, "--force", help="overwrite an existing file"),
) -> None:
    """Make a node key (Ed25519, with its certificate in FILE.crt) for the cluster's TLS connections."""
    from .runtime import cluster

    path = cluster.keygen(file, force)
    ident = cluster.load_identity(path)
    typer.echo(f"wrote a new node key to {path} (keep it secret) and its certificate to {path}.crt "
               f"(fingerprint {ident.name}). Either copy {path} to every node (one shared identity), or give "
               f"each node its own key and list the others' .crt files in --allow FILE.")


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


if __name__ == "__main__":  # python -m edgellm.cli
    main()
