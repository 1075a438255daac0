"""The router MLP: its forward/backward against finite differences, masking, save/load, and the fused decision
kernel against the float64 reference."""

import numpy as np
import pytest

from radial_min import router as R
from radial_min.analysis import distill
from radial_min.errors import CheckpointError
from test_ops import assert_grad, projection

RNG = np.random.default_rng(0)


@pytest.fixture
def small():
    cfg = R.RouterConfig(width=6, n_blocks=4, hidden=5)
    params = {k: v.astype(np.float64) + 0.1 * RNG.standard_normal(v.shape) for k, v in R.init_router(cfg, 1).items()}
    prev = np.array([-1, 0, 2, 1, 3, -1, 1])
    step = np.array([0, 1, 2, 1, 4, 0, 2])
    z = R.features(RNG.standard_normal((7, 6)), prev, cfg.n_blocks)
    allowed = R.allowed_moves(prev, step, cfg)
    labels = np.array([0, 3, 4, 2, 4, 4, 4])
    return cfg, params, z, allowed, labels


def test_every_parameter_gradient_against_finite_differences(small):
    """Distillation's loss (cross-entropy on the oracle's moves) through the MLP pair: every entry of every
    parameter (the router is small)."""
    cfg, params, z, allowed, labels = small
    _, grads = distill.loss_and_grads(params, z, allowed, labels)
    for name, p in params.items():
        assert_grad(grads[name], lambda: distill.loss_and_grads(params, z, allowed, labels)[0], p, rtol=1e-5)


@pytest.mark.parametrize("forward_only", [True, False])
def test_probabilities_backward(forward_only):
    """A co-trained router's training path: the softmax over allowed moves, and the gradient of the states (through
    the parameter-free layer norm of the features) and of every parameter."""
    cfg = R.RouterConfig(8, 4, hidden=6, forward_only=forward_only, max_depth=3)
    params = {k: v.astype(np.float64) + 0.7 * RNG.standard_normal(v.shape) for k, v in R.init_router(cfg, 3).items()}
    router = R.Router(cfg, params)
    x, prev, step = RNG.standard_normal((5, 8)), np.array([-1, 0, 1, 2, 3]), np.array([0, 1, 1, 3, 3])
    D = projection((5, 5))
    tape = []
    probs = router.probabilities(x, prev, step, tape)
    assert np.allclose(probs.sum(-1), 1) and probs[3:, :4].max() == 0  # step 3 = max_depth: EXIT only
    assert (probs.argmax(-1)[:3] > prev[:3]).all() if forward_only else probs[1:3, 0].min() > 0  # reuse: block 0
    router.grad = {k: np.zeros_like(a) for k, a in params.items()}
    dx = router.backward(D, tape)

    def loss():
        return (router.probabilities(x, prev, step, []) * D).sum()

    for analytic, arr in ((dx, x), *((router.grad[k], params[k]) for k in params)):
        assert_grad(analytic, loss, arr)


def test_allowed_moves(small):
    cfg, params, z, allowed, labels = small
    # forward only: after block 2 only blocks 3 and EXIT; at max depth (4 = n_blocks) only EXIT
    assert allowed[2].tolist() == [False, False, False, True, True]
    assert allowed[4].tolist() == [False, False, False, False, True]
    assert allowed[0].tolist() == [True] * 5
    logits, _ = R.mlp_forward(params, z, allowed)
    assert (logits.argmax(-1)[:, None] == np.arange(5)[None])[~allowed].sum() == 0
    free = R.RouterConfig(width=6, n_blocks=4, forward_only=False, max_depth=9)
    assert R.allowed_moves(np.array([3]), np.array([1]), free)[0].all()


def test_save_and_load(tmp_path, small):
    cfg, params, z, allowed, labels = small
    router = R.Router(cfg, {k: v.astype(np.float32) for k, v in params.items()})
    router.save(tmp_path / "r")
    back = R.Router.load(tmp_path / "r.safetensors")
    assert back.config == cfg
    x = RNG.standard_normal((3, 6))
    np.testing.assert_array_equal(back.choose(x, [-1, 0, 1], [0, 1, 1]), router.choose(x, [-1, 0, 1], [0, 1, 1]))
    router.save(tmp_path / "router-tau0.2")  # a dot in the name is not a file ending
    written = sorted(p.name for p in tmp_path.glob("router-tau0.2*"))
    assert written == ["router-tau0.2.json", "router-tau0.2.safetensors"]
    assert R.Router.load(tmp_path / "router-tau0.2.json").config == cfg
    (tmp_path / "r.json").write_text('{"width": 6, "n_blocks": 5}')
    with pytest.raises(CheckpointError, match=r"r.safetensors: tensors .* do not match r.json, expected"):
        R.Router.load(tmp_path / "r")
    with pytest.raises(CheckpointError, match="not found"):
        R.Router.load(tmp_path / "missing")


def test_fused_choose_is_the_float64_reference():
    """`Router.decide` (the float32 Numba kernel) picks what the float64 training path's masked argmax picks,
    with the softmax's probability of it, over random states, every previous block and depths up to past the
    limit, for both mask kinds."""
    rng = np.random.default_rng(3)
    for forward_only in (True, False):
        cfg = R.RouterConfig(width=16, n_blocks=6, hidden=8, forward_only=forward_only, max_depth=5)
        init = R.init_router(cfg, 2)
        params = {k: v + 0.3 * rng.standard_normal(v.shape).astype(np.float32) for k, v in init.items()}
        router = R.Router(cfg, params)
        n = 400
        x = (3 * rng.standard_normal((n, 16)) + 1).astype(np.float32)
        prev, depth = rng.integers(-1, 6, n), rng.integers(0, 7, n)
        ref = router.logits(x, prev, depth)
        top2 = np.sort(ref, -1)[:, -2:]
        clear = top2[:, 1] - top2[:, 0] > 1e-4  # float32 may flip only near-exact ties
        got, prob = router.decide(x, prev, depth)
        assert clear.mean() > 0.95
        np.testing.assert_array_equal(got[clear], ref.argmax(-1)[clear])
        np.testing.assert_array_equal(router.choose(x, prev, depth), got)
        assert (got[depth >= 5] == cfg.exit).all()
        softmax = np.exp(ref - ref.max(-1, keepdims=True))
        softmax /= softmax.sum(-1, keepdims=True)  # the gate: the probability of the chosen move
        np.testing.assert_allclose(prob[clear], softmax.max(-1)[clear], rtol=1e-5)
        assert (prob[depth >= 5] == 1).all() and (prob > 0).all() and (prob <= 1 + 1e-6).all()
