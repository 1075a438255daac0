"""The variable-depth task (radial_min/tasks.py) and the sequential curve on it: does accuracy on hard tokens rise
with depth while easy tokens are solved by shallow models? And where do routed networks sit against that curve?

    python tools/depth_task.py show                        # one sequence of the task, each token's label under it
    python tools/depth_task.py data --out runs/depth/eval.safetensors   # the held-out set, saved (tasks.save)
    python tools/depth_task.py train --layers 3 --out runs/depth/x     # one run -> x/result.json
    python tools/depth_task.py curve --grid G              # the grid of the curve (skips runs already done)
    python tools/depth_task.py radial --grid G --estimators gate reinforce --targets 3 5   # routed runs
    python tools/depth_task.py report --grid G             # the table (and figure) from the grid's results

Every run is the one trainer's (train.train on a tasks.HopStream: batch k of seed s is tasks.batch(task, s, k, ...)
under the curriculum; the loss is the LM loss masked to the scored tokens with `--loss scored`, every token with
`--loss all`). Each is scored at the end by tasks.score on the first --eval sequences of the task's "eval" stream
(seed 0: the same sequences for every run): greedy accuracy and blocks run per label. A run's folder holds the
trainer's files (train_config.json, log.jsonl, state.safetensors) and result.json.
"""

import argparse
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from radial_min import tasks  # noqa: E402
from radial_min import train as tr  # noqa: E402
from radial_min.errors import RadialError  # noqa: E402
from radial_min.io.outputs import read_json, write_bytes, write_json, write_text  # noqa: E402

RUNS = ROOT / "runs" / "depth"
TRAIN_FIELDS = ("steps", "batch", "lr", "warmup", "seed", "loss", "eval", "curriculum", "init_from")
RADIAL_FIELDS = ("estimator", "target_depth", "router_warmup", "router_lr", "kv_rule", "capacity_warmup", "max_depth")

# ------------------------------------------------------------------------------------------- one run


def task_from(args) -> tasks.HopTask:
    weights = tuple(float(w) for w in args.hop_weights.split(",")) if args.hop_weights else ()
    return tasks.HopTask(args.nodes, args.max_hops, args.seq_len, args.table, weights, args.starts)


def task_spec(task: tasks.HopTask, args) -> str:
    """The run's --task value (train_config.json records it; a resume checks it)."""
    w = "/".join(f"{x:g}" for x in task.hop_weights)
    return (f"hop:nodes={task.nodes},max_hops={task.max_hops},table={task.table},starts={task.starts}"
            + (f",hop_weights={w}" if w else "") + f",curriculum={args.curriculum},loss={args.loss}")  # fmt: skip


