"""Distilling a router from the oracle (analysis/distill.py): the oracle's routes as examples, a router trained on
them, its evaluation against the oracle and the static baselines, and the report it makes."""

import numpy as np
import pytest
from conftest import random_opt

from radial_min import router as R
from radial_min.analysis import distill, oracle
from radial_min.analysis.distill import RouterDecisions


def test_oracle_examples_reconstruct_the_oracle_routes():
    """Following the labels from START reproduces, for every token, exactly the blocks the oracle kept."""
    model = random_opt(seed=3, num_hidden_layers=3)
    seqs = np.random.default_rng(0).integers(3, 60, size=(2, 12))
    tau = 0.4
    ex = distill.oracle_examples(model, seqs, tau, "drop")
    run = oracle.simulate(model, seqs, oracle.threshold(tau), "drop")
    keep = run.keep.reshape(-1, len(model.blocks))
    for t in range(len(keep)):
        mine = ex["token"] == t
        labels, prev = ex["label"][mine], ex["prev"][mine]
        assert prev[0] == -1 and labels[-1] == len(model.blocks)  # starts at START, ends with EXIT
        assert labels[:-1].tolist() == np.flatnonzero(keep[t]).tolist()
        assert (prev[1:] == labels[:-1]).all() and ex["step"][mine].tolist() == list(range(mine.sum()))


def test_distilled_router_learns_the_oracle():
    """A router trained on the oracle's choices repeats most of them and its execution stays consistent."""
    model = random_opt(seed=4, num_hidden_layers=3, vocab_size=61)
    seqs = np.random.default_rng(1).integers(3, 60, size=(8, 24))
    ratios = oracle.simulate(model, seqs[:2], oracle.threshold(0.0), "fill").ratios
    tau = float(np.median(ratios))  # skip about half, so both decisions are common
    ex = distill.oracle_examples(model, seqs[:6], tau, "drop")
    held = distill.oracle_examples(model, seqs[6:], tau, "drop")  # sequences the router never saw
    cfg = R.RouterConfig(width=model.config.hidden_size, n_blocks=len(model.blocks), hidden=32, tau=tau)
    router = distill.train_router(ex, cfg, epochs=40, lr=1e-2, batch_size=128, progress=False)
    majority = np.bincount(ex["label"]).max() / len(ex["label"])
    assert distill.accuracy(router, ex)["decision"] > max(0.85, majority + 0.05), majority
    assert distill.accuracy(router, held)["decision"] > max(0.8, majority), majority
    run = oracle.simulate(model, seqs, RouterDecisions(router), "drop")
    assert 0 < run.depth.mean() < len(model.blocks) and np.isfinite(run.ppl)


def test_evaluate_returns_the_numbers_of_the_report():
    """router.evaluate (what `train-router` prints and saves): the router's run beside the sequential model, the
    oracle at thresholds bracketing the router's depth and the static baselines, all scored at that depth."""
    model = random_opt(seed=4, num_hidden_layers=3, vocab_size=61)
    seqs = np.random.default_rng(1).integers(3, 60, size=(6, 24))
    tau = float(np.median(oracle.simulate(model, seqs[:2], oracle.threshold(0.0), "fill").ratios))
    ex = distill.oracle_examples(model, seqs[:4], tau, "drop")
    cfg = R.RouterConfig(width=model.config.hidden_size, n_blocks=6, hidden=32, tau=tau, kv_rule="drop")
    router = distill.train_router(ex, cfg, epochs=5, lr=1e-2, batch_size=128, progress=False)
    ev = distill.evaluate(model, router, seqs[4:], train_examples=ex)
    runs, depth = ev["runs"], ev["depth"]
    assert list(runs)[:1] == ["sequential"] and runs["sequential"].depth.mean() == 6 and "router" in runs
    assert depth == runs["router"].depth.mean() and ev["at_router_depth"]["router"] == runs["router"].ppl
    oracles = [r.depth.mean() for name, r in runs.items() if name.startswith("oracle")] + [6]
    assert f"oracle (tau={tau:g}, drop)" in runs and min(oracles) <= depth <= max(oracles)
    assert ev["accuracy_train"] == distill.accuracy(router, ex)
    assert ev["accuracy_test"] == distill.accuracy(router, distill.oracle_examples(model, seqs[4:], tau, "drop"))
    assert ev["agreement_own_states"] == oracle.agreement(runs["router"], tau)
    lowest = oracle.StaticBaselines(
        model, seqs[4:], runs["sequential"].ratios.reshape(-1, 6).mean(0), runs["sequential"]
    )
    assert ev["at_router_depth"]["static lowest-ratio"] == lowest.ppl_at("lowest", depth)


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
    report = distill.router_report(_evaluation(), "runs/r/router", cfg, 4)
    assert report["router"] == "runs/r/router" and report["config"]["hidden"] == 16
    assert report["accuracy_train"] is None and report["at_router_depth"]["oracle"] is None
    seq, rt = report["runs"]["sequential"], report["runs"]["router"]
    assert (seq["mean_depth"], seq["min_depth"], seq["max_depth"]) == (4.0, 4, 4) and seq["ppl"] == pytest.approx(10)
    assert (rt["mean_depth"], rt["min_depth"], rt["max_depth"]) == (1.5, 1, 2)
    assert list(rt["depth_hist"]) == [0, 2, 2, 0, 0] and rt["ppl"] == pytest.approx(np.e)


def test_format_router_report_prints_accuracy_and_each_run():
    lines = distill.format_router_report(_evaluation(), 2).splitlines()
    assert lines[0] == (
        "accuracy against the oracle: decisions 87.5% held-out; whole routes 50.0%; EXIT 25.0%, next block 100.0%"
    )
    assert lines[3] == "  decisions 75.0%; whole routes 50.0%; keep/skip per block 62.5%"
    assert lines[5] == "on 2 held-out sequences                    ppl  blocks/token  min  max"
    assert lines[6] == "sequential                              10.000          4.00    4    4"
    assert lines[7] == "router                                   2.718          1.50    1    2"
    assert lines[-1] == "  router 2.7; oracle -"
