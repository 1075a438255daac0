"""The router MLP: gradients against finite differences, masking, save/load, and distillation from the oracle."""

import numpy as np
import pytest
from conftest import random_opt

from radial_min.analysis import oracle
from radial_min import router as R
from radial_min.errors import CheckpointError
from radial_min.router import RouterDecisions

RNG = np.random.default_rng(0)


@pytest.fixture
def small():
    cfg = R.RouterConfig(width=6, n_blocks=4, hidden=5)
    params = {k: v.astype(np.float64) + 0.1 * RNG.standard_normal(v.shape) for k, v in R.init_router(cfg, 1).items()}
    prev = np.array([-1, 0, 2, 1, 3, -1, 1])
    depth = np.array([0, 1, 2, 1, 4, 0, 2])
    z = R.features(RNG.standard_normal((7, 6)), prev, cfg.n_blocks)
    allowed = R.allowed_moves(prev, depth, cfg)
    labels = np.array([0, 3, 4, 2, 4, 4, 4])
    return cfg, params, z, allowed, labels


def test_every_parameter_gradient_against_finite_differences(small):
    cfg, params, z, allowed, labels = small
    _, grads = R.loss_and_grads(params, z, allowed, labels)
    h = 1e-6
    for name, p in params.items():
        flat = p.reshape(-1)
        for i in range(flat.size):  # every entry: the router is small
            old = flat[i]
            flat[i] = old + h
            up = R.loss_and_grads(params, z, allowed, labels)[0]
            flat[i] = old - h
            down = R.loss_and_grads(params, z, allowed, labels)[0]
            flat[i] = old
            numeric = (up - down) / (2 * h)
            analytic = grads[name].reshape(-1)[i]
            assert abs(analytic - numeric) <= 1e-5 * max(abs(numeric), 1e-3), f"{name}[{i}] {analytic} vs {numeric}"


def test_allowed_moves(small):
    cfg, params, z, allowed, labels = small
    # forward only: after block 2 only blocks 3 and EXIT; at max depth (4 = n_blocks) only EXIT
    assert allowed[2].tolist() == [False, False, False, True, True]
    assert allowed[4].tolist() == [False, False, False, False, True]
    assert allowed[0].tolist() == [True] * 5
    logits, _ = R.forward(params, z, allowed)
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


def test_oracle_examples_reconstruct_the_oracle_routes():
    """Following the labels from START reproduces, for every token, exactly the blocks the oracle kept."""
    model = random_opt(seed=3, num_hidden_layers=3)
    seqs = np.random.default_rng(0).integers(3, 60, size=(2, 12))
    tau = 0.4
    ex = R.oracle_examples(model, seqs, tau, "drop")
    run = oracle.simulate(model, seqs, oracle.threshold(tau), "drop")
    keep = run.keep.reshape(-1, len(model.blocks))
    for t in range(len(keep)):
        mine = ex["token"] == t
        labels, prev = ex["label"][mine], ex["prev"][mine]
        assert prev[0] == -1 and labels[-1] == len(model.blocks)  # starts at START, ends with EXIT
        assert labels[:-1].tolist() == np.flatnonzero(keep[t]).tolist()
        assert (prev[1:] == labels[:-1]).all() and ex["depth"][mine].tolist() == list(range(mine.sum()))


def test_distilled_router_learns_the_oracle():
    """A router trained on the oracle's choices repeats most of them and its execution stays consistent."""
    model = random_opt(seed=4, num_hidden_layers=3, vocab_size=61)
    seqs = np.random.default_rng(1).integers(3, 60, size=(8, 24))
    ratios = oracle.simulate(model, seqs[:2], oracle.threshold(0.0), "fill").ratios
    tau = float(np.median(ratios))  # skip about half, so both decisions are common
    ex = R.oracle_examples(model, seqs[:6], tau, "drop")
    held = R.oracle_examples(model, seqs[6:], tau, "drop")  # sequences the router never saw
    cfg = R.RouterConfig(width=model.config.hidden_size, n_blocks=len(model.blocks), hidden=32, tau=tau)
    router = R.train_router(ex, cfg, epochs=40, lr=1e-2, batch_size=128, progress=False)
    majority = np.bincount(ex["label"]).max() / len(ex["label"])
    assert R.accuracy(router, ex)["decision"] > max(0.85, majority + 0.05), majority
    assert R.accuracy(router, held)["decision"] > max(0.8, majority), majority
    run = oracle.simulate(model, seqs, RouterDecisions(router), "drop")
    assert 0 < run.depth.mean() < len(model.blocks) and np.isfinite(run.ppl)


