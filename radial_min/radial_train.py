"""Training a Radial Network from scratch: the router and the blocks learn together (the paper's second path).
Hand-written NumPy, each forward beside its backward, as in backprop.py; float64 for the gradient checks.

A token starts at its embedding. At each routing step the router looks at the token's state and the block it
just ran and picks one of the N blocks or EXIT (argmax), until EXIT or `max_depth` steps; blocks may be reused
unless `forward_only`. The tokens that picked a block run it together as one batch. Attention reads the unified
KV cache (cache.py) under the network's policy: global (every entry written so far, with step encodings),
per-layer (the entries of the same layer: the paper's per-block policy) or per-step (the entries of the same
routing step, Mixture-of-Recursions' recursion-wise caching). The LM head reads each token's final state.

Order of computation. A query may only read entries that exist, so the rounds (one batch of tokens taking one
step) follow a `schedule`, chosen by the policy, which gives the same result as the token-by-token inference
engine (radial.py), and is causal: no token's route depends on a later token.
- token: for t = 0..T-1, each step of token t of every sequence at once (a round per (t, step)). Works for any
  policy; the only order for global and for per-layer with reuse, where token t's first step reads every step
  of token t - 1. Each query reads its sequence's history of entries (`_History`).
- step:  a round per routing step over all tokens: per-step, where step s reads only entries of step s.
- block: a round per block, in order: forward-only per-layer, where block b is read only by block b, and every
  token that will ever run block b has chosen it by then. Step and block rounds read only entries made in the
  same round, so their attention is one dense causal attention per sequence with the absent rows masked.

The router learns through its discrete choice as in Mixture-of-Depths (Raposo et al., 2024) and the routers of
Mixture-of-Recursions (Bae et al., 2025): the chosen block's branch is scaled by the router's probability of
choosing it, y = x + p f(x), so the language-model loss reaches the router through p, exactly; argmax picks the
move, per token and causally, the same rule at training and at generation (RadialNetwork(gate=True)). The
compute term sets the budget over E, the mean over tokens of the expected number of blocks each goes on to
(the sum over its decisions of 1 - p_EXIT): loss += cost * E, and with `target_depth` K also
depth_weight * (E - K)^2, while `update_cost` moves `cost` between steps so that the mean depth settles at K:
a proportional and an integral controller. docs/cotraining.md says why this method.

Exploration. The gate gives a block the router did not choose no gradient, so from its in-order start a router
only ever learns about the blocks it already runs. With `explore` > 0, during training (an `rng` given), each
decision that picked a block swaps it, with that probability, for another allowed block drawn uniformly; the
swapped block runs with the gate of its own (small) probability, y = x + p f(x), so the LM loss says, through p,
whether that block would have helped. EXIT decisions are left alone, so exploring costs no extra blocks.
Evaluation and generation never explore.

Shapes: n = B * T tokens (rows), E width, N blocks, H heads of size D, r the rows of a round.
"""

import math
from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from . import backprop as bp
from . import kernels
from . import router as R
from .cache import POLICIES, step_encoding
from .config import OPTConfig
from .opt_backprop import block_weights, blocks_of, embed_backward, embed_forward, head_backward, head_forward
from .opt_backprop import store_block_grads

SCHEDULES = ("token", "step", "block")


