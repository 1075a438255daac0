"""Search labels (analysis/route_search.py): the greedy step picks the block a from-scratch evaluation of every
candidate says costs least; reusing the stream before the candidate changes no number; the labels are the trainer's
examples and mark exactly the chosen blocks for non-sink tokens; the command makes routers that follow the rules."""

import json
from pathlib import Path

import numpy as np
import pytest

import radial_min
from conftest import shared
from radial_min.analysis import distill, oracle, route_search
from radial_min.config import LlamaConfig
from radial_min.models import ARCHITECTURES
from radial_min.radial import RadialNetwork
from radial_min.router import Router, RouterConfig, init_router
from radial_min.train import sequence_nll

FIXTURES = Path(__file__).parent / "fixtures"
ROOT = Path(__file__).resolve().parent.parent


def llama(layers=4, seed=3):
    """A random Llama of `layers` layers (2 * layers blocks), its weights moved off their init so blocks differ."""
    cfg = LlamaConfig(
        vocab_size=37,
        hidden_size=16,
        num_hidden_layers=layers,
        max_position_embeddings=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=100.0,
        tie_word_embeddings=True,
        intermediate_size=24,
        model_type="llama",
    )
    a = ARCHITECTURES["llama"]
    rng = np.random.default_rng(seed)
    tensors = {
        k: (v + 0.3 * rng.standard_normal(v.shape)).astype(np.float32)
        for k, v in a.module.init_tensors(cfg, seed).items()
    }
    return a.model(cfg, tensors)


def kl_from_scratch(model, ids, skipped, sink):
    """Mean KL(full || routed) with the route run from the embedding by the oracle and the teacher by the model's
    own forward, in float64 throughout: nothing of route_search's own arithmetic."""
    keep = route_search.keep_for(len(ids), len(model.blocks), skipped, sink)
    logits = oracle.run_sequence(model, ids, oracle.forced(keep), "fill")[0]
    t, r = route_search.log_softmax(model.forward(ids)), route_search.log_softmax(logits)
    return float((np.exp(t) * (t - r)).sum(-1).mean())


@pytest.mark.parametrize("sink", [0, 1])
def test_each_greedy_step_picks_the_cheapest_candidate_by_brute_force(sink):
    model = llama()
    ids = np.random.default_rng(2).integers(0, 37, 14)
    candidates = list(range(len(model.blocks)))  # both kinds: 8 candidates at the first step
    trajectory, _ = route_search.greedy_search(model, ids, candidates, 4, sink)
    chosen = [t["block"] for t in trajectory]
    assert len(set(chosen)) == 4
    for s, step in enumerate(trajectory):
        rest = [c for c in candidates if c not in chosen[:s]]
        brute = {c: kl_from_scratch(model, ids, chosen[:s] + [c], sink) for c in rest}
        assert sorted(step["candidates"]) == sorted(map(str, rest))
        for c in rest:
            assert step["candidates"][str(c)] == pytest.approx(brute[c], rel=1e-4, abs=1e-7)
        costs = np.array([brute[c] for c in rest])
        assert costs.max() - costs.min() > 1e-2  # a real choice: the candidates differ
        assert step["block"] == rest[int(np.argmin(costs))]
        assert step["kl"] == pytest.approx(costs.min(), rel=1e-4, abs=1e-7)


def test_reusing_the_prefix_changes_no_number_and_runs_fewer_blocks():
    model = llama(layers=5, seed=4)
    ids = np.random.default_rng(3).integers(0, 37, 12)
    att = [i for i, b in enumerate(model.blocks) if b.kind == "att"]
    fast, fast_blocks = route_search.greedy_search(model, ids, att, 3, 1, reuse=True)
    slow, slow_blocks = route_search.greedy_search(model, ids, att, 3, 1, reuse=False)
    assert [t["block"] for t in fast] == [t["block"] for t in slow]
    for a, b in zip(fast, slow):
        assert a["candidates"] == pytest.approx(b["candidates"], rel=1e-5, abs=1e-8)
    assert fast_blocks < slow_blocks
    n = len(model.blocks)  # the first run, then per step each candidate from its block and the update from the choice
    expected = n + sum(sum(n - c for c in att if c not in [t["block"] for t in fast[:s]]) for s in range(3))
    assert fast_blocks == expected + sum(n - t["block"] for t in fast)


def test_kl_is_the_float64_divergence():
    rng = np.random.default_rng(0)
    t_logits, logits = (rng.standard_normal((5, 300)) * 4).astype(np.float32), rng.standard_normal((5, 300)) * 4
    t, r = route_search.log_softmax(t_logits), route_search.log_softmax(logits)
    want = float((np.exp(t) * (t - r)).sum(-1).mean())
    assert route_search.mean_kl(route_search.Teacher(t_logits), logits.astype(np.float32)) == pytest.approx(want, 1e-6)
    assert route_search.mean_kl(route_search.Teacher(t_logits), t_logits) == pytest.approx(0.0, abs=1e-7)


