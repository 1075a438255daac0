"""Prove a checkpoint folder is a genuine Hugging Face checkpoint (OPT, Llama, Qwen2, as `cli.py train` exports them):
transformers' AutoModelForCausalLM and AutoTokenizer load it, and their logits and token ids equal radial_min's.
Dev-only (needs torch + transformers; tools/make_trained_fixtures.py checks the trained Llama/Qwen2 fixtures).

    .venv-ref/bin/python tools/check_with_transformers.py weights/opt-kjv-wiki
"""

import sys
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import radial_min  # noqa: E402

TEXTS = [
    "In the beginning God created the heaven and the earth.",
    " = Valkyria Chronicles III = \n Senjō no Valkyria 3 : <unk> Chronicles ( Japanese : 戦場のヴァルキュリア3 )",
]


def main(folder):
    ours = radial_min.load(folder)
    tok = radial_min.Tokenizer(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(folder)
    worst = 0.0
    for text in TEXTS:
        ids = tok.encode(text)
        hf_ids = np.array(hf_tok(text).input_ids)
        assert np.array_equal(ids, hf_ids), f"token ids differ for {text!r}: {ids} vs {hf_ids}"
        with torch.no_grad():
            ref = hf(torch.tensor(ids)[None]).logits[0].numpy()
        err = np.abs(ours.forward(ids) - ref).max() / np.abs(ref).max()
        worst = max(worst, err)
        n = max(0, min(20, ours.config.max_position_embeddings - len(ids) + 1))  # radial_min stops at the context
        greedy = (
            hf.generate(torch.tensor(ids)[None], max_new_tokens=n, do_sample=False)[0, len(ids) :].numpy() if n else []
        )
        mine = radial_min.generate(ours, ids, n)
        assert np.array_equal(greedy, mine), f"greedy tokens differ: {greedy} vs {mine}"
        print(f"{len(ids):4d} tokens: max |logit diff| / max |logit| = {err:.2e}; {n} greedy tokens equal; ids equal")
    version = __import__("transformers").__version__
    print(f"OK: {folder} loads in transformers {version} with equal logits (worst {worst:.2e})")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "weights/opt-kjv-wiki")
