"""The router of a Radial Network (paper, Sec. 5): a small MLP that looks at a token's hidden state and where it is
in its route, and picks the next block to run, or EXIT.

    z      = [LN(x), onehot(prev)]        LN without parameters; prev is START or the block just run
    h      = relu(W1 z + b1)
    logits = W2 h + b2                    one per block, plus EXIT (the last)
    next   = argmax over the allowed moves (a softmax over them for training)

A forward-only router may only move to a later block or EXIT; the mask is applied to the logits in training and
in use. Two more rules of a router's config shape its moves, for real models (docs/real-model.md):
- `mandatory`: blocks no move may pass over (skipping restricted to attention blocks, to FFN blocks, or both: the
  others are mandatory). The mask forbids every move beyond the next mandatory block, so the argmax is taken over
  the moves that remain, in the kernel as in training.
- `sink`, `sink_norm`: the attention sink (Xiao et al., 2023). The first `sink` positions of a sequence, and any
  token whose state is longer than `sink_norm` (a massive activation), run every block: their move is always the
  next block, with probability 1 (a constant in training: no gradient). A Llama-family model parks attention on
  its first token; a token that skips its blocks takes that sink away from every later token.
Generation asks `decide` (one fused Numba kernel, no temporaries); training asks `probabilities` with a tape and
gets the gradient of the states back from `backward` (ops.py's pairs, no autograd). How the router
learns is radial.py's and train.py's business: distilled from the oracle's choices (analysis/distill.py), or
trained with the blocks (the gate y = x + p f(x)).

`InOrder` and `Scripted` follow a rule instead of an MLP: the first runs every block in order (the sequential
model is the Radial Network with this router), the second replays given routes (tests, benchmarks).
"""

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from numba import njit

from . import ops
from .config import check_field
from .errors import CheckpointError
from .io.checkpoint import SafetensorsFile, write_safetensors
from .io.outputs import present, read_json, write_json
from .kernels import mean_rstd

NEG = -1e9  # logit of a forbidden move: exp underflows to exactly 0, without the NaN that -inf - (-inf) gives
MAX_PASSES = 4  # a router may run at most 4 * n_blocks blocks per token (forward-only routers: n_blocks)