@dataclass
class RadialTrainConfig:
    max_depth: int | None = None  # most blocks a token may run; None: n_blocks (one pass's worth)
    forward_only: bool = False  # True: blocks in increasing order, each at most once; False: any order, reuse
    cache_policy: str = "global"  # what an attention query reads in the unified cache: cache.POLICIES
    step_encoding_scale: float = 1.0  # global policy: this times the sinusoidal step code, added to q and k
    cost: float = 0.0  # loss per expected block run (the compute term); its starting value with target_depth
    target_depth: float | None = None  # blocks/token that update_cost steers the network to; None: cost is fixed
    cost_rate: float = 0.0002  # how fast the cost follows the target: per step, per block/token of error
    depth_weight: float = 0.05  # with a target: weight of (expected blocks - target)^2, the pull that answers at once
    router_hidden: int = 16
    in_order: float = 6.0  # the router's start: this logit margin for the next block in order (router.init_router)
    explore: float = 0.0  # training only: share of block decisions swapped for another allowed block

    def router_config(self, cfg: OPTConfig) -> R.RouterConfig:
        return R.RouterConfig(
            width=cfg.hidden_size,
            n_blocks=2 * cfg.num_hidden_layers,
            hidden=self.router_hidden,
            forward_only=self.forward_only,
            max_depth=self.max_depth,
        )

    @property
    def schedule(self) -> str:
        """The cheapest order of rounds that is exact for this policy (see the module doc)."""
        if self.cache_policy == "per-step":
            return "step"
        return "block" if self.cache_policy == "per-layer" and self.forward_only else "token"


def check_config(rcfg: RadialTrainConfig, cfg: OPTConfig) -> None:
    n = 2 * cfg.num_hidden_layers
    if rcfg.cache_policy not in POLICIES:
        raise ValueError(f"cache policy must be one of {POLICIES}, got {rcfg.cache_policy!r}")
    if rcfg.max_depth is not None and not 1 <= rcfg.max_depth <= R.MAX_PASSES * n:
        raise ValueError(f"max_depth must be in [1, {R.MAX_PASSES * n}] ({R.MAX_PASSES} passes over {n} blocks)")
    if rcfg.forward_only and rcfg.max_depth is not None and rcfg.max_depth > n:
        raise ValueError(f"a forward-only network runs at most its {n} blocks, but max_depth is {rcfg.max_depth}")


def compute_term(rcfg: RadialTrainConfig, expected: float) -> float:
    """The loss's compute term for a batch whose tokens expect to run `expected` blocks each: cost * expected,
    plus, with a target, depth_weight * (expected - target)^2: a pull toward the target that answers at once
    (the cost, which follows the target between steps, alone overshoots: see update_cost)."""
    term = rcfg.cost * expected
    if rcfg.target_depth is not None:
        term += rcfg.depth_weight * (expected - rcfg.target_depth) ** 2
    return term


def compute_slope(rcfg: RadialTrainConfig, expected: float) -> float:
    """d compute_term / d expected: the price of one more expected block in this batch."""
    slope = rcfg.cost
    if rcfg.target_depth is not None:
        slope += 2 * rcfg.depth_weight * (expected - rcfg.target_depth)
    return slope


def update_cost(rcfg: RadialTrainConfig, mean_depth: float) -> None:
    """Dual ascent on the constraint "mean blocks/token = target": the cost per block rises while tokens run more
    blocks than asked and falls while they run fewer, below 0 if need be (then each block earns a little, which
    is what lets tokens that exit too early learn to stay: EXIT itself gets no gradient from the LM loss). In
    place; the trainer saves it with the state, so resumes are exact."""
    if rcfg.target_depth is not None:
        rcfg.cost += rcfg.cost_rate * (mean_depth - rcfg.target_depth)


# ------------------------------------------------------------------------------------------------ decision


def decide_forward(x, prev, depth, params, rc: R.RouterConfig):
    """The router on states x [r, E] after block `prev` [r] (-1 = START) at step `depth` [r]: move probabilities
    [r, N + 1] (forbidden moves 0), argmax moves [r], cache."""
    z, c_feat = R.features_forward(x, prev, rc.n_blocks)  # [r, E + N + 1]
    logits, c_mlp = R.forward(params, z, R.allowed_moves(prev, depth, rc))
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return probs, probs.argmax(-1), (c_feat, c_mlp, probs)


