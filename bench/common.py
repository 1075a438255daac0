"""What every part of the benchmark shares: the thread settings, interleaved timing, tables, the machine's load,
the prompts, and one timed decode and prefill for each engine."""

import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
THREAD_VARS = ("NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
SETTLE_S = 0.2  # pause after each timed call (see `interleaved`)


def set_threads(threads) -> int:
    """BLAS, OpenMP and Numba read their thread counts when they load (tqdm its settings): call before importing
    numpy. `threads` overrides the variables; without it, values already set are kept and the rest get every
    usable core."""
    os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF loading draws a tqdm bar of its own
    n = threads or len(os.sched_getaffinity(0))
    for var in THREAD_VARS:
        if threads or var not in os.environ:
            os.environ[var] = str(n)
    return n


def stat(samples):
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "n": len(samples)}


def fmt(s, digits=1):
    """'median [min, max]' of a stat."""
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}, {s['max']:.{digits}f}]"


def interleaved(fns: dict, reps: int) -> dict:
    """Call each fn once untimed (JIT, BLAS and torch warm-up), then `reps` rounds of every fn in turn, so drifts of
    the machine (other load, clocks) hit all contenders alike. The pause after each call lets the worker threads
    of the one just run (OpenMP spins after its work) go to sleep before the next starts. Each fn returns one
    number; returns {name: stat}."""
    for fn in fns.values():
        fn()
        time.sleep(SETTLE_S)
    samples = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            samples[name].append(fn())
            time.sleep(SETTLE_S)
    return {name: stat(v) for name, v in samples.items()}


def ratio(a, b) -> float:
    return a["median"] / b["median"]


def print_table(headers, rows):
    """A plain table: the first column left-aligned (labels), the others right-aligned."""
    rows = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    for cells in [headers, ["-" * w for w in widths], *rows]:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip())


def section(title):
    print(f"\n== {title} " + "=" * max(0, 100 - len(title)), flush=True)


