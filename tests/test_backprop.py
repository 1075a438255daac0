"""Every backward pass against central finite differences in float64, op by op and for a whole small model."""

import re
from pathlib import Path

import numpy as np
import pytest

from radial_min import backprop as bp
from radial_min.config import OPTConfig
from radial_min.models.opt import expected_tensors
from radial_min.opt_backprop import init_params, loss_and_grads

ROOT = Path(__file__).resolve().parent.parent

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
    numeric = numeric_grad(f, x, samples=samples)
    a = analytic.reshape(-1)
    for i, g in numeric.items():
        assert abs(a[i] - g) <= rtol * max(1.0, abs(g)), f"index {i}: analytic {a[i]} numeric {g}"


def projection(shape):
    """A fixed random direction: loss = sum(out * R) makes dL/dout = R, exercising every output element."""
    return RNG.standard_normal(shape)


def test_linear():
    x, w, b = RNG.standard_normal((2, 3, 5)), RNG.standard_normal((4, 5)), RNG.standard_normal(4)
    R = projection((2, 3, 4))
    out, cache = bp.linear_forward(x, w, b)
    assert np.allclose(out, np.einsum("bti,oi->bto", x, w) + b)
    dx, dw, db = bp.linear_backward(R, cache)

    def loss():
        return (bp.linear_forward(x, w, b)[0] * R).sum()

    for analytic, arr in ((dx, x), (dw, w), (db, b)):
        assert_grad(analytic, loss, arr)


def test_layernorm():
    x, w, b = RNG.standard_normal((2, 3, 6)), RNG.standard_normal(6), RNG.standard_normal(6)
    R = projection(x.shape)
    out, cache = bp.layernorm_forward(x, w, b)
    xhat = (out - b) / w
    assert np.allclose(xhat.mean(-1), 0) and np.allclose(xhat.var(-1), 1, atol=1e-4)
    dx, dw, db = bp.layernorm_backward(R, cache)

    def loss():
        return (bp.layernorm_forward(x, w, b)[0] * R).sum()

    for analytic, arr in ((dx, x), (dw, w), (db, b)):
        assert_grad(analytic, loss, arr)


def test_relu():
    x = RNG.standard_normal((3, 7))
    x[np.abs(x) < 1e-3] = 0.5  # keep away from the kink where the derivative is undefined
    R = projection(x.shape)
    out, mask = bp.relu_forward(x)
    assert np.array_equal(out, np.where(x > 0, x, 0))
    assert_grad(bp.relu_backward(R, mask), lambda: (bp.relu_forward(x)[0] * R).sum(), x)


def test_embedding():
    wte, wpe = RNG.standard_normal((10, 4)), RNG.standard_normal((8, 4))
    ids, pos = np.array([[1, 3, 1], [3, 9, 0]]), np.arange(3)  # token 1 and 3 repeat: their rows accumulate
    R = projection((2, 3, 4))
    out, cache = bp.embedding_forward(ids, wte, wpe, pos)
    assert np.allclose(out[1, 2], wte[0] + wpe[4])
    dwte, dwpe = bp.embedding_backward(R, cache, wte.shape, wpe.shape)

    def loss():
        return (bp.embedding_forward(ids, wte, wpe, pos)[0] * R).sum()

    assert_grad(dwte, loss, wte)
    assert_grad(dwpe, loss, wpe)


def test_attention():
    B, T, E, H = 2, 5, 8, 2
    qkv = RNG.standard_normal((B, T, 3 * E))
    R = projection((B, T, E))
    y, cache = bp.attention_forward(qkv, H)
    # causality: the first token attends only to itself, so its output is its own value
    assert np.allclose(y[:, 0], qkv[:, 0, 2 * E :])
    dqkv = bp.attention_backward(R, cache)
    assert_grad(dqkv, lambda: (bp.attention_forward(qkv, H)[0] * R).sum(), qkv)


def test_crossentropy():
    logits, targets = RNG.standard_normal((6, 5)), np.array([0, 4, 2, 2, 1, 3])
    loss, cache = bp.crossentropy_forward(logits.copy(), targets)
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    assert np.isclose(loss, -np.log(p[np.arange(6), targets]).mean())
    dlogits = bp.crossentropy_backward(cache)
    assert_grad(dlogits, lambda: bp.crossentropy_forward(logits.copy(), targets)[0], logits)


def _block_weights(kind, E=8, F=12):
    if kind == "att":
        shapes = {"ln.w": (E,), "ln.b": (E,), "qkv.w": (3 * E, E), "qkv.b": (3 * E,), "out.w": (E, E), "out.b": (E,)}
    else:
        shapes = {"ln.w": (E,), "ln.b": (E,), "fc1.w": (F, E), "fc1.b": (F,), "fc2.w": (E, F), "fc2.b": (E,)}
    return {k: RNG.standard_normal(s) * 0.5 for k, s in shapes.items()}


