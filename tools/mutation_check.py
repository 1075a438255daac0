"""Mutation check: break key lines of the engine one at a time in a copy of the tree and assert the tests fail.

    python tools/mutation_check.py            # every mutant; prints a table, exits 1 if any mutant survives

Each mutant is (name, file, exact line fragment, replacement, tests to run). A surviving mutant is a gap in the
suite: add a test that catches it, then add the mutant here. Copies the tracked files to a temporary folder
(git ls-files), so the worktree is never touched.
"""
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MUTANTS = [  # name, file, old, new, pytest args
    ("global policy: query without step encoding", "radial_min/cache.py", "q, k = q + enc, k + enc", "k = k + enc",
     ["tests/test_radial.py", "-k", "global"]),
    ("router not told the block just run", "radial_min/radial.py", "choose(x, [prev], [len(route)]",
     "choose(x, [-1], [len(route)]", ["tests/test_radial.py"]),
    ("max_depth ignored (token by token)", "radial_min/radial.py", "while len(route) < self.max_depth:",
     "while True:", ["tests/test_radial.py", "-k", "max_depth or never_skipping"]),
    ("max_depth ignored (block by block)", "radial_min/radial.py",
     "np.where(self.depth[rows] >= self.max_depth, self.router.config.exit, choice)", "choice",
     ["tests/test_radial.py"]),
    ("residual add dropped", "radial_min/blocks.py", "y = x + f  # [T, E]", "y = f  # [T, E]",
     ["tests/test_parity.py", "-k", "opt_logits"]),
    ("causal mask off (numba kernel)", "radial_min/kernels.py", 'side="right") if causal else n_keys',
     'side="right") if False else n_keys', ["tests/test_kernels.py", "-k", "attention"]),
    ("cache position tags zeroed", "radial_min/cache.py", "self.rows.append(k, v, pos=pos,",
     "self.rows.append(k, v, pos=0 * pos,", ["tests/test_radial.py"]),
    ("oracle keeps on ratio > tau instead of >=", "radial_min/oracle.py", "lambda b, rows, r: r >= tau",
     "lambda b, rows, r: r > tau", ["tests/test_profiling.py"]),
    ("oracle comparison inverted", "radial_min/oracle.py", "lambda b, rows, r: r >= tau",
     "lambda b, rows, r: r < tau", ["tests/test_profiling.py"]),
]


def run_mutant(tree: Path, file: str, old: str, new: str, args: list) -> str:
    path = tree / file
    text = path.read_text(encoding="utf-8")
    if text.count(old) != 1:
        return f"line not found once ({text.count(old)})"
    path.write_text(text.replace(old, new), encoding="utf-8")
    try:
        p = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *args], cwd=tree,
                           capture_output=True, text=True, timeout=900)  # fmt: skip
        return "caught" if p.returncode == 1 else ("SURVIVED" if p.returncode == 0 else f"pytest exit {p.returncode}")
    except subprocess.TimeoutExpired:
        return "caught (timeout)"
    finally:
        path.write_text(text, encoding="utf-8")


def main() -> int:
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        for f in files:
            (tree / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, tree / f)
        rows = []
        for name, file, old, new, args in MUTANTS:
            t0 = time.time()
            verdict = run_mutant(tree, file, old, new, args)
            rows.append((name, file, verdict, time.time() - t0))
            print(f"{name:45s} {file:22s} {verdict:20s} {rows[-1][3]:6.1f}s", flush=True)
    bad = [r for r in rows if not r[2].startswith("caught")]
    print(f"{len(rows) - len(bad)}/{len(rows)} mutants caught" + (f"; NOT caught: {[r[0] for r in bad]}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
