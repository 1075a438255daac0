"""Hostile inputs through the command line, one of each kind tools/hostile_inputs.py found a traceback or a vague
line for: each now ends with exactly one `error:` line naming the file (or option) at fault, and exit code 2."""

import contextlib
import importlib.util
import io
import json
import os
import shutil
import struct
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from radial_min.router import Router, RouterConfig, init_router
from test_cli import call

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("hostile_inputs", ROOT / "tools" / "hostile_inputs.py")
hostile_inputs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hostile_inputs)
TRAIN = hostile_inputs.TRAIN


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """The battery's own tiny inputs: opt (+ tokenizer, router, text.txt), vit (+ img.npy), llama, run (2 steps)."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return hostile_inputs.build_bases(tmp_path_factory.mktemp("hostile"))


@pytest.fixture
def case(bases, tmp_path):
    """`case(base)`: a fresh copy of one of the base folders, to damage."""

    def make(base):
        d = tmp_path / base
        shutil.copytree(bases[base], d)
        return d

    return make


def refused(capsys, argv, *expect):
    code, _, err = call(capsys, *argv)
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in err, err
    for fragment in expect:
        assert fragment in errors[0], errors[0]
    return errors[0]


def edit_json(path, **changes):
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))


def generate(d, *extra):
    return ["generate", "In the", "--model", d, "--max-new-tokens", "2", *extra]


@pytest.mark.slow
def test_tokenizer_settings_of_the_wrong_type(case, capsys):
    d = case("opt")
    good = (d / "tokenizer_config.json").read_text()
    edit_json(d / "tokenizer_config.json", bos_token=5)
    refused(capsys, generate(d), "tokenizer_config.json: bos_token is 5, expected a token")
    (d / "tokenizer_config.json").write_text(good)
    (d / "special_tokens_map.json").write_text("[" * 1000 + "]" * 1000)
    refused(capsys, generate(d), "special_tokens_map.json: nested more than 64 levels deep")


def test_a_tokenizer_json_that_makes_the_library_panic(case, capfd):
    """A Replace normalizer whose regex matches the empty string makes the tokenizers library's Rust code panic at
    encode time (a PanicException, which `except Exception` does not catch, after a backtrace on stderr)."""
    d = case("opt")
    from radial_min.io.tokenizer import Tokenizer

    hf = json.loads(Tokenizer(d).backend.to_str())
    hf["normalizer"] = {"type": "Replace", "pattern": {"Regex": ""}, "content": "xx"}
    (d / "tokenizer.json").write_text(json.dumps(hf))
    code, _, err = call(capfd, *generate(d))  # capfd: what reaches file descriptor 2 too, not only sys.stderr
    assert code == 2 and len(err.splitlines()) == 1 and "tokenizer.json: failed on the text (index out of" in err, err


def test_a_tokenizer_larger_than_the_model(case, capsys):
    d = case("opt")
    vocab = json.loads((d / "vocab.json").read_text())
    vocab["Ġthe"] = 10**6
    (d / "vocab.json").write_text(json.dumps(vocab))
    refused(
        capsys, generate(d, "--temperature", "0"), "the tokenizer gives id 1000000, but the model's vocab_size is 384"
    )


def test_prompts_the_model_cannot_take(case, capsys):
    d = case("opt")
    refused(
        capsys, ["generate", "\udcff\udcfe", "--model", d], "the prompt is not valid UTF-8 (byte 0xff at position 0)"
    )
    refused(capsys, ["generate", "word " * 200, "--model", d], "the model takes 1 to 64")


@pytest.mark.parametrize(
    "option, value, expect",
    [
        ("--seed", "-1", "argument -s/--seed: expected an integer >= 0, got -1"),
        ("--seed", "x", "argument -s/--seed: expected an integer >= 0, got 'x'"),
        ("--min-p", "2", "--min-p: min_p must be in [0, 1], got 2.0"),
        ("--presence-penalty", "nan", "--presence-penalty: presence_penalty must be a finite number, got nan"),
        ("--top-k", "0", "--top-k: top_k must be >= 1, got 0"),
        ("--max-new-tokens", "-1", "--max-new-tokens: max_new_tokens must be >= 0"),
        ("--repetition-penalty", "nan", "--repetition-penalty: repetition_penalty must be a finite number > 0"),
        ("--repetition-penalty", "inf", "--repetition-penalty: repetition_penalty must be a finite number > 0"),
        ("--temperature", "inf", "--temperature: temperature must be a finite number >= 0, got inf"),
        ("--temperature", "1e309", "--temperature: temperature must be a finite number >= 0, got inf"),
    ],
)
def test_sampling_options_are_named_as_options(case, capsys, option, value, expect):
    refused(capsys, generate(case("opt"), option, value), expect)


def test_router_files(case, capsys):
    d = case("opt")
    refused(
        capsys,
        generate(d, "--router", d / "router", "--cache-policy", "global", "--step-encoding-scale", "nan"),
        "argument --step-encoding-scale: expected a number between 0 and 1000, got nan",
    )
    edit_json(d / "router.json", hidden=4)
    refused(capsys, generate(d, "--router", d / "router"), "router.safetensors: tensors", "do not match router.json")
    (d / "router.json").unlink()
    (d / "router.json").mkdir()
    refused(capsys, generate(d, "--router", d / "router"), "router.json: is a folder, expected a file")


def test_router_weights_must_be_finite(case, capsys):
    d = case("opt")
    cfg = RouterConfig(width=32, n_blocks=6, hidden=8)
    params = init_router(cfg)
    params["w2"][0, 0] = np.nan
    Router(cfg, params).save(d / "router")
    refused(capsys, generate(d, "--router", d / "router"), "router.safetensors: tensor 'w2' is not all finite")


def test_empty_text_names_the_file(case, capsys):
    d = case("opt")
    (d / "text.txt").write_text("")
    refused(
        capsys,
        ["profile", "--model", d, "--text", d / "text.txt", "--seq-len", "8", "--out", d / "out"],
        f"{d / 'text.txt'}: 1 token, fewer than one sequence of 8 (--seq-len)",
    )


def test_images_and_their_preprocessing(case, capsys):
    d = case("vit")
    raw = (d / "img.npy").read_bytes()
    end = raw.index(b"\n", 10) + 1
    header = b"{'descr': '|u1', 'fortran_order': False, 'shape': (100000, 100000, 3), }"
    (d / "bomb.npy").write_bytes(raw[:8] + struct.pack("<H", len(header) + 1) + header + b"\n" + raw[end:])
    refused(
        capsys,
        ["classify", d / "bomb.npy", "--model", d],
        "bomb.npy: not a readable .npy array",
        "the header declares uint8[100000, 100000, 3], more than the",
    )
    np.save(d / "nan.npy", np.full((4, 4, 3), np.nan))
    refused(capsys, ["classify", d / "nan.npy", "--model", d], "nan.npy: has NaN or infinite pixel values")
    pre = d / "preprocessor_config.json"
    pre.write_text(json.dumps({"image_std": [0, 0, 0]}))
    refused(capsys, ["classify", d / "img.npy", "--model", d], "field 'image_std' is 0, expected 1e-06 to 1000000.0")
    pre.write_text(json.dumps({"do_resize": False}))
    refused(
        capsys,
        ["classify", d / "img.npy", "--model", d],
        "img.npy: the model takes 32x32 pixels; preprocessor_config.json: do_resize is false",
    )
    pre.write_text(json.dumps({"size": 48}))
    refused(capsys, ["classify", d / "img.npy", "--model", d], "preprocessor_config.json: its field 'size' is 48x48")


def test_a_llama_config_with_two_billion_layers(case, capsys):
    d = case("llama")
    edit_json(d / "config.json", num_hidden_layers=2**31)
    refused(capsys, ["info", "--model", d], "config.json: num_hidden_layers must be a positive integer up to 1024")


def test_training_settings_that_cannot_fit(case, capsys):
    d = case("run")
    refused(capsys, TRAIN + ["--out", d, "--hidden-size", str(10**6)], "training would need about", "GiB are available")


@pytest.fixture
def trained(case, capsys):
    d = case("run")
    code, _, err = call(capsys, *TRAIN, "--out", d, "--steps", "2")
    assert code == 0, err
    return d


def test_a_run_folder_with_broken_files(trained, capsys):
    d, resume = trained, TRAIN + ["--out", trained, "--steps", "3"]
    state = (d / "state.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", state[:8])
    header = json.loads(state[8 : 8 + n])
    header["__metadata__"] = {"format": "pt"}
    head = json.dumps(header).encode()
    (d / "state.safetensors").write_bytes(struct.pack("<Q", len(head)) + head + state[8 + n :])
    refused(capsys, resume, "state.safetensors: metadata 'step' is '', expected the number of steps done")
    (d / "state.safetensors").write_bytes(state)
    edit_json(d / "train_config.json", lr=0.5)
    refused(capsys, resume, "train_config.json: state.safetensors was saved with lr=0.5")


@pytest.mark.slow
def test_a_run_saved_before_the_routing_settings_existed_resumes(trained, capsys):
    """An older train_config.json does not name the settings added since: they were their defaults then."""
    d = json.loads((trained / "train_config.json").read_text())
    old = {k: v for k, v in d.items() if k not in ("radial", "router_lr", "cost_rate", "depth_weight")}
    (trained / "train_config.json").write_text(json.dumps(old))
    code, _, err = call(capsys, *TRAIN, "--out", trained, "--steps", "3")
    assert code == 0, err
    assert json.loads((trained / "log.jsonl").read_text().splitlines()[-1])["step"] == 3


def test_state_tensors_are_checked_against_the_run(trained, capsys):
    from radial_min.io.checkpoint import SafetensorsFile, write_safetensors

    f = SafetensorsFile(trained / "state.safetensors")
    tensors = {n: f.read(n) for n in f.entries if n != "adam.v.decoder.final_layer_norm.bias"}
    write_safetensors(trained / "state.safetensors", tensors, f.metadata)
    refused(
        capsys,
        TRAIN + ["--out", trained, "--steps", "3"],
        "state.safetensors: tensors missing, unexpected or of "
        "the wrong shape for this run's model: 'adam.v.decoder.final_layer_norm.bias'",
    )


@pytest.mark.parametrize(
    "damage, expect",
    [
        (lambda z: z.update(train=z["train"] + 10_000), "'train' is not a 1-D stream of token ids below 300"),
        (lambda z: z.update(train=z["train"][:5]), "the train stream holds fewer than --seq-len + 2 = 10 tokens"),
        (lambda z: z.pop("train"), "expected a 'train' stream"),
        (lambda z: z.update(vocab_size=np.array("x")), "'vocab_size' is missing or not a vocabulary size"),
        (None, "not a readable token cache (BadZipFile"),
    ],
)
def test_a_broken_token_cache(case, capsys, damage, expect):
    d = case("run")
    path = d / "tokens.npz"
    if damage is None:
        path.write_bytes(path.read_bytes()[:-20])
    else:
        z = dict(np.load(path))
        damage(z)
        np.savez(path, **z)
    refused(capsys, TRAIN + ["--out", d, "--steps", "2"], "tokens.npz", expect)


def test_control_characters_never_reach_the_terminal(capsys, monkeypatch):
    """The last guard: whatever a message carries, the error line is one line without terminal escapes."""
    import test_cli

    from radial_min.errors import RadialError

    def forged(args):
        raise RadialError("x.bin: tensor a\nerror: all good\x1b[0m")

    parser = test_cli.cli.build_parser()
    monkeypatch.setattr(test_cli.cli, "build_parser", lambda *a: parser)
    monkeypatch.setattr(parser, "parse_args", lambda argv: SimpleNamespace(func=forged))
    line = refused(capsys, ["info"], "x.bin: tensor a\\nerror: all good\\x1b[0m")
    assert "\x1b" not in line


def simulate(d, *extra):
    return ["simulate", "--model", d, "--text", d / "text.txt", "--seq-len", "8", "--max-sequences", "2", *extra]


def test_one_token_sequences_have_no_perplexity(case, capsys, tmp_path):
    d = case("opt")
    refused(capsys, simulate(d, "--out", tmp_path / "o", "--seq-len", "1"), "perplexity needs at least 2", "--seq-len")


def test_a_step_encoding_scale_outside_radial_jsons_range(case, capsys):
    d = case("opt")
    extra = ("--router", d / "router", "--cache-policy", "global", "--step-encoding-scale", "-1")
    refused(capsys, generate(d, *extra), "argument --step-encoding-scale: expected a number between 0 and 1000")


def test_output_folders_that_cannot_be_one(case, capsys, tmp_path, monkeypatch):
    d = case("opt")
    text = d / "text.txt"
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # `--out ''` wrote into the current folder
    for out, expect in [
        ("", "--out '': expected a folder name"),
        (text, f"--out {text}: is a file, expected a folder"),
        ("/dev/null", "--out /dev/null: is a character device, expected a folder"),
        (text / "sub", f"--out {text / 'sub'}: {text} is a file, not a folder to write in"),
    ]:
        refused(capsys, simulate(d, "--out", out), expect)
        refused(capsys, ["profile", *simulate(d, "--out", out)[1:]], expect)
    assert list((tmp_path / "cwd").iterdir()) == []


def test_a_run_folder_whose_files_are_not_files(case, capsys):
    d = case("run")
    (d / "log.jsonl").unlink()
    (d / "log.jsonl").mkdir()
    refused(capsys, TRAIN + ["--out", d, "--steps", "3"], "log.jsonl: is a folder, expected a file")
    (d / "log.jsonl").rmdir()
    (d / "state.safetensors").unlink()
    os.mkfifo(d / "state.safetensors")  # was taken as no state: the run started again at step 0
    refused(capsys, TRAIN + ["--out", d, "--steps", "3"], "state.safetensors: is a FIFO, expected a file")


def test_one_enormous_word_is_refused_before_tokenizing(case, capsys, tmp_path):
    d = case("opt")
    (d / "text.txt").write_text("In the " + "a" * 1_000_000)  # the audit's was 20 MB: 3.8 GB and growing at 60 s
    start = time.perf_counter()
    refused(capsys, simulate(d, "--out", tmp_path / "o"), "text.txt: characters 65,536 to 131,072 hold no break")
    assert time.perf_counter() - start < 10


def test_an_image_far_larger_than_the_model_needs(case, capsys):
    pytest.importorskip("PIL")
    from test_refusals import png

    d = case("vit")
    png(d / "huge.png", 7000, 7000)
    refused(
        capsys, ["classify", d / "huge.png", "--model", d], "huge.png: image is 7000x7000, over 4,096 pixels a side"
    )


def test_resuming_a_state_that_is_not_finite(trained, capsys):
    from radial_min.io.checkpoint import SafetensorsFile, write_safetensors

    f = SafetensorsFile(trained / "state.safetensors")
    tensors = {n: f.read(n) for n in f.entries}
    tensors["adam.v.decoder.final_layer_norm.bias"][0] = -1.0
    write_safetensors(trained / "state.safetensors", tensors, f.metadata)
    refused(capsys, TRAIN + ["--out", trained, "--steps", "3"], "state.safetensors: tensor", "has negative values")


def test_a_log_with_lines_nested_too_deep_is_repaired(trained, capsys):
    log = trained / "log.jsonl"
    log.write_text(log.read_text() + "[" * 100_000 + "\n" + '{"step": ' + "9" * 5000 + "}\n")
    code, _, err = call(capsys, *TRAIN, "--out", trained, "--steps", "3")
    assert code == 0, err
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3]


# One case per reader the battery feeds: refused, naming the file, shows the case reached that reader. A change that
# left a reader out of tools/hostile_inputs.py (or a case that no longer reaches it) fails here.
REACHED = {
    "config.json": "a 5,000-digit integer",
    "model.safetensors.index.json": "a 5,000-digit integer",
    "router.json": "a 5,000-digit integer",
    "tokenizer_config.json": "a 5,000-digit integer",
    "special_tokens_map.json": "a 5,000-digit integer",
    "vocab.json": "a 5,000-digit integer",
    "tokenizer.json": "a 5,000-digit integer",
    "preprocessor_config.json": "a 5,000-digit integer",
    "train_config.json": "a 5,000-digit integer",
    "radial.json": "a 5,000-digit integer",
    "model.safetensors": "empty file",
    "model-00001-of-00003.safetensors": "a link to a text file",
    "router.safetensors": "weights of 3e38",
    "state.safetensors": "a FIFO",
    "pytorch_model.bin": "empty file",
    "merges.txt": "invalid UTF-8",
    "tokens.npz": "empty file",
    "log.jsonl": "a folder",
    "text.txt": "one 20 MB word",
    "img.npy": "pixels over 255",
    "img.png": "a 7000x7000 PNG of zeros",
    "img.tif": "a directory that points to itself",
    "img.ppm": "16-bit, truncated",
    "model.gguf": "offset 2**64 - 1",  # the first tensor's
}


@pytest.mark.slow
def test_the_battery_reaches_every_reader(bases, tmp_path):
    import random

    cases = list(hostile_inputs.cases(bases, random.Random(0)))
    optional = {"img.png", "img.tif", "img.ppm", "model.gguf"}  # with Pillow, with the gguf package
    for rel, label in REACHED.items():
        case = next((c for c in cases if rel in c.edits and label in c.label), None)
        if case is None and rel in optional:
            continue
        assert case is not None, f"no case of {rel} labelled {label!r}"
        outcomes = hostile_inputs.run_case(case, bases, tmp_path, timeout=60, factor=20)
        assert [o for o, _, _ in outcomes] == ["refused"] * len(case.commands), (case.label, outcomes)