def train_config(args, task: tasks.HopTask) -> tr.TrainConfig:
    flat = dict(
        architecture="opt", vocab_size=task.vocab_size, hidden_size=args.width, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, seq_len=task.seq_len, lr=args.lr, warmup=args.warmup, out=str(args.out),
        steps=args.steps, batch_size=args.batch, eval_every=args.eval_every, eval_sequences=64,
        save_every=max(args.steps // 4, 1), seed=args.seed, task=task_spec(task, args),
    )  # fmt: skip
    if getattr(args, "estimator", None):
        flat.update(radial=True, estimator=args.estimator, target_depth=args.target_depth,
                    router_warmup=args.router_warmup, router_lr=args.router_lr, kv_rule=args.kv_rule,
                    capacity_warmup=args.capacity_warmup)  # fmt: skip
        flat.update(forward_only=True, cache_policy="per-layer")  # every estimator alike: blocks in order, skips
        if args.max_depth and args.max_depth > 2 * args.layers:  # recursion: the blocks run again, pass after pass
            flat.update(forward_only=False, max_depth=args.max_depth)
            if args.estimator == "expert-choice":  # a round per pass: each pass reads its own keys (MoR's cache)
                flat.update(cache_policy="per-step")
    if getattr(args, "init_from", None):
        saved = read_json(Path(args.init_from) / "train_config.json")
        if (saved["hidden_size"], saved["num_hidden_layers"]) != (args.width, args.layers):
            found = f"width {saved['hidden_size']}, {saved['num_hidden_layers']} layers"
            raise RadialError(
                f"--init-from {args.init_from}: {found}; expected --width {args.width} --layers {args.layers}"
            )
        flat.update(init_from=str(exported(Path(args.init_from))))
    return tr.TrainConfig.of(**flat)


def exported(run: Path) -> Path:
    """A finished run's network as a checkpoint folder, RUN/export (float32, written once): what --init-from starts
    a run from (the blocks; a routed run's router starts fresh)."""
    out = run / "export"
    if not (out / "config.json").is_file():
        if not (run / "state.safetensors").is_file():
            raise RadialError(f"--init-from {run}: no state.safetensors there (a finished run's folder expected)")
        cfg = tr.TrainConfig.of(**read_json(run / "train_config.json"))
        net = tr.build_network(cfg)
        tr.load_state(run / "state.safetensors", tr.parameters(net))
        tr.export_checkpoint(net.model.sequential, run, out, dtype="float32")  # the run folder holds no tokenizer
    return out


def train(args) -> dict:
    task = task_from(args)
    out = Path(args.out)
    if getattr(args, "init_from", None):
        args.init_from = args.init_from.format(seed=args.seed)
    cfg = train_config(args, task)
    problems = cfg.problems(2**40)
    if problems:
        raise RadialError("; ".join(problems))
    tokens, labels = tasks.sequences(task, 0, 0, args.eval, stream="eval")
    stream = tasks.HopStream(task, args.seed, args.batch, args.curriculum, args.loss)
    t0 = time.perf_counter()
    net = tr.train(cfg, stream, {"hop": tokens[:64]}, progress=False)
    seconds = time.perf_counter() - t0
    final = tasks.score(net, tokens, labels)
    log = tr.read_log(out)
    result = {
        "task": asdict(task),
        "model": {"layers": args.layers, "blocks": 2 * args.layers, "width": args.width, "heads": args.heads},
        "train": {k: getattr(args, k) for k in TRAIN_FIELDS},
        "radial": {k: getattr(args, k, None) for k in RADIAL_FIELDS} if cfg.radial.radial else None,
        "tokens_seen": args.steps * args.batch * task.seq_len,
        "seconds": round(seconds, 1),
        "load_average": os.getloadavg()[0],
        "final": final,
        "val_loss": [(r["step"], r["val_hop"]) for r in log if "val_hop" in r],
    }
    write_json(out / "result.json", result)
    acc = " ".join(f"{k}:{a:.2f}" for k, a in final["accuracy"].items())
    blocks = " ".join(f"{k}:{b:.1f}" for k, b in final["blocks"].items())
    print(f"{out}: {seconds:.0f} s | accuracy {acc} | blocks {blocks} | mean {final['blocks_per_token']:.2f}")
    return result


# ------------------------------------------------------------------------------------------- subcommands


def add_task_args(p):
    d = tasks.HopTask()
    p.add_argument("--nodes", type=int, default=d.nodes)
    p.add_argument("--max-hops", type=int, default=d.max_hops)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--table", default=d.table, choices=["array", "pairs"])
    p.add_argument("--starts", default=d.starts, choices=["ordered", "random"])
    p.add_argument("--hop-weights", default="", help="comma-separated weights of hop counts 0..max-hops")


def add_train_args(p):
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--loss", default="scored", choices=["scored", "all"])
    p.add_argument("--curriculum", type=int, default=0, help="let in one more hop count every N steps (0: all)")
    p.add_argument("--eval", type=int, default=256, help="held-out sequences scored")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--init-from", default=None, help="start from this finished run's blocks ({seed} is replaced "
                   "by the run's seed); the run then trains --steps more")  # fmt: skip


