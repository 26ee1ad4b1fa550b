"""LAN-cluster benchmark: `python bench/cluster.py [--model M] [--nodes 1,2,3,4] [--delays 0,1,5]`.

For each node count and one-way delay, workers are `edgellm worker` processes on loopback and the
coordinator runs in a process of its own (so each peak RSS is one node's). A delay is added by a
user-space relay in front of each worker that holds every chunk for DELAY ms in each direction
(`tc netem` would do it in the kernel; this machine's kernel has no netem: see --help of the test).
Per configuration it reports:
- tok/s: greedy decoding, the median of per-token times;
- comm ms/tok: the coordinator's time in STEP sends, all-reduces and the logits gather per decoded
  token (it includes waiting for slower nodes' compute);
- probe ms/tok: a STEP and 2 x n_layer all-reduces with no model work on any node: the network's
  and the protocol's own cost of a token;
- floor ms: 2 x n_layer x RTT, RTT measured by a probe with one all-reduce;
- weights MB per node (as stored in the file), and peak and final RSS MB per node (coordinator
  first; each process also holds ~120 MB of interpreter and libraries, and packing's transients).
Every connection is TLS 1.3 (runtime/cluster/keys.py); without --key the workers use throw-away
certificates on loopback, so the figures include the encryption.
"""
from __future__ import annotations

import argparse
import collections
import json
import socket
import statistics
import subprocess
import sys
import threading
import time

WORKER = [sys.executable, "-c", "from edgellm.cli import main; main()", "worker", "--listen", "127.0.0.1:0"]


# ---- a delaying TCP relay (one process per worker) ------------------------------------------------------

def _pump(src: socket.socket, dst: socket.socket, delay: float) -> None:
    q: collections.deque = collections.deque()
    cv = threading.Condition()

    def writer():
        while True:
            with cv:
                while not q:
                    cv.wait()
                due, data = q.popleft()
            if data is None:
                dst.close()
                return
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            try:
                dst.sendall(data)
            except OSError:
                return

    threading.Thread(target=writer, daemon=True).start()
    while True:
        try:
            data = src.recv(1 << 16)
        except OSError:
            data = b""
        with cv:
            q.append((time.monotonic() + delay, data or None))
            cv.notify()
        if not data:
            return


def relay(target: str, delay_ms: float) -> None:
    host, port = target.rsplit(":", 1)
    srv = socket.create_server(("127.0.0.1", 0))
    print(f"relay listening on 127.0.0.1:{srv.getsockname()[1]}", flush=True)
    while True:
        a, _ = srv.accept()
        b = socket.create_connection((host, int(port)))
        for s in (a, b):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for src, dst in ((a, b), (b, a)):
            threading.Thread(target=_pump, args=(src, dst, delay_ms / 1000), daemon=True).start()


# ---- the coordinator's side (its own process) ------------------------------------------------------------