def explore(moves, probs, share: float, rng):
    """Moves [r] with each block move, with probability `share`, swapped for another allowed block (probability
    > 0, not EXIT), drawn uniformly; EXIT moves, and blocks with no other allowed block, stay."""
    N = probs.shape[1] - 1  # the last column is EXIT
    others = probs[:, :N] > 0
    others[np.arange(len(moves)), np.minimum(moves, N - 1)] &= moves == N  # not the block already chosen
    swap = (moves != N) & (rng.random(len(moves)) < share) & others.any(1)
    pick = rng.random(len(moves))  # a uniform draw among each row's other blocks, by inverse CDF
    counts = others.sum(1)
    nth = np.minimum((pick * counts).astype(np.int64), np.maximum(counts - 1, 0))
    chosen = np.argmax(np.cumsum(others, 1) > nth[:, None], 1)
    return np.where(swap, chosen, moves)


def decide_backward(dprobs, cache, params):
    """Gradient of the loss with respect to a decision's probabilities [r, N + 1] -> dx [r, E], router grads."""
    c_feat, c_mlp, probs = cache
    dlogits = probs * (dprobs - (dprobs * probs).sum(-1, keepdims=True))  # softmax backward
    dz, grads = R.backward(dlogits, c_mlp)
    return R.features_backward(dz, c_feat), grads


# ------------------------------------------------------------------------------- attention in the unified cache


def dense_attention_forward(q, k, v, seq, pos, B, T, n_head):
    """Attention among the rows of one round, [r, E] each at (sequence, position): scattered into [B, T, E], one
    causal attention per sequence in which a query sees the rows of its sequence at earlier or equal positions
    that are in the round, gathered back to [r, E]."""
    present = np.zeros((B, T), bool)
    present[seq, pos] = True
    dense = []
    for a in (q, k, v):
        d = np.zeros((B, T, a.shape[1]), a.dtype)
        d[seq, pos] = a
        dense.append(bp.split_heads(d, n_head))  # [B, H, T, D]
    visible = (np.tri(T, dtype=bool) & present[:, None, :]) | np.eye(T, dtype=bool)  # absent rows see themselves
    y, cache = bp.masked_attention_forward(*dense, visible[:, None])
    return bp.merge_heads(y)[seq, pos], (cache, seq, pos, n_head)


def dense_attention_backward(da, cache):
    """-> dq, dk, dv [r, E]."""
    att_cache, seq, pos, n_head = cache
    B, T = att_cache[3].shape[0], att_cache[3].shape[2]
    dy = np.zeros((B, T, da.shape[1]), da.dtype)
    dy[seq, pos] = da
    grads = bp.masked_attention_backward(bp.split_heads(dy, n_head), att_cache)
    return tuple(bp.merge_heads(g)[seq, pos] for g in grads)


