"""The router estimators of the one trainer (train --estimator): expert choice (Mixture-of-Depths per block,
Mixture-of-Recursions per pass) and the score function (REINFORCE), beside the gate test_backward covers.
Gradients against float64 finite differences through the whole network; the top-k rule, the capacity, the causal
rule generation uses and the sampler against direct computations."""

import json
import math

import numpy as np
import pytest

from radial_min import train as tr
from radial_min.blocks import Rows
from radial_min.cache import KVCache
from radial_min.radial import RadialNetwork, sample_moves
from radial_min.train import capacity_at
from radial_min.router import ExpertChoice, Router, RouterConfig, capacity_for, init_router
from conftest import random_opt, tiny_train_config
from test_backward import E, check_all, loss_of, model64
from test_cotrained import corpus  # noqa: F401 (a fixture)
from test_ops import assert_grad

BATCH = np.random.default_rng(7).integers(0, 23, size=(2, 8))
EC = tr.RadialSettings(radial=True, estimator="expert-choice", target_depth=2.0)


def expert_choice64(
    forward_only=True, passes=3, capacity=0.5, aux=0.3, seed=6, arch="opt", policy="per-layer", model=None
):
    """A tiny float64 network (or `model`) with an expert-choice router moved off its init (scores of both signs)."""
    model = model64(arch, seed) if model is None else model
    n, E = len(model.blocks), model.config.hidden_size
    depth = n if forward_only else passes * n
    rc = RouterConfig(E, n, forward_only=forward_only, max_depth=depth, kind="expert-choice", capacity=capacity)
    router = ExpertChoice.new(rc, seed, aux)
    rng = np.random.default_rng(seed)
    dtype = next(iter(model.named_parameters().values())).dtype
    router.params = {k: (v + rng.standard_normal(v.shape)).astype(dtype) for k, v in router.params.items()}
    router.params["b"] -= 1.0
    return RadialNetwork(model, router, depth, policy, 1.0, gate=True, keep_routes=False)


# ------------------------------------------------------------------------------------------- expert choice


@pytest.mark.parametrize(
    "forward_only,arch,policy",
    [
        (True, "opt", "per-layer"),
        pytest.param(False, "opt", "per-step", marks=pytest.mark.slow),
        (True, "llama", "per-layer"),
    ],
)
def test_expert_choice_gradients(forward_only, arch, policy):
    """Every parameter and the router's scores, sampled entries, against finite differences: the gates sigmoid(s) on
    the chosen tokens' branches and the auxiliary BCE both reach the router (the top-k sets do not move under the
    small differences)."""
    net = expert_choice64(forward_only, arch=arch, policy=policy)
    info = check_all(net, BATCH, EC, router_samples=10)
    assert info["aux_loss"] > 0
    depth = (info["routes"] >= 0).sum(1)
    assert depth.min() < depth.max(), "some tokens run fewer blocks than others"


def test_expert_choice_auxiliary_loss_is_in_the_gradient():
    """The auxiliary loss changes the router's gradient (and the model's: the scores read the hidden states); the
    LM loss and the routes are the same."""
    with_aux, without = expert_choice64(aux=0.3), expert_choice64(aux=0.0)
    _, g1, i1 = tr.loss_and_grads(with_aux, BATCH, EC)
    _, g0, i0 = tr.loss_and_grads(without, BATCH, EC)
    assert i0["aux_loss"] == 0 and i1["aux_loss"] > 0
    assert not np.allclose(g1["router.w"], g0["router.w"])
    assert i0["lm_loss"] == i1["lm_loss"]
    np.testing.assert_array_equal(i0["routes"], i1["routes"])


def test_gradients_do_not_pile_up_over_steps():
    """Two calls on the same batch give the same router gradient (each call starts from zero)."""
    net = expert_choice64()
    first = tr.loss_and_grads(net, BATCH, EC)[1]["router.w"].copy()
    np.testing.assert_array_equal(tr.loss_and_grads(net, BATCH, EC)[1]["router.w"], first)


