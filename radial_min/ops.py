"""Every operation of a transformer as a forward beside its backward, in the style of llm.c.

Each `*_forward` returns its output and a cache of what its backward needs; each `*_backward` takes the gradient of
the loss with respect to that output and returns the gradients of the inputs (and of the parameters). They are
written once, in NumPy, and work in whatever float dtype they are given: float32 to train, float64 for the
finite-difference checks (tests/test_ops.py). The modules of blocks.py call them when training and the Numba
kernels of kernels.py when not: `kernels.layernorm` is tested against the definition `kernels.normalize` shared
with `layernorm_forward` here, and so on, so both paths compute one definition of each op.

Attention reads keys and values from a KV cache (cache.py). Its forward and backward here are Numba kernels beside
the NumPy pair they are tested against: many queries of many sequences at once, each query over the entries of its
own sequence that its cache policy lets it see (a prefix of the entries, in the cache's order), the weights
recomputed in the backward from the log of each softmax's normaliser (as FlashAttention does), in a fixed order of
summation so that a resumed training run repeats every bit (kernels.TRAINING_FASTMATH).

Shapes: n rows (tokens), E width, F FFN width, V vocabulary, H query heads and Hkv key/value heads of size D,
B sequences, cap the entries a cache holds per sequence.
"""

import math

import numpy as np
from numba import njit, prange

from . import kernels

# --------------------------------------------------------------------------------------------------- linear


def linear_forward(x, w, b=None):
    """y = x w^T + b through NumPy's BLAS (deterministic for fixed shapes and threads): [n, in] -> [n, out]."""
    y = x @ w.T
    if b is not None:
        y += b
    return y


def linear_backward(dy, x, w):
    """-> dx [n, in], dw [out, in], db [out]. blocks.Linear defers dw, db (one GEMM for every call of a step)."""
    return dy @ w, dy.T @ x, dy.sum(0)


# ------------------------------------------------------------------------------------------------ layernorm


def layernorm_forward(x, w, b, eps):
    """(x - mean) / std * w + b per row, w and b None without affine parameters: [n, E] -> [n, E]."""
    xhat, rstd = kernels.normalize(x, eps)  # the one definition, shared with kernels.layernorm's reference
    return (xhat if w is None else xhat * w + b), (xhat, rstd)


def layernorm_backward(dy, w, cache):
    """-> dx and, with affine parameters, dw, db. dx = rstd (g - mean(g) - xhat mean(g xhat)), g = dy w."""
    xhat, rstd = cache
    g = dy if w is None else dy * w
    dx = rstd * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))
    if w is None:
        return dx, None, None
    return dx, (dy * xhat).sum(0), dy.sum(0)


# -------------------------------------------------------------------------------------------------- rmsnorm


def rmsnorm_forward(x, w, eps):
    """Llama's RMSNorm: x / rms(x) * w per row, no centring, no bias: [n, E] -> [n, E]."""
    xhat, rstd = kernels.rms_normalize(x, eps)
    return xhat * w, (xhat, rstd)


def rmsnorm_backward(dy, w, cache):
    """-> dx, dw. dx = rstd (g - xhat mean(g xhat)), g = dy w."""
    xhat, rstd = cache
    g = dy * w
    return rstd * (g - xhat * (g * xhat).mean(-1, keepdims=True)), (dy * xhat).sum(0)


# --------------------------------------------------------------------------------------------------- rotary


def rotary_forward(x, n_head, cos, sin):
    """Each head's pairs (i, i + D/2) rotated by its row's angles: [n, H*D], [n, D/2] x2 -> [n, H*D]."""
    h = x.reshape(len(x), n_head, -1)  # [n, H, D]
    x1, x2 = np.split(h, 2, axis=-1)
    c, s = cos[:, None, :], sin[:, None, :]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).reshape(x.shape)


def rotary_backward(dy, n_head, cos, sin):
    """A rotation's transpose is the rotation by the opposite angle."""
    return rotary_forward(dy, n_head, cos, -sin)


# ---------------------------------------------------------------------------------------------- activations


def activation_forward(name, u):
    """relu, gelu (exact, erf) or silu of the FFN's hidden rows u [n, F]; the cache is u."""
    if name == "relu":
        return np.maximum(u, 0), u
    if name == "gelu":
        return u * _phi(u), u
    return u * _sigmoid(u), u


def activation_backward(name, da, u):
    if name == "relu":
        return da * (u > 0)
    if name == "gelu":  # d/du u Phi(u) = Phi(u) + u phi(u)
        return da * (_phi(u) + u * np.exp(-0.5 * u * u) / math.sqrt(2 * math.pi))
    s = _sigmoid(u)  # d/du u s(u) = s (1 + u (1 - s))
    return da * s * (1 + u * (1 - s))


def swiglu_forward(g, u):
    """Llama's gated FFN: silu(g) * u, [n, F] x2 -> [n, F]."""
    a, _ = activation_forward("silu", g)
    return a * u, (g, u, a)


