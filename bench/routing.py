"""Routing that pays in wall-clock time: a RadialNetwork's decode time per token with a share of its blocks skipped
(scripted routes, and a trained Router), the router's cost per decision, routed prefill against the sequential
one, and the shipped model with its shipped router through the API and the CLI."""

import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from common import ROOT, decode_ours, fmt, interleaved, prefill_ours, print_table, prompt_ids, ratio, section

import radial_min
from radial_min.analysis import profiling
from radial_min import router as R
from radial_min.radial import RadialNetwork, depth_streamer, format_routing
from radial_min.analysis import distill
from radial_min.router import InOrder as SequentialRouter
from radial_min.router import Scripted as ScriptedRouter

SKIP_RATES = (0.25, 0.5, 0.75, 1.0)  # 1.0 = every block skipped: embedding, LM head and sampling only
SHIPPED_ROUTER = ROOT / "weights" / "opt-kjv-wiki" / "router-tau0.2"
PROMPT = "And God said"


def skip_routes(n_blocks: int, n_positions: int, rate: float) -> list:
    """Routes skipping round(rate * n_blocks) blocks per token, spread evenly over the depth and shifted by one
    block per position, so attention and FFN blocks are skipped equally often."""
    k = round(rate * n_blocks)
    base = [round(j * n_blocks / k) for j in range(k)]
    return [[b for b in range(n_blocks) if b not in {(s + p) % n_blocks for s in base}] for p in range(n_positions)]


TAU_QUANTILE = 0.6  # of the sequential model's ratios: on random-opt-125m its router skips ~50% in decode (0.5: 42%)


def trained_router(model, path: Path) -> R.Router:
    """A Router distilled from this model's oracle as `cli.py train-router` does (drop rule), labels from 8 x 64
    random tokens, at the tau where the router skips about half the blocks (TAU_QUANTILE). Trained once, kept
    beside the model as bench-router-q0.6.json/.safetensors."""
    files = path / f"bench-router-q{TAU_QUANTILE}"
    if files.with_name(files.name + ".json").is_file():
        return R.Router.load(files)
    seqs = np.stack([prompt_ids(64, model.config.vocab_size, seed=100 + i) for i in range(8)])
    tau = float(np.quantile(profiling.profile_text(model, seqs), TAU_QUANTILE))
    ex = distill.oracle_examples(model, seqs, tau, "drop")
    cfg = R.RouterConfig(
        width=model.config.hidden_size, n_blocks=len(model.blocks), tau=tau, kv_rule="drop", model=path.name
    )
    router = distill.train_router(ex, cfg, progress=False)
    router.save(files)
    return router


def decision_us(net, n=2000) -> float:
    """Microseconds per routing decision of one token (RadialNetwork.decide on a [1, E] state, as decode asks)."""
    x = np.random.default_rng(0).standard_normal((1, net.config.hidden_size)).astype(np.float32)
    net.decide(x, [-1], [0])
    t0 = time.perf_counter()
    for i in range(n):
        net.decide(x, [i % 3 - 1], [i % 3])
    return (time.perf_counter() - t0) / n * 1e6


def run_skips(model, path: Path, sz) -> dict:
    section("6. Decode time per token with blocks skipped (OPT-125M shapes, RadialNetwork, unified KV cache)")
    n, ids = len(model.blocks), prompt_ids(sz["prompt"], model.config.vocab_size)
    router, routes = trained_router(model, path), {}

    def ms(make):
        return lambda: 1e3 / decode_ours(make(), ids, sz["new"])[0]

    def trained():
        net = RadialNetwork(model, router)
        routes["trained"] = net.routes  # the prompt's, then one per decode step
        return net

    def scripted(rate):
        return RadialNetwork(model, ScriptedRouter(skip_routes(n, sz["prompt"] + sz["new"], rate), n))

    fns = {"sequential model": ms(lambda: model), "RadialNetwork, nothing skipped": ms(lambda: scripted(0.0))}
    for rate in SKIP_RATES:
        fns[f"scripted, {rate:.0%} skipped"] = ms(lambda r=rate: scripted(r))
    fns["trained Router"] = ms(trained)
    t = interleaved(fns, sz["reps"])
    depth = float(np.mean([len(r) for r in routes["trained"][sz["prompt"] :]]))  # the tokens fed back in decode
    seq, fixed = t["sequential model"]["median"], t["scripted, 100% skipped"]["median"]
    skipped = {name: float(name.split(", ")[1].split("%")[0]) / 100 for name in fns if name.startswith("scripted")}
    skipped.update({"sequential model": 0.0, "RadialNetwork, nothing skipped": 0.0, "trained Router": 1 - depth / n})
    rows = []
    for name, s in t.items():
        ideal = fixed + (1 - skipped[name]) * (seq - fixed)
        rows.append([name, f"{skipped[name]:.0%}", fmt(s, 2), f"{seq / s['median']:.2f}x", f"{seq / ideal:.2f}x"])
    print_table(["router", "blocks skipped", "ms per token", "speed-up", "ideal speed-up"], rows)
    net = RadialNetwork(model, router)
    us = decision_us(net)
    share = (depth + 1) * us / 1e3 / t["trained Router"]["median"]
    print(
        f"ideal = fixed + (1 - skipped) x (sequential - fixed), fixed = every block skipped ({fixed:.2f} ms: the\n"
        "embedding, LM head, sampling): what skipping can give by Amdahl's law. Trained Router: distilled from\n"
        f"this model's oracle (tau {router.config.tau:.3f}, the ratios' {TAU_QUANTILE:.0%} quantile), {depth:.2f} of "
        f"{n} blocks per\ndecode step; its cost: {us:.1f} us per decision x {depth + 1:.2f} decisions = "
        f"{100 * share:.1f}% of its token's time."
    )
    return {
        "ms": t,
        "skipped": skipped,
        "fixed_ms": fixed,
        "decision_us": us,
        "decision_share": share,
        "trained_speedup": seq / t["trained Router"]["median"],
        "tau": router.config.tau,
    }