def add_radial_args(p, one: bool):
    """A routed run's settings (train.RadialSettings); `one`: a single run (train), else lists (radial). Every
    routed run here is forward-only with the per-layer cache (a token runs the blocks in order and may skip any,
    Mixture-of-Depths' setting, the one expert choice needs), so the estimators differ in how the router learns only;
    expert-choice recursion (--max-depth above 2 x --layers) trains with the per-step cache, each pass reading its
    own keys (Mixture-of-Recursions' recursion-wise cache: its rounds are passes, exact for that policy only)."""
    if one:
        p.add_argument("--estimator", default=None, choices=tr.ESTIMATORS, help="train a Radial Network (default: "
                       "sequential)")  # fmt: skip
        p.add_argument("--target-depth", type=float, default=None, help="blocks per token the router is held to")
    else:
        p.add_argument("--estimators", nargs="+", default=list(tr.ESTIMATORS), choices=tr.ESTIMATORS)
        p.add_argument("--targets", type=float, nargs="+", default=[3.0, 5.0], help="target blocks per token")
    p.add_argument("--router-warmup", type=int, default=200, help="steps the blocks train before the router does")
    p.add_argument("--router-lr", type=float, default=0.1, help="the router's learning rate, a share of --lr")
    p.add_argument("--kv-rule", default="drop", choices=["drop", "fill"], help="what a token that skips an attention "
                   "block offers later tokens there (fill: gate and reinforce)")  # fmt: skip
    p.add_argument("--capacity-warmup", type=int, default=0, help="expert choice: steps the capacity falls from 1")
    p.add_argument("--max-depth", type=int, default=None, help="above 2 x --layers: the blocks are reused, pass "
                   "after pass (expert choice: Mixture-of-Recursions)")  # fmt: skip


# ------------------------------------------------------------------------------------------- the curve

# Student's t at 97.5% for 1..10 degrees of freedom: a 95% interval of a mean over n seeds is mean +- t s / sqrt(n).
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228]


def mean_ci(values) -> tuple[float, float]:
    """Mean and half-width of its 95% confidence interval (t distribution; 0 for a single value)."""
    a = np.asarray(values, float)
    if len(a) < 2:
        return float(a.mean()), 0.0
    return float(a.mean()), float(T975[min(len(a) - 2, len(T975) - 1)] * a.std(ddof=1) / np.sqrt(len(a)))


def run_name(layers, width, seed, estimator=None, target=None, warmup=0, kv_rule="drop", depth=None, init=None):
    routed = f"-{estimator}-d{target:g}-w{warmup}" + ("-fill" if kv_rule == "fill" else "") if estimator else ""
    routed += (f"-m{depth}" if depth and depth > 2 * layers else "") + ("-ft" if init else "")
    return f"L{layers}-w{width}{routed}-s{seed}"


def run_grid(args, points):
    """Train every run of `points` (dicts of run settings) whose folder has no result.json yet, one after another."""
    grid = Path(args.grid)
    for point in points:
        init = args.init_from.format(seed=point["seed"]) if getattr(args, "init_from", None) else None
        out = grid / run_name(point["layers"], point["width"], point["seed"], point.get("estimator"),
                              point.get("target_depth"), getattr(args, "router_warmup", 0),
                              getattr(args, "kv_rule", "drop"), getattr(args, "max_depth", None), init)  # fmt: skip
        if (out / "result.json").is_file():
            continue
        print(f"== {out}", flush=True)
        train(argparse.Namespace(**{**vars(args), **point, "out": out, "init_from": init}))


def cmd_curve(args):
    """The sequential grid: every (seed, width, layers)."""
    run_grid(args, [dict(layers=layers, width=width, seed=seed, estimator=None) for seed in args.seeds
                    for width in args.widths for layers in args.layers_list])  # fmt: skip


def cmd_radial(args):
    """The routed grid: every (seed, estimator, target depth) on a network of --layers layers."""
    run_grid(args, [dict(layers=args.layers, width=args.width, seed=seed, estimator=e, target_depth=d)
                    for seed in args.seeds for d in args.targets for e in args.estimators])  # fmt: skip


def collect(grid: Path) -> list[dict]:
    runs = []
    for path in sorted(grid.glob("*/result.json")):
        r = read_json(path)
        r["name"] = path.parent.name
        runs.append(r)
    if not runs:
        raise RadialError(f"{grid}: no */result.json (run `curve --grid {grid}` first)")
    return runs


def kind(r: dict) -> str:
    """A run's family: 'sequential' or '<estimator> d<target depth> w<router warm-up>[ fill]' (layers told apart
    by the row)."""
    rad = r.get("radial")
    if not rad:  # a sequential model trained on from another (the routed runs' equal-training control) is no point
        return "sequential, trained on" if r["train"].get("init_from") else "sequential"  # of the curve
    fill = " fill" if rad.get("kv_rule") == "fill" else ""
    loop = f" max{rad['max_depth']}" if rad.get("max_depth") and rad["max_depth"] > r["model"]["blocks"] else ""
    init = " from sequential" if r["train"].get("init_from") else ""
    return f"{rad['estimator']} d{rad['target_depth']:g} w{rad['router_warmup']}{fill}{loop}{init}"


