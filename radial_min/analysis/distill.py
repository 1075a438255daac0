"""Distilling a router from the oracle (paper, Sec. 5): the oracle's routes as supervised examples, the router
fitted to them, and the router judged against the oracle and the static baselines at its own depth.

    examples = oracle_examples(model, sequences, tau)     the state and the oracle's next move at every decision
    router = train_router(examples, RouterConfig(...))    softmax cross-entropy, AdamW
    report = evaluate(model, router, test_sequences)      accuracy, agreement, perplexity at equal depth

`RouterDecisions` runs a forward-only router inside the oracle's simulation (oracle.run_sequence), which also
measures the ratios at the blocks a token skips. Streamed models (analysis/stream.py) get the same examples from
`LabelPass`, block-major.
"""

import os
from pathlib import Path

import numpy as np

from .. import ops
from ..errors import count
from ..optim import adamw_step, lr_at
from ..progress import Bar
from ..router import Router, RouterConfig, allowed_moves, features, init_router, mlp_backward, mlp_forward
from . import layer_major, oracle, plots
from .oracle import Decisions, SimulationPass, run_sequence, threshold


class RouterDecisions(Decisions):
    """A forward-only router as the `Decisions` of `oracle.run_sequence`: at block b, the tokens
    whose chosen next block is b run it, then choose again from their new state."""

    def __init__(self, router, max_depth: int | None = None):
        if not router.config.forward_only:
            raise ValueError("RouterDecisions evaluates block by block, in order: it needs a forward-only router")
        self.router = router
        self.max_depth = router.config.depth_limit if max_depth is None else max_depth
        self.next = self.step = None

    def __call__(self, b, rows, ratios):
        return self.next[rows] == b

    def after(self, b, x, ran):
        """b = -1: the embeddings, every token chooses its first block; else the tokens that ran block b."""
        if b < 0:
            self.next, self.step = np.zeros(len(x), np.int64), np.zeros(len(x), np.int64)
            rows = np.arange(len(x))
        else:
            rows = np.flatnonzero(ran)
            self.step[rows] += 1
        if len(rows):
            choice = self.router.choose(x[rows], np.full(len(rows), b), self.step[rows], rows)  # rows: positions
            self.next[rows] = np.where(self.step[rows] >= self.max_depth, self.router.config.exit, choice)


class _Recorder(Decisions):
    """Wraps an oracle decision rule to keep every state it passes: states[b + 1] is the state after block b."""

    def __init__(self, decide):
        self.decide, self.states = decide, []

    def __call__(self, b, rows, r):
        return self.decide(b, rows, r)

    def after(self, b, x, ran):
        self.states.append(x.astype(np.float32))


def oracle_examples(
    model, sequences, tau: float, kv_rule: str = "drop", kind: str = "output", progress=None, **rules
) -> dict:
    """The oracle's routes as router training examples: at the start and after each block a token runs, the
    state it has then, the block it came from, its routing step (blocks run so far), and the oracle's next block
    (or EXIT). `rules` (sink, mandatory: oracle.threshold) make them routes a router with those rules can take."""
    if getattr(model, "layer_major", False):  # weights streamed block by block: the same examples, loops swapped
        if rules.get("sink") or rules.get("mandatory"):
            raise ValueError("streamed labels follow the plain oracle: no sink or mandatory blocks")
        return _streamed_examples(model, sequences, tau, kv_rule, kind)
    seqs = sequences if progress is None else progress(sequences)
    return routes_as_examples(model, ((ids, threshold(tau, None, **rules)) for ids in seqs), kv_rule, kind)[0]


def routes_as_examples(model, runs, kv_rule: str, kind: str = "output") -> tuple:
    """Each (ids, decide) of `runs` run by the oracle's simulation under `decide` (an oracle decision rule), its
    routes turned into router training examples (oracle_examples' format) -> (examples, the keeps [T, n] run)."""
    out, keeps = {"x": [], "prev": [], "step": [], "label": [], "token": []}, []
    base = 0
    for ids, decide in runs:
        rec = _Recorder(decide)
        _, keep, _ = run_sequence(model, ids, rec, kv_rule, kind)
        states = np.stack(rec.states)  # [n + 1, T, E]
        t_idx, b_idx, prev, step, label = routes_from_keep(keep)
        out["x"].append(states[b_idx, t_idx])
        out["prev"].append(prev)
        out["step"].append(step)
        out["label"].append(label)
        out["token"].append(base + t_idx)
        keeps.append(keep)
        base += len(ids)
    return {k: np.concatenate(v) for k, v in out.items()}, keeps


