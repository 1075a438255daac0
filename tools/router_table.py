"""The routers of docs/radial.md side by side, everything at each router's own depth, and their figure.

    python cli.py simulate --taus 0,0.02,0.05,0.1,0.125,0.15,0.175,0.2,0.225,0.25,0.275,0.3 --out runs/simulate-default
    for tau in 0.1 0.15 0.2 0.25 0.3; do python cli.py train-router --tau $tau --out runs/routers/tau$tau; done
    python tools/router_table.py        # the table (markdown) and docs/figures/router_ppl_vs_depth.png

Each `train-router` report already holds the router's perplexity and the oracle's and static baselines' at the
router's mean depth (interpolated, see oracle.at_depth); this prints them as one table. The figure adds the
oracle's and the baselines' whole curves from `simulate` on the same 32 held-out sequences.
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from radial_min.analysis import plots  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--routers", default=str(ROOT / "runs" / "routers"), help="folder of train-router --out folders")
    p.add_argument("--simulate", default=str(ROOT / "runs" / "simulate-default" / "simulate.json"))
    p.add_argument("--figure", default=str(ROOT / "docs" / "figures" / "router_ppl_vs_depth.png"))
    p.add_argument("--rules", default="drop", help="the oracle's curves to draw from simulate.json (default: drop)")
    p.add_argument("--ymax", type=float, default=None, help="cut the perplexity axis off here (default: none)")
    args = p.parse_args(argv)
    reports = sorted(
        (json.loads(f.read_text()) for f in Path(args.routers).glob("*/train_router.json")),
        key=lambda r: r["config"]["tau"],
    )
    if not reports:
        sys.exit(f"error: no */train_router.json under {args.routers}")
    print(
        "| tau | decisions right: oracle's states / own states | whole routes: oracle's / own | blocks/token "
        "| router ppl | oracle | static, lowest-ratio | static, early exit |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    points = {}
    for rep in reports:
        tau, at = rep["config"]["tau"], rep["at_router_depth"]
        acc, own = rep["accuracy_test"], rep["agreement_own_states"]
        depth = rep["runs"]["router"]["mean_depth"]
        cells = [
            f"{tau:.2f}",
            f"{acc['decision']:.1%} / {own['move']:.1%}",
            f"{acc['route']:.1%} / {own['route']:.1%}",
            f"{depth:.2f}",
            f"**{at['router']:.1f}**",
        ]
        cells += [
            "-" if at[k] is None else f"{at[k]:.1f}" for k in ("oracle", "static lowest-ratio", "static early exit")
        ]
        print("| " + " | ".join(cells) + " |")
        points.setdefault("router", ([], []))
        points["router"][0].append(depth)
        points["router"][1].append(at["router"])
    sim = json.loads(Path(args.simulate).read_text()) if Path(args.simulate).is_file() else None
    if sim is not None:
        for rule in args.rules.split(","):
            rows = sorted((r["mean_depth"], r["ppl"]) for r in sim["rows"] if r["rule"] == rule)
            points[f"oracle ({rule})"] = ([d for d, _ in rows], [q for _, q in rows])
        for kind, label in (("lowest", "static: lowest-ratio blocks"), ("exit", "static: early exit")):
            rows = sorted((r["depth"], r["ppl"]) for r in sim["static"] if r["baseline"] == kind)
            points[label] = ([d for d, _ in rows], [q for _, q in rows])
    n = len(sim["blocks"]) if sim is not None else reports[0]["config"]["n_blocks"]
    made = plots.ppl_vs_depth(points, n, args.figure, args.ymax)
    print(f"\nfigure: {args.figure if made else 'not made (pip install matplotlib)'}")


if __name__ == "__main__":
    main()
