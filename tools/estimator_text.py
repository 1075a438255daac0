"""The router estimators on natural text, at equal compute: `train --preset quick` models (width 128, KJV +
WikiText-2, 400 steps of 32 x 64 tokens) trained sequential at 1-4 layers (2-8 blocks) and as Radial Networks of
4 layers (8 blocks) under each estimator at 4 blocks per token, plus a looped 2-layer network (Mixture-of-Recursions:
4 blocks run up to twice), 3 seeds each; every model scored on the first 20,000 tokens of each held-out stream.

    python tools/estimator_text.py train [--only gate-t4-s0]   # the runs (cli.py train), resumable, 1 thread each
    python tools/estimator_text.py report                      # -> runs/estimators/results.json + the table

The table gives each method's perplexity (mean over seeds, 95% t-interval), its blocks per token, and its
difference from the sequential curve of the same seed (same init, same batches) interpolated linearly at the
method's own blocks per token (mean and 95% t-interval over seeds): a method buys quality per compute only where
that difference is below zero by more than its interval.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "runs" / "estimators"
SEEDS = (0, 1, 2)
RADIAL = ["--layers", "4", "--radial"]
METHODS = {  # name -> (what it is, cli.py train options beyond --preset quick)
    **{f"seq{L}": (f"sequential, {L} layers ({2 * L} blocks)", ["--layers", str(L)]) for L in (1, 2, 3, 4)},
    **{
        f"{e}-t{t}": (
            f"8 blocks, {e}, target {t} blocks/token",
            [*RADIAL, *opts, "--estimator", e, "--target-depth", str(t)],
        )
        for t in (4,)
        for e, opts in (
            ("gate", ["--cache-policy", "per-layer", "--forward-only"]),
            ("reinforce", ["--cache-policy", "per-layer", "--forward-only"]),
            ("expert-choice", ["--cache-policy", "per-layer", "--forward-only", "--capacity-warmup", "100"]),
        )
    },
    "loop-t6": (
        "2 layers (4 blocks) looped up to twice, expert choice per pass, target 6 blocks/token",
        ["--layers", "2", "--radial", "--estimator", "expert-choice", "--cache-policy", "per-step", "--max-depth",
         "8", "--target-depth", "6", "--capacity-warmup", "100"],
    ),
}  # fmt: skip


def run_dir(method: str, seed: int) -> Path:
    return OUT / f"{method}-s{seed}"


def cmd_train(args) -> int:
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    code = 0
    for seed in SEEDS:
        for method, (_, opts) in METHODS.items():
            folder = run_dir(method, seed)
            if args.only and folder.name not in args.only.split(","):
                continue
            if (folder / "report.json").is_file():
                continue
            cmd = [sys.executable, str(ROOT / "cli.py"), "train", "--preset", "quick", *opts, "--seed", str(seed)]
            cmd += ["--out", str(folder), "--export", str(folder / "export"), "--sample", "0"]
            print("$", " ".join(cmd[1:]), flush=True)
            t0 = time.time()
            folder.parent.mkdir(parents=True, exist_ok=True)
            with open(folder.with_suffix(".log"), "a") as log:
                rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
            print(f"{folder.name}: exit {rc} after {(time.time() - t0) / 60:.1f} min", flush=True)
            code = max(code, rc)
    return code


def t_interval(values) -> tuple:
    """Mean and half-width of the 95% t-interval of a few values."""
    v = np.asarray(values, float)
    if len(v) < 2:
        return float(v.mean()), float("nan")
    t = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776}.get(len(v), 2.0)
    return float(v.mean()), float(t * v.std(ddof=1) / math.sqrt(len(v)))


def cmd_report(args) -> int:
    results = {}
    for method, (what, _) in METHODS.items():
        reports = [json.loads((run_dir(method, s) / "report.json").read_text()) for s in SEEDS]
        reports = [r for r in reports if r]
        blocks = 2 * int(method[3:]) if method.startswith("seq") else None
        results[method] = {"what": what, "seeds": len(reports)}
        for stream in ("kjv", "wiki"):
            ppl = [r[stream]["model"] for r in reports]
            b = [r[stream].get("blocks", blocks) for r in reports]
            results[method][stream] = {"ppl": t_interval(ppl), "blocks": t_interval(b), "per_seed": ppl}
            results[method][stream]["per_seed_blocks"] = b
    head = "| method | blocks/token | KJV ppl | vs sequential, same seed | WikiText-2 ppl | vs sequential, same seed |"
    lines = [head, "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for method, r in results.items():
        cells = []
        for s in ("kjv", "wiki"):
            # paired by seed (a seed fixes the init and the batches of every run): the method's perplexity minus
            # the same seed's sequential curve, interpolated at the method's blocks/token
            curve = [[results[f"seq{L}"][s]["per_seed"][i] for L in (1, 2, 3, 4)] for i in range(len(SEEDS))]
            blocks = r[s]["per_seed_blocks"]
            diff = [p - np.interp(b, (2, 4, 6, 8), c) for p, b, c in zip(r[s]["per_seed"], blocks, curve)]
            r[s]["vs_sequential"] = t_interval(diff)
            (p, hp), (d, hd) = r[s]["ppl"], r[s]["vs_sequential"]
            cells += [f"{p:.1f} +- {hp:.1f}", f"{d:+.1f} +- {hd:.1f}"]
        lines.append(f"| {method}: {r['what']} | {r['kjv']['blocks'][0]:.2f} | " + " | ".join(cells) + " |")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(results, indent=1))
    print("\n".join(lines))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train")
    t.add_argument("--only", default=None, help="comma-separated run names (e.g. gate-t4-s0)")
    sub.add_parser("report")
    args = p.parse_args(argv)
    return {"train": cmd_train, "report": cmd_report}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