class _History:
    """The unified cache during a token-major pass: per sequence, every entry written so far in order, keys and
    values head-major [B, H, capacity, D] with their layer and step, and the gradients flowing back into them.
    The kernels also keep keys and values transposed, [B, H, D, capacity], so that every loop they run is one
    that vectorizes in a fixed order (the same bits on every run, see kernels.TRAINING_FASTMATH).

    Each round appends at most one entry per sequence and its queries (one per sequence) read their sequence's
    entries in place. `fast`: the Numba kernels below; else NumPy over gathered copies (the reference)."""

    def __init__(self, B, capacity, E, n_head, dtype, fast=True):
        self.n_head, D = n_head, E // n_head
        self.k = np.zeros((B, n_head, capacity, D), dtype)  # zeros: entries not yet written are finite
        self.v = np.zeros_like(self.k)
        self.kt, self.vt = (np.zeros((B, n_head, D, capacity), dtype) for _ in "kv") if fast else (None, None)
        self.layer = np.full((B, capacity), -1)
        self.step = np.full((B, capacity), -1)
        self.count = np.zeros(B, np.int64)
        self.dk = self.dv = None
        self.fast = fast

    def attend_forward(self, q, k, v, seq, layer, step, policy):
        """Append the round's entries [r, E] (rows of distinct sequences), then each query [r, E] reads the
        entries of its sequence that its policy shows -> [r, E]."""
        at = self.count[seq].copy()  # where each row's entry goes
        kh, vh = (a.reshape(len(a), self.n_head, -1) for a in (k, v))  # [r, H, D]
        self.k[seq, :, at], self.v[seq, :, at] = kh, vh
        self.layer[seq, at], self.step[seq, at] = layer, step
        self.count[seq] += 1
        qh = np.ascontiguousarray(q.reshape(len(q), self.n_head, -1))  # [r, H, D]
        code = POLICIES.index(policy)
        if self.fast:
            self.kt[seq, :, :, at], self.vt[seq, :, :, at] = kh, vh
            y, lse = np.empty_like(qh), np.empty(qh.shape[:2], qh.dtype)
            kernel = kernels._sized(_history_forward, _history_forward_serial, 2 * qh.size * int(at.max() + 1))
            kernel(qh, self.kt, self.v, self.layer, self.step, seq, at + 1, layer, step, code, y, lse)
            return y.reshape(len(q), -1), (qh, seq, at, layer, step, code, y, lse)
        n = int(at.max()) + 1
        visible = np.arange(n)[None, :] <= at[:, None]  # [r, n]: written so far
        if policy == "per-layer":
            visible &= self.layer[seq, :n] == layer[:, None]
        elif policy == "per-step":
            visible &= self.step[seq, :n] == step[:, None]
        y, cache = bp.masked_attention_forward(
            qh[:, :, None], self.k[seq, :, :n], self.v[seq, :, :n], visible[:, None, None]
        )
        return y.reshape(len(q), -1), (cache, seq, at, n)

    def attend_backward(self, da, cache):
        """-> dq [r, E] and the complete gradients of this round's own entries dk, dv [r, E]: every query that
        reads an entry is in its round or a later one, and the backward pass visits rounds in reverse."""
        if self.dk is None:
            self.dk, self.dv = np.zeros_like(self.k), np.zeros_like(self.v)
        dy = np.ascontiguousarray(da.reshape(len(da), self.n_head, -1))  # [r, H, D]
        if self.fast:
            qh, seq, at, layer, step, code, y, lse = cache
            dq = np.empty_like(qh)
            kernel = kernels._sized(_history_backward, _history_backward_serial, 4 * qh.size * int(at.max() + 1))
            kernel(
                dy,
                qh,
                self.k,
                self.kt,
                self.vt,
                self.layer,
                self.step,
                seq,
                at + 1,
                layer,
                step,
                code,
                y,
                lse,
                dq,
                self.dk,
                self.dv,
            )
        else:
            att_cache, seq, at, n = cache
            dq, dk, dv = bp.masked_attention_backward(dy[:, :, None], att_cache)
            self.dk[seq, :, :n] += dk  # one row per sequence: no index repeats
            self.dv[seq, :, :n] += dv
        dk, dv = (g[seq, :, at].reshape(len(da), -1) for g in (self.dk, self.dv))  # [r, E] each
        return dq.reshape(len(da), -1), dk, dv


@njit(inline="always")
def _sees(e_layer, e_step, q_layer, q_step, policy):
    """Whether a query sees a written entry under its policy (cache.POLICIES: 0 per-layer, 1 per-step, 2 global)."""
    if policy == 0:
        return e_layer == q_layer
    if policy == 1:
        return e_step == q_step
    return True


@njit(fastmath=kernels.TRAINING_FASTMATH, inline="always")
def _dots(x, At, n, out):  # [D], [D, cap] -> out[:n] = A[:n] x, each dot summed over d in order, all keys at once
    out[:n] = 0.0
    for d in range(x.size):
        for j in range(n):
            out[j] += x[d] * At[d, j]


@njit(fastmath=kernels.TRAINING_FASTMATH, inline="always")
def _weighted_sum(w, A, n, out):  # [cap], [cap, D] -> out[D] = sum_j w[j] A[j], summed over j in order
    out[:] = 0.0
    for j in range(n):
        for d in range(out.size):
            out[d] += w[j] * A[j, d]


