"""Write a random-weight OPT checkpoint of real large shapes (default OPT-2.7B) as float16 safetensors shards, one
layer per shard, without ever holding more than one layer in memory: a model larger than memory, for
`bench/stream_memory.py`. NumPy only. Weights are N(0, 0.02) draws from a pool of 4M values, repeated to fill each
tensor (drawing 2.7B fresh numbers takes long on a busy machine); only the shapes matter here.

    python tools/make_big_random_opt.py --out runs/random-opt-2.7b      # ~5.3 GB on disk
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from radial_min.io.checkpoint import write_safetensors  # noqa: E402
from radial_min.config import OPTConfig, config_to_dict  # noqa: E402
from radial_min.data import SHARED  # noqa: E402
from radial_min.models.opt import POSITION_OFFSET  # noqa: E402


def layer_tensors(w, i: int, E: int, F: int) -> dict:
    p = f"model.decoder.layers.{i}."

    t = {p + f"self_attn.{x}_proj.weight": w(E, E) for x in ("q", "k", "v", "out")}
    t.update({p + f"self_attn.{x}_proj.bias": np.zeros(E, np.float16) for x in ("q", "k", "v", "out")})
    t.update(
        {
            p + "fc1.weight": w(F, E),
            p + "fc1.bias": np.zeros(F, np.float16),
            p + "fc2.weight": w(E, F),
            p + "fc2.bias": np.zeros(E, np.float16),
        }
    )
    for ln in ("self_attn_layer_norm", "final_layer_norm"):
        t[p + ln + ".weight"], t[p + ln + ".bias"] = np.ones(E, np.float16), np.zeros(E, np.float16)
    return t


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "runs" / "random-opt-2.7b"))
    p.add_argument("--hidden", type=int, default=2560)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--max-positions", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    E, L = args.hidden, args.layers
    cfg = OPTConfig(
        vocab_size=50272,
        hidden_size=E,
        num_hidden_layers=L,
        num_attention_heads=args.heads,
        ffn_dim=4 * E,
        max_position_embeddings=args.max_positions,
        dtype="float16",
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    pool = (rng.standard_normal(1 << 22, np.float32) * 0.02).astype(np.float16)

    def w(*shape):  # a random start in the pool, repeated to the tensor's size
        return np.resize(np.roll(pool, int(rng.integers(len(pool)))), shape)

    n = L + 1
    shards = {f"model-{k + 1:05d}-of-{n:05d}.safetensors": k for k in range(n)}
    weight_map = {}
    for name, k in shards.items():
        if k == 0:
            t = {
                "model.decoder.embed_tokens.weight": w(cfg.vocab_size, E),
                "model.decoder.embed_positions.weight": w(args.max_positions + POSITION_OFFSET, E),
                "model.decoder.final_layer_norm.weight": np.ones(E, np.float16),
                "model.decoder.final_layer_norm.bias": np.zeros(E, np.float16),
            }
        else:
            t = layer_tensors(w, k - 1, E, 4 * E)
        write_safetensors(out / name, t, {"format": "pt"})
        weight_map.update({n_: name for n_ in t})
        print(f"{name} ({sum(a.nbytes for a in t.values()) / 2**20:.0f} MiB)", file=sys.stderr)
        del t
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    (out / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2))
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        if (SHARED / "opt-tokenizer" / name).is_file():
            shutil.copy(SHARED / "opt-tokenizer" / name, out / name)
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
