"""Hostile and broken checkpoints: each is refused with one line naming the file (and tensor or field), before
anything is allocated beyond what the file can hold; the header rules are the safetensors package's own."""

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

import radial_min
from radial_min.io.checkpoint import SafetensorsFile, write_safetensors
from radial_min.errors import CheckpointError

FIXTURES = Path(__file__).parent / "fixtures"


def st_file(path, header, data: bytes, raw_header: bytes | None = None) -> Path:
    head = raw_header if raw_header is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + data)
    return path


def f32(name, begin, n=2):
    return {name: {"dtype": "F32", "shape": [n], "data_offsets": [begin, begin + 4 * n]}}


@pytest.mark.parametrize(
    "header, data, expect",
    [
        ({**f32("a", 0), **f32("b", 0)}, bytes(8), "tensor 'b' starts at data byte 0 and overlaps"),
        ({**f32("a", 0), **f32("b", 12)}, bytes(20), "leaves a gap (bytes 8..12)"),
        (f32("a", 0), bytes(9), "trailing bytes after the last tensor"),
        (f32("a", 0), bytes(7), "tensor 'a' ends at byte"),
        ({"a": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}}, bytes(8), "unsupported dtype"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": ["0", "8"]}}, bytes(8), "data_offsets must be two"),
        ({"a": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, bytes(8), "shape must be a list"),
        ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(8), "shape must be a list"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": 1}}, bytes(8), "exactly dtype"),
        ({"a": [1, 2]}, bytes(8), "exactly dtype"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 12]}}, bytes(12), "spans 12 bytes, expected 8"),
        ({"a": {"dtype": "F16", "shape": [3], "data_offsets": [0, 4]}}, bytes(4), "spans 4 bytes, expected 6"),
        ({"__metadata__": {"k": 1}, **f32("a", 0)}, bytes(8), "__metadata__ must be an object of strings"),
        ({"a\n\x1b[31merror: forged": f32("a", 0)["a"]}, bytes(7), "'a\\n\\x1b[31merror: forged'"),
    ],
)
def test_safetensors_header_rules(tmp_path, header, data, expect):
    path = st_file(tmp_path / "model.safetensors", header, data)
    with pytest.raises(CheckpointError) as e:
        SafetensorsFile(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and expect in msg and "\n" not in msg and "\x1b" not in msg, msg


@pytest.mark.parametrize(
    "raw, expect",
    [
        (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "a": 1}', "header names 'a' twice"),
        ('{"a": 1}'.encode("utf-16"), "does not start with '{'"),
        (b'{"\xff": 1}', "not UTF-8"),
        (b"[1, 2]", "does not start with '{'"),
        (b'{"a": ' + b"[" * 5000 + b"]" * 5000 + b"}", "header is nested more than 64 levels deep"),
        (b'{"a": ' + b"[" * 64 + b"]" * 64 + b"}", "header is nested more than 64 levels deep"),
        (b'{"a": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 8]}}', "5,000 digits"),
        (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "__metadata__": {"k": "\\udc80"}}', "lone"),
        (b'{"a": 1,}', "header is not valid JSON"),
    ],
)
def test_safetensors_header_encoding(tmp_path, raw, expect):
    path = st_file(tmp_path / "model.safetensors", None, bytes(8), raw_header=raw)
    with pytest.raises(CheckpointError, match=f"^{path}: .*{expect}".replace("[", r"\[").replace("(", r"\(")):
        SafetensorsFile(path)


def test_header_one_byte_short_is_refused(tmp_path):
    """The audit's file: a header one byte short used to load and generate garbage with exit 0."""
    src = FIXTURES / "opt-pre" / "model.safetensors"
    data = src.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", n - 1) + data[8:])
    with pytest.raises(CheckpointError, match=str(path)):
        SafetensorsFile(path)


def test_our_writer_passes_the_rules(tmp_path):
    write_safetensors(tmp_path / "w.safetensors", {"b": np.ones(3, np.float32), "a": np.zeros((2, 2), np.float16)})
    f = SafetensorsFile(tmp_path / "w.safetensors")
    assert f.read("b").tolist() == [1, 1, 1] and f.shape("a") == (2, 2)


@pytest.fixture
def sharded(tmp_path):
    dst = tmp_path / "sharded"
    shutil.copytree(FIXTURES / "opt-fp16-sharded", dst)
    return dst


def edit_index(folder, fn):
    path = folder / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    fn(index)
    path.write_text(json.dumps(index))


@pytest.mark.parametrize("shard", ["/etc/passwd", "../opt/model.safetensors", "x/../model-00001-of-00003.safetensors"])
def test_shards_must_be_files_of_the_folder(sharded, tmp_path, shard):
    shutil.copytree(FIXTURES / "opt-pre", tmp_path / "opt")

    def point_outside(index):
        index["weight_map"]["model.decoder.embed_tokens.weight"] = shard

    edit_index(sharded, point_outside)
    with pytest.raises(CheckpointError, match="is not a file name inside") as e:
        radial_min.load(sharded)
    assert "root:" not in str(e.value)


@pytest.mark.parametrize("weight_map", [["a"], {"x": 1}, "model.safetensors"])
def test_weight_map_type(sharded, weight_map):
    edit_index(sharded, lambda index: index.update(weight_map=weight_map))
    with pytest.raises(CheckpointError, match="model.safetensors.index.json: 'weight_map' must be an object"):
        radial_min.load(sharded)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_are_named(tmp_path, bad):
    dst = tmp_path / "opt"
    shutil.copytree(FIXTURES / "opt-pre", dst)
    f = SafetensorsFile(dst / "model.safetensors")
    tensors = {n: f.read(n) for n in f.entries}
    name = "model.decoder.layers.1.fc1.weight"
    tensors[name][3, 4] = bad
    write_safetensors(dst / "model.safetensors", tensors)
    with pytest.raises(CheckpointError, match=f"tensor '{name}' has 1 NaN or infinite value of"):
        radial_min.load(dst)


def test_forged_tensor_name_is_escaped_in_the_mismatch_message(tmp_path):
    dst = tmp_path / "opt"
    shutil.copytree(FIXTURES / "opt-pre", dst)
    f = SafetensorsFile(dst / "model.safetensors")
    tensors = {n: f.read(n) for n in f.entries}
    tensors["x\nerror: all good\x1b[0m"] = np.zeros(2, np.float32)
    write_safetensors(dst / "model.safetensors", tensors)
    with pytest.raises(CheckpointError) as e:
        radial_min.load(dst)
    assert "\n" not in str(e.value) and "\x1b" not in str(e.value) and "'x\\nerror: all good\\x1b[0m'" in str(e.value)


OPT = dict(model_type="opt", vocab_size=50, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, ffn_dim=16)
VIT = dict(model_type="vit", hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16)


@pytest.mark.parametrize(
    "base, field, value, expect",
    [
        (OPT, "hidden_size", "8", "field 'hidden_size' is '8', expected an integer"),
        (OPT, "hidden_size", [8], "field 'hidden_size' is [8], expected an integer"),
        (OPT, "hidden_size", 8.5, "field 'hidden_size' is 8.5, expected an integer"),
        (OPT, "vocab_size", True, "field 'vocab_size' is True, expected an integer"),
        (OPT, "num_attention_heads", 0, "field 'num_attention_heads' is 0, expected 1 to 1024"),
        (OPT, "num_hidden_layers", 2**31, "field 'num_hidden_layers' is 2147483648, expected 1 to 1024"),
        (OPT, "model_type", ["opt"], "model_type ['opt'] is not supported"),
        (OPT, "do_layer_norm_before", "false", "field 'do_layer_norm_before' is 'false', expected true or false"),
        (VIT, "layer_norm_eps", "x", "field 'layer_norm_eps' is 'x', expected a number"),
        (VIT, "image_size", 240_000, "field 'image_size' is 240000, expected 1 to 4096"),
        (VIT, "id2label", [1], "field 'id2label' is [1], expected an object"),
        (VIT, "id2label", {"a": "cat"}, "field 'id2label' must map integer strings"),
    ],
)
def test_config_fields_are_checked_before_use(tmp_path, base, field, value, expect):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**base, field: value}))
    with pytest.raises(CheckpointError) as e:
        radial_min.load(folder)
    assert str(e.value) == f"{folder / 'config.json'}: {expect}" or str(e.value).startswith(
        f"{folder / 'config.json'}: {expect}"
    ), str(e.value)


