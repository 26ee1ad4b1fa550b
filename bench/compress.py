"""`edgellm compress` against llama.cpp's importance-matrix quantization, at equal sizes:

    python bench/compress.py --llama-bin DIR [--model qwen2.5-coder-1.5b] [--presets Q4_K_S,Q3_K_M,Q2_K]
                             [--ranks 0,32] [--work DIR]

DIR holds llama-imatrix, llama-quantize and llama-perplexity, built from llama-cpp-python's source
package (vendor/llama.cpp; see README). For each preset: llama-imatrix over the same calibration
text edgellm uses (license texts and Python sources, 8 chunks of 512 tokens), then
`llama-quantize --allow-requantize --imatrix` of the Q4_K_M file to the preset; edgellm compresses
the same file to that preset's byte size (with each --ranks value). Every file is scored by the
same evaluator, edgellm's GPL-3 perplexity at ctx 512 (llama-perplexity's method); llama.cpp's own
figure is printed for the files edgellm cannot read (IQ types), and for all with --cross-check.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from edgellm.loaders import store
from edgellm.runtime import Engine, RuntimeConfig, perplexity
from edgellm.runtime.sparsity import default_text

TEXT = Path("/usr/share/common-licenses/GPL-3")


def ppl(path: Path) -> float:
    eng = Engine(path, RuntimeConfig(n_ctx=512, n_batch=512))
    try:
        return perplexity(eng, TEXT.read_text(), 512).ppl
    finally:
        eng.close()


def llama_ppl(bin_dir: Path, path: Path) -> float | None:
    r = subprocess.run([str(bin_dir / "llama-perplexity"), "-m", str(path), "-f", str(TEXT), "-c", "512", "-t", "2"],
                       capture_output=True, text=True)
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", r.stdout + r.stderr)
    return float(m.group(1)) if m else None


def run(cmd: list[str]) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"{' '.join(cmd[:2])} failed:\n{r.stderr[-2000:]}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-bin", type=Path, required=True)
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--presets", default="Q3_K_L,Q3_K_S,Q2_K,IQ2_M")
    ap.add_argument("--ranks", default="0", help="ranks edgellm compresses with at every preset's size")
    ap.add_argument("--rank-at", default="Q2_K:32", help="extra PRESET:RANK points, comma-separated")
    ap.add_argument("--cross-check", action="store_true", help="also score llama.cpp's files with llama-perplexity")
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgellm-bench-compress"))
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    src = store.resolve(a.model)
    calib = a.work / "calib.txt"
    calib.write_text(default_text())
    imatrix = a.work / "imatrix.dat"
    if not imatrix.exists():
        run([str(a.llama_bin / "llama-imatrix"), "-m", str(src), "-f", str(calib), "-c", "512", "--chunks", "8",
             "-t", "2", "-o", str(imatrix)])
    rows = [{"file": src.name, "who": "source", "bytes": src.stat().st_size, "ppl": ppl(src)}]
    print(json.dumps(rows[-1]), flush=True)
    for preset in a.presets.split(","):
        lf = a.work / f"llama-{preset}.gguf"
        if not lf.exists():
            run([str(a.llama_bin / "llama-quantize"), "--allow-requantize", "--imatrix", str(imatrix), str(src), str(lf),
                 preset, "2"])
        size = lf.stat().st_size
        try:
            ours = ppl(lf)
        except Exception:  # a type edgellm has no dequantizer for (the IQ types): llama.cpp scores it
            ours = None
        rows.append({"file": lf.name, "who": "llama.cpp", "preset": preset, "bytes": size, "ppl": ours,
                     "llama_perplexity": llama_ppl(a.llama_bin, lf) if ours is None or a.cross_check else None})
        print(json.dumps(rows[-1]), flush=True)
        extra = [int(r) for p, r in (x.split(":") for x in a.rank_at.split(",") if x) if p == preset]
        for rank in [int(r) for r in a.ranks.split(",")] + extra:
            ef = a.work / f"edgellm-{preset}-r{rank}.gguf"
            t0 = time.monotonic()
            run([sys.executable, "-m", "edgellm.cli", "compress", str(src), "-o", str(ef), "--size", str(size),
                 "--rank", str(rank), "--calib", str(calib)])
            rows.append({"file": ef.name, "who": "edgellm", "rank": rank, "bytes": ef.stat().st_size, "ppl": ppl(ef),
                         "compress_s": round(time.monotonic() - t0)})
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'file':<32}{'MB':>9}{'% of source':>12}{'ppl':>9}{'llama-perplexity':>18}")
    for r in rows:
        lp = r.get("llama_perplexity")
        p = "" if r["ppl"] is None else f"{r['ppl']:.4f}"
        print(f"{r['file']:<32}{r['bytes'] / 1e6:9.1f}{100 * r['bytes'] / rows[0]['bytes']:11.1f}%{p:>9}"
              f"{'' if lp is None else f'{lp:18.4f}'}")
    (a.work / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
