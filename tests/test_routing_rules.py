"""The routing rules a real model needs (docs/real-model.md): the `fill` KV rule in routed execution against the
oracle's simulation, token by token and in every schedule; the attention sink (sink rows run every block); skipping
restricted to some blocks (a router never passes over a mandatory block); the fill rule's and the relaxed walk's
gradients against finite differences."""

from pathlib import Path

import numpy as np
import pytest

import radial_min
from radial_min import train as tr
from radial_min.analysis import oracle
from radial_min.blocks import row_slice
from radial_min.dtypes import Int8Matrix
from radial_min.quant import BlockMatrix
from radial_min.radial import RadialNetwork
from radial_min.router import Router, RouterConfig, Scripted, allowed_moves, init_router, mandatory_blocks
from test_backward import check_all, radial64
from test_quant import raw_blocks

FIXTURES = Path(__file__).parent / "fixtures"


def rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def fixture(name, dtype=None):
    model = radial_min.load(FIXTURES / name, **({} if dtype is None else {"weights_dtype": dtype}))
    return model, np.load(FIXTURES / name / "reference.npz")["input_ids"]


def routed_logits(model, routes, ids, rule, how):
    """Logits of `ids` routed by `routes` under `rule`: all at once (the block schedule), all at once with an
    observer (the token schedule), or one token at a time over the cache (decode steps, `run_one`)."""
    net = RadialNetwork(model, Scripted(routes, len(model.blocks)), kv_rule=rule)
    cache = net.new_cache()
    if how == "decode":
        return np.concatenate([net.forward(ids[t : t + 1], cache) for t in range(len(ids))])
    return net.forward(ids, cache, observe=(lambda *a: None) if how == "token" else None)


@pytest.mark.parametrize("name,dtype", [("llama-gqa-tied", None), ("qwen2-bias", None), ("llama-gqa-tied", "int8")])
@pytest.mark.parametrize("rule", ["fill", "drop"])
def test_routed_execution_equals_the_oracle_under_both_rules(name, dtype, rule):
    """Random per-token skips (the first token skipping everything, so it offers keys only by the rule): routed
    execution computes the oracle's logits under either rule, prefilled together, in the token schedule and
    decoded token by token; and the two rules differ."""
    model, ids = fixture(name, dtype)
    keep = np.random.default_rng(1).random((len(ids), len(model.blocks))) < 0.55
    keep[0] = False
    keep[-1] = False  # the last token exits at once: with fill it still writes every layer (nobody reads it)
    logits, kept, _ = oracle.run_sequence(model, ids, oracle.forced(keep), rule)
    np.testing.assert_array_equal(kept, keep)
    routes = [np.flatnonzero(row).tolist() for row in keep]
    for how in ("block", "token", "decode"):
        assert rel_err(routed_logits(model, routes, ids, rule, how), logits) <= 1e-5, how
    other = oracle.run_sequence(model, ids, oracle.forced(keep), "drop" if rule == "fill" else "fill")[0]
    assert rel_err(logits, other) > 1e-2  # the rule matters on these routes


def test_fill_writes_a_key_for_every_token_in_every_layer():
    """Under fill every layer's partition holds every token (skipped or not); under drop only those that ran it."""
    model, ids = fixture("llama-gqa-tied")
    keep = np.random.default_rng(2).random((len(ids), len(model.blocks))) < 0.5
    routes = [np.flatnonzero(row).tolist() for row in keep]
    for rule, want in (("fill", [len(ids)] * model.n_layer), ("drop", keep[:, 0::2].sum(0).tolist())):
        net = RadialNetwork(model, Scripted(routes, len(model.blocks)), kv_rule=rule)
        cache = net.new_cache()
        net.forward(ids, cache)
        assert [int(cache.parts[layer].count[0]) for layer in range(model.n_layer)] == want


def test_fill_is_refused_where_it_is_not_defined():
    model, _ = fixture("llama-gqa-tied")
    back = Scripted([[1, 0]], len(model.blocks))  # moves back: not forward-only
    with pytest.raises(ValueError, match="forward-only router and the per-layer"):
        RadialNetwork(model, back, kv_rule="fill")
    with pytest.raises(ValueError, match="forward-only router and the per-layer"):
        RadialNetwork(model, Scripted([[0]], len(model.blocks)), cache_policy="global", kv_rule="fill")
    rc = RouterConfig(32, len(model.blocks), kv_rule="fill")
    assert RadialNetwork(model, Router(rc, init_router(rc))).kv_rule == "fill"  # a fill router's default
    assert RadialNetwork(model, Router(rc, init_router(rc)), cache_policy="per-step").kv_rule == "drop"


