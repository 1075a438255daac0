"""Peak memory and throughput of the streamed commands, `profile`, `simulate` and `train-router`.

1. Memory. A random OPT-2.7B-shaped float16 checkpoint (tools/make_big_random_opt.py: 5.0 GB on disk, 9.9 GiB as
   float32) is run by each command in a child process whose address space is limited to --limit-gib
   (resource.setrlimit RLIMIT_AS), so the streaming must switch on by itself. Its peak RSS (VmHWM, printed by the
   command) is checked against the bound: the two largest blocks' float32 weights + the hidden states (+ the
   oracle labels for train-router) + the runtime floor. The floor is the same command's peak on a tiny model of
   the same vocabulary (2 layers of width 64): imports, Numba's compiled kernels, the tokenizer, matplotlib.
2. Throughput, in GFLOP/s = 2 x multiply-adds of the block (and head) matrices x tokens / seconds of the pass
   (attention scores not counted), of the streamed passes (weights read from the file, float16 -> float32,
   included) beside the same passes on the model loaded in memory (loading not included), interleaved, on a model
   that fits: the same OPT-2.7B block shapes with 2 layers.

    nice -n 10 python bench/stream_memory.py        # makes the checkpoints in runs/ if missing; delete them after
"""

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import radial_min  # noqa: E402
from radial_min.analysis import oracle, profiling, stream  # noqa: E402
from radial_min import router as R  # noqa: E402

COMMANDS = {
    "profile": lambda n_seq: ["--max-sequences", str(n_seq)],
    "simulate": lambda n_seq: ["--max-sequences", str(n_seq), "--taus", "0,0.2"],
    "train-router": lambda n_seq: ["--max-sequences", str(n_seq), "--test-sequences", str(n_seq), "--epochs", "1"],
}


def run_command(name, model, out, seq_len, n_seq, limit_bytes, extra=()):
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))

    argv = [
        sys.executable,
        str(ROOT / "cli.py"),
        name,
        "--model",
        str(model),
        "--seq-len",
        str(seq_len),
        "--out",
        str(out),
        "--overwrite",
        *COMMANDS[name](n_seq),
        *extra,
    ]
    t0 = time.perf_counter()
    p = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, preexec_fn=limit)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        print(p.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{name} on {model} under {limit_bytes / 2**30:.1f} GiB failed")
    m = re.search(r"peak memory \(VmHWM\) ([\d,]+) MiB", p.stdout)
    labels = re.search(r"oracle labels ([\d,.]+) MiB", p.stdout)
    return {
        "seconds": round(dt, 1),
        "peak_mib": int(m.group(1).replace(",", "")),
        "labels_mib": float(labels.group(1).replace(",", "")) if labels else 0.0,
        "automatic": "streaming weights block by block (automatic" in p.stderr,
    }


def block_flops(m, tokens):
    return 2 * sum(m.block_bytes(b) for b in range(len(m.blocks))) / 4 * tokens


def head_flops(m, tokens):
    V, P = m.shell.lm_head.weight.shape
    return 2 * V * P * tokens


def passes(model, seqs):
    """The three kinds of pass, as the commands run them."""
    return {
        "profile": lambda: profiling.profile_text(model, seqs),
        "simulate (fill)": lambda: oracle.simulate(model, seqs, oracle.threshold(0.2), "fill"),
        "labels (drop)": lambda: R.oracle_examples(model, seqs, 0.2, "drop"),
    }


def throughput(small, seq_len, n_seq, repeats):
    seqs = np.random.default_rng(0).integers(3, 50000, size=(n_seq, seq_len))
    loaded, streamed = radial_min.load(small), stream.StreamedModel(small)
    tokens = seqs.size
    blocks = block_flops(streamed, tokens)
    flops = {"profile": blocks, "simulate (fill)": blocks + head_flops(streamed, tokens), "labels (drop)": blocks}
    for f in passes(loaded, seqs).values():
        f()  # compile and warm up once
    best = {}
    for _ in range(repeats):  # interleaved: the machine's load changes under both alike
        for which, model in (("memory", loaded), ("stream", streamed)):
            for name, f in passes(model, seqs).items():
                t0 = time.perf_counter()
                f()
                best[(name, which)] = min(best.get((name, which), 1e9), time.perf_counter() - t0)
    return {
        name: {
            f"{k}_{which}": round(v, 2)
            for which in ("memory", "stream")
            for k, v in (("gflops", flops[name] / best[(name, which)] / 1e9), ("seconds", best[(name, which)]))
        }
        for name in flops
    }


def make(path, *args):
    if not Path(path).is_dir():
        tool = ROOT / "tools" / "make_big_random_opt.py"
        subprocess.run([sys.executable, str(tool), "--out", str(path), *args], check=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--big", default=str(ROOT / "runs" / "random-opt-2.7b"))
    ap.add_argument("--small", default=str(ROOT / "runs" / "random-opt-2.7b-2layers"))
    ap.add_argument("--tiny", default=str(ROOT / "runs" / "random-opt-tiny"))
    ap.add_argument("--limit-gib", type=float, default=3.0)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--sequences", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--commands", default=",".join(COMMANDS))
    args = ap.parse_args()
    big, small, tiny = Path(args.big), Path(args.small), Path(args.tiny)
    make(big)
    make(small, "--layers", "2")
    make(tiny, "--layers", "2", "--hidden", "64", "--heads", "2")
    limit = int(args.limit_gib * 2**30)
    m = stream.StreamedModel(big)
    blocks = sorted(m.block_bytes(b) for b in range(len(m.blocks)))
    two_blocks = (blocks[-1] + blocks[-2]) / 2**20
    states = args.seq_len * args.sequences * m.config.hidden_size * 4 / 2**20
    need = stream.model_bytes(big) / 2**30
    report = {
        "load_average": os.getloadavg(),
        "tokens": args.seq_len * args.sequences,
        "limit_gib": args.limit_gib,
        "model_f32_gib": round(need, 2),
        "model_over_limit": round(need / args.limit_gib, 2),
        "two_blocks_f32_mib": round(two_blocks),
        "states_mib": round(states, 1),
        "commands": {},
    }
    for name in args.commands.split(","):
        runs = ROOT / "runs"
        floor = run_command(
            name, tiny, runs / f"stream-bench-floor-{name}", args.seq_len, args.sequences, limit, ["--stream"]
        )
        got = run_command(name, big, runs / f"stream-bench-{name}", args.seq_len, args.sequences, limit)
        bound = two_blocks + states + got["labels_mib"] + floor["peak_mib"]
        report["commands"][name] = {
            **got,
            "floor_mib": floor["peak_mib"],
            "bound_mib": round(bound),
            "within_bound": got["peak_mib"] <= bound,
        }
        print(name, json.dumps(report["commands"][name]), file=sys.stderr, flush=True)
    report["throughput_small"] = throughput(small, args.seq_len, args.sequences, args.repeats)
    report["load_average_end"] = os.getloadavg()
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
