"""Build the Llama/Qwen2 parity fixtures in tests/fixtures/: tiny random-weight checkpoints saved by transformers,
each beside transformers' logits and 20 greedy tokens for it.

Dev-only (torch, transformers; see tools/make_reference.py for the set-up). Run from the repo root:

    python tools/make_llama_reference.py
"""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_reference import randomize  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures"
VERSIONS = {"torch": torch.__version__, "transformers": transformers.__version__}


def reference(folder, ids):
    """transformers' float32 logits and 20 greedy tokens (EOS ignored) from the checkpoint as saved."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompt = torch.tensor(ids)[None]
    with torch.no_grad():
        logits = model(prompt).logits[0].numpy()
        model.generation_config.eos_token_id = None
        greedy = model.generate(prompt, max_new_tokens=20, do_sample=False)[0, len(ids) :].numpy()
    return {"input_ids": np.array(ids), "logits": logits, "greedy": greedy}


def hub_style_config(folder):
    """Rewrite config.json as transformers 4 wrote it (the Hub's form): `torch_dtype`, top-level `rope_theta`."""
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg["torch_dtype"] = cfg.pop("dtype", "float32")
    cfg["rope_theta"] = cfg.pop("rope_parameters")["rope_theta"]
    cfg["rope_scaling"] = None
    path.write_text(json.dumps(cfg, indent=2))


def make(name, seed, config_cls, model_cls, dtype=torch.float32, hub_style=False, **cfg):
    folder = OUT / name
    shutil.rmtree(folder, ignore_errors=True)
    base = dict(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
    )
    base.update(cfg)
    torch.manual_seed(seed)
    model = randomize(model_cls(config_cls(**base)), seed).eval()
    model.to(dtype).save_pretrained(folder)
    if hub_style:
        hub_style_config(folder)
    rng = np.random.default_rng(seed)
    ref = reference(folder, [1] + rng.integers(3, base["vocab_size"], size=11).tolist())
    np.savez(folder / "reference.npz", **ref, **{f"version_{k}": v for k, v in VERSIONS.items()})
    print(f"{name}: greedy {ref['greedy'].tolist()}")


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    make(
        "llama-gqa-tied", 11, LlamaConfig, LlamaForCausalLM, tie_word_embeddings=True, rope_theta=500.0, hub_style=True
    )
    make(
        "llama-mha-untied-bf16",
        12,
        LlamaConfig,
        LlamaForCausalLM,
        dtype=torch.bfloat16,
        num_key_value_heads=4,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
    )
    make(
        "qwen2-bias",
        13,
        Qwen2Config,
        Qwen2ForCausalLM,
        num_key_value_heads=1,
        tie_word_embeddings=False,
        rope_theta=1e6,
    )


if __name__ == "__main__":
    sys.exit(main())
