"""Mutation check: break key lines of the engine one at a time, in a copy of the tree, and check the tests fail.

    python tools/mutation_check.py               # every mutant; exit 1 if any survives (see the timing below)
    python tools/mutation_check.py rotary cache  # only the mutants whose name contains one of these words
    python tools/mutation_check.py --list        # the mutants and the tests each one runs

Each mutant is (name, file, exact fragment, replacement, tests): the fragment must occur exactly once in the file,
and only the tests named run against it (`pytest -x`, so the first failure ends the run). A mutant is *caught*
when pytest reports a failing test; it *survives* when the tests pass, and is *stale* when its fragment is no longer
in the file (the code moved: update the mutant). Before the mutants, the union of their tests runs once on the
unbroken tree, so a failure can only come from the mutant. A surviving mutant is a gap in the suite: add a test
that fails on it, then keep the mutant here so the gap stays closed.

The tracked and untracked, not ignored, files (git ls-files) are copied to a temporary folder, so the worktree is
never touched. Run it under `nice -n 10` on a shared machine; set RADIAL_MIN_DATA if ../shared/data is not beside
the checkout.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent


class Mutant(NamedTuple):
    name: str
    file: str
    old: str
    new: str
    tests: tuple  # pytest arguments: test files, optionally "-k" and an expression


R, K, C, B, O, P, G = (
    "radial_min/" + f + ".py"
    for f in ("radial", "kernels", "cache", "blocks", "analysis/oracle", "analysis/profiling", "generation")
)
T = "tests/test_{}.py".format
RADIAL, KERNELS, LLAMA, PROFILING = T("radial"), T("kernels"), T("llama"), T("profiling")
MUTANTS = [
    # routing and the unified KV cache
    Mutant(
        "global policy: query without step encoding",
        C,
        "q, k = q + np.repeat(enc.reshape(self.rows.n_head, -1), group, axis=0).reshape(-1), k + enc",
        "k = k + enc",
        (RADIAL,),
    ),
    Mutant(
        "global policy: every step encoded as step 0",
        C,
        "enc = self.scale * step_encoding(hop, self.width)",
        "enc = self.scale * step_encoding(0, self.width)",
        (RADIAL,),
    ),
    Mutant(
        "router not told the block just run",
        R,
        "self.decide(x, [prev], [len(route)])",
        "self.decide(x, [-1], [len(route)])",
        (RADIAL,),
    ),
    Mutant("max_depth ignored (token by token)", R, "while len(route) < self.max_depth:", "while True:", (RADIAL,)),
    Mutant(
        "max_depth ignored (block by block)",
        "radial_min/router.py",
        "np.where(self.depth[rows] >= self.max_depth, self.router.config.exit, choice)",
        "choice",
        (RADIAL,),
    ),
    Mutant("routing step (hop) not passed to the cache", R, "cache, hop=len(route))", "cache, hop=0)", (RADIAL,)),
    Mutant(
        "unified cache: position tags zeroed",
        C,
        "self.rows.append(k, v, pos=pos,",
        "self.rows.append(k, v, pos=0 * pos,",
        (RADIAL,),
    ),
    Mutant(
        "unified cache: per-layer view of layer 0 for all",
        C,
        'key = layer if self.policy == "per-layer" else hop',
        'key = 0 if self.policy == "per-layer" else hop',
        (RADIAL,),
    ),
    Mutant(
        "KV cache: position tags zeroed",
        C,
        "rows.append(k, v, pos=pos)",
        "rows.append(k, v, pos=0 * pos)",
        (T("generation"), LLAMA),
    ),
    Mutant("KV cache: growth keeps no old rows", C, "grown[index] = a[index]", "pass", (T("generation"), RADIAL)),
    # attention
    Mutant(
        "causal mask off (numba kernel)",
        K,
        'q_pos[i], side="right") if causal else n_keys',
        'q_pos[i], side="right") if False else n_keys',
        (KERNELS, "-k", "attention"),
    ),
    Mutant(
        "causal mask off (blocked prefill kernel)",
        K,
        'q_pos[i_lo + i], side="right") if causal else n_keys',
        'q_pos[i_lo + i], side="right") if False else n_keys',
        (KERNELS, "-k", "attention"),
    ),
    Mutant(
        "causal mask hides the query itself (numba kernel)",
        K,
        'q_pos[i], side="right")',
        'q_pos[i], side="left")',
        (KERNELS, "-k", "attention"),
    ),
    Mutant(
        "causal mask off (NumPy reference)",
        K,
        "visible = True if q_pos is None else k_pos[None, None, :] <= q_pos[None, :, None]",
        "visible = True",
        (KERNELS, "-k", "attention"),
    ),
    Mutant(
        "attention without 1/sqrt(d) (numba kernel)",
        K,
        "math.sqrt(d_head))\n    picked = rows.size > 0\n    for task",
        "1.0)\n    picked = rows.size > 0\n    for task",
        (KERNELS, "-k", "attention"),
    ),
    Mutant(
        "GQA: query head h reads key/value head h % Hkv (kernel)",
        K,
        "g = h // group\n        n_vis",
        "g = h % k.shape[0]\n        n_vis",
        (LLAMA, KERNELS),
    ),
    Mutant(
        "GQA: wrong key/value head (blocked prefill kernel)",
        K,
        "g = h // group\n        n_all",
        "g = h % k.shape[0]\n        n_all",
        (LLAMA, KERNELS),
    ),
    Mutant(
        "GQA: reference tiles key/value heads instead of repeating",
        K,
        "kh = np.repeat(k.reshape(len(k), -1, D).transpose(1, 0, 2), group, axis=0)",
        "kh = np.tile(k.reshape(len(k), -1, D).transpose(1, 0, 2), (group, 1, 1))",
        (LLAMA, KERNELS),
    ),
    Mutant(
        "GQA: unified cache encodes query heads in the wrong order",
        C,
        "np.repeat(enc.reshape(self.rows.n_head, -1), group, axis=0)",
        "np.tile(enc.reshape(self.rows.n_head, -1), (group, 1))",
        (LLAMA, RADIAL),
    ),
    Mutant(
        "GQA: key/value width split as if MHA",
        B,
        "kv = (qkv.shape[1] * self.n_kv_head) // (self.n_head + 2 * self.n_kv_head)",
        "kv = qkv.shape[1] // 3",
        (LLAMA,),
    ),
    # rotary
    Mutant(
        "rotary: rotation sign flipped (kernel)",
        K,
        "out[t, o + i] = a * cos[t, i] - b * sin[t, i]",
        "out[t, o + i] = a * cos[t, i] + b * sin[t, i]",
        (LLAMA,),
    ),
    Mutant("rotary: keys not rotated", B, "self.rotary(k, self.n_kv_head, pos)", "k", (LLAMA,)),
    Mutant(
        "rotary: frequencies of head_dim + 2",
        K,
        "astype(np.float32) / head_dim  # [D/2]",
        "astype(np.float32) / (head_dim + 2)  # [D/2]",
        (LLAMA,),
    ),
    # blocks and models
    Mutant("residual add dropped", B, "y = x + f  # [T, E]", "y = f  # [T, E]", (T("parity"), "-k", "opt_logits")),
    Mutant(
        "post-LN: no LayerNorm after the add",
        B,
        "return y if self.pre_norm else self.norm(y)",
        "return y",
        (T("parity"),),
    ),
    Mutant(
        "SwiGLU: gate and up projections swapped",
        B,
        "h = kernels.activation(self.act, self.gate(h)) * self.fc1(h)",
        "h = kernels.activation(self.act, self.fc1(h)) * self.gate(h)",
        (LLAMA,),
    ),
    Mutant(
        "OPT: position table without its offset of 2",
        "radial_min/models/opt.py",
        "self.embed_positions[pos + POSITION_OFFSET]",
        "self.embed_positions[pos]",
        (T("parity"),),
    ),
    Mutant(
        "layernorm: eps ignored (kernel)",
        K,
        "return mean, 1.0 / math.sqrt(var / n + eps)",
        "return mean, 1.0 / math.sqrt(var / n + 1e-2)",
        (KERNELS, "-k", "layernorm"),
    ),
    # residual ratios and the oracle
    Mutant(
        "ratio 'output': ||f|| / ||x|| instead of ||x + f||",
        P,
        "np.linalg.norm((x + f).astype(np.float64), axis=-1)",
        "np.linalg.norm(x.astype(np.float64), axis=-1)",
        (PROFILING,),
    ),
    Mutant(
        "ratio 'sum': ||f|| left out of the denominator", P, "axis=-1) + fx, 1e-30)", "axis=-1), 1e-30)", (PROFILING,)
    ),
    Mutant(
        "oracle keeps on ratio > tau instead of >=",
        O,
        "        return r >= tau\n",
        "        return r > tau\n",
        (PROFILING,),
    ),
    Mutant("oracle comparison inverted", O, "        return r >= tau\n", "        return r < tau\n", (PROFILING,)),
    Mutant(
        "oracle: skipped rows take the block's output",
        O,
        "y = np.where(keep[:, None], block.residual(x, f), x)",
        "y = block.residual(x, f)",
        (PROFILING,),
    ),
    Mutant(
        "drop rule: skipped tokens stay visible",
        B,
        "visible = np.append(np.flatnonzero(keep[:t]), t)",
        "visible = np.arange(t + 1)",
        (PROFILING,),
    ),
    # the router
    Mutant(
        "router features: previous block one-hot off by one",
        "radial_min/router.py",
        "onehot[np.arange(len(prev)), np.asarray(prev) + 1] = 1.0",
        "onehot[np.arange(len(prev)), np.asarray(prev)] = 1.0",
        (T("router"),),
    ),
    Mutant(
        "fused router: previous block column off by one",
        "radial_min/router.py",
        "acc = b1[j] + w1[j, E + prev[i] + 1]",
        "acc = b1[j] + w1[j, E + prev[i]]",
        (T("router"),),
    ),
    Mutant(
        "router mask lets a forward-only router rerun its block",
        "radial_min/router.py",
        "ok = cols[None, :] > prev[:, None] if cfg.forward_only",
        "ok = cols[None, :] >= prev[:, None] if cfg.forward_only",
        (T("router"),),
    ),
    Mutant(
        "fused router may rerun its block",
        "radial_min/router.py",
        "if forward_only and m <= prev[i] and m != exit_:",
        "if forward_only and m < prev[i] and m != exit_:",
        (T("router"),),
    ),
    Mutant(
        "router config: max_depth unbounded",
        "radial_min/router.py",
        'int, 0, MAX_PASSES * d["n_blocks"])',
        "int, 0, 1 << 40)",
        (T("hostile"), T("fuzz")),
    ),
    # generation
    Mutant(
        "repetition penalty: positive logits multiplied",
        G,
        "np.where(out[seen] > 0, out[seen] / penalty, out[seen] * penalty)",
        "np.where(out[seen] > 0, out[seen] * penalty, out[seen] / penalty)",
        (T("generation"), T("parity")),
    ),
    Mutant(
        "repetition penalty: the prompt's tokens not counted",
        G,
        "np.concatenate([input_ids, new]).astype(np.int64)",
        "np.asarray(new, np.int64)",
        (T("generation"), T("parity")),
    ),
    Mutant(
        "top-p keeps one token too few", G, "keep = cum - p[order] < top_p", "keep = cum < top_p", (T("generation"),)
    ),
    Mutant(
        "top-k drops the k-th token",
        G,
        "z = np.where(z < kth, -np.inf, z)",
        "z = np.where(z <= kth, -np.inf, z)",
        (T("generation"),),
    ),
    Mutant("EOS does not stop generation", G, "token == model.config.eos_token_id", "token == -1", (T("generation"),)),
    Mutant(
        "context limit one token too far",
        G,
        "max_position_embeddings - len(input_ids) + 1))",
        "max_position_embeddings - len(input_ids) + 2))",
        (T("generation"),),
    ),
    # checkpoints: shapes, safetensors rules, pickles, configs, images
    Mutant(
        "loader: tensor shapes not checked against the config",
        "radial_min/io/loading.py",
        "if ours in expected and tuple(store.shape(theirs)) != tuple(expected[ours])",
        "if False",
        (T("loading"), T("hostile")),
    ),
    Mutant(
        "loader: NaN/Inf weights not checked",
        "radial_min/io/loading.py",
        'if a.dtype.kind == "f" and not np.isfinite(a).all():',
        "if False:",
        (T("hostile"),),
    ),
    Mutant(
        "safetensors: overlapping tensors accepted",
        "radial_min/io/checkpoint.py",
        "if begin != end:",
        "if begin > end:",
        (T("hostile"), T("fuzz")),
    ),
    Mutant(
        "safetensors: trailing bytes accepted",
        "radial_min/io/checkpoint.py",
        "if self.data_start + end != size:",
        "if self.data_start + end > size:",
        (T("hostile"), T("fuzz")),
    ),
    Mutant(
        "safetensors: a tensor's byte span not checked",
        "radial_min/io/checkpoint.py",
        "if stop < begin or stop - begin != nbytes:",
        "if stop < begin:",
        (T("hostile"), T("fuzz")),
    ),
    Mutant(
        "shard names may leave the checkpoint folder",
        "radial_min/io/checkpoint.py",
        'if Path(shard).name != shard or shard in ("", ".", "..") or "\\\\" in shard or "/" in shard:',
        "if False:",
        (T("hostile"),),
    ),
    Mutant(
        "pickle: storage bounds off by one",
        "radial_min/io/torch_pickle.py",
        "if last >= storage_numel:",
        "if last > storage_numel:",
        (T("torch_pickle"),),
    ),
    Mutant(
        "pickle: memo index unbounded",
        "radial_min/io/torch_pickle.py",
        "not 0 <= arg < len(data)",
        "arg < 0",
        (T("torch_pickle"), T("fuzz")),
    ),
    Mutant(
        "pickle: zip bomb not refused",
        "radial_min/io/torch_pickle.py",
        "if size > limit:",
        "if False:",
        (T("torch_pickle"), T("fuzz")),
    ),
    Mutant(
        "pickle: zero-stride bomb not refused",
        "radial_min/io/torch_pickle.py",
        "if math.prod(ref.shape) > max(elements.size, _MAX_EXPANDED):",
        "if False:",
        (T("torch_pickle"),),
    ),
    Mutant(
        "config: layer count unbounded",
        "radial_min/config.py",
        '"num_hidden_layers": (int, 1, 1024),\n        "num_attention_heads": (int, 1, 1024),\n        "ffn_dim"',
        '"num_hidden_layers": (int, 1, 1 << 40),\n        "num_attention_heads": (int, 1, 1024),\n        "ffn_dim"',
        (T("hostile"), T("fuzz")),
    ),
    Mutant(
        "config: heads need not divide the width",
        "radial_min/config.py",
        "if cfg.hidden_size % cfg.num_attention_heads:",
        "if False:",
        (T("hostile"), T("fuzz"), T("loading")),
    ),
    Mutant(
        "image bomb: pixels not bounded",
        "radial_min/io/images.py",
        "if im.width * im.height > MAX_PIXELS:",
        "if False:",
        (T("hostile"), T("images")),
    ),
    # hostile inputs through the command line (tools/hostile_inputs.py found each of these)
    Mutant(
        "tokenizer: special tokens not type-checked",
        "radial_min/io/tokenizer.py",
        "if token is not None and not isinstance(token, str):",
        "if False:",
        (T("hostile_cli"), "-k", "tokenizer"),
    ),
    Mutant(
        "tokens.npz: ids not checked against its vocabulary",
        "radial_min/data.py",
        "(a.size and not 0 <= a.min() <= a.max() < size)",
        "False",
        (T("hostile_cli"), "-k", "token_cache"),
    ),
    Mutant(
        ".npy header not bounded by the file's size",
        "radial_min/io/outputs.py",
        "math.prod(shape) * dtype.itemsize > nbytes",
        "False",
        (T("hostile_cli"), "-k", "images"),
    ),
    Mutant(
        "router weights may be NaN",
        "radial_min/router.py",
        'if a.dtype.kind != "f" or not np.isfinite(a).all():',
        "if False:",
        (T("hostile_cli"), "-k", "router"),
    ),
    Mutant(
        "error lines not escaped",
        "cli.py",
        'print(f"error: {_one_line(str(e))}"',
        'print(f"error: {e}"',
        (T("hostile_cli"), "-k", "control"),
    ),
    Mutant(
        "training size not bounded by the memory available",
        "cli.py",
        "need > avail:\n        problems",
        "False:\n        problems",
        (T("hostile_cli"), "-k", "fit"),
    ),
    Mutant(
        "resume: state tensors not checked against the run",
        "radial_min/train.py",
        "    if wrong:",
        "    if False:",
        (T("hostile_cli"), "-k", "state_tensors"),
    ),
    # the test suite's own guards
    Mutant(
        "tests: matmul backend not restored after a test",
        "tests/conftest.py",
        "    kernels.set_backend(before)",
        "    pass",
        (KERNELS,),
    ),
    # training
    Mutant(
        "AdamW without bias correction",
        "radial_min/optim.py",
        "m_hat = m[name] / (1 - beta1**step)",
        "m_hat = m[name]",
        (T("train"), T("router")),
    ),
    Mutant(
        "resume: batches not seeded by the step",
        "radial_min/train.py",
        "rng = np.random.default_rng([cfg.seed, step])",
        "rng = np.random.default_rng([cfg.seed, 0])",
        (T("train"),),
    ),
    # the variable-depth task
    Mutant(
        "hop task: answers one hop short",
        "radial_min/tasks.py",
        "for _ in range(k):",
        "for _ in range(k - 1):",
        (T("tasks"),),
    ),
    Mutant(
        "hop task: f two cycles instead of one",
        "radial_min/tasks.py",
        "f[cycle] = np.roll(cycle, -1)",
        "f[cycle] = np.roll(cycle, -2)",
        (T("tasks"),),
    ),
    Mutant(
        "hop task: start nodes may repeat",
        "radial_min/tasks.py",
        "rng.permutation(n)[: task.queries]",
        "rng.integers(0, n, task.queries)",
        (T("tasks"),),
    ),
    Mutant(
        "hop task: sequences not seeded by their index",
        "radial_min/tasks.py",
        "np.random.default_rng([_SALT[stream], seed, i])",
        "np.random.default_rng([_SALT[stream], seed, 0])",
        (T("tasks"),),
    ),
    Mutant(
        "hop task: the eval stream is the train stream",
        "radial_min/tasks.py",
        '_SALT = {"train": 0x7A51, "eval": 0x3E7A}',
        '_SALT = {"train": 0x7A51, "eval": 0x7A51}',
        (T("tasks"),),
    ),
    Mutant(
        "hop task: accuracy scores the noise tokens",
        "radial_min/tasks.py",
        "if label != NOISE:",
        "if True:",
        (T("tasks"),),
    ),
    Mutant(
        "depth task: the loss mask ignored",
        "tools/depth_task.py",
        "p *= (weights / norm)[:, None].astype(p.dtype)",
        "p *= 1 / len(targets)",
        (T("depth_task"),),
    ),
]


def copy_tree(dst: Path) -> None:
    listed = ["git", "ls-files", "--cached", "--others", "--exclude-standard"]  # tracked, and new files not ignored
    files = subprocess.run(listed, cwd=ROOT, capture_output=True, text=True, check=True).stdout.splitlines()
    for f in files:
        if (ROOT / f).is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dst / f)


def pytest(tree: Path, args, timeout: int) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": str(tree)}  # the copy, never the editable install of the worktree
    if "RADIAL_MIN_DATA" not in env and (ROOT.parent / "shared" / "data").is_dir():
        env["RADIAL_MIN_DATA"] = str(ROOT.parent / "shared" / "data")  # the copy has no ../shared beside it
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *args]
    try:
        p = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, "timeout"
    lines = [line for line in p.stdout.splitlines() if line.strip()] or p.stderr.strip().splitlines() or [""]
    failed = [line for line in lines if line.startswith(("FAILED", "ERROR"))]  # the test that caught it
    return p.returncode, (failed or lines)[-1 if not failed else 0][:160]


def run_mutant(tree: Path, m: Mutant, timeout: int) -> tuple[str, str]:
    """(verdict, pytest's last line): caught, SURVIVED, STALE or ERROR (pytest could not run the tests)."""
    path = tree / m.file
    text = path.read_text(encoding="utf-8")
    if text.count(m.old) != 1:
        return "STALE", f"fragment found {text.count(m.old)} times in {m.file}"
    stat = path.stat()
    path.write_text(text.replace(m.old, m.new), encoding="utf-8")
    try:
        code, last = pytest(tree, m.tests, timeout)
    finally:
        path.write_text(text, encoding="utf-8")
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # numba's cache of the unbroken file stays valid
    if code == 1:
        return "caught", last
    if code == -1:
        return "caught", f"timeout after {timeout} s (the tests hang on it)"
    return ("SURVIVED" if code == 0 else "ERROR"), last


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("words", nargs="*", help="run only mutants whose name contains one of these (default: all)")
    ap.add_argument("--list", action="store_true", help="list the mutants and their tests, run nothing")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per mutant before it counts as a hang")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.words or any(w.lower() in m.name.lower() for w in args.words)]
    if args.list:
        for m in chosen:
            print(f"{m.name:60s} {m.file:26s} {' '.join(m.tests)}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        copy_tree(tree)
        tests = sorted({a for m in chosen for a in m.tests if a.startswith("tests/")})
        t0 = time.time()
        code, last = pytest(tree, tests, 1800)
        print(
            f"{'unbroken tree':60s} {'':26s} {'passes' if code == 0 else 'FAILS':9s} {time.time() - t0:6.1f}s  {last}"
        )
        if code != 0:
            print("the tests fail without any mutant: fix that first", file=sys.stderr)
            return 2
        verdicts = []
        for m in chosen:
            t0 = time.time()
            verdict, last = run_mutant(tree, m, args.timeout)
            verdicts.append((m.name, verdict))
            print(f"{m.name:60s} {m.file:26s} {verdict:9s} {time.time() - t0:6.1f}s  {last}", flush=True)
    missed = [name for name, v in verdicts if v != "caught"]
    print(f"{len(verdicts) - len(missed)}/{len(verdicts)} mutants caught" + (f"; missed: {missed}" if missed else ""))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