def test_labels_are_the_trainers_examples_and_mark_exactly_the_chosen_blocks():
    model = llama()
    seqs = np.random.default_rng(5).integers(0, 37, (2, 10))
    n, T = len(model.blocks), seqs.shape[1]
    # nothing skipped: the same examples, state for state, as the oracle's that keeps every block
    full = route_search.route_examples(model, seqs, [route_search.keep_for(T, n, [], 1)] * 2)
    ref = distill.oracle_examples(model, seqs, 0.0, "fill")
    assert sorted(full) == sorted(ref)
    for k in ref:
        assert full[k].dtype == ref[k].dtype and full[k].shape == ref[k].shape, k
        np.testing.assert_array_equal(full[k], ref[k])
    skipped = [[2, 4], [0, 6]]
    ex = route_search.route_examples(model, seqs, [route_search.keep_for(T, n, s, 1) for s in skipped])
    for token in range(2 * T):
        seq, pos = divmod(token, T)
        rows = np.flatnonzero(ex["token"] == token)
        ran = [int(b) for b in ex["label"][rows] if b < n]  # the blocks this token's route runs, in order
        assert ex["label"][rows][-1] == n  # it exits after them
        assert ran == [b for b in range(n) if pos < 1 or b not in skipped[seq]]
        np.testing.assert_array_equal(ex["prev"][rows], [-1] + ran)
        np.testing.assert_array_equal(ex["step"][rows], np.arange(len(rows)))
    cfg = RouterConfig(16, n, 8, True, None, None, "fill", "test", sink=1)
    router = distill.train_router(ex, cfg, 40, 1e-2, 64, 0, progress=False)
    untrained = Router(cfg, init_router(cfg, 0))
    assert distill.accuracy(router, ex)["decision"] > distill.accuracy(untrained, ex)["decision"] + 0.2


def test_consensus_takes_the_blocks_chosen_most_often():
    trajectories = [[4, 2, 8, 6], [2, 6, 4, 0], [6, 2, 0, 4]]
    assert route_search.consensus(trajectories, 1) == [2]  # 4, 2, 6 once each, all first: the lowest index
    assert route_search.consensus(trajectories, 2) == [2, 6]  # 2 three times, 6 twice, 4 once
    assert route_search.consensus(trajectories, 3) == [2, 4, 6]  # 2 three times; 4, 6 twice; 8, 0 once
    assert route_search.consensus([[5, 3], [3, 1]], 2) == [3, 5]  # 5 and 1 once: 5 was chosen earlier


def test_search_command_makes_routers_that_follow_its_rules(tmp_path):
    shared("wikitext-2", "valid.txt")
    import sys

    sys.path.insert(0, str(ROOT / "tools"))
    import real_routers

    folder = FIXTURES / "trained-llama"
    args = ["search", "--model", str(folder), "--budgets", "1,2", "--sequences", "2", "--seq-len", "16"]
    real_routers.main(args + ["--out", str(tmp_path), "--epochs", "2"])
    model = radial_min.load(folder)
    att = [i for i, b in enumerate(model.blocks) if b.kind == "att"]
    store = json.loads((tmp_path / "search-attention-trajectories.json").read_text())
    (runs,) = store.values()
    assert len(runs) == 2 and all(len(r["trajectory"]) == 2 for r in runs)
    for k in (1, 2):
        made = json.loads((tmp_path / f"search-attention-k{k}" / "made.json").read_text())
        assert [t["blocks"] for t in made["trajectories"]] == [[t["block"] for t in r["trajectory"]] for r in runs]
        assert all(set(t["blocks"]) <= set(att) for t in made["trajectories"])
        assert made["label_blocks_per_token"] == pytest.approx(len(model.blocks) - k * 15 / 16)  # sink runs all
        router = Router.load(tmp_path / f"search-attention-k{k}" / "router")
        assert router.config.sink == 1 and router.config.mandatory == [1, 3]
        _, depth, routes = sequence_nll(RadialNetwork(model, router, kv_rule="fill"), np.arange(32).reshape(2, 16))
        for seq in routes:
            assert list(seq[0][seq[0] >= 0]) == list(range(len(model.blocks)))  # the sink runs every block
            assert all({1, 3} <= set(r[r >= 0]) for r in seq)  # the FFN blocks are never skipped
    with pytest.raises(SystemExit, match="--budgets"):
        real_routers.main(args[:4] + ["9"] + args[5:] + ["--out", str(tmp_path)])
