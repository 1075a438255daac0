"""Radial execution and the unified KV cache against the sequential engine and the oracle.

Property tests over random small OPT configs (pre- and post-LN, with and without projections), prompts and
lengths: with nothing skipped radial generation is sequential generation; the unified cache with the
per-layer policy is the per-layer cache; and routed execution replaying decisions equals the oracle's.
"""

import re

import numpy as np
import pytest
from conftest import random_opt
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import radial_min
import radial_min.radial
from radial_min import kernels
from radial_min.analysis import oracle
from radial_min.analysis.distill import RouterDecisions
from radial_min.blocks import Rows
from radial_min.cache import KVCache, dense_cache_bytes, order_key, step_encoding
from radial_min.radial import RadialNetwork, depth_streamer, shade
from radial_min.router import InOrder as SequentialRouter
from radial_min.router import Scripted as ScriptedRouter

configs = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 10_000),
        "num_hidden_layers": st.integers(1, 3),
        "num_attention_heads": st.sampled_from([1, 2, 4]),
        "do_layer_norm_before": st.booleans(),
        "word_embed_proj_dim": st.sampled_from([None, 8]),
        "enable_bias": st.booleans(),
    }
)
prompts = st.lists(st.integers(3, 60), min_size=1, max_size=9)
SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def close(a, b):
    return np.abs(a - b).max() <= 1e-5 * max(1.0, np.abs(b).max())


@SETTINGS
@given(cfg=configs, prompt=prompts, n_new=st.integers(1, 12))
def test_never_skipping_router_is_the_sequential_model(cfg, prompt, n_new):
    model = random_opt(**cfg)
    radial = RadialNetwork(model, SequentialRouter(len(model.blocks)))
    ids = np.array(prompt)
    assert close(radial.forward(ids), model.forward(ids))
    seq = radial_min.generate(model, ids, n_new, stop_at_eos=False)
    rad = radial_min.generate(radial, ids, n_new, stop_at_eos=False)
    np.testing.assert_array_equal(rad, seq)
    assert all(route == list(range(len(model.blocks))) for route in radial.routes)


@SETTINGS
@given(cfg=configs, prompt=prompts, n_decode=st.integers(0, 6))
def test_cached_decode_is_the_whole_sequence(cfg, prompt, n_decode):
    """The sequential model through its KV cache: a prompt, then one token at a time, gives the logits of the whole
    sequence run at once (among its own rows, no cache)."""
    model = random_opt(**cfg)
    ids = np.array(prompt + list(range(5, 5 + n_decode)))
    split = len(prompt)
    cache = model.new_cache()
    parts = [model.forward(ids[:split], cache)]  # the prompt, then one token at a time
    parts += [model.forward(ids[t : t + 1], cache) for t in range(split, len(ids))]
    assert close(np.concatenate(parts), model.forward(ids))  # not bitwise: SIMD reductions split by alignment


def test_caches_grow_past_their_first_capacity_without_losing_rows():
    """100 tokens decoded one at a time: the cache grows its key/value tables (64 entries at first) and every
    entry written survives each growth."""
    model = random_opt(seed=3, max_position_embeddings=128)
    ids = np.random.default_rng(1).integers(3, 60, 100)
    full = model.forward(ids)
    cache = model.new_cache()
    steps = [model.forward(ids[:3], cache)] + [model.forward(ids[t : t + 1], cache) for t in range(3, 100)]
    assert close(np.concatenate(steps), full)
    assert len(cache) == 100 * model.n_layer and min(p.k.shape[2] for p in cache.parts.values()) >= 100


def test_a_half_precision_cache_decodes_as_the_float32_one_within_its_rounding():
    """kv_dtype float16: the entries take half the bytes and the decode's logits stay within float16's rounding of
    the keys and values; training caches stay float32 (their backward differentiates the entries)."""
    model = random_opt(seed=5, max_position_embeddings=128)
    ids = np.random.default_rng(2).integers(3, 60, 40)

    def decode():
        cache = model.new_cache()
        steps = [model.forward(ids[:30], cache)] + [model.forward(ids[t : t + 1], cache) for t in range(30, 40)]
        return np.concatenate(steps), cache

    full, c32 = decode()
    model.kv_dtype = "float16"
    try:
        half, c16 = decode()
        assert model.new_cache(train=True).kv_dtype == "float32"
    finally:
        model.kv_dtype = "float32"
    assert c16.nbytes < 0.6 * c32.nbytes and all(p.k.dtype == np.uint16 for p in c16.parts.values())
    scale = np.abs(full).max()
    assert 0 < np.abs(half - full).max() <= 2e-3 * scale
    with pytest.raises(ValueError, match="kv_dtype"):
        KVCache("per-layer", 2, 4, train=True, kv_dtype="float16")


