"""Perplexity against compute for a real model: routers, the oracle and the static layer-removal baselines, all at
the same blocks per token, with sequence-level bootstrap intervals; a JSON of every number and the Pareto plot.

    python bench/real_pareto.py --model $G --routers runs/real/routers --out runs/real/pareto

Methods (skipping k of the N blocks; budgets 5, 10, 20 and 30% of N):
- static, for every token, the k blocks chosen on calibration text (WikiText-2 valid): lowest mean residual
  ratio; ShortGPT's block influence (1 - cos(block input, block output), Men et al. 2024); the contiguous run of k
  blocks of least angular distance between its input and output (Gromov et al. 2024); SLEB's greedy removal of the
  block whose removal costs the calibration perplexity least (Song et al. 2024); early exit (the last k);
  attention drop, the k attention blocks of least block influence (He et al. 2024, "What Matters in Transformers?
  Not All Attention is Needed"; the static counterpart of attention-only routing), also at the two counts around
  15% of the attention blocks (4 and 5 of SmolLM2's 30);
- dynamic, per token: random routes (each token skips k blocks at random, sink kept, fill); the oracle (the
  residual-ratio threshold, fill rule, sink kept; over all blocks, and with --oracle-attention over attention blocks
  only); every router
  folder under --routers (routed execution: RadialNetwork, fill rule, the router's own sink and restriction);
- for every router made by `real_routers.py search` (made.json: its per-sequence search trajectories), their
  consensus as a static route: the k blocks the searches chose most often (route_search.consensus), skipped by
  every token but the sink (`consensus:`; scored as a dynamic method against the best static one, which it is not:
  it tells the router's labels apart from the router).
A dynamic method's points (its settings' mean blocks per token) are joined by the mean NLL interpolated linearly
between the two that bracket a budget (oracle.at_depth: the score of mixing the two settings over sequences), the
sequential model being the point at N blocks. Intervals: 2,000 bootstrap resamples of the evaluation sequences,
the same resamples for every method, so the paired differences (dynamic minus the best static) have intervals too.

Evaluation: the first --test-sequences sequences of WikiText-2 test and --kjv-sequences of the King James Bible's
held-out chapters (every 20th, data.split_kjv), --seq-len tokens each, every sequence a fresh context. Each
setting's per-sequence NLL and depth are kept in <out>/settings.json, so a rerun evaluates only what is new.
"""

import argparse
import fnmatch
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import radial_min  # noqa: E402
from radial_min import data  # noqa: E402
from radial_min.analysis import oracle, route_search  # noqa: E402
from radial_min.analysis.plots import _finish, _pyplot  # noqa: E402
from radial_min.radial import RadialNetwork  # noqa: E402
from radial_min.router import Router, Scripted, mandatory_blocks  # noqa: E402
from radial_min.train import sequence_nll  # noqa: E402

BUDGETS = (0.05, 0.10, 0.20, 0.30)
STATIC = ("lowest-ratio", "block-influence", "angular-contiguous", "sleb-greedy", "early-exit", "attention-drop")
ATTENTION_SHARE = 0.15  # attention-drop is also measured at the two counts around this share of attention blocks


# ------------------------------------------------------------------------------------------------ the data


def eval_sets(tok, seq_len, n_wiki, n_kjv) -> dict:
    wiki = data.pack(tok.encode(data.read_text(data.default_text("test"))), seq_len, n_wiki)
    held = data.split_kjv(data.kjv_chapters())[1]
    kjv = data.pack(tok.encode("".join(held)), seq_len, n_kjv)
    return {"wikitext2-test": wiki, "kjv-held-out": kjv}


# --------------------------------------------------------------------------------- calibration statistics


class States:
    """An observer keeping, per sequence, the stream entering each block and the final one: [N + 1, T, E]."""

    def __init__(self):
        self.x = []

    def begin(self, x):
        self.x = [x.astype(np.float64)]

    def __call__(self, i, block, x, f, y):
        self.x.append(y.astype(np.float64))