def run_routed_prefill(model, path: Path, sz) -> dict:
    section(f"7. Routed prefill, {sz['prefill']} tokens (OPT-125M shapes): block by block vs the sequential model")
    n, ids = len(model.blocks), prompt_ids(sz["prefill"], model.config.vocab_size, seed=1)
    router = trained_router(model, path)
    nets = {
        "sequential model": model,
        "RadialNetwork, nothing skipped": RadialNetwork(model, SequentialRouter(n)),
        "RadialNetwork, trained Router": RadialNetwork(model, router),
    }
    t = interleaved({name: (lambda m=m: prefill_ours(m, ids)) for name, m in nets.items()}, sz["reps"])
    alone = RadialNetwork(model, router)  # the same prompt one token at a time, once: the path it replaces
    cache, t0 = alone.new_cache(), time.perf_counter()
    slow = np.concatenate([alone.forward(ids[i : i + 1], cache) for i in range(len(ids))])
    t_alone = len(ids) / (time.perf_counter() - t0)
    fast = RadialNetwork(model, router)
    diff = float(np.abs(fast.forward(ids) - slow).max() / np.abs(slow).max())
    depth = float(np.mean([len(r) for r in fast.routes]))
    rows = [[name, fmt(s, 0), f"{ratio(s, t['sequential model']):.2f}x"] for name, s in t.items()]
    seq = t["sequential model"]["median"]
    rows.append(["RadialNetwork, trained Router, token by token (1 run)", f"{t_alone:.0f}", f"{t_alone / seq:.2f}x"])
    print_table(["prefill", "tokens/s", "x sequential"], rows)
    print(
        f"trained Router: {depth:.2f} of {n} blocks per token. Together vs token by token: routes "
        f"{'identical' if fast.routes == alone.routes else 'DIFFERENT'}, logits within {diff:.1e} of the largest."
    )
    return {
        "tok_s": t,
        "token_by_token_tok_s": t_alone,
        "same_routes": fast.routes == alone.routes,
        "max_rel_diff": diff,
        "equal_compute_ratio": ratio(t["RadialNetwork, nothing skipped"], t["sequential model"]),
    }


def _cli_rates(args) -> tuple:
    """(tokens/s in all, decode tokens/s) of one `cli.py generate --stats --quiet` in a fresh process."""
    p = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), "generate", PROMPT, "--stats", "--quiet", *args],
        capture_output=True,
        text=True,
        check=True,
    )
    m = re.search(r"s, ([\d.]+) tokens/s; .* then ([\d.]+) tokens/s\]", p.stderr)
    return float(m.group(1)), float(m.group(2))