def test_a_forward_keeps_no_cache_alive_after_it_returns():
    """The walk a forward leaves in `last_walk` (its routes, for reports) does not hold the cache it wrote: a
    prefill's cache is freed when the caller lets it go (on a 135M model it is ~24 MB, and a second prefill with a
    new cache would otherwise hold two). A training forward keeps it: its backward reads the cache."""
    import gc
    import weakref

    model = random_opt(seed=4)
    for net in (model, RadialNetwork(model, ScriptedRouter([[0, 2], [1, 3]], len(model.blocks)))):
        cache = net.new_cache()
        net.forward(np.array([5, 6]), cache=cache)
        gone = weakref.ref(cache)
        net.new_cache()  # the network's own latest-cache reference moves on
        del cache
        gc.disable()  # freed by reference counting, not by a collection that a cycle would need
        try:
            assert gone() is None
        finally:
            gc.enable()
    tape = []
    model.forward(np.array([[5, 6]]), tape=tape)
    assert model.sequential.last_walk.cache is not None


@SETTINGS
@given(cfg=configs, prompt=st.lists(st.integers(3, 60), min_size=2, max_size=9), p_keep=st.floats(0.2, 0.9))
def test_routed_execution_replaying_decisions_equals_the_oracle(cfg, prompt, p_keep):
    """Random per-token skip decisions: the token-by-token radial engine (per-layer unified cache) and the
    block-by-block oracle simulation under the drop rule compute the same logits."""
    model = random_opt(**cfg)
    ids = np.array(prompt)
    rng = np.random.default_rng(cfg["seed"])
    keep = rng.random((len(ids), len(model.blocks))) < p_keep
    logits, kept, _ = oracle.run_sequence(model, ids, oracle.forced(keep), "drop")
    np.testing.assert_array_equal(kept, keep)
    routes = [np.flatnonzero(row).tolist() for row in keep]
    radial = RadialNetwork(model, ScriptedRouter(routes, len(model.blocks)))
    cache = radial.new_cache()
    assert close(radial.forward(ids, cache), logits)
    assert radial.routes == routes
    n_att = sum(len([b for b in r if model.blocks[b].kind == "att"]) for r in routes)
    assert len(cache) == n_att  # memory grows with the attention blocks actually run


def test_router_decisions_match_token_by_token_engine():
    """The oracle's block-by-block evaluation of a forward-only router (RouterDecisions) equals routing token by
    token."""
    model = random_opt(seed=5, num_hidden_layers=3)
    ids = np.arange(3, 20)
    rng = np.random.default_rng(1)
    routes = [sorted(rng.choice(len(model.blocks), size=rng.integers(0, 7), replace=False).tolist()) for _ in ids]
    decisions = RouterDecisions(ScriptedRouter(routes, len(model.blocks)))
    logits, keep, _ = oracle.run_sequence(model, ids, decisions, "drop")
    radial = RadialNetwork(model, ScriptedRouter(routes, len(model.blocks)))
    cache = radial.new_cache()
    assert close(np.concatenate([radial.forward(ids[t : t + 1], cache) for t in range(len(ids))]), logits)  # one by one
    assert [np.flatnonzero(k).tolist() for k in keep] == routes == radial.routes


def test_router_decisions_refuse_routers_that_may_move_back():
    model = random_opt(seed=2)
    with pytest.raises(ValueError, match="forward-only"):
        RouterDecisions(ScriptedRouter([[1, 0]], len(model.blocks)))