def calibration_stats(model, seqs) -> dict:
    """Per block: mean residual ratio and ShortGPT's block influence; per pair of stream positions (l, m): the mean
    angular distance arccos(cos(h_l, h_m)) / pi over tokens (Gromov et al.)."""
    n = len(model.blocks)
    ratio, bi, ang, count = np.zeros(n), np.zeros(n), np.zeros((n + 1, n + 1)), 0
    for ids in seqs:
        obs = States()
        model.forward(ids, observe=obs)
        h = np.stack(obs.x)  # [N + 1, T, E]
        u = h / np.linalg.norm(h, axis=-1, keepdims=True)
        for b in range(n):
            f = h[b + 1] - h[b]
            ratio[b] += (np.linalg.norm(f, axis=-1) / np.linalg.norm(h[b + 1], axis=-1)).sum()
            bi[b] += (1 - (u[b] * u[b + 1]).sum(-1)).sum()
        ang += np.arccos(np.clip(np.einsum("lte,mte->lmt", u, u), -1, 1)).sum(-1) / np.pi
        count += len(ids)
    return {"ratio": ratio / count, "block_influence": bi / count, "angular": ang / count}


def attention_drop(block_influence, kinds, k) -> list:
    """The k attention blocks whose output is most like their input (least block influence), in block order."""
    att = [i for i, kind in enumerate(kinds) if kind == "att"]
    return sorted(sorted(att, key=lambda i: block_influence[i])[:k])


def contiguous_least_angle(angular, n, k) -> list:
    start = min(range(n - k + 1), key=lambda s: angular[s, s + k])
    return list(range(start, start + k))


def static_route(n, dropped):
    return [b for b in range(n) if b not in set(dropped)]


def static_nll(model, seqs, dropped, batch=8):
    """Per-sequence NLL [n_seq, T - 1] with `dropped` blocks skipped by every token (routed execution)."""
    n, T = len(model.blocks), seqs.shape[1]
    net = RadialNetwork(model, Scripted([static_route(n, dropped)] * T, n), keep_routes=False)
    return sequence_nll(net, seqs, batch)[0]


def sleb_order(model, seqs, most, log=print) -> list:
    """SLEB's greedy removal: repeatedly drop the block whose removal gives the lowest calibration NLL."""
    n, dropped = len(model.blocks), []
    for _ in range(most):
        scores = {b: float(static_nll(model, seqs, dropped + [b]).mean()) for b in range(n) if b not in dropped}
        best = min(scores, key=scores.get)
        dropped.append(best)
        log(f"  SLEB step {len(dropped)}: drop {model.blocks[best].name} (calibration NLL {scores[best]:.4f})")
    return dropped


# ---------------------------------------------------------------------------------------- the settings


def run_static(model, seqs, dropped):
    return static_nll(model, seqs, dropped), np.full(len(seqs), len(model.blocks) - len(dropped), float)


def run_oracle(model, seqs, tau, sink, mandatory):
    run = oracle.simulate(model, seqs, oracle.threshold(tau, None, sink, mandatory), "fill")
    return run.nll, run.keep.sum(-1).mean(-1).astype(float)


def run_random(model, seqs, k, sink, seed):
    """Each position skips k blocks drawn at random (every sequence alike), the first `sink` positions none."""
    n, T = len(model.blocks), seqs.shape[1]
    rng = np.random.default_rng(seed)
    routes = [list(range(n)) if t < sink else sorted(rng.choice(n, n - k, replace=False).tolist()) for t in range(T)]
    net = RadialNetwork(model, Scripted(routes, n), kv_rule="fill", keep_routes=False)
    nll, depth, _ = sequence_nll(net, seqs, 8)
    return nll, depth.mean(-1).astype(float)


def run_consensus(model, seqs, skipped, sink):
    """The same blocks skipped by every position from `sink` on (routed execution, fill rule)."""
    n, T = len(model.blocks), seqs.shape[1]
    routes = [list(range(n)) if t < sink else [b for b in range(n) if b not in skipped] for t in range(T)]
    net = RadialNetwork(model, Scripted(routes, n), kv_rule="fill", keep_routes=False)
    nll, depth, _ = sequence_nll(net, seqs, 8)
    return nll, depth.mean(-1).astype(float)


def run_router(model, seqs, folder):
    router = Router.load(Path(folder) / "router")
    net = RadialNetwork(model, router, kv_rule="fill", keep_routes=False)
    nll, depth, routes = sequence_nll(net, seqs, 8)
    att = [i for i, b in enumerate(model.blocks) if b.kind == "att"]
    ran_att = np.isin(routes, att).sum(-1)  # [n_seq, T]
    return nll, depth.mean(-1).astype(float), ran_att.mean(-1).astype(float)


# ------------------------------------------------------------------------------------------ statistics


def at_budget(points, depth):
    """Mean NLL at `depth` from (depth, mean NLL) points, interpolated (None outside)."""
    ppl = oracle.at_depth(points, depth)
    return None if ppl is None else float(np.log(ppl))


