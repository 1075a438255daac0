"""The variable-depth task (radial_min/tasks.py) and the sequential curve on it: does accuracy on hard tokens rise
with depth while easy tokens are solved by shallow models?

    python tools/depth_task.py show                        # one sequence of the task, each token's label under it
    python tools/depth_task.py data --out runs/depth/eval.safetensors   # the held-out set, saved (tasks.save)
    python tools/depth_task.py train --layers 3 --out runs/depth/x     # one sequential model -> x/result.json
    python tools/depth_task.py curve                       # the grid of the curve (skips runs already done)
    python tools/depth_task.py report                      # the table and figure from the grid's results

Every run trains an OPT-architecture model from scratch on batches of the task's "train" stream (batch k of seed
s is tasks.batch(task, s, k, ...)) and scores greedy accuracy per label on the first --eval sequences of its
"eval" stream. The loss is a masked mean cross-entropy: `--loss scored` leaves the NOISE tokens out (the table's
random entries, the hop tokens), `--loss all` keeps every token (the plain LM loss). The model's pieces are the
trainer's (opt_backprop: embedding, blocks, head; optim: AdamW, clipping, schedule); only the masked loss and the
loop are here.
"""

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from radial_min import backprop as bp  # noqa: E402
from radial_min import opt_backprop as ob  # noqa: E402
from radial_min import tasks  # noqa: E402
from radial_min.config import OPTConfig  # noqa: E402
from radial_min.errors import RadialError  # noqa: E402
from radial_min.io.outputs import read_json, write_bytes, write_json, write_text  # noqa: E402
from radial_min.optim import adamw_step, clip_grads, lr_at  # noqa: E402

RUNS = ROOT / "runs" / "depth"

# ------------------------------------------------------------------------------------------- the model


def model_config(task: tasks.HopTask, layers: int, width: int, heads: int) -> OPTConfig:
    return OPTConfig(
        vocab_size=task.vocab_size,
        hidden_size=width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        ffn_dim=4 * width,
        max_position_embeddings=task.seq_len,
        word_embed_proj_dim=width,
    )


def forward(P, cfg: OPTConfig, ids):
    """ids [B, T] -> logits [B, T, V] and what the backward needs."""
    x, emb_cache = ob.embed_forward(ids, P)  # [B, T, E]
    caches = []
    for layer, kind in ob.blocks_of(cfg):
        x, cache = ob.block_forward(x, ob.block_weights(P, layer, kind), kind, cfg, bp.ATTENTION_FAST)
        caches.append(cache)
    logits, c_head = ob.head_forward(x, P)  # [B, T, V]
    return logits, (emb_cache, caches, c_head)


def masked_crossentropy(logits, targets, weights):
    """Mean of the per-token cross-entropy weighted by `weights` (0 leaves a token out): [N, V], [N], [N]
    -> (loss, dlogits [N, V])."""
    z = logits - logits.max(-1, keepdims=True)
    p = np.exp(z)
    total = p.sum(-1, keepdims=True)
    rows = np.arange(len(targets))
    nll = np.log(total[:, 0]) - z[rows, targets]  # [N]
    norm = weights.sum()
    p /= total
    p[rows, targets] -= 1.0
    p *= (weights / norm)[:, None].astype(p.dtype)
    return float((weights * nll).sum() / norm), p


def loss_and_grads(P, cfg: OPTConfig, tokens, weights):
    """Masked next-token loss of tokens [B, T + 1] with per-target weights [B, T], and its gradients."""
    ids, targets = tokens[:, :-1], tokens[:, 1:]
    B, T = ids.shape
    logits, (emb_cache, caches, c_head) = forward(P, cfg, ids)
    loss, dlogits = masked_crossentropy(logits.reshape(B * T, -1), targets.ravel(), weights.ravel())
    G = {}
    dx = ob.head_backward(dlogits.reshape(B, T, -1), c_head, G)
    for (layer, kind), cache in zip(reversed(ob.blocks_of(cfg)), reversed(caches)):
        dx, g = ob.block_backward(dx, cache, kind)
        ob.store_block_grads(G, g, layer, kind)
    ob.embed_backward(dx, emb_cache, P, G)
    return loss, G


def loss_weights(labels, which: str):
    """Per-target weights [B, T] of the loss: every token ('all') or the scored ones only ('scored')."""
    if which == "all":
        return np.ones(labels[:, 1:].shape, np.float32)
    return tasks.scored_mask(labels).astype(np.float32)


