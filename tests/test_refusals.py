"""Hostile inputs refused at their mechanism, one test per root cause: the JSON reader every JSON file goes through,
files that are not regular, output folders, shapes checked before allocation, image and text sizes bounded before
decoding or tokenizing, GGUF tensor tables, config nulls, sampling settings, resumed training states. Each ends in
one error line naming the file (or setting) and what was expected, or in the right result."""

import json
import os
import re
import struct
import time
import tracemalloc
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import radial_min
from radial_min.models import read_config
from radial_min.errors import CheckpointError, RadialError, SettingError
from radial_min.generation import check_sampling, sample
from radial_min.io import images
from radial_min.io.checkpoint import SafetensorsFile, open_checkpoint
from radial_min.io.gguf_file import check_layout
from radial_min.io.outputs import check_out, parse_json, present, read_json, read_json_lines
from radial_min.io.tokenizer import CHUNK, Tokenizer
from radial_min.optim import check_state
from radial_min.router import Router, RouterConfig, init_router

FIXTURES = Path(__file__).parent / "fixtures"
BIG_INT = "9" * 5000  # over Python's 4,300-digit limit for int(str): an uncaught ValueError in json.loads


def one_line(error, path):
    msg = str(error)
    assert msg.startswith(f"{path}: ") and "\n" not in msg and len(msg) < 600, msg
    return msg


# ------------------------------------------------------------------------------------------------ the JSON reader


@pytest.mark.parametrize(
    "text, expect",
    [
        ('{"a": ' + BIG_INT + "}", "has an integer of 5,000 digits (at most 40)"),
        ('{"a": -' + "1" * 41 + "}", "has an integer of 41 digits"),
        ('{"a": ' + "[" * 65 + "]" * 65 + "}", "nested more than 64 levels deep"),
        ("[" * 100_000 + "]" * 100_000, "nested more than 64 levels deep"),
        ('{"a": 1, "a": 2}', "names 'a' twice"),
        ('{"a": {"b": 1, "b": 1}}', "names 'b' twice"),
        ('{"a": "\\udc80"}', "has a lone UTF-16 surrogate in a string"),
        ('{"\\ud800": 1}', "has a lone UTF-16 surrogate in a string"),
        ('{"a": 1,}', "not valid JSON (Expecting property name"),
    ],
)
def test_json_reader_bounds(tmp_path, text, expect):
    path = tmp_path / "x.json"
    path.write_text(text)
    with pytest.raises(RadialError) as e:
        read_json(path)
    assert expect in one_line(e.value, path)


def test_json_reader_accepts_what_real_files_hold(tmp_path):
    deep = {"a": 1}
    for _ in range(61):
        deep = {"a": deep}  # 62 objects, in a list, in the top object: 64 levels
    value = {"big": 2**64, "neg": -(10**39), "pair": "\U0001f600", "nan": float("nan"), "deep": [deep]}
    path = tmp_path / "x.json"
    path.write_text(json.dumps(value))  # the emoji as a surrogate pair, "\\ud83d\\ude00": valid
    got = read_json(path)
    assert got["big"] == 2**64 and got["neg"] == -(10**39) and got["pair"] == "\U0001f600" and np.isnan(got["nan"])


def test_json_reader_refuses_utf16_and_names_the_part(tmp_path):
    with pytest.raises(CheckpointError, match=r"^h.safetensors: header is not UTF-8 \(byte 0xff at 0\)$"):
        parse_json('{"a": 1}'.encode("utf-16"), "h.safetensors", CheckpointError, "header")


@pytest.mark.parametrize("kind", ["folder", "fifo", "dangling link", "too big"])
def test_json_reader_refuses_what_is_not_a_small_regular_file(tmp_path, kind):
    path = tmp_path / "config.json"
    if kind == "folder":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)  # opening it would block until a writer came: the reader must not open it
    elif kind == "dangling link":
        path.symlink_to(tmp_path / "nowhere.json")
    else:
        path.write_text('{"a": "' + "x" * 100 + '"}')
    start = time.perf_counter()
    with pytest.raises(RadialError) as e:
        read_json(path, max_bytes=64)
    msg = one_line(e.value, path)
    assert time.perf_counter() - start < 5
    expected = {"folder": "is a folder", "fifo": "is a FIFO", "dangling link": "a symbolic link to nothing"}
    assert expected.get(kind, "over the 64 bytes a file of this kind may hold") in msg


