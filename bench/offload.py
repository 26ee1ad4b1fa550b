"""Weights streamed from disk under a hard memory limit, against llama.cpp under the same limit.

    python bench/offload.py                                  # qwen2.5-coder-1.5b at 400M and 800M
    python bench/offload.py --budgets 400M --n-gen 8 --no-llama-cpp
    python bench/offload.py --sweep                          # window x queue depth x request size

Each run is a child process under `../shared/tools/memlimit LIMIT --drop-caches` (cold page
cache; the cgroup charges the page cache the run causes), reading a private copy of the model in
$TMPDIR/edgellm-offload-bench (see `private_copy`). Ours runs with --memory-budget equal to
the limit; llama.cpp (llama-cpp-python) runs with its defaults (mmap, weight repacking on) and
with repacking off (`use_extra_bufts = False`; the weights then stay mmap'ed from the file).
Printed per run: prefill of a 64-token prompt (the first one, which also loads compiled kernels,
and a second one), decode tokens/s, peak memory (the cgroup's, which includes page cache, and
the process' own high-water mark), bytes read from disk per decoded token, and the I/O roofline:
the bytes our plan must stream per token divided by the O_DIRECT disk bandwidth measured in the
same run (the best of five sequential passes over the model's layers at the store's queue depth).
Needs root and cgroup v1 (memlimit exits 3 otherwise).
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MEMLIMIT = Path(__file__).resolve().parents[1].parent / "shared" / "tools" / "memlimit"
PROMPT = ("def quicksort(arr):\n    if len(arr) <= 1:\n        return arr\n    pivot = arr[len(arr) // 2]\n"
          "    left = [x for x in arr if x < pivot]\n    middle = [x for x in arr if x == pivot]\n"
          "    right = [x for x in arr if x > pivot]\n    return quicksort(left) + middle + quicksort(right)\n\n"
          "def merge_sort(arr):\n    if len(arr) <= 1:\n        return arr\n")


def _proc() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[k] = int(v.split()[0]) * 1024
    return out


def _read_bytes() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("read_bytes:"))


def _prompt_ids(n: int) -> list[int]:
    from edgellm.loaders.gguf import GGUFFile
    from edgellm.runtime.tokenizer import Tokenizer

    with GGUFFile(ARGS.path) as f:
        tok = Tokenizer.from_metadata(f.metadata)
    ids = tok.encode(PROMPT * 4)
    return ids[:n]


# ---- children (each runs alone under memlimit) ----------------------------------------------------

def child_ours(a) -> dict:
    import numpy as np

    from edgellm.offload import planner, stream
    from edgellm.runtime import Engine, RuntimeConfig

    if a.window is not None:
        planner.WINDOW = a.window
    if a.queue_depth:
        stream.QUEUE_DEPTH = a.queue_depth
    if a.chunk_kb:
        stream.CHUNK_BYTES = a.chunk_kb << 10
    ids = _prompt_ids(a.n_prompt)
    t = time.perf_counter()
    eng = Engine(Path(a.path), RuntimeConfig(n_ctx=512, threads=a.threads, memory_budget=a.budget))
    load_s = time.perf_counter() - t
    prefill = []
    for _ in range(2):
        eng.reset()
        t = time.perf_counter()
        logits = eng.prefill(ids)
        prefill.append(time.perf_counter() - t)
    n0, r0, steps0 = eng.stats.bytes_read, _read_bytes(), len(eng.stats.steps)
    per_tok = []
    t_all = time.perf_counter()
    for _ in range(a.n_gen):
        t = time.perf_counter()
        logits = eng.decode_one(int(np.argmax(logits)))
        per_tok.append(time.perf_counter() - t)
    dec_s = time.perf_counter() - t_all
    steps = eng.stats.steps[steps0:]
    out = {"load_s": load_s, "prefill_first_s": prefill[0], "prefill_s": prefill[1],
           "decode_tok_s": a.n_gen / dec_s, "decode_median_s": statistics.median(per_tok),
           "bytes_per_token": (eng.stats.bytes_read - n0) / a.n_gen,
           "disk_bytes_per_token": (_read_bytes() - r0) / a.n_gen,
           "io_wait_per_token_s": sum(s["io_wait_s"] for s in steps) / a.n_gen,
           "compute_per_token_s": sum(s["compute_s"] for s in steps) / a.n_gen,
           "plan": eng.plan.describe() if eng.plan else "everything resident",
           "stream_bytes": eng.plan.stream_bytes if eng.plan else 0, **_proc()}
    eng.close()
    return out


def child_llama(a) -> dict:
    import llama_cpp.llama as LL
    from llama_cpp import Llama

    if a.variant == "no-repack":  # llama.cpp's CPU repacking (extra buffer types) off: weights stay mmap'ed
        default = LL.llama_cpp.llama_model_default_params

        def params():
            p = default()
            p.use_extra_bufts = False
            return p

        LL.llama_cpp.llama_model_default_params = params
    ids = _prompt_ids(a.n_prompt)
    t = time.perf_counter()
    llm = Llama(model_path=a.path, n_ctx=512, n_batch=a.n_prompt, n_threads=a.threads, n_threads_batch=a.threads,
                verbose=False)
    load_s = time.perf_counter() - t
    prefill = []
    for _ in range(2):
        llm.reset()
        if hasattr(llm._ctx, "memory_clear"):
            llm._ctx.memory_clear(True)
        t = time.perf_counter()
        llm.eval(ids)
        prefill.append(time.perf_counter() - t)
    r0 = _read_bytes()
    per_tok = []
    t_all = time.perf_counter()
    for i in range(a.n_gen):
        t = time.perf_counter()
        llm.eval([ids[i % len(ids)]])
        per_tok.append(time.perf_counter() - t)
    dec_s = time.perf_counter() - t_all
    return {"load_s": load_s, "prefill_first_s": prefill[0], "prefill_s": prefill[1],
            "decode_tok_s": a.n_gen / dec_s, "decode_median_s": statistics.median(per_tok),
            "disk_bytes_per_token": (_read_bytes() - r0) / a.n_gen, **_proc()}


# ---- the parent -----------------------------------------------------------------------------------

def disk_bandwidth(path: str, offset: int, nbytes: int, queue_depth: int, chunk: int, huge: bool = True) -> float:
    """Bytes/s of O_DIRECT reads of [offset, offset + nbytes) in `chunk` requests, `queue_depth` in
    flight, into buffers of 2 MiB pages as the store uses (huge) or of ordinary 4 KiB pages."""
    from edgellm.offload.stream import _Slot

    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    bufs = [(_Slot(chunk).view if huge else memoryview(mmap.mmap(-1, chunk))) for _ in range(queue_depth)]
    a = offset // 4096 * 4096
    offs = list(range(a, a + nbytes // chunk * chunk, chunk))
    try:
        with ThreadPoolExecutor(queue_depth) as pool:
            t = time.perf_counter()
            done = sum(pool.map(lambda i: os.preadv(fd, [bufs[i % queue_depth]], offs[i]), range(len(offs)),
                                chunksize=1))
            return done / (time.perf_counter() - t)
    finally:
        os.close(fd)


def private_copy(src: Path) -> str:
    """A copy of the model that no other process maps. `--drop-caches` cannot drop page cache that
    some process has mapped, and a page is charged to the cgroup that first read it: with another
    process (a test run, a chat) mapping the cached model, llama.cpp's mmap would find the whole
    file in memory and be charged nothing for it."""
    dst = Path(tempfile.gettempdir()) / "edgellm-offload-bench" / src.name
    if not dst.exists() or dst.stat().st_size != src.stat().st_size:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_suffix(".part")
        with open(src, "rb") as fi, open(tmp, "wb") as fo:
            while chunk := fi.read(16 << 20):
                fo.write(chunk)
            fo.flush()
            os.fsync(fo.fileno())
        tmp.rename(dst)
    for p in (src, dst):  # drop what the copy cached (memlimit --drop-caches does the rest)
        fd = os.open(p, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    return str(dst)


def run_child(limit: str, args: list[str]) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as rep:
        cmd = [sys.executable, str(MEMLIMIT), limit, "--drop-caches", "--json", rep.name, "--",
               sys.executable, __file__, "--child", *args]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=ARGS.timeout)
        except subprocess.TimeoutExpired:  # llama.cpp thrashing its mmap: stop the whole group
            os.killpg(proc.pid, 9)
            stdout, stderr = proc.communicate()
            stderr += f"\nstopped after {ARGS.timeout} s"
        r = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
        if r.returncode == 3 and "no cgroup" in r.stderr:
            sys.exit("memlimit cannot set memory limits here (needs root and cgroup v1)")
        try:
            report = json.loads(Path(rep.name).read_text())
        except (OSError, ValueError):
            report = {}
    out = {"memlimit": report, "ok": r.returncode == 0}
    try:
        out.update(json.loads(r.stdout.strip().splitlines()[-1]))
    except (IndexError, ValueError):
        out["error"] = (r.stderr.strip().splitlines() or ["no output"])[-1][:300]
    return out


def main() -> None:
    from edgellm.loaders.store import resolve
    from edgellm.offload import planner, stream

    path = private_copy(resolve(ARGS.model))
    base = ["--path", path, "--n-prompt", str(ARGS.n_prompt), "--n-gen", str(ARGS.n_gen), "--threads", str(ARGS.threads)]
    from edgellm.loaders.gguf import GGUFFile
    from edgellm.runtime.model import model_class
    from edgellm.runtime import gemma3, llama  # noqa: F401
    with GGUFFile(path) as f:
        sizes = planner.model_sizes(f, model_class(f.metadata["general.architecture"]).config(f))
    layers = [u for u in sizes.units if u.rows is None]
    span = sum(u.nbytes for u in layers)  # the layers lie back to back (checked by model_sizes)
    first = min(u.offset for u in layers)
    passes = [disk_bandwidth(path, first, span, stream.QUEUE_DEPTH, stream.CHUNK_BYTES) for _ in range(5)]
    bw = max(passes)  # what the disk can do; slower passes met other processes' I/O
    bw4k = max(disk_bandwidth(path, first, span, stream.QUEUE_DEPTH, stream.CHUNK_BYTES, huge=False)
               for _ in range(3))
    print(f"{ARGS.model}: {sizes.weight_bytes / 1e6:,.0f} MB of weights read per token when nothing is resident; "
          f"O_DIRECT disk bandwidth {bw / 1e9:.2f} GB/s into 2 MiB pages (best of 5 passes over the layers, "
          f"median {statistics.median(passes) / 1e9:.2f}; {bw4k / 1e9:.2f} GB/s into 4 KiB pages), "
          f"queue depth {stream.QUEUE_DEPTH}, {stream.CHUNK_BYTES >> 20} MiB requests")
    results = {"model": ARGS.model, "disk_bytes_per_s": bw, "disk_bytes_per_s_4k_pages": bw4k, "runs": []}
    if ARGS.sweep:
        configs = [(w, qd, ck) for w in (1, 2, 3) for qd in (1, 2, 4, 8) for ck in (4096,)] + \
                  [(2, 4, ck) for ck in (1024, 16384)]
        for w, qd, ck in configs:
            r = run_child(ARGS.budgets[0], base + ["--which", "ours", "--budget", ARGS.budgets[0], "--window", str(w),
                                                  "--queue-depth", str(qd), "--chunk-kb", str(ck)])
            roof = bw / r["stream_bytes"] if r.get("stream_bytes") else float("nan")
            print(f"window {w} qd {qd} chunk {ck:>5} KiB: decode {r.get('decode_tok_s', 0):.3f} tok/s "
                  f"({r.get('decode_tok_s', 0) / roof:.0%} of roofline {roof:.3f}), prefill {r.get('prefill_s', 0):.2f} s",
                  flush=True)
            results["runs"].append(dict(r, window=w, queue_depth=qd, chunk_kb=ck))
    else:
        for budget in ARGS.budgets:
            runs = [("edgellm", ["--budget", budget])]
            if not ARGS.no_llama_cpp:
                runs += [("llama.cpp default", ["--variant", "default"]),
                         ("llama.cpp no-repack", ["--variant", "no-repack"])]
            ours = None
            for name, extra in runs:
                r = run_child(budget, base + extra + (["--which", "ours"] if name == "edgellm" else ["--which", "llama"]))
                r.update(name=name, budget=budget)
                results["runs"].append(r)
                if name == "edgellm":
                    ours = r
                    if r.get("plan"):
                        print(r["plan"])
                roof = bw / ours["stream_bytes"] if ours and ours.get("stream_bytes") else float("nan")
                _print_row(r, roof)
    if ARGS.json:
        Path(ARGS.json).write_text(json.dumps(results, indent=1))


def _print_row(r: dict, roof: float) -> None:
    m = r.get("memlimit", {})
    if not r.get("ok"):
        if not m:  # stopped by --timeout: memlimit went with it
            print(f"{r['budget']:>5} {r['name']:<20} {r.get('error', 'failed')} (still thrashing)", flush=True)
            return
        what = "killed by the OOM killer" if m.get("oom_killed") else r.get("error", "failed")
        print(f"{r['budget']:>5} {r['name']:<20} {what}; peak {m.get('peak_bytes', 0) / 2**20:,.0f} MiB, "
              f"read {m.get('disk_read_bytes_max_seen', 0) / 1e9:.1f} GB before", flush=True)
        return
    tok_s = r["decode_tok_s"]
    per_tok = r.get("bytes_per_token", r["disk_bytes_per_token"])
    print(f"{r['budget']:>5} {r['name']:<20} prefill 64: {r['prefill_s']:5.2f} s (first {r['prefill_first_s']:5.2f} s)"
          f"  decode {tok_s:6.3f} tok/s = {tok_s / roof:4.0%} of the I/O roofline {roof:.3f}"
          f"  peak {m.get('peak_bytes', 0) / 2**20:,.0f} MiB (process HWM {r.get('VmHWM', 0) / 2**20:,.0f}, "
          f"anon {r.get('RssAnon', 0) / 2**20:,.0f}, shmem {r.get('RssShmem', 0) / 2**20:,.0f})"
          f"  read/token {per_tok / 1e6:,.0f} MB (disk {r['disk_bytes_per_token'] / 1e6:,.0f} MB)", flush=True)


def _args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen2.5-coder-1.5b")
    p.add_argument("--budgets", default="400M,800M", type=lambda s: s.split(","))
    p.add_argument("--n-prompt", type=int, default=64)
    p.add_argument("--n-gen", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-llama-cpp", action="store_true")
    p.add_argument("--sweep", action="store_true", help="tune window, queue depth and request size (first budget)")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--timeout", type=int, default=300, help="seconds a run may take before it is stopped")
    # child-only
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--which", help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    p.add_argument("--budget", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--window", type=int, help=argparse.SUPPRESS)
    p.add_argument("--queue-depth", type=int, help=argparse.SUPPRESS)
    p.add_argument("--chunk-kb", type=int, help=argparse.SUPPRESS)
    return p.parse_args()


if __name__ == "__main__":
    ARGS = _args()
    if ARGS.child:
        print(json.dumps(child_ours(ARGS) if ARGS.which == "ours" else child_llama(ARGS)))
    else:
        main()