def evaluate(P, cfg: OPTConfig, tokens, labels, chunk: int = 64) -> dict:
    """Accuracy per label and the mean loss over scored tokens, on fixed held-out sequences."""
    counts, nll, n = {}, 0.0, 0
    for i in range(0, len(tokens), chunk):
        tok, lab = tokens[i : i + chunk], labels[i : i + chunk]
        logits, _ = forward(P, cfg, tok[:, :-1])
        tasks.add_counts(counts, tasks.accuracy_by_label(logits, tok, lab))
        w = tasks.scored_mask(lab).astype(np.float32)
        B, T = w.shape
        loss, _ = masked_crossentropy(logits.reshape(B * T, -1), tok[:, 1:].ravel(), w.ravel())
        nll, n = nll + loss * float(w.sum()), n + float(w.sum())
    return {
        "accuracy": {str(k): c / m for k, (c, m) in sorted(counts.items())},
        "scored": {str(k): m for k, (c, m) in sorted(counts.items())},
        "scored_loss": round(nll / n, 4),
    }


# ------------------------------------------------------------------------------------------- one run


def task_from(args) -> tasks.HopTask:
    weights = tuple(float(w) for w in args.hop_weights.split(",")) if args.hop_weights else ()
    return tasks.HopTask(args.nodes, args.max_hops, args.seq_len, args.table, weights, args.starts)


def train(args) -> dict:
    task = task_from(args)
    cfg = model_config(task, args.layers, args.width, args.heads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    eval_tokens, eval_labels = tasks.sequences(task, 0, 0, args.eval, stream="eval")
    P = ob.init_params(cfg, args.seed)
    m = {k: np.zeros_like(a) for k, a in P.items()}
    v = {k: np.zeros_like(a) for k, a in P.items()}
    curve, t0 = [], time.perf_counter()
    with open(out / "log.jsonl", "w") as log:
        for step in range(args.steps):
            tokens, labels = tasks.batch(task, args.seed, step, args.batch)
            loss, G = loss_and_grads(P, cfg, tokens, loss_weights(labels, args.loss))
            norm = clip_grads(G, 1.0)
            lr = lr_at(step, args.lr, args.warmup, args.steps)
            adamw_step(P, G, m, v, step + 1, lr, weight_decay=0.1)
            record = {"step": step + 1, "loss": round(loss, 4), "grad_norm": round(norm, 3)}
            if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
                ev = evaluate(P, cfg, eval_tokens, eval_labels)
                record.update(eval=ev, seconds=round(time.perf_counter() - t0, 1))
                curve.append({"step": step + 1, **ev})
                acc = " ".join(f"{k}:{a:.2f}" for k, a in ev["accuracy"].items())
                print(f"step {step + 1} loss {loss:.3f} scored {ev['scored_loss']:.3f} | {acc}", flush=True)
            log.write(json.dumps(record) + "\n")
            log.flush()
    seconds = time.perf_counter() - t0
    result = {
        "task": asdict(task),
        "model": {"layers": args.layers, "blocks": 2 * args.layers, "width": args.width, "heads": args.heads},
        "train": {k: getattr(args, k) for k in ("steps", "batch", "lr", "warmup", "seed", "loss", "eval")},
        "tokens_seen": args.steps * args.batch * task.seq_len,
        "seconds": round(seconds, 1),
        "load_average": os.getloadavg()[0],
        "final": curve[-1],
        "curve": curve,
    }
    write_json(out / "result.json", result)
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
    p.add_argument("--eval", type=int, default=256, help="held-out sequences scored")
    p.add_argument("--eval-every", type=int, default=250)


# ------------------------------------------------------------------------------------------- the curve

# Student's t at 97.5% for 1..10 degrees of freedom: a 95% interval of a mean over n seeds is mean +- t s / sqrt(n).
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228]


def mean_ci(values) -> tuple[float, float]:
    """Mean and half-width of its 95% confidence interval (t distribution; 0 for a single value)."""
    a = np.asarray(values, float)
    if len(a) < 2:
        return float(a.mean()), 0.0
    return float(a.mean()), float(T975[min(len(a) - 2, len(T975) - 1)] * a.std(ddof=1) / np.sqrt(len(a)))


def run_name(layers: int, width: int, seed: int) -> str:
    return f"L{layers}-w{width}-s{seed}"


