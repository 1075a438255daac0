"""Does routing pay in wall-clock time on the variable-depth task? Two measurements, interleaved in one run:

1. The shipped network (weights/hop-16, width 64, 4 blocks, its gate router with the fill rule) against the same
   blocks run in order, every block (the model's own forward), on held-out sequences of its task: decode token by
   token through the KV cache (`forward` of one token, the call `generate` makes per new token; the held-out
   token fed in, so each token runs the route the held-out sequence gives it), `generate` itself (greedy, from the
   sequence's table), and prefill (a whole sequence at once: the block schedule). Beside them: the blocks per token
   measured, the router's cost per decision and its share of a token, the cost of a token that runs no block, and
   the ideal speed-up (Amdahl: only the blocks run cost time).
2. The width sweep: random OPT models of the shipped network's layout (2 layers = 4 blocks, 4 heads, FFN 4 x width,
   its vocabulary and 48 positions) at widths 64 ... 1024, each with a router of the shipped kind (an MLP with the
   same 16 hidden units, random weights) that is run at every decision as in generation, its choice then
   overridden by a scripted route skipping a fixed share of the blocks (`Forced`). So the routed rows pay exactly
   a real router's decisions, at that width, and skip exactly the share asked for: which share a trained router
   would skip at that width is a matter of training, not of speed.

    python bench/depth_speed.py                       # 1 thread, ~5 minutes on an idle 2-core machine
    python bench/depth_speed.py --widths 64 256 --rounds 3 --quick

Numbers are per call (one or more held-out sequences replayed), contenders interleaved round by round
(common.interleaved); a ratio's interval is the 95% t-interval of the per-round ratios (each round's routed time
against the same round's sequential time).
"""

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import common
from common import ROOT, LoadMonitor, interleaved, machine, print_table, section, set_threads, stat
from routing import skip_routes  # routes skipping a share of blocks, each block equally often

SHIPPED = ROOT / "weights" / "hop-16"
EVAL_SEED = 5  # the eval stream (never a training sequence) at a seed no report of the network used (they use 0)
SHARES = (0.25, 0.5)  # shares of the blocks the scripted routes skip in the sweep
SWEEP_NOTE = """\
0% skipped, and the ratios at 25% and 50%: routed speed / sequential speed, the mean of the per-round ratios ± its 95%
t-interval (the median); 0%: every block run, the router asked at each step (what routing alone costs). The fill rule
(the shipped network's) unless 'drop'. ideal: Amdahl's bound, by blocks (the blocks skipped cost nothing, the rest as
the sequential token), then by the weights multiplied (fill's key and value projections at skipped attention blocks
counted). router us: one decision; router share: a token's decisions at 50% skipped times that, over its time. 'none
run': a routed token with every block skipped (drop: embedding, one decision, head); 'no block': the sequential path
with no block (embedding, head); seq. us: a sequential token."""
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228]  # t quantiles, 1..10 d.o.f.


def mean_ci(values) -> tuple:
    """Mean and half-width of the 95% t-interval (nan for one value)."""
    import numpy as np

    a = np.asarray(values, float)
    if len(a) < 2:
        return float(a.mean()), float("nan")
    return float(a.mean()), float(T975[min(len(a) - 2, len(T975) - 1)] * a.std(ddof=1) / math.sqrt(len(a)))


def now():
    """(wall-clock seconds, this process's CPU seconds). On a shared machine the CPU time leaves out the time the
    process waited for a core; on an idle one, single-threaded, the two agree."""
    return time.perf_counter(), time.process_time()


def since(t0, n: int) -> tuple:
    """Per unit of n: (wall, CPU) seconds since t0 = now()."""
    t1 = now()
    return (t1[0] - t0[0]) / n, (t1[1] - t0[1]) / n


