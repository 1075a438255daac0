"""The training-time Radial Network: every new backward against central finite differences in float64, op by op
(the router's decision, attention over the unified cache in both of its forms, the gated residual join) and end
to end on tiny networks under every policy; the three orders of rounds against each other; causality; and a
router that runs every block in order is the sequential trainer."""

import numpy as np
import pytest

from radial_min import backprop as bp
from radial_min import radial_train as rt
from radial_min.config import OPTConfig
from radial_min.router import RouterConfig, init_router
from radial_min.opt_backprop import init_params
from test_backprop import assert_grad, projection

RNG = np.random.default_rng(5)
N_BLOCKS, E, H = 4, 8, 2


def tiny(seed=3, pre_norm=True, **rcfg):
    """A 2-layer OPT (4 blocks), its router and a radial config, all perturbed off their init in float64."""
    cfg = OPTConfig(
        vocab_size=23,
        hidden_size=E,
        num_hidden_layers=N_BLOCKS // 2,
        num_attention_heads=H,
        ffn_dim=12,
        max_position_embeddings=8,
        word_embed_proj_dim=E,
        do_layer_norm_before=pre_norm,
    )
    rcfg = rt.RadialTrainConfig(**{"router_hidden": 6, **rcfg})
    rng = np.random.default_rng(seed)
    params = {k: v.astype(np.float64) + 0.3 * rng.standard_normal(v.shape) for k, v in init_params(cfg, seed).items()}
    router = {
        k: v.astype(np.float64) + 0.7 * rng.standard_normal(v.shape)
        for k, v in init_router(rcfg.router_config(cfg), seed).items()
    }
    return cfg, params, router, rcfg


@pytest.mark.parametrize("forward_only", [True, False])
def test_decision_backward(forward_only):
    _, _, R, _ = tiny()
    rc = RouterConfig(E, N_BLOCKS, hidden=6, forward_only=forward_only, max_depth=3)
    x, prev, depth = RNG.standard_normal((5, E)), np.array([-1, 0, 1, 2, 3]), np.array([0, 1, 1, 3, 3])
    D = projection((5, N_BLOCKS + 1))
    probs, choice, cache = rt.decide_forward(x, prev, depth, R, rc)
    assert np.allclose(probs.sum(-1), 1) and probs[3:, :N_BLOCKS].max() == 0  # depth 3 = max_depth: EXIT only
    assert (choice[:3] > prev[:3]).all() if forward_only else probs[1:3, 0].min() > 0  # reuse: block 0 allowed again
    dx, g = rt.decide_backward(D, cache, R)

    def loss():
        return (rt.decide_forward(x, prev, depth, R, rc)[0] * D).sum()

    for analytic, arr in ((dx, x), *((g[k], R[k]) for k in R)):
        assert_grad(analytic, loss, arr)


@pytest.mark.parametrize("pre_norm", [True, False])
def test_gated_residual_backward(pre_norm):
    """y = x + p f (pre-LN) or LN(x + p f) (post-LN), with the router's gate p per row."""
    x, f, p = RNG.standard_normal((5, E)), RNG.standard_normal((5, E)), RNG.uniform(0.1, 1, 5)
    w = {"ln.w": RNG.standard_normal(E), "ln.b": RNG.standard_normal(E)}
    D = projection((5, E))
    y, cache = bp.residual_forward(x, f, w, pre_norm, p)
    dx, df, dp, g = bp.residual_backward(D, cache)
    assert set(g) == (set() if pre_norm else {"ln.w", "ln.b"})

    def loss():
        return (bp.residual_forward(x, f, w, pre_norm, p)[0] * D).sum()

    for analytic, arr in ((dx, x), (df, f), (dp, p), *((g[k], w[k]) for k in g)):
        assert_grad(analytic, loss, arr)


def test_dense_attention_backward():
    """One round's rows scattered by (sequence, position), causal attention among the rows present, gathered."""
    B, T = 3, 5
    seq, pos = np.array([0, 0, 0, 2, 2, 1]), np.array([0, 2, 3, 1, 4, 3])
    q, k, v = (RNG.standard_normal((6, E)) for _ in range(3))
    D = projection((6, E))
    a, cache = rt.dense_attention_forward(q, k, v, seq, pos, B, T, H)
    np.testing.assert_allclose(a[0], v[0])  # the first row of sequence 0 sees only itself
    np.testing.assert_allclose(a[5], v[5])  # the only row of sequence 1 too: other sequences are invisible
    grads = rt.dense_attention_backward(D, cache)

    def loss():
        return (rt.dense_attention_forward(q, k, v, seq, pos, B, T, H)[0] * D).sum()

    for analytic, arr in zip(grads, (q, k, v)):
        assert_grad(analytic, loss, arr)


