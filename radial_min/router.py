"""The router of a Radial Network (paper, Sec. 5): a small MLP that looks at a token's hidden state and where
it is in its route, and picks the next block to run, or EXIT.

    z      = [LN(x), onehot(prev)]        LN without parameters; prev is START or the block just run
    h      = relu(W1 z + b1)
    logits = W2 h + b2                    one per block, plus EXIT (the last)
    next   = argmax over the allowed moves (softmax for training)

A router distilled from a sequential model may only move forward (to a later block or EXIT); the mask is
applied to the logits in training and in use. Training is plain supervised learning on the oracle's choices,
with forward/backward pairs from `backprop` and AdamW from `optim`; no autograd.
"""

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from numba import njit

from . import backprop as bp
from .analysis import layer_major
from .io.checkpoint import SafetensorsFile, write_safetensors
from .config import check_field
from .errors import CheckpointError, count
from .kernels import mean_rstd
from .optim import adamw_step, lr_at
from .analysis import oracle
from .analysis.oracle import Decisions, SimulationPass, run_sequence, threshold
from .io.outputs import present, read_json, write_json
from .progress import Bar

NEG = -1e9  # logit of a forbidden move: exp underflows to exactly 0, without the NaN that -inf - (-inf) gives


@dataclass
class RouterConfig:
    width: int  # hidden size E of the model it routes
    n_blocks: int
    hidden: int = 64
    forward_only: bool = True
    max_depth: int | None = None  # None: n_blocks
    tau: float | None = None  # oracle threshold it was distilled from (for the record)
    kv_rule: str | None = None
    model: str | None = None

    @property
    def exit(self) -> int:
        return self.n_blocks

    @property
    def depth_limit(self) -> int:
        """The most blocks a token may run: max_depth, or one pass over the blocks when unset."""
        return self.n_blocks if self.max_depth is None else self.max_depth

    @property
    def n_in(self) -> int:
        return self.width + self.n_blocks + 1  # state + onehot(prev), prev in {START, 0..n_blocks-1}


def init_router(cfg: RouterConfig, seed: int = 0, in_order: float = 0.0) -> dict:
    """Random weights (distillation). With `in_order` > 0 (co-training), the route through the blocks in order
    instead: hidden unit k fires when the previous block is k - 1 (START: k = 0) and gives the logit of block k
    (EXIT after the last) a margin of `in_order`, the state's weights are small and random, so the network
    starts as the sequential model (gates ~1 - N exp(-in_order)) and learns from there to skip, reorder, reuse
    and exit. Needs hidden >= n_blocks + 1."""
    rng = np.random.default_rng(seed)
    p = {
        "w1": (rng.standard_normal((cfg.hidden, cfg.n_in)) / np.sqrt(cfg.n_in)).astype(np.float32),
        "b1": np.zeros(cfg.hidden, np.float32),
        "w2": (rng.standard_normal((cfg.n_blocks + 1, cfg.hidden)) / np.sqrt(cfg.hidden)).astype(np.float32),
        "b2": np.zeros(cfg.n_blocks + 1, np.float32),
    }
    if in_order:
        k = cfg.n_blocks + 1
        if cfg.hidden < k:
            raise ValueError(f"a router that starts in order needs hidden >= {k} (n_blocks + 1), got {cfg.hidden}")
        p["w1"] *= 0.1  # the state: small, so that the start is in order for every token
        p["w1"][:k, cfg.width :] += in_order * np.eye(k, dtype=np.float32)  # onehot(prev) -> unit prev + 1
        p["w2"] = np.eye(cfg.n_blocks + 1, cfg.hidden, dtype=np.float32)  # unit k -> move k
    return p


def features_forward(x, prev, n_blocks: int):
    """[N, E] states and [N] previous blocks (-1 = START) -> router inputs [N, E + n_blocks + 1], in x's dtype,
    and the normalisation's cache (a co-trained router's gradient flows back into the states)."""
    xn, c_ln = bp.layernorm_forward(x, 1.0, 0.0)
    onehot = np.zeros((len(prev), n_blocks + 1), x.dtype)
    onehot[np.arange(len(prev)), np.asarray(prev) + 1] = 1.0
    return np.concatenate([xn, onehot], axis=1), c_ln


