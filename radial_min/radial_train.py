"""Training a Radial Network: the router and the blocks learn together (issue 9). Hand-written NumPy, each
forward beside its backward, as backprop.py.

This first cut covers forward-only routing under the per-block cache policy with the `drop` rule: a token
visits blocks in increasing order, skipping any, and block b's attention sees the entries that block b wrote for
earlier tokens that ran it (and the token's own). That can be computed block-major over a whole batch, exact and
causal: when block b runs, every token that will ever run it is known, because its route so far used blocks < b.

The router learns through the discrete choice as in Mixture-of-Depths (Raposo et al., 2024): a block's output
is scaled by the router's probability of choosing it, y = x + p * f(x), so the language-model loss reaches the
router through p; argmax picks the move, per token, causally, the same rule at training and at generation.
A compute term, `cost` per expected block, sets the budget: loss += cost * mean over tokens of the sum over
decisions of (1 - p_EXIT). Shapes: n = B * T tokens, E width, N blocks, H the router's hidden width.
"""
from dataclasses import dataclass

import numpy as np

from . import backprop as bp
from .config import OPTConfig
from .router import NEG
from .train import block_weights, blocks_of, store_block_grads


@dataclass
class RadialTrainConfig:
    max_depth: int | None = None  # None: one pass over the blocks
    cost: float = 0.0  # loss per expected block run (the compute term)
    router_hidden: int = 16


# ------------------------------------------------------------------------------------------------ decision


def decide_forward(x, prev, depth, R, n_blocks, max_depth):
    """Router on states x [n, E] after block `prev` [n] (-1 = START): probabilities [n, N + 1] and argmax moves."""
    xn, c_ln = bp.layernorm_forward(x, 1.0, 0.0)  # as router.features: normalised state + onehot(prev)
    onehot = np.zeros((len(x), n_blocks + 1), x.dtype)
    onehot[np.arange(len(x)), prev + 1] = 1.0
    z = np.concatenate([xn, onehot], axis=1)  # [n, E + N + 1]
    h, c1 = bp.linear_forward(z, R["w1"], R["b1"])
    a, c2 = bp.relu_forward(h)
    logits, c3 = bp.linear_forward(a, R["w2"], R["b2"])  # [n, N + 1]
    cols = np.arange(n_blocks + 1)
    allowed = (cols[None, :] > prev[:, None]) | (cols[None, :] == n_blocks)  # forward-only, EXIT always
    allowed[depth >= max_depth] = cols == n_blocks
    logits = np.where(allowed, logits, NEG)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return probs, probs.argmax(-1), (c_ln, c1, c2, c3, probs, allowed, x.shape[1])


def decide_backward(dprobs, cache, R):
    """Gradient of the decision's probabilities [n, N + 1] -> dx [n, E] and the router's gradients."""
    c_ln, c1, c2, c3, probs, allowed, E = cache
    dlogits = probs * (dprobs - (dprobs * probs).sum(-1, keepdims=True)) * allowed  # softmax backward
    g = {}
    da, g["w2"], g["b2"] = bp.linear_backward(dlogits, c3)
    dh = bp.relu_backward(da, c2)
    dz, g["w1"], g["b1"] = bp.linear_backward(dh, c1)
    dx, _, _ = bp.layernorm_backward(dz[:, :E], c_ln)
    return dx, g


# -------------------------------------------------------------------------------------------- gated block


def gated_block_forward(x, seq, p, w, kind, cfg: OPTConfig, attention):
    """y = x + p * f(x) for the rows x [r, E] of sequences `seq` [r] (sorted) that chose this block.

    Attention runs per sequence over its rows only (the per-block policy); the FFN over all rows at once."""
    parts = np.split(np.arange(len(x)), np.flatnonzero(np.diff(seq)) + 1) if kind == "att" else [np.arange(len(x))]
    f, caches = np.empty_like(x), []
    for idx in parts:
        if kind == "att":
            y, c = bp.attention_block_forward(x[idx][None], w, cfg.num_attention_heads, attention)
        else:
            y, c = bp.ffn_block_forward(x[idx][None], w)
        f[idx] = y[0] - x[idx]  # the branch f(x)
        caches.append((idx, c))
    return x + p[:, None] * f, (f, p, caches, kind)


def gated_block_backward(dy, cache):
    """-> dx [r, E], dp [r], the block's gradients (short names)."""
    f, p, caches, kind = cache
    dp = (dy * f).sum(-1)
    dx, grads = dy.copy(), {}
    backward = bp.attention_block_backward if kind == "att" else bp.ffn_block_backward
    for idx, c in caches:
        df = p[idx, None] * dy[idx]
        d, g = backward(df[None], c)  # d = df + J^T df; the block's own residual is ours, so take it back out
        dx[idx] += d[0] - df
        for k, v in g.items():
            grads[k] = grads[k] + v if k in grads else v
    return dx, dp, grads