def test_row_slice_cuts_every_storage_as_stored():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((96, 64)).astype(np.float32)
    np.testing.assert_array_equal(row_slice(w, 32, 96), w[32:])
    q = Int8Matrix.quantize(w)
    np.testing.assert_array_equal(row_slice(q, 40, 96).dequantize(), q.dequantize()[40:])
    b = BlockMatrix.from_gguf("Q4_1", raw_blocks("Q4_1", 80, 64), (80, 64))
    cut = row_slice(b, 32, 80)  # whole groups of 32 rows, the last one partial
    assert cut.shape == (48, 64) and np.shares_memory(cut.q, b.q)
    np.testing.assert_array_equal(cut.dequantize(), b.dequantize()[32:])
    assert row_slice(b, 16, 80) is None  # not on a group edge: the caller projects all three


# ------------------------------------------------------------------------------------- sink and restriction


def random_router(n_blocks, width=32, seed=0, **rules):
    rc = RouterConfig(width, n_blocks, 16, **rules)
    rng = np.random.default_rng(seed)
    params = {k: v + 0.5 * rng.standard_normal(v.shape).astype(np.float32) for k, v in init_router(rc, seed).items()}
    params["b2"][-1] -= 2.0  # exit late enough that there are routes to restrict
    return Router(rc, params)


def test_sink_rows_never_skip():
    """Position 0, and states longer than sink_norm, run every block; the rest are routed by the router."""
    model, ids = fixture("llama-gqa-tied")
    n = len(model.blocks)
    free = random_router(n)
    plain = RadialNetwork(model, free)
    plain.forward(ids)
    assert len(plain.routes[0]) < n  # without the rule the first token skips
    sunk = RadialNetwork(model, random_router(n, sink=1))
    cache = sunk.new_cache()
    for t in range(len(ids)):  # decode: position 0 comes from the cache's count
        sunk.forward(ids[t : t + 1], cache)
    assert sunk.routes[0] == list(range(n)) and any(len(r) < n for r in sunk.routes[1:])
    x = np.random.default_rng(3).standard_normal((6, 32)).astype(np.float32)
    x[2] *= 100
    norm = random_router(n, sink_norm=float(np.linalg.norm(x[2])) / 2)
    moves, prob = norm.decide(x, np.full(6, 1), np.full(6, 2))
    assert moves[2] == 2 and prob[2] == 1.0
    np.testing.assert_array_equal(np.delete(moves, 2), np.delete(free.decide(x, np.full(6, 1), np.full(6, 2))[0], 2))


def test_sink_rows_are_constant_in_training():
    """A sink row's probabilities are one-hot on the next block, and no gradient reaches the router through it."""
    r = random_router(4, sink=1)
    r.params = {k: v.astype(np.float64) for k, v in r.params.items()}
    r.grad = {k: np.zeros_like(v) for k, v in r.params.items()}
    x = np.random.default_rng(4).standard_normal((3, 32))
    tape = []
    probs = r.probabilities(x, np.array([0, 0, 1]), np.array([1, 1, 2]), tape, pos=np.array([0, 5, 0]))
    np.testing.assert_array_equal(probs[[0, 2]], np.eye(5)[[1, 2]])
    dprobs = np.zeros_like(probs)
    dprobs[[0, 2]] = 1.0 + np.arange(5)
    dx = r.backward(dprobs, tape)
    assert not dx.any() and not any(g.any() for g in r.grad.values())


@pytest.mark.parametrize("skippable", ["attention", "ffn"])
def test_restricted_routers_never_pass_a_mandatory_block(skippable):
    """Routes of a random router told to skip only one kind of block: every block of the other kind is run by every
    token, the kernel picks the float64 reference's argmax over the allowed moves, and the mask is the rule."""
    model, ids = fixture("llama-gqa-tied", None)
    n = len(model.blocks)
    fixed = mandatory_blocks(model.blocks, skippable)
    assert fixed == [b for b in range(n) if model.blocks[b].kind == ("ffn" if skippable == "attention" else "att")]
    router = random_router(n, mandatory=fixed, seed=5)
    net = RadialNetwork(model, router)
    net.forward(np.tile(ids, 3))
    assert all(set(fixed) <= set(r) for r in net.routes)
    assert any(len(r) < n for r in net.routes)  # it does skip what it may
    rng = np.random.default_rng(6)
    x = rng.standard_normal((200, 32)).astype(np.float32)
    prev, step = rng.integers(-1, n, 200), rng.integers(0, n, 200)
    ok = allowed_moves(prev, step, router.config)
    for p, s, row in zip(prev, step, ok):  # a move is allowed iff it passes over no mandatory block
        want = [m > p and not any(p < f < m for f in fixed) for m in range(n + 1)]
        if s >= n:
            want = [m == n for m in range(n + 1)]
        np.testing.assert_array_equal(row, want)
    np.testing.assert_array_equal(router.choose(x, prev, step), router.logits(x, prev, step).argmax(-1))