def features_backward(dz, c_ln):
    """-> d states [N, E]; the onehot part has no gradient."""
    dx, _, _ = bp.layernorm_backward(dz[:, : c_ln[0].shape[1]], c_ln)
    return dx


def features(x, prev, n_blocks: int):
    """The router's inputs in float64, the reference the fused kernel is tested against."""
    return features_forward(np.asarray(x, np.float64), prev, n_blocks)[0]


def allowed_moves(prev, depth, cfg: RouterConfig):
    """[N, n_blocks + 1] bool: forward-only routers may go to a later block or EXIT; at max depth only EXIT."""
    prev, depth = np.asarray(prev), np.asarray(depth)
    cols = np.arange(cfg.n_blocks + 1)
    ok = cols[None, :] > prev[:, None] if cfg.forward_only else np.ones((len(prev), cfg.n_blocks + 1), bool)
    ok[:, cfg.exit] = True
    ok[depth >= cfg.depth_limit] = cols == cfg.exit
    return ok


def forward(params, z, allowed):
    """Masked logits [N, n_blocks + 1] and the caches for `backward`."""
    h, c1 = bp.linear_forward(z, params["w1"], params["b1"])
    a, c2 = bp.relu_forward(h)
    logits, c3 = bp.linear_forward(a, params["w2"], params["b2"])
    return np.where(allowed, logits, NEG), (c1, c2, c3, allowed)


def backward(dlogits, caches):
    """-> d inputs [N, n_in] and the gradients for w1, b1, w2, b2. Forbidden logits are constants."""
    c1, c2, c3, allowed = caches
    da, dw2, db2 = bp.linear_backward(dlogits * allowed, c3)
    dh = bp.relu_backward(da, c2)
    dz, dw1, db1 = bp.linear_backward(dh, c1)
    return dz, {"w1": dw1, "b1": db1, "w2": dw2, "b2": db2}


def loss_and_grads(params, z, allowed, labels):
    """Softmax cross-entropy against the oracle's choices, and gradients for w1, b1, w2, b2."""
    logits, caches = forward(params, z, allowed)
    loss, c_ce = bp.crossentropy_forward(logits, labels)
    _, grads = backward(bp.crossentropy_backward(c_ce), caches)
    return float(loss), grads


@njit(fastmath=True, cache=True)
def _decide(x, prev, depth, w1, b1, w2, b2, forward_only, depth_limit, out, prob):  # [N, E], [N], [N] -> [N], [N]
    """`features`, `allowed_moves`, `forward`, argmax and the softmax probability of the chosen move, one row at a
    time, in float32 (statistics in float64), with no temporaries: the onehot of prev is one column of W1 added
    instead of a product. Ties go to the first block, as argmax. Serial: a decision is ~E * hidden multiply-adds,
    less than waking a thread pool."""
    n_rows, E = x.shape
    hidden, n_moves = w1.shape[0], w2.shape[0]
    exit_ = n_moves - 1
    xn = np.empty(E, np.float32)
    h = np.empty(hidden, np.float32)
    logits = np.empty(n_moves, np.float32)
    for i in range(n_rows):
        if depth[i] >= depth_limit:
            out[i], prob[i] = exit_, 1.0
            continue
        mean, rstd = mean_rstd(x[i], 1e-5)
        for k in range(E):
            xn[k] = (x[i, k] - mean) * rstd
        for j in range(hidden):  # relu(W1 [LN(x), onehot(prev)] + b1)
            acc = b1[j] + w1[j, E + prev[i] + 1]
            for k in range(E):
                acc += w1[j, k] * xn[k]
            h[j] = max(acc, np.float32(0.0))
        best, best_logit = exit_, -np.inf
        for m in range(n_moves):
            logits[m] = -np.inf
            if forward_only and m <= prev[i] and m != exit_:
                continue
            logit = b2[m]
            for j in range(hidden):
                logit += w2[m, j] * h[j]
            logits[m] = logit
            if logit > best_logit:  # strict: the first of equal logits wins
                best, best_logit = m, logit
        total = np.float32(0.0)  # softmax over the allowed moves, read at the chosen one: 1 / sum exp(l - max)
        for m in range(n_moves):
            if logits[m] > -np.inf:
                total += np.exp(logits[m] - best_logit)
        out[i], prob[i] = best, 1.0 / total


