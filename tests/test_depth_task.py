"""tools/depth_task.py's report: rows are means over seeds with t intervals, routed rows carry the depth-follows-
difficulty numbers, and a sequential model's undefined Spearman (a constant depth) is left out, not counted as 0."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("depth_task", ROOT / "tools" / "depth_task.py")
depth_task = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(depth_task)


def _run(seed, blocks, acc2, bpt, estimator=None, spearman=None, ratio=None):
    final = {"accuracy": {"0": 1.0, "1": 1.0, "2": acc2}, "blocks": {"0": bpt, "1": bpt, "2": bpt},
             "blocks_per_token": bpt, "spearman": spearman, "hard_easy_blocks": ratio}  # fmt: skip
    return {
        "model": {"width": 64, "blocks": blocks}, "train": {"seed": seed, "steps": 10}, "tokens_seen": 1,
        "radial": {"estimator": estimator, "target_depth": 3.0, "router_warmup": 600, "kv_rule": "fill"} if estimator
        else None, "final": final,
        "seconds": 60, "load_average": 1.0,
    }  # fmt: skip


def test_report_rows_carry_depth_against_difficulty():
    runs = [_run(s, 2, 0.3, 2.0) for s in (0, 1)] + [_run(s, 4, 0.9, 4.0) for s in (0, 1)]
    runs += [_run(0, 4, 0.5, 3.0, "gate", 0.6, 2.0), _run(1, 4, 0.7, 3.0, "gate", 0.4, 1.0),
             _run(2, 4, 0.6, 3.0, "gate", None, None)]  # fmt: skip
    rows = depth_task.summarize(runs)
    seq = [r for r in rows if r["kind"] == "sequential"]
    assert all(r["spearman"] is None for r in seq)
    gate = next(r for r in rows if r["kind"] == "gate d3 w600 fill")
    m, h, n = gate["spearman"]
    assert (m, n) == (pytest.approx(0.5), 2) and h == pytest.approx(12.706 * 0.1414214 / 2**0.5, rel=1e-5)
    assert gate["hard_easy_blocks"][0] == pytest.approx(1.5)
    assert depth_task.sequential_at(rows, 64, 3.0, "accuracy", "2")[0] == pytest.approx(0.6)
    line = depth_task.routed_table(rows).splitlines()[-1]
    cells = [c.strip() for c in line.split("|")]
    assert cells[1] == "gate d3 w600 fill" and cells[-4] == "0.50 ± 1.27" and cells[-3].startswith("1.50 ± ")
    assert cells[-2] == "0.500, 0.700, 0.600"  # by seed; no run started from another


def test_show_routes_puts_each_token_under_the_blocks_of_the_position_that_predicts_it():
    from radial_min import tasks

    task = tasks.HopTask(nodes=4, max_hops=1, seq_len=17)  # 18 tokens: two rows of 12 cells
    tok, lab = tasks.sequences(task, 0, 0, 1, stream="eval")
    routes = np.full((task.seq_len, 4), -1)
    for t in range(task.seq_len):
        routes[t, : t % 4] = np.arange(t % 4)[::-1]  # position t runs t % 4 blocks, last first
    painted = []
    text = tasks.show_routes(task, tok[0], lab[0], routes, lambda s, b: painted.append(b) or f"<{s.strip()}>")
    lines = text.splitlines()
    blocks = lines[2].split()[1:] + lines[6].split()[1:]
    which = lines[3].split()[1:] + lines[7].split()[1:]
    assert blocks == [str(t % 4) for t in range(task.seq_len)]  # token t + 1 under position t's blocks
    assert which == [("".join(map(str, range(t % 4)[::-1])) or ".") for t in range(task.seq_len)]
    assert painted == [t % 4 for t in range(task.seq_len)]  # every predicted token, by its blocks; <s> plain
    assert lines[0].split()[1] == "<s>" and lines[1].split()[1] == "."


@pytest.mark.slow
def test_pack_round_trip(tmp_path, capsys):
    """A tiny run packed as float16 loads back with its task and scores as the run did (to float16 rounding)."""
    from radial_min import tasks

    run, out = tmp_path / "run", tmp_path / "packed"
    args = ["--nodes", "6", "--max-hops", "1", "--seq-len", "16", "--width", "16", "--heads", "2", "--layers", "1"]
    depth_task.main(["train", *args, "--steps", "3", "--eval", "8", "--out", str(run)])
    depth_task.main(["pack", "--run", str(run), "--out", str(out), "--eval", "8"])
    assert {f.name for f in out.iterdir()} >= {"config.json", "model.safetensors", "task.json", "hop_report.json"}
    task, net = depth_task.load_network(out)
    task0, net0 = depth_task.load_network(run)
    assert task == task0 == tasks.HopTask(nodes=6, max_hops=1, seq_len=16)
    tok, _ = tasks.sequences(task, 0, 0, 2, stream="eval")
    np.testing.assert_allclose(net.forward(tok[:, :-1]), net0.forward(tok[:, :-1]), atol=2e-2)
    depth_task.main(["queries", "--model", str(out), "--label", "1", "--eval", "4"])
    assert "accuracy by query index" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="expected a folder written by `pack`"):
        depth_task.main(["routes", "--model", str(tmp_path)])


def _args(**over):
    import argparse

    p = argparse.ArgumentParser()
    depth_task.add_task_args(p)
    depth_task.add_train_args(p)
    depth_task.add_radial_args(p, one=True)
    return argparse.Namespace(**{**vars(p.parse_args([])), "out": "x", **over})


def test_expert_choice_recursion_runs_with_the_per_step_cache():
    """A routed run whose blocks are reused (--max-depth above 2 x --layers) as expert choice trains with the
    per-step cache (a pass per round: radial._Walk.run_expert_choice), and its settings pass the trainer's checks;
    without reuse, forward-only with the per-layer cache."""
    args = _args(layers=1, max_depth=4, estimator="expert-choice", target_depth=4.0)
    cfg = depth_task.train_config(args, depth_task.task_from(args))
    assert (cfg.radial.cache_policy, cfg.radial.forward_only, cfg.radial.max_depth) == ("per-step", False, 4)
    assert not cfg.problems(1 << 40)
    args = _args(layers=1, estimator="expert-choice", target_depth=1.5)
    cfg = depth_task.train_config(args, depth_task.task_from(args))
    assert (cfg.radial.cache_policy, cfg.radial.forward_only) == ("per-layer", True)


def test_routed_runs_are_paired_with_their_equal_training_control():
    """`curve --init-from` runs (sequential, trained on from the same start as long) are no point of the curve, and
    the report pairs each routed run started from a sequential one with the control of the same start and steps."""

    def started(r, start, steps=2000):
        r["train"].update(init_from=start, steps=steps)
        return r

    runs = [_run(s, 4, 0.5 + 0.1 * s, 4.0) for s in (0, 1)]
    runs += [started(_run(s, 4, 0.6 + 0.1 * s, 4.0), f"runs/L2-s{s}") for s in (0, 1)]  # the controls
    runs += [started(_run(s, 4, 0.9, 3.0, "gate"), f"runs/L2-s{s}") for s in (1, 0)]
    runs += [started(_run(2, 4, 0.1, 3.0, "gate"), "runs/L2-s2")]  # no control: left out
    rows = depth_task.summarize(runs)
    assert depth_task.sequential_at(rows, 64, 4.0, "accuracy", "2")[0] == pytest.approx(0.55)  # the curve alone
    assert {r["kind"] for r in rows} == {"sequential", "sequential, trained on", "gate d3 w600 fill from sequential"}
    line = depth_task.paired_table(runs).splitlines()[-1]
    cells = [c.strip() for c in line.split("|")]
    assert cells[1:4] == ["gate d3 w600 fill from sequential", "64", "2"]
    assert cells[4].startswith("0.900 ± 0.000") and cells[5].startswith("0.650 ± ")
    assert cells[6] == f"0.250 ± {12.706 * 0.1 / 2**0.5 / 2**0.5:.3f}"
    assert cells[7] == "0.900 [0.600], 0.900 [0.700]"
    assert depth_task.paired_table(runs[:2]) == ""


def test_reused_blocks_are_paired_with_the_sequential_runs_of_their_seed():
    """A network of 2 blocks run up to 4 deep, against the 2-block (same parameters) and 4-block (its depth)
    sequential runs of the same seed: differences paired by seed."""
    runs = [_run(s, 2, 0.5 - 0.1 * s, 2.0) for s in (0, 1)] + [_run(s, 4, 0.9 - 0.2 * s, 4.0) for s in (0, 1)]
    for s, acc in ((1, 0.9), (0, 1.0)):
        r = _run(s, 2, acc, 4.0, "expert-choice")
        r["radial"]["max_depth"] = 4
        runs.append(r)
    cells = [c.strip() for c in depth_task.reuse_table(runs).splitlines()[-1].split("|")]
    assert cells[1:6] == ["expert-choice d3 w600 fill max4", "64", "2", "4.00 ± 0.00", "2"]
    t = 12.706 / 2**0.5
    assert cells[6:8] == ["0.950 ± " + f"{t * 0.0707107:.3f}", "0.450 ± " + f"{t * 0.0707107:.3f}"]
    assert cells[8] == "0.500 ± 0.000"  # 1.0 - 0.5, 0.9 - 0.4
    assert cells[10] == f"0.150 ± {t * 0.0707107:.3f}"  # 1.0 - 0.9, 0.9 - 0.7
    assert cells[-2] == "1.000 [0.500, 0.900], 0.900 [0.400, 0.700]"
    assert depth_task.reuse_table(runs[:4]) == ""


def test_the_shipped_hop_network_decodes_as_it_was_trained():
    """weights/hop-16, loaded as users load it, decodes held-out sequences token by token (the fused router kernel
    and its sink-free early return, the fill rule at each skip, generation's path) to the routes and logits of its
    training forward (the router's float64 softmax, a tape), and skips blocks on them (3 of 4 per token in its
    report). bench/depth_speed.py times exactly this decode."""
    import radial_min
    from radial_min import tasks
    from radial_min.io.outputs import read_json
    from radial_min.radial import RadialNetwork

    net = radial_min.load(ROOT / "weights" / "hop-16")
    assert isinstance(net, RadialNetwork) and net.gate and net.kv_rule == "fill" and not net.router.config.sink
    task = tasks.HopTask(**read_json(ROOT / "weights" / "hop-16" / "task.json"))
    tok, _ = tasks.sequences(task, 5, 0, 2, stream="eval")
    for seq in tok[:, :-1]:
        logits = net.forward(seq[None], tape=[])  # the training path
        routes = net.last_walk.route_lists()
        net.routes, cache = [], net.new_cache()
        decoded = np.concatenate([net.forward(seq[t : t + 1], cache) for t in range(len(seq))])
        assert net.routes == routes
        np.testing.assert_allclose(decoded, logits, rtol=1e-4, atol=1e-4 * np.abs(logits).max())
        depth = np.mean([len(r) for r in routes])
        assert 2 < depth < 3.8 and len({tuple(r) for r in routes}) > 1, depth
