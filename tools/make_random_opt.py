"""Write a random-weight OPT checkpoint with real OPT shapes and OPT's real tokenizer, for speed benchmarks and
for showing what profiling says of an untrained model. NumPy only (no torch).

    python tools/make_random_opt.py                      # weights/random-opt-125m (OPT-125M shapes, ~500 MB)
    python tools/make_random_opt.py --layers 4 --hidden 256 --out weights/random-opt-small

Weights follow our trainer's GPT-2-style init (N(0, 0.02), residual projections scaled by 1/sqrt(2L)).
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from radial_min.io.checkpoint import write_safetensors  # noqa: E402
from radial_min.config import OPTConfig, config_to_dict  # noqa: E402
from radial_min.data import SHARED  # noqa: E402
from radial_min.models.opt import init_tensors  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "weights" / "random-opt-125m"))
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--max-positions", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    cfg = OPTConfig(
        vocab_size=50272,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        ffn_dim=4 * args.hidden,
        max_position_embeddings=args.max_positions,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    params = init_tensors(cfg, args.seed)
    write_safetensors(out / "model.safetensors", {"model." + k: v for k, v in params.items()}, {"format": "pt"})
    (out / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2))
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(SHARED / "opt-tokenizer" / name, out / name)
    print(f"wrote {out} ({sum(a.size for a in params.values()) / 1e6:.1f}M parameters)")


if __name__ == "__main__":
    main()