def routes_from_keep(keep):
    """One sequence's decisions keep [T, n] as examples: (token, column, prev, step, label) for the start (column
    0) and after each kept block b (column b + 1), in token order; label is the next kept block or EXIT (= n)."""
    T, n = keep.shape
    nxt = np.full((T, n + 1), n)  # nxt[t, b + 1]: first kept block after b (n = EXIT); column 0 is START
    for b in range(n - 1, -1, -1):
        nxt[:, b] = np.where(keep[:, b], b, nxt[:, b + 1])
    t_idx, b_idx = np.nonzero(np.concatenate([np.ones((T, 1), bool), keep], axis=1))  # START, then kept blocks
    step = np.cumsum(np.concatenate([np.zeros((T, 1), int), keep], axis=1), axis=1)[t_idx, b_idx]
    return t_idx, b_idx, b_idx - 1, step, nxt[t_idx, b_idx]  # prev = b_idx - 1: -1 is START


class LabelPass(SimulationPass):
    """The oracle's run block-major (a streamed model) plus the states its routes pass through: column 0 is every
    token's embedding (START), column b + 1 the states after block b of the tokens that ran it, rows in (sequence,
    token) order. Columns go to files in the state folder as they are made (else they stay in memory)."""

    head = False

    def __init__(self, model, sequences, tau, kv_rule, kind):
        super().__init__(model, sequences, threshold(tau), kv_rule, kind)
        self.key = layer_major.fingerprint(model, self.sequences, ("labels", tau, kv_rule, kind))
        self.label = f"oracle labels (tau={tau:g}, {kv_rule})"
        self.columns, self.pending = {}, []

    def embedded(self, s, x):
        super().embedded(s, x)
        self.pending.append(np.array(x))
        if s == len(self.sequences) - 1:
            self._column(0)

    def block(self, b, block, s, x, pos):
        y = super().block(b, block, s, x, pos)
        self.pending.append(y[self.arrays["keep"][s, :, b]])
        if s == len(self.sequences) - 1:
            self._column(b + 1)
        return y

    def _column(self, c):
        rows, self.pending = np.concatenate(self.pending), []
        d = self.model.state_dir
        if d is None:
            self.columns[c] = rows
            return
        path = d / f"labels-{self.key}-{c}.npy"
        d.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                np.save(f, rows)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        self.columns[c] = path

    def column(self, c) -> np.ndarray:
        got = self.columns.get(c)
        if got is None:  # made by the interrupted run
            got = self.model.state_dir / f"labels-{self.key}-{c}.npy"
        return np.load(got, mmap_mode="r") if isinstance(got, Path) else got

    def finish(self, s, x, logits):
        pass


def _streamed_examples(model, sequences, tau, kv_rule, kind) -> dict:
    """`oracle_examples` on a streamed model: the same examples in the same order, block-major."""
    job = layer_major.run(LabelPass(model, sequences, tau, kv_rule, kind))
    keep = job.arrays["keep"]  # [n_seq, T, n]
    n_seq, T, n = keep.shape
    out = {"prev": [], "step": [], "label": [], "token": []}
    for s in range(n_seq):
        t_idx, b_idx, prev, step, label = routes_from_keep(keep[s])
        out["prev"].append(prev)
        out["step"].append(step)
        out["label"].append(label)
        out["token"].append(s * T + t_idx)
    ex = {k: np.concatenate(v) for k, v in out.items()}
    mask = np.concatenate([np.ones((n_seq, T, 1), bool), keep], axis=2)  # [n_seq, T, n + 1]: START, kept blocks
    _, _, c_idx = np.nonzero(mask)  # the order of the in-memory examples: sequence, token, column
    x = np.empty((len(c_idx), model.config.hidden_size), np.float32)
    for c in range(n + 1):
        x[c_idx == c] = job.column(c)
    ex["x"] = x
    return {k: ex[k] for k in ("x", "prev", "step", "label", "token")}


def accuracy(router: "Router", ex: dict) -> dict:
    """Share of the oracle's decisions the router repeats, and of tokens whose every decision it repeats."""
    pred = np.concatenate(
        [
            router.choose(ex["x"][i : i + 4096], ex["prev"][i : i + 4096], ex["step"][i : i + 4096])
            for i in range(0, len(ex["x"]), 4096)
        ]
    )
    right = pred == ex["label"]
    per_token = np.bincount(ex["token"], weights=~right) == 0
    exits = ex["label"] == router.config.exit
    return {
        "decision": float(right.mean()),
        "route": float(per_token.mean()),
        "exit": float(right[exits].mean()),
        "block": float(right[~exits].mean()) if (~exits).any() else 1.0,
        "decisions": int(right.size),
    }