def family_curve(settings, names, idx, full_nll, n_blocks):
    """(depth, mean NLL) of each setting of a family on the resampled sequences idx, with the sequential model."""
    pts = [(float(settings[s]["depth"][idx].mean()), float(settings[s]["nll"][idx].mean())) for s in names]
    return pts + [(float(n_blocks), float(full_nll[idx].mean()))]


def _rounded(nll):
    """A mean NLL for choosing the best static method: ties (the same blocks chosen by two methods, interpolated
    through different points) go to the method listed first in STATIC."""
    return np.inf if np.isnan(nll) else round(float(nll), 6)


def summarize(settings, families, n_blocks, n_seq, boots=2000, seed=0) -> dict:
    """Every family's perplexity at every budget with a 95% bootstrap interval, and the paired differences of each
    dynamic family against the best static one at that budget."""
    rng = np.random.default_rng(seed)
    samples = [np.arange(n_seq)] + [rng.integers(0, n_seq, n_seq) for _ in range(boots)]
    full = settings["sequential"]["nll"]
    out = {}
    for fam, names in families.items():
        rows = []
        for frac in BUDGETS:
            depth = n_blocks * (1 - frac)
            vals = [at_budget(family_curve(settings, names, idx, full, n_blocks), depth) for idx in samples]
            rows.append(vals)
        out[fam] = np.array([[np.nan if v is None else v for v in r] for r in rows])  # [budgets, 1 + boots]
    static = [f for f in families if f.split(":")[0] == "static"]
    result = {}
    for fam, a in out.items():
        result[fam] = {}
        for j, frac in enumerate(BUDGETS):
            est, boot = a[j, 0], a[j, 1:]
            entry = {"ppl": None if np.isnan(est) else float(np.exp(est))}
            if not np.isnan(est):
                lo, hi = np.nanpercentile(boot, [2.5, 97.5])
                entry["ci95"] = [float(np.exp(lo)), float(np.exp(hi))]
            if fam not in static and not np.isnan(est):
                best = min(static, key=lambda s: (_rounded(out[s][j, 0]), STATIC.index(s.split(":")[1])))
                diff = a[j] - out[best][j]
                lo, hi = np.nanpercentile(diff[1:], [2.5, 97.5])
                entry["vs_best_static"] = {
                    "static": best,
                    "ppl_ratio": float(np.exp(diff[0])),
                    "ci95": [float(np.exp(lo)), float(np.exp(hi))],
                }
            result[fam][f"{frac:.0%}"] = entry
    return result


# ----------------------------------------------------------------------------------------------- plot


