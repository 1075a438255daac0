"""Forward and backward of every operation in the OPT decoder, side by side, in the style of llm.c.

Each `*_forward` returns its output and a cache of what its backward needs; each `*_backward` takes the
gradient of the loss with respect to that output and returns the gradients of the inputs and parameters.
Shapes: B sequences of T tokens, width E, H heads of size D, F the FFN width, V the vocabulary.
They work in whatever float dtype they are given: float32 to train, float64 for the finite-difference checks.
"""

import math

import numpy as np
from numba import njit, prange

from . import kernels
from .models.opt import POSITION_OFFSET

# ------------------------------------------------------------------------------------------------ embedding


def embedding_forward(ids, wte, wpe, pos):
    """Token row plus position row: OPT's learned positions are looked up at pos + POSITION_OFFSET."""
    return wte[ids] + wpe[pos + POSITION_OFFSET], (ids, pos)  # [B, T] -> [B, T, E]


def embedding_backward(dx, cache, wte_shape, wpe_shape):
    ids, pos = cache
    dwte = np.zeros(wte_shape, dx.dtype)
    np.add.at(dwte, ids.ravel(), dx.reshape(-1, dx.shape[-1]))  # rows of repeated tokens accumulate
    dwpe = np.zeros(wpe_shape, dx.dtype)
    dwpe[pos + POSITION_OFFSET] = dx.sum(0)  # [B, T, E] -> [T, E]; positions are distinct within a sequence
    return dwte, dwpe


# ------------------------------------------------------------------------------------------------ layernorm


def layernorm_forward(x, w, b, eps=1e-5):
    xhat, rstd = kernels.normalize(x, eps)  # [..., E]: the inference reference's normalisation
    return xhat * w + b, (xhat, rstd, w)


def layernorm_backward(dout, cache):
    """dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), with g = dout * w: the normalisation's Jacobian."""
    xhat, rstd, w = cache
    dw = (dout * xhat).reshape(-1, xhat.shape[-1]).sum(0)
    db = dout.reshape(-1, dout.shape[-1]).sum(0)
    g = dout * w
    dx = rstd * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))
    return dx, dw, db


# --------------------------------------------------------------------------------------------------- linear


def linear_forward(x, w, b=None):
    """x @ w.T + b. Rows are flattened first: one large GEMM is several times faster than a batch of small ones."""
    x2 = x.reshape(-1, x.shape[-1])
    out = x2 @ w.T  # [B*T, in] -> [B*T, out]
    if b is not None:
        out += b
    return out.reshape(*x.shape[:-1], w.shape[0]), (x2, w)


def linear_backward(dout, cache):
    x2, w = cache
    d2 = dout.reshape(-1, dout.shape[-1])
    dx = (d2 @ w).reshape(*dout.shape[:-1], w.shape[1])  # [..., out] -> [..., in]
    dw = d2.T @ x2  # [out, in]
    db = d2.sum(0)
    return dx, dw, db


def linear_backward_deferred(dout, cache, pending: list):
    """`linear_backward`'s dx now, its dw and db later: (dout, x) is kept in `pending`, and `linear_grads` sums
    the calls of a whole batch in one GEMM (a Radial Network runs each block on many small groups of tokens)."""
    x2, w = cache
    d2 = dout.reshape(-1, dout.shape[-1])
    pending.append((d2, x2))
    return (d2 @ w).reshape(*dout.shape[:-1], w.shape[1])


def linear_grads(pending: list, w):
    """dw and db of weight w [out, in] for every call kept in `pending` (zeros if none): their dw's and db's sums."""
    if not pending:
        return np.zeros_like(w), np.zeros(w.shape[0], w.dtype)
    d2, x2 = (np.concatenate(a) for a in zip(*pending))
    return d2.T @ x2, d2.sum(0)


def _linear_back(dout, cache, g: dict, name: str, pending: dict | None):
    """A block's linear `name` backward: its gradients into g now, or kept in pending[name] for linear_grads."""
    if pending is None:
        dx, g[name + ".w"], g[name + ".b"] = linear_backward(dout, cache)
        return dx
    return linear_backward_deferred(dout, cache, pending.setdefault(name, []))


