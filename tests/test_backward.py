"""The one engine's backward against central finite differences in float64: every block kind (OPT, Llama/Qwen2,
pre- and post-LN), whole models of every trainable architecture, and Radial Networks under every cache policy with
the router's gate, exploration and the compute term; the walk's schedules against each other; causality; the
in-order router is the sequential model; the training forward is the inference forward."""

import dataclasses

import numpy as np
import pytest

from radial_min import train as tr
from radial_min.blocks import Rows
from radial_min.cache import KVCache
from radial_min.config import LlamaConfig, OPTConfig
from radial_min.models import ARCHITECTURES
from radial_min.radial import RadialNetwork, explore
from radial_min.router import InOrder, Router, RouterConfig, init_router
from test_ops import assert_grad, projection

RNG = np.random.default_rng(5)
E, H = 8, 2


def model64(arch="opt", seed=3, pre_norm=True, noise=0.3, **over):
    """A tiny model of `arch` in float64, its parameters moved off their init so every term matters."""
    shape = dict(vocab_size=23, hidden_size=E, num_hidden_layers=2, max_position_embeddings=9, **over)
    if arch == "opt":
        cfg = OPTConfig(
            **shape, num_attention_heads=H, ffn_dim=12, word_embed_proj_dim=E, do_layer_norm_before=pre_norm
        )
    else:
        gqa = dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=100.0, tie_word_embeddings=arch == "llama")
        cfg = LlamaConfig(**shape, **gqa, intermediate_size=12, model_type=arch)
    a = ARCHITECTURES[arch]
    rng = np.random.default_rng(seed)
    tensors = {
        k: v.astype(np.float64) + noise * rng.standard_normal(v.shape)
        for k, v in a.module.init_tensors(cfg, seed).items()
    }
    return a.model(cfg, tensors)


def radial64(seed=6, pre_norm=True, arch="opt", policy="global", forward_only=False, max_depth=6, scale=1.0, **kw):
    model = model64(arch, seed, pre_norm)
    rc = RouterConfig(E, len(model.blocks), 6, forward_only, max_depth)
    rng = np.random.default_rng(seed)
    router = Router(
        rc, {k: v.astype(np.float64) + 0.7 * rng.standard_normal(v.shape) for k, v in init_router(rc, seed).items()}
    )
    return RadialNetwork(model, router, max_depth, policy, scale, gate=True, keep_routes=False, **kw)


def loss_of(net, batch, rs=None, rng_seed=None):
    """The training loss by the training path (a tape, the float64 NumPy ops), for finite differences."""
    rng = None if rng_seed is None else np.random.default_rng(rng_seed)
    return tr.loss_and_grads(net, batch, rs, need_grads=True, rng=rng)[0]


def check_all(net, batch, rs=None, rng_seed=None, samples=3, router_samples=6):
    rng = None if rng_seed is None else np.random.default_rng(rng_seed)
    loss, grads, info = tr.loss_and_grads(net, batch, rs, rng=rng)
    params = tr.parameters(net)
    assert set(grads) == set(params)
    for name, p in params.items():
        n = router_samples if name.startswith(tr.ROUTER) else samples
        assert_grad(grads[name], lambda: loss_of(net, batch, rs, rng_seed), p, rtol=1e-5, samples=n)
    return info


# ------------------------------------------------------------------------------------------------ blocks