def interleaved_samples(fns: dict, reps: int) -> tuple:
    """common.interleaved over fns returning (wall, CPU) pairs, keeping every round's sample (for per-round ratios)
    -> ({name: [wall per round]}, {name: [CPU per round]})."""
    samples = {name: [] for name in fns}

    def keep(name, fn):
        def once():
            v = fn()
            samples[name].append(v)
            return v[0]

        return once

    interleaved({name: keep(name, fn) for name, fn in fns.items()}, reps)
    kept = {name: v[1:] for name, v in samples.items()}  # v[0]: the untimed warm-up call
    return tuple({name: [x[k] for x in v] for name, v in kept.items()} for k in (0, 1))


# ------------------------------------------------------------------------------------------ the routers


class Forced:
    """A real router run at every decision, its choice overridden by a scripted route: `table[pos, step]` is the
    move of the token at position pos at its step (the blocks of routes[pos], then EXIT). The walk calls `decide`
    exactly where it would call the router's, and the router's own work (the fused MLP kernel, its checks) is done
    each time; its gate (the probability of its own choice) scales the branch as in a gated network. The override
    costs one fancy index, which a real router does not pay: the routed rows are, if anything, a little slow."""

    def __init__(self, router, routes: list):
        import numpy as np

        self.router, self.config = router, router.config
        exit_ = router.config.exit
        self.table = np.full((len(routes), router.config.depth_limit + 1), exit_, np.int64)  # [P, depth + 1]
        for p, r in enumerate(routes):
            self.table[p, : len(r)] = r

    def decide(self, x, prev, step, pos=None):
        _, gate = self.router.decide(x, prev, step, pos)
        return self.table[pos, step], gate


def decision_us(router, width: int, n: int = 3000) -> float:
    """Microseconds per decision of one token (`decide` on a [1, E] state at its steps, as a decode step asks)."""
    import numpy as np

    x = np.random.default_rng(0).standard_normal((1, width)).astype(np.float32)
    pos = np.array([3])
    router.decide(x, np.array([-1]), np.array([0]), pos)
    args = [(np.array([s - 1]), np.array([s])) for s in range(3)]
    t0 = time.perf_counter()
    for i in range(n):
        router.decide(x, *args[i % 3], pos)
    return (time.perf_counter() - t0) / n * 1e6


def weight_share(blocks, routes, fill: bool) -> float:
    """The share of the blocks' weights a token on `routes` multiplies by, against running every block: a block run
    reads all of its own; with the fill rule, an attention block passed over still projects keys and values (2 of
    the 3 row groups of its stacked q, k, v projection, as in `write_kv`). What decode's time follows once the
    blocks' matrix-vector products dominate (large widths)."""

    def size(block):
        return sum(m.weight.size for m in block.modules() if hasattr(m, "weight"))

    full = sum(size(b) for b in blocks)
    used = 0.0
    for r in routes:
        used += sum(size(blocks[b]) for b in r)
        if fill:
            used += sum(2 * b.qkv.weight.size / 3 for i, b in enumerate(blocks) if i not in r and hasattr(b, "qkv"))
    return used / (full * len(routes))


def amdahl(seq_t: float, fixed: float, share: float) -> float:
    """The speed-up if only `share` of the blocks' time remained: the sequential token's time over that."""
    return seq_t / (fixed + share * (seq_t - fixed))


def decisions(routes, depth_limit: int) -> float:
    """Decisions per token of routes (a decode step asks once per block run, and once more for EXIT unless the
    token reached the depth limit)."""
    return sum(len(r) + (len(r) < depth_limit) for r in routes) / len(routes)


# ------------------------------------------------------------------------------------------ timed calls


def replay(runner, seqs) -> tuple:
    """(Wall, CPU) seconds per token of decoding each sequence [N, T + 1] token by token (its first T tokens, one
    `forward` of one token each over a fresh KV cache: generate's decode step, the held-out token in place of the
    sampled one)."""
    import numpy as np

    t0, n = now(), 0
    for seq in seqs:
        cache = runner.new_cache()
        for t in seq[:-1]:
            runner.forward(np.array([t]), cache, last_only=True)
        n += len(seq) - 1
    return since(t0, n)


