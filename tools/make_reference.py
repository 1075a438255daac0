"""Build the parity fixtures in tests/fixtures/: small random-weight OPT and ViT checkpoints covering every
layout and dtype the loader supports, each saved beside transformers' own outputs for it.

Dev-only: needs torch and transformers, which radial_min never imports. Set up once (torch first, so pip does
not pull a CUDA build), then run from the repo root:

    python -m venv .venv-ref && .venv-ref/bin/pip install torch==2.13.0 && .venv-ref/bin/pip install transformers pillow
    .venv-ref/bin/python tools/make_reference.py

Outputs are deterministic for a given torch/transformers version; the versions are written into each fixture.
"""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.torch import save_file
from transformers import OPTConfig, OPTForCausalLM, ViTConfig, ViTForImageClassification, ViTImageProcessor, ViTModel

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures"
SHARED = ROOT.parent / "shared" / "data"
VERSIONS = {"torch": torch.__version__, "transformers": transformers.__version__}


def randomize(model, seed):
    """Replace the default init (std 0.02, LN at 1/0) with O(1) weights, so logits are far apart and every
    parameter, norms and biases included, visibly matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) * (1.5 / fan_in**0.5 if "embed" not in name else 1.0))
    return model


def write_config(folder, rename_dtype_to=None):
    """transformers 5 writes `dtype`; the Hub's configs say `torch_dtype`. Optionally rewrite to the Hub form."""
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    if rename_dtype_to:
        cfg[rename_dtype_to] = cfg.pop("dtype", "float32")
    path.write_text(json.dumps(cfg, indent=2))


def state_dict_as_hub(model, dtype, bare=True, keep_lm_head=False):
    """The state dict as the facebook/opt-* repos store it: bare `decoder.*` keys, no lm_head (tied)."""
    sd = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight" and not keep_lm_head:
            continue
        if bare and k.startswith("model."):
            k = k[len("model.") :]
        sd[k] = v.detach().to(dtype).contiguous().clone()
    return sd


def opt_reference(folder, ids):
    """transformers' logits and 20 greedy tokens, computed in float32 from the checkpoint as saved."""
    model = OPTForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompt = torch.tensor(ids)[None]
    with torch.no_grad():
        logits = model(prompt).logits[0].numpy()
        greedy_eos = model.generate(prompt, max_new_tokens=20, do_sample=False)[0, len(ids) :]
        model.generation_config.eos_token_id = None  # all 20 tokens, even past an EOS
        greedy = model.generate(prompt, max_new_tokens=20, do_sample=False)[0, len(ids) :]
        greedy_rep = model.generate(prompt, max_new_tokens=20, do_sample=False, repetition_penalty=1.3)[0, len(ids) :]
    return {
        "input_ids": np.array(ids),
        "logits": logits,
        "greedy": greedy.numpy(),
        "greedy_eos": greedy_eos.numpy(),
        "greedy_rep1.3": greedy_rep.numpy(),
    }


def make_opt(name, seed, dtype=torch.float32, layout="save_pretrained", shard=None, config_key="dtype", **cfg):
    folder = OUT / name
    shutil.rmtree(folder, ignore_errors=True)
    base = dict(
        vocab_size=384,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        ffn_dim=64,
        max_position_embeddings=64,
        word_embed_proj_dim=32,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=2,
    )
    base.update(cfg)
    torch.manual_seed(seed)
    model = randomize(OPTForCausalLM(OPTConfig(**base)), seed).eval()
    if layout == "save_pretrained":  # transformers' own layout: model.decoder.*, lm_head dropped (tied)
        model.to(dtype).save_pretrained(folder, max_shard_size=shard or "50GB")
    else:
        model.config.dtype = dtype
        model.config.save_pretrained(folder)
        sd = state_dict_as_hub(model, dtype, keep_lm_head=(layout == "hub_with_lm_head"))
        if layout == "hub_bin":
            torch.save(sd, folder / "pytorch_model.bin")
        else:
            save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    write_config(folder, config_key if config_key != "dtype" else None)
    rng = np.random.default_rng(seed)
    ids = [2] + rng.integers(4, base["vocab_size"], size=11).tolist()
    ref = opt_reference(folder, ids)
    np.savez(folder / "reference.npz", **ref, **{f"version_{k}": v for k, v in VERSIONS.items()})
    print(f"{name}: greedy {ref['greedy'].tolist()}  eos-stopped {len(ref['greedy_eos'])} tokens")