def _display_cost(model, router, tok, ids, n_new, reps) -> dict:
    """Seconds per token spent in the CLI's streaming callback, plain and with --show-depth count (both writing to
    a list), and in the routing summary line, against the routed generation's own time per token; the medians of
    `reps` alternating runs after one untimed pair."""
    from radial_min.io.tokenizer import Streamer

    out, runs = [], {"plain": [], "with depths": [], "summary": [], "token": []}
    for name in ["plain", "with depths"] * (reps + 1):
        net = RadialNetwork(model, router)
        stream = Streamer(tok, out.append)
        show = depth_streamer(stream, net, "count", out.append) if name == "with depths" else None
        callback, t_in = show or (lambda t: out.append(stream.push(t))), [0.0]

        def timed(t, callback=callback, t_in=t_in):
            t0 = time.perf_counter()
            callback(t)
            t_in[0] += time.perf_counter() - t0

        t0 = time.perf_counter()
        radial_min.generate(net, ids, n_new, stop_at_eos=False, on_token=timed, repetition_penalty=1.2)
        runs["token"].append((time.perf_counter() - t0) / n_new)
        runs[name].append(t_in[0] / n_new)
        t0 = time.perf_counter()
        format_routing(net, len(ids))
        runs["summary"].append(time.perf_counter() - t0)
    spent = {k: float(np.median(v[2:])) for k, v in runs.items()}  # the first pair: untimed warm-up
    spent["cost"] = (spent["with depths"] - spent["plain"] + spent["summary"] / n_new) / spent["token"]
    return spent


def run_shipped(sz) -> dict:
    section("8. The shipped model and its shipped router (weights/opt-kjv-wiki, router-tau0.2), 200 greedy tokens")
    model, router = radial_min.load(radial_min.io.hub.DEFAULT_MODEL), R.Router.load(SHIPPED_ROUTER)
    tok = radial_min.Tokenizer(model.path)
    ids, n_new = tok.encode(PROMPT), 200

    def api(make):  # tokens/s of the whole generation (prefill + decode), as the CLI's --stats counts them
        def once():
            runner, t0 = make(), time.perf_counter()
            radial_min.generate(runner, ids, n_new, stop_at_eos=False, repetition_penalty=1.2)
            return n_new / (time.perf_counter() - t0)

        return once

    a = interleaved({"sequential": api(lambda: model), "routed": api(lambda: RadialNetwork(model, router))}, sz["reps"])
    cli_runs = {"sequential": [], "routed": []}
    for _ in range(sz["reps"]):
        cli_runs["sequential"].append(_cli_rates(["--max-new-tokens", str(n_new)]))
        cli_runs["routed"].append(_cli_rates(["--max-new-tokens", str(n_new), "--router", str(SHIPPED_ROUTER)]))
    med = {k: (float(np.median([r[0] for r in v])), float(np.median([r[1] for r in v]))) for k, v in cli_runs.items()}
    shown = _display_cost(model, router, tok, ids, n_new, sz["reps"])
    net = RadialNetwork(model, router)
    radial_min.generate(net, ids, n_new, stop_at_eos=False, repetition_penalty=1.2)
    depth = float(np.mean([len(r) for r in net.routes[len(ids) :]]))
    cli_all, cli_decode = med["routed"][0] / med["sequential"][0], med["routed"][1] / med["sequential"][1]
    print_table(
        ["200 greedy tokens (repetition penalty 1.2)", "sequential", "routed", "routed / sequential"],
        [
            [
                "API, generate(), tokens/s in all",
                fmt(a["sequential"], 0),
                fmt(a["routed"], 0),
                f"{ratio(a['routed'], a['sequential']):.2f}x",
            ],
            [
                "CLI --stats, tokens/s in all (median)",
                f"{med['sequential'][0]:.0f}",
                f"{med['routed'][0]:.0f}",
                f"{cli_all:.2f}x",
            ],
            [
                "CLI --stats, decode tokens/s (median)",
                f"{med['sequential'][1]:.0f}",
                f"{med['routed'][1]:.0f}",
                f"{cli_decode:.2f}x",
            ],
        ],
    )
    print(
        f"routed: {depth:.2f} of {len(model.blocks)} blocks per decode step, {decision_us(net):.1f} us per "
        "decision.\n"
        f'CLI: `cli.py generate "{PROMPT}" --max-new-tokens 200 --stats --quiet [--router ...]`, fresh processes, '
        f"alternating; 'in all'\nincludes the prefill (the first token), 'decode' is from the first token on.\n"
        f"CLI display, per token: streaming the text {1e6 * shown['plain']:.1f} us, with --show-depth count "
        f"{1e6 * shown['with depths']:.1f} us; the routing summary\nline {1e3 * shown['summary']:.2f} ms once; "
        f"their cost over plain streaming: {100 * shown['cost']:.2f}% of the {1e3 * shown['token']:.2f} ms per "
        "token."
    )
    return {
        "api": a,
        "cli": med,
        "display": shown,
        "depth": depth,
        "api_ratio": ratio(a["routed"], a["sequential"]),
        "cli_ratio": cli_all,
        "cli_decode_ratio": cli_decode,
    }