def generated(runner, seqs, n_prompt: int) -> tuple:
    """(Wall, CPU) seconds per decode step of `generate` (greedy, the model's default repetition penalty) from each
    sequence's first n_prompt tokens to the position table's end: the time from the first new token (out of the
    prefill) to the last, over the steps between."""
    import radial_min

    wall, cpu, steps = 0.0, 0.0, 0
    for seq in seqs:
        stamps = []
        radial_min.generate(runner, seq[:n_prompt], 10_000, stop_at_eos=False, on_token=lambda t: stamps.append(now()))
        wall, cpu = wall + stamps[-1][0] - stamps[0][0], cpu + stamps[-1][1] - stamps[0][1]
        steps += len(stamps) - 1
    return wall / steps, cpu / steps


def prefilled(runner, seqs) -> tuple:
    """(Wall, CPU) seconds per token of one forward over each whole sequence (its first T tokens), fresh caches."""
    t0, n = now(), 0
    for seq in seqs:
        runner.forward(seq[:-1], runner.new_cache(), last_only=True)
        n += len(seq) - 1
    return since(t0, n)


# ------------------------------------------------------------------------------------------ 1. the shipped network


def ratio_cells(samples: dict, name: str, base: str) -> tuple:
    """base time / name time, round by round (a speed ratio, > 1: name faster) -> (mean, 95% half-width, median)."""
    r = [b / a for a, b in zip(samples[name], samples[base])]
    return (*mean_ci(r), statistics.median(r))


def fmt_ratio(cells) -> str:
    return f"{cells[0]:.3f} ± {cells[1]:.3f} ({cells[2]:.3f})"


def faster(cells) -> bool:
    """The interval of the mean ratio lies above 1."""
    return cells[0] - cells[1] > 1