@pytest.mark.parametrize("arch,pre_norm", [("opt", True), ("opt", False), ("llama", True), ("qwen2", True)])
@pytest.mark.parametrize("kind", [0, 1])
def test_block_backward(arch, pre_norm, kind):
    """A whole residual block over a KV cache, two sequences at once, with a gate: the input, the gate and every
    parameter against finite differences. Llama's attention has RMSNorm, rotary and grouped-query heads; Qwen2's
    q/k/v biases; Llama's FFN is SwiGLU; OPT's post-LN block normalises after the join."""
    model = model64(arch, pre_norm=pre_norm)
    block = model.blocks[kind]
    n_kv, D = model.kv_heads
    x, gate, R = RNG.standard_normal((6, E)), RNG.uniform(0.2, 1, 6), projection((6, E))
    rows = dict(pos=np.array([0, 1, 2, 0, 1, 2]), step=0, seq=np.array([0, 0, 0, 1, 1, 1]))

    def forward(tape):
        return block(x, Rows(cache=KVCache("per-layer", n_kv, D, batch=2, train=True), **rows), gate, tape)

    model.zero_grad()
    tape = []
    forward(tape)
    dx, dgate = block.backward(R, tape)
    for m in block.modules():
        m.flush()
    assert tape == []
    assert_grad(dx, lambda: (forward([]) * R).sum(), x)
    assert_grad(dgate, lambda: (forward([]) * R).sum(), gate)
    for m in block.modules():
        for attr, p in m.params().items():
            assert_grad(m.grad[attr], lambda: (forward([]) * R).sum(), p, samples=8)


@pytest.mark.parametrize("arch", ["opt", "llama", "qwen2"])
def test_block_training_path_is_the_inference_path(arch):
    """One block, float32: the training forward (ops, BLAS, the training attention kernel) and the inference
    forward (Numba kernels) agree."""
    model = model64(arch)
    f32 = ARCHITECTURES[arch].model(
        model.config, {k: v.astype(np.float32) for k, v in model.named_parameters().items()}
    )
    x = RNG.standard_normal((5, E)).astype(np.float32)
    n_kv, D = f32.kv_heads
    for block in f32.blocks:
        fast = block(x, Rows(np.arange(5), KVCache("per-layer", n_kv, D)))
        slow = block(x, Rows(np.arange(5), KVCache("per-layer", n_kv, D, train=True)), tape=[])
        np.testing.assert_allclose(fast, slow, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------ models


@pytest.mark.parametrize("arch,pre_norm", [("opt", True), ("opt", False), ("llama", True), ("qwen2", True)])
def test_whole_model_gradients(arch, pre_norm):
    """End to end: every parameter of a 2-layer model, sampled entries, against finite differences."""
    net = model64(arch, pre_norm=pre_norm).sequential
    batch = RNG.integers(0, 23, size=(2, 8))
    info = check_all(net, batch, samples=4)
    assert (info["routes"] == np.arange(4)).all()


@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_training_loss_is_the_inference_loss(arch):
    """The trainer's forward (tape, float64 ops) and the engine's generation path (Numba kernels, float32, one
    sequence at a time) are one model: the same loss."""
    model = model64(arch)
    batch = RNG.integers(0, 23, size=(3, 8))
    loss = loss_of(model.sequential, batch)
    f32 = ARCHITECTURES[arch].model(
        model.config, {k: v.astype(np.float32) for k, v in model.named_parameters().items()}
    )
    nll = []
    for row in batch:
        logits = f32.forward(row[:-1]).astype(np.float64)
        top = logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits - top).sum(-1, keepdims=True)) - top
        nll.extend(-logp[np.arange(len(row) - 1), row[1:]])
    assert abs(np.mean(nll) - loss) < 1e-5


def test_the_position_offset_is_named_once():
    """OPT's init makes the shapes the loader expects (the position table is POSITION_OFFSET rows longer)."""
    from radial_min.models import opt

    cfg = OPTConfig(
        vocab_size=11, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, ffn_dim=16, max_position_embeddings=7
    )
    assert {k: a.shape for k, a in opt.init_tensors(cfg, 0).items()} == opt.expected_tensors(cfg)[0]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_llama_init_is_a_loadable_checkpoint(arch):
    cfg = LlamaConfig(vocab_size=11, hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, model_type=arch, tie_word_embeddings=arch == "llama")  # fmt: skip
    module = ARCHITECTURES[arch].module
    assert {k: a.shape for k, a in module.init_tensors(cfg, 0).items()} == module.expected_tensors(cfg)[0]


