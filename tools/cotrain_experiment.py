"""The experiment of docs/cotraining.md: sequential models, a distilled router and Radial Networks co-trained from
scratch, all on the same data, the same token budget and the same recipe; then their evaluation and figures.

    python tools/cotrain_experiment.py train [--only E-s0,F-s0]   # the training runs (cli.py train), resumable
    python tools/cotrain_experiment.py distill                     # routers distilled from A (cli.py train-router)
    python tools/cotrain_experiment.py evaluate                    # -> runs/cotrain/results.json
    python tools/cotrain_experiment.py figures                     # -> docs/figures/cotrain_*.png + the tables

Every run is a plain `cli.py` command (printed before it starts), so any of them can be rerun by hand; a run that
is interrupted resumes where it stopped, a finished one is skipped. Each uses one thread (two run side by side
on the two cores with --jobs 2). Evaluation is on the full held-out streams the trainer validates on (WikiText-2
test.txt and every 20th KJV chapter), packed in sequences of the training length.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

OUT = ROOT / "runs" / "cotrain"
RECIPE = ["--hidden-size", "128", "--heads", "4", "--ffn-dim", "512", "--seq-len", "64", "--batch-size", "64",
          "--steps", "1200", "--vocab-size", "8192"]  # fmt: skip
TARGET = "8"  # blocks per token asked of the Radial Networks: 8 of A's 12
# name -> (what it is, cli.py train options beyond the recipe)
MODELS = {
    "A": ("sequential, 6 layers (12 blocks): the radial networks' parameters", ["--layers", "6"]),
    "B": ("sequential, 4 layers (8 blocks): the radial networks' compute", ["--layers", "4"]),
    "S3": ("sequential, 3 layers (6 blocks)", ["--layers", "3"]),
    "S5": ("sequential, 5 layers (10 blocks)", ["--layers", "5"]),
    "D": ("co-trained, forward-only, per-layer cache", ["--layers", "6", "--radial", "--forward-only",
                                                        "--cache-policy", "per-layer", "--target-depth", TARGET]),
    "E": ("co-trained, reuse, global unified cache", ["--layers", "6", "--radial", "--cache-policy", "global",
                                                      "--max-depth", "12", "--target-depth", TARGET]),
    "F": ("co-trained, 3 layers (6 blocks) reused up to 12 steps, global cache",
          ["--layers", "3", "--radial", "--cache-policy", "global", "--max-depth", "12", "--target-depth", TARGET]),
}  # fmt: skip
TAUS = (0.1, 0.15, 0.2, 0.25, 0.3)  # distilled routers on A: the curve C is read from at equal depth


def run_name(model: str, seed: int) -> str:
    return f"{model}-s{seed}"


def train_command(model: str, seed: int) -> list[str]:
    folder = OUT / run_name(model, seed)
    return [sys.executable, str(ROOT / "cli.py"), "train", "--out", str(folder), "--export", str(folder / "export"),
            *RECIPE, *MODELS[model][1], "--seed", str(seed)]  # fmt: skip


def one_thread_env() -> dict:
    return {**os.environ, "OPENBLAS_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}


def launch(cmd: list[str], log: Path) -> int:
    print("$", " ".join(str(c) for c in cmd), f"> {log.relative_to(ROOT)}", flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        return subprocess.run(cmd, cwd=ROOT, env=one_thread_env(), stdout=f, stderr=subprocess.STDOUT).returncode


def cmd_train(args):
    runs = [(m, s) for s in args.seeds for m in MODELS if not args.only or run_name(m, s) in args.only]

    def one(ms):
        m, s = ms
        if (OUT / run_name(m, s) / "report.json").is_file():
            print(f"{run_name(m, s)}: done", flush=True)
            return 0
        t0 = time.time()
        code = launch(train_command(m, s), OUT / f"{run_name(m, s)}.log")
        print(f"{run_name(m, s)}: exit {code} after {(time.time() - t0) / 60:.1f} min", flush=True)
        return code

    with ThreadPoolExecutor(args.jobs) as pool:
        codes = list(pool.map(one, runs))
    return max(codes, default=0)


def cmd_distill(args):
    """Routers distilled from each seed of A at several thresholds (the paper's first path, today's C)."""
    codes = []
    for s in args.seeds:
        for tau in TAUS:
            out = OUT / run_name("A", s) / f"router-tau{tau}"
            if (out / "router.json").is_file():
                continue
            cmd = [sys.executable, str(ROOT / "cli.py"), "train-router", "--model", str(OUT / run_name("A", s) / "export"),
                   "--tau", str(tau), "--seq-len", "64", "--max-sequences", "256", "--test-sequences", "128",
                   "--out", str(out)]  # fmt: skip
            codes.append(launch(cmd, OUT / f"A-s{s}-router-tau{tau}.log"))
    return max(codes, default=0)


# ----------------------------------------------------------------------------------------------- evaluation


def held_out_streams(folder: Path) -> dict:
    z = np.load(folder / "tokens.npz")
    return {k[4:]: z[k] for k in z.files if k.startswith("val_")}


def evaluate_sequential(model_dir: Path, streams: dict, seq_len: int) -> dict:
    import radial_min
    from radial_min import data, oracle

    model = radial_min.load(model_dir)
    out = {}
    for name, stream in streams.items():
        seqs = data.pack(stream, seq_len)
        run = oracle.simulate(model, seqs, oracle.threshold(0.0), "drop")
        out[name] = {"ppl": run.ppl, "blocks": float(run.depth.mean()), "tokens": int(seqs[:, 1:].size)}
    return out


def evaluate_distilled(model_dir: Path, router_dir: Path, streams: dict, seq_len: int) -> dict:
    import radial_min
    from radial_min import data, oracle
    from radial_min.radial import RouterDecisions
    from radial_min.router import Router

    model, router = radial_min.load(model_dir), Router.load(router_dir / "router")
    out = {}
    for name, stream in streams.items():
        seqs = data.pack(stream, seq_len)
        run = oracle.simulate(model, seqs, RouterDecisions(router), "drop")  # per-layer policy = the drop rule
        depth = run.depth
        out[name] = {"ppl": run.ppl, "blocks": float(depth.mean()), "tokens": int(seqs[:, 1:].size),
                     "hist": np.bincount(depth, minlength=len(model.blocks) + 1).tolist()}  # fmt: skip
    return out


def evaluate_radial(model_dir: Path, streams: dict, seq_len: int) -> dict:
    from radial_min import data
    from radial_min import train as tr
    from radial_min.radial_train import sequence_nll

    params, cfg, rcfg = tr.read_export(model_dir)
    blocks, router = tr.split_router(params)
    out = {}
    for name, stream in streams.items():
        seqs = data.pack(stream, seq_len)
        nll, depth, routes = sequence_nll(blocks, router, cfg, rcfg, seqs)
        out[name] = {"ppl": float(np.exp(nll.mean())), "blocks": float(depth.mean()), "tokens": int(nll.size),
                     "hist": np.bincount(depth.ravel(), minlength=routes.shape[-1] + 1).tolist(),
                     "trace": routes[0].tolist()}  # fmt: skip
    return out


def cmd_evaluate(args):
    results = json.loads((OUT / "results.json").read_text()) if (OUT / "results.json").is_file() else {}
    for s in args.seeds:
        for m in MODELS:
            key, folder = run_name(m, s), OUT / run_name(m, s)
            if not (folder / "report.json").is_file() or (key in results and not args.again):
                continue
            print(f"evaluating {key} ...", flush=True)
            streams = held_out_streams(folder)
            radial = "--radial" in MODELS[m][1]
            fn = evaluate_radial if radial else evaluate_sequential
            results[key] = {"model": m, "seed": s, **fn(folder / "export", streams, 64)}
            if m == "A":
                for tau in TAUS:
                    router = folder / f"router-tau{tau}"
                    if (router / "router.json").is_file():
                        results[f"C-s{s}-tau{tau}"] = {"model": "C", "seed": s, "tau": tau,
                                                      **evaluate_distilled(folder / "export", router, streams, 64)}
            (OUT / "results.json").write_text(json.dumps(results, indent=1))
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("step", choices=["train", "distill", "evaluate", "figures"])
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1])
    p.add_argument("--only", type=lambda s: s.split(","), default=None, help="runs to do, e.g. E-s0,F-s0")
    p.add_argument("--jobs", type=int, default=2, help="runs side by side (default: 2, one per core)")
    p.add_argument("--again", action="store_true", help="evaluate again what results.json already has")
    args = p.parse_args(argv)
    return {"train": cmd_train, "distill": cmd_distill, "evaluate": cmd_evaluate, "figures": cmd_figures}[args.step](args)


def cmd_figures(args):
    raise SystemExit("figures: written once the runs are in (see docs/cotraining.md)")


if __name__ == "__main__":
    sys.exit(main())