def hard_mean(accuracy: dict) -> float:
    """Mean accuracy over the hop counts >= 1 (each count weighted alike)."""
    return float(np.mean([a for k, a in accuracy.items() if int(k) >= 1]))


def seed_of(r: dict) -> int:
    return r["train"]["seed"]


def summarize(runs: list[dict]) -> list[dict]:
    """One row per (kind, width, blocks of the network): accuracy and blocks run per label and blocks per token,
    each a mean and 95% CI over seeds, and minutes per run."""
    groups = {}
    for r in runs:
        groups.setdefault((kind(r), r["model"]["width"], r["model"]["blocks"]), []).append(r)
    rows = []
    for (family, width, blocks), rs in sorted(groups.items(), key=lambda g: (g[0][0] != "sequential", g[0])):
        labels = sorted({k for r in rs for k in r["final"]["accuracy"]}, key=int)
        rows.append({
            "kind": family, "width": width, "blocks": blocks, "layers": blocks // 2,
            "seeds": sorted(map(seed_of, rs)),
            "accuracy": {k: mean_ci([r["final"]["accuracy"][k] for r in rs]) for k in labels},
            "blocks_run": {k: mean_ci([r["final"]["blocks"][k] for r in rs]) for k in labels},
            "blocks_per_token": mean_ci([r["final"]["blocks_per_token"] for r in rs]),
            "hard_mean": mean_ci([hard_mean(r["final"]["accuracy"]) for r in rs]),
            **{k: optional_ci([r["final"].get(k) for r in rs]) for k in ("spearman", "hard_easy_blocks")},
            "hardest_by_seed": [round(r["final"]["accuracy"][labels[-1]], 3) for r in sorted(rs, key=seed_of)],
            "start_by_seed": [start_accuracy(r, labels[-1]) for r in sorted(rs, key=seed_of)],
            "minutes": [round(r["seconds"] / 60, 1) for r in rs], "load": [round(r["load_average"], 1) for r in rs],
            "steps": rs[0]["train"]["steps"], "tokens_seen": rs[0]["tokens_seen"],
        })  # fmt: skip
    return rows


def start_accuracy(r: dict, label: str):
    """A run started from another (--init-from): that run's accuracy on `label`, rounded (None if not, or unread)."""
    start = r["train"].get("init_from")
    path = Path(start or "") / "result.json"
    if not start or not (path.is_file() or (path := ROOT / path).is_file()):
        return None
    return round(read_json(path)["final"]["accuracy"].get(label, float("nan")), 3)


def optional_ci(values):
    """mean_ci over the runs that have the value (None where it is undefined, e.g. Spearman's rho of a constant
    depth); None if no run has it. -> (mean, half-width, runs counted) or None."""
    present = [v for v in values if v is not None]
    return (*mean_ci(present), len(present)) if present else None


def sequential_at(rows: list[dict], width: int, blocks: float, key: str, label: str | None = None):
    """The sequential curve at `blocks` blocks per token (linear between the block counts trained; None outside
    them): mean and CI half-width of accuracy on `label` (key 'accuracy') or of 'hard_mean'."""
    pts = sorted(
        (r["blocks"], r[key][label] if label else r[key])
        for r in rows
        if r["kind"] == "sequential" and r["width"] == width and (label is None or label in r[key])
    )
    if not pts or not pts[0][0] <= blocks <= pts[-1][0]:
        return None
    xs = [p[0] for p in pts]
    return (float(np.interp(blocks, xs, [p[1][0] for p in pts])), float(np.interp(blocks, xs, [p[1][1] for p in pts])))


def label_name(k: str) -> str:
    return "easy (0)" if k == "0" else f"{k} hop" + ("s" if k != "1" else "")