@pytest.mark.parametrize("pre_norm", [True, False])
@pytest.mark.parametrize("kind", ["att", "ffn"])
def test_block_forward_backward(kind, pre_norm):
    """A whole residual block, y = x + f(x) (pre-LN) or LN(x + f(x)) (post-LN), against finite differences for
    its input and every weight."""
    B, T, E, H = 2, 4, 8, 2
    x, w, R = RNG.standard_normal((B, T, E)), _block_weights(kind), projection((B, T, E))
    if kind == "att":
        forward = lambda: bp.attention_block_forward(x, w, H, bp.ATTENTION_NUMPY, pre_norm)  # noqa: E731
    else:
        forward = lambda: bp.ffn_block_forward(x, w, pre_norm)  # noqa: E731
    y, cache = forward()
    dx, g = (bp.attention_block_backward if kind == "att" else bp.ffn_block_backward)(R, cache)
    assert set(g) == set(w)
    for analytic, arr in ((dx, x), *((g[k], w[k]) for k in w)):
        assert_grad(analytic, lambda: (forward()[0] * R).sum(), arr)


@pytest.mark.slow
def test_block_forward_is_the_engine_block(tiny_model):
    """Training's block forward and the inference engine's block (blocks.py, Numba kernels) agree."""
    from radial_min.models.opt import OPT
    from radial_min.blocks import Step
    from radial_min.opt_backprop import block_forward, block_weights, blocks_of

    cfg, params, batch = tiny_model
    model = OPT(cfg, {k: v.astype(np.float32) for k, v in params.items()})
    x = RNG.standard_normal((1, 6, cfg.hidden_size))
    for block, (layer, kind) in zip(model.blocks, blocks_of(cfg)):
        assert (block.layer, block.kind) == (layer, kind)
        y, _ = block_forward(x, block_weights(params, layer, kind), kind, cfg, bp.ATTENTION_NUMPY)
        y_engine = block(x[0].astype(np.float32), Step(np.arange(6)))
        np.testing.assert_allclose(y_engine, y[0], rtol=1e-4, atol=1e-4)
        x = y


@pytest.mark.slow
def test_fast_attention_matches_numpy():
    """The Numba attention kernels used in training agree with the NumPy ones checked above."""
    B, T, E, H = 3, 17, 32, 4
    qkv = RNG.standard_normal((B, T, 3 * E)).astype(np.float32)
    dy = RNG.standard_normal((B, T, E)).astype(np.float32)
    y_ref, c_ref = bp.attention_forward(qkv, H)
    y, c = bp.attention_forward_fast(qkv, H)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    dqkv = bp.attention_backward_fast(dy, c)
    np.testing.assert_allclose(dqkv, bp.attention_backward(dy, c_ref), rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module", params=[True, False], ids=["pre-LN", "post-LN"])
def tiny_model(request):
    cfg = OPTConfig(
        vocab_size=23,
        hidden_size=8,
        num_hidden_layers=2,
        num_attention_heads=2,
        ffn_dim=12,
        max_position_embeddings=8,
        word_embed_proj_dim=8,
        do_layer_norm_before=request.param,
    )
    params = {k: v.astype(np.float64) for k, v in init_params(cfg, seed=3).items()}
    for k, v in params.items():  # move off the init (zero biases, unit norms) so every term matters
        v += 0.3 * RNG.standard_normal(v.shape)
    batch = RNG.integers(0, cfg.vocab_size, size=(2, 7))
    return cfg, params, batch


def test_whole_model_gradients(tiny_model):
    """End to end: every parameter of a 2-layer OPT, sampled entries, against finite differences."""
    cfg, params, batch = tiny_model
    loss, grads = loss_and_grads(params, cfg, batch, fast=False)
    assert set(grads) == set(params)

    def loss_only():
        return loss_and_grads(params, cfg, batch, need_grads=False, fast=False)[0]

    for name, p in params.items():
        assert grads[name].shape == p.shape, name
        assert_grad(grads[name], loss_only, p, rtol=1e-5, samples=6)


def test_training_loss_matches_inference_engine(tiny_model):
    """The trainer's forward and the engine's forward (kernels, blocks) are one model: same loss."""
    from radial_min.models.opt import OPT

    cfg, params, batch = tiny_model
    loss, _ = loss_and_grads(params, cfg, batch, need_grads=False, fast=False)
    model = OPT(cfg, {k: v.astype(np.float32) for k, v in params.items()})
    nll = []
    for row in batch:
        logits = model.forward(row[:-1]).astype(np.float64)
        top = logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits - top).sum(-1, keepdims=True)) - top
        nll.extend(-logp[np.arange(len(row) - 1), row[1:]])
    assert abs(np.mean(nll) - loss) < 1e-5


def test_the_position_offset_is_named_once():
    """OPT's position table is opt.POSITION_OFFSET rows longer than the context: the trainer's init makes the shapes
    the loader expects, and no file sizes the table with a literal offset of its own."""
    cfg = OPTConfig(
        vocab_size=11, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, ffn_dim=16, max_position_embeddings=7
    )
    assert {k: a.shape for k, a in init_params(cfg, 0).items()} == expected_tensors(cfg)[0]
    literal = re.compile(r"(max_position_embeddings|max_positions|\(T) \+ 2\b")
    files = [ROOT / "cli.py", *sorted((ROOT / "radial_min").glob("*.py")), *sorted((ROOT / "tools").glob("*.py"))]
    found = [
        f"{f.relative_to(ROOT)}:{i}: {line.strip()}"
        for f in files
        for i, line in enumerate(f.read_text().splitlines(), 1)
        if literal.search(line)
    ]
    assert found == []