@njit(parallel=True, fastmath=kernels.TRAINING_FASTMATH, cache=True)
def _history_forward(q, Kt, V, e_layer, e_step, seq, count, layer, step, policy, y, lse):
    """y [r, H, D] = attention of each query q [r, H, D] over the first count[i] entries of its sequence's
    store (keys Kt [B, H, D, cap], values V [B, H, cap, D]) that it sees, read in place; lse [r, H], the log of
    each softmax's normaliser, is all the backward needs to recompute the weights. float32."""
    r, H, D = q.shape
    scale = np.float32(1.0 / math.sqrt(D))
    for task in prange(r * H):
        i, h = task // H, task % H
        b, n = seq[i], count[i]
        p = np.empty(n, np.float32)
        _dots(q[i, h], Kt[b, h], n, p)
        best = np.float32(-np.inf)
        for j in range(n):
            p[j] = p[j] * scale if _sees(e_layer[b, j], e_step[b, j], layer[i], step[i], policy) else -np.inf
            best = max(best, p[j])
        total = np.float32(0.0)
        for j in range(n):
            p[j] = math.exp(p[j] - best)
            total += p[j]
        _weighted_sum(p, V[b, h], n, y[i, h])
        for d in range(D):
            y[i, h, d] /= total
        lse[i, h] = best + math.log(total)


@njit(parallel=True, fastmath=kernels.TRAINING_FASTMATH, cache=True)
def _history_backward(dy, q, K, Kt, Vt, e_layer, e_step, seq, count, layer, step, policy, y, lse, dq, dK, dV):
    """dq [r, H, D], and dK, dV [B, H, cap, D] accumulated in place, of `_history_forward`. With p_j the weights
    (recomputed from lse) and g_j = dy . v_j: dv_j += p_j dy, ds_j = p_j (g_j - dy . y), dq += ds_j k_j / sqrt(D),
    dk_j += ds_j q / sqrt(D). Each task writes its own sequence and head: rows of a round have distinct sequences."""
    r, H, D = q.shape
    scale = np.float32(1.0 / math.sqrt(D))
    for task in prange(r * H):
        i, h = task // H, task % H
        b, n = seq[i], count[i]
        p, ds = np.empty(n, np.float32), np.empty(n, np.float32)
        _dots(q[i, h], Kt[b, h], n, p)
        _dots(dy[i, h], Vt[b, h], n, ds)  # g_j
        dot_y = np.float32(0.0)
        for d in range(D):
            dot_y += dy[i, h, d] * y[i, h, d]
        for j in range(n):
            seen = _sees(e_layer[b, j], e_step[b, j], layer[i], step[i], policy)
            p[j] = math.exp(p[j] * scale - lse[i, h]) if seen else 0.0
            ds[j] = p[j] * (ds[j] - dot_y) * scale
        _weighted_sum(ds, K[b, h], n, dq[i, h])
        for j in range(n):
            for d in range(D):
                dK[b, h, j, d] += ds[j] * q[i, h, d]
                dV[b, h, j, d] += p[j] * dy[i, h, d]


_history_forward_serial = kernels._one_thread(_history_forward)
_history_backward_serial = kernels._one_thread(_history_backward)


# ------------------------------------------------------------------------------------------- the whole network