def test_present_tells_absent_from_unusable(tmp_path):
    assert present(tmp_path / "nope") is False
    (tmp_path / "f").write_text("x")
    assert present(tmp_path / "f") is True
    with pytest.raises(RadialError, match="File name too long"):
        present(tmp_path / ("x" * 100_000))


def test_json_lines_keep_bad_lines_as_none(tmp_path):
    path = tmp_path / "log.jsonl"
    lines = ['{"step": 1}\n', "[" * 100_000 + "\n", '{"step": ' + BIG_INT + "}\n", '{"step": 2}\n', '{"step": 3, "lo']
    path.write_text("".join(lines))
    got = read_json_lines(path)
    assert [line for line, _ in got] == lines
    assert [value for _, value in got] == [{"step": 1}, None, None, {"step": 2}, None]


# The JSON files the project reads, each through its own reader: a 5,000-digit integer is refused naming the file.
def _router(folder):
    cfg = RouterConfig(width=8, n_blocks=2, hidden=4)
    Router(cfg, init_router(cfg)).save(folder / "router")
    return folder / "router.json", lambda: Router.load(folder / "router")


def _config(folder):
    return folder / "config.json", lambda: read_config(folder)


def _index(folder):
    import shutil

    shutil.copytree(FIXTURES / "opt-fp16-sharded", folder / "m")
    return folder / "m" / "model.safetensors.index.json", lambda: open_checkpoint(folder / "m")


def _tokenizer(name):
    def make(folder):
        from radial_min import data

        data.train_tokenizer(["In the beginning God created the heaven and the earth."] * 20, 300, folder)
        return folder / name, lambda: Tokenizer(folder)

    return make


def _preprocessor(folder):
    return folder / "preprocessor_config.json", lambda: images.read_preprocessor(folder, 32)


def _train_config(folder):
    from radial_min import train as tr

    (folder / "state.safetensors").write_bytes(b"")
    return folder / "train_config.json", lambda: tr.check_resume(tr.TrainConfig.of(out=str(folder)))


READERS = {
    "config.json": _config,
    "model.safetensors.index.json": _index,
    "router.json": _router,
    "tokenizer_config.json": _tokenizer("tokenizer_config.json"),
    "special_tokens_map.json": _tokenizer("special_tokens_map.json"),
    "preprocessor_config.json": _preprocessor,
    "train_config.json": _train_config,
}


@pytest.mark.parametrize("name", sorted(READERS))
def test_every_json_file_goes_through_the_bounded_reader(tmp_path, name):
    path, read = READERS[name](tmp_path)
    path.write_text('{"model_type": "opt", "x": ' + BIG_INT + "}")
    with pytest.raises(RadialError) as e:
        read()
    assert "has an integer of 5,000 digits" in one_line(e.value, path)


def test_a_radial_json_goes_through_the_bounded_reader(tmp_path):
    from radial_min.radial import load_radial

    path = tmp_path / "radial.json"
    path.write_text('{"router": "router", "max_depth": ' + BIG_INT + "}")
    with pytest.raises(CheckpointError, match="has an integer of 5,000 digits"):
        load_radial(SimpleNamespace(blocks=[0, 1], config=SimpleNamespace(hidden_size=8)), tmp_path)


# ------------------------------------------------------------------------------------------------ checkpoint files


def test_a_linked_text_file_is_not_a_safetensors_file_and_its_bytes_are_not_shown(tmp_path):
    text = tmp_path / "passwd"
    text.write_text("root:x:0:0:root:/root:/bin/bash\n")
    link = tmp_path / "model.safetensors"
    link.symlink_to(text)
    with pytest.raises(CheckpointError) as e:
        SafetensorsFile(link)
    msg = one_line(e.value, link)
    assert "not a safetensors file" in msg
    assert str(struct.unpack("<Q", b"root:x:0")[0]) not in msg and "8f" not in msg


