"""Loading refuses bad checkpoints with one message naming the file and tensors, and never half-loads."""

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

import radial_min
from radial_min.io.checkpoint import SafetensorsFile, bf16_to_float32, write_safetensors
from radial_min.models import parse_config
from radial_min.errors import CheckpointError, RadialError

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def opt_copy(tmp_path):
    dst = tmp_path / "opt"
    shutil.copytree(FIXTURES / "opt-pre", dst)
    return dst


def edit_tensors(folder, fn):
    """Rewrite model.safetensors after fn(dict of arrays) changes it."""
    f = SafetensorsFile(folder / "model.safetensors")
    tensors = {n: f.read(n) for n in f.entries}
    fn(tensors)
    write_safetensors(folder / "model.safetensors", tensors)


def test_missing_unexpected_and_misshaped_are_reported_together(opt_copy):
    def damage(t):
        del t["model.decoder.layers.1.fc1.bias"]
        t["model.decoder.layers.0.extra.weight"] = np.zeros(3, np.float32)
        t["model.decoder.layers.2.fc2.weight"] = np.zeros((5, 5), np.float32)

    edit_tensors(opt_copy, damage)
    with pytest.raises(CheckpointError) as e:
        radial_min.load(opt_copy)
    msg = str(e.value)
    assert "model.safetensors" in msg and "\n" not in msg
    assert "missing: decoder.layers.1.fc1.bias" in msg
    assert "unexpected: model.decoder.layers.0.extra.weight" in msg
    assert "model.decoder.layers.2.fc2.weight is [5, 5], expected [32, 64]" in msg


def test_truncated_file(opt_copy):
    path = opt_copy / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor .* truncated"):
        radial_min.load(opt_copy)


@pytest.mark.parametrize(
    "payload", [b"", b"\x01\x02", struct.pack("<Q", 10**12) + b"{}", struct.pack("<Q", 4) + b"{no}"]
)
def test_corrupt_header(opt_copy, payload):
    (opt_copy / "model.safetensors").write_bytes(payload)
    with pytest.raises(CheckpointError, match=str(opt_copy / "model.safetensors")):
        radial_min.load(opt_copy)


def test_wrong_byte_count_in_header(opt_copy):
    header = {"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}
    raw = json.dumps(header).encode()
    (opt_copy / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(16))
    with pytest.raises(CheckpointError, match="tensor 'x' spans 12 bytes, expected 16"):
        radial_min.load(opt_copy)


def test_missing_shard(tmp_path):
    dst = tmp_path / "sharded"
    shutil.copytree(FIXTURES / "opt-fp16-sharded", dst)
    next(dst.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="shard model-00002-of-00003.safetensors is listed but"):
        radial_min.load(dst)


def test_config_problems(opt_copy, tmp_path):
    cfg = json.loads((opt_copy / "config.json").read_text())
    for change, pattern in [
        ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
        ({"activation_function": "silu"}, "activation 'silu' is not supported"),
        ({"num_attention_heads": 5}, "not divisible"),
    ]:
        (opt_copy / "config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(CheckpointError, match=pattern):
            radial_min.load(opt_copy)
    (opt_copy / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        radial_min.load(opt_copy)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="config.json: not found"):
        radial_min.load(empty)
    (empty / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="no weights found"):
        radial_min.load(empty)


def test_dtype_spellings():
    """transformers 5 writes `dtype`, Hub configs `torch_dtype` (sometimes as 'torch.float16')."""
    base = {"model_type": "opt", "hidden_size": 8, "num_attention_heads": 2}
    assert parse_config({**base, "dtype": "bfloat16"}).dtype == "bfloat16"
    assert parse_config({**base, "torch_dtype": "float16"}).dtype == "float16"
    assert parse_config({**base, "torch_dtype": "torch.float16"}).dtype == "float16"
    assert parse_config(base).word_embed_proj_dim == 8


def test_bf16_upcast_is_exact():
    x = np.array([1.0, -2.5, 3.140625, 2.0**-70, np.inf], np.float32)
    bits = (x.view(np.uint32) >> 16).astype(np.uint16)  # these values are exact in bf16
    np.testing.assert_array_equal(bf16_to_float32(bits), x)


def test_tied_lm_head_is_not_read(tmp_path):
    """A stored lm_head copy (as some Hub repos have) is accepted but, tied, the embeddings serve as the head."""
    model = radial_min.load(FIXTURES / "opt-bf16-hub")
    assert model.lm_head.weight is model.embed_tokens.weight


def test_both_writers_make_files_the_safetensors_package_reads(tmp_path):
    """write_safetensors (the package's serializer) and write_safetensors_from (ours, one tensor at a time) write
    the same tensors, bfloat16 included; the package opens both (its NumPy API cannot return bfloat16: `b` is read by
    ours alone) and gives the same values and metadata."""
    from safetensors import safe_open

    from radial_min.io.checkpoint import write_safetensors_from

    t = {"b": np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5, "a": np.ones(3, np.float16), "i": np.arange(4)}
    write_safetensors(tmp_path / "one.safetensors", t, {"step": 3}, bfloat16={"b"})
    specs = {k: (a.dtype, a.shape) for k, a in t.items()}
    write_safetensors_from(tmp_path / "two.safetensors", specs, t.__getitem__, {"step": 3}, bfloat16={"b"})
    for name in ("one", "two"):
        path = tmp_path / f"{name}.safetensors"
        ours = SafetensorsFile(path)
        with safe_open(str(path), framework="np") as theirs:
            assert sorted(theirs.keys()) == ["a", "b", "i"] and theirs.metadata() == ours.metadata == {"step": "3"}
            for k in ("a", "i"):
                np.testing.assert_array_equal(theirs.get_tensor(k), t[k])
        assert ours.dtype("b") == "bfloat16"
        for k in t:
            np.testing.assert_array_equal(ours.read(k), t[k])  # -2.5 .. 2.5 in halves: exact in bfloat16


def test_write_safetensors_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "x.safetensors"
    write_safetensors(path, {"a": np.arange(6, dtype=np.float32).reshape(2, 3)})
    with pytest.raises(ValueError, match="cannot write dtype"):
        write_safetensors(path, {"a": np.zeros(2, np.complex64)})

    import radial_min.io.outputs as outputs

    def disk_full(*args):  # the new file was written out, then the rename fails
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(outputs.os, "replace", disk_full)
    with pytest.raises(RadialError, match=f"^{path}: cannot write \\(No space left on device\\)$"):
        write_safetensors(path, {"a": np.zeros(4, np.float32)})
    monkeypatch.undo()
    assert SafetensorsFile(path).read("a").tolist() == [[0, 1, 2], [3, 4, 5]]  # the old file is intact
    assert list(tmp_path.iterdir()) == [path]  # and no temporary file is left behind
