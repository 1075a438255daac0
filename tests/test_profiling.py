"""Residual-ratio hooks and the oracle: exact against direct computations, and harmless when off."""

import numpy as np
import pytest
from conftest import FIXTURES, random_opt

import radial_min
from radial_min import kernels
from radial_min.analysis import oracle, profiling
from radial_min.blocks import Rows

SEQS = np.random.default_rng(0).integers(3, 60, size=(3, 16))


@pytest.fixture(scope="module", params=[True, False], ids=["pre-LN", "post-LN"])
def model(request):
    return random_opt(seed=7, num_hidden_layers=3, do_layer_norm_before=request.param)


def median_ratio(model):
    """A threshold that splits this model's blocks (random post-LN models have ratios far above 1)."""
    return float(np.median(profiling.profile_text(model, SEQS)))


def test_hooks_leave_logits_unchanged(model):
    rec = profiling.RatioRecorder(len(model.blocks))
    np.testing.assert_array_equal(model.forward(SEQS[0], observe=rec), model.forward(SEQS[0]))
    assert rec.rows().shape == (16, len(model.blocks))


def test_recorded_ratio_equals_direct_computation(model):
    """Run each block by hand on its own input and compute ||d|| / ||x + d|| (and the `sum` variant) in NumPy,
    with d = f for pre-LN blocks and d = LN(x + f) - x for post-LN ones (the layer norm by its reference)."""
    for kind in profiling.KINDS:
        rec = profiling.RatioRecorder(len(model.blocks), kind)
        model.forward(SEQS[0], observe=rec)
        x = model.embed(SEQS[0], np.arange(16))
        for i, block in enumerate(model.blocks):
            f = block.branch(x, Rows(np.arange(16)))
            y = x + f if block.pre_norm else kernels.layernorm_ref(x + f, block.norm.weight, block.norm.bias, 1e-5)
            dx, xx, yx = (np.linalg.norm(a.astype(np.float64), axis=1) for a in (y - x, x, y))
            expected = dx / yx if kind == "output" else dx / (xx + dx)
            np.testing.assert_allclose(rec.rows()[:, i], expected, rtol=2e-5)
            x = block.residual(x, f)


def test_post_ln_ratio_is_the_share_a_skip_removes():
    """Skipping a post-LN block skips its LN too (y = x), so the ratio is ||y - x|| / ||y||: the relative change a
    skip makes. The ratio of f before the LN would not say that: LN(x + 0) is far from x with these gains."""
    model = random_opt(seed=7, num_hidden_layers=3, do_layer_norm_before=False)
    x = model.embed(SEQS[0], np.arange(16))
    for block in model.blocks:
        f = block.branch(x, Rows(np.arange(16)))
        y = block.residual(x, f)
        skip_effect = np.linalg.norm(y - x, axis=1) / np.linalg.norm(y, axis=1)  # running vs skipping the block
        np.testing.assert_allclose(profiling.block_ratio(block, x, f), skip_effect, rtol=1e-5)
        before_ln = profiling.residual_ratio(x, f)  # the old reading: the same formula on f, before the LN
        assert np.abs(before_ln - skip_effect).max() > 0.05
        x = y
    ln_of_x = block.norm(x)
    assert np.median(np.linalg.norm(ln_of_x - x, axis=1) / np.linalg.norm(x, axis=1)) > 0.1  # LN(x + 0) != x


def test_tau_zero_is_the_sequential_model(model):
    run = oracle.simulate(model, SEQS, oracle.threshold(0.0), "fill")
    assert run.keep.all()
    for s, ids in enumerate(SEQS):
        logits, _, _ = oracle.run_sequence(model, ids, oracle.threshold(0.0), "fill")
        np.testing.assert_array_equal(logits, model.forward(ids))  # exactly: the same operations in the same order
    nll = np.concatenate([oracle.next_token_nll(model.forward(ids), ids) for ids in SEQS])
    assert run.ppl == pytest.approx(np.exp(nll.mean()), rel=1e-12)
    assert oracle.perplexity(model, SEQS) == pytest.approx(run.ppl, rel=1e-12)  # the engine's whole-sequence score
    drop = oracle.simulate(model, SEQS, oracle.threshold(0.0), "drop")  # per-token attention: equal to rounding
    assert drop.keep.all() and drop.ppl == pytest.approx(run.ppl, rel=1e-5)
    rec = profiling.RatioRecorder(len(model.blocks))
    model.forward(SEQS[0], observe=rec)  # the oracle decides on the ratio profiling reports, under both rules
    np.testing.assert_allclose(run.ratios[0], rec.rows(), rtol=1e-6)
    np.testing.assert_allclose(drop.ratios[0], rec.rows(), rtol=1e-4)