# --------------------------------------------------------------------------------------- radial networks

SLOW = pytest.mark.slow  # the token schedule's reused blocks: 10-30 s each; per-step reuse stays in the fast subset
CASES = [  # (policy, forward_only, pre-LN, max_depth, cost, step-encoding scale, architecture)
    pytest.param("global", False, True, 6, 0.3, 1.0, "opt", marks=SLOW),
    pytest.param("global", False, False, 5, 0.0, 2.0, "opt", marks=SLOW),
    pytest.param("per-layer", False, True, 6, 0.2, 1.0, "opt", marks=SLOW),
    ("per-layer", True, True, None, 0.3, 1.0, "opt"),
    ("per-step", False, False, 6, 0.1, 1.0, "opt"),
    ("per-step", True, True, 3, 0.0, 1.0, "opt"),
    pytest.param("global", False, True, 6, 0.2, 1.0, "llama", marks=SLOW),
    ("per-layer", True, True, None, 0.2, 1.0, "qwen2"),
]


@pytest.mark.parametrize("policy,forward_only,pre_norm,max_depth,cost,scale,arch", CASES)
def test_whole_radial_network_gradients(policy, forward_only, pre_norm, max_depth, cost, scale, arch):
    """Every parameter and the router, sampled entries, against finite differences, under every policy, with and
    without reuse, pre- and post-LN, OPT and Llama, with the compute term (and, for the first case, its pull
    toward a depth target)."""
    target = {"target_depth": 2.0, "depth_weight": 0.3} if (policy, pre_norm, cost) == ("global", True, 0.3) else {}
    rs = tr.RadialSettings(radial=True, cost=cost, **target)
    net = radial64(
        pre_norm=pre_norm, arch=arch, policy=policy, forward_only=forward_only, max_depth=max_depth, scale=scale
    )
    batch = np.random.default_rng(7).integers(0, 23, size=(2, 8))
    info = check_all(net, batch, rs)
    ran = info["routes"][info["routes"] >= 0]
    assert len(np.unique(ran)) > 1, "the tiny router should spread tokens over several blocks"