class LoadMonitor:
    """CPU time other processes took while a section ran: the machine's busy time (/proc/stat) minus this
    process's and its children's (os.times), as a share of the cores. A benchmark sharing its cores measures the
    sharing: every section prints it, with the load average."""

    def __init__(self):
        self.sections, self.last = {}, self._snapshot()

    @staticmethod
    def _snapshot():
        try:
            f = [int(v) for v in open("/proc/stat").readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        hz, t = os.sysconf("SC_CLK_TCK"), os.times()
        return {
            "busy": (f[0] + f[1] + f[2] + f[5] + f[6] + f[7]) / hz,
            "wall": time.perf_counter(),
            "own": t.user + t.system + t.children_user + t.children_system,
        }

    def check(self, name):
        from radial_min import kernels

        now, before = self._snapshot(), self.last
        self.last = now
        load, pool = os.getloadavg()[0], "off (busy machine)" if kernels.machine_busy() else "on"
        if now is None or before is None:
            return print(f"[load average {load:.1f}; radial_min's thread pool {pool}]")
        capacity = (now["wall"] - before["wall"]) * len(os.sched_getaffinity(0))
        share = max(0.0, (now["busy"] - before["busy"]) - (now["own"] - before["own"])) / capacity
        self.sections[name] = {"other_share": share, "load_average": load, "pool": pool}
        print(
            f"[other processes took {100 * share:.0f}% of the CPUs during this section; load average {load:.1f}; "
            f"radial_min's thread pool {pool}"
            + ("; numbers disturbed: compare the ratios, measured interleaved]" if share > 0.05 else "]")
        )


def machine(threads, torch_mod) -> list:
    """Rows describing the machine, the versions and the thread counts every runtime uses."""
    import numba
    import numpy as np

    from radial_min import kernels

    cpu = (
        next(
            (ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
            platform.processor(),
        )
        if os.path.exists("/proc/cpuinfo")
        else platform.processor()
    )
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    rows = [
        ["CPU", f"{cpu}; logical CPUs: {os.cpu_count()}, usable: {len(os.sched_getaffinity(0))}"],
        ["RAM", f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB"],
        ["Python / numpy / numba", f"{platform.python_version()} / {np.__version__} / {numba.__version__}"],
        [
            "threads",
            f"{threads} (numba {numba.get_num_threads()}, "
            + ", ".join(f"{v}={os.environ.get(v)}" for v in THREAD_VARS[1:])
            + ")",
        ],
        ["radial_min matmul", f"{kernels.get_backend()} (kernels.set_backend; decode always kernels.matvec)"],
        ["load average at start", f"{os.getloadavg()[0]:.1f}"],
    ]
    busy = kernels.machine_busy()
    pool = f"for work above {kernels.PARALLEL_FROM:,} bytes (kernels.PARALLEL_FROM)"
    if busy:
        pool = "NOT USED: other processes leave one free core (kernels.free_cores): radial_min serial, torch 1 thread"
    rows.append(["thread pool", pool])
    if torch_mod is not None:
        import transformers

        torch_mod.set_num_threads(1 if busy else threads)  # like against like: one core each on a busy machine
        rows.append(
            [
                "torch / transformers",
                f"{torch_mod.__version__} / {transformers.__version__} ({torch_mod.get_num_threads()} threads)",
            ]
        )
    return rows


def import_transformers(wanted: bool):
    """(torch, transformers) when wanted and importable, else (None, None) after saying why."""
    if not wanted:
        return None, None
    try:
        import torch
        import transformers
    except ImportError:
        print(
            "transformers not installed: radial_min's figures only. To compare, install a CPU build of torch first, "
            "then transformers (pip install torch==2.13.0 transformers: the plain `torch` is a multi-GB CUDA build)"
        )
        return None, None
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return torch, transformers


# ----------------------------------------------------------------------------------------- timed generation


def prompt_ids(n: int, vocab: int, seed: int = 0, bos: int = 2):
    """BOS and n - 1 fixed pseudo-random ordinary token ids: the same prompt for both engines."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return np.concatenate([[bos], rng.integers(4, vocab, n - 1)]).astype(np.int64)


def decode_ours(model, ids, n_new, on_token=None, repetition_penalty=1.0):
    """Greedy generation -> (decode tokens/s, new tokens). `generate`'s on_token stamps each new token; the first
    comes out of the prefill, so first stamp to last = n_new - 1 decode steps (forward + sampling), prefill out."""
    import radial_min

    stamps = []

    def stamp(t):
        stamps.append(time.perf_counter())
        if on_token is not None:
            on_token(t)

    new = radial_min.generate(
        model, ids, n_new, stop_at_eos=False, on_token=stamp, repetition_penalty=repetition_penalty
    )
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]), new


class _Stamps:
    """A transformers streamer that only timestamps: `put` gets the prompt first, then each new token."""

    def __init__(self):
        self.times, self.tokens = [], []

    def put(self, value):
        self.times.append(time.perf_counter())
        self.tokens.append(value)

    def end(self):
        pass


def decode_hf(torch_mod, hf, ids, n_new):
    """transformers' greedy `generate(min_new_tokens=max_new_tokens=n_new)`, timed as `decode_ours`."""
    import numpy as np

    s, x = _Stamps(), torch_mod.from_numpy(ids)[None]
    with torch_mod.inference_mode():
        hf.generate(
            input_ids=x,
            attention_mask=torch_mod.ones_like(x),
            max_new_tokens=n_new,
            min_new_tokens=n_new,
            do_sample=False,
            streamer=s,
            pad_token_id=hf.config.pad_token_id,
        )
    t = s.times[1:]  # times[0]: the prompt, before the prefill
    return (len(t) - 1) / (t[-1] - t[0]), np.array([int(v.reshape(-1)[0]) for v in s.tokens[1:]])


def prefill_ours(model, ids) -> float:
    """Tokens/s of model.forward(ids, fresh cache, last_only=True): the prefill of generate."""
    cache = model.new_cache()
    t0 = time.perf_counter()
    model.forward(ids, cache, last_only=True)
    return len(ids) / (time.perf_counter() - t0)


def prefill_hf(torch_mod, hf, ids) -> float:
    """Tokens/s of one transformers forward with use_cache=True and the last position's logits only."""
    x = torch_mod.from_numpy(ids)[None]
    with torch_mod.inference_mode():
        t0 = time.perf_counter()
        hf(input_ids=x, use_cache=True, logits_to_keep=1)
        return len(ids) / (time.perf_counter() - t0)


def first_difference(a, b) -> int:
    """How many leading tokens two greedy generations share."""
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
