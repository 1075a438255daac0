"""Every op's backward (ops.py) against central finite differences in float64, and the Numba attention kernels of
training against their NumPy pair."""

import numpy as np
import pytest

from radial_min import kernels, ops
from radial_min.cache import KVCache, order_key, read_backward, write_backward
from radial_min.blocks import Rows

RNG = np.random.default_rng(0)


def numeric_grad(f, x, h=1e-6, samples=None):
    """Central differences of scalar f() with respect to array x (changed in place and restored)."""
    flat = x.reshape(-1)
    idx = range(flat.size) if samples is None else RNG.choice(flat.size, size=min(samples, flat.size), replace=False)
    out = {}
    for i in idx:
        old = flat[i]
        flat[i] = old + h
        up = f()
        flat[i] = old - h
        down = f()
        flat[i] = old
        out[int(i)] = (up - down) / (2 * h)
    return out


def assert_grad(analytic, f, x, rtol=1e-6, samples=None):
    """The analytic gradient of f() with respect to x equals central differences (relative to max(1, |g|))."""
    numeric = numeric_grad(f, x, samples=samples)
    a = np.asarray(analytic).reshape(-1)
    for i, g in numeric.items():
        assert abs(a[i] - g) <= rtol * max(1.0, abs(g)), f"index {i}: analytic {a[i]} numeric {g}"


def projection(shape):
    """A fixed random direction: loss = sum(out * R) makes dL/dout = R, exercising every output element."""
    return RNG.standard_normal(shape)


def test_linear():
    x, w, b = RNG.standard_normal((3, 5)), RNG.standard_normal((4, 5)), RNG.standard_normal(4)
    R = projection((3, 4))
    np.testing.assert_allclose(ops.linear_forward(x, w, b), kernels.linear_ref(x, w, b))
    dx, dw, db = ops.linear_backward(R, x, w)
    for analytic, arr in ((dx, x), (dw, w), (db, b)):
        assert_grad(analytic, lambda: (ops.linear_forward(x, w, b) * R).sum(), arr)


@pytest.mark.parametrize("affine", [True, False])
def test_layernorm(affine):
    x = RNG.standard_normal((3, 6))
    w, b = (RNG.standard_normal(6), RNG.standard_normal(6)) if affine else (None, None)
    R = projection(x.shape)
    out, cache = ops.layernorm_forward(x, w, b, 1e-5)
    np.testing.assert_allclose(out, kernels.layernorm_ref(x, w, b, 1e-5), rtol=1e-5, atol=1e-5)
    dx, dw, db = ops.layernorm_backward(R, w, cache)

    def loss():
        return (ops.layernorm_forward(x, w, b, 1e-5)[0] * R).sum()

    for analytic, arr in ((dx, x), *(((dw, w), (db, b)) if affine else ())):
        assert_grad(analytic, loss, arr)


def test_rmsnorm():
    x, w = RNG.standard_normal((3, 6)), RNG.standard_normal(6)
    R = projection(x.shape)
    out, cache = ops.rmsnorm_forward(x, w, 1e-6)
    np.testing.assert_allclose(out, x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6) * w, rtol=1e-12)
    dx, dw = ops.rmsnorm_backward(R, w, cache)
    for analytic, arr in ((dx, x), (dw, w)):
        assert_grad(analytic, lambda: (ops.rmsnorm_forward(x, w, 1e-6)[0] * R).sum(), arr)


def test_rmsnorm_eps_matters_on_small_rows():
    """Rows of RMS ~1e-3 against eps 1e-6 (Llama's): eps moves the result by ~50%, so an eps dropped anywhere
    (the reference or the kernel) shows; the Numba kernel equals the reference."""
    x, w = (1e-3 * RNG.standard_normal((4, 16))).astype(np.float32), RNG.standard_normal(16).astype(np.float32)
    ref = kernels.rmsnorm_ref(x, w, 1e-6)
    np.testing.assert_allclose(kernels.rmsnorm(x, w, 1e-6), ref, rtol=1e-5, atol=1e-7)
    assert np.abs(kernels.rmsnorm_ref(x, w, 0.0) - ref).max() > 0.1 * np.abs(ref).max()