def test_a_shard_name_of_100_kb_is_refused_in_a_short_line(tmp_path):
    import shutil

    shutil.copytree(FIXTURES / "opt-fp16-sharded", tmp_path / "m")
    index = tmp_path / "m" / "model.safetensors.index.json"
    d = json.loads(index.read_text())
    d["weight_map"][next(iter(d["weight_map"]))] = "x" * 100_000
    index.write_text(json.dumps(d))
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(tmp_path / "m")
    assert "is not a file name inside" in one_line(e.value, index)


def test_a_fifo_in_place_of_the_weights_is_refused_not_skipped(tmp_path):
    import shutil

    shutil.copytree(FIXTURES / "opt-pre", tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    os.mkfifo(tmp_path / "m" / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors: is a FIFO, expected a file"):
        open_checkpoint(tmp_path / "m")


# ------------------------------------------------------------------------------------------------ routers


def test_router_shapes_are_checked_before_anything_of_their_size_is_allocated(tmp_path):
    """A 1 KB router.json with huge width and hidden: the shapes it implies are compared with the weights file's
    header first (init_router of these would allocate 134 MB here, 32 GiB at 65536)."""
    _, load = _router(tmp_path)
    d = json.loads((tmp_path / "router.json").read_text())
    (tmp_path / "router.json").write_text(json.dumps({**d, "width": 4096, "hidden": 4096}))
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match="router.safetensors: tensors .* do not match router.json"):
            load()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, peak


def test_router_weights_whose_logits_overflow_float32_are_refused(tmp_path):
    cfg = RouterConfig(width=8, n_blocks=2, hidden=4)
    params = init_router(cfg)
    params["w1"][:] = 3e38
    Router(cfg, params).save(tmp_path / "router")
    with pytest.raises(CheckpointError, match="router.safetensors: weights so large that the router's logits"):
        Router.load(tmp_path / "router")
    params["w1"][:] = 1.0  # large but harmless: loads
    Router(cfg, params).save(tmp_path / "router")
    assert Router.load(tmp_path / "router").params["w1"][0, 0] == 1.0


# ------------------------------------------------------------------------------------------------ config.json

LLAMA = dict(model_type="llama", vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=2)
LLAMA.update(intermediate_size=16)
OPT = dict(model_type="opt", vocab_size=50, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, ffn_dim=16)


@pytest.mark.parametrize(
    "base, field, expect",
    [
        (LLAMA, "rms_norm_eps", "field 'rms_norm_eps' is null, expected a value"),
        (LLAMA, "hidden_act", "field 'hidden_act' is null"),
        (LLAMA, "rope_theta", "field 'rope_theta' is null"),
        (OPT, "ffn_dim", "field 'ffn_dim' is null"),
        (OPT, "do_layer_norm_before", "field 'do_layer_norm_before' is null"),
    ],
)
def test_config_nulls_are_refused_not_defaulted(tmp_path, base, field, expect):
    (tmp_path / "config.json").write_text(json.dumps({**base, field: None}))
    with pytest.raises(CheckpointError) as e:
        read_config(tmp_path)
    assert expect in one_line(e.value, tmp_path / "config.json")


def test_config_nulls_that_mean_something_are_read(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**OPT, "word_embed_proj_dim": None, "eos_token_id": None}))
    cfg = read_config(tmp_path)
    assert cfg.word_embed_proj_dim == 8 and cfg.eos_token_id == -1  # none: generation never stops at it
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA, "num_key_value_heads": None, "bos_token_id": None}))
    cfg = read_config(tmp_path)
    assert cfg.num_key_value_heads == 2 and cfg.bos_token_id is None


@pytest.mark.parametrize("field", ["bos_token_id", "eos_token_id", "pad_token_id"])
def test_opt_token_ids_are_inside_the_vocabulary(tmp_path, field):
    (tmp_path / "config.json").write_text(json.dumps({**OPT, field: 50}))
    with pytest.raises(CheckpointError, match=f"field '{field}' is 50, expected a token id below vocab_size 50"):
        read_config(tmp_path)


# ------------------------------------------------------------------------------------------------ tokenizers


@pytest.fixture
def tok_folder(tmp_path):
    from radial_min import data

    text = "In the beginning God created the heaven and the earth. And the earth was without form, and void."
    data.train_tokenizer([text] * 20, 300, tmp_path)
    return tmp_path