def test_pick_keeps_the_top_share_of_each_sequence_and_the_sinks():
    """Per sequence, ceil(capacity x non-sink candidates) of the best scores run, every sink runs with gate 1, and
    the auxiliary loss is the BCE of sigmoid(s) against that choice (sinks left out), times its weight."""
    rng = np.random.default_rng(0)
    rc = RouterConfig(6, 4, forward_only=True, kind="expert-choice", capacity=0.3)
    router = ExpertChoice.new(rc, 1, aux_weight=0.2)
    x = rng.standard_normal((23, 6))
    seq = np.sort(rng.integers(0, 3, 23))
    pos = np.concatenate([np.arange((seq == s).sum()) for s in range(3)])
    chosen, probs, aux = router.pick(x, 2, 2, seq, pos, [])
    s = router.scores(x, 2)
    gate = 1 / (1 + np.exp(-s))
    sink = pos == 0
    for q in range(3):
        rows = np.flatnonzero((seq == q) & ~sink)
        k = math.ceil(0.3 * len(rows))
        best = rows[np.argsort(-s[rows])[:k]]
        np.testing.assert_array_equal(np.flatnonzero(chosen & (seq == q) & ~sink), np.sort(best))
    assert chosen[sink].all()
    np.testing.assert_allclose(probs[:, 2], np.where(sink, 1.0, gate), rtol=1e-12)
    assert not probs[:, [0, 1, 3, 4]].any()
    t, free = chosen & ~sink, ~sink
    bce = -np.where(t, np.log(gate), np.log(1 - gate))[free].mean()
    assert aux == pytest.approx(0.2 * bce, rel=1e-9)


@pytest.mark.parametrize("forward_only", [True, False])
def test_training_runs_the_capacity(forward_only):
    """The blocks each sequence runs in training follow from the capacity alone: forward-only, every block takes
    1 sink + ceil(c (T - 1)) of its T tokens; recursion, every pass after the first keeps ceil(c m) of the m
    tokens still going (plus the sink)."""
    net = expert_choice64(forward_only, capacity=0.4, policy="per-layer" if forward_only else "per-step")
    info = tr.loss_and_grads(net, BATCH, EC)[2]  # training: the top-k rule (evaluation uses the causal one)
    n, T = len(net.blocks), BATCH.shape[1] - 1
    if forward_only:
        per_seq = n * (1 + math.ceil(0.4 * (T - 1)))
    else:
        going, per_seq = T - 1, n * T  # the first pass: every token
        for _ in range(2):
            going = math.ceil(0.4 * going)
            per_seq += n * (1 + going)
    assert info["blocks"] == pytest.approx(per_seq / T)
    assert info["expected_blocks"] == info["blocks"]


def test_capacity_for_a_target_depth():
    assert capacity_for(3.0, 4, 4, True) == 0.75
    assert capacity_for(9.0, 4, 4, True) == 1.0
    q = capacity_for(6.0, 4, 12, False)  # 4 (1 + q + q^2) = 6
    assert 4 * (1 + q + q * q) == pytest.approx(6.0, abs=1e-9)