def test_a_ratio_equal_to_tau_keeps_its_block(model):
    """The oracle keeps a block when its ratio is *at least* tau: with tau set to exactly the ratio one token sees at
    block 0 (which no earlier skip can change), that token keeps block 0, and a hair above it, skips it."""
    assert oracle.threshold(0.25)(0, np.arange(3), np.array([0.25, np.nextafter(0.25, 0), 0.26])).tolist() == [
        True,
        False,
        True,
    ]
    ids = SEQS[0]
    _, _, full = oracle.run_sequence(model, ids, oracle.threshold(0.0), "fill")
    t = int(np.argmin(full[:, 0]))  # the lowest ratio at block 0: every other token's is higher
    _, keep, ratios = oracle.run_sequence(model, ids, oracle.threshold(full[t, 0]), "fill")
    assert ratios[t, 0] == full[t, 0] and keep[:, 0].all()
    _, keep, _ = oracle.run_sequence(model, ids, oracle.threshold(np.nextafter(full[t, 0], np.inf)), "fill")
    assert not keep[t, 0] and keep[:, 0].sum() == len(ids) - 1


def test_tau_above_every_ratio_skips_every_block(model):
    run = oracle.simulate(model, SEQS, oracle.threshold(np.inf), "drop")
    assert not run.keep.any() and (run.depth == 0).all()
    ids = SEQS[0]
    logits, _, _ = oracle.run_sequence(model, ids, oracle.threshold(np.inf))
    np.testing.assert_allclose(logits, model.head(model.embed(ids, np.arange(len(ids)))), rtol=1e-6)


def test_perplexity_is_exp_of_mean_nll_computed_independently(model):
    run = oracle.simulate(model, SEQS, oracle.threshold(median_ratio(model)), "fill")
    assert 0 < run.keep.mean() < 1
    total, count = 0.0, 0
    for s, ids in enumerate(SEQS):
        logits, _, _ = oracle.run_sequence(model, ids, oracle.forced(run.keep[s]), "fill")
        for t in range(len(ids) - 1):
            z = logits[t].astype(np.float64)
            total += np.log(np.exp(z - z.max()).sum()) + z.max() - z[ids[t + 1]]
            count += 1
    assert run.ppl == pytest.approx(np.exp(total / count), rel=1e-9)


@pytest.mark.parametrize("rule", oracle.KV_RULES)
def test_greedy_decisions_consistent_with_recomputed_ratios(model, rule):
    """Replay the oracle's own decisions, recording ratios along that path: kept exactly where ratio >= tau."""
    tau = median_ratio(model)
    run = oracle.simulate(model, SEQS, oracle.threshold(tau), rule)
    assert 0 < run.keep.mean() < 1  # the threshold really splits
    for s, ids in enumerate(SEQS):
        _, kept, ratios = oracle.run_sequence(model, ids, oracle.forced(run.keep[s]), rule)
        np.testing.assert_array_equal(kept, ratios >= tau)
        np.testing.assert_allclose(ratios, run.ratios[s], rtol=1e-6)


def test_drop_rule_hides_skipped_tokens_from_later_ones(model):
    """Under drop, a token's skipped attention block offers no keys: later tokens' outputs change vs fill."""
    keep = np.ones((16, len(model.blocks)), bool)
    keep[4, 0] = False  # token 4 skips the first attention block
    fill, _, _ = oracle.run_sequence(model, SEQS[0], oracle.forced(keep), "fill")
    drop, _, _ = oracle.run_sequence(model, SEQS[0], oracle.forced(keep), "drop")
    np.testing.assert_allclose(fill[:4], drop[:4], rtol=1e-5, atol=1e-5)  # earlier tokens: unaffected
    assert np.abs(fill[5:] - drop[5:]).max() > 1e-3


