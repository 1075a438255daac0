"""Fuzzing the readers of untrusted files: every mutant is either read correctly or refused with a CheckpointError
naming the file; never another exception, never a hang, and never more lenient than the safetensors package."""
import json
import struct
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from radial_min.checkpoint import SafetensorsFile, write_safetensors
from radial_min.config import read_config
from radial_min.errors import CheckpointError

import safetensors.numpy as safetensors_numpy  # noqa: E402 (a runtime dependency: the reference reader)
FUZZ = settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))

TENSORS = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.float16), "c": np.zeros(0, np.float32)}


def reference(path):
    """What the safetensors package reads from `path`, or None if it refuses the file."""
    try:
        return safetensors_numpy.load_file(str(path))
    except Exception:
        return None


def ours(path):
    start = time.perf_counter()
    try:
        f = SafetensorsFile(path)
        out = {name: f.read(name) for name in f.entries}
    except CheckpointError as e:
        assert str(e).startswith(f"{path}: ") and "\n" not in str(e), str(e)
        out = None
    assert time.perf_counter() - start < 2.0
    return out


def assert_no_more_lenient(path):
    got, want = ours(path), reference(path)
    if got is not None:  # we accept only what the package accepts, with the same values
        assert want is not None, f"accepted a file the safetensors package refuses: {path.read_bytes()[:200]!r}"
        assert sorted(got) == sorted(want)
        for name in got:
            np.testing.assert_array_equal(got[name], want[name].astype(np.float32))


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    path = tmp_path_factory.mktemp("st") / "good.safetensors"
    write_safetensors(path, TENSORS)
    return path.read_bytes()


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=4),
       cut=st.integers(-40, 40))
def test_safetensors_byte_mutants(good, tmp_path, flips, cut):
    data = bytearray(good)
    for position, xor in flips:
        data[position % len(data)] ^= xor
    data = bytes(data[: len(data) + cut]) if cut < 0 else bytes(data) + bytes(cut)
    path = tmp_path / "m.safetensors"
    path.write_bytes(data)
    assert_no_more_lenient(path)


ENTRY = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "X", 3]),
    "shape": st.one_of(st.lists(st.integers(-1, 4), max_size=3), st.just("2")),
    "data_offsets": st.one_of(st.lists(st.integers(-4, 40), min_size=2, max_size=2), st.just([0, "8"])),
})


@FUZZ
@given(header=st.dictionaries(st.sampled_from(["a", "b", "c\n\x1b[1m", "__metadata__"]), ENTRY, max_size=3),
       data=st.integers(0, 48))
def test_safetensors_header_mutants(tmp_path, header, data):
    head = json.dumps(header).encode()
    path = tmp_path / "h.safetensors"
    path.write_bytes(struct.pack("<Q", len(head)) + head + bytes(data))
    assert_no_more_lenient(path)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=True) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=6,
)
OPT_FIELDS = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "ffn_dim", "model_type",
              "max_position_embeddings", "word_embed_proj_dim", "do_layer_norm_before", "activation_function",
              "image_size", "patch_size", "layer_norm_eps", "id2label", "architectures", "torch_dtype"]


@FUZZ
@given(model_type=st.sampled_from(["opt", "vit"]),
       changes=st.dictionaries(st.sampled_from(OPT_FIELDS), JSON, max_size=3))
def test_config_mutants(tmp_path, model_type, changes):
    d = {"model_type": model_type, "hidden_size": 8, "num_attention_heads": 2, "num_hidden_layers": 2, **changes}
    (tmp_path / "config.json").write_text(json.dumps(d))
    try:
        cfg = read_config(tmp_path)
    except CheckpointError as e:
        assert str(e).startswith(str(tmp_path / "config.json")) and "\n" not in str(e), str(e)
    else:
        assert 1 <= cfg.num_hidden_layers <= 1024 and cfg.hidden_size % cfg.num_attention_heads == 0