def test_a_tokenizer_json_fifo_is_refused_not_taken_as_absent(tok_folder):
    os.mkfifo(tok_folder / "tokenizer.json")  # vocab.json and merges.txt are there too: no silent fallback
    with pytest.raises(CheckpointError, match="tokenizer.json: is a FIFO, expected a file"):
        Tokenizer(tok_folder)


def test_a_tokenizer_json_truncation_does_not_cut_the_text(tok_folder):
    Tokenizer(tok_folder).backend.save(str(tok_folder / "tokenizer.json"))
    d = json.loads((tok_folder / "tokenizer.json").read_text())
    d["truncation"] = {"max_length": 0, "stride": 0, "strategy": "LongestFirst", "direction": "Right"}
    d["padding"] = {"strategy": {"Fixed": 64}, "direction": "Right", "pad_to_multiple_of": None, "pad_id": 1}
    d["padding"].update(pad_type_id=0, pad_token="<pad>")
    (tok_folder / "tokenizer.json").write_text(json.dumps(d))
    tok = Tokenizer(tok_folder)
    (tok_folder / "tokenizer.json").unlink()
    assert tok.encode("And the earth").tolist() == Tokenizer(tok_folder).encode("And the earth").tolist()
    assert len(tok.encode("And the earth")) == 4


def test_duplicate_ids_in_vocab_json_are_refused(tok_folder):
    vocab = json.loads((tok_folder / "vocab.json").read_text())
    vocab["Ġthe"] = vocab["Ġearth"]
    (tok_folder / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(CheckpointError, match=r"vocab.json: tokens '.*' and '.*' both have id \d+"):
        Tokenizer(tok_folder)


def test_a_lone_surrogate_special_token_is_refused_by_name(tok_folder):
    path = tok_folder / "tokenizer_config.json"
    path.write_text(path.read_text().replace('"unk_token": "</s>"', '"unk_token": "\\udc80"'))
    with pytest.raises(CheckpointError, match="tokenizer_config.json: has a lone UTF-16 surrogate"):
        Tokenizer(tok_folder)


def test_one_enormous_word_is_refused_before_tokenizing(tok_folder):
    tok = Tokenizer(tok_folder)
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=r"^big.txt: characters 65,536 to 131,072 hold no break between words"):
        tok.encode("In the " + "a" * 1_000_000, source="big.txt")  # (20 MB: gigabytes, minutes)
    assert time.perf_counter() - start < 2


def long_text(n, extra=()):
    rng = np.random.default_rng(0)
    pieces = ["the", " ", "\n", "\n\n", " \n", "  ", "\t", "123", "4.5", "é", "?!", "don't", "'s", "Heaven", "日本"]
    return "".join(rng.choice(pieces + list(extra), n))


def test_a_long_text_is_tokenized_in_pieces_with_the_ids_of_the_whole(tok_folder):
    tok = Tokenizer(tok_folder)
    text = long_text(CHUNK, ["</s>", "<pad>"])
    assert len(text) > 2 * CHUNK
    pieces = list(tok._pieces(text, "t"))
    assert len(pieces) > 2 and "".join(pieces) == text
    whole = [tok.bos_id] + tok.backend.encode(text, add_special_tokens=False).ids
    assert tok.encode(text).tolist() == whole


def test_a_tokenizer_that_cannot_be_cut_tokenizes_the_text_whole(tok_folder):
    """A normalizer that prepends a marker to every text (Llama 2's) makes every cut change the tokens: the check
    finds none that keeps them, and the text is tokenized whole, with the same ids."""
    from tokenizers import normalizers

    tok = Tokenizer(tok_folder)
    tok.backend.normalizer = normalizers.Prepend("Ġ")
    text = long_text(CHUNK)
    assert len(text) > 2 * CHUNK
    assert len(list(tok._pieces(text, "t"))) == 1
    assert tok.encode(text, bos=False).tolist() == tok.backend.encode(text, add_special_tokens=False).ids


# ------------------------------------------------------------------------------------------------ images


def png(path, width, height, rows: bytes = b""):
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    )
    return path