def test_sweep_compares_at_the_oracles_depth(model):
    """Baselines and the other rule are scored at each oracle row's own mean depth: the mean NLL interpolated
    between the runs that bracket it, recomputed here from simulations of our own."""
    tau = median_ratio(model)
    res = oracle.sweep(model, SEQS[:2], [0.0, tau / 2, tau], ["fill", "drop"])
    n = len(model.blocks)
    rows = {(r["rule"], r["tau"]): r for r in res["rows"]}
    first = rows[("fill", 0.0)]
    assert first["mean_depth"] == n and first["ppl"] == first["early_exit_ppl"] == first["static_lowest_ppl"]
    for (rule, t), row in rows.items():
        assert row[f"{rule}_ppl_at_depth"] == pytest.approx(row["ppl"], rel=1e-5)  # its own curve: itself (up to
        # rounding when two taus skip nothing: drop runs attention token by token)
        depth = row["mean_depth"]
        for baseline, blocks_of in (
            ("static_lowest_ppl", lambda k: oracle.lowest_ratio_blocks(res["mean_ratio"], k)),
            ("early_exit_ppl", lambda k: oracle.last_blocks(n, k)),
        ):
            k_hi = int(np.ceil(n - depth - 1e-9))
            nll = [oracle.simulate(model, SEQS[:2], oracle.static(blocks_of(k))).nll.mean() for k in (k_hi - 1, k_hi)]
            w = (n - k_hi + 1) - depth  # weight of the deeper run's complement: depth = (n - k_hi + 1) - w
            expected = np.exp(nll[0] + w * (nll[1] - nll[0])) if k_hi > 0 else np.exp(nll[1])
            assert row[baseline] == pytest.approx(expected, rel=1e-9), (rule, t, baseline)
    other = rows[("drop", tau)]  # fill's curve at drop's depth, interpolated between fill's own taus
    points = sorted((r["mean_depth"], np.log(r["ppl"])) for (ru, _), r in rows.items() if ru == "fill")
    expected = np.exp(np.interp(other["mean_depth"], [d for d, _ in points], [v for _, v in points]))
    if points[0][0] <= other["mean_depth"]:
        assert other["fill_ppl_at_depth"] == pytest.approx(expected, rel=1e-9)
    else:
        assert other["fill_ppl_at_depth"] is None  # outside what fill measured: not extrapolated
    ks = {r["k"] for r in res["static"]}
    assert ks >= {0, int(np.floor(n - rows[("fill", tau)]["mean_depth"]))}
    assert res["depth_hist"][("fill", 0.0)][n] == 32
    assert oracle.last_blocks(6, 2) == [4, 5]
    curves = oracle.sweep_curves(res, ["fill", "drop"])  # the figure's curves: every point, sorted by depth
    assert set(curves) == {"oracle (fill)", "oracle (drop)", "static: lowest-ratio blocks", "static: early exit"}
    for label, (depths, ppls) in curves.items():
        assert depths == sorted(depths)
    fill = sorted((r["mean_depth"], r["ppl"]) for r in res["rows"] if r["rule"] == "fill")
    assert curves["oracle (fill)"] == ([d for d, _ in fill], [p for _, p in fill])
    exits = [r for r in res["static"] if r["baseline"] == "exit"]
    assert len(curves["static: early exit"][0]) == len(exits) > 0


def test_at_depth_interpolates_the_mean_nll():
    points = [(12.0, np.log(100.0)), (11.0, np.log(200.0)), (8.0, np.log(400.0))]
    assert oracle.at_depth(points, 11.5) == pytest.approx(np.sqrt(100 * 200))  # halfway in NLL: geometric mean
    assert oracle.at_depth(points, 12.0) == pytest.approx(100.0) and oracle.at_depth(points, 8.0) == pytest.approx(400)
    assert oracle.at_depth(points, 10.0) == pytest.approx(200 * 2 ** (1 / 3))
    assert oracle.at_depth(points, 7.9) is None and oracle.at_depth(points, 12.1) is None
    assert oracle.bracketing_ks(12, 7.75) == [4, 5] and oracle.bracketing_ks(12, 8.0) == [4]


