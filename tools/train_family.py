"""Train a family of OPT sizes on the same data and budget, then profile each one: does the median residual
ratio fall as models grow, as the paper found for OPT-125M..66B?

    python tools/train_family.py                 # trains what is missing (resumable), then profiles and reports
    python tools/train_family.py --report-only   # profiles the exported models only (and scores them, without runs/)
    python tools/train_family.py --seed 1        # a second seed: runs/family-seed1/ (weights not shipped)
    python tools/train_family.py --seed 1 --sizes 64x2,128x3   # some sizes only

Budget rule: every size gets the same 600 steps of 16 x 256 tokens (2.5M tokens) of the default corpus, with
the same optimizer settings; only width, depth and heads change. Models go to weights/family/opt-<E>x<L>/
(seed 0, shipped); another --seed changes the initialisation and the batches and goes under runs/family-seed<N>/.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import radial_min  # noqa: E402

from radial_min import data, progress  # noqa: E402
from radial_min.analysis import oracle  # noqa: E402

SIZES = [(64, 2, 2), (128, 3, 4), (192, 4, 6), (256, 6, 8)]  # (width, layers, heads)
STEPS = 600


def name(E, L):
    return f"opt-{E}x{L}"


def train(E, L, H, runs: Path, weights: Path, seed: int):
    out = weights / name(E, L)
    if (out / "model.safetensors").is_file():
        return out
    cmd = [
        sys.executable,
        str(ROOT / "cli.py"),
        "train",
        "--out",
        str(runs / name(E, L)),
        "--export",
        str(out),
        "--hidden-size",
        str(E),
        "--layers",
        str(L),
        "--heads",
        str(H),
        "--steps",
        str(STEPS),
        "--warmup",
        "30",
        "--seed",
        str(seed),
    ]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return out


def profile(folders, out: Path, max_sequences):
    cmd = [
        sys.executable,
        str(ROOT / "cli.py"),
        "profile",
        "--out",
        str(out),
        "--max-sequences",
        str(max_sequences),
        "--overwrite",
    ]  # this tool regenerates its own report
    for f in folders:
        cmd += ["--model", str(f)]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return json.loads((out / "summary.json").read_text())


def held_out_perplexities(folder, seq_len: int) -> dict:
    """An exported model's perplexity on the held-out streams as `train` reports it (every 20th KJV chapter and
    WikiText-2 test, tokenized by the model's tokenizer, packed in rows of `seq_len` and scored whole): for a
    fresh clone, which has the shipped models but not the training runs' report.json."""
    _, val_docs = data.default_corpus()
    tok, model = radial_min.Tokenizer(folder), radial_min.load(folder)
    out = {}
    for k, docs in val_docs.items():
        seqs = data.pack(data.tokenize_documents(tok, docs), seq_len)
        nll = [
            oracle.next_token_nll(model.forward(s), s) for s in progress.track(seqs, f"score {folder.name} {k}", "seq")
        ]
        out[k] = {"model": float(np.exp(np.concatenate(nll).mean()))}  # as oracle.perplexity, with a progress bar
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0, help="init and batch seed (default: 0, the shipped family)")
    p.add_argument("--runs", default=None, help="training runs (default: runs/family, or runs/family-seed<N>/runs)")
    p.add_argument(
        "--weights", default=None, help="exported models (default: weights/family, or runs/family-seed<N>/weights)"
    )
    p.add_argument(
        "--profile-out",
        default=None,
        help="profile and family.json (default: runs/family-profile, or runs/family-seed<N>/profile)",
    )
    p.add_argument("--max-sequences", type=int, default=400, help="WikiText-2 test sequences to profile")
    p.add_argument("--report-only", action="store_true")
    p.add_argument(
        "--sizes",
        default=",".join(name(E, L)[4:] for E, L, _ in SIZES),
        help="which sizes, as WIDTHxLAYERS (default: all four)",
    )
    args = p.parse_args(argv)
    sizes = [s for s in SIZES if name(s[0], s[1])[4:] in args.sizes.split(",")]
    if not sizes:
        p.error(f"--sizes {args.sizes}: none of {', '.join(name(E, L)[4:] for E, L, _ in SIZES)}")
    home = ROOT / "runs" / f"family-seed{args.seed}"
    runs = Path(args.runs or (ROOT / "runs" / "family" if args.seed == 0 else home / "runs"))
    weights = Path(args.weights or (ROOT / "weights" / "family" if args.seed == 0 else home / "weights"))
    args.profile_out = args.profile_out or str(ROOT / "runs" / "family-profile" if args.seed == 0 else home / "profile")
    folders = [
        weights / name(E, L) if args.report_only else train(E, L, H, runs, weights, args.seed) for E, L, H in sizes
    ]
    summary = profile(folders, Path(args.profile_out), args.max_sequences)
    rows = []
    for (E, L, H), folder in zip(sizes, folders):
        s = summary[f"{folder.name}/prefill"]
        report = runs / folder.name / "report.json"
        model = radial_min.load(folder)
        if report.is_file():
            rep = json.loads(report.read_text())
        else:
            print(f"{folder.name}: no {report}; its perplexities scored here", file=sys.stderr, flush=True)
            rep = held_out_perplexities(folder, model.config.max_position_embeddings)
        n_params = model.n_params
        rows.append(
            {
                "model": folder.name,
                "width": E,
                "layers": L,
                "blocks": 2 * L,
                "params": n_params,
                "median_ratio": s["overall"]["median"],
                "median_att": s["types"]["att"]["median"],
                "median_ffn": s["types"]["ffn"]["median"],
                "ppl_wiki": rep.get("wiki", {}).get("model"),
                "ppl_kjv": rep.get("kjv", {}).get("model"),
            }
        )
    print(
        f"\n{'model':<12}{'params':>10}{'blocks':>8}{'median r':>10}{'att':>8}{'ffn':>8}{'ppl wiki':>10}{'ppl kjv':>9}"
    )
    for r in rows:
        ppl = [r["ppl_wiki"], r["ppl_kjv"]]
        print(
            f"{r['model']:<12}{r['params']:>10,}{r['blocks']:>8}{r['median_ratio']:10.3f}{r['median_att']:8.3f}"
            f"{r['median_ffn']:8.3f}{ppl[0]:10.1f}{ppl[1]:9.1f}"
        )
    Path(args.profile_out, "family.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
