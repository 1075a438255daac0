"""How long the README's long commands take here: each run as written (outputs to a scratch folder), timed, with
the load average before and after, since on a shared machine that decides the figure.

    python tools/durations.py                 # all of them, ~30 min on 2 busy cores
    python tools/durations.py profile simulate
"""

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def commands(out: Path) -> dict:
    cli = [PY, str(ROOT / "cli.py")]
    return {
        "fast tests": [PY, "-m", "pytest", "-q", "-m", "not slow", "-p", "no:cacheprovider"],
        "train --preset quick": [*cli, "train", "--preset", "quick", "--out", str(out / "quick")],
        "profile": [*cli, "profile", "--out", str(out / "profile")],
        "simulate": [*cli, "simulate", "--out", str(out / "simulate")],
        "train-router --evaluate": [
            *cli, "train-router", "--evaluate", "weights/opt-kjv-wiki/router-tau0.2", "--out", str(out / "router")
        ],
        "bench.py --quick": [PY, "bench/bench.py", "--quick"],
        "train_family.py --report-only": [
            PY, "tools/train_family.py", "--report-only", "--profile-out", str(out / "family"), "--runs",
            str(out / "family-runs"),
        ],
    }  # fmt: skip


def main(argv) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        todo = commands(Path(tmp))
        unknown = [a for a in argv if not any(a in name for name in todo)]
        if unknown:
            print(f"error: no command matches {', '.join(unknown)}; one of: {', '.join(todo)}", file=sys.stderr)
            return 2
        for name, cmd in todo.items():
            if argv and not any(a in name for a in argv):
                continue
            load = os.getloadavg()[0]
            t0 = time.perf_counter()
            rc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
            took = time.perf_counter() - t0
            print(
                f"{name:32s} {took / 60:6.1f} min  exit {rc}  load {load:.1f} -> {os.getloadavg()[0]:.1f}", flush=True
            )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
