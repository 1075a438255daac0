"""The tables of docs/real-model.md, printed as Markdown from the JSON that bench/real_pareto.py and
bench/real_speed.py write (nothing is measured here):

    python tools/real_report.py --pareto runs/real/pareto/pareto.json --speed runs/real/speed.json
    python tools/real_report.py --search runs/real/routers     # tools/real_routers.py search: its searches
"""

import argparse
import json
import sys
from pathlib import Path


def cell(e) -> str:
    if e is None or e.get("ppl") is None:
        return "-"
    return f"{e['ppl']:.2f} ({e['ci95'][0]:.1f}-{e['ci95'][1]:.1f})"


def pareto_tables(report):
    for key, s in report["sets"].items():
        budgets = list(next(iter(s["at_budget"].values())))
        ks = report["budgets_blocks_skipped"]
        print(f"\n{key}: sequential perplexity {s['sequential_ppl']:.2f}; perplexity (95% bootstrap interval) at each")
        print("share of the model's blocks skipped, blocks per token in brackets\n")
        head = [f"{b} ({report['blocks'] - k})" for b, k in zip(budgets, ks)]
        print("| method | " + " | ".join(head) + " |")
        print("| --- |" + " ---: |" * len(budgets))
        for fam, rows in s["at_budget"].items():
            print(f"| {fam} | " + " | ".join(cell(rows[b]) for b in budgets) + " |")
        print("\ndynamic against the best static method at each budget: perplexity ratio (95% interval, paired)\n")
        print("| method | " + " | ".join(budgets) + " |")
        print("| --- |" + " ---: |" * len(budgets))
        for fam, rows in s["at_budget"].items():
            if fam.startswith("static"):
                continue
            cells = []
            for b in budgets:
                v = rows[b].get("vs_best_static")
                if v is None:
                    cells.append("-")
                else:
                    best = v["static"].split(":")[1]
                    cells.append(f"{v['ppl_ratio']:.3f} ({v['ci95'][0]:.3f}-{v['ci95'][1]:.3f}) vs {best}")
            print(f"| {fam} | " + " | ".join(cells) + " |")
        print("\nrouters and oracles as measured (not interpolated)\n")
        print("| setting | blocks/token | attention blocks run | perplexity | vs sequential |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for name, p in s["points"].items():
            if name.startswith(("router:", "oracle", "consensus:")):
                att = p.get("attention_blocks_run")
                att = "-" if att is None else f"{att:.2f}"
                print(f"| {name} | {p['blocks']:.2f} | {att} | {p['ppl']:.2f} | {p['ppl'] / s['sequential_ppl']:.3f} |")


def speed_table(speed):
    load = speed["load_average_start"][0], speed["load_average_end"][0]
    print(f"\n{speed['cpu']} ({', '.join(speed['isa'])}), {speed['cores']} cores; load average {load[0]:.1f} at the")
    print(f"start, {load[1]:.1f} at the end\n")
    print(
        "| weights | threads | contender | blocks/token | decode tok/s routed / sequential | ratio (range) | "
        "ideal from bytes | ideal from blocks | prefill ratio | greedy tokens equal |"
    )
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in speed["runs"]:
        d = r["decode_tok_s"]
        print(
            f"| {r['dtype']} | {r['threads']} | {r['contender']} | {r['blocks_per_decoded_token']:.1f} | "
            f"{d['routed']:.1f} / {d['sequential']:.1f} | {r['decode_ratio_median']:.2f}x "
            f"({r['decode_ratio_range'][0]:.2f}-{r['decode_ratio_range'][1]:.2f}) | {r['ideal_from_bytes']:.3f}x | "
            f"{r['ideal_from_blocks']:.3f}x | {r['prefill_ratio_median']:.2f}x | {r['tokens_equal_share']:.0%} |"
        )


def search_summary(folder, skippable="attention"):
    """The searches behind the search routers: cost, what they chose, and how well each router repeats its labels."""
    folder = Path(folder)
    for key, runs in json.loads((folder / f"search-{skippable}-trajectories.json").read_text()).items():
        cpu = [r["cpu_seconds"] for r in runs]
        print(f"\n{key}: {len(runs)} sequences, {sum(cpu):.0f} CPU-s ({min(cpu):.0f} to {max(cpu):.0f} each); blocks")
        print(
            f"run {sum(r['blocks_run'] for r in runs):,} (each candidate from the embedding: "
            f"{sum(r['blocks_run_from_scratch'] for r in runs):,})"
        )
        firsts = [r["trajectory"][0]["block"] for r in runs]
        print("first block chosen: " + ", ".join(f"block {b} ({firsts.count(b)}x)" for b in sorted(set(firsts))))
        kl = [[t["kl"] for t in r["trajectory"]] for r in runs]
        made_all = [json.loads(p.read_text()) for p in folder.glob(f"search-{skippable}-k*/made.json")]
        for m in sorted(made_all, key=lambda m: m["budget_blocks"]):
            k, sets = m["budget_blocks"], {frozenset(t["blocks"][: m["budget_blocks"]]) for t in m["trajectories"]}
            own = [row[k - 1] for row in kl[: len(m["trajectories"])]]
            print(
                f"k={k:2d}: {len(sets):2d} distinct sets of blocks; mean KL on its own sequence "
                f"{sum(own) / len(own):.3f} ({min(own):.3f}-{max(own):.3f}); the router repeats "
                f"{m['train_accuracy']['decision']:.2%} of the labels' decisions ({m['train_cpu_seconds']:.0f} CPU-s)"
            )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pareto", default=None, help="bench/real_pareto.py's pareto.json")
    p.add_argument("--speed", default=None, help="bench/real_speed.py's --out JSON")
    p.add_argument("--search", default=None, help="tools/real_routers.py search's --out folder")
    args = p.parse_args(argv)
    if args.pareto:
        pareto_tables(json.loads(Path(args.pareto).read_text()))
    if args.search:
        search_summary(args.search)
    if args.speed:
        speed_table(json.loads(Path(args.speed).read_text()))


if __name__ == "__main__":
    sys.exit(main())
