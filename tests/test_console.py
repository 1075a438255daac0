"""The installed command (`radial-min`, `python -m radial_min`) and what a first session meets: --version, the
loading line, the prompt from standard input or a file, Ctrl-C while the modules load, integer options."""

import os
import re
import runpy
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import radial_min
from radial_min import console
from radial_min.io.hub import DEFAULT_MODEL
from radial_min.io.loading import loading_line
from test_cli import ROOT, cli, without_compile_notice

SLOW = pytest.mark.slow  # subprocesses: each starts Python, NumPy and Numba (~1 s)


def run(*args, env=None, input=None):
    """A command's result, its stderr without the one-time compile notice of a cold Numba cache."""
    p = subprocess.run(
        [str(a) for a in args], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env, input=input
    )
    p.stderr = without_compile_notice(p.stderr)
    return p


@SLOW
def test_entry_point_runs_the_checkouts_cli_under_its_own_name():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"] == {"radial-min": "radial_min.console:main"}
    assert project["version"] == radial_min.__version__
    p = run(sys.executable, "-m", "radial_min", "--version")
    assert p.returncode == 0 and p.stdout == f"radial_min {radial_min.__version__}\n"
    p = run(sys.executable, "-m", "radial_min", "generate", "--seed", "x")
    assert p.returncode == 2
    assert (
        p.stderr == "error: radial-min generate: argument -s/--seed: expected an integer >= 0, got 'x' (see --help)\n"
    )
    script = Path(sys.executable).parent / "radial-min"
    if not script.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but {script} is missing", pytrace=False)
        pytest.skip(f"{script} is created by installing the checkout (pip install -e .)")
    p = run(script, "info")
    assert p.returncode == 0 and p.stdout.startswith(f"model       {DEFAULT_MODEL}\n")


@SLOW
def test_ctrl_c_while_the_modules_load_ends_with_one_line(tmp_path):
    """SIGINT delivered while cli.py imports NumPy (a sitecustomize hook sends it then): one line, exit 130. The
    hook first gives SIGINT Python's usual handler, as on a terminal (a job started in the background, as by
    nohup, inherits SIGINT ignored)."""
    (tmp_path / "sitecustomize.py").write_text(
        "import os, signal, sys\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "class Hook:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'numpy':\n"
        "            sys.meta_path.remove(self)\n"
        "            os.kill(os.getpid(), signal.SIGINT)\n"
        "sys.meta_path.insert(0, Hook())\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    p = run(sys.executable, "cli.py", "generate", "Hi", env=env)
    assert (p.returncode, p.stdout, p.stderr) == (130, "", "\ninterrupted\n")
    p = run(sys.executable, "-m", "radial_min", "generate", "Hi", env=env)
    assert (p.returncode, p.stdout, p.stderr) == (130, "", "\ninterrupted\n")


@SLOW
def test_prompt_from_standard_input_or_a_file(tmp_path):
    prompt = "And God said"
    base = [sys.executable, "cli.py", "generate", "-n", 5, "--quiet"]
    expected = run(*base, prompt).stdout
    assert expected.strip()
    assert run(*base, "-", input=prompt + "\n").stdout == expected  # the one final newline is dropped
    (tmp_path / "prompt.txt").write_text(prompt)
    assert run(*base, "-f", tmp_path / "prompt.txt").stdout == expected
    assert run(*base, "-p", prompt).stdout == expected
    p = run(*base, prompt, "-p", prompt)
    assert p.returncode == 2 and p.stderr == "error: PROMPT and -p/--prompt: give the prompt one way\n"
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9")
    p = run(*base, "-f", tmp_path / "bad.txt")
    assert p.returncode == 2
    assert p.stderr == f"error: --prompt-file {tmp_path / 'bad.txt'}: not valid UTF-8 (byte 0xe9 at offset 3)\n"
    p = run(*base, input="ignored")  # a pipe, but no `-`: the default prompt, and a warning
    assert p.stderr == "warning: standard input is a pipe but is not read: pass - as the prompt to read it\n"


def test_console_and_python_m_run_the_checkouts_cli(capsys, monkeypatch):
    """In this process: `radial-min --version` (console.main) and `python -m radial_min --version` (__main__)."""
    before = signal.getsignal(signal.SIGINT)  # Python's handler; SIG_IGN in a job started in the background
    with pytest.raises(SystemExit) as e:
        console.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"radial_min {radial_min.__version__}\n"
    assert signal.getsignal(signal.SIGINT) is before  # given back, even after argparse's early exit
    monkeypatch.setattr(sys, "argv", ["radial_min", "--version"])
    with pytest.raises(SystemExit) as e:
        runpy.run_module("radial_min", run_name="__main__")
    assert e.value.code == 0 and capsys.readouterr().out == f"radial_min {radial_min.__version__}\n"
    monkeypatch.setattr(console, "CLI", console.CLI.with_name("missing.py"))
    assert console.main(["info"]) == 2
    assert capsys.readouterr().err.startswith("error: radial-min runs the checkout's cli.py, which is not at ")


def test_a_load_over_a_second_is_reported_in_one_line(capsys, monkeypatch):
    model = radial_min.load(DEFAULT_MODEL)
    assert loading_line(model, 2.345) == "loaded opt-kjv-wiki (6.9M parameters, float16 -> float32) in 2.3 s"
    monkeypatch.setattr(cli, "LOADING_NOTE_AFTER", 1e9)
    assert cli.main(["generate", "-n", "2"]) == 0 and "loaded" not in capsys.readouterr().err
    monkeypatch.setattr(cli, "LOADING_NOTE_AFTER", 0.0)
    assert cli.main(["generate", "-n", "2"]) == 0
    line = next(x for x in capsys.readouterr().err.splitlines() if x.startswith("loaded"))
    assert re.fullmatch(r"loaded opt-kjv-wiki \(6\.9M parameters, float16 -> float32\) in \d+\.\d s", line)
    assert without_compile_notice(line + "\n") == ""  # what the other tests drop