class Router:
    """A trained MLP router: `choose(x, prev, depth)` for a batch of tokens."""

    def __init__(self, cfg: RouterConfig, params: dict):
        self.config, self.params = cfg, params

    def logits(self, x, prev, depth):
        """The float64 path training uses: features, masked logits [N, n_blocks + 1]."""
        z = features(x, prev, self.config.n_blocks)
        return forward(self.params, z, allowed_moves(prev, depth, self.config))[0]

    def choose(self, x, prev, depth) -> np.ndarray:
        """Next block for each token ([N] ints, n_blocks = EXIT): `logits(...).argmax(-1)`, fused (`_decide`)."""
        return self.decide(x, prev, depth)[0]

    def decide(self, x, prev, depth):
        """The moves of `choose` and the router's softmax probability of each ([N] float32): a co-trained network
        scales the chosen block's branch by it (the gate, see radial_train.py); 1 when the depth limit forces EXIT."""
        p, cfg = self.params, self.config
        x = np.ascontiguousarray(x, dtype=np.float32)
        moves, prob = np.empty(len(x), np.int64), np.empty(len(x), np.float32)
        _decide(
            x,
            np.asarray(prev, np.int64),
            np.asarray(depth, np.int64),
            p["w1"],
            p["b1"],
            p["w2"],
            p["b2"],
            cfg.forward_only,
            cfg.depth_limit,
            moves,
            prob,
        )
        return moves, prob

    def save(self, path):
        """`path`.safetensors and `path`.json (its config)."""
        weights, config = _router_files(path)
        weights.parent.mkdir(parents=True, exist_ok=True)
        write_safetensors(weights, {k: v.astype(np.float32) for k, v in self.params.items()})
        write_json(config, asdict(self.config))

    @classmethod
    def load(cls, path):
        """From `path`.json and `path`.safetensors (`path` may name either file)."""
        weights, config = _router_files(path)
        if not present(config, CheckpointError):
            raise CheckpointError(f"{config}: not found (a router is a .json config beside its .safetensors)")
        d = read_json(config, CheckpointError, "a router config")
        try:
            cfg = RouterConfig(**d)
        except TypeError as e:
            raise CheckpointError(f"{config}: not a router config ({e})") from None
        _check_router_config(d, str(config))
        if not present(weights, CheckpointError):
            raise CheckpointError(f"{weights}: not found (a router is a .json config beside its .safetensors)")
        f = SafetensorsFile(weights)
        expected = router_shapes(cfg)  # from the config alone: nothing of its size is allocated before the check
        found = {n: f.shape(n) for n in f.entries}
        if found != expected:
            raise CheckpointError(f"{weights}: tensors {found} do not match {config.name}, expected {expected}")
        params = {n: f.read(n) for n in f.entries}
        for n, a in params.items():
            if a.dtype.kind != "f" or not np.isfinite(a).all():
                raise CheckpointError(f"{weights}: tensor {n!r} is not all finite floats ({a.dtype})")
        bound = logit_bound(params, cfg.width)
        if not bound < _FLOAT32_SAFE:
            raise CheckpointError(
                f"{weights}: weights so large that the router's logits could reach {bound:.3g}, beyond what "
                f"float32 holds ({_FLOAT32_SAFE:.0e})"
            )
        return cls(cfg, params)


def router_shapes(cfg: RouterConfig) -> dict:
    """The shape of each of a router's tensors: `init_router`'s, without allocating them."""
    return {
        "w1": (cfg.hidden, cfg.n_in),
        "b1": (cfg.hidden,),
        "w2": (cfg.n_blocks + 1, cfg.hidden),
        "b2": (cfg.n_blocks + 1,),
    }


_FLOAT32_SAFE = 1e37  # logits below this: their differences, sums and exponentials stay finite in float32