def plot(settings, families, n_blocks, full_ppl, path, title):
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for fam, names in families.items():
        pts = sorted((settings[s]["depth"].mean(), np.exp(settings[s]["nll"].mean())) for s in names)
        if not fam.startswith("static"):
            pts = pts + [(n_blocks, full_ppl)]
        d, p = zip(*pts)
        style = "--" if fam.startswith("static") else "-"
        ax.plot(d, p, style, marker="o", markersize=3, label=fam)
    for frac in BUDGETS:
        ax.axvline(n_blocks * (1 - frac), color="grey", linewidth=0.5)
    ax.axhline(full_ppl, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xlim(n_blocks * 0.65, n_blocks + 0.5)
    ax.set_ylim(full_ppl * 0.95, full_ppl * 6)
    return _finish(fig, ax, plt, path, "blocks per token", "perplexity (log scale)", title)


# ------------------------------------------------------------------------------------------------ main


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model folder or .gguf file (Llama family or OPT)")
    p.add_argument("--routers", default=None, help="folder of router folders (tools/real_routers.py --out)")
    p.add_argument("--out", default="runs/real/pareto", help="output folder (default: %(default)s)")
    p.add_argument("--figure", default=None, help="also write the WikiText-2 plot here")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--test-sequences", type=int, default=32)
    p.add_argument("--kjv-sequences", type=int, default=16)
    p.add_argument("--calibration-sequences", type=int, default=8, help="for the static choices (default: 8)")
    p.add_argument("--sleb-sequences", type=int, default=3, help="SLEB's calibration, --sleb-len tokens each")
    p.add_argument("--sleb-len", type=int, default=128)
    p.add_argument("--taus", default="0.04,0.07,0.1,0.13,0.16", help="the oracle's thresholds")
    p.add_argument("--sink", type=int, default=None, help="positions that run every block (default: 1 for Llama)")
    p.add_argument("--oracle-attention", action="store_true", help="also the oracle restricted to attention blocks")
    p.add_argument("--only", default=None, help="evaluate only the settings whose names match one of these "
                   "comma-separated patterns (fnmatch: 'static:*:k6,router:tune-*'; sequential always)")  # fmt: skip
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = radial_min.load(args.model, weights_dtype="float32")
    tok = radial_min.Tokenizer(args.model)
    n = len(model.blocks)
    sink = args.sink if args.sink is not None else int(model.config.model_type in ("llama", "qwen2"))
    ks = [round(f * n) for f in BUDGETS]
    print(f"{Path(args.model).name}: {n} blocks; budgets {ks} blocks skipped; sink {sink}")
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} cores", flush=True)

    stats_path = out / "static_choices.json"
    stored = stats_path.is_file()
    if stored:
        choices = json.loads(stats_path.read_text())
    else:
        t0 = time.process_time()
        valid = data.pack(tok.encode(data.read_text(data.default_text("valid"))), args.seq_len, None)
        cal = valid[: args.calibration_sequences]
        st = calibration_stats(model, cal)
        sleb_seqs = data.pack(valid[-args.sleb_sequences :].ravel(), args.sleb_len, args.sleb_sequences)  # its end
        order = sleb_order(model, sleb_seqs, max(ks))
        choices = {
            "lowest-ratio": {k: oracle.lowest_ratio_blocks(st["ratio"], k) for k in ks},
            "block-influence": {k: sorted(np.argsort(st["block_influence"], kind="stable")[:k].tolist()) for k in ks},
            "angular-contiguous": {k: contiguous_least_angle(st["angular"], n, k) for k in ks},
            "sleb-greedy": {k: sorted(order[:k]) for k in ks},
            "early-exit": {k: list(range(n - k, n)) for k in ks},
            "stats": {
                "ratio": st["ratio"].tolist(),
                "block_influence": st["block_influence"].tolist(),
                "sleb_order": order,
                "calibration": f"{len(cal)} x {args.seq_len} tokens of WikiText-2 valid (first); SLEB: "
                f"{len(sleb_seqs)} x {args.sleb_len} (its last)",
                "cpu_seconds": time.process_time() - t0,
            },
        }
        choices = json.loads(json.dumps(choices))  # int keys as JSON gives them back
    if "attention-drop" not in choices:  # from the calibration statistics (a file of the first runs lacks it)
        n_att = sum(b.kind == "att" for b in model.blocks)
        att_ks = sorted(set(ks) | {math.floor(ATTENTION_SHARE * n_att), math.ceil(ATTENTION_SHARE * n_att)})
        bi, kinds = choices["stats"]["block_influence"], [b.kind for b in model.blocks]
        choices["attention-drop"] = {str(k): attention_drop(bi, kinds, k) for k in att_ks if k <= n_att}
        stored = False
    if not stored:
        stats_path.write_text(json.dumps(choices, indent=1) + "\n")
    names = [b.name for b in model.blocks]
    for method in STATIC:
        print(
            f"{method:>20}: " + "; ".join(f"k={k}: {','.join(names[b] for b in v)}" for k, v in choices[method].items())
        )

    routers = sorted(d for d in Path(args.routers).iterdir() if (d / "router.json").is_file()) if args.routers else []
    taus = [float(t) for t in args.taus.split(",")]
    att_only = mandatory_blocks(model.blocks, "attention")
    jobs = {"sequential": lambda s: run_static(model, s, [])}
    for method in STATIC:
        for k, dropped in choices[method].items():
            jobs[f"static:{method}:k{k}"] = lambda s, d=dropped: run_static(model, s, d)
    for k in ks:
        jobs[f"random:k{k}"] = lambda s, k=k: run_random(model, s, k, sink, 0)
    for tau in taus:
        jobs[f"oracle-fill-sink:tau{tau:g}"] = lambda s, t=tau: run_oracle(model, s, t, sink, None)
        if args.oracle_attention:
            jobs[f"oracle-fill-sink-attention:tau{tau:g}"] = lambda s, t=tau: run_oracle(model, s, t, sink, att_only)
    for d in routers:
        jobs[f"router:{d.name}"] = lambda s, d=d: run_router(model, s, d)
        made = json.loads((d / "made.json").read_text()) if (d / "made.json").is_file() else {}
        if made.get("method") == "search":
            k = made["budget_blocks"]
            skipped = route_search.consensus([t["blocks"] for t in made["trajectories"]], k)
            print(f"consensus of {d.name}: {', '.join(names[b] for b in skipped)}")
            jobs[f"consensus:{d.name}"] = lambda s, skipped=skipped: run_consensus(model, s, skipped, sink)
    if args.only:  # a larger evaluation of the settings that decide a comparison, at a fraction of the cost
        patterns = args.only.split(",")
        jobs = {k: j for k, j in jobs.items() if k == "sequential" or any(fnmatch.fnmatch(k, p) for p in patterns)}

    cache_path = out / "settings.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    sets = eval_sets(tok, args.seq_len, args.test_sequences, args.kjv_sequences)
    for set_name, seqs in sets.items():
        key = f"{set_name}/{len(seqs)}x{seqs.shape[1]}"
        done = cache.setdefault(key, {})
        for name, job in jobs.items():
            if name in done:
                continue
            t0 = time.process_time()
            res = job(seqs)
            done[name] = {"nll": res[0].sum(-1).tolist(), "depth": res[1].tolist(), "cpu_s": time.process_time() - t0}
            if len(res) > 2:
                done[name]["attention_run"] = res[2].tolist()
            mean_nll = float(np.sum(done[name]["nll"]) / res[0].size)
            print(
                f"{key} {name:<48} ppl {np.exp(mean_nll):9.3f}  blocks {np.mean(res[1]):6.2f}  "
                f"({done[name]['cpu_s']:.0f} CPU s)",
                flush=True,
            )
            cache_path.write_text(json.dumps(cache) + "\n")

    report = {
        "model": Path(args.model).name,
        "blocks": n,
        "budgets_blocks_skipped": ks,
        "sink": sink,
        "static_choices": choices,
        "load_average_end": os.getloadavg(),
        "sets": {},
    }
    for set_name, seqs in sets.items():
        key = f"{set_name}/{len(seqs)}x{seqs.shape[1]}"
        T1 = seqs.shape[1] - 1
        settings = {
            name: {
                "nll": np.array(v["nll"]) / T1,
                "depth": np.array(v["depth"]),
                **({"att": np.array(v["attention_run"])} if "attention_run" in v else {}),
            }
            for name, v in cache[key].items()
            if name in jobs
        }
        families = {}
        for name in settings:
            if name != "sequential":
                fam = name.rsplit(":", 1)[0] if not name.startswith(("router:", "consensus:")) else router_family(name)
                families.setdefault(fam, []).append(name)
        full_ppl = float(np.exp(settings["sequential"]["nll"].mean()))
        summary = summarize(settings, families, n, len(seqs))
        points = {
            name: {"blocks": float(s["depth"].mean()), "ppl": float(np.exp(s["nll"].mean()))}
            | ({"attention_blocks_run": float(s["att"].mean())} if "att" in s else {})
            for name, s in settings.items()
        }
        report["sets"][key] = {"sequential_ppl": full_ppl, "points": points, "at_budget": summary}
        print(f"\n{key}: sequential perplexity {full_ppl:.3f}; perplexity at each share of blocks skipped")
        print(f"{'method':<44}" + "".join(f"{f'{b:.0%}':>22}" for b in BUDGETS))
        for fam, rows in summary.items():
            cells = []
            for b in BUDGETS:
                e = rows[f"{b:.0%}"]
                cells.append("-" if e["ppl"] is None else f"{e['ppl']:.2f} ({e['ci95'][0]:.1f}-{e['ci95'][1]:.1f})")
            print(f"{fam:<44}" + "".join(f"{c:>22}" for c in cells))
        fig = out / f"pareto-{set_name}.png"
        plot(settings, families, n, full_ppl, fig, f"{report['model']}: {key}")
        if args.figure and set_name == "wikitext2-test":
            plot(settings, families, n, full_ppl, args.figure, f"{report['model']}: {key}")
    (out / "pareto.json").write_text(json.dumps(report, indent=1, default=float) + "\n")
    print(f"\nresults in {out}/pareto.json")


def router_family(name):
    """router:distill-attention-tau0.1 -> router:distill-attention (a family: its settings joined on the plot), and
    router:search-attention-k6 -> router:search-attention (consensus:search-attention-k6 -> consensus:search-...)."""
    kind, base = name.split(":", 1)
    for sep in ("-tau", "-target"):
        if sep in base:
            return f"{kind}:" + base.split(sep)[0]
    budget = re.fullmatch(r"(.+)-k\d+", base)
    return f"{kind}:" + budget.group(1) if budget else name


if __name__ == "__main__":
    sys.exit(main())