def test_agreement_on_a_runs_own_states(model):
    """Decisions judged against the oracle's rule on the states they produced, in the router's units (moves)."""
    keep = np.array([[[True, False, True]]])  # one token: runs block 0, skips 1, runs 2, exits
    run = oracle.Run(keep, np.full((1, 1, 3), 0.5), np.zeros((1, 0)))
    a = oracle.agreement(run, 0.3)  # the oracle would have run block 1: the move after block 0 disagrees
    assert (a["moves"], a["move"], a["block"], a["route"]) == (3, pytest.approx(2 / 3), pytest.approx(2 / 3), 0.0)
    a = oracle.agreement(oracle.Run(keep, np.array([[[0.5, 0.1, 0.2]]]), np.zeros((1, 0))), 0.3)
    assert (a["move"], a["block"]) == (pytest.approx(2 / 3), pytest.approx(2 / 3))  # runs 2 where the oracle exits
    a = oracle.agreement(oracle.Run(keep, np.array([[[0.5, 0.1, 0.3]]]), np.zeros((1, 0))), 0.3)
    assert (a["move"], a["block"], a["route"]) == (1.0, 1.0, 1.0)  # a ratio equal to tau: kept, as the oracle does
    early = np.array([[[True, False, False], [False, False, True]]])  # two tokens, 1 block each: 2 + 2 moves
    a = oracle.agreement(oracle.Run(early, np.array([[[0.5, 0.1, 0.9], [0.1, 0.1, 0.9]]]), np.zeros((1, 0))), 0.3)
    assert (a["moves"], a["move"], a["route"]) == (4, pytest.approx(3 / 4), 0.5)  # token 0's EXIT skips block 2
    one = np.array([[[False, True, False]]])  # its first move skips block 0 and runs 1: two wrong blocks, one move
    a = oracle.agreement(oracle.Run(one, np.array([[[0.5, 0.1, 0.1]]]), np.zeros((1, 0))), 0.3)
    assert (a["moves"], a["move"], a["block"]) == (2, 0.5, pytest.approx(1 / 3))
    tau = median_ratio(model)  # the oracle agrees with itself everywhere, on its own states
    a = oracle.agreement(oracle.simulate(model, SEQS, oracle.threshold(tau), "drop"), tau)
    assert (a["move"], a["block"], a["route"]) == (1.0, 1.0, 1.0)
    static = oracle.simulate(model, SEQS, oracle.static([0]), "drop")  # never runs block 0
    assert oracle.agreement(static, tau)["block"] < 1


def test_summary_statistics():
    ratios = np.array([[0.1, 0.5], [0.3, 0.7], [0.2, 0.6]])
    s = profiling.summarize(ratios, ["L0.att", "L0.ffn"])
    assert s["blocks"]["L0.att"]["median"] == pytest.approx(0.2)
    assert s["types"]["ffn"]["mean"] == pytest.approx(0.6)
    assert s["overall"]["p90"] == pytest.approx(np.percentile(ratios, 90))
    assert "overall" in profiling.format_summary(s)
    with pytest.raises(ValueError, match="ratio kind"):
        profiling.residual_ratio(ratios, ratios, "max")


def test_vit_and_generation_profiles():
    vit = radial_min.load(FIXTURES / "vit-cls")
    pixels = np.load(FIXTURES / "vit-cls" / "reference.npz")["pixel_values"]
    rows = profiling.profile_images(vit, pixels)
    assert rows.shape == (len(pixels) * (vit.config.num_patches + 1), len(vit.blocks)) and (rows > 0).all()
    model = random_opt(seed=3)
    rows, new = profiling.profile_generation(model, [SEQS[0][:5], SEQS[1][:3]], 6)
    assert rows.shape == (2 * 5, len(model.blocks)) and [len(n) for n in new] == [6, 6]


def test_summary_rows_and_medians_are_the_summarys_numbers():
    """What profile writes to summary.csv and sizes.csv: the summary's statistics, block by block, per type, overall."""
    ratios = np.array([[0.1, 0.5, 0.2, 0.7], [0.3, 0.9, 0.4, 0.6]])
    names = ["L0.att", "L0.ffn", "L1.att", "L1.ffn"]
    summary = profiling.summarize(ratios, names)
    rows = profiling.summary_rows(summary)
    assert [r["block"] for r in rows] == [*names, "all_att", "all_ffn", "overall"]
    assert rows[0]["median"] == pytest.approx(0.2) and rows[4]["median"] == pytest.approx(0.25)
    assert rows[-1] == {"block": "overall", **summary["overall"]} and rows[-1]["n"] == 8
    assert profiling.medians(summary) == pytest.approx({"overall": 0.45, "att": 0.25, "ffn": 0.65})


def test_table_numbers_keep_their_columns_apart():
    """Whole-block dropping on a real model reaches perplexities of 1e9: a number too wide for its column gets an
    exponent instead of running into its neighbour (it once printed '619.2144852942008.673' for two columns)."""
    num = oracle.format_number
    assert num(619.2144, 14) + num(4852942008.673, 12) == "       619.214    4.85e+09"
    assert num(1030551.482, 12) == " 1030551.482" and num(None, 12) == " " * 11 + "-"
    assert num(0.5, 0, 1) == "0.5"


