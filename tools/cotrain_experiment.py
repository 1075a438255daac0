"""The experiment of docs/cotraining.md: sequential models, a distilled router and Radial Networks co-trained from
scratch, all on the same data, the same token budget and the same recipe; then their evaluation and figures.

    python tools/cotrain_experiment.py train [--only E-s0,F-s0]   # the training runs (cli.py train), resumable
    python tools/cotrain_experiment.py distill                     # routers distilled from A (cli.py train-router)
    python tools/cotrain_experiment.py evaluate                    # -> runs/cotrain/results.json
    python tools/cotrain_experiment.py routes                      # what the routers learned: exit, reuse, skips
    python tools/cotrain_experiment.py speed                       # generation tokens/s (a quiet machine!)
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
RECIPE = [
    "--hidden-size",
    "128",
    "--heads",
    "4",
    "--ffn-dim",
    "512",
    "--seq-len",
    "64",
    "--batch-size",
    "64",
    "--steps",
    "1200",
    "--vocab-size",
    "8192",
]
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
    "G": ("co-trained as E, exploring: 10% of block decisions swapped", ["--layers", "6", "--radial", "--cache-policy",
          "global", "--max-depth", "12", "--target-depth", TARGET, "--explore", "0.1"]),
    "H": ("co-trained as F, exploring: 10% of block decisions swapped", ["--layers", "3", "--radial", "--cache-policy",
          "global", "--max-depth", "12", "--target-depth", TARGET, "--explore", "0.1"]),
}  # fmt: skip
TAUS = (0.1, 0.15, 0.2, 0.25, 0.3)  # distilled routers on A: the curve C is read from at equal depth


def run_name(model: str, seed: int) -> str:
    return f"{model}-s{seed}"


def train_command(model: str, seed: int) -> list[str]:
    folder = OUT / run_name(model, seed)
    return [
        sys.executable,
        str(ROOT / "cli.py"),
        "train",
        "--out",
        str(folder),
        "--export",
        str(folder / "export"),
        *RECIPE,
        *MODELS[model][1],
        "--seed",
        str(seed),
    ]


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
            model = OUT / run_name("A", s) / "export"
            cmd = [
                sys.executable,
                str(ROOT / "cli.py"),
                "train-router",
                "--model",
                str(model),
                "--tau",
                str(tau),
                "--seq-len",
                "64",
                "--max-sequences",
                "256",
                "--test-sequences",
                "128",
                "--out",
                str(out),
            ]
            codes.append(launch(cmd, OUT / f"A-s{s}-router-tau{tau}.log"))
    return max(codes, default=0)


# ----------------------------------------------------------------------------------------------- evaluation


def held_out_streams(folder: Path) -> dict:
    z = np.load(folder / "tokens.npz")
    return {k[4:]: z[k] for k in z.files if k.startswith("val_")}


def evaluate_sequential(model_dir: Path, streams: dict, seq_len: int) -> dict:
    import radial_min
    from radial_min import data
    from radial_min.analysis import oracle

    model = radial_min.load(model_dir)
    out = {}
    for name, stream in streams.items():
        seqs = data.pack(stream, seq_len)
        run = oracle.simulate(model, seqs, oracle.threshold(0.0), "drop")
        out[name] = {"ppl": run.ppl, "blocks": float(run.depth.mean()), "tokens": int(seqs[:, 1:].size)}
    return out


def evaluate_distilled(model_dir: Path, router_dir: Path, streams: dict, seq_len: int) -> dict:
    import radial_min
    from radial_min import data
    from radial_min.analysis import oracle
    from radial_min.analysis.distill import RouterDecisions
    from radial_min.router import Router

    model, router = radial_min.load(model_dir), Router.load(router_dir / "router")
    out = {}
    for name, stream in streams.items():
        seqs = data.pack(stream, seq_len)
        run = oracle.simulate(model, seqs, RouterDecisions(router), "drop")  # per-layer policy = the drop rule
        depth = run.depth
        out[name] = {
            "ppl": run.ppl,
            "blocks": float(depth.mean()),
            "tokens": int(seqs[:, 1:].size),
            "hist": np.bincount(depth, minlength=len(model.blocks) + 1).tolist(),
        }
    return out


def evaluate_radial(model_dir: Path, streams: dict, seq_len: int) -> dict:
    import radial_min
    from radial_min import data
    from radial_min import train as tr

    net = radial_min.load(model_dir)
    net.keep_routes = False
    out = {}
    for name, stream in streams.items():
        seqs = data.pack(stream, seq_len)
        nll, depth, routes = tr.sequence_nll(net, seqs)
        out[name] = {
            "ppl": float(np.exp(nll.mean())),
            "blocks": float(depth.mean()),
            "tokens": int(nll.size),
            "hist": np.bincount(depth.ravel(), minlength=routes.shape[-1] + 1).tolist(),
            "trace": routes[0].tolist(),
        }
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
                        results[f"C-s{s}-tau{tau}"] = {
                            "model": "C",
                            "seed": s,
                            "tau": tau,
                            **evaluate_distilled(folder / "export", router, streams, 64),
                        }
            (OUT / "results.json").write_text(json.dumps(results, indent=1))
    return 0


def route_kinds(routes: np.ndarray) -> dict:
    """Shares of tokens by the shape of their route [.., max_depth] (-1 = no block): blocks 0, 1, 2, ... in
    order and then EXIT (early exit, the empty route included); a block run twice (reuse); the rest (skips)."""
    flat = [r[r >= 0] for r in routes.reshape(-1, routes.shape[-1])]
    prefix = sum(bool(np.array_equal(r, np.arange(len(r)))) for r in flat)
    reuse = sum(len(set(r.tolist())) < len(r) for r in flat)
    backward = sum(bool((np.diff(r) < 0).any()) for r in flat)
    n = len(flat)
    return {
        "in_order_exit": prefix / n,
        "reuse": reuse / n,
        "goes_back": backward / n,
        "skip": 1 - (prefix + reuse) / n,
    }


def cmd_routes(args):
    """What the co-trained routers learned, on the first 256 WikiText-2 test sequences: shares of early exit,
    reuse and skips (route_kinds)."""
    import radial_min
    from radial_min import data
    from radial_min import train as tr

    for s in args.seeds:
        for m, (_, opts) in MODELS.items():
            folder = OUT / run_name(m, s)
            if "--radial" not in opts or not (folder / "report.json").is_file():
                continue
            net = radial_min.load(folder / "export")
            net.keep_routes = False
            seqs = data.pack(held_out_streams(folder)["wiki"], 64)[:256]
            _, depth, routes = tr.sequence_nll(net, seqs)
            kinds = route_kinds(routes)
            print(
                f"{run_name(m, s)}: {depth.mean():.2f} blocks/token; "
                + ", ".join(f"{k} {v:.1%}" for k, v in kinds.items()),
                flush=True,
            )
    return 0


# ----------------------------------------------------------------------------------------------- generation


def cmd_speed(args):
    """Greedy generation tokens/s of every model's export through the inference engine (the co-trained ones
    routed by their own router, A also with its distilled router nearest 8 blocks), interleaved repetitions,
    the median kept; the machine's load printed beside it."""
    import radial_min
    from radial_min.radial import RadialNetwork
    from radial_min.router import Router

    results = json.loads((OUT / "results.json").read_text())
    nets = {}
    for s in args.seeds:
        for m in MODELS:
            folder = OUT / run_name(m, s) / "export"
            if folder.is_dir():
                nets[run_name(m, s)] = radial_min.load(folder)
        best = _distilled_near(results, s, float(TARGET))
        if best is not None:
            a = nets[run_name("A", s)]
            router = OUT / run_name("A", s) / f"router-tau{results[best]['tau']}" / "router"
            nets[best] = RadialNetwork(a, Router.load(router))
    tok = radial_min.Tokenizer(next(iter(nets.values())).path)
    ids = tok.encode("And God said")
    times = {k: [] for k in nets}
    for net in nets.values():  # once untimed: first calls (kernel dispatch, caches) are not generation's speed
        radial_min.generate(net, ids, 8, stop_at_eos=False)
    for _ in range(args.reps):
        for k, net in nets.items():
            t = time.perf_counter()
            new = radial_min.generate(net, ids, 60, stop_at_eos=False, repetition_penalty=1.2)  # the 64-token context
            times[k].append(len(new) / (time.perf_counter() - t))
    load = os.getloadavg()[0]
    for k, v in times.items():
        results[k]["tokens_per_s"], results[k]["speed_load"] = float(np.median(v)), load
        print(f"{k:<16} {np.median(v):8.1f} tokens/s  [{min(v):.1f}, {max(v):.1f}]  (load {load:.1f})")
    (OUT / "results.json").write_text(json.dumps(results, indent=1))
    return 0


