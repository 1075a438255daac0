"""Routers for a real model (docs/real-model.md), made three ways, each saved as a folder with router.json and
router.safetensors that `generate --router` and bench/real_pareto.py take:

    distill  labels from the oracle (analysis/distill.py) under the rule routed execution runs: `fill` keys, the
             attention sink kept (the first position runs every block), skipping restricted (--skippable)
    tune     trained through the language-model loss with the model frozen: KL(full model || routed) per token plus
             a price per block run, through the engine's backward (RadialNetwork(relax=True): every block runs, its
             branch scaled by the router's probability of running it, Router-Tuning's relaxation; in use the
             router's argmax decides). The price follows a target depth (dual ascent, as train.update_cost)
    search   labels from a greedy search per calibration sequence (analysis/route_search.py, as Dr.LLM / CoLa):
             step by step the skippable block whose skipping raises the sequence's mean KL(full || routed) least,
             nested, so one trajectory gives every budget k; for budget k every non-sink token of the sequence
             skips its k blocks, and a router is distilled from those routes as `distill` does

    python tools/real_routers.py distill --model $G --taus 0.08,0.12 --skippable attention --out runs/real/routers
    python tools/real_routers.py tune --model $G --target 54 --steps 150 --out runs/real/routers
    python tools/real_routers.py search --model $G --budgets 3,6,9,12 --sequences 16 --out runs/real/routers

Calibration text: WikiText-2 valid.txt (its first sequences of --seq-len); nothing here reads the test text.
Runs on any Llama-family GGUF or safetensors folder (and OPT: --sink 0).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import radial_min  # noqa: E402
from radial_min import data  # noqa: E402
from radial_min.analysis import distill, route_search  # noqa: E402
from radial_min.ops import log_softmax  # noqa: E402
from radial_min.optim import adamw_step, lr_at  # noqa: E402
from radial_min.radial import RadialNetwork  # noqa: E402
from radial_min.router import SKIPPABLE, Router, RouterConfig, init_router, mandatory_blocks  # noqa: E402


def calibration(model, path, seq_len, n):
    tok = radial_min.Tokenizer(path)
    return data.pack(tok.encode(data.read_text(data.default_text("valid"))), seq_len, n)


def rules_of(model, args) -> dict:
    sink = args.sink if args.sink is not None else int(model.config.model_type in ("llama", "qwen2"))
    return {"sink": sink, "mandatory": mandatory_blocks(model.blocks, args.skippable)}


def cmd_distill(args):
    model = radial_min.load(args.model, weights_dtype="float32")
    seqs = calibration(model, args.model, args.seq_len, args.sequences)
    rules = rules_of(model, args)
    for tau in args.taus:
        t0 = time.process_time()
        ex = distill.oracle_examples(model, seqs, tau, "fill", "output", None, **rules)
        n = len(model.blocks)
        cfg = RouterConfig(
            model.config.hidden_size, n, args.hidden, True, None, tau, "fill", Path(args.model).name, **rules
        )
        router = distill.train_router(ex, cfg, args.epochs, args.lr, 512, args.seed, progress=False)
        acc = distill.accuracy(router, ex)
        out = Path(args.out) / f"distill-{args.skippable}-tau{tau:g}"
        router.save(out / "router")
        note = {
            "method": "distill",
            "tau": tau,
            "labels": f"{len(seqs)} x {args.seq_len} tokens of WikiText-2 valid",
            "oracle_blocks_per_token": float(len(ex["label"]) / seqs.size - 1),
            "train_accuracy": acc,
            "cpu_seconds": time.process_time() - t0,
        }
        (out / "made.json").write_text(json.dumps(note, indent=1) + "\n")
        print(f"{out}: oracle {note['oracle_blocks_per_token']:.2f} blocks/token; decisions {acc['decision']:.1%}")


def cmd_search(args):
    model = radial_min.load(args.model, weights_dtype="float32")
    seqs = calibration(model, args.model, args.seq_len, args.sequences)
    rules = rules_of(model, args)
    n, sink, budgets = len(model.blocks), rules["sink"], sorted(args.budgets)
    candidates = [b for b in range(n) if b not in set(rules["mandatory"] or ())]
    if not budgets or budgets[0] < 1 or budgets[-1] > len(candidates):
        raise SystemExit(f"--budgets: expected whole numbers from 1 to {len(candidates)} (the skippable blocks)")
    if args.time_reuse:  # what running each candidate from its block saves: the first step both ways, interleaved
        for reuse in (True, False) * args.time_reuse:
            t0 = time.process_time()
            traj, blocks = route_search.greedy_search(model, seqs[0], candidates, 1, sink, reuse=reuse)
            print(
                f"first step, {'from the block' if reuse else 'from the embedding'}: "
                f"{time.process_time() - t0:.1f} CPU-s, {blocks} blocks run; block {traj[0]['block']}, "
                f"KL {traj[0]['kl']:.5f}",
                flush=True,
            )
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / f"search-{args.skippable}-trajectories.json"  # one entry per sequence: an interrupted run resumes
    done = json.loads(store.read_text()) if store.is_file() else {}
    key = f"{Path(args.model).name}/{args.seq_len}/{budgets[-1]}/sink{sink}"
    runs = done.setdefault(key, [])
    for s in range(len(runs), len(seqs)):
        t0 = time.process_time()
        print(f"sequence {s + 1}/{len(seqs)}: greedy search over {len(candidates)} blocks, {budgets[-1]} steps")
        traj, blocks_run = route_search.greedy_search(model, seqs[s], candidates, budgets[-1], sink, log=print)
        naive = sum(len(candidates) - i for i in range(budgets[-1])) * n + n  # every candidate from the embedding
        runs.append({"trajectory": traj, "blocks_run": blocks_run, "blocks_run_from_scratch": naive})
        runs[-1]["cpu_seconds"] = time.process_time() - t0
        store.write_text(json.dumps(done) + "\n")
        print(
            f"sequence {s + 1}: skips {[t['block'] for t in traj]}; {blocks_run} blocks run ({naive} from scratch); "
            f"{runs[-1]['cpu_seconds']:.1f} CPU s",
            flush=True,
        )
    search_cpu = sum(r["cpu_seconds"] for r in runs[: len(seqs)])
    for k in budgets:
        t0 = time.process_time()
        keeps = [route_search.keep_for(args.seq_len, n, [t["block"] for t in r["trajectory"][:k]], sink) for r in runs]
        ex = route_search.route_examples(model, seqs, keeps[: len(seqs)])
        cfg = RouterConfig(
            model.config.hidden_size, n, args.hidden, True, None, None, "fill", Path(args.model).name, **rules
        )
        router = distill.train_router(ex, cfg, args.epochs, args.lr, 512, args.seed, progress=False)
        acc = distill.accuracy(router, ex)
        folder = out / f"search-{args.skippable}-k{k}"
        router.save(folder / "router")
        note = {
            "method": "search",
            "search": "greedy, per sequence, mean KL(full || routed) over every position, fill rule, sink kept",
            "budget_blocks": k,
            "labels": f"{len(seqs)} x {args.seq_len} tokens of WikiText-2 valid",
            "label_blocks_per_token": float(len(ex["label"]) / (len(seqs) * args.seq_len) - 1),
            "train_accuracy": acc,
            "search_cpu_seconds": search_cpu,
            "train_cpu_seconds": time.process_time() - t0,
            "trajectories": [
                {"blocks": [t["block"] for t in r["trajectory"]], "kl": [t["kl"] for t in r["trajectory"]]}
                for r in runs[: len(seqs)]
            ],
        }
        (folder / "made.json").write_text(json.dumps(note, indent=1) + "\n")
        print(f"{folder}: labels {note['label_blocks_per_token']:.2f} blocks/token; decisions {acc['decision']:.1%}")


def kl_and_grad(logits, teacher_logp):
    """Mean over rows of KL(teacher || softmax(logits)) and its gradient with respect to the logits [n, V]."""
    logp = log_softmax(logits)
    pt = np.exp(teacher_logp)
    kl = float((pt * (teacher_logp - logp)).sum(-1).mean())
    return kl, ((np.exp(logp) - pt) / len(logits)).astype(logits.dtype)


def cmd_tune(args):
    model = radial_min.load(args.model, weights_dtype="float32")
    seqs = calibration(model, args.model, args.seq_len, args.sequences)
    rules = rules_of(model, args)
    n, E = len(model.blocks), model.config.hidden_size
    cfg = RouterConfig(E, n, args.hidden, True, None, None, "fill", Path(args.model).name, **rules)
    router = Router(cfg, init_router(cfg, args.seed, in_order=args.in_order))
    net = RadialNetwork(model, router, gate=True, relax=True, kv_rule="fill", keep_routes=False)
    model.zero_grad()  # the blocks' backward adds into their norms' grads: arrays once, never read (frozen)
    m = {k: np.zeros_like(a) for k, a in router.params.items()}
    v = {k: np.zeros_like(a) for k, a in router.params.items()}
    rng, price, log = np.random.default_rng(args.seed), args.price, []
    out = Path(args.out) / f"tune-{args.skippable}-target{args.target:g}"
    t0 = time.process_time()
    for step in range(args.steps):
        batch = seqs[rng.choice(len(seqs), args.batch, replace=False)]  # [B, T]
        teacher = log_softmax(model.forward(batch))  # the full model: [B * T, V]
        tape = []
        logits = net.forward(batch, tape=tape)
        kl, dlogits = kl_and_grad(logits, teacher)
        walk = net.last_walk
        expected = walk.expected_blocks()
        router.grad = {k: np.zeros_like(a) for k, a in router.params.items()}
        dx = model.head_backward(dlogits, tape)  # the engine's backward: head, then the walk (embedding: frozen)
        tape.pop().backward(dx, price)
        for mod in model.modules():  # frozen: the weights' deferred gradients are dropped, never multiplied
            if hasattr(mod, "pending"):
                mod.pending = []
        lr = lr_at(step, args.lr, max(1, args.steps // 10), args.steps)
        adamw_step(router.params, router.grad, m, v, step + 1, lr, weight_decay=0.0)
        price = max(0.0, price + args.price_rate * (expected - args.target))  # dual ascent toward the target
        gates = [p[np.arange(len(p)), mv] for (_, p), mv in zip(walk.decisions, walk.priced)]
        hard = sum(int((g < 0.5).sum()) for g in gates) / batch.size  # blocks the argmax would skip, per token
        record = {"step": step + 1, "kl": round(kl, 5), "expected_blocks": round(expected, 3), "price": price}
        record["cpu_s"] = round(time.process_time() - t0, 1)
        log.append(record)
        print(json.dumps(record | {"skips_at_half": round(hard, 3)}), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    router.save(out / "router")
    note = {
        "method": "tune",
        "target": args.target,
        "calibration": f"{len(seqs)} x {args.seq_len} tokens of WikiText-2 valid, batches of {args.batch}",
        "steps": args.steps,
        "cpu_seconds": time.process_time() - t0,
        "log": log,
    }
    (out / "made.json").write_text(json.dumps(note, indent=1) + "\n")
    print(f"router saved in {out}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("distill", "tune", "search"):
        s = sub.add_parser(name)
        s.add_argument("--model", required=True, help="model folder or .gguf file")
        s.add_argument("--out", default="runs/real/routers", help="parent folder of the routers (default: %(default)s)")
        s.add_argument("--skippable", default="attention", choices=SKIPPABLE, help="(default: %(default)s)")
        s.add_argument("--sink", type=int, default=None, help="positions that run every block (default: 1 for Llama)")
        s.add_argument("--seq-len", type=int, default=256)
        s.add_argument("--hidden", type=int, default=64, help="router hidden units (default: %(default)s)")
        s.add_argument("--seed", type=int, default=0)
    d = sub.choices["distill"]
    d.add_argument("--taus", type=lambda t: [float(x) for x in t.split(",")], default=[0.08, 0.12, 0.16])
    d.add_argument("--sequences", type=int, default=32, help="calibration sequences (default: %(default)s)")
    d.add_argument("--epochs", type=int, default=8)
    d.add_argument("--lr", type=float, default=3e-3)
    t = sub.choices["tune"]
    t.add_argument("--target", type=float, required=True, help="blocks per token the price steers to")
    t.add_argument("--steps", type=int, default=150)
    t.add_argument("--batch", type=int, default=2, help="sequences per step (default: %(default)s)")
    t.add_argument("--sequences", type=int, default=64, help="calibration sequences (default: %(default)s)")
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--price", type=float, default=0.0, help="initial price of a block, in nats (default: 0)")
    t.add_argument("--price-rate", type=float, default=2e-4, help="price change per step and block of error")
    t.add_argument("--in-order", type=float, default=4.0, help="the router's starting margin for the next block")
    r = sub.choices["search"]
    r.add_argument("--budgets", type=lambda t: [int(x) for x in t.split(",")], default=[3, 6, 9, 12])
    r.add_argument("--sequences", type=int, default=16, help="calibration sequences (default: %(default)s)")
    r.add_argument("--epochs", type=int, default=8)
    r.add_argument("--lr", type=float, default=3e-3)
    r.add_argument("--time-reuse", type=int, default=0, help="only time the first step N times each way, then exit")
    args = p.parse_args(argv)
    return {"distill": cmd_distill, "tune": cmd_tune, "search": cmd_search}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
