#!/usr/bin/env python
"""radial_min's speed in one run: against transformers (speed.py), against the machine's own limits (limits.py),
and routing in wall-clock time (routing.py), then the speed targets the project set itself, MET or MISSED.

    python bench/bench.py                    # ~10 minutes on 2 cores; makes weights/random-opt-125m if missing
    python bench/bench.py --quick            # smoke run on a tiny random model
    python bench/bench.py --json bench.json --markdown results.md   # every number; docs/performance.md's tables

Times are medians of --reps repetitions with [min, max], contenders interleaved; every timed piece runs once
untimed first. Each section prints the CPU share other processes took and the load average: on a busy machine
the ratios (measured interleaved) mean more than the absolute numbers. Without torch + transformers it prints
radial_min's figures only. Sections: 1 machine, 2 vs transformers (2a OPT-125M shapes, 2b SmolLM2-135M), 3 limits,
4 memory and start-up, 5 int8 quality, 6 decode with blocks skipped, 7 routed prefill, 8 the shipped model routed,
9 targets.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import common

MODEL = common.ROOT / "weights" / "random-opt-125m"
QUICK_MODEL = common.ROOT / "weights" / "random-opt-small"
QUICK_SHAPE = ["--layers", "4", "--hidden", "128", "--heads", "4"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model, short runs, 2 repetitions (a smoke test)")
    p.add_argument("--reps", type=int, default=None, help="repetitions per measurement (default 5, quick 2)")
    p.add_argument("--threads", type=int, default=None, help="cores to use (default: all this process may use)")
    p.add_argument(
        "--weights-dtype",
        default="float32,int8",
        help="radial_min's weights in sections 2a-4, the "
        "first also in 6-7 (default: %(default)s; float32 must be among them)",
    )
    p.add_argument("--matmul", choices=["auto", "numba", "blas"], default=None, help="radial_min's many-row matmul")
    p.add_argument("--no-transformers", action="store_true", help="radial_min's figures only")
    p.add_argument("--json", default=None, metavar="PATH", help="also write every number to this JSON file")
    p.add_argument(
        "--markdown",
        default=None,
        metavar="PATH",
        help="also write the results as the Markdown tables of docs/performance.md (bench/report.py)",
    )
    args = p.parse_args(argv)
    args.dtypes = args.weights_dtype.split(",")
    if "float32" not in args.dtypes or not set(args.dtypes) <= {"float32", "float16", "bfloat16", "int8"}:
        p.error(f"--weights-dtype {args.weights_dtype}: a comma list of float32, float16, bfloat16, int8 with float32")
    if (args.reps is not None and args.reps < 1) or (args.threads is not None and args.threads < 1):
        p.error("--reps and --threads must be >= 1")
    return args


def sizes(quick: bool, reps) -> dict:
    if quick:
        return dict(quick=True, reps=reps or 2, prompt=32, new=16, prefill=128, rss_new=4)
    return dict(quick=False, reps=reps or 5, prompt=32, new=128, prefill=512, rss_new=8)


def targets(res) -> list:
    """The speed targets: (target, measured, MET / MISSED / n/a)."""
    rows = []

    def add(name, value, ok):
        rows.append([name, value, "n/a" if ok is None else ("MET" if ok else "MISSED")])

    opt, lim = res["speed_opt"], res["limits"]
    hf = "transformers" in opt["decode"]
    if "int8" in opt["decode"]:
        x = common.ratio(opt["decode"]["int8"], opt["decode"]["transformers"]) if hf else None
        roof = lim["decode"]["int8"]["roofline_tok_s"]
        got = f"{opt['decode']['int8']['median']:.0f} tokens/s, int8 roofline {roof:.0f}"
        add(
            "int8 decode >= 5x transformers float32 (OPT-125M)",
            got if x is None else f"{x:.2f}x ({got})",
            None if x is None else x >= 5,
        )
        w = res["memory"]["int8"]["weights_ratio"]
        add("int8 weights memory <= 0.3x float32", f"{w:.2f}x", w <= 0.3)
    if res.get("int8_quality"):
        q = res["int8_quality"]
        got = f"{100 * (q['ratio'] - 1):+.2f}%, greedy text {q['same_tokens']}/60 the same"
        add("int8 WikiText-2 perplexity within 1% of float32 (shipped model)", got, abs(q["ratio"] - 1) <= 0.01)
    x = common.ratio(opt["prefill"]["float32"], opt["prefill"]["transformers"]) if hf else None
    add(
        f"prefill {res['sizes']['prefill']} tokens >= 1.2x transformers",
        "n/a" if x is None else f"{x:.2f}x",
        None if x is None else x >= 1.2,
    )
    rp = res["routed_prefill"]
    same = rp["same_routes"] and rp["max_rel_diff"] < 1e-4
    got = f"{rp['equal_compute_ratio']:.2f}x at equal compute; routes {'same' if rp['same_routes'] else 'DIFFER'}, "
    add(
        "routed prefill >= 0.8x sequential, same routes and logits",
        got + f"logits {rp['max_rel_diff']:.0e}",
        rp["equal_compute_ratio"] >= 0.8 and same,
    )
    sk = res["skips"]
    add(
        "trained Router at ~50% skipped: total >= 1.5x faster than sequential",
        f"{sk['trained_speedup']:.2f}x at {sk['skipped']['trained Router']:.0%} skipped",
        sk["trained_speedup"] >= 1.5,
    )
    add(
        "router cost per decision <= 5% of a token's time (OPT-125M)",
        f"{100 * sk['decision_share']:.1f}% ({sk['decision_us']:.1f} us per decision)",
        sk["decision_share"] <= 0.05,
    )
    sh = res["shipped"]
    add("shipped model routed >= 1.25x sequential tokens/s, API", f"{sh['api_ratio']:.2f}x", sh["api_ratio"] >= 1.25)
    add(
        "shipped model routed >= 1.25x sequential tokens/s, CLI --stats",
        f"{sh['cli_ratio']:.2f}x in all, {sh['cli_decode_ratio']:.2f}x decode",
        sh["cli_ratio"] >= 1.25,
    )
    cost = sh["display"]["cost"]
    add("CLI depth display + routing summary <= 5%", f"{100 * cost:.2f}% of a token's time", cost <= 0.05)
    return rows


def main(args, threads):
    import radial_min
    import routing
    import speed
    from limits import run_int8_quality, run_limits, run_memory
    from radial_min import kernels

    sz = sizes(args.quick, args.reps)
    path = QUICK_MODEL if args.quick else MODEL
    if not (path / "model.safetensors").is_file():
        print(f"making {path.relative_to(common.ROOT)} with tools/make_random_opt.py (random weights) ...", flush=True)
        tool = [sys.executable, str(common.ROOT / "tools" / "make_random_opt.py"), "--out", str(path)]
        subprocess.run(tool + (QUICK_SHAPE if args.quick else []), check=True)
    if args.matmul:
        kernels.set_backend(args.matmul)
    torch_mod, transformers_mod = common.import_transformers(not args.no_transformers)
    common.section("1. Machine and versions")
    common.print_table(["what", "value"], common.machine(threads, torch_mod))
    load, res = common.LoadMonitor(), {"args": vars(args), "sizes": sz}

    res["speed_opt"] = speed.run_opt(path, args.dtypes, torch_mod, transformers_mod, sz)
    load.check("2a")
    res["speed_smollm2"] = speed.run_smollm2(torch_mod, transformers_mod, sz)
    load.check("2b")
    models = {d: radial_min.load(path, weights_dtype=d) for d in args.dtypes}
    res["limits"] = run_limits(res["speed_opt"], models, sz)
    load.check("3")
    res["memory"] = run_memory(path, models, sz)
    load.check("4")
    res["int8_quality"] = run_int8_quality(sz)
    load.check("5")
    main_model = models[args.dtypes[0]]
    res["skips"] = routing.run_skips(main_model, path, sz)
    load.check("6")
    res["routed_prefill"] = routing.run_routed_prefill(main_model, path, sz)
    load.check("7")
    res["shipped"] = routing.run_shipped(sz)
    load.check("8")
    common.section("9. Targets")
    res["targets"] = targets(res)
    common.print_table(["target", "measured", "status"], res["targets"])
    res["load"] = load.sections
    print(
        "load average and other processes' CPU share per section: "
        + ", ".join(f"{k} {v['load_average']:.1f}/{100 * v['other_share']:.0f}%" for k, v in load.sections.items())
    )
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=str))
        print(f"wrote {args.json}")
    if args.markdown:
        import report

        Path(args.markdown).write_text(report.markdown(json.loads(json.dumps(res, default=str))))
        print(f"wrote {args.markdown}")


if __name__ == "__main__":
    ARGS = parse_args()
    main(ARGS, common.set_threads(ARGS.threads))