def _distilled_near(results, seed, depth):
    """The distilled router on A's seed whose blocks/token on WikiText-2 is closest to `depth`."""
    keys = [k for k, r in results.items() if r["model"] == "C" and r["seed"] == seed]
    return min(keys, key=lambda k: abs(results[k]["wiki"]["blocks"] - depth), default=None)


# -------------------------------------------------------------------------------------------------- figures

SEQUENTIAL = ("S3", "B", "S5", "A")  # 6, 8, 10, 12 blocks: the sequential curve the others are read against


def seed_mean(results, model, split, field):
    vals = [r[split][field] for r in results.values() if r["model"] == model and split in r]
    return (float(np.mean(vals)), float(np.min(vals)), float(np.max(vals)), len(vals)) if vals else None


def at_depth(xs, ys, x):
    """Perplexity on a curve at `x` blocks/token: linear in log-perplexity between the two neighbours (the
    expected NLL of mixing the two models over sequences), None outside the curve."""
    order = np.argsort(xs)
    xs, ys = np.asarray(xs)[order], np.log(np.asarray(ys)[order])
    if not xs[0] <= x <= xs[-1]:
        return None
    return float(np.exp(np.interp(x, xs, ys)))


def curve(results, split, models):
    pts = [
        (seed_mean(results, m, split, "blocks")[0], seed_mean(results, m, split, "ppl")[0])
        for m in models
        if seed_mean(results, m, split, "ppl")
    ]
    return [p[0] for p in pts], [p[1] for p in pts]