def swiglu_backward(dh, cache):
    """-> dg, du."""
    g, u, a = cache
    return activation_backward("silu", dh * u, g), dh * a


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _phi(x):
    """The standard normal CDF, from math.erf (NumPy has none), in x's dtype."""
    return (0.5 * (1.0 + np.vectorize(math.erf, otypes=[np.float64])(x / math.sqrt(2.0)))).astype(x.dtype)


# ------------------------------------------------------------------------------------------- embedding, loss


def embedding_backward(dx, ids, n_rows):
    """The gradient of a table lookup: rows of repeated ids accumulate. [n, E], [n] -> [n_rows, E]."""
    dw = np.zeros((n_rows, dx.shape[1]), dx.dtype)
    np.add.at(dw, ids, dx)
    return dw


def log_softmax(logits) -> np.ndarray:
    """[..., V] -> log-probabilities in float64 (scores: perplexity, KL), the maximum subtracted first."""
    z = logits.astype(np.float64)
    z -= z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def crossentropy_forward(logits, targets, weights=None):
    """Mean negative log-likelihood of targets [n] under softmax(logits [n, V]), each row weighted by `weights` [n]
    if given (a loss mask), the mean taken over the weights. The softmax is kept for the backward pass, so exp runs
    once over the (large) logits; NumPy's SIMD exp beats a Numba kernel here."""
    rows = np.arange(len(targets))
    z = logits - logits.max(-1, keepdims=True)
    probs = np.exp(z)
    total = probs.sum(-1, keepdims=True)
    nll = np.log(total[:, 0]) - z[rows, targets]
    loss = nll.mean() if weights is None else (nll * weights).sum() / weights.sum()
    probs /= total
    return loss, (probs, targets, weights)


def crossentropy_backward(cache):
    """d loss / d logits = (softmax - onehot) / n (times each row's weight / sum of weights with a mask).
    Overwrites the cached softmax."""
    probs, targets, weights = cache
    probs[np.arange(len(targets)), targets] -= 1.0
    if weights is None:
        probs /= len(targets)
    else:
        probs *= (weights / weights.sum())[:, None].astype(probs.dtype)
    return probs  # [n, V]


# ------------------------------------------------------------------------------------------------ attention
# Queries q [n, H, D] of sequences seq [n] read the cache's entries: keys K [B, Hkv, cap, D] (also transposed,
# Kt [B, Hkv, D, cap]) and values V (and Vt), each entry with an order key (cache.order_key: its position, then its
# routing step). Query i sees the entries of its sequence, among the first count[seq[i]], whose key is <= its own
# key[i]: entries are stored in key order, so that is a prefix. Query head h reads key/value head h // (H / Hkv).


def visible(keys, count, seq, qkey):
    """[n, cap] bool: the entries each query sees (the reference's mask; the kernels count the prefix instead)."""
    cap = keys.shape[1]
    return (np.arange(cap)[None, :] < count[seq][:, None]) & (keys[seq] <= qkey[:, None])


def attention_forward_ref(q, K, V, keys, count, seq, qkey):
    """The reference: softmax(q k^T / sqrt(D)) v over the visible entries (kernels.attention_weights, the one
    definition), in q's dtype -> y [n, H, D], and lse [n, H], the log of each softmax's normaliser."""
    group = q.shape[1] // K.shape[1]
    k = np.repeat(K[seq], group, axis=1)  # [n, H, cap, D]
    v = np.repeat(V[seq], group, axis=1)
    see = visible(keys, count, seq, qkey)[:, None, None, :]  # [n, 1, 1, cap]
    scores = kernels.attention_scores(q[:, :, None, :], k, see)[:, :, 0]  # [n, H, cap]
    best = scores.max(-1, keepdims=True)
    lse = (best + np.log(np.exp(scores - best).sum(-1, keepdims=True)))[..., 0]
    return (kernels.attention_weights(q[:, :, None, :], k, see) @ v)[:, :, 0], lse


def attention_backward_ref(dy, q, K, V, keys, count, seq, qkey, y, lse):
    """-> dq [n, H, D], dK, dV [B, Hkv, cap, D] (the gradients of every entry, summed over the queries reading it)."""
    group = q.shape[1] // K.shape[1]
    k, v = np.repeat(K[seq], group, axis=1), np.repeat(V[seq], group, axis=1)
    scale = 1.0 / math.sqrt(q.shape[-1])
    s = np.einsum("nhd,nhjd->nhj", q, k) * scale
    p = np.where(visible(keys, count, seq, qkey)[:, None, :], np.exp(s - lse[..., None]), 0.0)
    g = np.einsum("nhd,nhjd->nhj", dy, v)  # dy . v_j
    ds = p * (g - (dy * y).sum(-1, keepdims=True)) * scale
    dq = np.einsum("nhj,nhjd->nhd", ds, k)
    dk_rows, dv_rows = np.einsum("nhj,nhd->nhjd", ds, q), np.einsum("nhj,nhd->nhjd", p, dy)  # [n, H, cap, D]
    dK, dV = np.zeros_like(K), np.zeros_like(V)
    B, Hkv = K.shape[:2]
    np.add.at(dK, seq, dk_rows.reshape(len(q), Hkv, group, *K.shape[2:]).sum(2))
    np.add.at(dV, seq, dv_rows.reshape(len(q), Hkv, group, *V.shape[2:]).sum(2))
    return dq, dK, dV


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