def run_shipped(args, monitor) -> dict:
    import numpy as np

    import radial_min
    from radial_min import tasks
    from radial_min.io.outputs import read_json
    from radial_min.radial import RadialNetwork
    from radial_min.router import InOrder, Scripted

    section(f"1. The shipped network ({SHIPPED.relative_to(ROOT)}) against its blocks in order, {args.threads} thread")
    net = radial_min.load(SHIPPED)
    task = tasks.HopTask(**read_json(SHIPPED / "task.json"))
    seqs, _ = tasks.sequences(task, EVAL_SEED, 0, args.sequences, stream="eval")
    n = len(net.blocks)
    net.routes = []
    replay(net, seqs)  # the routes of every held-out token, decoded one by one
    routes = list(net.routes)
    per_seq = [routes[i * task.seq_len : (i + 1) * task.seq_len] for i in range(len(seqs))]
    scripted = [
        RadialNetwork(net.model, Scripted(r, n), kv_rule="fill", keep_routes=False) for r in per_seq
    ]  # the same routes, replayed without the router's MLP
    empty = RadialNetwork(net.model, Scripted([[]] * task.seq_len, n), kv_rule="drop", keep_routes=False)
    no_blocks = RadialNetwork(net.model, InOrder(n, max_depth=0), keep_routes=False)
    net.keep_routes = False

    def replay_scripted():
        t0 = now()
        for runner, seq in zip(scripted, seqs):
            cache = runner.new_cache()
            for t in seq[:-1]:
                runner.forward(np.array([t]), cache, last_only=True)
        return since(t0, len(seqs) * task.seq_len)

    fns = {
        "sequential (every block, in order)": lambda: replay(net.model, seqs),
        "routed (shipped router)": lambda: replay(net, seqs),
        "its routes replayed, no router (Scripted)": replay_scripted,
        "routed, every block skipped (route [], drop)": lambda: replay(empty, seqs),
        "sequential path, no block (embedding + head)": lambda: replay(no_blocks, seqs),
    }
    s, c = interleaved_samples(fns, args.rounds)
    seq_name, routed_name = "sequential (every block, in order)", "routed (shipped router)"
    blocks = float(np.mean([len(r) for r in routes]))
    asks = decisions(routes, net.max_depth)
    attention = [b for b in range(n) if hasattr(net.blocks[b], "write_kv")]
    fills = sum(b not in r for r in routes for b in attention) / len(routes)  # every attention block passed over
    us = decision_us(net.router, net.config.hidden_size)
    med = {k: stat(v)["median"] for k, v in c.items()}  # CPU: the machine is shared
    fixed, seq_t = med["sequential path, no block (embedding + head)"], med[seq_name]
    ideal = amdahl(seq_t, fixed, blocks / n)
    ideal_w = amdahl(seq_t, fixed, weight_share(net.blocks, routes, net.kv_rule == "fill"))
    rows = []
    for name in s:
        wall, cpu = stat(s[name])["median"], stat(c[name])["median"]
        rows.append([name, f"{1 / wall:.0f}", fmt_ratio(ratio_cells(s, name, seq_name)), f"{1e6 * cpu:.1f}"])
        rows[-1].append(fmt_ratio(ratio_cells(c, name, seq_name)))
    print_table(["decode, token by token", "tokens/s", "speed / sequential", "CPU us/token", "by CPU time"], rows)
    share = asks * us / 1e6 / med[routed_name]
    print(
        f"{len(seqs)} held-out sequences (eval stream, seed {EVAL_SEED}) x {task.seq_len} tokens per call, "
        f"{args.rounds} rounds; speed ratios: the mean of the per-round ratios ± its 95% t-interval (the median).\n"
        f"Routed: {blocks:.2f} of {n} blocks per token; {asks:.2f} router decisions per token at {us:.1f} us each = "
        f"{asks * us:.1f} us, {100 * share:.0f}% of a routed token's CPU time;\n{fills:.2f} fill writes per token "
        "(keys and values at an attention block passed over).\nIdeal speed-up (only the blocks run cost time, the "
        f"rest costs the sequential path's {1e6 * fixed:.1f} us): {ideal:.2f}x by blocks,\n{ideal_w:.2f}x by the "
        "weights multiplied (fill's projections counted)."
    )
    monitor.check("shipped decode")

    gen = interleaved_samples(
        {
            seq_name: lambda: generated(net.model, seqs, task.query_start),
            routed_name: lambda: generated(net, seqs, task.query_start),
        },
        args.rounds,
    )
    pre = interleaved_samples(
        {seq_name: lambda: prefilled(net.model, seqs), routed_name: lambda: prefilled(net, seqs)}, args.rounds
    )
    rows = []
    for what, (w, cp) in (("generate(), decode steps", gen), ("prefill, a whole sequence at once", pre)):
        rows.append(
            [what, f"{1 / stat(w[seq_name])['median']:.0f}", f"{1 / stat(w[routed_name])['median']:.0f}",
             fmt_ratio(ratio_cells(w, routed_name, seq_name)), fmt_ratio(ratio_cells(cp, routed_name, seq_name))]
        )  # fmt: skip
    print_table(["", "sequential tokens/s", "routed tokens/s", "routed / sequential", "by CPU time"], rows)
    print(
        f"generate: greedy from each sequence's first {task.query_start} tokens (<s>, the table, |) to the position "
        f"table's end ({task.seq_len + 1 - task.query_start} new tokens; repetition penalty "
        f"{net.model.generation_defaults.get('repetition_penalty', 1.0)}, the model's default).\n"
        f"prefill: {task.seq_len} tokens in one forward (routed: the block schedule, one round per block)."
    )
    monitor.check("shipped generate, prefill")
    return {
        "decode_s_per_token": {k: stat(v) for k, v in s.items()},
        "decode_cpu_s_per_token": {k: stat(v) for k, v in c.items()},
        "decode_ratio": ratio_cells(s, routed_name, seq_name),
        "decode_ratio_cpu": ratio_cells(c, routed_name, seq_name),
        "blocks_per_token": blocks,
        "decisions_per_token": asks,
        "decision_us": us,
        "router_share": share,
        "ideal_ratio": ideal,
        "ideal_ratio_weights": ideal_w,
        "generate_ratio": ratio_cells(gen[0], routed_name, seq_name),
        "generate_ratio_cpu": ratio_cells(gen[1], routed_name, seq_name),
        "generate_s_per_token": {k: stat(v) for k, v in gen[0].items()},
        "prefill_ratio": ratio_cells(pre[0], routed_name, seq_name),
        "prefill_ratio_cpu": ratio_cells(pre[1], routed_name, seq_name),
        "prefill_s_per_token": {k: stat(v) for k, v in pre[0].items()},
        "fill_writes_per_token": fills,
    }