def test_evaluate_returns_the_numbers_of_the_report():
    """router.evaluate (what `train-router` prints and saves): the router's run beside the sequential model, the
    oracle at thresholds bracketing the router's depth and the static baselines, all scored at that depth."""
    model = random_opt(seed=4, num_hidden_layers=3, vocab_size=61)
    seqs = np.random.default_rng(1).integers(3, 60, size=(6, 24))
    tau = float(np.median(oracle.simulate(model, seqs[:2], oracle.threshold(0.0), "fill").ratios))
    ex = R.oracle_examples(model, seqs[:4], tau, "drop")
    cfg = R.RouterConfig(width=model.config.hidden_size, n_blocks=6, hidden=32, tau=tau, kv_rule="drop")
    router = R.train_router(ex, cfg, epochs=5, lr=1e-2, batch_size=128, progress=False)
    ev = R.evaluate(model, router, seqs[4:], train_examples=ex)
    runs, depth = ev["runs"], ev["depth"]
    assert list(runs)[:1] == ["sequential"] and runs["sequential"].depth.mean() == 6 and "router" in runs
    assert depth == runs["router"].depth.mean() and ev["at_router_depth"]["router"] == runs["router"].ppl
    oracles = [r.depth.mean() for name, r in runs.items() if name.startswith("oracle")] + [6]
    assert f"oracle (tau={tau:g}, drop)" in runs and min(oracles) <= depth <= max(oracles)
    assert ev["accuracy_train"] == R.accuracy(router, ex)
    assert ev["accuracy_test"] == R.accuracy(router, R.oracle_examples(model, seqs[4:], tau, "drop"))
    assert ev["agreement_own_states"] == oracle.agreement(runs["router"], tau)
    lowest = oracle.StaticBaselines(
        model, seqs[4:], runs["sequential"].ratios.reshape(-1, 6).mean(0), runs["sequential"]
    )
    assert ev["at_router_depth"]["static lowest-ratio"] == lowest.ppl_at("lowest", depth)


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


def _evaluation():
    """What router.evaluate returns, for two runs over 2 x 2 tokens of a 4-block model."""
    run = oracle.Run(np.ones((2, 2, 4), bool), np.zeros((2, 2, 4)), np.log(np.full((2, 1), 10.0)))
    routed = oracle.Run(np.array([[[1, 1, 0, 0], [1, 0, 0, 0]]] * 2, bool), np.zeros((2, 2, 4)), np.ones((2, 1)))
    acc = {"decision": 0.875, "route": 0.5, "exit": 0.25, "block": 1.0}
    return {
        "accuracy_train": None,
        "accuracy_test": acc,
        "agreement_own_states": {"move": 0.75, "route": 0.5, "block": 0.625},
        "at_router_depth": {"router": np.e, "oracle": None},
        "depth": 1.5,
        "runs": {"sequential": run, "router": routed},
    }


def test_router_report_records_each_runs_depths():
    cfg = R.RouterConfig(width=8, n_blocks=4, hidden=16, tau=0.2, kv_rule="drop")
    report = R.router_report(_evaluation(), "runs/r/router", cfg, 4)
    assert report["router"] == "runs/r/router" and report["config"]["hidden"] == 16
    assert report["accuracy_train"] is None and report["at_router_depth"]["oracle"] is None
    seq, rt = report["runs"]["sequential"], report["runs"]["router"]
    assert (seq["mean_depth"], seq["min_depth"], seq["max_depth"]) == (4.0, 4, 4) and seq["ppl"] == pytest.approx(10)
    assert (rt["mean_depth"], rt["min_depth"], rt["max_depth"]) == (1.5, 1, 2)
    assert list(rt["depth_hist"]) == [0, 2, 2, 0, 0] and rt["ppl"] == pytest.approx(np.e)


def test_format_router_report_prints_accuracy_and_each_run():
    lines = R.format_router_report(_evaluation(), 2).splitlines()
    assert lines[0] == (
        "accuracy against the oracle: decisions 87.5% held-out; whole routes 50.0%; EXIT 25.0%, next block 100.0%"
    )
    assert lines[3] == "  decisions 75.0%; whole routes 50.0%; keep/skip per block 62.5%"
    assert lines[5] == "on 2 held-out sequences                    ppl  blocks/token  min  max"
    assert lines[6] == "sequential                              10.000          4.00    4    4"
    assert lines[7] == "router                                   2.718          1.50    1    2"
    assert lines[-1] == "  router 2.7; oracle -"
