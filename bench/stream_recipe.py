"""How long `profile --stream` takes for the paper's curve, OPT-125M ... OPT-66B, on this machine.

Each size's own block shapes are measured, not extrapolated: one attention and one FFN block of that width with
random float32 weights (a single block of OPT-66B is 1.4 / 2.7 GB; the whole model is not needed) run over
sequences of --seq-len tokens through `blocks.run_block`, the same call `profile --stream` makes, best of
--repeats. Reading a block (float16 from disk, widened to float32, built) is measured on the OPT-2.7B-shaped
random checkpoint of bench/stream_memory.py when it exists, and extrapolated to the other sizes by bytes. A
FLOP-based extrapolation from the OPT-2.7B shape is printed beside the direct measurement as a check.

    hours = layers x (t_att + t_ffn) x sequences + layers x (read_att + read_ffn)

    nice -n 10 python bench/stream_recipe.py                 # all eight sizes; about 3 GB at most in memory
    nice -n 10 python bench/stream_recipe.py --sizes opt-125m,opt-1.3b --sequences 64
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from radial_min.models import opt  # noqa: E402

from radial_min.analysis import stream  # noqa: E402
from radial_min.blocks import Rows, run_block  # noqa: E402
from radial_min.config import OPTConfig  # noqa: E402

SIZES = {  # layers, width, FFN width, heads, parameters: the facebook/opt-* configs
    "opt-125m": (12, 768, 3072, 12, 125e6), "opt-350m": (24, 1024, 4096, 16, 331e6),
    "opt-1.3b": (24, 2048, 8192, 32, 1.3e9), "opt-2.7b": (32, 2560, 10240, 32, 2.7e9),
    "opt-6.7b": (32, 4096, 16384, 32, 6.7e9), "opt-13b": (40, 5120, 20480, 40, 13e9),
    "opt-30b": (48, 7168, 28672, 56, 30e9), "opt-66b": (64, 9216, 36864, 72, 66e9),
}  # fmt: skip


def random_block(E, F, H, kind, rng):
    cfg = OPTConfig(hidden_size=E, ffn_dim=F, num_attention_heads=H, num_hidden_layers=1)
    p = "decoder.layers.0."

    def w(*shape):
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)

    if kind == "att":
        t = {p + f"self_attn.{x}_proj.weight": w(E, E) for x in ("q", "k", "v", "out")}
        t.update({p + f"self_attn.{x}_proj.bias": np.zeros(E, np.float32) for x in ("q", "k", "v", "out")})
        t.update(
            {
                p + "self_attn_layer_norm.weight": np.ones(E, np.float32),
                p + "self_attn_layer_norm.bias": np.zeros(E, np.float32),
            }
        )
    else:
        t = {
            p + "fc1.weight": w(F, E),
            p + "fc1.bias": np.zeros(F, np.float32),
            p + "fc2.weight": w(E, F),
            p + "fc2.bias": np.zeros(E, np.float32),
            p + "final_layer_norm.weight": np.ones(E, np.float32),
            p + "final_layer_norm.bias": np.zeros(E, np.float32),
        }
    return opt.make_block(cfg, t, 0, kind)


def seconds_per_sequence(block, E, T, n_seq, repeats, rng):
    xs = [rng.standard_normal((T, E), dtype=np.float32) for _ in range(n_seq)]
    pos = np.arange(T)
    run_block(0, block, xs[0], Rows(pos))  # compiles the kernels of these sizes (serial or parallel) on first use
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for x in xs:
            run_block(0, block, x, Rows(pos))
        best = min(best, (time.perf_counter() - t0) / n_seq)
    return best


def block_flops(E, F, T, kind):
    """Multiply-adds x 2 per sequence of T tokens: the matrices, plus causal attention's scores and sums."""
    return 2 * T * 4 * E * E + 2 * T * T * E if kind == "att" else 2 * T * 2 * E * F


def read_rate(big: Path):
    """Bytes on disk per second for reading, widening and building the first four blocks of a real checkpoint."""
    m = stream.StreamedModel(big)
    nbytes, seconds = 0, 0.0
    for b in (0, 1, 2, 3):
        t0 = time.perf_counter()
        m.load_block(b)
        seconds += time.perf_counter() - t0
        nbytes += m.block_bytes(b) // 2  # float16 on disk
    return nbytes / seconds


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=",".join(SIZES))
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--measure-sequences", type=int, default=1, help="sequences timed per block")
    ap.add_argument("--sequences", type=int, default=64, help="sequences of the recipe's profile run")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--big", default=str(ROOT / "runs" / "random-opt-2.7b"))
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    T = args.seq_len
    load0 = os.getloadavg()
    rate = read_rate(Path(args.big)) if Path(args.big).is_dir() else None
    rows = {}
    for name in args.sizes.split(","):
        L, E, F, H, params = SIZES[name]
        row = {"layers": L, "width": E}
        for kind in ("att", "ffn"):
            block = random_block(E, F, H, kind, rng)
            row[f"s_{kind}"] = seconds_per_sequence(block, E, T, args.measure_sequences, args.repeats, rng)
            row[f"gflops_{kind}"] = block_flops(E, F, T, kind) / row[f"s_{kind}"] / 1e9
            row[f"read_s_{kind}"] = (2 * (4 * E * E if kind == "att" else 2 * E * F)) / rate if rate else None
            del block
        compute = L * (row["s_att"] + row["s_ffn"]) * args.sequences
        reading = L * (row["read_s_att"] + row["read_s_ffn"]) if rate else 0.0
        row.update(params=params, hours=(compute + reading) / 3600, read_hours=reading / 3600)
        rows[name] = row
        print(
            name,
            json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}),
            file=sys.stderr,
            flush=True,
        )
    if "opt-2.7b" in rows:  # the check: every size from the 2.7B shape's GFLOP/s
        ref = rows["opt-2.7b"]
        for name, row in rows.items():
            L, E, F, H, _ = SIZES[name]
            s = sum(block_flops(E, F, T, k) / (ref[f"gflops_{k}"] * 1e9) for k in ("att", "ffn"))
            row["hours_from_2.7b_flops"] = (L * s * args.sequences + row["read_hours"] * 3600) / 3600
    print(
        f"load average {load0[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end (2 cores); "
        f"reading {rate / 1e9:.2f} GB/s"
        if rate
        else "reading not measured (no --big checkpoint)"
    )
    head = f"{'model':<10}{'layers':>7}{'width':>7}{'att s/seq':>11}{'ffn s/seq':>11}{'att GF/s':>10}{'ffn GF/s':>10}"
    print(head + f"{'hours':>8}{'(flops)':>9}")
    for name, r in rows.items():
        flops_h = r.get("hours_from_2.7b_flops", float("nan"))
        print(
            f"{name:<10}{r['layers']:>7}{r['width']:>7}{r['s_att']:11.3f}{r['s_ffn']:11.3f}{r['gflops_att']:10.1f}"
            f"{r['gflops_ffn']:10.1f}{r['hours']:8.2f}{flops_h:9.2f}"
        )
    print(f"(hours: profile --stream of {args.sequences} x {T} tokens, compute + reading, one model at a time)")


if __name__ == "__main__":
    main()
