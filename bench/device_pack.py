"""Pack the device check's inputs for a GPU machine that cannot fetch models and takes a bounded
working tree per call (this workplace's device tool: 64 MiB, tree included):

    python bench/device_pack.py DIR [--model gemma3-270m] [--limit 64M]

writes DIR/c0, DIR/c1, ...: the cached model gzipped and cut into parts that fit one call each
beside the tracked tree, the headers of the qwen models for `bench/gpu.py --twin` in c0, and
DIR/run.sh (copied into every part). Call N carries DIR/cN and runs `bash DIR/cN/run.sh N`; the
last call joins the parts, checks the SHA-256 and runs bench/gpu.py. DIR must be git-ignored.
"""
from __future__ import annotations

import argparse
import gzip
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

RUN = r"""#!/bin/bash
# run.sh N: stash part N in /tmp/m; N = 0 also compiles the kernels; N = LAST joins and benches
set -u
N=$1 D=$(dirname "$0")/..
export PYTHONUNBUFFERED=1 EDGELLM_HOME=/tmp/eh
mkdir -p /tmp/m /tmp/p /tmp/eh/models && ln -sfn "$PWD" /tmp/p/edgellm && export PYTHONPATH=/tmp/p
cp "$D/c$N"/* /tmp/m/ && ls -la /tmp/m
if [ "$N" = 0 ]; then
  nvidia-smi -L
  python3 -c "from edgellm.kernels_gpu.launch import CudaDevice; print('compiled on', CudaDevice().name)" || exit 1
fi
if [ "$N" = LAST ]; then
  for i in $(seq 0 LAST); do cat /tmp/m/MODEL.gz.$i; done | gunzip > /tmp/eh/models/MODEL.gguf
  python3 -c "
import hashlib, os, sys
p = '/tmp/eh/models/MODEL.gguf'
h = hashlib.sha256(open(p, 'rb').read()).hexdigest()
if h != 'SHA':
    sys.exit(f'MODEL: sha256 {h}, expected SHA')
st = os.stat(p)
open(p + '.sha256', 'w').write(f'SHA {st.st_size} {st.st_mtime_ns}\n')
" || exit 1
  python3 bench/gpu.py --out $OUT/gpu.json --models MODEL $TWINS
fi
"""


def main() -> int:
    import gpu
    from edgellm.loaders import store
    from edgellm.offload.planner import parse_size

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir")
    ap.add_argument("--model", default="gemma3-270m", choices=list(store.CATALOG))
    ap.add_argument("--limit", default="64M", help="bytes one call may carry, the tracked tree included")
    args = ap.parse_args()
    out = Path(args.dir)
    tracked = sum((ROOT / p).stat().st_size for p in subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split("\0") if p)
    room = parse_size(args.limit) - tracked - (512 << 10)  # the tree as it travels, a margin for edits
    (out / "c0").mkdir(parents=True, exist_ok=True)
    twins = []
    for m in ("qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"):
        if m != args.model and store.is_cached(m):
            gpu.write_header(store.resolve(m, pull_missing=False), out / "c0" / f"{m}.hdr")
            twins.append(f"--twin {m}=/tmp/m/{m}.hdr")
    data = gzip.compress(store.resolve(args.model, pull_missing=False).read_bytes(), 6)
    first = room - sum(p.stat().st_size for p in (out / "c0").iterdir()) - 8192
    cuts = [0, min(first, len(data))]
    while cuts[-1] < len(data):
        cuts.append(min(len(data), cuts[-1] + room - 8192))
    last = len(cuts) - 2
    run = (RUN.replace("MODEL", args.model).replace("SHA", store.CATALOG[args.model].sha256)
           .replace("LAST", str(last)).replace("$TWINS", " ".join(twins)))
    (out / "run.sh").write_text(run)
    for i in range(last + 1):
        d = out / f"c{i}"
        d.mkdir(exist_ok=True)
        (d / f"{args.model}.gz.{i}").write_bytes(data[cuts[i] : cuts[i + 1]])
        (d / "run.sh").write_text(run)
    print(f"{last + 1} calls: carry {out}/cN and run `bash {out}/cN/run.sh N`, N = 0..{last}")
    return 0


if __name__ == "__main__":
    from edgellm.errors import EdgeLLMError

    try:
        sys.exit(main())
    except (EdgeLLMError, OSError) as e:  # a model not pulled yet, a full disk
        sys.exit(f"bench/device_pack.py: {e}")
