"""The Results section of docs/performance.md, and the README's speed table, as Markdown from a bench run's JSON:

    python bench/bench.py --json bench.json && python bench/report.py bench.json > results.md

so the tables in the docs are the run's numbers, not a transcription."""

import json
import sys
import textwrap


def _s(s, digits=1):
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}, {s['max']:.{digits}f}]"


def _x(a, b):
    return f"{a['median'] / b['median']:.2f}x"


def _table(headers, rows):
    lines = ["| " + " | ".join(headers) + " |", "| --- |" + " ---: |" * (len(headers) - 1)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def _compare(title, r):
    rows, hf = [], "transformers" in r["decode"]
    for key, label in (("decode", "decode, 32-token prompt + 128 new"), ("prefill", "prefill, 512 tokens")):
        for name, s in r[key].items():
            if name != "transformers":
                theirs = r[key].get("transformers")
                rows.append(
                    [
                        f"{title}, {label}, {name} weights",
                        _s(s),
                        _s(theirs) if hf else "-",
                        _x(s, theirs) if hf else "-",
                    ]
                )
    return rows


def markdown(res) -> str:
    load = res["load"]
    loads = [v["load_average"] for v in load.values()]
    shares = [v["other_share"] for v in load.values()]
    busy = any(v["pool"] != "on" for v in load.values())
    out = [
        f"From `python bench/bench.py --json bench.json --markdown results.md`: load average "
        f"{min(loads):.1f}-{max(loads):.1f}, other processes {100 * min(shares):.0f}-{100 * max(shares):.0f}% of "
        "the CPUs"
        + (
            "; the machine was busy, so radial_min ran serially and torch got one thread: the ratios "
            "compare one core with one core."
            if busy
            else "."
        )
    ]
    rows = _compare("OPT-125M shapes", res["speed_opt"])
    if res.get("speed_smollm2"):
        rows += _compare("SmolLM2-135M", res["speed_smollm2"])
    out += ["", _table(["tokens/s, batch 1", "radial_min", "transformers float32", "ratio"], rows)]
    runs = (res["speed_opt"], res.get("speed_smollm2") or {})
    same = [f"{k} {v}/{res['sizes']['new']}" for r in runs for k, v in r.get("same_greedy", {}).items()]
    out += ["", "Greedy tokens shared with transformers (OPT-125M shapes, then SmolLM2): " + ", ".join(same) + "."]
    lim, mem, q = res["limits"], res["memory"], res.get("int8_quality") or {}
    dtypes, dec = [d for d in mem if d in lim["decode"]], lim["decode"]
    tps = {d: res["speed_opt"]["decode"][d]["median"] for d in dtypes}
    rows = [
        ["bytes read per decode token"] + [f"{dec[d]['bytes'] / 1e6:.1f} MB" for d in dtypes],
        ["decode / roofline, tokens/s"]
        + [f"{tps[d]:.1f} / {dec[d]['roofline_tok_s']:.1f} ({100 * dec[d]['share']:.0f}%)" for d in dtypes],
        ["weights held"] + [f"{mem[d]['weights_bytes'] / 1e6:.0f} MB ({mem[d]['weights_ratio']:.2f}x)" for d in dtypes],
        ["peak RSS, fresh process, load + 8 tokens"] + [f"{mem[d]['peak_bytes'] / 1e6:.0f} MB" for d in dtypes],
        ["warm start (import + load + first token)"] + [f"{mem[d]['warm_start_s']:.2f} s" for d in dtypes],
    ]
    out += [
        "",
        _table(["OPT-125M shapes"] + dtypes, rows),
        "",
        f"Memory bandwidth {lim['bandwidth_GB_s']:.1f} GB/s; prefill {lim['prefill_GFLOP_s']:.0f} GFLOP/s "
        "(one layer's four matmuls alone: "
        + ", ".join(f"{k} {v:.0f}" for k, v in lim["sgemm_GFLOP_s"].items())
        + f" GFLOP/s); cold start {mem['cold_start_s']:.1f} s.",
    ]
    if q:
        out += [
            "",
            f"Shipped model, WikiText-2 test perplexity: float32 {q['ppl']['float32']:.3f}, int8 "
            f'{q["ppl"]["int8"]:.3f} ({100 * (q["ratio"] - 1):+.2f}%); 60 greedy tokens of "And God said": '
            f"{q['same_tokens']}/60 the same.",
        ]
    sk = res["skips"]
    seq = sk["ms"]["sequential model"]
    rows = [[name, f"{sk['skipped'][name]:.0%}", _s(s, 2), _x(seq, s)] for name, s in sk["ms"].items()]
    out += [
        "",
        _table(["decode, OPT-125M shapes, float32", "blocks skipped", "ms per token", "speed-up"], rows),
        "",
        f"Trained Router: tau {sk['tau']:.3f}; {sk['decision_us']:.1f} us per decision, "
        f"{100 * sk['decision_share']:.1f}% of its token's time. Every block skipped: {sk['fixed_ms']:.2f} ms.",
    ]
    rp = res["routed_prefill"]
    rows = [[name, _s(s, 0), _x(s, rp["tok_s"]["sequential model"])] for name, s in rp["tok_s"].items()]
    rows.append(
        [
            "the same trained Router, token by token (1 run)",
            f"{rp['token_by_token_tok_s']:.0f}",
            f"{rp['token_by_token_tok_s'] / rp['tok_s']['sequential model']['median']:.2f}x",
        ]
    )
    out += [
        "",
        _table(["prefill, 512 tokens, OPT-125M shapes", "tokens/s", "x sequential"], rows),
        "",
        f"Together and token by token: routes {'identical' if rp['same_routes'] else 'DIFFERENT'}, logits within "
        f"{rp['max_rel_diff']:.1e} of the largest.",
    ]
    sh = res["shipped"]
    cli = sh["cli"]  # medians over fresh processes: (tokens/s in all, decode tokens/s)
    api = sh["api"]
    rows = [["API, tokens/s in all", _s(api["sequential"], 0), _s(api["routed"], 0), f"{sh['api_ratio']:.2f}x"]]
    for i, what in enumerate(("in all", "decode")):
        ratio = sh["cli_ratio"] if i == 0 else sh["cli_decode_ratio"]
        rows.append(
            [
                f"CLI --stats, tokens/s {what} (median)",
                f"{cli['sequential'][i]:.0f}",
                f"{cli['routed'][i]:.0f}",
                f"{ratio:.2f}x",
            ]
        )
    out += [
        "",
        _table(["shipped model + router-tau0.2, 200 greedy tokens", "sequential", "routed", "ratio"], rows),
        "",
        f"Routed: {sh['depth']:.2f} of 12 blocks per decode step; the CLI's depth display and routing summary: "
        f"{100 * sh['display']['cost']:.2f}% of a token's time.",
        "",
        _table(["target", "measured", "status"], res["targets"]),
    ]
    prose = [line if line.startswith("|") else textwrap.fill(line, 120) for line in out]
    return "\n".join(prose) + "\n"


if __name__ == "__main__":
    print(markdown(json.loads(open(sys.argv[1]).read())), end="")