@dataclass
class RouterConfig:
    width: int  # hidden size E of the model it routes
    n_blocks: int
    hidden: int = 64
    forward_only: bool = True
    max_depth: int | None = None  # the most blocks a token may run; None: n_blocks
    tau: float | None = None  # oracle threshold it was distilled from (for the record)
    kv_rule: str | None = None
    model: str | None = None
    mandatory: list | None = None  # blocks a move may not pass over (skippable_blocks); None: any may be skipped
    sink: int = 0  # the first `sink` positions of a sequence run every block
    sink_norm: float = 0.0  # tokens whose state norm exceeds this run every block; 0: off
    kind: str = "mlp"  # "mlp": Router; "expert-choice": ExpertChoice (Mixture-of-Depths / -Recursions)
    capacity: float | None = None  # expert choice: the share of candidate tokens each decision keeps in training

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

    @property
    def n_scores(self) -> int:
        """Expert choice: one score per block in order (forward-only), else one per pass after the first."""
        return self.n_blocks if self.forward_only else -(-self.depth_limit // self.n_blocks) - 1

    def reach(self) -> np.ndarray:
        """[n_blocks + 1]: reach[prev + 1] is the furthest move allowed after block prev (-1 = START): the first
        mandatory block after it, or EXIT (= n_blocks) when none is left."""
        out, nxt = np.empty(self.n_blocks + 1, np.int64), self.exit
        fixed = set(self.mandatory or ())
        for p in range(self.n_blocks - 1, -2, -1):  # p = prev, from the last block back to START
            out[p + 1] = nxt
            if p in fixed:
                nxt = p
        return out


SKIPPABLE = ("both", "attention", "ffn")  # which blocks a router may skip: train-router --skippable


def mandatory_blocks(blocks, skippable: str) -> list | None:
    """The blocks a router that may skip only `skippable` ones must run: the FFN blocks for "attention", the
    attention blocks for "ffn"; None for "both"."""
    if skippable not in SKIPPABLE:
        raise ValueError(f"skippable must be one of {', '.join(SKIPPABLE)}, got {skippable!r}")
    if skippable == "both":
        return None
    keep = "ffn" if skippable == "attention" else "att"
    return [i for i, b in enumerate(blocks) if b.kind == keep]


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


# ------------------------------------------------------------------------------------ the MLP, forward/backward


def features_forward(x, prev, n_blocks: int):
    """[n, E] states and [n] previous blocks (-1 = START) -> router inputs [n, E + n_blocks + 1] in x's dtype, and
    the normalisation's cache (a co-trained router's gradient flows back into the states)."""
    xn, c_ln = ops.layernorm_forward(x, None, None, 1e-5)
    onehot = np.zeros((len(prev), n_blocks + 1), x.dtype)
    onehot[np.arange(len(prev)), np.asarray(prev) + 1] = 1.0
    return np.concatenate([xn, onehot], axis=1), c_ln


def features_backward(dz, c_ln):
    """-> d states [n, E]; the onehot part has no gradient."""
    return ops.layernorm_backward(dz[:, : c_ln[0].shape[1]], None, c_ln)[0]


def features(x, prev, n_blocks: int):
    """The router's inputs in float64, the reference the fused kernel is tested against."""
    return features_forward(np.asarray(x, np.float64), prev, n_blocks)[0]


def allowed_moves(prev, step, cfg: RouterConfig):
    """[n, n_blocks + 1] bool: forward-only routers may go to a later block or EXIT, passing over no mandatory
    block; at the depth limit only EXIT."""
    prev, step = np.asarray(prev), np.asarray(step)
    cols = np.arange(cfg.n_blocks + 1)
    ok = cols[None, :] > prev[:, None] if cfg.forward_only else np.ones((len(prev), cfg.n_blocks + 1), bool)
    ok[:, cfg.exit] = True
    ok &= cols[None, :] <= cfg.reach()[prev + 1][:, None]
    ok[step >= cfg.depth_limit] = cols == cfg.exit
    return ok


def mlp_forward(params, z, allowed):
    """Masked logits [n, n_blocks + 1] of router inputs z, and the cache for `mlp_backward`."""
    h = ops.linear_forward(z, params["w1"], params["b1"])
    a, c_relu = ops.activation_forward("relu", h)
    logits = ops.linear_forward(a, params["w2"], params["b2"])
    return np.where(allowed, logits, NEG), (z, a, c_relu, allowed)


def mlp_backward(dlogits, params, cache):
    """-> d inputs [n, n_in] and the gradients of w1, b1, w2, b2. Forbidden logits are constants."""
    z, a, c_relu, allowed = cache
    da, dw2, db2 = ops.linear_backward(dlogits * allowed, a, params["w2"])
    dz, dw1, db1 = ops.linear_backward(ops.activation_backward("relu", da, c_relu), z, params["w1"])
    return dz, {"w1": dw1, "b1": db1, "w2": dw2, "b2": db2}


def softmax(logits):
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


@njit(fastmath=True, cache=True)
def _decide(x, prev, step, w1, b1, w2, b2, forward_only, reach, depth_limit, out, prob):  # [n, E] -> [n], [n]
    """`features`, `allowed_moves` (reach: RouterConfig.reach), `mlp_forward`, argmax and the softmax probability of
    the chosen move, one row at a time, in float32 (statistics in float64), with no temporaries: the onehot of prev
    is one column of W1 added instead of a product. Ties go to the first block, as argmax. Serial: a decision is
    ~E * hidden multiply-adds, less than waking a thread pool."""
    n_rows, E = x.shape
    hidden, n_moves = w1.shape[0], w2.shape[0]
    exit_ = n_moves - 1
    xn = np.empty(E, np.float32)
    h = np.empty(hidden, np.float32)
    logits = np.empty(n_moves, np.float32)
    for i in range(n_rows):
        if step[i] >= depth_limit:
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
            if forward_only and m <= prev[i] and m != exit_ or m > reach[prev[i] + 1]:
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


# --------------------------------------------------------------------------------------------------- routers


class Router:
    """A trained MLP router. `decide` for generation, `probabilities` + `backward` for training."""

    def __init__(self, cfg: RouterConfig, params: dict):
        self.config, self.params, self.grad = cfg, params, {}
        self.reach = cfg.reach()

    def decide(self, x, prev, step, pos=None):
        """Next block for each row ([n] ints, n_blocks = EXIT) and the router's softmax probability of it ([n]
        float32: a network trained with its router scales the chosen block's branch by it); 1 at the depth limit
        and for sink rows (`sinks`: rows at positions `pos` [n] below config.sink, or with long states)."""
        p, cfg = self.params, self.config
        x = np.ascontiguousarray(x, dtype=np.float32)
        moves, prob = np.empty(len(x), np.int64), np.empty(len(x), np.float32)
        prev, step = np.asarray(prev, np.int64), np.asarray(step, np.int64)
        _decide(
            x, prev, step, p["w1"], p["b1"], p["w2"], p["b2"], cfg.forward_only, self.reach, cfg.depth_limit,
            moves, prob,
        )  # fmt: skip
        if not (cfg.sink or cfg.sink_norm):  # no sink rule: nothing to override (a decode step's ~1 us of NumPy)
            return moves, prob
        sink = self.sinks(x, step, pos)
        if sink.any():
            moves[sink], prob[sink] = prev[sink] + 1, 1.0
        return moves, prob

    def choose(self, x, prev, step, pos=None) -> np.ndarray:
        return self.decide(x, prev, step, pos)[0]

    def sinks(self, x, step, pos=None) -> np.ndarray:
        """[n] bool: the rows that run every block (module doc): positions below config.sink (when `pos` is known)
        and states longer than config.sink_norm (when set), below the depth limit."""
        cfg = self.config
        sink = np.zeros(len(x), bool)
        if cfg.sink and pos is not None:
            sink |= np.broadcast_to(np.asarray(pos) < cfg.sink, sink.shape)
        if cfg.sink_norm:
            sink |= np.einsum("ij,ij->i", x, x, dtype=np.float64) > cfg.sink_norm**2
        return sink & (np.asarray(step) < cfg.depth_limit)

    def logits(self, x, prev, step):
        """The float64 reference `decide` is tested against: masked logits [n, n_blocks + 1]."""
        z = features(x, prev, self.config.n_blocks)
        return mlp_forward(self.params, z, allowed_moves(prev, step, self.config))[0]

    def probabilities(self, x, prev, step, tape, pos=None):
        """Training: the softmax over the allowed moves [n, n_blocks + 1] (forbidden moves 0), in x's dtype; a sink
        row's is 1 on the next block (a constant: softmax's backward of a one-hot row is zero). The tape keeps
        what `backward` needs."""
        z, c_feat = features_forward(x, prev, self.config.n_blocks)
        logits, c_mlp = mlp_forward(self.params, z, allowed_moves(prev, step, self.config))
        probs = softmax(logits)
        sink = self.sinks(x, step, pos)
        if sink.any():
            probs[sink] = 0.0
            probs[sink, np.asarray(prev)[sink] + 1] = 1.0
        tape.append((c_feat, c_mlp, probs))
        return probs

    def backward(self, dprobs, tape):
        """The gradient of the loss with respect to a call's probabilities [n, n_blocks + 1] -> d states [n, E];
        the parameters' gradients are added into `grad`."""
        c_feat, c_mlp, probs = tape.pop()
        dlogits = probs * (dprobs - (dprobs * probs).sum(-1, keepdims=True))  # softmax backward
        dz, grads = mlp_backward(dlogits, self.params, c_mlp)
        for name, g in grads.items():
            self.grad[name] += g
        return features_backward(dz, c_feat)

    def save(self, path):
        """`path`.safetensors and `path`.json (its config)."""
        weights, config = router_files(path)
        weights.parent.mkdir(parents=True, exist_ok=True)
        write_safetensors(weights, {k: v.astype(np.float32) for k, v in self.params.items()})
        write_json(config, asdict(self.config))

    @classmethod
    def load(cls, path):
        """From `path`.json and `path`.safetensors (`path` may name either file)."""
        weights, config = router_files(path)
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
        return (ExpertChoice if cfg.kind == "expert-choice" else Router)(cfg, params)


def router_shapes(cfg: RouterConfig) -> dict:
    """The shape of each of a router's tensors: `init_router`'s, without allocating them."""
    if cfg.kind == "expert-choice":
        return {"w": (cfg.n_scores, cfg.width), "b": (cfg.n_scores,)}
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
    if "w" in params:  # expert choice: |score| <= |b| + sqrt(width) sum |w|
        return float((np.abs(params["b"].astype(np.float64)) + np.sqrt(width) * np.abs(params["w"]).sum(1)).max())
    w1 = np.abs(params["w1"].astype(np.float64))
    h = np.abs(params["b1"].astype(np.float64)) + w1[:, width:].max(1) + np.sqrt(width) * w1[:, :width].sum(1)
    return float((np.abs(params["b2"]) + np.abs(params["w2"]) @ h).max())


class ExpertChoice:
    """Expert-choice routing (Mixture-of-Depths, Raposo et al. 2024; Mixture-of-Recursions, Bae et al. 2025): a score
    per token and decision, s = w_m . LN(x) + b_m, and the block runs on the tokens it picks, its branch scaled by
    sigmoid(s). In training each decision keeps the top `capacity` share of its candidates, per sequence (the
    non-causal choice both papers train with) and a binary cross-entropy teaches sigmoid(s) to predict that choice
    (their auxiliary loss, weight `aux_weight`); generation, which cannot see later tokens, runs a block where
    s > 0 (`decide`). The first token of a sequence (the attention sink) runs every block, its gate 1.

    Forward-only (Mixture-of-Depths): decision m picks the tokens that run block m; the others skip it and are
    candidates again for the next block. Otherwise (Mixture-of-Recursions): the tokens run the blocks in order, pass
    after pass (the network's blocks shared, up to max_depth), and decision m, before pass m + 2, picks which
    tokens go on; the others exit. The gate scales the pass's first block. Recursion trains with the per-step cache
    (each pass reads the keys of its own pass: MoR's recursion-wise caching), the one its pass-by-pass walk is exact
    for (radial._Walk.run_expert_choice)."""

    def __init__(self, cfg: RouterConfig, params: dict, aux_weight: float = 0.0):
        self.config, self.params, self.grad, self.aux_weight = cfg, params, {}, aux_weight

    @classmethod
    def new(cls, cfg: RouterConfig, seed: int = 0, aux_weight: float = 0.0):
        """Small random weights and a bias of 1: every block (pass) runs at first, gate 0.73."""
        rng = np.random.default_rng(seed)
        w = (0.1 * rng.standard_normal((cfg.n_scores, cfg.width)) / np.sqrt(cfg.width)).astype(np.float32)
        return cls(cfg, {"w": w, "b": np.ones(cfg.n_scores, np.float32)}, aux_weight)

    def block_at(self, p: int) -> int:
        """The block a token runs at its step p (forward-only: the block p it may run or skip)."""
        return p % self.config.n_blocks

    def decision_at(self, p: int) -> int | None:
        """The decision taken before step p (the score row), or None: forward-only every step, else pass starts."""
        n = self.config.n_blocks
        if self.config.forward_only:
            return p
        return p // n - 1 if p % n == 0 and p > 0 else None

    def scores(self, x, m=None):
        """Scores [n, n_scores] (or decision m's [n]) in float64: the reference `decide` and `pick` use."""
        xn = ops.layernorm_forward(np.asarray(x, np.float64), None, None, 1e-5)[0]
        w, b = self.params["w"].astype(np.float64), self.params["b"].astype(np.float64)
        return xn @ w.T + b if m is None else xn @ w[m] + b[m]

    def decide(self, x, prev, step, pos=None):
        """Generation: each row's next block and its gate, by the rule s > 0 (module doc); [n] ints, [n] float32."""
        cfg, n = self.config, self.config.n_blocks
        prev, step = np.asarray(prev, np.int64), np.asarray(step, np.int64)
        sink = np.zeros(len(prev), bool) if pos is None else np.asarray(pos) == 0
        s = self.scores(x)  # [r, n_scores]
        moves, gate = np.full(len(prev), cfg.exit, np.int64), np.ones(len(prev), np.float32)
        for i in range(len(prev)):
            if step[i] >= cfg.depth_limit:
                continue
            if cfg.forward_only:
                later = np.arange(prev[i] + 1, n)
                run = later if sink[i] else later[s[i, later] > 0]
                if len(run):
                    moves[i] = run[0]
                    gate[i] = 1.0 if sink[i] else 1 / (1 + np.exp(-s[i, run[0]]))
            elif (m := self.decision_at(int(step[i]))) is None:
                moves[i] = step[i] % n  # inside a pass: the next block
            elif sink[i] or s[i, m] > 0:
                moves[i], gate[i] = 0, 1.0 if sink[i] else 1 / (1 + np.exp(-s[i, m]))
        return moves, gate

    def choose(self, x, prev, step, pos=None):
        return self.decide(x, prev, step, pos)[0]

    def pick(self, x, m: int, block: int, seq, pos, tape):
        """Training: decision m over candidate rows x [r, E] of sequences seq [r] at positions pos [r] -> which rows
        run (bool [r]), their gates as a [r, n_blocks + 1] matrix (column `block`; the walk's decisions are kept in
        that shape), and the auxiliary loss. The top ceil(capacity x candidates) of each sequence by score run,
        sinks besides."""
        xn, c_ln = ops.layernorm_forward(x, None, None, 1e-5)
        s = xn @ self.params["w"][m] + self.params["b"][m]  # [r]
        gate = 1 / (1 + np.exp(-s))
        sink = np.asarray(pos) == 0
        order = np.lexsort((-s, sink, seq))  # by sequence, sinks last, the best scores first
        seq_sorted = seq[order]
        first = np.searchsorted(seq_sorted, seq_sorted, side="left")  # where each row's sequence starts in order
        counts = np.bincount(seq, weights=(~sink).astype(np.float64), minlength=seq.max() + 1 if len(seq) else 0)
        keep = np.ceil(self.config.capacity * counts - 1e-9).astype(np.int64)  # per sequence
        chosen = np.zeros(len(s), bool)
        chosen[order] = np.arange(len(s)) - first < keep[seq_sorted]
        chosen |= sink
        target = chosen & ~sink
        free = ~sink
        bce = -np.where(target, np.log(gate + 1e-12), np.log(1 - gate + 1e-12))[free].mean() if free.any() else 0.0
        probs = np.zeros((len(s), self.config.n_blocks + 1), x.dtype)
        probs[:, block] = np.where(sink, 1.0, gate)
        tape.append((m, block, c_ln, xn, gate.astype(x.dtype), target, free))
        return chosen, probs, float(self.aux_weight * bce)

    def backward(self, dprobs, tape):
        """d loss / d the gates (column `block` of dprobs [r, n_blocks + 1]) plus the auxiliary loss's -> d states
        [r, E]; the parameters' gradients are added into `grad`."""
        m, block, c_ln, xn, gate, target, free = tape.pop()
        ds = dprobs[:, block] * gate * (1 - gate)  # sigmoid backward
        if free.any():
            ds = ds + self.aux_weight * (gate - target) / free.sum()  # BCE on the logit: sigmoid - target
        ds = np.where(free, ds, 0.0).astype(xn.dtype)  # a sink's gate is the constant 1
        self.grad.setdefault("w", np.zeros_like(self.params["w"]))[m] += ds @ xn
        self.grad.setdefault("b", np.zeros_like(self.params["b"]))[m] += ds.sum()
        return ops.layernorm_backward(np.outer(ds, self.params["w"][m]).astype(xn.dtype), None, c_ln)[0]

    def save(self, path):
        Router.save(self, path)


def capacity_for(target_depth: float, n_blocks: int, depth_limit: int, forward_only: bool) -> float:
    """The share of candidates each expert-choice decision keeps for tokens to run `target_depth` blocks on average:
    target / n_blocks (forward-only), else the q with n_blocks (1 + q + ... + q^(passes - 1)) = target."""
    if forward_only:
        return min(1.0, target_depth / n_blocks)
    passes = -(-depth_limit // n_blocks)
    lo, hi = 0.0, 1.0
    for _ in range(60):
        q = (lo + hi) / 2
        lo, hi = (q, hi) if n_blocks * sum(q**r for r in range(passes)) < target_depth else (lo, q)
    return lo


class InOrder:
    """Every block in order, then EXIT: the Radial Network with this router is the sequential model."""

    def __init__(self, n_blocks: int, max_depth: int | None = None):
        self.config = RouterConfig(width=0, n_blocks=n_blocks, max_depth=max_depth)

    def decide(self, x, prev, step, pos=None):
        nxt = np.asarray(prev) + 1
        return np.where(np.asarray(step) >= self.config.depth_limit, self.config.exit, nxt), None

    def choose(self, x, prev, step, pos=None):
        return self.decide(x, prev, step)[0]


class Scripted:
    """Replays given routes: `routes[p]` is the list of blocks of the token at position p (any order, repeats
    allowed), one sequence. Routes must fit the network's max_depth."""

    def __init__(self, routes: list, n_blocks: int):
        self.routes = [list(map(int, r)) for r in routes]
        forward = all(all(a < b for a, b in zip(r, r[1:])) for r in self.routes)  # every route moves forward only
        longest = max(map(len, self.routes), default=0)
        self.config = RouterConfig(width=0, n_blocks=n_blocks, forward_only=forward, max_depth=longest + 1)

    def decide(self, x, prev, step, pos=None):
        exit_ = self.config.exit
        route = [self.routes[p] for p in np.broadcast_to(np.asarray(pos), np.shape(step))]
        return np.array([r[s] if s < len(r) else exit_ for r, s in zip(route, np.asarray(step))], np.int64), None

    def choose(self, x, prev, step, pos=None):
        return self.decide(x, prev, step, pos)[0]


def _check_router_config(d: dict, source: str) -> None:
    """Every field of a router's .json typed and in range, before any weight is read. max_depth is bounded by the
    model (MAX_PASSES passes over its blocks), so a router that never chooses EXIT cannot loop without end."""
    if not isinstance(d, dict):
        raise CheckpointError(f"{source}: not a router config (expected a JSON object)")
    limits = {"width": (int, 1, 1 << 16), "n_blocks": (int, 1, 4096), "hidden": (int, 1, 1 << 16)}
    for name, spec in {**limits, "forward_only": (bool,)}.items():
        if name in d:
            check_field(source, name, d[name], *spec)
    for name in ("width", "n_blocks"):
        if name not in d:
            raise CheckpointError(f"{source}: field {name!r} is missing")
    if d.get("max_depth") is not None:
        check_field(source, "max_depth", d["max_depth"], int, 1, MAX_PASSES * d["n_blocks"])
    if d.get("tau") is not None:
        check_field(source, "tau", d["tau"], float)
    for name in ("kv_rule", "model"):
        if d.get(name) is not None:
            check_field(source, name, d[name], str)
    if "sink" in d:
        check_field(source, "sink", d["sink"], int, 0, 1 << 30)
    if "sink_norm" in d:
        check_field(source, "sink_norm", d["sink_norm"], float, 0.0, 1e30)
    fixed = d.get("mandatory")
    if fixed is not None:
        if not isinstance(fixed, list) or len(fixed) > d["n_blocks"] or not d.get("forward_only", True):
            raise CheckpointError(
                f"{source}: field 'mandatory' is {fixed!r:.40}, expected a list of at most n_blocks block indices "
                "(forward-only routers only)"
            )
        for i, b in enumerate(fixed):
            check_field(source, f"mandatory[{i}]", b, int, 0, d["n_blocks"] - 1)
    if d.get("kind", "mlp") not in ("mlp", "expert-choice"):
        raise CheckpointError(f"{source}: field 'kind' is {d['kind']!r:.40}, expected 'mlp' or 'expert-choice'")
    if d.get("capacity") is not None:
        check_field(source, "capacity", d["capacity"], float, 0.0, 1.0)


def router_files(path):
    """The two files of a router: the given path without a .safetensors/.json ending, plus each ending (names
    like router-tau0.2 have a dot that is not an ending)."""
    path = Path(path)
    if path.suffix in (".safetensors", ".json"):
        path = path.with_suffix("")
    return path.with_name(path.name + ".safetensors"), path.with_name(path.name + ".json")