def loss_and_grads(params, z, allowed, labels):
    """Softmax cross-entropy against the oracle's choices, and gradients for w1, b1, w2, b2."""
    logits, cache = mlp_forward(params, z, allowed)
    loss, c_ce = ops.crossentropy_forward(logits, labels)
    _, grads = mlp_backward(ops.crossentropy_backward(c_ce), params, cache)
    return float(loss), grads


def train_router(
    ex: dict,
    cfg: RouterConfig,
    epochs: int = 8,
    lr: float = 3e-3,
    batch_size: int = 512,
    seed: int = 0,
    weight_decay: float = 0.0,
    progress: bool = True,
) -> Router:
    """Fit the router to the oracle's choices with AdamW on softmax cross-entropy."""
    params = init_router(cfg, seed)
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v = {k: np.zeros_like(p) for k, p in params.items()}
    z_all = features(ex["x"], ex["prev"], cfg.n_blocks).astype(np.float32)
    allowed_all = allowed_moves(ex["prev"], ex["step"], cfg)
    labels = ex["label"]
    rng = np.random.default_rng(seed)
    steps_per_epoch = max(1, len(labels) // batch_size)
    total, step = epochs * steps_per_epoch, 0
    bar = Bar(total, "train router", "step", enabled=progress)
    for _ in range(epochs):
        order = rng.permutation(len(labels))
        for i in range(steps_per_epoch):
            idx = order[i * batch_size : (i + 1) * batch_size]
            loss, grads = loss_and_grads(params, z_all[idx], allowed_all[idx], labels[idx])
            step += 1
            rate = lr_at(step, lr, max(1, total // 20), total)
            adamw_step(params, grads, m, v, step, rate, weight_decay=weight_decay)
            if step % 20 == 0 or step == total:
                acc = (mlp_forward(params, z_all[idx], allowed_all[idx])[0].argmax(-1) == labels[idx]).mean()
                bar.set_postfix(loss=f"{loss:.4f}", acc=f"{acc:.3f}")
            bar.update(1)
    bar.close()
    return Router(cfg, params)


def distill(
    model, sequences, tau, kv_rule, kind, hidden, max_depth, epochs, lr, batch_size, seed, progress=None, **rules
):
    """A router for `model` distilled from the oracle at `tau` on `sequences`: the oracle's examples, then the router
    trained on them. `rules` (sink, mandatory) are the oracle's and the router's (router.py). -> (router,
    examples)."""
    ex = oracle_examples(model, sequences, tau, kv_rule, kind, progress, **rules)
    n = len(model.blocks)
    cfg = RouterConfig(model.config.hidden_size, n, hidden, True, max_depth, tau, kv_rule, model.path.name, **rules)
    return train_router(ex, cfg, epochs, lr, batch_size, seed), ex


# -------------------------------------------------------------------------------------------- evaluation


def evaluate(model, router: Router, sequences, kind: str = "output", train_examples=None, bar=None) -> dict:
    """A distilled router judged on held-out `sequences` against the oracle of the tau and rule it records:
    accuracy on the oracle's states (and on `train_examples`, its labels, if given), agreement on its own states,
    and perplexity against blocks per token for the sequential model, the oracle at tau and at thresholds around
    the router's depth, the router and the static baselines that bracket that depth; then every one of them at
    the router's depth. `bar` (a `progress.Passes`) counts each pass under its name."""
    tau, kv_rule, n = router.config.tau, router.config.kv_rule, len(model.blocks)
    rules = {"sink": router.config.sink, "mandatory": router.config.mandatory}  # the oracle follows them too

    def track(label):
        return None if bar is None else lambda items: bar.track(items, label)

    test_ex = oracle_examples(model, sequences, tau, kv_rule, kind, track("held-out labels"), **rules)
    sequential = oracle.simulate(
        model, sequences, threshold(0.0, "sequential on test"), "fill", kind, track("sequential on test")
    )
    decisions = RouterDecisions(router)
    decisions.label = "router on test"
    routed = oracle.simulate(model, sequences, decisions, kv_rule, kind, track("router on test"))
    depth = float(routed.depth.mean())
    oracles = oracle.around_depth(model, sequences, tau, kv_rule, kind, depth, sequential, bar, **rules)
    runs = {
        "sequential": sequential,
        **{f"oracle (tau={t:g}, {kv_rule})": r for t, r in oracles.items() if t},
        "router": routed,
    }
    statics = oracle.StaticBaselines(model, sequences, sequential.ratios.reshape(-1, n).mean(0), sequential, bar)
    at_depth = {
        "router": routed.ppl,
        "oracle": oracle.at_depth([(r.depth.mean(), r.nll.mean()) for r in oracles.values()], depth),
        "static lowest-ratio": statics.ppl_at("lowest", depth),
        "static early exit": statics.ppl_at("exit", depth),
    }
    for (kind_, k), (_, run) in statics.runs.items():
        if k:
            runs[f"static: {statics.NAMES[kind_]} {k} dropped"] = run
    return {
        "accuracy_train": None if train_examples is None else accuracy(router, train_examples),
        "accuracy_test": accuracy(router, test_ex),
        "agreement_own_states": oracle.agreement(routed, tau),
        "at_router_depth": at_depth,
        "depth": depth,
        "runs": runs,
        "test_examples": test_ex,
    }


def plot_report(ev, report, blocks, out):
    """The evaluation's figures in `out`: perplexity against depth for every run, the routed runs' depth
    histograms, the router's routes on the first sequence."""
    n, runs = len(blocks), ev["runs"]
    plots.ppl_vs_depth(
        {name: ([r.depth.mean()], [r.ppl]) for name, r in runs.items()}, n, out / "router_ppl_vs_depth.png"
    )
    hists = {
        name: r["depth_hist"] for name, r in report["runs"].items() if "static" not in name and name != "sequential"
    }
    plots.depth_histogram(hists, out / "router_depth_hist.png")
    plots.routing_trace(runs["router"].keep[0], [b.name for b in blocks], out / "router_trace.png", "router")


def router_report(ev, router, cfg, n_blocks) -> dict:
    """train_router.json: the router's name and settings, `router.evaluate`'s numbers, and per run its perplexity
    and depths (mean, min, max, histogram)."""
    runs = {
        name: {
            "ppl": r.ppl,
            "mean_depth": float(r.depth.mean()),
            "min_depth": int(r.depth.min()),
            "max_depth": int(r.depth.max()),
            "depth_hist": np.bincount(r.depth, minlength=n_blocks + 1),
        }
        for name, r in ev["runs"].items()
    }
    keys = ("accuracy_train", "accuracy_test", "agreement_own_states", "at_router_depth")
    return {"router": router, "config": cfg.__dict__, **{k: ev[k] for k in keys}, "runs": runs}


def format_router_report(ev, n_test):
    """`router.evaluate`'s numbers: accuracy, agreement, each run's perplexity and depth, all at the router's depth."""
    acc_train, acc_test, own = ev["accuracy_train"], ev["accuracy_test"], ev["agreement_own_states"]
    runs, depth, at_depth = ev["runs"], ev["depth"], ev["at_router_depth"]
    train = "" if acc_train is None else f" ({acc_train['decision']:.1%} train)"
    lines = [
        f"accuracy against the oracle: decisions {acc_test['decision']:.1%} held-out{train}; whole routes "
        f"{acc_test['route']:.1%}; EXIT {acc_test['exit']:.1%}, next block {acc_test['block']:.1%}",
        "  (on the oracle's states: the router fed the oracle's routes, one decision at a time)",
        f"on the router's own states (its own routes, each decision against the oracle's rule on the state it "
        f"reached):\n  decisions {own['move']:.1%}; whole routes {own['route']:.1%}; keep/skip per block "
        f"{own['block']:.1%}",
        f"\n{'on ' + count(n_test, 'held-out sequence'):<36}{'ppl':>10}{'blocks/token':>14}{'min':>5}{'max':>5}",
    ]
    for name, run in runs.items():
        lines.append(f"{name:<36}{run.ppl:10.3f}{run.depth.mean():14.2f}{run.depth.min():5d}{run.depth.max():5d}")
    lines.append(
        f"\nat the router's {depth:.2f} blocks per token (mean NLL interpolated between the two runs above "
        "that bracket it):"
    )
    lines.append(
        "  " + "; ".join(f"{name} {oracle.format_number(ppl, 0, 1).strip()}" for name, ppl in at_depth.items())
    )
    return "\n".join(lines)
