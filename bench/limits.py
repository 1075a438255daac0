"""radial_min against this machine's own limits: decode against the memory bandwidth it reads its weights with
(the roofline: bandwidth / bytes per token), prefill against NumPy's sgemm on the same shapes; weights memory and
peak memory of a fresh process; warm start; and what int8 weights cost in quality on the shipped model."""

import json
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
from common import ROOT, prompt_ids, print_table, section
from numba import njit, prange

import radial_min


@njit(parallel=True, fastmath=True)
def _sum_read(a):
    """A prange reduction reading every byte of a float32 array once, split across the threads."""
    s = np.float32(0.0)
    for i in prange(a.size):
        s += a[i]
    return s


def bandwidth(mib=1024, passes=10) -> float:
    """DRAM read bandwidth in GB/s: the best of `passes` sums over `mib` MiB, far beyond the caches."""
    a = np.ones(mib * 2**20 // 4, np.float32)  # written once, so every page is mapped
    _sum_read(a)
    best = float("inf")
    for _ in range(passes):
        t0 = time.perf_counter()
        _sum_read(a)
        best = min(best, time.perf_counter() - t0)
    return a.nbytes / best / 1e9


def decode_bytes(model) -> int:
    """Bytes one decode step reads: every array held but a position table and an untied token embedding, of which
    it reads one row."""
    n = sum(a.nbytes for a in model.arrays())
    positions = getattr(model, "embed_positions", None)
    n -= 0 if positions is None else positions.weight.nbytes
    return n - (model.embed_tokens.weight.nbytes if model.lm_head.weight is not model.embed_tokens.weight else 0)


def prefill_flops(cfg, T: int) -> int:
    """2*T*L*(4*E^2 + 2*E*F) block matmuls + 2*V*E the LM head's one row + 2*L*E*T*(T+1) causal attention."""
    E, F, L, V = cfg.hidden_size, cfg.ffn_dim, cfg.num_hidden_layers, cfg.vocab_size
    return 2 * T * L * (4 * E * E + 2 * E * F) + 2 * V * E + 2 * L * E * T * (T + 1)


def sgemm(cfg, T: int, reps: int) -> dict:
    """GFLOP/s of one layer's four prefill matmuls (qkv, out, fc1, fc2), [T, in] x [out, in].T: NumPy's BLAS and
    radial_min's kernels.linear, median of the repetitions, in total."""
    from radial_min import kernels

    E, F = cfg.hidden_size, cfg.ffn_dim
    rng = np.random.default_rng(0)
    pairs = [
        (rng.standard_normal((T, i), np.float32), rng.standard_normal((o, i), np.float32))
        for i, o in ((E, 3 * E), (E, E), (E, F), (F, E))
    ]
    flops = sum(2 * T * w.shape[0] * w.shape[1] for _, w in pairs)
    out = {}
    for name, fn in (("numpy sgemm", lambda a, w: a @ w.T), ("radial_min matmul", kernels.linear)):
        times = []
        for _ in range(max(reps, 5) + 1):
            t0 = time.perf_counter()
            for a, w in pairs:
                fn(a, w)
            times.append(time.perf_counter() - t0)
        out[name] = flops / statistics.median(times[1:]) / 1e9
    return out


def run_limits(speed: dict, models: dict, sz) -> dict:
    """Decode rooflines for each dtype of section 2a and prefill's GFLOP/s, from the tokens/s measured there."""
    section("3. Against the machine's limits (OPT-125M shapes)")
    bw = bandwidth()
    rows, res = [], {"bandwidth_GB_s": bw, "decode": {}}
    for dtype, model in models.items():
        nbytes, tps = decode_bytes(model), speed["decode"][dtype]["median"]
        res["decode"][dtype] = {"bytes": nbytes, "roofline_tok_s": bw * 1e9 / nbytes, "share": tps * nbytes / 1e9 / bw}
        rows.append(
            [
                f"decode, {dtype} weights",
                f"{nbytes / 1e6:.1f}",
                f"{tps:.1f}",
                f"{bw * 1e9 / nbytes:.1f}",
                f"{100 * tps * nbytes / 1e9 / bw:.0f}%",
            ]
        )
    print_table(["", "MB read per token", "tokens/s (2a)", "roofline tokens/s", "of the roofline"], rows)
    print(
        f"roofline = measured memory read bandwidth ({bw:.1f} GB/s: a Numba prange sum over 1 GiB, best of 10) /\n"
        "bytes per token (every weight array once: blocks, final norm, LM head; the KV cache not counted)."
    )
    cfg = next(iter(models.values())).config
    gemm = sgemm(cfg, sz["prefill"], sz["reps"])
    T = sz["prefill"]
    res["prefill_GFLOP_s"] = prefill_flops(cfg, T) * speed["prefill"]["float32"]["median"] / T / 1e9
    res["sgemm_GFLOP_s"] = gemm
    rows = [[f"radial_min prefill, T={T} (2a)", f"{res['prefill_GFLOP_s']:.1f}"]]
    rows += [[f"{k}, one layer's four matmuls", f"{v:.1f}"] for k, v in gemm.items()]
    print_table(["prefill, float32", "GFLOP/s"], rows)
    print("prefill FLOPs = 2*T*L*(4*E^2 + 2*E*F) + 2*V*E + 2*L*E*T*(T+1) (causal attention pairs only)")
    return res


# ----------------------------------------------------------------------------------------------- memory


_PROBE = """
import json, sys, time
t0 = time.perf_counter()
sys.path.insert(0, {root!r})
import numpy as np
import radial_min
t1 = time.perf_counter()
model = radial_min.load({model!r}, weights_dtype={dtype!r})
t2 = time.perf_counter()
radial_min.generate(model, np.array({ids!r}), {n_new}, stop_at_eos=False)
t3 = time.perf_counter()
hwm = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
print(json.dumps({{"import_s": t1 - t0, "load_s": t2 - t1, "generate_s": t3 - t2, "peak_bytes": hwm}}))
"""


def probe(path, dtype, ids, n_new, env=None) -> dict:
    """Import + load + generate in a fresh Python: its times and peak resident memory (VmHWM, its own)."""
    code = _PROBE.format(root=str(ROOT), model=str(path), dtype=dtype, ids=ids.tolist(), n_new=n_new)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if p.returncode:
        raise RuntimeError(f"probe failed:\n{p.stderr}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def run_memory(path, models: dict, sz) -> dict:
    """Weights held per dtype against float32; peak memory of a fresh process (load + 8 tokens); warm start
    (import + load + first token, Numba's cache warm) and the cold one (a new, empty NUMBA_CACHE_DIR)."""
    import os

    section("4. Memory and start-up (fresh processes, except the weights column)")
    n_params = next(iter(models.values())).n_params
    ids, rows, res = prompt_ids(sz["prompt"], next(iter(models.values())).config.vocab_size), [], {}
    with tempfile.TemporaryDirectory(prefix="bench-numba-cache-") as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache}
        cold = probe(path, "float32", ids[:8], 1, env)
    for dtype, model in models.items():
        held = sum(a.nbytes for a in model.arrays())
        run = probe(path, dtype, ids, sz["rss_new"])
        warm = [probe(path, dtype, ids[:8], 1) for _ in range(3)]
        start = statistics.median(w["import_s"] + w["load_s"] + w["generate_s"] for w in warm)
        res[dtype] = {
            "weights_bytes": held,
            "weights_ratio": held / (4 * n_params),
            "peak_bytes": run["peak_bytes"],
            "warm_start_s": start,
        }
        rows.append(
            [
                dtype,
                f"{held / 1e6:.0f} MB = {held / (4 * n_params):.2f}x",
                f"{run['peak_bytes'] / 1e6:.0f} MB",
                f"{start:.2f} s",
            ]
        )
    print_table(["weights", "held (x float32)", f"peak RSS, load + {sz['rss_new']} tokens", "warm start"], rows)
    res["cold_start_s"] = cold["import_s"] + cold["load_s"] + cold["generate_s"]
    print(
        f"warm start = import + load + first token, median of 3 (cold, every kernel compiled: "
        f"{res['cold_start_s']:.1f} s).\n"
        f"float32 weights = 4 bytes x {n_params / 1e6:.1f}M parameters; MB = 1e6 bytes; peak = the child's VmHWM."
    )
    return res


def run_int8_quality(sz) -> dict:
    """The shipped model in int8 against float32: WikiText-2 test perplexity (the full stream, packed in 256-token
    sequences as docs/training.md scores it; --quick: the first 16) and 60 greedy tokens of the CLI's prompt."""
    from radial_min import data
    from radial_min.analysis.oracle import perplexity

    section("5. int8 weights on the shipped model: perplexity and text")
    models = {d: radial_min.load(radial_min.io.hub.DEFAULT_MODEL, weights_dtype=d) for d in ("float32", "int8")}
    tok = radial_min.Tokenizer(models["float32"].path)
    try:
        stream = data.tokenize_documents(tok, data.default_corpus()[1]["wiki"])  # WikiText-2 test, by article
    except radial_min.RadialError as e:
        print(f"skipped: {e}")
        return {}
    seqs = data.pack(stream, 256, 16 if sz["quick"] else None)
    ppl = {d: perplexity(m, seqs) for d, m in models.items()}
    ids = tok.encode("And God said")
    text = {d: radial_min.generate(m, ids, 60, repetition_penalty=1.2) for d, m in models.items()}
    same = int(np.argmax(text["int8"] != text["float32"])) if (text["int8"] != text["float32"]).any() else 60
    print_table(
        ["weights", f"WikiText-2 test perplexity ({seqs[:, 1:].size:,} tokens)"],
        [[d, f"{p:.3f}"] for d, p in ppl.items()],
    )
    print(
        f'int8 / float32 perplexity: {ppl["int8"] / ppl["float32"]:.4f}; greedy text of "And God said" (60 tokens, '
        f"repetition penalty 1.2): {same}/60 tokens the same"
    )
    return {"ppl": ppl, "same_tokens": same, "ratio": ppl["int8"] / ppl["float32"]}