def test_block_reuse_and_any_order():
    """The engine runs blocks in any order, repeated; the per-layer policy sees a token's own earlier entry."""
    model = random_opt(seed=2, num_hidden_layers=2)
    routes = [[2, 0, 1, 0, 3, 2], [0, 1, 0, 1]]  # backward moves and repeats
    radial = RadialNetwork(model, ScriptedRouter(routes, len(model.blocks)))
    cache = radial.new_cache()
    logits = radial.forward(np.array([5, 9]), cache)
    assert np.isfinite(logits).all() and radial.routes == routes
    layer0, layer1 = cache.parts[0], cache.parts[1]  # per-layer: a partition per layer, entries in (pos, step) order
    assert (
        layer0.keys[0, : layer0.count[0]].tolist() == order_key(np.array([0, 0, 1, 1]), np.array([1, 3, 0, 2])).tolist()
    )
    assert layer1.keys[0, : layer1.count[0]].tolist() == order_key(np.array([0, 0]), np.array([0, 5])).tolist()
    # the same routes by hand: block 0 twice for token 0 attends over its own first entry the second time
    x = model.embed(np.array([5]), np.array([0]))
    manual = model.new_cache()
    for step, b in enumerate(routes[0]):
        x = model.blocks[b](x, Rows(np.array([0]), manual, step))
    assert close(model.head(x), logits[:1])


def test_global_policy_sees_every_layer_and_earlier_steps():
    """Global: one partition, a query reads every entry of (position, step) up to its own; per-layer: a partition
    per layer. Entries hold their values here, so a uniform attention's output is the mean of what it read."""
    for policy, want in (("global", [[0], [0, 1], [0, 1, 10]]), ("per-layer", [[0], [1], [0, 10]])):
        cache = KVCache(policy, 2, 4)
        cache.policy.scale = 0.0  # no step codes: the values read come back as they were written
        q = np.zeros((1, 8), np.float32)  # equal scores: the output is the mean of the values read
        for (pos, layer, step), seen in zip([(0, 0, 0), (0, 1, 1), (1, 0, 0)], want):
            kv = np.full((1, 8), 10 * pos + layer, np.float32)
            a = cache.read(cache.write(layer, q, kv, kv, Rows(np.array([pos]), cache, step)))
            assert np.allclose(a, np.mean(seen)), (policy, pos, layer)


def test_step_encoding_marks_steps():
    """Sinusoidal codes: unit-scale entries, equal steps most similar, similarity falling with distance."""
    pe = np.stack([step_encoding(s, 64) for s in range(6)])
    assert np.allclose(pe[:, 1::2][0], 1.0) and np.allclose(pe[:, 0::2][0], 0.0)
    sims = pe @ pe[2]
    assert sims.argmax() == 2 and sims[1] > sims[0] and sims[3] > sims[5]
    with pytest.raises(ValueError, match="cache policy"):
        KVCache("everything", 2, 4)


def test_memory_against_dense():
    model = random_opt(seed=1, num_hidden_layers=3)
    routes = [[0, 1, 4, 5], [0, 1], [0, 1, 2, 3, 4, 5], [1]]
    radial = RadialNetwork(model, ScriptedRouter(routes, len(model.blocks)))
    cache = radial.new_cache()
    radial.forward(np.array([4, 5, 6, 7]), cache)
    E = model.config.hidden_size
    assert len(cache) == 2 + 1 + 3 + 0
    assert cache.nbytes == 6 * (2 * E * 4 + 8)  # keys, values and one order key per entry
    assert dense_cache_bytes(3, 4, E) == 3 * 4 * (2 * E * 4 + 8)


def test_one_observe_contract_for_every_walk():
    """The profiler's RatioRecorder works on routed execution (it crashed with a TypeError) and on the oracle:
    on the blocks a token ran, the ratios both record are the oracle's; NaN where the router skipped."""
    from radial_min.analysis.profiling import RatioRecorder

    model = random_opt(seed=3, num_hidden_layers=3)
    ids = np.arange(3, 15)
    keep = np.random.default_rng(2).random((len(ids), len(model.blocks))) < 0.6
    keep[0, 0] = False  # the first token skips block 0: the recorder must not rely on seeing block 0
    seen = RatioRecorder(len(model.blocks))
    _, _, ratios = oracle.run_sequence(model, ids, oracle.forced(keep), "drop", observe=seen)
    np.testing.assert_allclose(seen.rows(), ratios, rtol=1e-6)
    routed = RatioRecorder(len(model.blocks))
    radial = RadialNetwork(model, ScriptedRouter([np.flatnonzero(k).tolist() for k in keep], len(model.blocks)))
    radial.forward(ids, observe=routed)
    rows = routed.rows()
    assert rows.shape == keep.shape and np.isnan(rows[~keep]).all()
    np.testing.assert_allclose(rows[keep], ratios[keep], rtol=1e-5)