class _Network:
    """A batch during the training forward: the residual stream (one row per token), each token's route so far,
    the tape of decisions and rounds that the backward pass replays in reverse."""

    def __init__(self, params, router, cfg: OPTConfig, rcfg: RadialTrainConfig, ids, fast=True, rng=None):
        self.P, self.R, self.cfg, self.rcfg, self.fast = params, router, cfg, rcfg, fast
        self.rng = rng if rcfg.explore > 0 else None  # exploring: training steps only
        self.rc = rcfg.router_config(cfg)
        self.B, self.T = ids.shape
        n, E = self.B * self.T, cfg.hidden_size
        self.N, self.pre = self.rc.n_blocks, cfg.do_layer_norm_before
        self.blocks = blocks_of(cfg)
        self.layer_of = np.array([layer for layer, _ in self.blocks])
        self.weights = [block_weights(params, layer, kind) for layer, kind in self.blocks]
        x, self.emb_cache = embed_forward(ids, params)
        self.X = x.reshape(n, E).copy()
        self.prev, self.depth = np.full(n, -1), np.zeros(n, np.int64)
        self.move, self.gate = np.empty(n, np.int64), np.empty(n, self.X.dtype)  # the chosen move and its p
        self.chooser = np.zeros((n, 2), np.int64)  # (decision, row in it) that chose each token's current move
        self.routes = np.full((n, self.rc.depth_limit), -1)
        self.decisions, self.rounds = [], []
        self.enc = np.stack([rcfg.step_encoding_scale * step_encoding(s, E) for s in range(self.rc.depth_limit)])
        self.enc = self.enc.astype(self.X.dtype) if rcfg.cache_policy == "global" else None  # [depth, E]
        self.history = None

    def decide(self, rows):
        probs, moves, cache = decide_forward(self.X[rows], self.prev[rows], self.depth[rows], self.R, self.rc)
        if self.rng is not None:
            moves = explore(moves, probs, self.rcfg.explore, self.rng)
        self.chooser[rows] = np.stack([np.full(len(rows), len(self.decisions)), np.arange(len(rows))], 1)
        self.decisions.append((rows, probs, cache))
        self.move[rows], self.gate[rows] = moves, probs[np.arange(len(rows)), moves]

    def walk(self, schedule):
        """Every token from its embedding to EXIT, in rounds ordered by `schedule`."""
        self.decide(np.arange(len(self.X)))  # START: every token's first move, from its embedding
        if schedule == "token":
            self.history = _History(
                self.B,
                self.T * self.rc.depth_limit,
                self.cfg.hidden_size,
                self.cfg.num_attention_heads,
                self.X.dtype,
                self.fast,
            )
            for t in range(self.T):
                rows = t + self.T * np.arange(self.B)  # token t of every sequence
                while len(rows := rows[self.move[rows] != self.N]):
                    self.run_round(rows)
        elif schedule == "step":
            while len(rows := np.flatnonzero(self.move != self.N)):  # every token still going takes its next step
                self.run_round(rows)
        else:
            for b in range(self.N):  # forward-only: a token that has just run block b moves to a later one
                if len(rows := np.flatnonzero(self.move == b)):
                    self.run_round(rows)

    def run_round(self, rows):
        """The tokens in `rows` run the blocks they chose: each block's input side on its group, one attention
        for all attention rows over the unified cache, each group's output side, then y = x + p f(x)."""
        x, moves, gate = self.X[rows], self.move[rows], self.gate[rows]
        groups = [(b, np.flatnonzero(moves == b)) for b in np.unique(moves)]  # [(block, its rows within `rows`)]
        f, c_in, qkv = np.empty_like(x), {}, {}
        for b, idx in groups:
            if self.blocks[b][1] == "ffn":
                f[idx], c_in[b] = bp.ffn_branch_forward(x[idx], self.weights[b], self.pre)
            else:
                qkv[b], c_in[b] = bp.attention_in_forward(x[idx], self.weights[b], self.pre)  # [rb, 3E]
        c_att, c_out = None, {}
        if qkv:
            att = [(b, idx) for b, idx in groups if b in qkv]
            idx_att = np.concatenate([idx for _, idx in att])
            a, c_att = self.attend_forward(np.concatenate([qkv[b] for b, _ in att]), rows[idx_att], moves[idx_att])
            start = 0
            for b, idx in att:
                w = self.weights[b]
                f[idx], c_out[b] = bp.linear_forward(a[start : start + len(idx)], w["out.w"], w["out.b"])
                start += len(idx)
        if self.pre:  # y = x + p f(x) for every row at once; post-LN joins through each block's own norm
            y, c_res = bp.residual_forward(x, f, None, True, gate)
        else:
            y, c_res = np.empty_like(x), {}
            for b, idx in groups:
                y[idx], c_res[b] = bp.residual_forward(x[idx], f[idx], self.weights[b], False, gate[idx])
        self.X[rows] = y
        self.routes[rows, self.depth[rows]] = moves
        self.rounds.append((rows, moves, self.chooser[rows].copy(), groups, c_in, c_att, c_out, c_res))
        self.prev[rows], self.depth[rows] = moves, self.depth[rows] + 1
        self.decide(rows)

    def attend_forward(self, qkv, rows, moves):
        """Attention of rows [r] (with their stacked q, k, v [r, 3E], and the block each runs) over the unified
        cache; step encodings added to queries and keys under the global policy."""
        q, k, v = np.split(qkv, 3, axis=1)
        step = self.depth[rows]
        if self.enc is not None:
            q, k = q + self.enc[step], k + self.enc[step]
        layer = self.layer_of[moves]
        seq, pos, H = rows // self.T, rows % self.T, self.cfg.num_attention_heads
        if self.history is not None:
            a, cache = self.history.attend_forward(q, k, v, seq, layer, step, self.rcfg.cache_policy)
        else:
            a, cache = dense_attention_forward(q, k, v, seq, pos, self.B, self.T, H)
        return a, cache

    def attend_backward(self, da, cache):
        """-> d qkv [r, 3E] (the step encodings are constants)."""
        grads = self.history.attend_backward(da, cache) if self.history else dense_attention_backward(da, cache)
        return np.concatenate(grads, axis=1)

    def round_backward(self, tape, dX, dprobs, G, pending):
        """The round's backward, its forward reversed: residual joins, output sides, attention, input sides. Each
        block's small gradients go to G[block]; its linears' are kept in pending[block] (one GEMM at the end)."""
        rows, moves, chooser, groups, c_in, c_att, c_out, c_res = tape
        dy = dX[rows]
        if self.pre:
            dx, df, dgate, _ = bp.residual_backward(dy, c_res)
        else:
            dx, df, dgate = np.empty_like(dy), np.empty_like(dy), np.empty(len(rows), dy.dtype)
            for b, idx in groups:
                dx[idx], df[idx], dgate[idx], g = bp.residual_backward(dy[idx], c_res[b])
                G[b].append(g)
        if c_out:
            att = [(b, idx) for b, idx in groups if b in c_out]
            da = [bp.linear_backward_deferred(df[idx], c_out[b], pending[b].setdefault("out", [])) for b, idx in att]
            dqkv, start = self.attend_backward(np.concatenate(da), c_att), 0
            for b, idx in att:
                d, g = bp.attention_in_backward(dqkv[start : start + len(idx)], c_in[b], pending[b])
                dx[idx] += d
                G[b].append(g)
                start += len(idx)
        for b, idx in groups:
            if b not in c_out:
                d, g = bp.ffn_branch_backward(df[idx], c_in[b], pending[b])
                dx[idx] += d
                G[b].append(g)
        dX[rows] = dx
        for k in np.unique(chooser[:, 0]):  # the gate's gradient goes to the decisions that chose these moves
            mine = chooser[:, 0] == k
            dprobs[k][chooser[mine, 1], moves[mine]] += dgate[mine]


