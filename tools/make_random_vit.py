"""Write a random-weight ViTForImageClassification checkpoint at real image shapes (224 px, 16 px patches), for
profiling ViT blocks on real photos without downloadable weights. NumPy only (no torch).

    python tools/make_random_vit.py                                  # weights/random-vit-tiny: ViT-Ti/16 shapes
    python tools/make_random_vit.py --hidden 768 --layers 12 --heads 12 --out weights/random-vit-base

Weights: N(0, 0.02) like transformers' init, unit layer norms, 1000 labels named label_0 ... label_999.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from radial_min.io.checkpoint import write_safetensors  # noqa: E402
from radial_min.config import ViTConfig  # noqa: E402
from radial_min.models.vit import expected_tensors  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "weights" / "random-vit-tiny"))
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--labels", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    id2label = {str(i): f"label_{i}" for i in range(args.labels)}
    cfg_dict = {
        "model_type": "vit",
        "architectures": ["ViTForImageClassification"],
        "hidden_size": args.hidden,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "intermediate_size": 4 * args.hidden,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-12,
        "image_size": 224,
        "patch_size": 16,
        "num_channels": 3,
        "qkv_bias": True,
        "id2label": id2label,
        "label2id": {v: int(k) for k, v in id2label.items()},
        "torch_dtype": "float32",
    }
    fields = {k: v for k, v in cfg_dict.items() if k not in ("label2id", "torch_dtype")}
    cfg = ViTConfig(**fields | {"id2label": {int(k): v for k, v in id2label.items()}})
    rng = np.random.default_rng(args.seed)
    required, optional, _ = expected_tensors(cfg)
    tensors = {}
    for name, shape in required.items():
        if "layernorm" in name and name.endswith("weight"):
            tensors[name] = np.ones(shape, np.float32)
        elif name.endswith("bias"):
            tensors[name] = np.zeros(shape, np.float32)
        else:
            tensors[name] = (0.02 * rng.standard_normal(shape)).astype(np.float32)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prefixed = {(n if n.startswith("classifier") else "vit." + n): a for n, a in tensors.items()}
    write_safetensors(out / "model.safetensors", prefixed, {"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg_dict, indent=2))
    preprocessor = {
        "do_resize": True,
        "size": {"height": 224, "width": 224},
        "resample": 2,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "image_processor_type": "ViTImageProcessor",
    }
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    print(f"wrote {out} ({sum(a.size for a in tensors.values()) / 1e6:.1f}M parameters)")


if __name__ == "__main__":
    main()