def test_image_bomb_is_refused_from_its_header(tmp_path):
    """A 12000x12000 PNG header (the audit's 17 KB file took 7.3 GB): refused before any pixel is decoded."""
    pytest.importorskip("PIL")
    import zlib

    from radial_min.errors import RadialError
    from radial_min.io.images import read_image

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    path = tmp_path / "bomb.png"
    ihdr = struct.pack(">IIBBBBB", 12000, 12000, 8, 2, 0, 0, 0)
    idat, end = chunk(b"IDAT", zlib.compress(b"")), chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + idat + end)
    with pytest.raises(RadialError, match=r"bomb.png: image is 12000x12000, over the 50,000,000-pixel limit"):
        read_image(path)


@pytest.mark.parametrize(
    "change, expect",
    [
        ({"forward_only": False, "max_depth": 10**7}, "field 'max_depth' is 10000000, expected 1 to 8"),
        ({"max_depth": 0}, "field 'max_depth' is 0, expected 1 to 8"),
        ({"width": 10**4000}, "has an integer of 4,001 digits \\(at most 40\\)"),
        ({"width": "64"}, "field 'width' is '64', expected an integer"),
        ({"forward_only": "false"}, "field 'forward_only' is 'false', expected true or false"),
        ({"hidden": 0}, "field 'hidden' is 0, expected 1 to 65536"),
    ],
)
def test_router_config_is_checked(tmp_path, change, expect):
    from radial_min.router import Router, RouterConfig, init_router

    cfg = RouterConfig(width=8, n_blocks=2, hidden=4)
    Router(cfg, init_router(cfg)).save(tmp_path / "r")
    d = json.loads((tmp_path / "r.json").read_text())
    (tmp_path / "r.json").write_text(json.dumps({**d, **change}))
    with pytest.raises(CheckpointError, match=f"^{tmp_path / 'r.json'}: {expect}$"):
        Router.load(tmp_path / "r")
