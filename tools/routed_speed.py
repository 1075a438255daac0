"""Routed generation against sequential generation, interleaved in one run: the same prompts, greedy, the same
number of new tokens, alternating sequential and routed (RadialNetwork, unified per-layer KV cache) so that both
see the same machine load. Prefill (the prompt) and decode (every later token) are timed apart from the
token callback; the load average is printed before and after. A ratio above 1 means routing is faster.

    python tools/routed_speed.py --model <model folder or .gguf> --router runs/router-tau0.1 --repeats 3
"""

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import radial_min  # noqa: E402
from radial_min import data  # noqa: E402
from radial_min.errors import count  # noqa: E402
from radial_min.radial import RadialNetwork  # noqa: E402
from radial_min.router import Router  # noqa: E402


def timed_generate(runner, ids, n_new):
    """(prefill seconds, decode tokens/s, new ids): the first callback ends the prefill, the last the decode."""
    stamps = []
    t0 = time.perf_counter()
    new = radial_min.generate(
        runner, ids, n_new, stop_at_eos=False, on_token=lambda t: stamps.append(time.perf_counter())
    )
    return stamps[0] - t0, (len(stamps) - 1) / (stamps[-1] - stamps[0]), new


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model folder or .gguf file")
    p.add_argument("--router", required=True, help="a train-router --out folder (its router.json/.safetensors)")
    p.add_argument(
        "--prompts",
        type=int,
        default=2,
        help="prompts: the first --prompt-len tokens of this many "
        "WikiText-2 test sequences of 256 (default: %(default)s)",
    )
    p.add_argument("--prompt-len", type=int, default=32, help="tokens per prompt (default: %(default)s)")
    p.add_argument("--new", type=int, default=64, help="new tokens per generation (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="rounds of (sequential, routed) (default: %(default)s)")
    args = p.parse_args(argv)
    model, tok = radial_min.load(args.model), radial_min.Tokenizer(args.model)
    router_path = Path(args.router) / "router" if Path(args.router).is_dir() else Path(args.router)
    router = Router.load(router_path)
    seqs = data.pack(tok.encode(data.read_text(data.default_text("test"))), 256, args.prompts)
    prompts = [s[: args.prompt_len] for s in seqs]
    print(
        f"{model.path.name}, router {router_path} (tau {router.config.tau}, {router.config.kv_rule}); "
        f"{len(prompts)} prompts x {args.prompt_len} tokens, {args.new} new tokens, greedy"
    )
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {count(os.cpu_count(), 'core')}")
    radial_min.generate(model, prompts[0], 2)  # compile and warm both paths before timing
    radial_min.generate(RadialNetwork(model, router), prompts[0], 2)
    rows = []
    for r in range(args.repeats):
        for i, prompt in enumerate(prompts):
            seq = timed_generate(model, prompt, args.new)
            net = RadialNetwork(model, router)
            routed = timed_generate(net, prompt, args.new)
            depth = np.mean([len(route) for route in net.routes[len(prompt) :]])  # the decode steps' tokens
            same = int(np.sum(seq[2] == routed[2]))
            rows.append((seq[0], seq[1], routed[0], routed[1], depth))
            print(
                f"round {r + 1} prompt {i + 1}: sequential prefill {seq[0]:6.2f} s, decode {seq[1]:6.2f} tok/s | "
                f"routed prefill {routed[0]:6.2f} s, decode {routed[1]:6.2f} tok/s, {depth:.1f} of "
                f"{len(model.blocks)} blocks | decode ratio {routed[1] / seq[1]:.2f}x; "
                f"{same}/{args.new} tokens equal"
            )
    a = np.array(rows)
    n, ratio = len(model.blocks), a[:, 3] / a[:, 1]
    print(
        f"median decode: sequential {np.median(a[:, 1]):.2f} tok/s, routed {np.median(a[:, 3]):.2f} tok/s "
        f"({np.median(ratio):.2f}x, per-pair ratios {ratio.min():.2f}-{ratio.max():.2f}); "
        f"routed decode ran {a[:, 4].mean():.1f} of {n} blocks per token "
        f"(ideal speed-up from blocks alone {n / a[:, 4].mean():.2f}x)"
    )
    print(
        f"median prefill of {args.prompt_len} tokens: sequential {np.median(a[:, 0]):.2f} s, routed "
        f"{np.median(a[:, 2]):.2f} s (routed: "
        + (
            "the prompt's tokens together, block by block)"
            if RadialNetwork(model, router).routes_together
            else "token by token)"
        )
    )
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    sys.exit(main())