def test_oracle_follows_the_sink_and_the_mandatory_blocks():
    """At a threshold nothing passes, the oracle keeps exactly the first position's blocks and the mandatory ones."""
    model, ids = fixture("llama-gqa-tied")
    _, keep, _ = oracle.run_sequence(model, ids, oracle.threshold(1e9, None, sink=1, mandatory=[1]), "fill")
    want = np.zeros_like(keep)
    want[0], want[:, 1] = True, True
    np.testing.assert_array_equal(keep, want)


def test_mandatory_needs_a_forward_only_router(tmp_path):
    from radial_min.errors import CheckpointError

    r = random_router(4, mandatory=[1, 3])
    r.save(tmp_path / "r")
    assert Router.load(tmp_path / "r").config.mandatory == [1, 3]
    text = (tmp_path / "r.json").read_text()
    (tmp_path / "r.json").write_text(text.replace('"forward_only": true', '"forward_only": false'))
    with pytest.raises(CheckpointError, match="field 'mandatory'"):
        Router.load(tmp_path / "r")
    (tmp_path / "r.json").write_text(text.replace("3\n  ]", "7\n  ]"))
    with pytest.raises(CheckpointError, match=r"mandatory\[1\]"):
        Router.load(tmp_path / "r")


# --------------------------------------------------------------------------------------------- gradients


@pytest.mark.slow
def test_fill_rule_gradients():
    """The fill rule's writes in the training walk (block schedule) against finite differences: a forward-only
    router under per-layer on a grouped-query Llama, with skips, so the filled keys carry gradient."""
    rs = tr.RadialSettings(radial=True, cost=0.2)
    net = radial64(arch="llama", policy="per-layer", forward_only=True, max_depth=4, kv_rule="fill")
    batch = np.random.default_rng(7).integers(0, 23, size=(2, 8))
    info = check_all(net, batch, rs)
    routes = info["routes"]
    assert ((routes >= 0).sum(1) < 4).any() and (routes[:, 0] != 0).any()  # some tokens pass over block 0
    drop = radial64(arch="llama", policy="per-layer", forward_only=True, max_depth=4, kv_rule="drop")
    assert abs(tr.loss_and_grads(drop, batch, rs)[0] - info["lm_loss"] - 0.2 * info["expected_blocks"]) > 1e-6


@pytest.mark.slow
def test_relaxed_walk_gradients():
    """The relaxed walk (every block in order, each branch scaled by the router's probability of running it; the
    compute term prices those probabilities) against finite differences, attention-only skipping and a sink."""
    rs = tr.RadialSettings(radial=True, cost=0.3)
    net = radial64(arch="llama", policy="per-layer", forward_only=True, max_depth=4, relax=True)
    net.router.config.mandatory, net.router.config.sink = [1, 3], 1
    net.router.reach = net.router.config.reach()
    batch = np.random.default_rng(8).integers(0, 23, size=(2, 8))
    info = check_all(net, batch, rs)
    n = 2 * 7  # rows: two sequences of 7 inputs
    np.testing.assert_array_equal(info["routes"], np.tile(np.arange(4), (n, 1)))  # every row runs every block
    walk = net.last_walk
    gates = sum(p[np.arange(len(p)), np.minimum(m, 3)][m < 4].sum() for (_, p), m in zip(walk.decisions, walk.priced))
    gates /= n
    assert walk.expected_blocks() == pytest.approx(gates) and 2 < gates < 4  # FFN gates are 1, attention's not


def test_shipped_smollm2_routers_follow_the_rules_they_were_measured_under():
    """weights/smollm2-135m: routers for SmolLM2's 60 blocks that skip only attention blocks (every FFN block
    mandatory), keep the first position's blocks (the sink) and fill the keys of skipped attention blocks."""
    folder = Path(__file__).resolve().parent.parent / "weights" / "smollm2-135m"
    for name in ("router-tuned-target44", "router-tuned-target54"):
        router = Router.load(folder / name)
        c = router.config
        assert (c.width, c.n_blocks, c.kv_rule, c.sink) == (576, 60, "fill", 1), name
        assert list(c.mandatory) == list(range(1, 60, 2)), name  # blocks 1, 3, ..: the FFN halves of the layers
        assert all(np.isfinite(a).all() for a in router.params.values()), name