def table(rows: list[dict]) -> str:
    """Accuracy per label (mean ± 95% CI over seeds) and blocks per token, one row per network."""
    labels = sorted({k for r in rows for k in r["accuracy"]}, key=int)
    head = ["network", "width", "blocks", "seeds", "blocks/token", *map(label_name, labels), "hops >= 1, mean",
            f"{label_name(labels[-1])} by seed"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|---|" + " ---: |" * (len(head) - 1)]
    for r in rows:
        cells = [r["kind"], str(r["width"]), str(r["blocks"]), str(len(r["seeds"])), ci(r["blocks_per_token"], 2)]
        cells += [ci(r["accuracy"][k]) if k in r["accuracy"] else "" for k in labels]
        by_seed = ", ".join(f"{a:.3f}" for a in r["hardest_by_seed"])
        lines.append("| " + " | ".join([*cells, ci(r["hard_mean"]), by_seed]) + " |")
    return "\n".join(lines)


def ci(pair, digits: int = 3) -> str:
    m, h = pair
    return f"{m:.{digits}f} ± {h:.{digits}f}"


def routed_table(rows: list[dict]) -> str:
    """Each routed network beside the sequential curve at its blocks per token: blocks run per label, accuracy per
    label and the hop mean, the sequential curve's (interpolated) in brackets."""
    labels = sorted({k for r in rows for k in r["accuracy"]}, key=int)
    head = ["network", "blocks", "seeds", "blocks/token", *(f"blocks, {label_name(k)}" for k in labels),
            *(f"acc. {label_name(k)} [seq.]" for k in labels), "hops >= 1 [seq.]",
            "Spearman(blocks, hops)", f"blocks {label_name(labels[-1])} / easy",
            f"{label_name(labels[-1])} by seed [its start]"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|---|" + " ---: |" * (len(head) - 1)]
    for r in rows:
        if r["kind"] == "sequential":
            continue
        at = r["blocks_per_token"][0]
        cells = [r["kind"], str(r["blocks"]), str(len(r["seeds"])), ci(r["blocks_per_token"], 2)]
        cells += [f"{r['blocks_run'][k][0]:.2f}" if k in r["blocks_run"] else "" for k in labels]
        for k in [*labels, None]:
            own = r["accuracy"].get(k) if k else r["hard_mean"]
            seq = sequential_at(rows, r["width"], at, "accuracy" if k else "hard_mean", k)
            cells.append((ci(own) if own else "") + (f" [{ci(seq)}]" if seq else " [outside the curve]"))
        cells += [ci(r[k][:2], 2) if r.get(k) else "" for k in ("spearman", "hard_easy_blocks")]
        starts = r.get("start_by_seed") or [None] * len(r["hardest_by_seed"])
        cells.append(", ".join(f"{a:.3f}" + (f" [{b:.3f}]" if b is not None else "") for a, b in
                               zip(r["hardest_by_seed"], starts)))  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_table(runs: list[dict]) -> str:
    """Each family of runs started from a sequential one (--init-from) against the sequential runs trained on from
    the same start for the same steps (`curve --init-from`: the equal-training control), seed by seed: the hardest
    label's accuracy of both and their difference, mean and 95% t-interval over the seeds that have both ("" if no
    family has a control)."""
    control = {(r["train"]["init_from"], r["train"]["steps"]): r for r in runs
               if not r.get("radial") and r["train"].get("init_from")}  # fmt: skip
    families = {}
    for r in runs:
        key = (r["train"].get("init_from"), r["train"]["steps"])
        if r.get("radial") and key in control:
            families.setdefault((kind(r), r["model"]["width"]), []).append((r, control[key]))
    if not families:
        return ""
    label = max(runs[0]["final"]["accuracy"], key=int)
    head = ["network", "width", "seeds", f"{label_name(label)}: routed", "control", "routed - control",
            "by seed: routed [control]"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|---|" + " ---: |" * (len(head) - 1)]
    for (family, width), pairs in sorted(families.items()):
        pairs.sort(key=lambda p: seed_of(p[0]))
        a, c = (np.array([p[i]["final"]["accuracy"][label] for p in pairs]) for i in (0, 1))
        by_seed = ", ".join(f"{x:.3f} [{y:.3f}]" for x, y in zip(a, c))
        lines.append(f"| {family} | {width} | {len(pairs)} | {ci(mean_ci(a))} | {ci(mean_ci(c))} | "
                     f"{ci(mean_ci(a - c))} | {by_seed} |")  # fmt: skip
    return "\n".join(lines)


def reuse_table(runs: list[dict]) -> str:
    """Each family of networks that reuse their blocks (max_depth above their blocks) against the sequential runs of
    the same seed and width with as many blocks (equal parameters) and with max_depth blocks (the depth they may
    reach): the hardest label's accuracy, the differences paired by seed, mean and 95% t-interval ("" if none)."""
    seq = {(seed_of(r), r["model"]["width"], r["model"]["blocks"]): r for r in runs if kind(r) == "sequential"}
    families = {}
    for r in runs:
        depth = (r.get("radial") or {}).get("max_depth") or 0
        if depth > r["model"]["blocks"]:
            families.setdefault((kind(r), r["model"]["width"], r["model"]["blocks"], depth), []).append(r)
    if not families:
        return ""
    label = max(runs[0]["final"]["accuracy"], key=int)
    head = ["network", "width", "blocks (unique)", "blocks/token", "seeds", f"{label_name(label)}",
            "sequential, same blocks", "difference", "sequential, max depth", "difference",
            "by seed [same blocks, max depth]"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|---|" + " ---: |" * (len(head) - 1)]
    for (family, width, blocks, depth), rs in sorted(families.items()):
        rs = [r for r in sorted(rs, key=seed_of) if all((seed_of(r), width, b) in seq for b in (blocks, depth))]
        if not rs:
            continue
        acc = lambda r: r["final"]["accuracy"][label]  # noqa: E731
        a = np.array([acc(r) for r in rs])
        same, deep = (np.array([acc(seq[seed_of(r), width, b]) for r in rs]) for b in (blocks, depth))
        by_seed = ", ".join(f"{x:.3f} [{y:.3f}, {z:.3f}]" for x, y, z in zip(a, same, deep))
        bpt = ci(mean_ci([r["final"]["blocks_per_token"] for r in rs]), 2)
        cells = [family, width, blocks, bpt, len(rs), *(ci(mean_ci(v)) for v in (a, same, a - same, deep, a - deep))]
        lines.append("| " + " | ".join(map(str, [*cells, by_seed])) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def figure(rows: list[dict], path: Path, chance: float):
    """Accuracy against blocks, one line per label, 95% CIs as bars (None without matplotlib)."""
    try:
        import io

        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    labels = sorted({k for r in rows for k in r["accuracy"]}, key=int)
    widths = sorted({r["width"] for r in rows})
    fig, axes = plt.subplots(1, len(widths), figsize=(5.5 * len(widths), 4), squeeze=False)
    for ax, width in zip(axes[0], widths):
        rs = [r for r in rows if r["width"] == width and r["kind"] == "sequential"]
        cmap = plt.get_cmap("viridis")
        for i, k in enumerate(labels):
            pts = [(r["blocks"], *r["accuracy"][k]) for r in rs if k in r["accuracy"]]
            if not pts:
                continue
            x, m, h = map(np.array, zip(*pts))
            color = cmap(i / max(1, len(labels) - 1))
            ax.errorbar(x, m, yerr=h, marker="o", capsize=3, color=color, label=label_name(k))
            for j, r in enumerate(r for r in rows if r["width"] == width and r["kind"] != "sequential"):
                if k in r["accuracy"]:  # a routed network: at its measured blocks per token, a marker per family
                    ax.errorbar(r["blocks_per_token"][0], r["accuracy"][k][0], xerr=r["blocks_per_token"][1],
                                yerr=r["accuracy"][k][1], marker="sDv^<>P*"[j % 8], color=color, linestyle="none",
                                markerfacecolor="none", label=r["kind"] if i == 0 else None)  # fmt: skip
        ax.axhline(chance, color="grey", linestyle=":", label="chance (1 / nodes)")
        ax.set(xlabel="blocks per token (2 per layer)", ylabel="held-out accuracy", title=f"OPT, width {width}")
        ax.set_xticks(sorted({r["blocks"] for r in rs}))
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return write_bytes(path, buf.getvalue())


def cmd_report(args):
    grid = Path(args.grid)
    runs = collect(grid)
    rows = summarize(runs)
    task = runs[0]["task"]
    text = table(rows)
    if any(r["kind"] != "sequential" for r in rows):
        text += "\n\nRouted networks against the sequential curve at their blocks per token:\n\n" + routed_table(rows)
    if reused := reuse_table(runs):
        text += "\n\nBlocks reused, against the sequential runs of the same seed (paired):\n\n" + reused
    if paired := paired_table(runs):
        text += "\n\nStarted from a sequential run, against it trained on as long (same start, steps):\n\n" + paired
    write_json(grid / "summary.json", {"task": task, "rows": rows})
    write_text(grid / "table.md", text + "\n")
    print(f"task: {task}\n{text}")
    if args.figure:
        shown = figure(rows, Path(args.figure), 1 / task["nodes"])
        print(f"figure: {shown}" if shown else "figure: skipped (matplotlib is not installed)")


def cmd_show(args):
    task = task_from(args)
    tok, lab = tasks.sequences(task, args.seed, args.index, 1, stream=args.stream)
    print(f"task: {asdict(task)}; vocabulary of {task.vocab_size}; labels: {tasks.LABEL_MEANINGS}")
    print(tasks.show(task, tok[0], lab[0]))


def cmd_data(args):
    task = task_from(args)
    tok, lab = tasks.sequences(task, args.seed, 0, args.n, stream=args.stream)
    path = tasks.save(args.out, task, tok, lab)
    task2, tok2, lab2 = tasks.read(path)
    assert task2 == task and np.array_equal(tok2, tok) and np.array_equal(lab2, lab)
    print(f"{path}: {args.n} sequences of the {args.stream} stream, seed {args.seed}")


def load_network(path: Path):
    """A trained network and its task: a folder `pack` wrote (a checkpoint, task.json beside it) or a run's folder
    (train_config.json, state.safetensors, result.json). -> (task, network with .forward and .last_walk)."""
    from radial_min import load
    from radial_min.radial import RadialNetwork

    if (path / "task.json").is_file():
        spec = read_json(path / "task.json")
        net = load(path, weights_dtype="float32")
        return tasks.HopTask(**spec), net if isinstance(net, RadialNetwork) else net.sequential
    if not (path / "result.json").is_file():
        raise RadialError(f"{path}: expected a folder written by `pack` (task.json) or a finished run (result.json)")
    cfg = tr.TrainConfig.of(**read_json(path / "train_config.json"))
    net = tr.build_network(cfg)
    tr.load_state(path / "state.safetensors", tr.parameters(net))
    return tasks.HopTask(**read_json(path / "result.json")["task"]), net


def cmd_routes(args):
    """One held-out sequence (the eval stream, seed 0) through a trained network: each token with the blocks run
    at the position that predicts it, shaded by their number on a terminal (darker = more blocks)."""
    from radial_min.radial import shade

    task, net = load_network(Path(args.model))
    tok, lab = tasks.sequences(task, 0, args.index, 1, stream="eval")
    logits = net.forward(tok[:, :-1]).reshape(1, task.seq_len, -1)
    right = logits[0].argmax(-1) == tok[0, 1:]
    deepest = max(len(net.blocks), net.max_depth)
    paint = args.shade == "always" or (args.shade == "auto" and sys.stdout.isatty())
    print(f"eval sequence {args.index} of {args.model}: label '.' = not scored; blocks = blocks run at the position")
    print("that predicts the token; which = those blocks in the order run")
    print(
        tasks.show_routes(
            task, tok[0], lab[0], net.last_walk.routes, (lambda t, b: shade(t, b, deepest)) if paint else None
        )
    )
    scored = lab[0, 1:] != tasks.NOISE
    print(f"scored tokens right: {int(right[scored].sum())} of {int(scored.sum())}")


def cmd_queries(args):
    """Accuracy on one label by the query's index in its sequence (the first query has no earlier answers to read):
    does a network solve the answers from the table alone, or from what earlier queries revealed?"""
    task, net = load_network(Path(args.model))
    tok, lab = tasks.sequences(task, 0, 0, args.eval, stream="eval")
    B, T = tok[:, :-1].shape
    right = net.forward(tok[:, :-1]).reshape(B, T, -1).argmax(-1) == tok[:, 1:]  # [B, T]
    query = (np.arange(1, T + 1) - task.query_start) // 3  # the query each target token belongs to
    cells = []
    for q in range(task.queries):
        chosen = (lab[:, 1:] == args.label) & (query == q)
        if chosen.any():
            cells.append(f"q{q}: {right[chosen].mean():.3f} ({chosen.sum()})")
    print(f"{args.model}, label {args.label}, accuracy by query index (scored tokens): " + ", ".join(cells))


def cmd_pack(args):
    """A finished run as a small checkpoint folder: the network (float16, with its router and radial.json if routed:
    `radial_min.load` returns it routed), task.json (the HopTask, to make its sequences) and hop_report.json (the
    run's scores)."""
    run, out = Path(args.run), Path(args.out)
    task, net = load_network(run)
    tr.export_checkpoint(net, run, out, dtype="float16", overwrite=args.overwrite)
    write_json(out / "task.json", asdict(task))
    result = read_json(run / "result.json")
    write_json(out / "hop_report.json", {k: result[k] for k in ("model", "train", "radial", "final", "tokens_seen")})
    tok, lab = tasks.sequences(task, 0, 0, args.eval, stream="eval")
    packed = tasks.score(load_network(out)[1], tok, lab)
    acc = " ".join(f"{k}:{a:.3f}" for k, a in packed["accuracy"].items())
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"{out}: {size / 1024:.0f} KB; float16, on {args.eval} eval sequences: accuracy {acc}, "
          f"{packed['blocks_per_token']:.2f} blocks per token")  # fmt: skip


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("show", help="print one sequence with its labels")
    add_task_args(s)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--index", type=int, default=0)
    s.add_argument("--stream", default="eval", choices=["train", "eval"])
    s = sub.add_parser("data", help="save held-out sequences (tasks.save)")
    add_task_args(s)
    s.add_argument("--out", required=True)
    s.add_argument("--n", type=int, default=256)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--stream", default="eval", choices=["train", "eval"])
    s = sub.add_parser("train", help="train one model (--estimator: a Radial Network), write OUT/result.json")
    add_task_args(s)
    add_train_args(s)
    add_radial_args(s, one=True)
    s.add_argument("--out", required=True)
    s = sub.add_parser("curve", help="train the grid's runs that are not done yet")
    add_task_args(s)
    add_train_args(s)
    s.add_argument("--grid", default=str(RUNS / "curve"))
    s.add_argument("--layers-list", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6])
    s.add_argument("--widths", type=int, nargs="+", default=[64])
    s.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    s = sub.add_parser("radial", help="train the routed grid's runs that are not done yet")
    add_task_args(s)
    add_train_args(s)
    add_radial_args(s, one=False)
    s.add_argument("--grid", default=str(RUNS / "curve"))
    s.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    s = sub.add_parser("routes", help="one held-out sequence: each token with the blocks that produced it")
    s.add_argument("--model", required=True, help="a folder `pack` wrote (weights/hop-16) or a run folder")
    s.add_argument("--index", type=int, default=0, help="which sequence of the eval stream")
    s.add_argument("--shade", default="auto", choices=["auto", "always", "never"], help="grey by blocks run")
    s = sub.add_parser("queries", help="accuracy on one label by the query's index in its sequence")
    s.add_argument("--model", required=True, help="a folder `pack` wrote or a run folder")
    s.add_argument("--label", type=int, default=2)
    s.add_argument("--eval", type=int, default=256)
    s = sub.add_parser("pack", help="a finished run as a small checkpoint folder with its task (float16)")
    s.add_argument("--run", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--eval", type=int, default=256, help="eval sequences the packed network is scored on")
    s.add_argument("--overwrite", action="store_true")
    s = sub.add_parser("report", help="the grid's table (and figure) from its result.json files")
    s.add_argument("--grid", default=str(RUNS / "curve"))
    s.add_argument("--figure", default="", help="write the figure here (PNG; needs matplotlib)")
    args = p.parse_args(argv)
    try:
        commands = {"show": cmd_show, "data": cmd_data, "train": train, "curve": cmd_curve, "radial": cmd_radial}
        {**commands, "report": cmd_report, "routes": cmd_routes, "pack": cmd_pack, "queries": cmd_queries}[
            args.command
        ](args)
    except RadialError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