def make_vit(name, seed, cls, dtype=torch.float32, processor=False, pool=True, **cfg):
    folder = OUT / name
    shutil.rmtree(folder, ignore_errors=True)
    base = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        num_channels=3,
    )
    base.update(cfg)
    torch.manual_seed(seed)
    extra = {} if cls is ViTForImageClassification else {"add_pooling_layer": pool}
    model = randomize(cls(ViTConfig(**base), **extra), seed).eval()
    model.to(dtype).save_pretrained(folder)
    model = cls.from_pretrained(folder, dtype=torch.float32, **extra).eval()
    rng = np.random.default_rng(seed)
    pixels = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    ref = {}
    if processor:  # real photos through transformers' own preprocessing (Pillow)
        from PIL import Image

        proc = ViTImageProcessor(size={"height": 32, "width": 32}, do_convert_rgb=True)
        proc.save_pretrained(folder)
        photos = ["chelsea.png", "brick.png", "rocket.jpg"]
        photo_pixels = np.concatenate(
            [proc(images=Image.open(SHARED / "images" / p), return_tensors="np")["pixel_values"] for p in photos]
        )
        ref["photo_pixels"], ref["photos"] = photo_pixels, np.array(photos)
        pixels = np.concatenate([pixels, photo_pixels])
    with torch.no_grad():
        out = model(torch.tensor(pixels))
    if cls is ViTForImageClassification:
        ref["output"] = out.logits.numpy()
    else:
        ref["output"] = (out.pooler_output if out.pooler_output is not None else out.last_hidden_state[:, 0]).numpy()
    np.savez(folder / "reference.npz", pixel_values=pixels, **ref, **{f"version_{k}": v for k, v in VERSIONS.items()})
    print(f"{name}: output {ref['output'].shape}")


def make_tokenizer_reference(n_lines=400):
    """Ids from transformers' GPT-2 tokenizer on OPT's real vocab for WikiText-2 lines (read from ../shared)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(SHARED / "opt-tokenizer")
    lines = (SHARED / "wikitext-2" / "test.txt").read_text(encoding="utf-8").split("\n")
    picked = [i for i, line in enumerate(lines) if line.strip()][:n_lines]
    extra = [
        "Hello world",
        "a </s> b <pad> <unk> <s>",
        "  leading spaces",
        "naïve café — “quotes” 日本語 🙂",
        "line\nbreak\ttab",
    ]
    ref = {
        "tokenizer": type(tok).__name__,
        "versions": VERSIONS,
        "wikitext_file": "wikitext-2/test.txt",
        "line_numbers": picked,
        "line_ids": [tok(lines[i]).input_ids for i in picked],
        "extra_texts": extra,
        "extra_ids": [tok(t).input_ids for t in extra],
        "extra_decoded": [tok.decode(tok(t).input_ids, skip_special_tokens=True) for t in extra],
    }
    (OUT / "tokenizer_reference.json").write_text(json.dumps(ref))
    print(f"tokenizer: {len(picked)} lines")


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    make_opt("opt-pre", 1)
    make_opt("opt-fp16-sharded", 2, dtype=torch.float16, shard="40KB", config_key="torch_dtype")
    make_opt("opt-bf16-hub", 3, dtype=torch.bfloat16, layout="hub_with_lm_head", config_key="torch_dtype")
    make_opt(
        "opt-350m-style",
        4,
        layout="hub",
        config_key="torch_dtype",
        do_layer_norm_before=False,
        word_embed_proj_dim=16,
        hidden_size=32,
    )
    make_opt("opt-nobias-gelu", 5, enable_bias=False, activation_function="gelu")
    make_opt("opt-hub-bin", 6, layout="hub_bin", config_key="torch_dtype")
    id2label = {i: f"class_{i}" for i in range(5)}
    make_vit(
        "vit-cls",
        7,
        ViTForImageClassification,
        processor=True,
        id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
    )
    make_vit("vit-model-bf16", 8, ViTModel, dtype=torch.bfloat16, qkv_bias=False, layer_norm_eps=1e-6)
    make_vit("vit-model-nopool", 9, ViTModel, pool=False)
    make_tokenizer_reference()


if __name__ == "__main__":
    sys.exit(main())
