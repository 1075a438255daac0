"""Peak memory and throughput of `profile --stream` (issue 13 item 2).

1. A random OPT-2.7B-shaped float16 checkpoint (tools/make_big_random_opt.py, ~5.3 GB, 10.6 GB as float32) is
   profiled in a child process whose address space is limited to --limit-gib (resource.setrlimit RLIMIT_AS):
   the streaming switches on by itself, and the peak RSS (VmHWM) is checked against 2 blocks' float32 weights +
   the hidden states + the runtime floor (measured: a child that only imports and loads nothing big).
2. Throughput in GFLOP/s (2 x block parameters x tokens / wall seconds of the whole command, start-up and
   weight reading included; attention scores not counted) of the streamed and in-memory paths on a model that
   fits: the same OPT-2.7B block shapes with 2 layers (--small).

    python bench/stream_memory.py                     # makes runs/random-opt-2.7b if missing; delete it after
"""
import argparse
import json
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from radial_min import stream  # noqa: E402


def run_profile(model, out, extra, limit_bytes=None, seq_len=128, n_seq=4):
    def limit():
        if limit_bytes:
            resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))

    argv = [sys.executable, str(ROOT / "cli.py"), "profile", "--model", str(model), "--seq-len", str(seq_len),
            "--max-sequences", str(n_seq), "--out", str(out), *extra]  # fmt: skip
    t0 = time.perf_counter()
    p = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, preexec_fn=limit)
    dt = time.perf_counter() - t0
    m = re.search(r"peak memory \(VmHWM\) ([\d,]+) MiB", p.stdout)
    return p, dt, int(m.group(1).replace(",", "")) if m else None


def floor_mib(limit_bytes):
    """The runtime floor: the same interpreter importing radial_min, numba and the kernels, compiling nothing big."""
    code = ("import radial_min, numpy as np; from radial_min import kernels, stream; "
            "kernels.linear(np.ones((4, 8), np.float32), np.ones((8, 8), np.float32)); print(stream.peak_rss_bytes())")  # fmt: skip
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes)))  # fmt: skip
    return int(p.stdout.split()[-1]) / 2**20


def gflops(model_dir, tokens, seconds):
    m = stream.StreamedModel(model_dir)
    block_params = sum(m.block_bytes(b) for b in range(len(m.blocks))) / 4
    return 2 * block_params * tokens / seconds / 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--big", default=str(ROOT / "runs" / "random-opt-2.7b"))
    ap.add_argument("--small", default=str(ROOT / "runs" / "random-opt-2.7b-2layers"))
    ap.add_argument("--limit-gib", type=float, default=3.0)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--sequences", type=int, default=2)
    args = ap.parse_args()
    big, small = Path(args.big), Path(args.small)
    if not big.is_dir():
        subprocess.run([sys.executable, str(ROOT / "tools" / "make_big_random_opt.py"), "--out", str(big)], check=True)
    if not small.is_dir():
        subprocess.run([sys.executable, str(ROOT / "tools" / "make_big_random_opt.py"), "--layers", "2", "--out", str(small)], check=True)
    limit = int(args.limit_gib * 2**30)
    tokens = args.seq_len * args.sequences
    m = stream.StreamedModel(big)
    blocks = sorted(m.block_bytes(b) for b in range(len(m.blocks)))
    two_blocks = (blocks[-1] + blocks[-2]) / 2**20
    states = tokens * m.config.hidden_size * 4 / 2**20
    need = stream.model_bytes(big) / 2**30
    floor = floor_mib(limit)
    report = {"machine": "2-core shared, load from other helpers", "tokens": tokens, "limit_gib": args.limit_gib,
              "model_f32_gib": round(need, 2), "model_over_limit": round(need / args.limit_gib, 2),
              "two_blocks_f32_mib": round(two_blocks), "states_mib": round(states, 1), "floor_mib": round(floor)}  # fmt: skip
    p, dt, peak = run_profile(big, ROOT / "runs" / "stream-bench-big", [], limit, args.seq_len, args.sequences)
    if p.returncode != 0:
        print(p.stderr[-2000:], file=sys.stderr)
        raise SystemExit(f"streamed profile under {args.limit_gib} GiB failed")
    report.update({"big_seconds": round(dt, 1), "big_peak_mib": peak, "bound_mib": round(two_blocks + states + floor),
                   "big_gflops": round(gflops(big, tokens, dt), 2), "auto": "automatic" in p.stderr})  # fmt: skip
    for flag in ([], ["--stream"]):
        p, dt, _ = run_profile(small, ROOT / "runs" / "stream-bench-small", flag, None, args.seq_len, args.sequences)
        assert p.returncode == 0, p.stderr[-2000:]
        report["small_gflops_" + ("stream" if flag else "memory")] = round(gflops(small, tokens, dt), 2)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