# ------------------------------------------------------------------------------------------ 2. the width sweep


def random_network(width: int, seed: int = 0):
    """A random OPT of the shipped network's layout at `width` (tools/make_random_opt.py's init: opt.init_tensors)."""
    from radial_min.config import OPTConfig
    from radial_min.io.outputs import read_json
    from radial_min.models.opt import OPT, init_tensors

    shipped = read_json(SHIPPED / "config.json")
    cfg = OPTConfig(
        vocab_size=shipped["vocab_size"],
        hidden_size=width,
        num_hidden_layers=shipped["num_hidden_layers"],
        num_attention_heads=shipped["num_attention_heads"],
        ffn_dim=4 * width,
        max_position_embeddings=shipped["max_position_embeddings"],
    )
    return OPT(cfg, init_tensors(cfg, seed))


def shipped_kind_router(width: int, n_blocks: int, seed: int = 0):
    """A router of the shipped kind (its hidden units, forward-only, the fill rule) at `width`, random weights."""
    from radial_min.io.outputs import read_json
    from radial_min.router import Router, RouterConfig, init_router

    hidden = read_json(SHIPPED / "router.json")["hidden"]
    cfg = RouterConfig(width=width, n_blocks=n_blocks, hidden=hidden, kv_rule="fill")
    return Router(cfg, init_router(cfg, seed))


def run_width(width: int, seqs, args) -> dict:
    from radial_min.radial import RadialNetwork
    from radial_min.router import InOrder

    model = random_network(width)
    n, P = len(model.blocks), seqs.shape[1]
    router = shipped_kind_router(width, n)

    def routed(share, rule="fill"):
        return RadialNetwork(
            model, Forced(router, skip_routes(n, P, share)), gate=True, kv_rule=rule, keep_routes=False
        )

    per_call = max(1, min(len(seqs), math.ceil(args.call_s / (replay(model, seqs[:1])[0] * (P - 1)))))
    calls = seqs[:per_call]
    runners = {"sequential": model, "routed, 0% skipped": routed(0.0)}
    for share in SHARES:
        runners[f"routed, {share:.0%} skipped"] = routed(share)
    runners["routed, 50% skipped, drop"] = routed(0.5, "drop")
    runners["routed, 100% skipped, drop"] = routed(1.0, "drop")
    runners["no block (embedding + head)"] = RadialNetwork(model, InOrder(n, max_depth=0), keep_routes=False)
    timed = interleaved_samples({k: (lambda r=r: replay(r, calls)) for k, r in runners.items()}, args.rounds)
    out = {"width": width, "sequences_per_call": per_call, "decision_us": decision_us(router, width)}
    out["decisions"] = {f"{sh:.0%}": decisions(skip_routes(n, P, sh), n) for sh in (0.0, *SHARES)}
    for clock, s in zip(("wall", "cpu"), timed):
        fixed, seq_t = stat(s["no block (embedding + head)"])["median"], stat(s["sequential"])["median"]
        out[clock] = {
            "s_per_token": {k: stat(v) for k, v in s.items()},
            "ratio": {k: ratio_cells(s, k, "sequential") for k in s},
            "ideal": {f"{sh:.0%}": amdahl(seq_t, fixed, 1 - sh) for sh in (0.0, *SHARES)},
            "ideal_weights": {
                f"{sh:.0%}": amdahl(seq_t, fixed, weight_share(model.blocks, skip_routes(n, P, sh), True))
                for sh in (0.0, *SHARES)
            },
        }
    return out