def logit_bound(params: dict, width: int) -> float:
    """The largest |logit| (or partial sum) `_decide` can reach, in float64: LN(x) has |x_k| <= sqrt(width), so
    |h_j| <= |b1_j| + max |onehot weights| + sqrt(width) sum_k |w1_jk| and |logit_m| <= |b2_m| + sum_j |w2_mj| h_j."""
    w1 = np.abs(params["w1"])
    h = np.abs(params["b1"]) + w1[:, width:].max(1) + np.sqrt(width) * w1[:, :width].sum(1, dtype=np.float64)
    return float((np.abs(params["b2"]) + np.abs(params["w2"]) @ h).max())


MAX_PASSES = 4  # a router may run at most 4 * n_blocks blocks per token (forward_only routers: n_blocks)


def _check_router_config(d: dict, source: str) -> None:
    """Every field of a router's .json typed and in range, before any weight is read. max_depth is bounded by the
    model (MAX_PASSES passes over its blocks), so a router that never chooses EXIT cannot loop without end."""
    limits = {
        "width": (int, 1, 1 << 16),
        "n_blocks": (int, 1, 4096),
        "hidden": (int, 1, 1 << 16),
        "forward_only": (bool,),
    }
    for name, spec in limits.items():
        if name in d:
            check_field(source, name, d[name], *spec)
    if d.get("max_depth") is not None:
        check_field(source, "max_depth", d["max_depth"], int, 1, MAX_PASSES * d["n_blocks"])  # 0: no block runs
    if d.get("tau") is not None:
        check_field(source, "tau", d["tau"], float)
    for name in ("kv_rule", "model"):
        if d.get(name) is not None:
            check_field(source, name, d[name], str)


def _router_files(path):
    """The two files of a router: the given path without a .safetensors/.json ending, plus each ending (names
    like router-tau0.2 have a dot that is not an ending)."""
    path = Path(path)
    if path.suffix in (".safetensors", ".json"):
        path = path.with_suffix("")
    return path.with_name(path.name + ".safetensors"), path.with_name(path.name + ".json")


# -------------------------------------------------------------------------------------------- distillation


class RouterDecisions(Decisions):
    """A forward-only router as the `Decisions` of `oracle.run_sequence`: at block b, the tokens
    whose chosen next block is b run it, then choose again from their new state."""

    def __init__(self, router, max_depth: int | None = None):
        if not router.config.forward_only:
            raise ValueError("RouterDecisions evaluates block by block, in order: it needs a forward-only router")
        self.router = router
        self.max_depth = router.config.depth_limit if max_depth is None else max_depth
        self.next = self.depth = None

    def __call__(self, b, rows, ratios):
        return self.next[rows] == b

    def after(self, b, x, ran):
        """b = -1: the embeddings, every token chooses its first block; else the tokens that ran block b."""
        if b < 0:
            self.next, self.depth = np.zeros(len(x), np.int64), np.zeros(len(x), np.int64)
            rows = np.arange(len(x))
        else:
            rows = np.flatnonzero(ran)
            self.depth[rows] += 1
        if len(rows):
            choice = self.router.choose(x[rows], np.full(len(rows), b), self.depth[rows])
            self.next[rows] = np.where(self.depth[rows] >= self.max_depth, self.router.config.exit, choice)


class _Recorder(Decisions):
    """Wraps an oracle decision rule to keep every state it passes: states[b + 1] is the state after block b."""

    def __init__(self, decide):
        self.decide, self.states = decide, []

    def __call__(self, b, rows, r):
        return self.decide(b, rows, r)

    def after(self, b, x, ran):
        self.states.append(x.astype(np.float32))


def oracle_examples(model, sequences, tau: float, kv_rule: str = "drop", kind: str = "output", progress=None) -> dict:
    """The oracle's routes as router training examples: at the start and after each block a token runs, the
    state it has then, the block it came from, its depth so far, and the oracle's next block (or EXIT)."""
    if getattr(model, "layer_major", False):  # weights streamed block by block: the same examples, loops swapped
        return _streamed_examples(model, sequences, tau, kv_rule, kind)
    out = {"x": [], "prev": [], "depth": [], "label": [], "token": []}
    base = 0
    for ids in sequences if progress is None else progress(sequences):
        rec = _Recorder(threshold(tau))
        _, keep, _ = run_sequence(model, ids, rec, kv_rule, kind)
        states = np.stack(rec.states)  # [n + 1, T, E]
        t_idx, b_idx, prev, depth, label = routes_from_keep(keep)
        out["x"].append(states[b_idx, t_idx])
        out["prev"].append(prev)
        out["depth"].append(depth)
        out["label"].append(label)
        out["token"].append(base + t_idx)
        base += len(ids)
    return {k: np.concatenate(v) for k, v in out.items()}