# ------------------------------------------------------------------------------------------ whole network


def loss_and_grads(params, router, cfg: OPTConfig, rcfg: RadialTrainConfig, batch, need_grads=True, fast=False):
    """Language-model loss + compute term over a batch [B, T + 1], its gradients for the blocks (Hugging Face
    names) and the router, and the routes [n, max_depth] (-1 = none)."""
    P, N = params, 2 * cfg.num_hidden_layers
    max_depth = N if rcfg.max_depth is None else rcfg.max_depth
    attention = bp.ATTENTION_FAST if fast else bp.ATTENTION_NUMPY
    ids, targets = batch[:, :-1], batch[:, 1:]
    B, T = ids.shape
    n = B * T
    x, emb_cache = bp.embedding_forward(ids, P["decoder.embed_tokens.weight"], P["decoder.embed_positions.weight"], np.arange(T))
    X = x.reshape(n, -1).copy()  # the residual stream, one row per token
    prev, depth = np.full(n, -1), np.zeros(n, np.int64)
    routes = np.full((n, max_depth), -1)
    probs, nxt, c = decide_forward(X, prev, depth, router, N, max_depth)
    decisions = [(np.arange(n), probs, nxt, c)]
    owner = np.zeros(n, np.int64)  # which decision chose each token's next move
    tape = []
    for b, (layer, kind) in enumerate(blocks_of(cfg)):
        rows = np.flatnonzero(nxt == b)
        if len(rows) == 0:
            continue
        d = owner[rows]
        p = np.array([decisions[k][1][np.searchsorted(decisions[k][0], r), b] for k, r in zip(d, rows)], X.dtype)
        y, c = gated_block_forward(X[rows], rows // T, p, block_weights(P, layer, kind), kind, cfg, attention)
        X[rows] = y
        routes[rows, depth[rows]] = b
        prev[rows], depth[rows] = b, depth[rows] + 1
        probs_r, nxt_r, cd = decide_forward(X[rows], prev[rows], depth[rows], router, N, max_depth)
        nxt[rows], owner[rows] = nxt_r, len(decisions)
        decisions.append((rows, probs_r, nxt_r, cd))
        tape.append((b, layer, kind, rows, d, c))
    h, c_lnf = bp.layernorm_forward(X, P["decoder.final_layer_norm.weight"], P["decoder.final_layer_norm.bias"])
    logits, c_head = bp.linear_forward(h, P["decoder.embed_tokens.weight"])  # [n, V]
    lm_loss, c_ce = bp.crossentropy_forward(logits, targets.ravel())
    expected_blocks = sum(float((1 - pr[:, N]).sum()) for _, pr, _, _ in decisions) / n
    loss = float(lm_loss) + rcfg.cost * expected_blocks
    if not need_grads:
        return loss, None, None, routes

    G, GR = {}, {k: np.zeros_like(v) for k, v in router.items()}
    dprobs = [np.zeros_like(pr) for _, pr, _, _ in decisions]
    for dp_ in dprobs:
        dp_[:, N] -= rcfg.cost / n  # d/dp_EXIT of cost * (1 - p_EXIT) / n
    dlogits = bp.crossentropy_backward(c_ce)
    dh, dwte_head, _ = bp.linear_backward(dlogits, c_head)
    dX, G["decoder.final_layer_norm.weight"], G["decoder.final_layer_norm.bias"] = bp.layernorm_backward(dh, c_lnf)
    for k in range(len(decisions) - 1, -1, -1):  # decision k follows tape entry k - 1
        rows, _, _, cd = decisions[k]
        dx, g = decide_backward(dprobs[k], cd, router)
        dX[rows] += dx
        for name in GR:
            GR[name] += g[name]
        if k == 0:
            break
        b, layer, kind, rows, d, c = tape[k - 1]
        dx, dp, g = gated_block_backward(dX[rows], c)
        dX[rows] = dx
        for j, r, v in zip(d, rows, dp):
            dprobs[j][np.searchsorted(decisions[j][0], r), b] += v
        store_block_grads(G, g, layer, kind)
    for layer, kind in blocks_of(cfg):  # blocks no token ran get zero gradients
        store_block_grads(G, {k: np.zeros_like(v) for k, v in block_weights(P, layer, kind).items()}, layer, kind)
    dwte, G["decoder.embed_positions.weight"] = bp.embedding_backward(
        dX.reshape(B, T, -1), emb_cache, P["decoder.embed_tokens.weight"].shape, P["decoder.embed_positions.weight"].shape
    )
    G["decoder.embed_tokens.weight"] = dwte_head + dwte
    return loss, G, GR, routes
