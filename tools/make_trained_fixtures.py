#!/usr/bin/env python
"""Train tiny Llama, Qwen2 and radial Llama models with radial_min's own trainer, export them as Hugging Face
folders into tests/fixtures/trained-*/, and check that transformers loads each with logits agreeing (< 1e-4 of the
largest) and the same 20 greedy tokens; transformers' outputs are saved beside (reference.npz), so the suite
(tests/test_trained_export.py) checks the same without torch.

Dev-only (torch + transformers, radial_min installed beside them), from the repo root:

    python -m venv .venv-ref && .venv-ref/bin/pip install torch==2.13.0 && .venv-ref/bin/pip install transformers
    .venv-ref/bin/pip install -e . && .venv-ref/bin/python tools/make_trained_fixtures.py      # ~2 minutes

A fixture that exists is only checked again (and its reference rewritten) unless --retrain.
"""

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import radial_min  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
SIZE = "--vocab-size 300 --hidden-size 32 --layers 2 --heads 4 --seq-len 32 --batch-size 8 --steps 40 --warmup 4"
RUNS = {  # fixture folder: cli.py train options beyond SIZE
    "trained-llama": "--architecture llama --kv-heads 2",
    "trained-qwen2": "--architecture qwen2 --kv-heads 1",
    "trained-radial-llama": "--architecture llama --kv-heads 2 --radial --target-depth 3 --max-depth 6 "
    "--router-warmup 10 --router-hidden 8",
}
IDS = np.array([2, 45, 77, 120, 9, 203, 31, 260, 18, 99, 150, 7])


def train(name, options, work):
    """radial_min's trainer, then its export into the fixture folder (float32: the comparison is of the models)."""
    out = FIXTURES / name
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "cli.py", "train", "--out", str(work / name), "--export", str(out), "--dtype", "float32"]
    subprocess.run(cmd + SIZE.split() + options.split() + ["--eval-every", "40"], cwd=ROOT, check=True)
    (out / "report.json").unlink(missing_ok=True)


def reference(name):
    """transformers' logits and 20 greedy tokens for the export; radial_min's beside them, compared."""
    folder = FIXTURES / name
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(torch.tensor(IDS)[None]).logits[0].numpy()
        greedy = hf.generate(
            torch.tensor(IDS)[None], max_new_tokens=20, do_sample=False, repetition_penalty=1.0, eos_token_id=None
        )[0, len(IDS) :].numpy()
    model = radial_min.load(folder)
    sequential = getattr(model, "model", model)  # a radial network's blocks, run in order, are what transformers runs
    ours = sequential.forward(IDS)
    err = float(np.abs(ours - logits).max() / np.abs(logits).max())
    mine = radial_min.generate(sequential, IDS, 20, stop_at_eos=False, repetition_penalty=1.0)
    assert err < 1e-4, f"{name}: logits differ by {err:.2e} of the largest"
    assert np.array_equal(mine, greedy), f"{name}: greedy tokens differ: {mine} vs {greedy}"
    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    np.savez(folder / "reference.npz", input_ids=IDS, logits=logits, greedy=greedy)
    (folder / "versions.json").write_text(json.dumps(versions, indent=1) + "\n")
    kind = json.loads((folder / "config.json").read_text())["architectures"][0]
    print(f"{name}: transformers {transformers.__version__} loads it as {kind}; logits within {err:.1e}; greedy equal")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--retrain", action="store_true", help="train and export again, even where a fixture exists")
    args = p.parse_args(argv)
    work = ROOT / "runs" / "trained-fixtures"
    for name, options in RUNS.items():
        if args.retrain or not (FIXTURES / name / "model.safetensors").is_file():
            train(name, options, work)
        reference(name)


if __name__ == "__main__":
    main()