def _policy_by_hand(model, ids, policy, scale, choose):
    """Routed execution computed the slow, obvious way: every attention entry kept in a list with its (layer,
    step); a query attends to the entries its policy shows (global: all so far, its key and the query both shifted
    by the step's encoding; per-layer: the same layer's; per-step: the same step's). `choose(pos, x, prev, hop)`
    gives the next block (len(blocks) = EXIT) and the gate that scales its branch. Returns (logits, routes)."""
    E, n, entries, states, routes = model.config.hidden_size, len(model.blocks), [], [], []
    for pos, tok in enumerate(ids):
        x, prev, route = model.embed(np.array([tok]), np.array([pos])), -1, []  # [1, E]
        while True:
            b, gate = choose(pos, x, prev, len(route))
            if b == n:
                break
            hop, blk = len(route), model.blocks[b]
            if blk.kind == "att":
                q, k, v = blk.project_qkv(x, np.array([pos]))
                enc = scale * step_encoding(hop, E) if policy == "global" else 0.0
                entries.append((blk.layer, hop, k + enc, v))
                seen = [
                    (K, V)
                    for layer, h, K, V in entries
                    if policy == "global" or (layer == blk.layer if policy == "per-layer" else h == hop)
                ]
                keys, vals = (np.concatenate(a) for a in zip(*seen))
                f = blk.out(kernels.attention_ref(q + enc, keys, vals, blk.n_head))
            else:
                f = blk.branch(x, Rows())
            x, prev = blk.residual(x, gate * f), b
            route.append(b)
        states.append(x)
        routes.append(route)
    return model.head(np.concatenate(states)), routes


def _scripted(routes, n):
    return lambda pos, x, prev, hop: (routes[pos][hop] if hop < len(routes[pos]) else n, 1.0)


@pytest.mark.parametrize("policy", ["global", "per-layer", "per-step"])
def test_every_policy_end_to_end(policy):
    """Each cache policy, with routes that skip, reorder and reuse blocks: the engine's logits equal the policy
    applied by hand. Global runs with its step encodings on, and they matter on this model."""
    model = random_opt(seed=3, num_hidden_layers=2)
    routes = [[0, 1, 2, 3], [0, 2, 3], [1, 0, 1, 3], [0, 1, 2, 3, 0, 1], [2, 0], [0, 2, 0, 2]]
    ids = np.array([5, 9, 2, 7, 11, 4])
    radial = RadialNetwork(model, ScriptedRouter(routes, 4), cache_policy=policy, step_encoding_scale=1.0)
    got = radial.forward(ids)
    want, _ = _policy_by_hand(model, ids, policy, 1.0, _scripted(routes, 4))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for other in {"global", "per-layer", "per-step"} - {policy}:  # the policies differ on these routes
        assert np.abs(_policy_by_hand(model, ids, other, 1.0, _scripted(routes, 4))[0] - got).max() > 1e-3
    if policy == "global":
        plain = RadialNetwork(model, ScriptedRouter(routes, 4), cache_policy="global", step_encoding_scale=0.0)
        assert np.abs(plain.forward(ids) - got).max() > 1e-3  # the encodings matter on this model


def test_gate_scales_each_branch_by_the_routers_probability():
    """A gated (co-trained) network adds p * f(x), p the router's softmax probability of the block it chose,
    here from the float64 reference path (`Router.logits`); the same routes ungated differ."""
    from radial_min import router as R

    model = random_opt(seed=4, num_hidden_layers=2)
    cfg = R.RouterConfig(width=16, n_blocks=4, hidden=8, forward_only=False, max_depth=5)
    rng = np.random.default_rng(0)
    params = {k: v + 0.5 * rng.standard_normal(v.shape).astype(np.float32) for k, v in R.init_router(cfg).items()}
    params["b2"][cfg.exit] -= 1.0  # routes of a few blocks rather than immediate exits
    router = R.Router(cfg, params)

    def reference(pos, x, prev, hop):
        logits = router.logits(x, [prev], [hop])[0]
        p = np.exp(logits - logits.max())
        return int(logits.argmax()), float(p.max() / p.sum())

    ids = np.array([5, 9, 2, 7, 3])
    gated = RadialNetwork(model, router, cache_policy="global", gate=True)
    got = gated.forward(ids)
    want, routes = _policy_by_hand(model, ids, "global", 1.0, reference)
    assert gated.routes == routes and len({tuple(r) for r in routes}) > 1 and max(map(len, routes)) > 1
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    ungated = RadialNetwork(model, ScriptedRouter(routes, 4), cache_policy="global")
    assert np.abs(ungated.forward(ids) - got).max() > 1e-3