def routes_from_keep(keep):
    """One sequence's decisions keep [T, n] as examples: (token, column, prev, depth, label) for the start (column
    0) and after each kept block b (column b + 1), in token order; label is the next kept block or EXIT (= n)."""
    T, n = keep.shape
    nxt = np.full((T, n + 1), n)  # nxt[t, b + 1]: first kept block after b (n = EXIT); column 0 is START
    for b in range(n - 1, -1, -1):
        nxt[:, b] = np.where(keep[:, b], b, nxt[:, b + 1])
    t_idx, b_idx = np.nonzero(np.concatenate([np.ones((T, 1), bool), keep], axis=1))  # START, then kept blocks
    depth = np.cumsum(np.concatenate([np.zeros((T, 1), int), keep], axis=1), axis=1)[t_idx, b_idx]
    return t_idx, b_idx, b_idx - 1, depth, nxt[t_idx, b_idx]  # prev = b_idx - 1: -1 is START


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
    out = {"prev": [], "depth": [], "label": [], "token": []}
    for s in range(n_seq):
        t_idx, b_idx, prev, depth, label = routes_from_keep(keep[s])
        out["prev"].append(prev)
        out["depth"].append(depth)
        out["label"].append(label)
        out["token"].append(s * T + t_idx)
    ex = {k: np.concatenate(v) for k, v in out.items()}
    mask = np.concatenate([np.ones((n_seq, T, 1), bool), keep], axis=2)  # [n_seq, T, n + 1]: START, kept blocks
    _, _, c_idx = np.nonzero(mask)  # the order of the in-memory examples: sequence, token, column
    x = np.empty((len(c_idx), model.config.hidden_size), np.float32)
    for c in range(n + 1):
        x[c_idx == c] = job.column(c)
    ex["x"] = x
    return {k: ex[k] for k in ("x", "prev", "depth", "label", "token")}


def accuracy(router: "Router", ex: dict) -> dict:
    """Share of the oracle's decisions the router repeats, and of tokens whose every decision it repeats."""
    pred = np.concatenate(
        [
            router.choose(ex["x"][i : i + 4096], ex["prev"][i : i + 4096], ex["depth"][i : i + 4096])
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
    allowed_all = allowed_moves(ex["prev"], ex["depth"], cfg)
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
                acc = (forward(params, z_all[idx], allowed_all[idx])[0].argmax(-1) == labels[idx]).mean()
                bar.set_postfix(loss=f"{loss:.4f}", acc=f"{acc:.3f}")
            bar.update(1)
    bar.close()
    return Router(cfg, params)


# -------------------------------------------------------------------------------------------- evaluation


def evaluate(model, router: Router, sequences, kind: str = "output", train_examples=None, bar=None) -> dict:
    """A distilled router judged on held-out `sequences` against the oracle of the tau and rule it records:
    accuracy on the oracle's states (and on `train_examples`, its labels, if given), agreement on its own states,
    and perplexity against blocks per token for the sequential model, the oracle at tau and at thresholds around
    the router's depth, the router and the static baselines that bracket that depth; then every one of them at
    the router's depth. `bar` (a `progress.Passes`) counts each pass under its name."""
    tau, kv_rule, n = router.config.tau, router.config.kv_rule, len(model.blocks)

    def track(label):
        return None if bar is None else lambda items: bar.track(items, label)

    test_ex = oracle_examples(model, sequences, tau, kv_rule, kind, track("held-out labels"))
    sequential = oracle.simulate(
        model, sequences, threshold(0.0, "sequential on test"), "fill", kind, track("sequential on test")
    )
    decisions = RouterDecisions(router)
    decisions.label = "router on test"
    routed = oracle.simulate(model, sequences, decisions, kv_rule, kind, track("router on test"))
    depth = float(routed.depth.mean())
    oracles = oracle.around_depth(model, sequences, tau, kv_rule, kind, depth, sequential, bar)
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
