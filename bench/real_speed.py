"""Routed against sequential generation on a real model, in one run, interleaved: decode tokens/s (greedy, the same
prompts and number of new tokens), prefill tokens/s of a longer prompt, the blocks each decoded token ran, the ideal
speed-up those blocks allow by the weight bytes a token reads, and how many greedy tokens the routed text shares
with the model's; for each weight storage (float32, int8, the file's own blocks) and thread count.

    python bench/real_speed.py --model $G --router weights/smollm2-135m/router-attention --out runs/real/speed.json

Decode reads every weight of the blocks a token runs once per token, so its time follows the bytes read: the ideal
speed-up of a route is (bytes of the sequential token) / (bytes of the routed token), counting each block's weights,
the key/value rows a skipped attention block still multiplies under the fill rule, the router's weights once (a few
hundred KB: after the token's first decision they are read from the core's cache, not memory), and the LM head
(tied to the embedding in SmolLM2, read whole for every token). `--skip-share` adds scripted routes that skip that
share of the blocks for every decoded token (the static choice of bench/real_pareto.py's static_choices.json if
given, by default the lowest-ratio one, else evenly spread attention blocks) to measure the mechanism apart from a
router; `--static-method angular-contiguous` (or sleb-greedy) skips FFN blocks too.
Contenders alternate within each round, so the machine's load hits them alike; the load average is recorded.
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
import numba  # noqa: E402

import radial_min  # noqa: E402
from radial_min import data, kernels  # noqa: E402
from radial_min.radial import RadialNetwork  # noqa: E402
from radial_min.errors import CheckpointError  # noqa: E402
from radial_min.router import Router, Scripted  # noqa: E402


def nbytes(a) -> int:
    return int(getattr(a, "nbytes", 0))


def block_bytes(block) -> int:
    return sum(nbytes(a) for m in block.modules() for a in m.params().values())


def kv_bytes(block) -> int:
    kv = block.kv_projection() if hasattr(block, "kv_projection") else None
    return 0 if kv is None else nbytes(kv.weight) + nbytes(kv.bias)


def token_bytes(model, route, router_bytes=0) -> int:
    """Weight bytes one decoded token reads along `route` (module doc)."""
    run = set(route)
    total = model.lm_head.weight.nbytes if hasattr(model.lm_head.weight, "nbytes") else 0
    total += nbytes(model.final_norm.weight) + model.config.hidden_size * 4  # final norm, one embedding row
    for b, block in enumerate(model.blocks):
        total += block_bytes(block) if b in run else kv_bytes(block)
    return total + router_bytes


def timed_generate(runner, ids, n_new):
    """(decode tokens/s, new ids): from the first new token to the last, prefill excluded."""
    stamps = []
    new = radial_min.generate(
        runner, ids, n_new, stop_at_eos=False, on_token=lambda t: stamps.append(time.perf_counter())
    )
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]), np.asarray(new)


def timed_prefill(runner, ids):
    t0 = time.perf_counter()
    cache = runner.new_cache()
    runner.forward(ids, cache, last_only=True)
    return len(ids) / (time.perf_counter() - t0)


def scripted_skip(model, share, choices_path, positions, method="lowest-ratio"):
    """Routes skipping round(share * N) blocks for every position after the first (module doc)."""
    n = len(model.blocks)
    k = round(share * n)
    dropped = None
    if choices_path and Path(choices_path).is_file():
        choices = json.loads(Path(choices_path).read_text())
        if method not in choices:
            sys.exit(f"error: --static-method {method}: not in {choices_path} (it has {', '.join(choices)})")
        dropped = choices[method].get(str(k))
    if dropped is None:
        att = [i for i, b in enumerate(model.blocks) if b.kind == "att"][2:]
        dropped = att[:: max(1, len(att) // k)][:k]
    route = [b for b in range(n) if b not in set(dropped)]
    return Scripted([list(range(n))] + [route] * (positions - 1), n), dropped


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model folder or .gguf file")
    p.add_argument(
        "--router",
        required=True,
        help="a router: its path without ending (as `generate --router`), or a folder "
        "holding router.json + router.safetensors",
    )
    p.add_argument("--dtypes", default="float32,int8,native", help="weight storages (default: %(default)s)")
    p.add_argument("--threads", default="1,2", help="thread counts (default: %(default)s)")
    p.add_argument("--prompts", type=int, default=2, help="WikiText-2 test sequences whose start is a prompt")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new", type=int, default=64, help="new tokens per generation (default: %(default)s)")
    p.add_argument("--prefill-len", type=int, default=256, help="tokens of the timed prefill (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of every contender (default: %(default)s)")
    p.add_argument("--skip-share", type=float, default=0.2, help="scripted routes' share of blocks skipped, 0: none")
    p.add_argument("--static-choices", default=None, help="bench/real_pareto.py's static_choices.json")
    p.add_argument("--static-method", default="lowest-ratio", help="the scripted routes' choice in it (%(default)s)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    tok = radial_min.Tokenizer(args.model)
    seqs = data.pack(tok.encode(data.read_text(data.default_text("test"))), 256, max(args.prompts, 1) + 1)
    prompts = [s[: args.prompt_len] for s in seqs[: args.prompts]]
    long_prompt = seqs[-1][: args.prefill_len]
    router_path = Path(args.router) / "router" if Path(args.router).is_dir() else Path(args.router)
    try:
        router = Router.load(router_path)  # one router for every storage: it reads the model's states only
    except CheckpointError as e:
        sys.exit(f"error: --router {args.router}: {e}")
    router_bytes = sum(a.nbytes for a in router.params.values())
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    flags = open("/proc/cpuinfo").read()
    isa = [f for f in ("avx2", "avx512f", "amx_tile") if f" {f}" in flags]
    result = {"cpu": cpu, "isa": isa, "cores": os.cpu_count(), "load_average_start": os.getloadavg(), "runs": []}
    print(f"{cpu} ({', '.join(isa)}), {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f}", flush=True)
    for dtype in args.dtypes.split(","):
        model = radial_min.load(args.model, weights_dtype=dtype)
        contenders = {"routed": lambda m=model, r=router: RadialNetwork(m, r, kv_rule="fill")}
        dropped = None
        if args.skip_share:
            positions = max(args.prompt_len + args.new, args.prefill_len) + 1  # a generation, the timed prefill
            script, dropped = scripted_skip(model, args.skip_share, args.static_choices, positions, args.static_method)
            contenders[f"scripted {args.skip_share:.0%}"] = lambda m=model, s=script: RadialNetwork(
                m, s, kv_rule="fill"
            )
        seq_bytes = token_bytes(model, range(len(model.blocks)))
        head_bytes = nbytes(model.lm_head.weight)
        for threads in map(int, args.threads.split(",")):
            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
            busy = kernels.machine_busy()
            for name, make in contenders.items():  # warm-up: compile, caches
                radial_min.generate(make(), prompts[0], 2, stop_at_eos=False)
            radial_min.generate(model, prompts[0], 2, stop_at_eos=False)
            rows = {name: [] for name in ["sequential", *contenders]}
            equal, routes = {name: [] for name in contenders}, {name: [] for name in contenders}
            for _ in range(args.rounds):
                for prompt in prompts:
                    seq_rate, seq_new = timed_generate(model, prompt, args.new)
                    rows["sequential"].append((seq_rate, timed_prefill(model.sequential, long_prompt)))
                    for name, make in contenders.items():
                        net = make()
                        rate, new = timed_generate(net, prompt, args.new)
                        routes[name] += net.routes[len(prompt) :]  # the decoded tokens' routes
                        rows[name].append((rate, timed_prefill(make(), long_prompt)))
                        equal[name].append(float((new == seq_new).mean()))
            seq = np.array(rows["sequential"])
            for name in contenders:
                a = np.array(rows[name])
                depth = float(np.mean([len(r) for r in routes[name]]))
                rb = router_bytes if name == "routed" else 0  # scripted routes need no router
                routed_bytes = float(np.mean([token_bytes(model, r, rb) for r in routes[name]]))
                ideal = seq_bytes / routed_bytes
                run = {
                    "dtype": dtype,
                    "threads": threads,
                    "thread_pool": "off (one thread: kernels.free_cores)" if busy else "on",
                    "contender": name,
                    "decode_tok_s": {"sequential": float(np.median(seq[:, 0])), "routed": float(np.median(a[:, 0]))},
                    "decode_ratio_median": float(np.median(a[:, 0] / seq[:, 0])),
                    "decode_ratio_range": [float((a[:, 0] / seq[:, 0]).min()), float((a[:, 0] / seq[:, 0]).max())],
                    "prefill_tok_s": {"sequential": float(np.median(seq[:, 1])), "routed": float(np.median(a[:, 1]))},
                    "prefill_ratio_median": float(np.median(a[:, 1] / seq[:, 1])),
                    "blocks_per_decoded_token": depth,
                    "ideal_from_bytes": float(ideal),
                    "token_bytes": {"sequential": seq_bytes, "routed": routed_bytes, "lm_head": head_bytes},
                    "ideal_from_blocks": len(model.blocks) / depth,
                    "tokens_equal_share": float(np.mean(equal[name])),
                    "load_average": os.getloadavg()[0],
                }
                if name != "routed":
                    run["dropped"] = [model.blocks[b].name for b in dropped]
                result["runs"].append(run)
                print(
                    f"{dtype:>8} {threads}t pool {run['thread_pool']:<3} {name:<14} "
                    f"decode {run['decode_tok_s']['routed']:6.1f} "
                    f"vs {run['decode_tok_s']['sequential']:6.1f} tok/s = {run['decode_ratio_median']:.2f}x "
                    f"({run['decode_ratio_range'][0]:.2f}-{run['decode_ratio_range'][1]:.2f}); ideal "
                    f"{ideal:.2f}x ({depth:.1f} blocks); prefill {run['prefill_ratio_median']:.2f}x; "
                    f"tokens equal {run['tokens_equal_share']:.0%}; load {run['load_average']:.1f}",
                    flush=True,
                )
    result["load_average_end"] = os.getloadavg()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