@pytest.mark.parametrize("forward_only", [True, False])
def test_generation_follows_the_causal_rule(forward_only):
    """Not training, a token runs a block (a pass) where its score is > 0, the sink every one: the walk over a
    prompt gives the routes `decide` gives token by token, and decoding from the cache gives the logits of the
    whole sequence."""
    model = random_opt(3)  # float32: generation's kernels
    net = expert_choice64(forward_only, policy="per-layer" if forward_only else "per-step", model=model)
    net.keep_routes = True
    ids = np.random.default_rng(1).integers(3, 61, 14)
    whole = net.forward(ids)
    routes = net.routes
    assert routes[0] == list(range(len(net.blocks))) * (1 if forward_only else 3)  # the sink runs everything
    assert len(set(map(len, routes))) > 1
    net.routes = []
    cache = net.new_cache()
    one = np.concatenate([net.forward(ids[t : t + 1], cache) for t in range(len(ids))])
    assert net.routes == routes
    np.testing.assert_allclose(one, whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("forward_only", [True, False])
def test_decide_runs_where_the_score_is_positive(forward_only):
    """`decide`: forward-only, the next block after prev whose score is > 0 (gate sigmoid(s)); recursion, at a
    pass start, block 0 if that pass's score is > 0 else EXIT, inside a pass the next block (gate 1); the sink
    (position 0) runs everything with gate 1; at the depth limit, EXIT."""
    net = expert_choice64(forward_only)
    router, n = net.router, len(net.blocks)
    x = np.random.default_rng(3).standard_normal((40, E))
    s = router.scores(x)
    prev, step = np.full(40, -1 if forward_only else n - 1), np.full(40, 0 if forward_only else n)
    moves, gate = router.decide(x, prev, step, np.arange(1, 41))
    for i in range(40):
        if forward_only:
            run = np.flatnonzero(s[i] > 0)
            want = run[0] if len(run) else n
            assert moves[i] == want
            assert gate[i] == pytest.approx(1 / (1 + np.exp(-s[i, want])) if want < n else 1.0, rel=1e-6)
        else:
            assert moves[i] == (0 if s[i, 0] > 0 else n)
    assert len(set(moves.tolist())) > (2 if forward_only else 1)
    sink_moves, sink_gate = router.decide(x[:1], prev[:1], step[:1], [0])
    assert sink_moves[0] == 0 and sink_gate[0] == 1.0
    inside = router.decide(x[:1], [0], [1], [5])
    assert inside[0][0] == (1 if not forward_only else inside[0][0]) and (forward_only or inside[1][0] == 1.0)
    assert router.decide(x[:1], [0], [net.max_depth], [5])[0][0] == n


def test_expert_choice_router_saves_and_loads(tmp_path):
    net = expert_choice64(False, policy="per-step")
    net.router.save(tmp_path / "r")
    back = Router.load(tmp_path / "r")
    assert isinstance(back, ExpertChoice) and back.config == net.router.config
    for k, v in net.router.params.items():
        np.testing.assert_array_equal(back.params[k], v.astype(np.float32))
    x = np.random.default_rng(0).standard_normal((5, E))
    moves, _ = back.decide(x, np.full(5, -1), np.full(5, 4), np.arange(5))
    want, _ = net.router.decide(x, np.full(5, -1), np.full(5, 4), np.arange(5))
    np.testing.assert_array_equal(moves, want)


def test_expert_choice_settings_are_checked():
    base = dict(radial=True, estimator="expert-choice", max_depth=4)
    problems = tr.TrainConfig.of(**base).problems(1 << 40)
    assert any("--target-depth" in p for p in problems)
    problems = tr.TrainConfig.of(**base, target_depth=2.0, cache_policy="global").problems(1 << 40)
    assert any("per-layer" in p for p in problems)


def test_expert_choice_recursion_trains_with_the_per_step_cache():
    """Recursion trains a pass per round over every sequence. Under per-layer, pass 2 of token t - 1 writes keys in
    the partition that pass 1 of token t reads, with an order key below its query's, after that query has read: the
    forward never saw them, the backward did, with the forward's normaliser (attention weights above 1; a
    training run's gradient overflowed). The walk and the settings refuse it; per-step trains."""
    base = dict(radial=True, estimator="expert-choice", target_depth=4.0, max_depth=4, num_hidden_layers=1)
    problems = tr.TrainConfig.of(**base, cache_policy="per-layer").problems(1 << 40)
    assert any("per-step (recursion" in p for p in problems), problems
    assert not tr.TrainConfig.of(**base, cache_policy="per-step").problems(1 << 40)
    forward = {**base, "forward_only": True, "max_depth": 2, "target_depth": 2.0, "cache_policy": "per-layer"}
    assert not tr.TrainConfig.of(**forward).problems(1 << 40)
    with pytest.raises(ValueError, match="expert-choice recursion trains a pass per round"):
        tr.loss_and_grads(expert_choice64(False, policy="per-layer", capacity=1.0), BATCH, EC)
    assert np.isfinite(tr.loss_and_grads(expert_choice64(False, policy="per-step", capacity=1.0), BATCH, EC)[0])


def test_training_cache_refuses_an_entry_behind_a_read():
    """A training cache refuses an entry whose order key a query already read covers (the query should have seen
    it); entries after every key read, and any entry before a read, are taken."""
    cache = KVCache("per-layer", 1, 2, batch=2, train=True)

    def write(pos, step, seq):
        kv = np.ones((len(pos), 2), np.float32)
        return cache.write(0, kv, kv, kv, Rows(np.array(pos), cache, step, np.array(seq)), [])

    write([0, 0], 2, [0, 1])  # an entry before any read: taken
    cache.read(write([1, 3], 0, [0, 1]), [])  # sequence 0 read up to (1, 0), sequence 1 up to (3, 0)
    write([2, 4], 0, [0, 1])  # after every key read
    write([2], 2, [0])  # sequence 0: after its read of (1, 0)
    with pytest.raises(ValueError, match="written after a query that should see it had read"):
        write([2], 2, [1])  # sequence 1: (2, 2) is behind its read of (3, 0)
    assert cache.parts[0].count.tolist() == [4, 3]


@pytest.mark.slow
def test_fill_rule_is_a_training_setting_saved_with_the_router(tmp_path):
    """--kv-rule fill: the training walk writes keys where tokens pass over an attention block (its gradient is
    test_routing_rules' test_fill_rule_gradients), the router saves the rule, and it is refused where undefined."""
    base = dict(radial=True, forward_only=True, cache_policy="per-layer", in_order=0.0, target_depth=2.0)
    losses = {}
    for rule in ("drop", "fill"):
        cfg = tiny_train_config(tmp_path / rule, 1, **base, kv_rule=rule)
        assert not cfg.problems(1 << 40)
        net = tr.build_network(cfg)
        assert net.kv_rule == rule and net.router.config.kv_rule == rule
        losses[rule] = tr.loss_and_grads(net, BATCH, cfg.radial)[2]["lm_loss"]
        assert (net.last_walk.routes[:, 0] != 0).any()  # some tokens pass over block 0: the rules differ there
    assert losses["drop"] != pytest.approx(losses["fill"], abs=1e-6)
    net.router.save(tmp_path / "router")
    assert Router.load(tmp_path / "router").config.kv_rule == "fill"
    for bad in (dict(cache_policy="global"), dict(forward_only=False), dict(estimator="expert-choice")):
        problems = tr.TrainConfig.of(**{**base, "kv_rule": "fill", **bad}).problems(1 << 40)
        assert any("--kv-rule fill" in p for p in problems), bad


# ------------------------------------------------------------------------------------------- score function


def reinforce64(seed=6):
    model = model64("opt", seed)
    rc = RouterConfig(E, len(model.blocks), 6, False, 6)
    rng = np.random.default_rng(seed)
    params = {k: v.astype(np.float64) + 0.7 * rng.standard_normal(v.shape) for k, v in init_router(rc, seed).items()}
    return RadialNetwork(model, Router(rc, params), 6, "global", 1.0, gate=False, keep_routes=False, sample=True)


def test_sample_moves_draws_from_the_probabilities():
    rng = np.random.default_rng(0)
    probs = np.array([[0.1, 0.0, 0.6, 0.3], [0.0, 0.5, 0.0, 0.5]])
    draws = sample_moves(np.repeat(probs, 20000, 0), rng).reshape(2, 20000)
    for p, d in zip(probs, draws):
        share = np.bincount(d, minlength=4) / len(d)
        np.testing.assert_allclose(share, p, atol=0.012)
        assert share[p == 0].sum() == 0


def test_reinforce_advantage_is_loss_plus_cost_minus_its_mean():
    probs = np.array([[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]])
    targets, depth = np.array([0, 1, 1]), np.array([2, 3, 1])
    got = tr.reinforce_advantage((probs, targets, None), depth, 0.1)
    reward = -np.log([0.5, 0.1, 0.8]) + 0.1 * depth
    np.testing.assert_allclose(got, reward - reward.mean(), rtol=1e-12)


@pytest.mark.slow
def test_reinforce_gradient_is_the_score_function():
    """With sampled routes (and no gate), the gradients are those of the loss along the routes drawn plus the
    surrogate (1/n) sum over tokens of A x sum over its draws of log p(move), A held fixed (the router's
    probabilities read the hidden states, so the surrogate reaches the model too): every parameter against finite
    differences, with the same draws at every evaluation."""
    rs = tr.RadialSettings(radial=True, estimator="reinforce", cost=0.05)
    net = reinforce64()
    loss, grads, info = tr.loss_and_grads(net, BATCH, rs, rng=np.random.default_rng(11))
    walk = net.last_walk
    A = tr.reinforce_advantage(walk_ce(net), walk.depth, rs.cost)
    assert A.std() > 0 and len({len(r) for r in walk.route_lists()}) > 1
    routes = info["routes"].copy()

    def total():
        lm = loss_of(net, BATCH, rs, 11)
        w = net.last_walk
        np.testing.assert_array_equal(w.routes, routes)  # the same draws
        score = 0.0
        for (rows, probs), moves in zip(w.decisions, w.taken):
            i = np.flatnonzero(moves >= 0)
            score += (A[rows[i]] * np.log(probs[i, moves[i]])).sum()
        return lm + score / len(A)

    for name, p in tr.parameters(net).items():
        assert_grad(grads[name], total, p, rtol=1e-5, samples=8 if name.startswith(tr.ROUTER) else 1)


def walk_ce(net):
    """The cross-entropy's saved (probs, targets, weights) of the batch just run, as loss_and_grads makes it."""
    from radial_min import ops

    logits = net.model.head(net.last_walk.X)
    return ops.crossentropy_forward(logits, BATCH[:, 1:].ravel(), None)[1]


# ------------------------------------------------------------------------------------------- in the trainer


def test_capacity_warms_up_from_every_token():
    assert [capacity_at(s, 0.25, 4) for s in range(6)] == [1.0, 0.8125, 0.625, 0.4375, 0.25, 0.25]
    assert capacity_at(0, 0.25, 0) == 0.25


@pytest.mark.slow
@pytest.mark.parametrize(
    "estimator,run",
    [
        ("reinforce", {"max_depth": 6}),
        ("expert-choice", {"cache_policy": "per-step", "max_depth": 8, "capacity_warmup": 4}),
        ("expert-choice", {"cache_policy": "per-layer", "forward_only": True}),
    ],
    ids=["reinforce", "recursion", "depths"],
)
def test_estimators_train_and_resume_bit_identically(corpus, tmp_path, estimator, run):  # noqa: F811
    """Each estimator through the one trainer: 3 steps then a resume to 6 give the parameters of 6 straight, bit
    for bit (the score function's draws come from (seed, step)); the loss falls; an expert-choice run warms its
    capacity up from every token to the target's."""
    from radial_min import data

    _, train_ids, val_streams = corpus
    val = {k: data.validation_sequences(s, 16, 2) for k, s in val_streams.items()}
    settings = dict(radial=True, estimator=estimator, target_depth=5.0 if "capacity_warmup" in run else 2.5, **run)
    straight = tr.parameters(tr.train(tiny_train_config(tmp_path / "a", 6, **settings), train_ids, val, progress=False))
    tr.train(tiny_train_config(tmp_path / "b", 6, **settings), train_ids, val, progress=False, stop_after=3)
    resumed = tr.parameters(tr.train(tiny_train_config(tmp_path / "b", 6, **settings), train_ids, val, progress=False))
    assert any(k.startswith(tr.ROUTER) for k in straight)
    for name in straight:
        np.testing.assert_array_equal(resumed[name], straight[name])
    log = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["lm_loss"] < log[0]["lm_loss"]
    if "capacity_warmup" in run:  # 2 passes of 4 blocks: all of them at capacity 1, then fewer
        assert log[0]["blocks"] == 8 and log[-1]["blocks"] < log[1]["blocks"] < 8