@njit(inline="always")
def _n_visible(keys, n, key):  # entries 0..n-1 of one sequence, in key order -> how many are <= key
    return np.searchsorted(keys[:n], key, side="right")


@njit(parallel=True, fastmath=kernels.TRAINING_FASTMATH, cache=True)
def _attention_forward(q, Kt, V, keys, count, seq, qkey, y, lse):  # float32; y [n, H, D], lse [n, H]
    n_q, H, D = q.shape
    group = H // Kt.shape[1]
    scale = np.float32(1.0 / math.sqrt(D))
    for task in prange(n_q * H):
        i, h = task // H, task % H
        b, g = seq[i], h // group
        n = _n_visible(keys[b], count[b], qkey[i])
        p = np.empty(n, np.float32)
        _dots(q[i, h], Kt[b, g], n, p)
        best = np.float32(-np.inf)
        for j in range(n):
            p[j] *= scale
            best = max(best, p[j])
        total = np.float32(0.0)
        for j in range(n):
            p[j] = math.exp(p[j] - best)
            total += p[j]
        _weighted_sum(p, V[b, g], n, y[i, h])
        for d in range(D):
            y[i, h, d] /= total
        lse[i, h] = best + math.log(total)


@njit(parallel=True, fastmath=kernels.TRAINING_FASTMATH, cache=True)
def _attention_backward(dy, q, K, Kt, Vt, keys, count, seq, qkey, y, lse, by_seq, starts, dq, dK, dV):
    """dq [n, H, D], and dK, dV [B, Hkv, cap, D] accumulated in place. With p_j the weights (recomputed from lse)
    and g_j = dy . v_j: dv_j += p_j dy, ds_j = p_j (g_j - dy . y) / sqrt(D), dq += ds_j k_j, dk_j += ds_j q. One task
    per (sequence, key/value head), its queries in order (by_seq[starts[b]:starts[b + 1]]), so that every task
    writes its own entries and the sums run in one order."""
    n_q, H, D = q.shape
    B, Hkv = K.shape[0], K.shape[1]
    group = H // Hkv
    scale = np.float32(1.0 / math.sqrt(D))
    for task in prange(B * Hkv):
        b, g = task // Hkv, task % Hkv
        for at in range(starts[b], starts[b + 1]):
            i = by_seq[at]
            n = _n_visible(keys[b], count[b], qkey[i])
            p, ds = np.empty(n, np.float32), np.empty(n, np.float32)
            for h in range(g * group, (g + 1) * group):
                _dots(q[i, h], Kt[b, g], n, p)
                _dots(dy[i, h], Vt[b, g], n, ds)  # g_j
                dot_y = np.float32(0.0)
                for d in range(D):
                    dot_y += dy[i, h, d] * y[i, h, d]
                for j in range(n):
                    p[j] = math.exp(p[j] * scale - lse[i, h])
                    ds[j] = p[j] * (ds[j] - dot_y) * scale
                _weighted_sum(ds, K[b, g], n, dq[i, h])
                for j in range(n):
                    for d in range(D):
                        dK[b, g, j, d] += ds[j] * q[i, h, d]
                        dV[b, g, j, d] += p[j] * dy[i, h, d]


_attention_forward_serial = kernels._one_thread(_attention_forward)
_attention_backward_serial = kernels._one_thread(_attention_backward)


def attention_forward(q, store, seq, qkey):
    """Attention of queries q [n, H, D] over a cache partition `store` (cache._Entries): -> y [n, H, D], lse
    [n, H]. Numba in float32, the NumPy reference in any other dtype."""
    if q.dtype != np.float32:
        return attention_forward_ref(q, store.k, store.v, store.keys, store.count, seq, qkey)
    y, lse = np.empty_like(q), np.empty(q.shape[:2], np.float32)
    kernel = kernels._sized(_attention_forward, _attention_forward_serial, 2 * q.size * store.count.max(initial=1))
    kernel(q, store.kt, store.v, store.keys, store.count, seq, qkey, y, lse)
    return y, lse


def attention_backward(dy, q, store, seq, qkey, y, lse):
    """-> dq [n, H, D]; the entries' gradients are added into store.dk, store.dv."""
    if q.dtype != np.float32:
        dq, dK, dV = attention_backward_ref(dy, q, store.k, store.v, store.keys, store.count, seq, qkey, y, lse)
        store.dk += dK
        store.dv += dV
        return dq
    by_seq = np.argsort(seq, kind="stable")
    starts = np.concatenate([[0], np.cumsum(np.bincount(seq, minlength=len(store.count)))])
    dq = np.empty_like(q)
    work = 4 * q.size * store.count.max(initial=1)
    kernel = kernels._sized(_attention_backward, _attention_backward_serial, work)
    kernel(dy, q, store.k, store.kt, store.vt, store.keys, store.count, seq, qkey, y, lse, by_seq, starts, dq,
           store.dk, store.dv)  # fmt: skip
    return dq