def rss(pid: int | str = "self", field: str = "VmHWM") -> int:
    """Peak (VmHWM) or current (VmRSS) resident bytes of a process."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def inner(args) -> None:
    from edgellm.loaders.store import resolve
    from edgellm.runtime import Engine, RuntimeConfig, SamplingParams

    nodes = tuple(a for a in args.inner.split(",") if a)
    split = (1.0,) * (len(nodes) + 1) if args.split == "equal" else ()
    rc = RuntimeConfig(n_ctx=512, threads=args.threads, backend=args.backend, cluster=nodes, cluster_timeout=30.0,
                       cluster_split=split if nodes else ())
    eng = Engine(resolve(args.model), rc)
    ids = eng.tokenizer.encode("Write a short story about a robot who learns to paint.")
    stamps = []
    eng.prefill(ids)  # warm up (first calls build kernels and caches)
    eng.reset()
    t0 = time.perf_counter()
    for ev in eng.generate(ids, SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)):
        stamps.append(time.perf_counter())
    dts = [b - a for a, b in zip(stamps, stamps[1:])]
    out = {"nodes": len(nodes) + 1, "tok_s": 1 / statistics.median(dts), "n_layer": eng.config.n_layer,
           "decode_s": stamps[-1] - stamps[0], "prefill_s": stamps[0] - t0}
    if nodes:
        cm = eng.model
        c1 = cm.comm_s
        for _ in range(8):  # decode-only communication time, on 8 more tokens
            eng.decode_one(ids[-1])
        out["comm_ms_per_tok"] = (cm.comm_s - c1) / 8 * 1e3
        L = cm.cfg.n_layer
        rtt = statistics.median(cm.probe(1) for _ in range(50))
        probe = statistics.median(cm.probe(2 * L) for _ in range(10))
        out.update(rtt_ms=rtt * 1e3, probe_ms_per_tok=probe * 1e3, floor_ms=2 * L * rtt * 1e3,
                   weights_mb=[cm.weight_bytes / 1e6] + [p.weight_bytes / 1e6 for p in cm.live])
    else:
        out["weights_mb"] = [sum(t.nbytes for t in eng.file.tensors.values()
                                 if not (t.name == "token_embd.weight" and "output.weight" in eng.file.tensors))
                             / 1e6]
    out["coordinator_peak_rss_mb"] = rss() / 1e6
    out["coordinator_rss_mb"] = rss(field="VmRSS") / 1e6
    eng.close()
    print(json.dumps(out), flush=True)


# ---- the orchestration -------------------------------------------------------------------------------------

def _start(cmd, marker: str):
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = p.stdout.readline()
    if marker not in line:
        p.kill()
        raise RuntimeError(f"{cmd[:4]} did not start: {line!r}")
    return p, line.rsplit(" ", 1)[1].strip()


def run_config(args, n: int, delay: float) -> dict:
    procs = []
    try:
        addrs, workers = [], []
        for _ in range(n - 1):
            w, addr = _start(WORKER + ["--threads", str(args.threads)], "listening on")
            procs.append(w)
            workers.append(w)
            if delay:
                r, addr = _start([sys.executable, __file__, "--relay", addr, "--delay", str(delay)], "relay listening")
                procs.append(r)
            addrs.append(addr)
        cmd = [sys.executable, __file__, "--inner", ",".join(addrs), "--model", args.model, "--tokens",
               str(args.tokens), "--threads", str(args.threads), "--split", args.split] + (["--backend", args.backend] if args.backend else [])
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if r.returncode:
            raise RuntimeError(r.stderr[-3000:])
        out = json.loads(r.stdout.strip().splitlines()[-1])
        out["delay_ms"] = delay
        out["peak_rss_mb"] = [out.pop("coordinator_peak_rss_mb")] + [rss(w.pid) / 1e6 for w in workers]
        out["rss_mb"] = [out.pop("coordinator_rss_mb")] + [rss(w.pid, "VmRSS") / 1e6 for w in workers]
        return out
    finally:
        for p in procs:
            p.kill()
            p.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--nodes", default="1,2,3,4")
    ap.add_argument("--delays", default="0,1,5", help="one-way delays in ms (0: plain loopback)")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="threads per node")
    ap.add_argument("--backend", default=None)
    ap.add_argument("--split", default="equal", choices=["equal", "auto"],
                    help="equal shares (comparable across runs) or auto (by the nodes' measured speeds)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--inner", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--relay", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--delay", type=float, default=0.0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.relay:
        return relay(args.relay, args.delay)
    if args.inner is not None:
        return inner(args)
    rows = []
    for delay in (float(d) for d in args.delays.split(",")):
        for n in (int(x) for x in args.nodes.split(",")):
            if n == 1 and delay:
                continue
            rows.append(run_config(args, n, delay))
            if not args.json:
                _print_row(rows[-1], len(rows) == 1)
    if args.json:
        print(json.dumps(rows))


def _print_row(r: dict, header: bool) -> None:
    if header:
        print(f"{'nodes':>5} {'delay':>6} {'tok/s':>7} {'comm ms/tok':>12} {'probe ms/tok':>13} {'floor ms':>9} "
              f"{'probe/floor':>11}  per node: weights MB / peak RSS MB / RSS MB at the end")
    comm = f"{r['comm_ms_per_tok']:12.2f}" if "comm_ms_per_tok" in r else f"{'-':>12}"
    probe = f"{r['probe_ms_per_tok']:13.2f}" if "probe_ms_per_tok" in r else f"{'-':>13}"
    floor = f"{r['floor_ms']:9.2f}" if "floor_ms" in r else f"{'-':>9}"
    ratio = f"{r['probe_ms_per_tok'] / r['floor_ms']:11.2f}" if "floor_ms" in r else f"{'-':>11}"
    print(f"{r['nodes']:>5} {r['delay_ms']:>4.0f}ms {r['tok_s']:7.2f} {comm} {probe} {floor} {ratio}  "
          f"{' '.join(f'{w:.0f}' for w in r['weights_mb'])} / {' '.join(f'{m:.0f}' for m in r['peak_rss_mb'])}"
          f" / {' '.join(f'{m:.0f}' for m in r['rss_mb'])}",
          flush=True)


if __name__ == "__main__":
    main()