def test_rotary():
    n_head, D = 2, 8
    x, pos = RNG.standard_normal((5, n_head * D)), np.arange(5) * 3
    cos, sin = (a.astype(np.float64) for a in kernels.rope_angles(pos, D, 10000.0))
    R = projection(x.shape)
    out = ops.rotary_forward(x, n_head, cos, sin)
    np.testing.assert_allclose(out, kernels.rope_ref(x, n_head, cos, sin), rtol=1e-6, atol=1e-6)
    assert np.allclose(
        np.linalg.norm(out.reshape(5, n_head, 2, -1), axis=(2, 3)),
        np.linalg.norm(x.reshape(5, n_head, 2, -1), axis=(2, 3)),
    )
    assert_grad(
        ops.rotary_backward(R, n_head, cos, sin), lambda: (ops.rotary_forward(x, n_head, cos, sin) * R).sum(), x
    )


@pytest.mark.parametrize("name", ["relu", "gelu", "silu"])
def test_activations(name):
    u = RNG.standard_normal((3, 7))
    u[np.abs(u) < 1e-3] = 0.5  # away from relu's kink
    R = projection(u.shape)
    a, cache = ops.activation_forward(name, u)
    ref = {"relu": kernels.relu_ref, "gelu": kernels.gelu_ref, "silu": kernels.silu_ref}[name](u)
    np.testing.assert_allclose(a, ref, rtol=1e-6, atol=1e-6)
    assert_grad(ops.activation_backward(name, R, cache), lambda: (ops.activation_forward(name, u)[0] * R).sum(), u)


def test_swiglu():
    g, u = RNG.standard_normal((3, 7)), RNG.standard_normal((3, 7))
    R = projection(g.shape)
    h, cache = ops.swiglu_forward(g, u)
    np.testing.assert_allclose(h, g / (1 + np.exp(-g)) * u)
    dg, du = ops.swiglu_backward(R, cache)
    for analytic, arr in ((dg, g), (du, u)):
        assert_grad(analytic, lambda: (ops.swiglu_forward(g, u)[0] * R).sum(), arr)


def test_embedding():
    w, ids = RNG.standard_normal((10, 4)), np.array([1, 3, 1, 3, 9, 0])  # repeated ids: their rows accumulate
    R = projection((6, 4))
    assert_grad(ops.embedding_backward(R, ids, 10), lambda: (w[ids] * R).sum(), w)


@pytest.mark.parametrize("masked", [False, True])
def test_crossentropy(masked):
    logits, targets = RNG.standard_normal((6, 5)), np.array([0, 4, 2, 2, 1, 3])
    weights = np.array([1.0, 0.0, 1.0, 0.5, 0.0, 1.0]) if masked else None
    loss, cache = ops.crossentropy_forward(logits.copy(), targets, weights)
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    nll = -np.log(p[np.arange(6), targets])
    assert np.isclose(loss, nll.mean() if weights is None else (nll * weights).sum() / weights.sum())
    dlogits = ops.crossentropy_backward(cache)
    assert_grad(dlogits, lambda: ops.crossentropy_forward(logits.copy(), targets, weights)[0], logits)


# ------------------------------------------------------------------------------------- attention over a cache


def _entries(dtype, B=3, cap=9, Hkv=2, D=4, seed=1):
    """A cache partition by hand: per sequence, entries in key order (positions 0.., some with two steps)."""
    rng = np.random.default_rng(seed)

    class Store:
        pass

    s = Store()
    s.k, s.v = (rng.standard_normal((B, Hkv, cap, D)).astype(dtype) for _ in "kv")
    s.kt, s.vt = (np.ascontiguousarray(a.transpose(0, 1, 3, 2)) for a in (s.k, s.v))
    s.count = np.array([9, 4, 6])
    pos = np.array([0, 0, 1, 2, 2, 3, 4, 5, 6])
    step = np.array([0, 1, 0, 0, 1, 0, 0, 0, 0])
    s.keys = np.tile(order_key(pos, step), (B, 1))
    s.dk, s.dv = np.zeros_like(s.k), np.zeros_like(s.v)
    return s