@pytest.mark.parametrize("policy", ["global", "per-layer", "per-step"])
def test_history_attention_backward(policy):
    """Token-major rounds over the history of entries: each round appends one entry per sequence and its queries
    read what the policy shows of everything written so far; gradients reach entries from later rounds' queries."""
    B, rounds = 3, 6
    seqs = [np.array(s) for s in ([0, 1, 2], [0, 2], [1], [0, 1, 2], [2, 0], [1, 2])]
    layers = [RNG.integers(0, 2, len(s)) for s in seqs]
    steps = [RNG.integers(0, 3, len(s)) for s in seqs]
    qkv = [[RNG.standard_normal((len(s), E)) for _ in range(3)] for s in seqs]
    Ds = [projection((len(s), E)) for s in seqs]

    def run():
        hist = rt._History(B, rounds, E, H, np.float64, fast=False)
        outs = [hist.attend_forward(*qkv[r], seqs[r], layers[r], steps[r], policy) for r in range(rounds)]
        return hist, outs

    hist, outs = run()
    grads = [None] * rounds
    for r in reversed(range(rounds)):
        grads[r] = hist.attend_backward(Ds[r], outs[r][1])

    def loss():
        return sum((a * D).sum() for (a, _), D in zip(run()[1], Ds))

    for r in (0, 2, 5):
        for analytic, arr in zip(grads[r], qkv[r]):
            assert_grad(analytic, loss, arr)


@pytest.mark.parametrize("policy", ["global", "per-layer", "per-step"])
def test_history_kernels_are_the_numpy_reference(policy):
    """The Numba history attention (in place, weights recomputed from the log-normaliser) equals the NumPy
    reference over gathered copies, forward and backward, over many rounds."""
    B, rounds, En, Hn = 5, 40, 32, 4
    rng = np.random.default_rng(1)
    plan = [np.sort(rng.choice(B, rng.integers(1, B + 1), replace=False)) for _ in range(rounds)]
    data = [
        (
            rng.standard_normal((len(s), 3, En)).astype(np.float32),
            rng.integers(0, 3, len(s)),
            rng.integers(0, 4, len(s)),
            rng.standard_normal((len(s), En)).astype(np.float32),
        )
        for s in plan
    ]
    results = []
    for fast in (False, True):
        hist = rt._History(B, rounds, En, Hn, np.float32, fast)
        outs = [
            hist.attend_forward(*qkv.transpose(1, 0, 2), s, layer, step, policy)
            for s, (qkv, layer, step, _) in zip(plan, data)
        ]
        grads = [hist.attend_backward(D, c) for (_, c), (_, _, _, D) in zip(reversed(outs), reversed(data))]
        results.append(([a for a, _ in outs], grads))
    for a, b in zip(results[0][0], results[1][0]):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    for ga, gb in zip(results[0][1], results[1][1]):
        for a, b in zip(ga, gb):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


CASES = [  # (policy, forward_only, pre-LN, max_depth, cost, step-encoding scale)
    ("global", False, True, 6, 0.3, 1.0),
    ("global", False, False, 5, 0.0, 2.0),
    ("per-layer", False, True, 6, 0.2, 1.0),
    ("per-layer", True, True, None, 0.3, 1.0),
    ("per-step", False, False, 6, 0.1, 1.0),
    ("per-step", True, True, 3, 0.0, 1.0),
]


@pytest.mark.parametrize("policy,forward_only,pre_norm,max_depth,cost,scale", CASES)
@pytest.mark.slow
def test_whole_radial_network_gradients(policy, forward_only, pre_norm, max_depth, cost, scale):
    """End to end: every block parameter, the embeddings and the router, sampled entries, against finite
    differences, under every policy, with and without reuse, pre- and post-LN, with the compute term (and, for
    the first case, its pull toward a depth target)."""
    target = {"target_depth": 2.0, "depth_weight": 0.3} if (policy, pre_norm, cost) == ("global", True, 0.3) else {}
    cfg, params, router, rcfg = tiny(
        pre_norm=pre_norm,
        cache_policy=policy,
        forward_only=forward_only,
        max_depth=max_depth,
        cost=cost,
        step_encoding_scale=scale,
        **target,
    )
    batch = np.random.default_rng(7).integers(0, cfg.vocab_size, size=(2, 8))
    loss, G, GR, info = rt.loss_and_grads(params, router, cfg, rcfg, batch, fast=False)
    assert set(G) == set(params)
    ran = info["routes"][info["routes"] >= 0]
    assert len(np.unique(ran)) > 1, "the tiny router should spread tokens over several blocks"

    def f():
        return rt.loss_and_grads(params, router, cfg, rcfg, batch, need_grads=False, fast=False)[0]

    for name, p in params.items():
        assert_grad(G[name], f, p, rtol=1e-5, samples=3)
    for name, p in router.items():
        assert_grad(GR[name], f, p, rtol=1e-5, samples=6)