def _sweep_result():
    """A two-block sweep as oracle.sweep returns it: one tau under each rule, one static k."""
    row = dict(tau=0.2, ppl=12.5, mean_depth=1.5, min_depth=1, max_depth=2, static_lowest_ppl=14.25)
    rows = [
        {"rule": "fill", **row, "early_exit_ppl": None, "drop_ppl_at_depth": 13.0, "skip_rate": [0.0, 0.5]},
        {"rule": "drop", **row, "early_exit_ppl": 20.0, "fill_ppl_at_depth": 12.0, "skip_rate": [0.25, 0.25]},
    ]
    statics = [
        {"baseline": "lowest", "k": 1, "depth": 1, "ppl": 14.0, "dropped": [1]},
        {"baseline": "exit", "k": 1, "depth": 1, "ppl": 4852942008.673},
    ]
    hist = {("fill", 0.2): np.array([0, 1, 1]), ("drop", 0.2): np.array([0, 1, 1])}
    return {"rows": rows, "static": statics, "depth_hist": hist, "mean_ratio": [0.5, 0.1]}


def test_format_sweep_lines_up_each_setting_beside_its_baselines():
    res, names = _sweep_result(), ["L0.att", "L0.ffn"]
    lines = oracle.format_sweep(res["rows"], res["static"], names, ["fill", "drop"]).splitlines()
    assert lines[1] == "rule     tau       ppl   depth  min  max  lowest-ratio  early exit  other rule"
    assert lines[3] == "fill   0.200    12.500    1.50    1    2        14.250           -      13.000"
    assert lines[4] == "drop   0.200    12.500    1.50    1    2        14.250      20.000      12.000"
    assert lines[5].startswith("(depth: of 2 blocks;")
    assert "  1      1        14.000    4.85e+09  L0.ffn" in lines
    assert lines[-3:] == [
        "              L0.att  L0.ffn",
        "fill 0.200      0.00    0.50",
        "drop 0.200      0.25    0.25",
    ]
    one = oracle.format_sweep(res["rows"][:1], res["static"], names, ["fill"]).splitlines()
    assert one[1].endswith("early exit") and one[3].endswith("           -")  # one rule: no other-rule column


def test_simulate_record_says_what_the_sweep_ran_on(tmp_path):
    class Model:
        path = tmp_path / "m"

    res = _sweep_result()
    record = oracle.simulate_record(Model(), np.zeros((3, 32), np.int64), ["L0.att", "L0.ffn"], res)
    assert record["model"] == str(tmp_path / "m") and (record["sequences"], record["seq_len"]) == (3, 32)
    assert record["blocks"] == ["L0.att", "L0.ffn"] and record["rows"] is res["rows"]
    assert list(record["depth_hist"]) == ["fill/0.2", "drop/0.2"] and list(record["depth_hist"]["drop/0.2"]) == [
        0,
        1,
        1,
    ]
    assert record["static"] is res["static"] and record["mean_ratio"] == [0.5, 0.1]


def test_depth_counts_and_size_rows_are_what_profile_plots_and_writes():
    ratios = np.array([[0.1, 0.5, 0.2, 0.7], [0.3, 0.9, 0.4, 0.6], [0.05, 0.1, 0.15, 0.19]])
    keep = profiling.kept_blocks(ratios, 0.2)  # a ratio equal to tau keeps its block
    assert keep.tolist() == [[False, True, True, True], [True, True, True, True], [False, False, False, False]]
    assert profiling.depth_counts(keep).tolist() == [1, 0, 0, 1, 1]  # tokens keeping 0..4 blocks
    assert profiling.depth_counts(keep[2:]).tolist() == [1, 0, 0, 0, 0]  # every depth counted, reached or not
    sizes = {"big": (1000, {"overall": 0.5, "att": 0.25, "ffn": 0.75}), "small": (10, {"overall": 0.125})}
    assert profiling.size_rows(sizes) == [
        {"model": "small", "parameters": 10, "median_overall": 0.125},
        {"model": "big", "parameters": 1000, "median_overall": 0.5, "median_att": 0.25, "median_ffn": 0.75},
    ]
    assert profiling.format_sizes(sizes).splitlines() == [
        "model                         parameters  median     att     ffn",
        "small                                 10   0.125     nan     nan",
        "big                                1,000   0.500   0.250   0.750",
    ]