class _RecordingRouter(ScriptedRouter):
    """A scripted router that keeps the (prev, step) it was asked with."""

    def decide(self, x, prev, step, pos=None):
        self.asked = getattr(self, "asked", []) + [(int(prev[0]), int(step[0]))]
        return super().decide(x, prev, step, pos)


def test_router_is_told_the_block_just_run():
    model = random_opt(seed=1, num_hidden_layers=3)
    router = _RecordingRouter([[4, 1, 5, 0]], 6)
    RadialNetwork(model, router).forward(np.array([3]))
    assert router.asked == [(-1, 0), (4, 1), (1, 2), (5, 3), (0, 4)]


def test_max_depth_bounds_every_route():
    """max_depth stops a token even when its router would go on: in the token-by-token engine and block by block."""
    model = random_opt(seed=1, num_hidden_layers=3)
    ids = np.array([3, 8, 1])
    radial = RadialNetwork(model, SequentialRouter(6), max_depth=2)
    got = radial.forward(ids)
    assert radial.routes == [[0, 1]] * 3
    two = RadialNetwork(model, ScriptedRouter([[0, 1]] * 3, 6))
    np.testing.assert_allclose(got, two.forward(ids), rtol=1e-6, atol=1e-6)
    decisions = RouterDecisions(SequentialRouter(6), max_depth=2)
    decisions.after(-1, np.zeros((3, model.config.hidden_size), np.float32), None)
    for b in range(6):
        ran = decisions(b, np.arange(3), None)
        decisions.after(b, np.zeros((3, model.config.hidden_size), np.float32), ran)
    assert decisions.step.tolist() == [2, 2, 2] and (decisions.next == 6).all()


@pytest.mark.parametrize("policy", ["per-layer", "global"])
def test_max_depth_bounds_a_token_routed_alone(policy):
    """The walk of one token at a time (a prompt of one token, decoding: `_Walk.run_one`) stops a token at
    max_depth = 2 although its router would run all 6 blocks: 2 blocks each, never 3."""
    model = random_opt(seed=1, num_hidden_layers=3)
    radial = RadialNetwork(model, ScriptedRouter([list(range(6))] * 3, 6), max_depth=2, cache_policy=policy)
    cache = radial.new_cache()
    for token in (3, 8, 1):
        radial.forward(np.array([token]), cache)
    assert radial.routes == [[0, 1]] * 3


def _random_router(model, seed, forward_only=True, exit_bias=-3.0):
    """A Router MLP with random weights (the fused decision kernel, softmax gates), for routes of a few blocks."""
    from radial_min import router as R

    cfg = R.RouterConfig(
        width=model.config.hidden_size, n_blocks=len(model.blocks), hidden=8, forward_only=forward_only
    )
    rng = np.random.default_rng(seed)
    params = {k: v + 0.5 * rng.standard_normal(v.shape).astype(np.float32) for k, v in R.init_router(cfg, seed).items()}
    params["b2"][cfg.exit] += exit_bias
    return R.Router(cfg, params)


@SETTINGS
@given(
    cfg=configs,
    prompt=st.lists(st.integers(3, 60), min_size=2, max_size=12),
    gate=st.booleans(),
    n_new=st.integers(1, 5),
    max_depth=st.sampled_from([None, 2]),
)
def test_routed_prefill_together_equals_token_by_token(cfg, prompt, gate, n_new, max_depth):
    """A forward-only router's prompt routed together, block by block (one batch per block), gives the logits and
    routes of routing it one token at a time, gated or not; generation continues identically from either cache."""
    model = random_opt(**cfg)
    router = _random_router(model, cfg["seed"])
    ids = np.array(prompt)
    together = RadialNetwork(model, router, max_depth, gate=gate)
    alone = RadialNetwork(model, router, max_depth, gate=gate)
    assert together.schedule() == "block"
    got = together.forward(ids)
    cache = alone.new_cache()
    want = np.concatenate([alone.forward(ids[t : t + 1], cache) for t in range(len(ids))])
    assert together.routes == alone.routes
    assert close(got, want)
    assert len(together.cache) == len(cache)  # one entry per attention block run, either way
    for t in range(n_new):  # greedy decoding goes on identically from either cache
        nxt = np.array([int(got[-1].argmax())])
        assert int(got[-1].argmax()) == int(want[-1].argmax())
        got, want = together.forward(nxt, together.cache), alone.forward(nxt, cache)
        assert close(got, want)
    assert together.routes == alone.routes