def sweep_table(results: list, clock: str):
    """The sweep's table by one clock, and the smallest width where routing is faster."""
    rows = []
    for r in results:
        c = r[clock]
        t = {k: v["median"] for k, v in c["s_per_token"].items()}
        row = [str(r["width"]), f"{1 / t['sequential']:.0f}", f"{1e6 * t['sequential']:.0f}"]
        for share in (0.0, *SHARES):
            key = f"{share:.0%}"
            if share:
                row.append(f"{1 / t[f'routed, {key} skipped']:.0f}")
            row.append(fmt_ratio(c["ratio"][f"routed, {key} skipped"]))
            if share:
                row.append(f"{c['ideal'][key]:.2f}, {c['ideal_weights'][key]:.2f}")
        share = r["decisions"]["50%"] * r["decision_us"] / 1e6 / t["routed, 50% skipped"]
        row += [fmt_ratio(c["ratio"]["routed, 50% skipped, drop"]), f"{r['decision_us']:.1f}", f"{100 * share:.0f}%"]
        row += [f"{1e6 * t['routed, 100% skipped, drop']:.0f}", f"{1e6 * t['no block (embedding + head)']:.0f}"]
        rows.append(row)
    headers = ["width", "seq. tok/s", "seq. us", "0% skipped"]
    headers += ["25%: tok/s", "ratio", "ideal", "50%: tok/s", "ratio", "ideal"]
    headers += ["50%, drop", "router us", "router share", "none run us", "no block us"]
    print_table(headers, rows)
    for share in SHARES:
        name = f"routed, {share:.0%} skipped"
        above = [r["width"] for r in results if faster(r[clock]["ratio"][name])]
        print(
            f"{share:.0%} skipped (fill), by {clock} time: routed faster than sequential (interval above 1) at "
            f"widths {', '.join(map(str, above)) or 'none'}; smallest {min(above) if above else 'none'}."
        )


def run_sweep(args, monitor) -> list:
    from radial_min import tasks
    from radial_min.io.outputs import read_json

    section(f"2. Width sweep: the shipped layout at widths {', '.join(map(str, args.widths))}, random weights")
    task = tasks.HopTask(**read_json(SHIPPED / "task.json"))
    seqs, _ = tasks.sequences(task, EVAL_SEED, 0, args.sequences, stream="eval")
    results = []
    for w in args.widths:
        results.append(run_width(w, seqs, args))
        print(f"  width {w}: done ({results[-1]['sequences_per_call']} sequences per call)", flush=True)
    for clock in ("wall", "cpu"):
        print(f"\nBy {'wall-clock' if clock == 'wall' else 'CPU'} time (tokens/s, us: {clock}):")
        sweep_table(results, clock)
    print(SWEEP_NOTE)
    monitor.check("width sweep")
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1, help="threads for NumPy, OpenBLAS, Numba (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=15, help="interleaved rounds per comparison (default: %(default)s)")
    p.add_argument("--sequences", type=int, default=4, help="held-out sequences per call (default: %(default)s)")
    p.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    p.add_argument("--call-s", type=float, default=0.25, help="sweep: seconds a sequential call should last about")
    p.add_argument("--skip-shipped", action="store_true", help="only the width sweep")
    p.add_argument("--skip-sweep", action="store_true", help="only the shipped network")
    p.add_argument("--json", help="write every number here")
    args = p.parse_args(argv)
    set_threads(args.threads)
    if args.threads == 1:  # no worker threads to let fall asleep between calls (common.SETTLE_S): more rounds instead
        common.SETTLE_S = 0.02
    monitor = LoadMonitor()
    section("Machine")
    print_table(["", ""], machine(args.threads, None))
    flags = next((ln.split(":", 1)[1].split() for ln in open("/proc/cpuinfo") if ln.startswith("flags")), [])
    print("SIMD flags:", " ".join(f for f in flags if f.startswith(("avx", "fma", "sse4", "amx"))))
    out = {"threads": args.threads, "rounds": args.rounds}
    if not args.skip_shipped:
        out["shipped"] = run_shipped(args, monitor)
    if not args.skip_sweep:
        out["sweep"] = run_sweep(args, monitor)
    out["load"] = monitor.sections
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