def cmd_curve(args):
    """Train every (layers, width, seed) of the grid that has no result.json yet, one after another."""
    grid = Path(args.grid)
    for seed in args.seeds:
        for width in args.widths:
            for layers in args.layers_list:
                out = grid / run_name(layers, width, seed)
                if (out / "result.json").is_file():
                    continue
                print(f"== {out}", flush=True)
                run = argparse.Namespace(**{**vars(args), "layers": layers, "width": width, "seed": seed, "out": out})
                train(run)


def collect(grid: Path) -> list[dict]:
    runs = []
    for path in sorted(grid.glob("*/result.json")):
        r = read_json(path)
        r["name"] = path.parent.name
        runs.append(r)
    if not runs:
        raise RadialError(f"{grid}: no */result.json (run `curve --grid {grid}` first)")
    return runs


def summarize(runs: list[dict]) -> list[dict]:
    """One row per (width, blocks): accuracy per label, mean and 95% CI over seeds, and minutes per run."""
    groups = {}
    for r in runs:
        groups.setdefault((r["model"]["width"], r["model"]["blocks"]), []).append(r)
    rows = []
    for (width, blocks), rs in sorted(groups.items()):
        labels = sorted({k for r in rs for k in r["final"]["accuracy"]}, key=int)
        acc = {k: mean_ci([r["final"]["accuracy"][k] for r in rs]) for k in labels}
        hard = [k for k in labels if int(k) >= 1]
        mean_hard = [np.mean([r["final"]["accuracy"][k] for k in hard]) for r in rs]  # each run's mean over hops
        rows.append({
            "width": width, "blocks": blocks, "layers": blocks // 2, "seeds": sorted(r["train"]["seed"] for r in rs),
            "accuracy": acc, "hard_mean": mean_ci(mean_hard),
            "minutes": [round(r["seconds"] / 60, 1) for r in rs], "load": [round(r["load_average"], 1) for r in rs],
            "steps": rs[0]["train"]["steps"], "tokens_seen": rs[0]["tokens_seen"],
        })  # fmt: skip
    return rows


def table(rows: list[dict]) -> str:
    labels = sorted({k for r in rows for k in r["accuracy"]}, key=int)
    head = ["width", "blocks", "seeds", *(f"{k} hops" if k != "0" else "easy (0)" for k in labels), "hard, mean"]
    lines = ["| " + " | ".join(head) + " |", "|" + " ---: |" * len(head)]
    for r in rows:
        cells = [str(r["width"]), str(r["blocks"]), str(len(r["seeds"]))]
        for k in labels:
            m, h = r["accuracy"].get(k, (float("nan"), 0))
            cells.append(f"{m:.3f} ± {h:.3f}")
        cells.append(f"{r['hard_mean'][0]:.3f} ± {r['hard_mean'][1]:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
        rs = [r for r in rows if r["width"] == width]
        cmap = plt.get_cmap("viridis")
        for i, k in enumerate(labels):
            pts = [(r["blocks"], *r["accuracy"][k]) for r in rs if k in r["accuracy"]]
            x, m, h = map(np.array, zip(*pts))
            name = "easy (0 hops)" if k == "0" else f"{k} hop" + ("s" if k != "1" else "")
            ax.errorbar(x, m, yerr=h, marker="o", capsize=3, color=cmap(i / max(1, len(labels) - 1)), label=name)
        ax.axhline(chance, color="grey", linestyle=":", label="chance (1 / nodes)")
        ax.set(xlabel="blocks (2 per layer)", ylabel="held-out accuracy", title=f"sequential OPT, width {width}")
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
    s = sub.add_parser("train", help="train one sequential model, write OUT/result.json")
    add_task_args(s)
    add_train_args(s)
    s.add_argument("--out", required=True)
    s = sub.add_parser("curve", help="train the grid's runs that are not done yet")
    add_task_args(s)
    add_train_args(s)
    s.add_argument("--grid", default=str(RUNS / "curve"))
    s.add_argument("--layers-list", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6])
    s.add_argument("--widths", type=int, nargs="+", default=[64])
    s.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    s = sub.add_parser("report", help="the grid's table (and figure) from its result.json files")
    s.add_argument("--grid", default=str(RUNS / "curve"))
    s.add_argument("--figure", default="", help="write the figure here (PNG; needs matplotlib)")
    args = p.parse_args(argv)
    try:
        {"show": cmd_show, "data": cmd_data, "train": train, "curve": cmd_curve, "report": cmd_report}[args.command](
            args
        )
    except RadialError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