def test_explore_swaps_block_moves_for_other_allowed_blocks():
    """Every block move is swapped at share 1, for another allowed block (probability > 0), drawn uniformly;
    EXIT moves stay, and at share 0 nothing changes."""
    rng = np.random.default_rng(0)
    r, N = 6000, N_BLOCKS
    probs = rng.uniform(0.1, 1, (r, N + 1))
    probs[: r // 2, 0] = 0  # forward-only after block 0, say: block 0 not allowed for the first half
    probs /= probs.sum(1, keepdims=True)
    moves = rng.integers(0, N + 1, r)
    moves[: r // 2] = np.maximum(moves[: r // 2], 1)
    np.testing.assert_array_equal(rt.explore(moves, probs, 0.0, rng), moves)
    got = rt.explore(moves, probs, 1.0, rng)
    exits = moves == N
    np.testing.assert_array_equal(got[exits], N)
    assert (got[~exits] != moves[~exits]).all() and (got[~exits] < N).all()
    assert (probs[np.arange(r), got] > 0).all()
    first = ~exits & (np.arange(r) < r // 2)  # 2 other allowed blocks each: each drawn half the time
    assert (got[first] != 0).all()
    for m in range(1, N):
        share = (got[first & (moves == m)] == (1 if m != 1 else 2)).mean()
        assert abs(share - 0.5) < 0.06
    half = rt.explore(moves, probs, 0.5, rng)
    assert abs((half != moves)[~exits].mean() - 0.5) < 0.03


@pytest.mark.slow
def test_explored_network_gradients():
    """With exploration the swapped blocks run gated by their own probability: the gradients stay exact (the same
    draws at each finite-difference evaluation), the routes differ from the router's argmax ones, and without a
    generator (evaluation) the network does not explore."""
    cfg, params, router, rcfg = tiny(cache_policy="global", max_depth=6, cost=0.2, explore=0.5)
    batch = np.random.default_rng(7).integers(0, cfg.vocab_size, size=(2, 8))

    def run(need_grads=True, rng_seed=11, **kw):
        rng = None if rng_seed is None else np.random.default_rng(rng_seed)
        return rt.loss_and_grads(params, router, cfg, rcfg, batch, need_grads, fast=False, rng=rng, **kw)

    loss, G, GR, info = run()
    plain = rt.RadialTrainConfig(**{**vars(rcfg), "explore": 0.0})
    base = rt.loss_and_grads(params, router, cfg, plain, batch, fast=False)
    assert (info["routes"] != base[3]["routes"]).any()
    evaluated = run(need_grads=False, rng_seed=None)
    assert evaluated[0] == base[0]
    np.testing.assert_array_equal(evaluated[3]["routes"], base[3]["routes"])

    def f():
        return run(need_grads=False)[0]

    for name, p in params.items():
        assert_grad(G[name], f, p, rtol=1e-5, samples=3)
    for name, p in router.items():
        assert_grad(GR[name], f, p, rtol=1e-5, samples=6)


@pytest.mark.parametrize("policy,forward_only", [("per-step", False), ("per-step", True), ("per-layer", True)])
def test_fast_schedules_equal_token_major(policy, forward_only):
    """Step-major (per-step) and block-major (forward-only per-layer) rounds compute exactly what the token-major
    rounds, valid for every policy, compute: the same routes, loss and gradients."""
    cfg, params, router, rcfg = tiny(
        cache_policy=policy, forward_only=forward_only, cost=0.2, max_depth=None if forward_only else 6
    )
    batch = np.random.default_rng(8).integers(0, cfg.vocab_size, size=(3, 8))
    assert rcfg.schedule != "token"
    fast = rt.loss_and_grads(params, router, cfg, rcfg, batch, fast=False)
    slow = rt.loss_and_grads(params, router, cfg, rcfg, batch, schedule="token", fast=False)
    np.testing.assert_array_equal(fast[3]["routes"], slow[3]["routes"])
    assert abs(fast[0] - slow[0]) < 1e-12
    for a, b in ((fast[1], slow[1]), (fast[2], slow[2])):
        for name in a:
            np.testing.assert_allclose(a[name], b[name], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("policy,forward_only", [("global", False), ("per-layer", False), ("per-step", True)])
def test_causal(policy, forward_only):
    """Changing tokens after position t changes nothing at positions <= t: neither routes nor logits."""
    cfg, params, router, rcfg = tiny(cache_policy=policy, forward_only=forward_only, max_depth=6)
    ids = np.random.default_rng(9).integers(0, cfg.vocab_size, size=(2, 8))
    other = ids.copy()
    other[:, 5:] = (ids[:, 5:] + 7) % cfg.vocab_size
    (la, na, _), (lb, nb, _) = (rt.forward(params, router, cfg, rcfg, a, fast=False) for a in (ids, other))
    early = (np.arange(16) % 8) <= 4
    np.testing.assert_array_equal(na.routes[early], nb.routes[early])
    np.testing.assert_allclose(la[early], lb[early], rtol=1e-12)
    assert np.abs(la[~early] - lb[~early]).max() > 1e-3


@pytest.mark.parametrize("schedule", ["block", "token"])
def test_router_that_runs_every_block_is_the_sequential_model(schedule):
    """A router that always picks the next block (p = 1 - O(e^-60)) under the per-layer policy makes the radial
    network the sequential model: same loss as opt_backprop.loss_and_grads, same gradients, routes 0, 1, ..., N - 1."""
    from radial_min.opt_backprop import loss_and_grads

    cfg, params, _, rcfg = tiny(cache_policy="per-layer", forward_only=True)
    hidden = N_BLOCKS + 1
    router = {
        "w1": np.concatenate([np.zeros((hidden, E)), 60 * np.eye(hidden)], axis=1),
        "b1": np.zeros(hidden),
        "w2": np.eye(hidden),
        "b2": np.zeros(hidden),
    }  # a = 60 onehot(prev + 1): pick block prev + 1
    rcfg.router_hidden = hidden
    batch = RNG.integers(0, cfg.vocab_size, size=(2, 7))
    loss, G, _, info = rt.loss_and_grads(params, router, cfg, rcfg, batch, schedule=schedule, fast=False)
    ref_loss, ref_G = loss_and_grads(params, cfg, batch, fast=False)
    assert (info["routes"] == np.arange(N_BLOCKS)).all()
    assert abs(loss - ref_loss) < 1e-10
    for name in ref_G:
        np.testing.assert_allclose(G[name], ref_G[name], rtol=1e-8, atol=1e-10)


def test_cost_follows_the_depth_target():
    rcfg = rt.RadialTrainConfig(cost=0.01, target_depth=6.0)
    rt.update_cost(rcfg, 8.0)
    assert rcfg.cost == pytest.approx(0.01 + 2 * rcfg.cost_rate)
    for _ in range(100):
        rt.update_cost(rcfg, 2.0)
    assert rcfg.cost < 0  # too shallow: blocks earn
    fixed = rt.RadialTrainConfig(cost=0.05)
    rt.update_cost(fixed, 12.0)
    assert fixed.cost == 0.05


@pytest.mark.parametrize("forward_only", [True, False])
def test_router_starts_in_order(forward_only):
    """A co-trained router starts as the sequential model: every token runs every block in order, the gates at
    about 1 - N exp(-margin), whatever the states (large embeddings included); margin 0 is random routing."""
    from radial_min.router import init_router

    cfg, params, _, rcfg = tiny(forward_only=forward_only, cache_policy="per-layer", max_depth=N_BLOCKS)
    rc = rcfg.router_config(cfg)
    params = {k: v * (10 if "embed" in k else 1) for k, v in params.items()}
    ids = np.random.default_rng(2).integers(0, cfg.vocab_size, size=(3, 8))
    _, net, _ = rt.forward(params, init_router(rc, 0, in_order=6.0), cfg, rcfg, ids, fast=False)
    assert (net.routes == np.arange(N_BLOCKS)).all()
    assert min(probs.max(-1).min() for _, probs, _ in net.decisions) > 1 - 2 * N_BLOCKS * np.exp(-6.0)
    _, net, _ = rt.forward(params, init_router(rc, 0), cfg, rcfg, ids, fast=False)
    assert not (net.routes == np.arange(N_BLOCKS)).all()