def test_an_image_far_larger_than_the_model_needs_is_refused_before_decoding(tmp_path):
    """A 7000x7000 PNG of zeros: 143 KB, under Pillow's bomb limits, 147 MB decoded (2.5 GB and a minute in the old
    resize). For a 224-pixel model no side needs more than 4096: refused from the header, PNG or .npy."""
    settings = {"size": (224, 224), "do_resize": True, "do_rescale": True, "do_normalize": False}
    np.save(tmp_path / "row.npy", np.zeros((1, 5000, 3), np.uint8))
    with pytest.raises(RadialError, match=r"row.npy: image is 5000x1, over 4,096 pixels a side"):
        images.model_pixels(tmp_path / "row.npy", settings, 224)
    assert images.side_limit(1024) == 4096 and images.side_limit(2048) == 8192
    pytest.importorskip("PIL")
    path = png(tmp_path / "zeros.png", 7000, 7000)
    start = time.perf_counter()
    with pytest.raises(RadialError, match=r"zeros.png: image is 7000x7000, over 4,096 pixels a side"):
        images.model_pixels(path, settings, 224)
    assert time.perf_counter() - start < 2


def test_resize_needs_no_copy_of_the_image_in_64_bit_integers():
    a = np.random.default_rng(0).integers(0, 256, (1024, 1024, 3)).astype(np.uint8)
    tracemalloc.start()
    try:
        out = images.resize(a, 224, 224)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out.shape == (224, 224, 3) and peak < 4 * a.nbytes, peak  # the old path: 8 x the image, twice


@pytest.mark.parametrize(
    "array, expect",
    [
        (np.full((4, 4, 3), 1e6, np.float32), "pixel values run from 1e+06 to 1e+06, expected 0..255"),
        (np.full((4, 4, 3), -1.0, np.float64), "pixel values run from -1 to -1"),
        (np.full((4, 4, 3), 4096, np.uint16), "pixel values run from 4096 to 4096"),
    ],
)
def test_npy_pixels_outside_0_255_are_refused(tmp_path, array, expect):
    np.save(tmp_path / "x.npy", array)
    with pytest.raises(RadialError, match=re.escape(expect)):
        images.read_image(tmp_path / "x.npy")


def tiff(path, next_offset=0):
    """A TIFF made by hand: little-endian header, one directory at byte 8 with no entries, then `next_offset`."""
    path.write_bytes(b"II*\0" + struct.pack("<I", 8) + struct.pack("<H", 0) + struct.pack("<I", next_offset))
    return path


@pytest.mark.parametrize("next_offset, why", [(8, "loops back to an earlier one"), (4000, "points outside the file")])
def test_a_tiff_whose_directories_loop_is_refused(tmp_path, next_offset, why):
    """Pillow stops quietly at a directory that points back to itself; the chain is followed first (without Pillow
    too), and a loop or a pointer out of the file refused."""
    with pytest.raises(
        RadialError, match=rf"x.tif: not a readable image \(TIFF: its image directory at byte \d+ {why}"
    ):
        images.read_image(tiff(tmp_path / "x.tif", next_offset))
    Image = pytest.importorskip("PIL.Image")
    Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(tmp_path / "ok.tif")
    assert images.read_image(tmp_path / "ok.tif").shape == (4, 5, 3)


def test_any_error_of_the_image_decoder_is_named(tmp_path, monkeypatch):
    """Pillow's decoders raise OSError, but also ValueError (a truncated .ppm), SyntaxError, struct.error...: whatever
    it raises is one line naming the file (here a stand-in decoder, so the test needs no Pillow)."""
    import sys
    import types

    def refuse(*_):
        raise ValueError("not enough image data")

    fake = types.ModuleType("PIL")
    fake.Image = types.SimpleNamespace(open=refuse)
    monkeypatch.setitem(sys.modules, "PIL", fake)
    (tmp_path / "cut.ppm").write_bytes(b"P6\n48 40\n255\n")
    with pytest.raises(RadialError, match=r"^.*cut.ppm: not a readable image \(ValueError: not enough image data\)$"):
        images.read_image(tmp_path / "cut.ppm")