def test_explore_swaps_block_moves_for_other_allowed_blocks():
    """Every block move is swapped at share 1, for another allowed block (probability > 0), drawn uniformly;
    EXIT moves stay, and at share 0 nothing changes."""
    rng = np.random.default_rng(0)
    r, N = 6000, 4
    probs = rng.uniform(0.1, 1, (r, N + 1))
    probs[: r // 2, 0] = 0  # forward-only after block 0, say: block 0 not allowed for the first half
    probs /= probs.sum(1, keepdims=True)
    moves = rng.integers(0, N + 1, r)
    moves[: r // 2] = np.maximum(moves[: r // 2], 1)
    np.testing.assert_array_equal(explore(moves, probs, 0.0, rng), moves)
    got = explore(moves, probs, 1.0, rng)
    exits = moves == N
    np.testing.assert_array_equal(got[exits], N)
    assert (got[~exits] != moves[~exits]).all() and (got[~exits] < N).all()
    assert (probs[np.arange(r), got] > 0).all()
    first = ~exits & (np.arange(r) < r // 2)  # 2 other allowed blocks each: each drawn half the time
    assert (got[first] != 0).all()
    for m in range(1, N):
        share = (got[first & (moves == m)] == (1 if m != 1 else 2)).mean()
        assert abs(share - 0.5) < 0.06
    half = explore(moves, probs, 0.5, rng)
    assert abs((half != moves)[~exits].mean() - 0.5) < 0.03


@pytest.mark.slow
def test_explored_network_gradients():
    """With exploration the swapped blocks run gated by their own probability: the gradients stay exact (the same
    draws at each finite-difference evaluation), the routes differ from the router's argmax ones, and without a
    generator (evaluation) the network does not explore."""
    rs = tr.RadialSettings(radial=True, cost=0.2)
    net = radial64(policy="global", max_depth=6, explore=0.5)
    plain = radial64(policy="global", max_depth=6)
    batch = np.random.default_rng(7).integers(0, 23, size=(2, 8))
    info = check_all(net, batch, rs, rng_seed=11)
    base = tr.loss_and_grads(plain, batch, rs)
    assert (info["routes"] != base[2]["routes"]).any()
    evaluated = tr.loss_and_grads(net, batch, rs)  # no generator: no exploration
    assert evaluated[0] == base[0]
    np.testing.assert_array_equal(evaluated[2]["routes"], base[2]["routes"])


@pytest.mark.parametrize("policy,forward_only", [("per-step", False), ("per-step", True), ("per-layer", True)])
def test_fast_schedules_equal_token_major(policy, forward_only, monkeypatch):
    """Step-major (per-step) and block-major (forward-only per-layer) rounds compute exactly what token-major
    rounds, valid for every policy, compute: the same routes, loss and gradients."""
    net = radial64(policy=policy, forward_only=forward_only, max_depth=None if forward_only else 6)
    rs = tr.RadialSettings(radial=True, cost=0.2)
    batch = np.random.default_rng(8).integers(0, 23, size=(3, 8))
    assert net.schedule() != "token"
    fast = tr.loss_and_grads(net, batch, rs)
    monkeypatch.setattr(RadialNetwork, "schedule", lambda self, observe=None: "token")
    slow = tr.loss_and_grads(net, batch, rs)
    np.testing.assert_array_equal(fast[2]["routes"], slow[2]["routes"])
    assert abs(fast[0] - slow[0]) < 1e-12
    for name in fast[1]:
        np.testing.assert_allclose(fast[1][name], slow[1][name], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("policy,forward_only", [("global", False), ("per-layer", False), ("per-step", True)])
def test_causal(policy, forward_only):
    """Changing tokens after position t changes nothing at positions <= t: neither routes nor logits."""
    net = radial64(policy=policy, forward_only=forward_only, max_depth=6 if not forward_only else None)
    ids = np.random.default_rng(9).integers(0, 23, size=(2, 8))
    other = ids.copy()
    other[:, 5:] = (ids[:, 5:] + 7) % 23
    la, ra = net.forward(ids, tape=[]), net.last_walk.routes
    lb, rb = net.forward(other, tape=[]), net.last_walk.routes
    early = (np.arange(16) % 8) <= 4
    np.testing.assert_array_equal(ra[early], rb[early])
    np.testing.assert_allclose(la[early], lb[early], rtol=1e-12)
    assert np.abs(la[~early] - lb[~early]).max() > 1e-3


def test_router_that_runs_every_block_is_the_sequential_model():
    """A router that always picks the next block (p = 1 - O(e^-60)) under the per-layer policy makes the radial
    network the sequential model: the same loss and gradients as the in-order walk, routes 0, 1, ..., N - 1."""
    model = model64()
    n = len(model.blocks)
    hidden = n + 1
    params = {"w1": np.concatenate([np.zeros((hidden, E)), 60 * np.eye(hidden)], axis=1), "b1": np.zeros(hidden),
              "w2": np.eye(hidden), "b2": np.zeros(hidden)}  # fmt: skip
    net = RadialNetwork(model, Router(RouterConfig(E, n, hidden), params), gate=True, keep_routes=False)
    batch = RNG.integers(0, 23, size=(2, 7))
    loss, G, info = tr.loss_and_grads(net, batch)
    ref_loss, ref_G, _ = tr.loss_and_grads(model.sequential, batch)
    assert (info["routes"] == np.arange(n)).all()
    assert abs(loss - ref_loss) < 1e-10
    for name in ref_G:
        np.testing.assert_allclose(G[name], ref_G[name], rtol=1e-8, atol=1e-10)


def test_cost_follows_the_depth_target():
    rs = tr.RadialSettings(cost=0.01, target_depth=6.0)
    tr.update_cost(rs, 8.0)
    assert rs.cost == pytest.approx(0.01 + 2 * rs.cost_rate)
    for _ in range(100):
        tr.update_cost(rs, 2.0)
    assert rs.cost < 0  # too shallow: blocks earn
    fixed = tr.RadialSettings(cost=0.05)
    tr.update_cost(fixed, 12.0)
    assert fixed.cost == 0.05


@pytest.mark.parametrize("forward_only", [True, False])
def test_router_starts_in_order(forward_only):
    """A co-trained router starts as the sequential model: every token runs every block in order, the gates at
    about 1 - N exp(-margin), whatever the states (large embeddings included); margin 0 is random routing."""
    model = model64()
    n = len(model.blocks)
    model.embed_tokens.weight *= 10
    rc = RouterConfig(E, n, 6, forward_only, n)
    ids = np.random.default_rng(2).integers(0, 23, size=(3, 8))
    net = RadialNetwork(model, Router(rc, init_router(rc, 0, in_order=6.0)), n, "per-layer", gate=True)
    net.forward(ids, tape=[])
    assert (net.last_walk.routes == np.arange(n)).all()
    assert min(p.max(-1).min() for _, p in net.last_walk.decisions) > 1 - 2 * n * np.exp(-6.0)
    net = RadialNetwork(model, Router(rc, init_router(rc, 0)), n, "per-layer", gate=True)
    net.forward(ids, tape=[])
    assert not (net.last_walk.routes == np.arange(n)).all()


def test_in_order_router_needs_no_router_at_all():
    """InOrder is the sequential model's router: no parameters, every block in order up to max_depth."""
    router = InOrder(4, max_depth=3)
    moves, gate = router.decide(None, np.array([-1, 0, 2, 1]), np.array([0, 1, 3, 2]))
    assert gate is None and moves.tolist() == [0, 1, 4, 2]


def test_settings_compose_and_flatten():
    cfg = tr.TrainConfig.of(hidden_size=32, steps=7, radial=True, lr=1e-3)
    assert (cfg.model.hidden_size, cfg.run.steps, cfg.radial.radial, cfg.optim.lr) == (32, 7, True, 1e-3)
    assert cfg.model.ffn_dim == 128  # None: 4 x hidden size
    assert tr.TrainConfig.of(**cfg.flat()) == cfg
    names = [f.name for g in tr.GROUPS.values() for f in dataclasses.fields(g)]
    assert len(names) == len(set(names)), "a setting's name is its key in train_config.json: unique across groups"
    with pytest.raises(TypeError, match="unknown training settings: hiden_size"):
        tr.TrainConfig.of(hiden_size=3)


def test_step_rounds_where_blocks_interleave_equal_token_rounds(monkeypatch):
    """Per-step rounds in which several blocks write one partition, their tokens interleaved by position (a step
    round's entries are merged into key order): the training loss and gradients of token-major rounds."""
    from radial_min.router import Scripted

    model = model64()
    routes = [[0, 1, 2, 3], [2, 3], [0, 2, 1], [1, 0, 3], [2, 1], [0, 3, 1, 2], [3], [1, 2]]
    net = RadialNetwork(model, Scripted(routes, 4), cache_policy="per-step", keep_routes=False)
    batch = RNG.integers(0, 23, size=(1, 9))
    assert net.schedule() == "step"
    fast = tr.loss_and_grads(net, batch)
    monkeypatch.setattr(RadialNetwork, "schedule", lambda self, observe=None: "token")
    slow = tr.loss_and_grads(net, batch)
    assert fast[2]["routes"].tolist() == slow[2]["routes"].tolist() == [r + [-1] * (5 - len(r)) for r in routes]
    assert abs(fast[0] - slow[0]) < 1e-12
    for name in fast[1]:
        np.testing.assert_allclose(fast[1][name], slow[1][name], rtol=1e-9, atol=1e-12)