# ----------------------------------------------------------------------------------------------------- relu


def relu_forward(x):
    return np.maximum(x, 0), x > 0


def relu_backward(dout, mask):
    return dout * mask


# ------------------------------------------------------------------------------------------------ attention


def split_heads(x, n_head):
    """[..., T, H*D] -> [..., H, T, D]"""
    *lead, T, E = x.shape
    return np.moveaxis(x.reshape(*lead, T, n_head, E // n_head), -2, -3)


def merge_heads(x):
    """[..., H, T, D] -> [..., T, H*D]"""
    *lead, H, T, D = x.shape
    return np.moveaxis(x, -3, -2).reshape(*lead, T, H * D)


def masked_attention_forward(q, k, v, visible):
    """Each query's softmax-weighted sum of the values of the keys it may see: q [..., H, Tq, D], k, v
    [..., H, Tk, D], visible [..., 1, Tq, Tk] bool -> [..., H, Tq, D]. The weights are kernels.attention_weights,
    the inference reference's own definition."""
    att = kernels.attention_weights(q, k, visible)  # [..., H, Tq, Tk]
    return att @ v, (q, k, v, att)


def masked_attention_backward(dy, cache):
    """-> dq, dk, dv. Hidden keys have weight 0, so they get no gradient."""
    q, k, v, att = cache
    datt = dy @ np.swapaxes(v, -1, -2)  # [..., H, Tq, Tk]
    dv = np.swapaxes(att, -1, -2) @ dy
    dscores = att * (datt - (datt * att).sum(-1, keepdims=True)) / math.sqrt(q.shape[-1])  # softmax backward
    return dscores @ k, np.swapaxes(dscores, -1, -2) @ q, dv


def attention_forward(qkv, n_head):
    """Causal multi-head attention from stacked projections [B, T, 3E] -> [B, T, E]."""
    T = qkv.shape[1]
    q, k, v = (split_heads(a, n_head) for a in np.split(qkv, 3, axis=-1))  # [B, H, T, D]
    y, cache = masked_attention_forward(q, k, v, np.tri(T, dtype=bool))
    return merge_heads(y), cache


def attention_backward(dy, cache):
    n_head = cache[0].shape[1]
    return np.concatenate([merge_heads(g) for g in masked_attention_backward(split_heads(dy, n_head), cache)], axis=-1)


# Numba versions of the two hot spots, tested against the NumPy ones above. They visit only the causal half
# of each score matrix and fuse the softmax into one pass; a step of the default model runs ~2x faster.


@njit(parallel=True, fastmath=kernels.TRAINING_FASTMATH, cache=True)
def _attention_forward_nb(q, k, v, att, y):  # [BH, T, D] x3 -> att [BH, T, T], y [BH, T, D]
    n, T, D = q.shape
    scale = np.float32(1.0 / math.sqrt(D))
    for bh in prange(n):
        for i in range(T):
            best = -np.inf
            for j in range(i + 1):
                s = np.float32(0.0)
                for d in range(D):
                    s += q[bh, i, d] * k[bh, j, d]
                att[bh, i, j] = s * scale
                best = max(best, att[bh, i, j])
            total = np.float32(0.0)
            for j in range(i + 1):
                e = np.float32(math.exp(att[bh, i, j] - best))
                att[bh, i, j] = e
                total += e
            for d in range(D):
                y[bh, i, d] = 0.0
            for j in range(i + 1):
                att[bh, i, j] /= total
                for d in range(D):
                    y[bh, i, d] += att[bh, i, j] * v[bh, j, d]
            for j in range(i + 1, T):
                att[bh, i, j] = 0.0


@njit(parallel=True, fastmath=kernels.TRAINING_FASTMATH, cache=True)
def _attention_backward_nb(dy, q, k, v, att, dq, dk, dv):  # all [BH, T, D] but att [BH, T, T]
    n, T, D = q.shape
    scale = np.float32(1.0 / math.sqrt(D))
    datt = np.empty((n, T), np.float32)
    for bh in prange(n):
        dq[bh], dk[bh], dv[bh] = 0.0, 0.0, 0.0
        row = datt[bh]
        for i in range(T):
            dot_total = np.float32(0.0)
            for j in range(i + 1):
                s = np.float32(0.0)
                for d in range(D):
                    s += dy[bh, i, d] * v[bh, j, d]
                    dv[bh, j, d] += att[bh, i, j] * dy[bh, i, d]
                row[j] = s
                dot_total += s * att[bh, i, j]
            for j in range(i + 1):
                g = att[bh, i, j] * (row[j] - dot_total) * scale
                for d in range(D):
                    dq[bh, i, d] += g * k[bh, j, d]
                    dk[bh, j, d] += g * q[bh, i, d]


def attention_forward_fast(qkv, n_head):
    """As `attention_forward`, through the Numba kernel (float32)."""
    B, T, E3 = qkv.shape
    E, D = E3 // 3, E3 // 3 // n_head
    q, k, v = (
        np.ascontiguousarray(qkv[..., i * E : (i + 1) * E].reshape(B, T, n_head, D).transpose(0, 2, 1, 3)).reshape(
            B * n_head, T, D
        )
        for i in range(3)
    )
    att = np.empty((B * n_head, T, T), np.float32)
    y = np.empty_like(q)
    _attention_forward_nb(q, k, v, att, y)
    return y.reshape(B, n_head, T, D).transpose(0, 2, 1, 3).reshape(B, T, E), (q, k, v, att, B)


def attention_backward_fast(dy, cache):
    q, k, v, att, B = cache
    BH, T, D = q.shape
    H = BH // B
    dy = np.ascontiguousarray(dy.reshape(B, T, H, D).transpose(0, 2, 1, 3)).reshape(BH, T, D)
    dq, dk, dv = np.empty_like(q), np.empty_like(k), np.empty_like(v)
    _attention_backward_nb(dy, q, k, v, att, dq, dk, dv)
    grads = [g.reshape(B, H, T, D).transpose(0, 2, 1, 3).reshape(B, T, H * D) for g in (dq, dk, dv)]  # [B, T, E] each
    return np.concatenate(grads, axis=-1)


# ------------------------------------------------------------------------------------------------- blocks
# One level up, the residual blocks of blocks.py, each forward beside its backward and mirroring it op by op, in
# the same three pieces as blocks.Block: the branch's input side, the branch, the residual join (where pre- and
# post-LN differ, and where a Radial Network's gate scales the branch). `w` holds one block's weights under short
# names (see opt_backprop.block_weights); a backward returns dx and the gradients under the same names. `attention` is a
# (forward, backward) pair: NumPy (any dtype) or Numba (float32).

ATTENTION_NUMPY = (attention_forward, attention_backward)
ATTENTION_FAST = (attention_forward_fast, attention_backward_fast)


def attention_in_forward(x, w, pre_norm=True):
    """An attention block's input side: its layer norm (pre-LN) and the stacked q, k, v projection [..., 3E]."""
    h, c_ln = layernorm_forward(x, w["ln.w"], w["ln.b"]) if pre_norm else (x, None)
    qkv, c_qkv = linear_forward(h, w["qkv.w"], w["qkv.b"])  # [..., E] -> [..., 3E]
    return qkv, (c_ln, c_qkv)


def attention_in_backward(dqkv, cache, pending=None):
    """-> dx and the gradients; with `pending`, the projection's are deferred (see linear_backward_deferred)."""
    c_ln, c_qkv = cache
    g = {}
    dx = _linear_back(dqkv, c_qkv, g, "qkv", pending)
    if c_ln is not None:
        dx, g["ln.w"], g["ln.b"] = layernorm_backward(dx, c_ln)
    return dx, g


def ffn_branch_forward(x, w, pre_norm=True):
    """f(x) = fc2(relu(fc1(x))), x layer-normalised first in pre-LN models: [..., E] -> [..., E]."""
    h, c_ln = layernorm_forward(x, w["ln.w"], w["ln.b"]) if pre_norm else (x, None)
    u, c_fc1 = linear_forward(h, w["fc1.w"], w["fc1.b"])  # [..., E] -> [..., F]
    r, c_relu = relu_forward(u)
    f, c_fc2 = linear_forward(r, w["fc2.w"], w["fc2.b"])  # [..., F] -> [..., E]
    return f, (c_ln, c_fc1, c_relu, c_fc2)


def ffn_branch_backward(df, cache, pending=None):
    c_ln, c_fc1, c_relu, c_fc2 = cache
    g = {}
    dr = _linear_back(df, c_fc2, g, "fc2", pending)
    du = relu_backward(dr, c_relu)
    dx = _linear_back(du, c_fc1, g, "fc1", pending)
    if c_ln is not None:
        dx, g["ln.w"], g["ln.b"] = layernorm_backward(dx, c_ln)
    return dx, g


def residual_forward(x, f, w, pre_norm=True, gate=None):
    """Join the branch to the stream: y = x + p f (pre-LN) or LN(x + p f) (post-LN), p the router's probability
    of this block [...] in a co-trained Radial Network, 1 without a gate."""
    pf = f if gate is None else gate[..., None] * f
    if pre_norm:
        return x + pf, (None, f, gate)
    y, c_ln = layernorm_forward(x + pf, w["ln.w"], w["ln.b"])
    return y, (c_ln, f, gate)


def residual_backward(dy, cache):
    """-> dx, df, dgate (None without a gate), and the post-LN norm's gradients."""
    c_ln, f, gate = cache
    g = {}
    if c_ln is not None:
        dy, g["ln.w"], g["ln.b"] = layernorm_backward(dy, c_ln)
    if gate is None:
        return dy, dy, None, g
    return dy, gate[..., None] * dy, (dy * f).sum(-1), g


def attention_block_forward(x, w, n_head, attention=ATTENTION_NUMPY, pre_norm=True):
    """y = x + out(attn(qkv(ln(x)))) (pre-LN) or ln(x + out(attn(qkv(x)))) (post-LN): [B, T, E] -> [B, T, E]."""
    qkv, c_in = attention_in_forward(x, w, pre_norm)  # [B, T, 3E]
    a, c_att = attention[0](qkv, n_head)
    o, c_out = linear_forward(a, w["out.w"], w["out.b"])
    y, c_res = residual_forward(x, o, w, pre_norm)
    return y, (c_in, c_att, c_out, c_res, attention[1])


def attention_block_backward(dy, cache):
    c_in, c_att, c_out, c_res, att_backward = cache
    dx, do, _, g = residual_backward(dy, cache=c_res)
    da, g["out.w"], g["out.b"] = linear_backward(do, c_out)
    dh, g_in = attention_in_backward(att_backward(da, c_att), c_in)
    return dx + dh, {**g, **g_in}


def ffn_block_forward(x, w, pre_norm=True):
    """y = x + fc2(relu(fc1(ln(x)))) (pre-LN) or ln(x + fc2(relu(fc1(x)))) (post-LN): [B, T, E] -> [B, T, E]."""
    f, c_f = ffn_branch_forward(x, w, pre_norm)
    y, c_res = residual_forward(x, f, w, pre_norm)
    return y, (c_f, c_res)


def ffn_block_backward(dy, cache):
    c_f, c_res = cache
    dx, df, _, g = residual_backward(dy, c_res)
    dh, g_f = ffn_branch_backward(df, c_f)
    return dx + dh, {**g, **g_f}


# ------------------------------------------------------------------------------------------- cross-entropy


def crossentropy_forward(logits, targets):
    """Mean negative log-likelihood of `targets` under softmax(logits): [N, V], [N] -> scalar.

    The softmax is kept for the backward pass, so exp runs once over the (large) logits. NumPy's SIMD exp
    beat a Numba kernel here (Numba's scalar exp), so this one stays NumPy."""
    rows = np.arange(len(targets))
    z = logits - logits.max(-1, keepdims=True)
    probs = np.exp(z)
    total = probs.sum(-1, keepdims=True)
    loss = (np.log(total[:, 0]) - z[rows, targets]).mean()
    probs /= total
    return loss, (probs, targets)


def crossentropy_backward(cache):
    """d loss / d logits = (softmax - onehot) / N. Overwrites the cached softmax."""
    probs, targets = cache
    probs[np.arange(len(targets)), targets] -= 1.0
    probs /= len(targets)
    return probs  # [N, V]