@pytest.mark.parametrize(
    "raw", [b"P6\n48 40\n65535\n" + bytes(1000), b"P3\n4 4\n255\n1 2 3", b"P1\n4 4\n1 0"], ids=["P6-16", "P3", "P1"]
)
def test_a_truncated_ppm_is_refused_by_name(tmp_path, raw):
    pytest.importorskip("PIL")
    (tmp_path / "cut.ppm").write_bytes(raw)  # Pillow raises ValueError ("not enough image data") for these
    with pytest.raises(RadialError, match=r"cut.ppm: not a readable image \(ValueError"):
        images.read_image(tmp_path / "cut.ppm")


# ------------------------------------------------------------------------------------------------ GGUF tensor tables


SIZES = {"F32": (1, 4), "Q8_0": (32, 34)}


def layout(tensors, data_bytes, alignment=32, data_offset=64):
    """check_layout on a table of (name, type, dims, offset) per tensor, in the file's order, and the file's size."""
    check_layout(Path("m.gguf"), tensors, alignment, data_offset, data_offset + data_bytes, SIZES)


# 512 bytes of F32, 68 of Q8_0 (2 blocks) padded to 96, 128 of F32: the data section is 736 bytes
GOOD = [("a", "F32", [64, 2], 0), ("b", "Q8_0", [64], 512), ("c", "F32", [32], 608)]


def test_gguf_layout_of_a_well_formed_table():
    layout(GOOD, 736)
    layout([("c", "F32", [3], 0)], 32)  # padded to the alignment after the last tensor, as gguf's writer does
    layout([("c", "F32", [3], 0)], 12)


@pytest.mark.parametrize(
    "change, size, expect",
    [
        ({0: ("a", "Q8_0", [64, 2], 0)}, 736, "tensor 'b' (Q8_0) starts at data byte 512, expected 160"),  # relabelled
        ({1: ("b", "Q8_0", [64], 520)}, 736, "tensor 'b' (Q8_0) starts at data byte 520, expected 512"),
        ({1: ("b", "Q8_0", [64], 2**64 - 1)}, 736, "starts at data byte 18446744073709551615, expected 512"),
        ({2: ("c", "Q8_0", [3], 608)}, 736, "tensor 'c' has dimensions [3]: expected at most 4, the first a multiple"),
        ({2: ("c", "F32", [1, 1, 1, 1, 32], 608)}, 736, "has dimensions [1, 1, 1, 1, 32]"),
        ({}, 735, "the tensors end at byte 800 but the file has 799: truncated"),
        ({}, 737, "bytes after the last tensor"),
        ({2: ("c", "Q8_0", [32], 608)}, 736, "bytes after the last tensor"),  # the last F32 tensor relabelled
    ],
)
def test_gguf_layout_refusals(change, size, expect):
    tensors = [change.get(i, t) for i, t in enumerate(GOOD)]
    with pytest.raises(CheckpointError) as e:
        layout(tensors, size)
    assert expect in one_line(e.value, "m.gguf")


# ------------------------------------------------------------------------------------------------ sampling


@pytest.mark.parametrize(
    "kwargs, expect",
    [
        (dict(temperature=float("inf")), "temperature must be a finite number >= 0, got inf"),
        (dict(temperature=float("1e309")), "temperature must be a finite number >= 0, got inf"),
        (dict(temperature=float("nan")), "temperature must be a finite number >= 0, got nan"),
        (dict(repetition_penalty=float("inf")), "repetition_penalty must be a finite number > 0, got inf"),
        (dict(repetition_penalty=0.0), "repetition_penalty must be a finite number > 0, got 0.0"),
    ],
)
def test_sampling_settings_without_meaning_are_refused(kwargs, expect):
    settings = dict(max_new_tokens=3, temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0)
    with pytest.raises(SettingError, match=expect):
        check_sampling(**{**settings, **kwargs})


def test_a_tiny_temperature_samples_the_largest_logit():
    logits = np.array([1.0, 3.0, 2.0, -np.inf], np.float32)
    rng = np.random.default_rng(0)
    assert [sample(logits, 1e-320, rng=rng) for _ in range(5)] == [1] * 5  # z / T alone: inf - inf = NaN
    assert sample(np.array([0.0, np.inf, 1.0], np.float32), 1.0, rng=rng) == 1


