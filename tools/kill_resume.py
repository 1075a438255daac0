"""Kill -9 a training run at random moments, inside its saves too, resume it each time, and compare the result with
an uninterrupted run of the same command: the state must be byte-identical and the log must hold every step once.

    python tools/kill_resume.py                    # 10 trials of random kills, 10 of kills inside a save
    python tools/kill_resume.py --trials 3 --steps 200

Each trial starts `cli.py train` (a small model on a prepared corpus, saving every --save-every steps) in a fresh
process and kills it with SIGKILL: at a random moment between the start and the run's expected end ("random"), or
inside a save ("save": the process, its os.replace and Path.write_bytes wrapped, kills itself at a random one of
them, before the rename or halfway through writing the temporary file). Then it runs the same command again, and
kills again, until a run ends by itself. What must hold at the end: state.safetensors equal byte for byte to the
reference run's; log.jsonl with steps 1..N once each and the same losses (all but the tokens/s, which is timing); no
temporary file left. Exit code 1 if any trial differs. Run it under `nice -n 10` on a shared machine; each process
start costs a few seconds.
"""

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from radial_min import data  # noqa: E402

TEXT = (
    "In the beginning God created the heaven and the earth. And the earth was without form, and void; and "
    "darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters.\n"
) * 30
CORPUS = ("tokens.npz", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


def train_argv(out: Path, args) -> list:
    return [
        sys.executable,
        str(ROOT / "cli.py"),
        *f"train --vocab-size 300 --hidden-size {args.hidden_size} --layers 2 --heads 2 --seq-len 8".split(),
        *f"--batch-size 2 --eval-every 10 --warmup 5 --steps {args.steps} --save-every {args.save_every}".split(),
        *f"--out {out}".split(),
    ]


def prepare(folder: Path) -> None:
    """The corpus and tokenizer every run starts from (train finds them in its folder and does not redo them)."""
    docs = TEXT.split(". ")
    data.prepare_corpus(folder, 300, docs=docs, val_docs={"kjv": docs[:20], "wiki": docs[20:]})


# Run in the training process for the "save" mode: os.replace (the rename that puts a written file in place) and
# Path.write_bytes (the write of the temporary file) counted, and the process killed at call KILL_AT of KILL_IN.
INJECT = """
import os, signal, sys
from pathlib import Path
kind, at, count = os.environ["KILL_IN"], int(os.environ["KILL_AT"]), [0]
def die():
    os.kill(os.getpid(), signal.SIGKILL)
if kind == "replace":
    replace = os.replace
    def counted(src, dst, *a, **k):
        count[0] += 1
        if count[0] == at:
            die()
        return replace(src, dst, *a, **k)
    os.replace = counted
else:
    write = Path.write_bytes
    def counted(self, data):
        count[0] += 1
        if count[0] == at:
            with open(self, "wb") as f:
                f.write(bytes(data)[: len(data) // 2])
                f.flush()
            die()
        return write(self, data)
    Path.write_bytes = counted
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
import cli
sys.exit(cli.main(sys.argv[1:]))
"""


def start(out: Path, args, kill=None) -> subprocess.Popen:
    """The training command; with `kill` = (KILL_IN, KILL_AT), under INJECT."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = train_argv(out, args)
    if kill is not None:
        env.update(KILL_IN=kill[0], KILL_AT=str(kill[1]))
        argv = [argv[0], "-c", INJECT, *argv[1:]]
    return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def kill_at_random(p: subprocess.Popen, rng: random.Random, seconds: float) -> bool:
    """SIGKILL at a random moment of the first `seconds`; False if the run ended first."""
    try:
        p.wait(timeout=rng.uniform(0.0, seconds))
        return False
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGKILL)
        p.wait()
        return True


def records(out: Path) -> list:
    """log.jsonl's records without their timing (tokens/s)."""
    lines = (out / "log.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "tok_s"} for line in lines]


def trial(work: Path, corpus: Path, reference: Path, mode: str, args, rng: random.Random) -> tuple[bool, str]:
    out = work / f"run-{mode}"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(corpus, out)
    kills, runs = 0, 0
    while True:
        runs += 1
        if mode == "random":
            p = start(out, args)
            killed = kill_at_random(p, rng, args.seconds)
        else:  # the first writes are train_config.json's: then one state (and a log repair) per --save-every steps
            p = start(out, args, (rng.choice(["replace", "write"]), rng.randrange(1, 8)))
            p.wait()
            killed = p.returncode == -signal.SIGKILL
        if not killed:
            if p.returncode != 0:
                return False, f"run {runs} exited {p.returncode}: {p.stderr.read().strip().splitlines()[-1:]}"
            break
        kills += 1
        if kills >= args.max_kills:
            break  # then one last run to the end
    if killed:
        p = start(out, args)
        p.wait()
        if p.returncode != 0:
            return False, f"the last run exited {p.returncode}: {p.stderr.read().strip().splitlines()[-1:]}"
    same_state = (out / "state.safetensors").read_bytes() == (reference / "state.safetensors").read_bytes()
    got, want = records(out), records(reference)
    steps = [r["step"] for r in got]
    left = sorted(t.name for t in out.glob(".*.tmp*"))
    ok = same_state and got == want and not left
    why = [] if same_state else ["state.safetensors differs"]
    if got != want:
        why.append(f"log steps {steps[:5]}...{steps[-3:]} ({len(steps)}), records differ: {got != want}")
    if left:
        why.append(f"left {left}")
    return ok, f"{kills} kills, {runs} runs" + ("; " + "; ".join(why) if why else "")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=10, help="trials of each mode")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--save-every", type=int, default=4)
    ap.add_argument("--hidden-size", type=int, default=192, help="wide enough that a save takes milliseconds")
    ap.add_argument("--max-kills", type=int, default=6, help="kills per trial before the run is let finish")
    ap.add_argument("--seconds", type=float, default=None, help="random kills within this many seconds of a start")
    ap.add_argument("--modes", default="random,save")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepare(work / "corpus")
        corpus = work / "corpus-files"
        corpus.mkdir()
        for name in CORPUS:
            shutil.copy(work / "corpus" / name, corpus / name)
        reference = work / "reference"
        shutil.copytree(corpus, reference)
        t0 = time.perf_counter()
        p = start(reference, args)
        p.wait()
        took = time.perf_counter() - t0
        if p.returncode != 0:
            print(f"the reference run failed: {p.stderr.read()}", file=sys.stderr)
            return 2
        if args.seconds is None:
            args.seconds = took
        print(
            f"reference: {args.steps} steps in {took:.1f} s (process start included); kills within {args.seconds:.1f} s"
        )
        failed = 0
        for mode in args.modes.split(","):
            for i in range(args.trials):
                ok, what = trial(work, corpus, reference, mode, args, rng)
                failed += not ok
                print(f"{mode:7s} trial {i + 1:2d}: {'identical' if ok else 'DIFFERS'}  ({what})", flush=True)
        print(f"{failed} of {args.trials * len(args.modes.split(','))} trials differ")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