def forward(params, router, cfg: OPTConfig, rcfg: RadialTrainConfig, ids, schedule=None, fast=True, rng=None):
    """Logits [B * T, V] of sequences ids [B, T] (row b * T + t is token t of sequence b), the network's tape
    (its `routes` [n, max_depth], -1 = none), and the head's cache. `schedule` forces an order of rounds (the
    tests compare them); by default the policy's own. `fast`: Numba kernels where there are (float32), else NumPy
    only (any dtype, float64 for the gradient checks). `rng`: a training step's generator, for `explore`."""
    net = _Network(params, router, cfg, rcfg, ids, fast, rng)
    net.walk(schedule or rcfg.schedule)
    logits, c_head = head_forward(net.X, params)  # [n, V]
    return logits, net, c_head


def loss_and_grads(
    params, router, cfg: OPTConfig, rcfg: RadialTrainConfig, batch, need_grads=True, schedule=None, fast=True, rng=None
):
    """Language-model loss + compute term over a batch [B, T + 1]; the gradients of the blocks' and embeddings'
    parameters (Hugging Face names) and of the router; and `info`: the LM loss, the mean blocks per token, the
    expected blocks of the compute term, and the routes [n, max_depth] (-1 = none). `rng`: see `explore`."""
    ids, targets = batch[:, :-1], batch[:, 1:]
    logits, net, c_head = forward(params, router, cfg, rcfg, ids, schedule, fast, rng)
    n = len(net.X)
    lm_loss, c_ce = bp.crossentropy_forward(logits, targets.ravel())
    expected = sum(float((1 - probs[:, net.N]).sum()) for _, probs, _ in net.decisions) / n
    info = {
        "lm_loss": float(lm_loss),
        "blocks": float((net.routes >= 0).sum() / n),
        "expected_blocks": expected,
        "routes": net.routes,
    }
    loss = float(lm_loss) + compute_term(rcfg, expected)
    if not need_grads:
        return loss, None, None, info

    G = {}
    dX = head_backward(bp.crossentropy_backward(c_ce), c_head, G)  # [n, E]
    dprobs = [np.zeros_like(probs) for _, probs, _ in net.decisions]
    slope = compute_slope(rcfg, expected)  # d compute_term / d expected blocks
    for d in dprobs:
        d[:, net.N] -= slope / n  # expected = (1/n) sum of (1 - p_EXIT) over every decision
    block_grads, pending = [[] for _ in net.blocks], [{} for _ in net.blocks]
    GR = {k: np.zeros_like(v) for k, v in router.items()}
    for k in range(len(net.rounds), -1, -1):  # decision k + 1 follows round k; decision 0 is START
        rows, _, cache = net.decisions[k]
        dx, g = decide_backward(dprobs[k], cache, router)
        dX[rows] += dx
        for name in GR:
            GR[name] += g[name]
        if k > 0:
            net.round_backward(net.rounds[k - 1], dX, dprobs, block_grads, pending)
    for (layer, kind), w, grads, kept in zip(net.blocks, net.weights, block_grads, pending):
        g = {name: sum((g[name] for g in grads if name in g), np.zeros_like(a)) for name, a in w.items()}
        for linear in ("qkv", "out") if kind == "att" else ("fc1", "fc2"):  # a block no token ran: zeros
            g[linear + ".w"], g[linear + ".b"] = bp.linear_grads(kept.get(linear, []), w[linear + ".w"])
        store_block_grads(G, g, layer, kind)
    embed_backward(dX.reshape(net.B, net.T, -1), net.emb_cache, params, G)
    return loss, G, GR, info


# ---------------------------------------------------------------------------------------------- evaluation


def sequence_nll(params, router, cfg: OPTConfig, rcfg: RadialTrainConfig, sequences, batch_size=64, progress=None):
    """Next-token NLL [n_seq, T - 1] and blocks per token [n_seq, T] of packed sequences [n_seq, T], and every
    token's route, by the training forward in batches (no gradients); train.read_export reads a network's files."""
    nll, depth, routes = [], [], []
    starts = range(0, len(sequences), batch_size)
    for i in starts if progress is None else progress(starts):
        ids = sequences[i : i + batch_size]
        logits, net, _ = forward(params, router, cfg, rcfg, ids)
        z = logits.reshape(*ids.shape, -1)[:, :-1].astype(np.float64)
        z -= z.max(-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        nll.append(-np.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0])
        depth.append((net.routes >= 0).sum(-1).reshape(ids.shape))
        routes.append(net.routes.reshape(*ids.shape, -1))
    return np.concatenate(nll), np.concatenate(depth), np.concatenate(routes)