def distilled_curve(results, split):
    by_tau = {}
    for r in results.values():
        if r["model"] == "C" and split in r:
            by_tau.setdefault(r["tau"], []).append((r[split]["blocks"], r[split]["ppl"]))
    pts = [
        (float(np.mean([b for b, _ in v])), float(np.exp(np.mean(np.log([p for _, p in v]))))) for v in by_tau.values()
    ]
    return [p[0] for p in pts], [p[1] for p in pts]


def table(results, split):
    seq_x, seq_y = curve(results, split, SEQUENTIAL)
    c_x, c_y = distilled_curve(results, split)
    lines = [
        "| model | seeds | blocks/token | perplexity | sequential, equal blocks | distilled (C), equal blocks "
        "| tokens/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for m, (what, _) in MODELS.items():
        ppl, depth = seed_mean(results, m, split, "ppl"), seed_mean(results, m, split, "blocks")
        if ppl is None:
            continue
        seq, dist = at_depth(seq_x, seq_y, depth[0]), at_depth(c_x, c_y, depth[0]) if c_x else None
        fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
        spread = f" [{ppl[1]:.1f}, {ppl[2]:.1f}]" if ppl[3] > 1 else ""
        speed = [r["tokens_per_s"] for r in results.values() if r["model"] == m and "tokens_per_s" in r]
        speed = f"{np.mean(speed):.0f}" if speed else "-"
        lines.append(
            f"| {m}: {what} | {ppl[3]} | {depth[0]:.2f} | {ppl[0]:.1f}{spread} | {fmt(seq)} | {fmt(dist)} | {speed} |"
        )
    for bx, by in sorted(zip(c_x, c_y)):
        lines.append(f"| C: A + distilled router | | {bx:.2f} | {by:.1f} | {fmt(at_depth(seq_x, seq_y, bx))} | | |")
    return "\n".join(lines)


def cmd_figures(args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = json.loads((OUT / "results.json").read_text())

    def save(fig, name, legend=None):  # legend: the font size of every axis's legend
        for ax in fig.axes if legend else ():
            ax.legend(fontsize=legend)
        fig.tight_layout()
        fig.savefig(ROOT / "docs" / "figures" / name, dpi=120)
        plt.close(fig)

    for split, title in (("wiki", "WikiText-2 test"), ("kjv", "held-out KJV chapters")):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        xs, ys = curve(results, split, SEQUENTIAL)
        ax.plot(xs, ys, "o-", color="0.4", label="sequential, 3-6 layers")
        cx, cy = distilled_curve(results, split)
        order = np.argsort(cx)
        ax.plot(np.array(cx)[order], np.array(cy)[order], "s--", color="tab:blue", label="C: A + distilled router")
        for m, color in (("D", "tab:green"), ("E", "tab:red"), ("F", "tab:purple")):
            for r in (r for r in results.values() if r["model"] == m and split in r):
                ax.plot(
                    r[split]["blocks"],
                    r[split]["ppl"],
                    "*",
                    ms=12,
                    color=color,
                    label=f"{m}: {MODELS[m][0]}" if r["seed"] == min(args.seeds) else None,
                )
        ax.set_xlabel("mean blocks per token")
        ax.set_ylabel(f"perplexity, {title}")
        save(fig, f"cotrain_ppl_{split}.png", legend=7)
        print(f"## {title}\n\n{table(results, split)}\n")
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for m in ("D", "E", "F"):
        r = results.get(run_name(m, min(args.seeds)))
        if r:
            h = np.array(r["wiki"]["hist"], float)
            ax.plot(np.arange(len(h)), h / h.sum(), "o-", label=f"{m} (mean {r['wiki']['blocks']:.2f})")
    ax.set_xlabel("blocks run by a token (WikiText-2 test)")
    ax.set_ylabel("share of tokens")
    save(fig, "cotrain_depth_hist.png", legend=8)
    fig, axes = plt.subplots(3, 1, figsize=(6.4, 7.5))
    for ax, m in zip(axes, ("D", "E", "F")):
        r = results.get(run_name(m, min(args.seeds)))
        if not r:
            continue
        routes = np.array(r["wiki"]["trace"])  # [T, max_depth], -1 = no block
        ax.imshow(np.ma.masked_less(routes.T, 0), aspect="auto", cmap="tab20", vmin=0, vmax=19, interpolation="nearest")
        ax.set_ylabel("step")
        ax.set_title(f"{m}: block run at each step, first WikiText-2 test sequence (blank: exited)", fontsize=8)
        ax.set_yticks(range(routes.shape[1]))
        ax.tick_params(labelsize=6)
    axes[-1].set_xlabel("token")
    save(fig, "cotrain_routes.png")
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for m in MODELS:
        log = OUT / run_name(m, min(args.seeds)) / "log.jsonl"
        if log.is_file():
            rows = [json.loads(line) for line in log.read_text().splitlines()]
            pts = [(r["step"], r["val_wiki"]) for r in rows if "val_wiki" in r]
            ax.plot(*zip(*pts), marker=".", label=m)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss, WikiText-2 test (64 windows)")
    save(fig, "cotrain_curves.png", legend=8)
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("step", choices=["train", "distill", "evaluate", "routes", "speed", "figures"])
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1])
    p.add_argument("--only", type=lambda s: s.split(","), default=None, help="runs to do, e.g. E-s0,F-s0")
    p.add_argument("--jobs", type=int, default=2, help="runs side by side (default: 2, one per core)")
    p.add_argument("--again", action="store_true", help="evaluate again what results.json already has")
    p.add_argument("--reps", type=int, default=10, help="speed: interleaved repetitions (default: 10)")
    args = p.parse_args(argv)
    steps = {
        "train": cmd_train,
        "distill": cmd_distill,
        "evaluate": cmd_evaluate,
        "routes": cmd_routes,
        "speed": cmd_speed,
        "figures": cmd_figures,
    }
    return steps[args.step](args)


if __name__ == "__main__":
    sys.exit(main())