def test_routing_together_runs_each_block_once(monkeypatch):
    """Routed together, a block runs at most once per forward, over all the tokens that chose it. A router that may
    move back, or a policy that reads other layers' or steps' keys, routes in other rounds (token or step)."""
    model = random_opt(seed=3, num_hidden_layers=3)
    router = _random_router(model, 1)
    calls = []
    for i, block in enumerate(model.blocks):
        run = block.branch_in

        def counted(x, rows, tape=None, i=i, run=run):
            calls.append((i, len(x)))
            return run(x, rows, tape)

        monkeypatch.setattr(block, "branch_in", counted)
    net = RadialNetwork(model, router)
    net.forward(np.arange(3, 23))
    ran = [i for i, _ in calls]
    assert ran == sorted(set(ran)) and max(n for _, n in calls) > 1
    assert 0 < sum(map(len, net.routes)) < 20 * len(model.blocks)  # some blocks skipped, some run
    assert sum(n for _, n in calls) == sum(map(len, net.routes))
    assert RadialNetwork(model, _random_router(model, 1, forward_only=False)).schedule() == "token"
    assert RadialNetwork(model, router, cache_policy="per-step").schedule() == "step"
    assert RadialNetwork(model, router, cache_policy="global").schedule() == "token"


def test_depth_markers_only_on_a_terminal_and_shades_distinct(monkeypatch):
    class Stream:
        def push(self, token):
            return "ab"

    class Radial:
        blocks, routes, max_depth = [0] * 12, [[0, 1, 2]], 12

    def grey(shaded):
        return int(re.search(r"\x1b\[48;5;(\d+)m", shaded).group(1))

    written = []
    on_token = depth_streamer(Stream(), Radial(), None, written.append)  # pytest's stdout is not a terminal
    on_token(5)
    assert written == ["ab"]
    for deepest in range(1, 24):  # every depth its own grey, white to the darkest, neighbours >= 1 step apart
        greys = [grey(shade("x", d, deepest)) for d in range(deepest + 1)]
        assert greys[0] == 255 and greys[-1] == 232 and min(-np.diff(greys)) >= 1, deepest
    reuse = Radial()  # co-trained with reuse: 12 blocks, up to 48 run per token
    reuse.max_depth, reuse.routes = 48, [list(range(12)) * 3 + [0, 1, 2, 3]]  # 40 blocks deep
    written = []
    depth_streamer(Stream(), reuse, "shade", written.append)(5)
    assert grey(written[0]) == 255 - round(23 * 40 / 48)  # scaled by the deepest route, still an ANSI grey
    greys = [grey(shade("x", d, 48)) for d in range(49)]
    assert min(greys) == 232 and max(greys) == 255 and all(np.diff(greys) <= 0)


def test_depth_streamer_counts_depth_as_a_subscript():
    class Stream:  # a token that completes no character yet gives "", then its text
        pieces = iter(["", " unto"])

        def push(self, token):
            return next(self.pieces)

    class Radial:
        blocks, max_depth = [0] * 12, 12
        routes = [[0, 1, 2, 3, 4, 5, 6, 7]]

    written = []
    on_token = depth_streamer(Stream(), Radial(), "count", written.append)
    on_token(5)
    Radial.routes.append(list(range(10)))
    on_token(6)
    assert written == ["₈", " unto₁₀"]
    Stream.pieces = iter([" me"])
    depth_streamer(Stream(), Radial(), "none", written.append)(7)  # plain text, as piped output gets it
    assert written[-1] == " me"
    assert shade("ab", 0, 12) == "\x1b[48;5;255m\x1b[38;5;16mab\x1b[0m"  # white, dark ink
    assert shade("ab", 12, 12) == "\x1b[48;5;232m\x1b[38;5;231mab\x1b[0m"  # near-black, light ink