def _queries(dtype, H=4, D=4, seed=2):
    rng = np.random.default_rng(seed)
    seq = np.array([0, 0, 0, 1, 2, 2, 0])  # several queries per sequence, one sequence alone
    key = order_key(np.array([0, 2, 6, 3, 1, 4, 2]), np.array([1, 0, 0, 0, 0, 0, 1]))
    return rng.standard_normal((len(seq), H, D)).astype(dtype), seq, key


def test_attention_reference_backward():
    """The NumPy pair: each query over the entries of its sequence with (position, step) up to its own, GQA heads
    sharing key/value heads; gradients of the queries and of every entry against finite differences."""
    s, (q, seq, key) = _entries(np.float64), _queries(np.float64)
    R = projection(q.shape)
    y, lse = ops.attention_forward_ref(q, s.k, s.v, s.keys, s.count, seq, key)
    np.testing.assert_allclose(y[0, 0], s.v[0, 0, :2].T @ _softmax(s.k[0, 0, :2] @ q[0, 0] / 2))  # sees 2 entries
    dq, dK, dV = ops.attention_backward_ref(R, q, s.k, s.v, s.keys, s.count, seq, key, y, lse)

    def loss():
        return (ops.attention_forward_ref(q, s.k, s.v, s.keys, s.count, seq, key)[0] * R).sum()

    for analytic, arr in ((dq, q), (dK, s.k), (dV, s.v)):
        assert_grad(analytic, loss, arr)


def _softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def test_attention_kernels_are_the_numpy_reference():
    """The Numba kernels (float32, in place, weights recomputed from lse, one task per sequence and key/value head
    in the backward) equal the NumPy pair."""
    s32, (q, seq, key) = _entries(np.float32), _queries(np.float32)
    s64 = _entries(np.float64)
    dy = RNG.standard_normal(q.shape).astype(np.float32)
    y, lse = ops.attention_forward(q, s32, seq, key)
    y_ref, lse_ref = ops.attention_forward_ref(q.astype(np.float64), s64.k, s64.v, s64.keys, s64.count, seq, key)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, lse_ref, rtol=1e-5, atol=1e-5)
    dq = ops.attention_backward(dy, q, s32, seq, key, y, lse)
    dq_ref, dK, dV = ops.attention_backward_ref(
        dy.astype(np.float64), q.astype(np.float64), s64.k, s64.v, s64.keys, s64.count, seq, key, y_ref, lse_ref
    )
    np.testing.assert_allclose(dq, dq_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(s32.dk, dK, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(s32.dv, dV, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("policy", ["per-layer", "per-step", "global"])
def test_cache_write_read_backward(policy):
    """Rounds of writes and reads through the KV cache, as a walk makes them: gradients of every query, key and
    value, entries read by later rounds included, against finite differences."""
    B, Hkv, H, D = 2, 1, 2, 4
    rounds = [  # (layer, seq, pos, step): token-major rounds, one row per sequence
        (0, [0, 1], [0, 0], 0),
        (1, [0, 1], [0, 0], 1),
        (0, [0, 1], [1, 1], 0),
        (1, [1], [1], 1),
        (0, [0, 1], [2, 2], 0),
    ]
    data = [[RNG.standard_normal((len(s), n)) for n in (H * D, Hkv * D, Hkv * D)] for _, s, _, _ in rounds]
    Rs = [projection((len(s), H * D)) for _, s, _, _ in rounds]

    def run(tape):
        cache = KVCache(policy, Hkv, D, batch=B, train=True, capacity=2)  # capacity grows as entries come
        outs = []
        for (layer, seq, pos, step), (q, k, v) in zip(rounds, data):
            t = []
            rows = Rows(np.array(pos), cache, step, np.array(seq))
            outs.append(cache.read(cache.write(layer, q, k, v, rows, t), t))
            tape.append(t)
        return outs

    tape = []
    outs = run(tape)
    grads = [None] * len(rounds)
    for r in reversed(range(len(rounds))):
        dq = read_backward(Rs[r], tape[r])
        grads[r] = (dq, *write_backward(tape[r]))

    def loss():
        return sum((a * R).sum() for a, R in zip(run([]), Rs))

    assert abs(loss() - sum((a * R).sum() for a, R in zip(outs, Rs))) < 1e-12
    for r in (0, 2, 4):
        for analytic, arr in zip(grads[r], data[r]):
            assert_grad(analytic, loss, arr)
