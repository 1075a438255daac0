"""The training-time Radial Network: every new backward against central finite differences in float64."""
import numpy as np
import pytest

from radial_min import radial_train as rt
from radial_min.config import OPTConfig
from radial_min.router import RouterConfig, init_router
from radial_min.train import init_params
from test_backprop import assert_grad, projection

RNG = np.random.default_rng(5)
N_BLOCKS, E = 4, 8


def tiny(seed=3):
    cfg = OPTConfig(vocab_size=23, hidden_size=E, num_hidden_layers=N_BLOCKS // 2, num_attention_heads=2, ffn_dim=12,
                    max_position_embeddings=8, word_embed_proj_dim=E)  # fmt: skip
    rng = np.random.default_rng(seed)
    params = {k: v.astype(np.float64) + 0.3 * rng.standard_normal(v.shape) for k, v in init_params(cfg, seed).items()}
    router = {k: v.astype(np.float64) + 0.5 * rng.standard_normal(v.shape)
              for k, v in init_router(RouterConfig(E, N_BLOCKS, hidden=6), seed).items()}  # fmt: skip
    return cfg, params, router


def test_decision_backward():
    _, _, R = tiny()
    x, prev, depth = RNG.standard_normal((5, E)), np.array([-1, 0, 1, 2, 3]), np.array([0, 1, 1, 3, 3])
    D = projection((5, N_BLOCKS + 1))
    probs, choice, cache = rt.decide_forward(x, prev, depth, R, N_BLOCKS, 3)
    assert np.allclose(probs.sum(-1), 1) and (choice > prev).all() and probs[3:, :N_BLOCKS].max() < 1e-12  # depth 3: EXIT
    dx, g = rt.decide_backward(D, cache, R)

    def loss():
        return (rt.decide_forward(x, prev, depth, R, N_BLOCKS, 3)[0] * D).sum()

    for analytic, arr in ((dx, x), *((g[k], R[k]) for k in R)):
        assert_grad(analytic, loss, arr)


@pytest.mark.parametrize("kind", ["att", "ffn"])
def test_gated_block_backward(kind):
    """y = x + p f(x) over rows of several sequences: gather by sequence, gate, scatter back."""
    cfg, params, _ = tiny()
    from radial_min.train import block_weights

    w = block_weights(params, 0, kind)
    x, seq, p = RNG.standard_normal((6, E)), np.array([0, 0, 0, 2, 2, 3]), RNG.uniform(0.2, 1, 6)
    D = projection((6, E))
    y, cache = rt.gated_block_forward(x, seq, p, w, kind, cfg, rt.bp.ATTENTION_NUMPY)
    dx, dp, g = rt.gated_block_backward(D, cache)

    def loss():
        return (rt.gated_block_forward(x, seq, p, w, kind, cfg, rt.bp.ATTENTION_NUMPY)[0] * D).sum()

    for analytic, arr in ((dx, x), (dp, p), *((g[k], w[k]) for k in w)):
        assert_grad(analytic, loss, arr)


@pytest.mark.parametrize("max_depth,cost", [(None, 0.0), (2, 0.3)])
def test_whole_radial_network_gradients(max_depth, cost):
    """End to end: every block parameter and the router, sampled entries, with the compute term on and off."""
    cfg, params, router = tiny()
    rcfg = rt.RadialTrainConfig(max_depth=max_depth, cost=cost)
    batch = RNG.integers(0, cfg.vocab_size, size=(2, 7))
    loss, G, GR, routes = rt.loss_and_grads(params, router, cfg, rcfg, batch)
    assert set(G) == set(params) and (routes >= -1).all()
    ran = routes[routes >= 0]
    assert len(np.unique(ran)) > 1, "the tiny router should spread tokens over several blocks"

    def f():
        return rt.loss_and_grads(params, router, cfg, rcfg, batch, need_grads=False)[0]

    for name, p in params.items():
        assert_grad(G[name], f, p, rtol=1e-5, samples=4)
    for name, p in router.items():
        assert_grad(GR[name], f, p, rtol=1e-5, samples=8)


def test_router_that_runs_every_block_is_the_sequential_model():
    """A router that always picks the next block (p = 1 - O(e^-60)) makes the radial network the sequential
    model: same loss as train.loss_and_grads, same gradients, every token routed 0, 1, ..., N - 1."""
    from radial_min.train import loss_and_grads

    cfg, params, _ = tiny()
    hidden = N_BLOCKS + 1
    router = {"w1": np.concatenate([np.zeros((hidden, E)), 60 * np.eye(hidden)], axis=1), "b1": np.zeros(hidden),
              "w2": np.roll(np.eye(hidden), 0), "b2": np.zeros(hidden)}  # a = 60 onehot(prev + 1): pick block prev + 1
    batch = RNG.integers(0, cfg.vocab_size, size=(2, 7))
    loss, G, _, routes = rt.loss_and_grads(params, router, cfg, rt.RadialTrainConfig(), batch)
    ref_loss, ref_G = loss_and_grads(params, cfg, batch, fast=False)
    assert (routes == np.arange(N_BLOCKS)).all()
    assert abs(loss - ref_loss) < 1e-10
    for name in ref_G:
        np.testing.assert_allclose(G[name], ref_G[name], rtol=1e-8, atol=1e-10)