# ------------------------------------------------------------------------------------------------ training states


def state():
    params = {"w": np.ones((2, 3), np.float32), "b": np.zeros(3, np.float32)}
    return params, {k: np.zeros_like(a) for k, a in params.items()}, {k: np.ones_like(a) for k, a in params.items()}


@pytest.mark.parametrize(
    "where, name, value, expect",
    [
        (0, "w", np.nan, "tensor 'w' has 1 NaN or infinite value"),
        (1, "b", np.inf, "tensor 'adam.m.b' has 1 NaN or infinite value"),
        (2, "w", -np.inf, "tensor 'adam.v.w' has 1 NaN or infinite value"),
        (2, "b", -1e-3, "tensor 'adam.v.b' has negative values"),
    ],
)
def test_a_resumed_state_must_be_finite(where, name, value, expect):
    tensors = state()
    check_state(*tensors, "s.safetensors")
    tensors[where][name].flat[1] = value
    with pytest.raises(RadialError, match=f"^s.safetensors: {expect}"):
        check_state(*tensors, "s.safetensors")


# ------------------------------------------------------------------------------------------------ output folders


def test_output_folders(tmp_path):
    (tmp_path / "file").write_text("x")
    assert check_out(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # checked, not made
    for value, expect in [
        ("", "--out '': expected a folder name"),
        (" ", "--out ' ': expected a folder name"),
        (tmp_path / "file", f"--out {tmp_path / 'file'}: is a file, expected a folder"),
        ("/dev/null", "--out /dev/null: is a character device, expected a folder"),
        (tmp_path / "file" / "sub", f"--out {tmp_path / 'file' / 'sub'}: {tmp_path / 'file'} is a file, not a folder"),
    ]:
        with pytest.raises(RadialError) as e:
            check_out(value)
        assert str(e.value).startswith(expect), (str(e.value), expect)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "log.jsonl").mkdir()
    with pytest.raises(RadialError, match="log.jsonl: is a folder, expected a file"):
        check_out(tmp_path / "run", "--out", ["state.safetensors", "log.jsonl"])


def test_an_output_folder_on_a_read_only_mount(tmp_path, monkeypatch):
    import radial_min.io.outputs as outputs

    monkeypatch.setattr(outputs.os, "access", lambda path, mode: False)
    monkeypatch.setattr(outputs.os, "statvfs", lambda path: SimpleNamespace(f_flag=os.ST_RDONLY))
    with pytest.raises(RadialError, match=f"--out {tmp_path / 'x'}: cannot write there .* on a read-only file system"):
        check_out(tmp_path / "x")


def test_load_refuses_a_model_folder_that_is_a_fifo_config(tmp_path):
    os.mkfifo(tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="config.json: is a FIFO, expected a file"):
        radial_min.load(tmp_path)


def test_perplexity_of_sequences_of_one_token_is_refused():
    """simulate --seq-len 1 printed NaN perplexities: a sequence of one token predicts nothing."""
    from radial_min.analysis import oracle

    model = radial_min.load(FIXTURES / "opt-pre")
    for run in (lambda s: oracle.simulate(model, s, oracle.threshold(0.0)), lambda s: oracle.perplexity(model, s)):
        with pytest.raises(SettingError, match=r"sequences of 1 token have no next token to score.*\(--seq-len\)"):
            run(np.zeros((2, 1), np.int64))
    assert np.isfinite(oracle.simulate(model, np.zeros((1, 2), np.int64), oracle.threshold(0.0)).ppl)


def test_the_pixel_limit_holds_for_any_model_and_format():
    """MAX_PIXELS in all, whatever the model's side limit: checked from a header's width and height (the PNG test of
    test_hostile needs Pillow; this needs nothing)."""
    images._check_size("x.npy", 7000, 7000, None)  # 49 megapixels: under the limit
    with pytest.raises(RadialError, match=r"^x.npy: image is 8000x7000, over the 50,000,000-pixel limit$"):
        images._check_size("x.npy", 8000, 7000, None)
    with pytest.raises(RadialError, match=r"over the 50,000,000-pixel limit"):
        images._check_size("x.npy", 8000, 8000, images.side_limit(4096))  # a side of 16384 allowed, not 64 MP
