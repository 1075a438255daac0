"""Shared helpers: random OPT models of any supported layout, built in memory from the loader's own spec."""
from pathlib import Path

import numpy as np

from radial_min.config import OPTConfig
from radial_min.opt import OPT, expected_tensors

FIXTURES = Path(__file__).parent / "fixtures"


def random_opt(seed=0, **overrides) -> OPT:
    """An OPT with O(1) random weights (so logits are well separated) for the given config overrides."""
    base = dict(vocab_size=61, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, ffn_dim=24, max_position_embeddings=48)
    cfg = OPTConfig(**{**base, **overrides})
    rng = np.random.default_rng(seed)
    required, optional, _ = expected_tensors(cfg)
    tensors = {}
    for name, shape in {**required, **optional}.items():
        if name.endswith("layer_norm.weight"):
            tensors[name] = 1.0 + 0.2 * rng.standard_normal(shape)
        elif len(shape) == 1:
            tensors[name] = 0.2 * rng.standard_normal(shape)
        else:
            tensors[name] = rng.standard_normal(shape) / (1.0 if "embed" in name else np.sqrt(shape[1]) / 1.5)
    return OPT(cfg, {k: v.astype(np.float32) for k, v in tensors.items()})
