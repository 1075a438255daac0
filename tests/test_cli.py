"""The command line end to end on tiny checkpoints: output, determinism, and one-line errors for bad input.

Most runs call `cli.main` in this process (fast); a few run `python cli.py` as a real subprocess to check exit codes
and that stderr carries no traceback.
"""

import argparse
import importlib.util
import io
import json
import math
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import radial_min
from radial_min import data
from radial_min.io import images
from conftest import shared
from radial_min.data import SHARED
from radial_min.kernels import softmax_ref
from radial_min.data import train_tokenizer

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
PHOTO = SHARED / "images" / "chelsea.png"
PROMPT = "In the beginning"


def _import_cli():
    spec = importlib.util.spec_from_file_location("radial_min_cli", ROOT / "cli.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cli = _import_cli()


def run(*args):
    """`python cli.py ARGS` in the repository root (stderr without the compile notice, see `call`)."""
    p = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    p.stderr = without_compile_notice(p.stderr)
    return p


def call(capsys, *args):
    """cli.main(ARGS) in this process: (exit code, stdout, stderr). argparse's own exits count as exit codes."""
    try:
        code = cli.main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, without_compile_notice(err)


def without_compile_notice(err):
    """Without the lines a slow start adds: a cold Numba cache's compile notice (a fresh clone's first run:
    test_compile_notice checks it) and the line of a load over a second (a busy machine: test_console checks it)."""
    err = err.replace(cli.COMPILE_NOTICE + "\n", "")
    return re.sub(r"^loaded \S+ \([^)\n]*\) in [\d.]+ s\n", "", err, flags=re.M)


def assert_one_line_error(code, err):
    assert code not in (0, None), err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def opt_with_tokenizer(tmp_path_factory):
    """opt-pre (vocab 384) with a byte-level BPE of 384 tokens trained for it, as `train` would make one."""
    folder = tmp_path_factory.mktemp("cli") / "opt-pre-tok"
    shutil.copytree(FIXTURES / "opt-pre", folder)
    wiki = SHARED / "wikitext-2" / "test.txt"
    texts = wiki.read_text(encoding="utf-8").split("\n")[:3000] if wiki.is_file() else [PROMPT + " and the earth"] * 50
    train_tokenizer(texts, 384, folder)
    assert radial_min.Tokenizer(folder).vocab_size <= 384
    return folder


@pytest.fixture(scope="module")
def tiny_random_opt(tmp_path_factory):
    """A 2-layer random OPT with OPT's real vocabulary and tokenizer, from tools/make_random_opt.py."""
    shared("opt-tokenizer", "vocab.json")
    base = tmp_path_factory.mktemp("random-opt")
    out = base / "rnd"
    make = [
        sys.executable,
        str(ROOT / "tools" / "make_random_opt.py"),
        "--layers",
        "2",
        "--hidden",
        "32",
        "--heads",
        "2",
        "--max-positions",
        "128",
        "--out",
        str(out),
    ]
    p = subprocess.run(make, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    text = base / "text.txt"
    text.write_text(
        "The quick brown fox jumps over the lazy dog. " * 20 + "Naïve café — 日本語.\n" * 5, encoding="utf-8"
    )
    return out, text


def expected_generation(folder, prompt, n, **kw):
    """What the library generates with its defaults, which must be the command's (greedy; the repetition penalty of
    generation.default_repetition_penalty)."""
    model = radial_min.load(folder)
    tok = radial_min.Tokenizer(folder)
    return tok.decode(radial_min.generate(model, tok.encode(prompt), n, **kw))


# ------------------------------------------------------------------------------------------------ generate


@pytest.mark.slow
def test_generate_greedy_streams_the_library_output(capsys, opt_with_tokenizer):
    code, out, err = call(capsys, "generate", PROMPT, "--model", opt_with_tokenizer, "--max-new-tokens", 12)
    assert code == 0 and err == ""
    assert out == PROMPT + expected_generation(opt_with_tokenizer, PROMPT, 12) + "\n"
    assert call(capsys, "generate", PROMPT, "--model", opt_with_tokenizer, "--max-new-tokens", 12)[1] == out


def test_generate_quiet_prints_only_the_new_text(capsys, opt_with_tokenizer):
    code, out, err = call(capsys, "generate", PROMPT, "--model", opt_with_tokenizer, "--max-new-tokens", 12, "--quiet")
    assert code == 0 and err == ""
    assert out == expected_generation(opt_with_tokenizer, PROMPT, 12) + "\n"
    assert not out.startswith(PROMPT)


def test_generate_sampling_streamed_equals_quiet(capsys, opt_with_tokenizer):
    """At a high temperature the tiny model emits stray bytes. The stream holds split characters back, yet what it
    printed in the end is exactly the --quiet text, also when the last token leaves a character incomplete."""
    ends_split = 0
    for seed in range(4):
        args = [
            "generate",
            PROMPT,
            "--model",
            opt_with_tokenizer,
            "--max-new-tokens",
            30,
            "--temperature",
            3.0,
            "--seed",
            seed,
            "--repetition-penalty",
            1,
        ]
        code, streamed, _ = call(capsys, *args)
        assert code == 0
        code, quiet, _ = call(capsys, *args, "--quiet")
        assert code == 0
        assert streamed == PROMPT + quiet, seed
        expected = expected_generation(
            opt_with_tokenizer, PROMPT, 30, temperature=3.0, seed=seed, repetition_penalty=1.0
        )
        assert quiet == expected + "\n"
        ends_split += quiet.endswith("\ufffd\n")
    assert ends_split >= 1  # the case that needs Streamer.finish() did come up


def test_generate_repetition_penalty_option(capsys, opt_with_tokenizer):
    code, out, _ = call(
        capsys, "generate", PROMPT, "--model", opt_with_tokenizer, "--max-new-tokens", 12, "--repetition-penalty", 1
    )
    expected = expected_generation(opt_with_tokenizer, PROMPT, 12, repetition_penalty=1.0)
    assert code == 0 and out == PROMPT + expected + "\n"
    code, _, err = call(capsys, "generate", PROMPT, "--model", opt_with_tokenizer, "--repetition-penalty", 0)
    assert code == 2 and err.startswith("error:") and "repetition_penalty" in err


def test_generate_kv_dtype_option_reaches_the_cache(capsys, opt_with_tokenizer, monkeypatch):
    """--kv-dtype float16: the command's caches keep half-precision entries, and it prints what the library
    generates with the same setting; an unknown precision is refused by name."""
    made = []
    new_cache = radial_min.radial.RadialNetwork.new_cache
    monkeypatch.setattr(
        radial_min.radial.RadialNetwork, "new_cache", lambda *a, **k: made.append(new_cache(*a, **k)) or made[-1]
    )
    code, out, _ = call(capsys, "generate", PROMPT, "--model", opt_with_tokenizer, "-n", 12, "--kv-dtype", "float16")
    assert code == 0 and made and all(c.kv_dtype == "float16" for c in made)
    model, tok = radial_min.load(opt_with_tokenizer, kv_dtype="float16"), radial_min.Tokenizer(opt_with_tokenizer)
    assert out == PROMPT + tok.decode(radial_min.generate(model, tok.encode(PROMPT), 12)) + "\n"
    code, _, err = call(capsys, "generate", PROMPT, "--model", opt_with_tokenizer, "--kv-dtype", "int4")
    assert code == 2 and "--kv-dtype" in err


def test_generate_stats_and_zero_tokens(capsys, opt_with_tokenizer):
    code, out, err = call(capsys, "generate", "Hi", "--model", opt_with_tokenizer, "--max-new-tokens", 0, "--stats")
    assert code == 0 and out == "Hi\n"
    assert re.fullmatch(r"\[\d+ prompt tokens \+ 0 new tokens in [\d.]+ s, [\d.]+ tokens/s\]\n", err), err
    code, out, err = call(
        capsys, "generate", "Hi", "--model", opt_with_tokenizer, "--max-new-tokens", 5, "--stats", "--quiet"
    )
    assert re.fullmatch(
        r"\[\d+ prompt tokens \+ 5 new tokens in [\d.]+ s, [\d.]+ tokens/s; the first after [\d.]+ s "
        r"\(prefill\), then [\d.]+ tokens/s\]\n",
        err,
    ), err


@pytest.mark.slow
def test_generate_as_a_subprocess(opt_with_tokenizer):
    p = run("generate", PROMPT, "--model", opt_with_tokenizer, "--max-new-tokens", 8)
    assert p.returncode == 0 and p.stderr == ""
    assert p.stdout == PROMPT + expected_generation(opt_with_tokenizer, PROMPT, 8) + "\n"


@pytest.mark.slow
def test_a_reader_that_leaves_early_ends_it_quietly(opt_with_tokenizer):
    """`generate ... | head`: the pipe closes before the text is written; exit 141 (SIGPIPE), no traceback."""
    p = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "cli.py"),
            "generate",
            PROMPT,
            "--model",
            str(opt_with_tokenizer),
            "--max-new-tokens",
            "8",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    p.stdout.close()  # the reader is gone before the first write
    err = without_compile_notice(p.stderr.read())
    assert p.wait(timeout=300) == 141 and err == ""


def test_compile_notice_only_when_numba_compiles(capsys, monkeypatch, opt_with_tokenizer):
    """One line when a kernel really compiles (a cold cache), none when every kernel is already compiled."""
    from numba import njit

    @njit(cache=False)
    def fresh(x):  # never compiled before this test: stands for a cold disk cache
        return x + 1

    format_info = cli.format_info
    monkeypatch.setattr(cli, "format_info", lambda model: format_info(model) + str(fresh(1) + fresh(2.5)))
    capsys.readouterr()
    assert cli.main(["info", "--model", str(opt_with_tokenizer)]) == 0
    out, err = capsys.readouterr()
    assert out.endswith("5.5\n") and err == cli.COMPILE_NOTICE + "\n"  # two compiles (int, float), one notice
    assert cli.main(["info", "--model", str(opt_with_tokenizer)]) == 0
    out, err = capsys.readouterr()
    assert out.endswith("5.5\n") and err == ""  # compiled now: silent
    fresh(3j)  # compiled outside the CLI: no listener left behind
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------------------------------------------ info, classify


def test_info_opt(capsys):
    code, out, err = call(capsys, "info", "--model", FIXTURES / "opt-pre")
    assert code == 0 and err == ""
    model = radial_min.load(FIXTURES / "opt-pre")
    assert f"parameters  {model.n_params:,}\n" in out and model.n_params == 40096
    assert "on disk     52 tensors float32" in out
    assert "blocks      6 (3 layers x attention + FFN)" in out
    assert "hidden 32, ffn 64, heads 4, vocab 384" in out and "context 64" in out


def test_info_fp16_and_vit(capsys):
    code, out, _ = call(capsys, "info", "--model", FIXTURES / "opt-fp16-sharded")
    assert code == 0 and re.search(r"on disk     \d+ tensors float16\n", out)
    code, out, _ = call(capsys, "info", "--model", FIXTURES / "vit-cls")
    model = radial_min.load(FIXTURES / "vit-cls")
    assert code == 0 and f"parameters  {model.n_params:,}\n" in out
    assert "32px, patch 8, 16 patches, labels 5" in out and "float32" in out


def parse_classify(out):
    lines = out.splitlines()
    rows = [re.fullmatch(r"\s+([\d.]+)%\s+(\S+)", line) for line in lines[1:]]
    assert all(rows), out
    return lines[0], [(float(m.group(1)), m.group(2)) for m in rows]


@pytest.mark.slow
def test_classify_photo(capsys):
    shared("images", "chelsea.png")
    pytest.importorskip("PIL")  # a PNG
    code, out, err = call(capsys, "classify", PHOTO, "--model", FIXTURES / "vit-cls")
    assert code == 0 and err == ""
    head, rows = parse_classify(out)
    assert head == f"{PHOTO}:"
    probs = [p for p, _ in rows]
    labels = [name for _, name in rows]
    assert len(rows) == 5 and sorted(labels) == [f"class_{i}" for i in range(5)]
    assert probs == sorted(probs, reverse=True)
    assert sum(probs) <= 100.0 + 0.005 * len(probs) and sum(probs) > 99.9  # all 5 labels, each rounded to 0.01%
    model = radial_min.load(FIXTURES / "vit-cls")
    pixels = images.preprocess(images.read_image(PHOTO), images.read_preprocessor(model.path, 32))[None]
    expected = softmax_ref(model.forward(pixels)[0].astype("float64"))
    assert labels[0] == f"class_{int(expected.argmax())}"
    assert probs[0] == pytest.approx(100 * expected.max(), abs=0.006)


def test_classify_folder_with_top(capsys, tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "a.npy", rng.integers(0, 256, (40, 30, 3), dtype=np.uint8))
    np.save(tmp_path / "b.npy", rng.uniform(0, 255, (20, 50)).astype(np.float32))
    (tmp_path / "notes.txt").write_text("not an image")
    code, out, err = call(capsys, "classify", tmp_path, "--model", FIXTURES / "vit-cls", "--top", 3)
    assert code == 0 and err == ""
    blocks = re.split(r"(?m)^(?=\S)", out)
    blocks = [b for b in blocks if b]
    assert [b.splitlines()[0] for b in blocks] == [f"{tmp_path / 'a.npy'}:", f"{tmp_path / 'b.npy'}:"]
    for b in blocks:
        _, rows = parse_classify(b)
        probs = [p for p, _ in rows]
        assert len(rows) == 3 and probs == sorted(probs, reverse=True) and sum(probs) < 100.0


# ------------------------------------------------------------------------------------------------ help and errors


def subcommands():
    parser = cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(action.choices)


def test_every_subcommand_has_help(capsys):
    names = subcommands()
    assert {"generate", "classify", "info", "train", "profile", "simulate"} <= set(names)
    for name in names:
        code, out, err = call(capsys, name, "--help")
        assert code == 0 and out.startswith(f"usage: cli.py {name}") and err == "", name
    code, out, _ = call(capsys, "--help")
    assert code == 0 and all(name in out for name in names)


@pytest.mark.slow
def test_help_as_a_subprocess():
    p = run("generate", "--help")
    assert p.returncode == 0 and "--max-new-tokens" in p.stdout and p.stderr == ""


@pytest.fixture
def corrupt_checkpoint(tmp_path):
    folder = tmp_path / "corrupt"
    shutil.copytree(FIXTURES / "opt-pre", folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    return folder


def bad_inputs(tmp_path, corrupt, good_opt):
    missing = tmp_path / "no-such-model"
    return {
        "missing model folder": (["generate", "Hi", "--model", missing], f"{missing}: no such checkpoint folder"),
        "corrupt checkpoint": (["info", "--model", corrupt], "truncated"),
        "corrupt checkpoint, generate": (["generate", "--model", corrupt], "truncated"),
        "negative max-new-tokens": (
            ["generate", "Hi", "--model", good_opt, "--max-new-tokens", "-1"],
            "max_new_tokens must be >= 0",
        ),
        "top-p 2": (["generate", "Hi", "--model", good_opt, "--top-p", "2"], "top_p must be in (0, 1], got 2.0"),
        "negative temperature": (
            ["generate", "Hi", "--model", good_opt, "--temperature", "-1"],
            "temperature must be a finite number >= 0",
        ),
        "top-k 0": (["generate", "Hi", "--model", good_opt, "--top-k", "0"], "top_k must be >= 1"),
        "image does not exist": (
            ["classify", tmp_path / "nope.jpg", "--model", FIXTURES / "vit-cls"],
            "no such image file or folder",
        ),
        "classify an OPT": (
            ["classify", FIXTURES / "vit-cls", "--model", FIXTURES / "opt-pre"],
            "is an opt checkpoint, this command needs vit",
        ),
        "generate with a ViT": (
            ["generate", "--model", FIXTURES / "vit-cls"],
            "is a vit checkpoint, this command needs opt or llama or qwen2",
        ),
        "model without tokenizer": (["generate", "--model", FIXTURES / "opt-pre"], "no tokenizer"),
        "a file as model": (["info", "--model", FIXTURES / "opt-pre" / "config.json"], "is a file"),
        "not an image": (
            ["classify", FIXTURES / "vit-cls" / "config.json", "--model", FIXTURES / "vit-cls"],
            "not a readable image" if importlib.util.find_spec("PIL") else "images needs Pillow",
        ),
        "top -2": (
            ["classify", FIXTURES / "vit-cls", "--model", FIXTURES / "vit-cls", "--top", "-2"],
            "--top must be >= 1, got -2",
        ),
    }


def test_bad_inputs_give_one_error_line(capsys, tmp_path, corrupt_checkpoint, opt_with_tokenizer):
    for label, (args, fragment) in bad_inputs(tmp_path, corrupt_checkpoint, opt_with_tokenizer).items():
        code, out, err = call(capsys, *args)
        assert_one_line_error(code, err)
        assert fragment in err, (label, err)
        assert out == "", (label, out)  # nothing half-printed: settings are checked before the prompt is echoed


@pytest.mark.parametrize("label", ["missing model folder", "negative max-new-tokens", "classify an OPT"])
@pytest.mark.slow
def test_bad_inputs_as_a_subprocess(tmp_path, corrupt_checkpoint, opt_with_tokenizer, label):
    args, fragment = bad_inputs(tmp_path, corrupt_checkpoint, opt_with_tokenizer)[label]
    p = run(*args)
    assert p.returncode == 2 and p.stdout == ""
    assert_one_line_error(p.returncode, p.stderr)
    assert fragment in p.stderr


# ------------------------------------------------------------------------------------------------ profile, simulate


@pytest.mark.slow
def test_profile_end_to_end(capsys, tiny_random_opt, tmp_path):
    model_dir, text = tiny_random_opt
    out = tmp_path / "profile"
    code, stdout, err = call(
        capsys, "profile", "--model", model_dir, "--text", text, "--seq-len", 32, "--max-sequences", 2, "--out", out
    )
    assert code == 0, err
    assert f"results in {out}/" in stdout
    label = model_dir.name
    for name in ["summary.json", "summary.csv", f"ratios_{label}_prefill.npz"]:
        assert (out / name).is_file(), name
    pngs = ["ratio_hist.png", "layer_profile.png", f"routing_trace_{label}.png", f"depth_hist_{label}.png"]
    if importlib.util.find_spec("matplotlib") is not None:
        for name in pngs:
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name

    ratios = np.load(out / f"ratios_{label}_prefill.npz")
    assert ratios["ratios"].shape == (2 * 32, 4) and list(ratios["blocks"]) == ["L0.att", "L0.ffn", "L1.att", "L1.ffn"]
    summary = json.loads((out / "summary.json").read_text())
    s = summary[f"{label}/prefill"]
    medians = (
        [b["median"] for b in s["blocks"].values()]
        + [t["median"] for t in s["types"].values()]
        + [s["overall"]["median"]]
    )
    assert len(s["blocks"]) == 4 and all(math.isfinite(m) and m > 0 for m in medians)
    assert s["overall"]["median"] == pytest.approx(float(np.median(ratios["ratios"])), rel=1e-5)
    assert s["blocks"]["L1.ffn"]["median"] == pytest.approx(float(np.median(ratios["ratios"][:, 3])), rel=1e-5)
    rows = (out / "summary.csv").read_text().splitlines()
    assert rows[0].startswith("model,phase,block,") and len(rows) == 1 + 4 + 2 + 1  # 4 blocks, att/ffn, overall


@pytest.mark.slow
def test_simulate_end_to_end(capsys, tiny_random_opt, tmp_path):
    model_dir, text = tiny_random_opt
    out = tmp_path / "simulate"
    args = [
        *("simulate", "--model", model_dir, "--text", text),
        *"--seq-len 32 --max-sequences 2 --taus 0,0.5".split(),
        *("--out", out),
    ]
    code, stdout, err = call(capsys, *args)
    assert code == 0, err
    for name in ["simulate.json", "simulate.csv"]:
        assert (out / name).is_file(), name
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "ppl_vs_depth.png").read_bytes()[:4] == b"\x89PNG"
    result = json.loads((out / "simulate.json").read_text())
    assert (result["sequences"], result["seq_len"], len(result["blocks"])) == (2, 32, 4)
    rows = result["rows"]
    assert sorted((r["rule"], r["tau"]) for r in rows) == [("drop", 0.0), ("drop", 0.5), ("fill", 0.0), ("fill", 0.5)]
    for r in rows:
        assert math.isfinite(r["ppl"]) and r["ppl"] > 1
        if r["tau"] == 0:
            assert r["mean_depth"] == 4 and r["min_depth"] == r["max_depth"] == 4 and r["skip_rate"] == [0, 0, 0, 0]
        else:
            assert r["mean_depth"] < 4
    full = [r["ppl"] for r in rows if r["tau"] == 0]
    assert full[0] == pytest.approx(full[1], rel=1e-6)  # nothing skipped: the KV rule cannot matter
    csv_rows = (out / "simulate.csv").read_text().splitlines()
    assert len(csv_rows) == 5 and csv_rows[0].startswith("tau,rule,ppl,mean_depth")


@pytest.mark.slow
def test_without_shared_data_one_fast_line_names_the_option(capsys, monkeypatch, tmp_path, tiny_random_opt):
    """No ../shared/data: WikiText-2 would come from the Hub; without pyarrow, or offline, one line at once that
    names the command's own option for a text file."""
    import huggingface_hub

    model_dir, _ = tiny_random_opt
    monkeypatch.setattr(data, "SHARED", tmp_path / "no-shared-data")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # not installed
    code, _, err = call(capsys, "simulate", "--model", model_dir, "--seq-len", 32, "--out", tmp_path / "s")
    assert_one_line_error(code, err)
    assert "needs pyarrow (pip install pyarrow), or pass --text FILE" in err
    monkeypatch.setitem(sys.modules, "pyarrow", types.ModuleType("pyarrow"))  # installed, but offline
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", types.ModuleType("pyarrow.parquet"))

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    for args, option in ((["simulate"], "--text"), (["train-router"], "--train-text"), (["profile"], "--text")):
        code, _, err = call(capsys, *args, "--model", model_dir, "--seq-len", 32, "--out", tmp_path / "o")
        assert_one_line_error(code, err)
        assert f"fetching it from the Hub failed (ConnectionError); pass {option} FILE" in err, err


def test_profile_text_too_short(capsys, tiny_random_opt, tmp_path):
    model_dir, _ = tiny_random_opt
    short = tmp_path / "short.txt"
    short.write_text("too short")
    code, _, err = call(
        capsys, "profile", "--model", model_dir, "--text", short, "--seq-len", 32, "--out", tmp_path / "p"
    )
    assert_one_line_error(code, err)
    assert "fewer than one sequence of 32" in err
    code, _, err = call(
        capsys,
        "profile",
        "--model",
        model_dir,
        "--text",
        tmp_path / "missing.txt",
        "--seq-len",
        32,
        "--out",
        tmp_path / "p",
    )
    assert_one_line_error(code, err)
    assert "no such text file" in err


@pytest.mark.parametrize(
    "option,value", [("--seq-len", 0), ("--seq-len", -4), ("--max-sequences", 0), ("--max-sequences", -1)]
)
def test_profile_refuses_empty_packing(capsys, tiny_random_opt, tmp_path, option, value):
    model_dir, text = tiny_random_opt
    args = {"--seq-len": 16, "--max-sequences": 2, option: value}
    options = [x for kv in args.items() for x in kv]
    code, _, err = call(capsys, "profile", "--model", model_dir, "--text", text, *options, "--out", tmp_path)
    assert_one_line_error(code, err)
    assert f"argument {option}: expected an integer >= 1, got {value}" in err
    assert not (tmp_path / "summary.json").exists()


def test_profile_without_matplotlib_still_prints_and_saves_tables(capsys, tiny_random_opt, tmp_path, monkeypatch):
    """matplotlib is an optional extra: without it the tables, .npz, CSV and JSON come out, the PNGs do not."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    model_dir, text = tiny_random_opt
    out = tmp_path / "profile"
    code, stdout, err = call(
        capsys, "profile", "--model", model_dir, "--text", text, "--seq-len", 32, "--max-sequences", 2, "--out", out
    )
    assert code == 0, err
    assert "overall median" in stdout and "no plots: pip install matplotlib" in stdout
    assert (out / "summary.json").is_file() and (out / "summary.csv").is_file()
    assert not list(out.glob("*.png"))


# ------------------------------------------------------------------------------------------------ routing, training


@pytest.mark.slow
def test_train_router_then_generate_with_it(capsys, monkeypatch, tiny_random_opt, tmp_path):
    """Distil a router from the oracle on a tiny model, then generate through it: depths shown, summary printed."""
    model_dir, text = tiny_random_opt
    ratios = np.load(profile_ratios(capsys, model_dir, text, tmp_path))["ratios"]
    tau = float(np.median(ratios))  # a threshold that really splits this random model's blocks
    router = tmp_path / "r"
    args = [
        "train-router",
        "--model",
        model_dir,
        "--train-text",
        text,
        "--test-text",
        text,
        "--tau",
        tau,
        "--seq-len",
        32,
        "--max-sequences",
        3,
        "--test-sequences",
        1,
        "--epochs",
        2,
        "--out",
        router,
    ]
    code, out, err = call(capsys, *args)
    assert code == 0, err
    assert "accuracy against the oracle: decisions" in out and f"router saved to {router / 'router'}.safetensors" in out
    assert "on 1 held-out sequence " in out
    report = json.loads((router / "train_router.json").read_text())
    assert 0 <= report["accuracy_test"]["decision"] <= 1 and report["config"]["tau"] == tau
    assert set(report["runs"]) >= {"sequential", "router"} and report["runs"]["sequential"]["mean_depth"] == 4
    own, at = report["agreement_own_states"], report["at_router_depth"]
    assert 0 <= own["route"] <= own["move"] <= 1 and at["router"] == report["runs"]["router"]["ppl"]
    monkeypatch.chdir(tmp_path)  # the default --out, runs/router-tau<tau>, named from the router's own tau:
    evaluated = tmp_path / "runs" / f"router-tau{tau:g}"
    code, out, err = call(capsys, *args[:-2], "--tau", 0.2, "--evaluate", router)  # the same router, not retrained
    assert code == 0 and f"router {router} evaluated" in out and "train)" not in out, err
    again = json.loads((evaluated / "train_router.json").read_text())
    assert again["accuracy_test"] == report["accuracy_test"] and again["runs"] == report["runs"]
    assert not (evaluated / "router.json").exists() and not (tmp_path / "runs" / "router-tau0.2").exists()
    code, out, err = call(
        capsys,
        "generate",
        "The quick",
        "--model",
        model_dir,
        "--router",
        router,
        "--max-new-tokens",
        6,
        "--show-depth",
        "count",
    )
    assert code == 0, err
    subscripts = str.maketrans("₀₁₂₃₄₅₆₇₈₉", "0123456789")
    depths = [int(d.translate(subscripts)) for d in re.findall("[₀-₉]+", out)]
    assert 1 <= len(depths) <= 6 and all(0 <= d <= 4 for d in depths)
    assert re.search(r"\[routing: [\d.]+ of 4 blocks per token .* KV cache [\d.]+ KiB unified \(per-layer\)", err)
    code, _, err = call(capsys, "generate", "The quick", "--model", model_dir, "--router", router, "--max-depth", 0)
    assert_one_line_error(code, err)
    deep = ["generate", "The quick", "--model", model_dir, "--router", router, "--max-new-tokens", 2]
    code, _, err = call(capsys, *deep, "--max-depth", 10**6)
    assert code == 0 and "[routing:" in err, err
    parsed = cli.build_parser().parse_args([str(a) for a in deep] + ["--max-depth", str(10**9)])  # 22 GiB of walk
    assert cli._radial_network(radial_min.load(model_dir), parsed).max_depth == 4  # capped at the router's limit
    fill = ["generate", "The quick", "--model", model_dir, "--router", router, "--kv-rule", "fill", "--sink", 1]
    code, out, err = call(capsys, *fill, "--max-new-tokens", 3)
    assert code == 0 and "[routing:" in err, err
    code, _, err = call(capsys, *fill, "--cache-policy", "global")
    assert_one_line_error(code, err)
    assert "--kv-rule fill" in err and "per-layer" in err
    before = (router / "router.safetensors").read_bytes()
    code, _, err = call(capsys, *args)  # the same --out again: refused, the router untouched
    assert_one_line_error(code, err)
    assert "already holds router.safetensors" in err and "--overwrite" in err
    assert (router / "router.safetensors").read_bytes() == before


def profile_ratios(capsys, model_dir, text, tmp_path):
    out = tmp_path / "prof"
    assert (
        call(
            capsys, "profile", "--model", model_dir, "--text", text, "--seq-len", 32, "--max-sequences", 2, "--out", out
        )[0]
        == 0
    )
    return out / f"ratios_{model_dir.name}_prefill.npz"


def test_router_for_another_model_is_refused(capsys, tiny_random_opt):
    model_dir, _ = tiny_random_opt
    shipped = ROOT / "weights" / "opt-kjv-wiki" / "router-tau0.2"
    code, _, err = call(capsys, "generate", "x", "--model", model_dir, "--router", shipped)
    assert_one_line_error(code, err)
    assert "routes 12 blocks of width 256, but the model has 4 blocks of width 32" in err


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["profile", "--generate", "1"], "--generate"),
        (["simulate", "--seq-len", "300", "--max-sequences", "1"], "exceeds the model's max_position_embeddings"),
        (["train", "--eval-every", "0"], "--eval-every"),
    ],
)
def test_more_bad_inputs(capsys, tmp_path, args, fragment):
    code, _, err = call(capsys, *args, "--out", tmp_path / "o")
    assert_one_line_error(code, err)
    assert fragment in err


@pytest.mark.slow
def test_train_exports_a_checkpoint_that_generates(capsys, tmp_path):
    """`train` end to end on the default corpus with a tiny model: resumable state, log, loss curve, export, report."""
    shared("kjv", "kjv.txt")
    run_dir, export = tmp_path / "run", tmp_path / "export"
    size = "--vocab-size 300 --hidden-size 16 --layers 1 --heads 2 --seq-len 16 --batch-size 2 --eval-every 1".split()
    size += "--save-every 1 --warmup 1".split()
    code, _, err = call(capsys, "train", "--out", run_dir, *size, "--steps", 1)  # one step, no export
    assert code == 0 and "resuming" not in err and not export.exists(), err
    args = ["train", "--out", run_dir, "--export", export, "--steps", 2, *size]
    code, out, err = call(capsys, *args)
    assert code == 0, err
    assert f"{run_dir}: resuming at step 1 of 2" in err and re.search(r"^train  2/2 step \(100%\)", err, re.M)
    assert re.search(r"^evaluate  ([\d,]+)/\1 seq \(100%\).* in \d+:\d\d$", err, re.M), err  # the evaluation's bar
    assert re.search(r"^kjv\s+[\d,]+\s+[\d.]+\s+[\d.]+\s+[\d.]+$", out, re.M) and re.search(r"^wiki\s+", out, re.M)
    report = json.loads((run_dir / "report.json").read_text())
    assert report["kjv"]["model"] > 1 and report["kjv"]["unigram"] > 1
    assert [json.loads(line)["step"] for line in (run_dir / "log.jsonl").read_text().splitlines()] == [1, 2]
    assert radial_min.load(export).config.hidden_size == 16 and radial_min.Tokenizer(export).encode("In")[0] == 2
    code, _, err = call(capsys, *args)  # finished and exported: said so, nothing redone
    assert code == 0 and "already finished (step 2 of 2) and exported" in err and "evaluation" in err
    code, _, err = call(capsys, *args, "--steps", 3)  # more steps, but the export exists: refused before any work
    assert_one_line_error(code, err)
    assert f"--export {export}: the folder exists" in err
    for more in [], ["--export", export]:  # settings the saved state was not trained with
        code, _, err = call(capsys, "train", "--out", run_dir, *size, "--hidden-size", 32, *more)
        assert_one_line_error(code, err)  # refused before any work: no corpus prepared, no "resuming at step"
        assert f"{run_dir / 'train_config.json'}: state.safetensors was saved with hidden_size=16 (now 32)" in err
    (run_dir / "state.safetensors").unlink()  # a new run in the old run's folder: its prepared corpus is reused
    code, _, err = call(capsys, *args[:7], "--vocab-size", 500, "--overwrite")  # the run's tokenizer: 300 tokens
    assert code == 2 and "Traceback" not in err  # after the progress line, one error line
    assert err.splitlines()[-1].startswith("error: ") and "prepared with a vocabulary of 300, not 500" in err


@pytest.mark.slow
def test_train_preset_quick_trains_then_samples(capsys, tmp_path):
    """`train --preset quick`: the preset's settings under the options given (--steps 2 beats its 400), then a sample
    of 60 tokens after the prompt, printed."""
    shared("kjv", "kjv.txt")
    code, out, err = call(capsys, "train", "--preset", "quick", "--steps", 2, "--eval-every", 1, "--out", tmp_path)
    assert code == 0, err
    saved = json.loads((tmp_path / "train_config.json").read_text())
    quick = cli.tr.PRESETS["quick"]
    assert saved["steps"] == 2 and saved["out"] == str(tmp_path)
    assert all(saved[k] == v for k, v in quick.items() if k not in ("steps", "out", "eval_every")), saved
    assert f"sample (60 tokens, temperature 0.8, top-k 40):\n{cli.SAMPLE_PROMPT}" in out
    assert len(out.split(cli.SAMPLE_PROMPT, 1)[1].strip()) > 20  # 60 tokens of text, whatever the model says


@pytest.mark.slow
def test_train_on_the_hop_task(capsys, tmp_path):
    """`train --task hop:...`: the task's vocabulary, its masked loss, accuracy and blocks per label printed and
    saved; a bad task spec or a text-only option beside it is one error line."""
    opts = "--seq-len 22 --hidden-size 16 --layers 1 --heads 2 --steps 6 --batch-size 4 --eval-every 3"
    args = ["train", "--task", "hop:nodes=6,max_hops=2,curriculum=5", *opts.split(), "--eval-sequences", "8"]
    code, out, err = call(capsys, *args, "--out", tmp_path / "run")
    assert code == 0, err
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert saved["vocab_size"] == 6 + 2 + 3 and saved["task"] == "hop:nodes=6,max_hops=2,curriculum=5"
    rep = json.loads((tmp_path / "run" / "hop_report.json").read_text())
    assert rep["curriculum"] == 5 and rep["loss"] == "scored" and set(rep["accuracy"]) == {"0", "1", "2"}
    assert "2 hops" in out and rep["blocks"]["2"] == 2.0
    for bad, fragment in (
        ("hop:nodes=6,hops=2", "'hops=2' is not field=value"),
        ("maze", "expected 'text' or"),
        ("hop:nodes=6,max_hops=9", "HopTask.max_hops is 9"),
        ("hop:loss=some", "loss one of"),
    ):
        code, _, err = call(capsys, *args[:2], bad, *args[3:], "--out", tmp_path / "bad")
        assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1, err
    code, _, err = call(capsys, *args, "--vocab-size", 300, "--out", tmp_path / "bad")
    assert code == 2 and "the task's own 11 tokens" in err


# ------------------------------------------------------------------------------------------- newcomer's trips


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--vocab-size", 100], "--vocab-size 100: a byte-level BPE needs at least 260"),
        (["--hidden-size", 32, "--heads", 3], "--heads 3 must divide --hidden-size 32"),
        (["--seq-len", 1], "--seq-len 1"),
        (["--lr", 0], "--lr must be > 0"),
    ],
)
def test_train_checks_settings_before_any_work(capsys, tmp_path, args, fragment):
    code, _, err = call(capsys, "train", "--out", tmp_path / "run", *args)
    assert_one_line_error(code, err)
    assert fragment in err and not (tmp_path / "run").exists()  # refused before the corpus is prepared


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["simulate", "--taus", "0.1,abc"], "argument --taus: expected a threshold >= 0, got 'abc'"),
        (["simulate", "--taus", "0.1,-1"], "expected a finite threshold >= 0, got -1"),
        (["train-router", "--tau", "-0.2"], "--tau"),
        (["profile", "--tau", "nan"], "--tau"),
    ],
)
def test_bad_taus_are_named(capsys, args, fragment):
    code, _, err = call(capsys, *args)
    assert_one_line_error(code, err)
    assert fragment in err


def test_generate_warns_about_options_without_effect(capsys, opt_with_tokenizer):
    code, out, err = call(
        capsys,
        "generate",
        PROMPT,
        "--model",
        opt_with_tokenizer,
        "--max-new-tokens",
        2,
        "--top-p",
        0.9,
        "--min-p",
        0.1,
        "--cache-policy",
        "global",
        "--max-depth",
        3,
        "--system",
        "Be brief.",
    )
    assert code == 0
    assert "warning: --top-p/--min-p have no effect at --temperature 0" in err
    assert "warning: --system has no effect without --chat" in err
    assert "warning: --max-depth, --cache-policy have no effect without --router" in err
    code, out, err = call(
        capsys,
        "generate",
        PROMPT,
        "--model",
        opt_with_tokenizer,
        "--max-new-tokens",
        2,
        "--temperature",
        1,
        "--top-p",
        0.9,
        "--seed",
        0,
    )
    assert code == 0 and "warning" not in err


def test_generate_says_when_the_context_cuts_it_short(capsys, opt_with_tokenizer):
    context = radial_min.load(opt_with_tokenizer).config.max_position_embeddings
    code, _, err = call(
        capsys,
        "generate",
        PROMPT,
        "--model",
        opt_with_tokenizer,
        "--max-new-tokens",
        context + 5,
        "--quiet",
        "--repetition-penalty",
        1,
    )
    assert code == 0 and f"--max-new-tokens {context + 5}: the model's context of {context} tokens" in err


@pytest.mark.slow
def test_results_already_there_are_not_replaced(capsys, tiny_random_opt, tmp_path):
    model_dir, text = tiny_random_opt
    args = [
        *("simulate", "--model", model_dir, "--text", text),
        *"--seq-len 32 --max-sequences 1 --taus 0,0.5".split(),
        *("--out", tmp_path),
    ]
    (tmp_path / "simulate.json").write_text("mine")
    code, _, err = call(capsys, *args)
    assert_one_line_error(code, err)
    assert "already holds simulate.json; pass --overwrite to replace it, or" in err
    assert (tmp_path / "simulate.json").read_text() == "mine"
    (tmp_path / "simulate.csv").write_text("mine too")
    code, _, err = call(capsys, *args)
    assert_one_line_error(code, err)
    assert "already holds simulate.json, simulate.csv; pass --overwrite to replace them, or" in err
    code, out, err = call(capsys, *args, "--overwrite")
    assert code == 0 and json.loads((tmp_path / "simulate.json").read_text())["sequences"] == 1
    assert "1 sequence x 32 tokens, 4 blocks" in err


def test_every_option_has_help_and_a_stated_default():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        assert p.description, name
        for action in p._actions:
            if action.option_strings and action.dest != "help":
                assert action.help and "None" not in action.help % vars(action), (name, action.dest)
    kv_rule = next(a for a in sub.choices["simulate"]._actions if a.dest == "kv_rule")
    assert "one or more of fill, drop" in kv_rule.help and "both" not in kv_rule.help
    router_help = sub.choices["train-router"]
    assert router_help.get_default("out") is None and "runs/router-tau<tau>" in router_help.format_help()


def test_every_option_shows_its_default():
    """Each subcommand's options, flags included, say what they are when not given, in words a reader of any
    machine can use: no absolute path of this one."""
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        for action in p._actions:
            if not action.option_strings or action.dest == "help":
                continue
            shown = action.help % vars(action)
            assert ("(required)" if action.required else "(default: ") in shown, (name, action.dest, shown)
            assert str(ROOT.parent) not in shown and str(SHARED) not in shown, (name, action.dest, shown)
            if isinstance(action, argparse._StoreTrueAction):
                assert "(default: off" in shown, (name, action.dest, shown)


def test_train_options_are_the_training_settings():
    """`train` has one option per field of the training settings (train.py), whose help states the field's default;
    options not given leave the dataclass's defaults, so the parsed command is TrainConfig() itself. And
    --weights-dtype offers dtypes.STORAGE_DTYPES."""
    import dataclasses

    from radial_min.dtypes import STORAGE_DTYPES

    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    actions = {a.dest: a for a in sub.choices["train"]._actions}
    default = cli.tr.TrainConfig()
    for group, cls in cli.tr.GROUPS.items():
        for f in dataclasses.fields(cls):
            action = actions.pop(f.name)
            assert action.option_strings == [cli.tr.flag(f.name)], f.name
            value = getattr(getattr(default, group), f.name)
            shown = f.metadata["unset"] if value is None else "off" if value is False else value
            assert (
                f"(default: {shown:g})" in action.help
                if isinstance(shown, float)
                else f"(default: {shown})" in action.help
            )
    assert set(actions) == {"help", "preset", "sample", "export", "overwrite", "dtype"}
    args = parser.parse_args(["train"])
    assert cli.tr.TrainConfig.of(**{k: v for k, v in vars(args).items() if k in cli._TRAIN_FIELDS}) == default
    args = parser.parse_args(["train", "--layers", "3", "--lr", "1e-3", "--radial", "--cache-policy", "per-step"])
    cfg = cli.tr.TrainConfig.of(**{k: v for k, v in vars(args).items() if k in cli._TRAIN_FIELDS})
    assert (cfg.model.num_hidden_layers, cfg.optim.lr, cfg.radial.radial, cfg.radial.cache_policy) == (
        3,
        1e-3,
        True,
        "per-step",
    )
    generate = sub.choices["generate"]
    assert next(a for a in generate._actions if a.dest == "weights_dtype").choices is STORAGE_DTYPES


def test_count_grammar():
    assert cli.count(1, "sequence") == "1 sequence" and cli.count(2, "layer") == "2 layers"
    assert cli.count(1, "patch", "patches") == "1 patch" and cli.count(196, "patch", "patches") == "196 patches"


def test_the_compile_notice_clears_a_progress_line_on_a_terminal(monkeypatch):
    """The first compile's notice starts on a line of its own: on a terminal it first clears the bar drawn there."""

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for stream, prefix in ((Terminal(), "\r\x1b[K"), (io.StringIO(), "")):
        monkeypatch.setattr(sys, "stderr", stream)
        cli._compile_notice()
        assert stream.getvalue() == prefix + cli.COMPILE_NOTICE + "\n"
