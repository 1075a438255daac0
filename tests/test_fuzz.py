"""Fuzzing the readers of untrusted files (safetensors headers and bytes, config.json, routers, pytorch_model.bin
pickles): every mutant is either read correctly or refused with one CheckpointError line naming the file; never
another exception, never a hang (bounded time), never an allocation beyond what the file can hold (tracemalloc's
peak, which sees NumPy's buffers), and never more lenient than the safetensors package."""

import io
import json
import pickletools
import struct
import time
import tracemalloc
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from radial_min.io.checkpoint import SafetensorsFile, write_safetensors
from radial_min.models import read_config
from radial_min.errors import CheckpointError, RadialError
from radial_min.io.outputs import parse_json
from radial_min.router import MAX_PASSES, Router, RouterConfig, init_router
from radial_min.io.torch_pickle import TorchFile

import safetensors.numpy as safetensors_numpy  # noqa: E402 (a runtime dependency: the reference reader)

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
FIXTURES = Path(__file__).parent / "fixtures"


@contextmanager
def bounded(*paths, seconds=2.0, factor=4, slack=1 << 20):
    """The reads inside take under `seconds` and allocate at most `factor` x the files' bytes (+ `slack`)."""
    budget = factor * sum(Path(p).stat().st_size for p in paths) + slack
    tracemalloc.start()
    start = time.perf_counter()
    try:
        yield
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert time.perf_counter() - start < seconds
    assert peak <= budget, f"allocated {peak} bytes reading {budget - slack} bytes of files"


def assert_one_line(error, *paths):
    msg = str(error)
    assert msg.startswith(tuple(f"{p}: " for p in paths)) and "\n" not in msg and "\x1b" not in msg, msg


TENSORS = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.float16), "c": np.zeros(0, np.float32)}


def reference(path):
    """What the safetensors package reads from `path`, or None if it refuses the file."""
    try:
        return safetensors_numpy.load_file(str(path))
    except Exception:
        return None


def ours(path):
    out = None
    with bounded(path, factor=3):  # float16 data read as float32: twice the bytes, plus the header
        try:
            f = SafetensorsFile(path)
            out = {name: f.read(name) for name in f.entries}
        except CheckpointError as e:
            assert_one_line(e, path)
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
@given(
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=4),
    cut=st.integers(-40, 40),
)
@pytest.mark.slow
def test_safetensors_byte_mutants(good, tmp_path, flips, cut):
    data = bytearray(good)
    for position, xor in flips:
        data[position % len(data)] ^= xor
    data = bytes(data[: len(data) + cut]) if cut < 0 else bytes(data) + bytes(cut)
    path = tmp_path / "m.safetensors"
    path.write_bytes(data)
    assert_no_more_lenient(path)


ENTRY = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "X", 3]),
        "shape": st.one_of(st.lists(st.integers(-1, 4), max_size=3), st.just("2")),
        "data_offsets": st.one_of(st.lists(st.integers(-4, 40), min_size=2, max_size=2), st.just([0, "8"])),
    }
)


@FUZZ
@given(
    header=st.dictionaries(st.sampled_from(["a", "b", "c\n\x1b[1m", "__metadata__"]), ENTRY, max_size=3),
    data=st.integers(0, 48),
)
@pytest.mark.slow
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
OPT_FIELDS = [
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "ffn_dim",
    "model_type",
    "max_position_embeddings",
    "word_embed_proj_dim",
    "do_layer_norm_before",
    "activation_function",
    "image_size",
    "patch_size",
    "layer_norm_eps",
    "id2label",
    "architectures",
    "torch_dtype",
    "intermediate_size",
    "num_key_value_heads",
    "head_dim",
    "rope_theta",
    "rope_parameters",
    "rms_norm_eps",
    "tie_word_embeddings",
    "eos_token_id",
]


@FUZZ
@given(
    model_type=st.sampled_from(["opt", "vit", "llama", "qwen2"]),
    changes=st.dictionaries(st.sampled_from(OPT_FIELDS), JSON, max_size=3),
)
@pytest.mark.slow
def test_config_mutants(tmp_path, model_type, changes):
    d = {
        "model_type": model_type,
        "hidden_size": 8,
        "num_attention_heads": 2,
        "num_hidden_layers": 2,
        "vocab_size": 16,
        "intermediate_size": 16,
        **changes,
    }
    (tmp_path / "config.json").write_text(json.dumps(d))
    try:
        with bounded(tmp_path / "config.json"):
            cfg = read_config(tmp_path)
    except CheckpointError as e:
        assert_one_line(e, tmp_path / "config.json")
    else:
        assert 1 <= cfg.num_hidden_layers <= 1024 and 1 <= cfg.hidden_size <= 1 << 16
        assert cfg.hidden_size % cfg.num_attention_heads == 0 or model_type in ("llama", "qwen2")


# ------------------------------------------------------------------------------------------------- routers

ROUTER = RouterConfig(width=8, n_blocks=3, hidden=4, max_depth=3)
ROUTER_FIELDS = ["width", "n_blocks", "hidden", "forward_only", "max_depth", "tau", "kv_rule", "model", "extra"]


@pytest.fixture(scope="module")
def router_files(tmp_path_factory):
    path = tmp_path_factory.mktemp("router") / "r"
    Router(ROUTER, init_router(ROUTER)).save(path)
    return path.with_suffix(".json").read_bytes(), path.with_suffix(".safetensors").read_bytes()


def load_router_bounded(folder, config: bytes, weights: bytes):
    (folder / "r.json").write_bytes(config)
    (folder / "r.safetensors").write_bytes(weights)
    try:
        with bounded(folder / "r.json", folder / "r.safetensors", factor=3):
            router = Router.load(folder / "r")
    except CheckpointError as e:
        assert_one_line(e, folder / "r.json", folder / "r.safetensors")
        return None
    cfg = router.config  # what is accepted can be used: bounded depth, weights of the config's shapes, finite
    assert 1 <= cfg.n_blocks <= 4096 and 0 <= cfg.depth_limit <= MAX_PASSES * cfg.n_blocks
    assert {k: v.shape for k, v in router.params.items()} == {k: v.shape for k, v in init_router(cfg).items()}
    assert all(np.isfinite(v).all() for v in router.params.values())
    return router


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(ROUTER_FIELDS), JSON, max_size=3))
@pytest.mark.slow
def test_router_config_mutants(router_files, tmp_path, changes):
    config, weights = router_files
    load_router_bounded(tmp_path, json.dumps({**json.loads(config), **changes}).encode(), weights)


@FUZZ
@given(
    which=st.sampled_from(["config", "weights"]),
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=4),
    cut=st.integers(-40, 8),
)
@pytest.mark.slow
def test_router_byte_mutants(router_files, tmp_path, which, flips, cut):
    files = dict(zip(["config", "weights"], router_files))
    data = bytearray(files[which])
    for position, xor in flips:
        data[position % len(data)] ^= xor
    files[which] = bytes(data[: len(data) + cut]) if cut < 0 else bytes(data) + bytes(cut)
    load_router_bounded(tmp_path, files["config"], files["weights"])


# ------------------------------------------------------------------------------------------ pytorch pickles

BIN = FIXTURES / "torch_bin" / "state_dict.bin"


def rezip(records: dict) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for name, data in records.items():
            z.writestr(name, data)
    return out.getvalue()


@pytest.fixture(scope="module")
def pickle_parts():
    with zipfile.ZipFile(BIN) as z:
        records = {name: z.read(name) for name in z.namelist()}
    pkl = next(name for name in records if name.endswith("/data.pkl"))
    ints = [(pos, op.name) for op, _, pos in pickletools.genops(records[pkl]) if op.name in ("BININT1", "BININT")]
    return records, pkl, ints


def read_pickle_bounded(path):
    try:
        with bounded(path, factor=3):  # float16 storages come back as float32
            f = TorchFile(path)
            return {name: f.read(name) for name in f.entries}
    except CheckpointError as e:
        assert_one_line(e, path)


@FUZZ
@given(
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=4),
    cut=st.integers(-40, 0),
)
@pytest.mark.slow
def test_pickle_byte_mutants(pickle_parts, tmp_path, flips, cut):
    """data.pkl's bytes flipped or cut, inside a well-formed zip: the unpickler's every path."""
    records, pkl, _ = pickle_parts
    data = bytearray(records[pkl])
    for position, xor in flips:
        data[position % len(data)] ^= xor
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(rezip({**records, pkl: bytes(data[: len(data) + cut])}))
    read_pickle_bounded(path)


@FUZZ
@given(
    picks=st.lists(
        st.tuples(st.integers(0, 10**6), st.sampled_from([-1, 0, 1, 7, 2**31 - 1, 2**40, 2**62])),
        min_size=1,
        max_size=3,
    )
)
@pytest.mark.slow
def test_pickle_integer_mutants(pickle_parts, tmp_path, picks):
    """A size, stride, offset, numel or memo index replaced by an absurd value (as LONG1, so any value fits):
    refused from the pickle and the archive's real sizes, before anything of that size is allocated."""
    records, pkl, ints = pickle_parts
    data = records[pkl]
    for i, value in sorted(picks, key=lambda p: -ints[p[0] % len(ints)][0]):  # from the end: positions stay valid
        pos, name = ints[i % len(ints)]
        width = 1 if name == "BININT1" else 4
        data = data[:pos] + b"\x8a\x08" + value.to_bytes(8, "little", signed=True) + data[pos + 1 + width :]
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(rezip({**records, pkl: data}))
    read_pickle_bounded(path)


@FUZZ
@given(
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=4),
    cut=st.integers(-200, 0),
)
@pytest.mark.slow
def test_pickle_zip_mutants(tmp_path, flips, cut):
    """The archive itself damaged: local headers, the central directory, the storages."""
    data = bytearray(BIN.read_bytes())
    for position, xor in flips:
        data[position % len(data)] ^= xor
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(bytes(data[: len(data) + cut]))
    read_pickle_bounded(path)


# ------------------------------------------------------------------------------------------------ the JSON reader

JSON_TEXT = st.text(alphabet='{}[]",: 0123456789-+.eEtrufalsnNIiy\\udD8', max_size=120)


def json_ok_or_refused(text):
    """parse_json: the value json.loads gives, within the bounds, or one RadialError line naming the source."""
    try:
        with bounded(seconds=2.0, slack=4 << 20):
            value = parse_json(text, "x.json")
    except RadialError as e:
        assert_one_line(e, "x.json")
        return None
    assert value == json.loads(text) or value != value  # NaN is not equal to itself
    return value


@FUZZ
@given(text=JSON_TEXT)
def test_json_reader_on_json_like_text(text):
    json_ok_or_refused(text)


@FUZZ
@given(value=JSON, flips=st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from('[{9\\"u,')), max_size=4))
def test_json_reader_on_damaged_values(value, flips):
    text = list(json.dumps({"a": value, "b": [value, {"c": value}]}))
    for position, char in flips:
        text[position % len(text)] = char
    json_ok_or_refused("".join(text))


@FUZZ
@given(depth=st.integers(0, 200), digits=st.integers(1, 6000), key=st.booleans())
def test_json_reader_bounds_are_exact(depth, digits, key):
    text = "[" * depth + ("-" + "7" * digits) + "]" * depth
    if key:
        text = '{"k": 1, "k": ' + text + "}"
    value = json_ok_or_refused(text)
    assert (value is not None) == (depth + key <= 64 and digits <= 40 and not key)


# ------------------------------------------------------------------------------------------------ images, .npy, tokens

NPY = io.BytesIO()
np.save(NPY, np.arange(48, dtype=np.uint8).reshape(4, 4, 3))


def read_image_bounded(path):
    from radial_min.io.images import read_image

    try:
        with bounded(path, seconds=5.0, factor=8, slack=8 << 20):  # a compressed image inflates: 8 x + 8 MiB
            a = read_image(path, max_side=64)
    except RadialError as e:
        assert_one_line(e, path)
        return None
    assert a.ndim == 3 and a.shape[2] == 3 and 0 <= a.min() <= a.max() <= 255 and max(a.shape[:2]) <= 64
    return a


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=4))
def test_npy_header_mutants(tmp_path, flips):
    data = bytearray(NPY.getvalue())
    for position, xor in flips:
        data[position % min(len(data), 140)] ^= xor  # the magic, the header's length and its dictionary
    (tmp_path / "x.npy").write_bytes(bytes(data))
    read_image_bounded(tmp_path / "x.npy")


@FUZZ
@given(
    fmt=st.sampled_from(["png", "tif", "ppm", "bmp", "gif"]),
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=4),
    cut=st.integers(-60, 0),
)
def test_image_file_mutants(tmp_path, fmt, flips, cut):
    Image = pytest.importorskip("PIL.Image")
    path = tmp_path / f"x.{fmt}"
    Image.fromarray(np.arange(300, dtype=np.uint8).reshape(10, 10, 3)).save(path)
    data = bytearray(path.read_bytes())
    for position, xor in flips:
        data[position % min(len(data), 200)] ^= xor  # headers, directories, chunk lengths
    path.write_bytes(bytes(data[: len(data) + cut]))
    read_image_bounded(path)


@pytest.fixture(scope="module")
def token_cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokens") / "tokens.npz"
    np.savez(path, train=np.arange(100, dtype=np.int32) % 7, val_x=np.arange(20, dtype=np.int32) % 7, vocab_size=7)
    return path.read_bytes()


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=4))
def test_token_cache_mutants(tmp_path, token_cache, flips):
    from radial_min.data import read_tokens

    data = bytearray(token_cache)
    for position, xor in flips:
        data[position % len(data)] ^= xor
    path = tmp_path / "tokens.npz"
    path.write_bytes(bytes(data))
    try:
        with bounded(path, factor=8):
            z = read_tokens(path)
    except RadialError as e:
        assert_one_line(e, path)
    else:
        assert all(0 <= a.min() and a.max() < z["vocab_size"] for k, a in z.items() if k != "vocab_size")


# ------------------------------------------------------------------------------------------------ GGUF headers


@pytest.fixture(scope="module")
def gguf_file():
    from conftest import need_gguf

    need_gguf()
    return (FIXTURES / "gguf" / "qwen2-bias-tied.gguf").read_bytes()


@FUZZ
@given(
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=3),
    cut=st.integers(-40, 0),
)
def test_gguf_header_mutants(tmp_path, gguf_file, flips, cut):
    """The metadata and the tensor table (the first 4 KB) flipped: read and checked, or refused in one line."""
    from radial_min.io.loading import open_gguf

    data = bytearray(gguf_file)
    for position, xor in flips:
        data[position % 4096] ^= xor
    path = tmp_path / "m.gguf"
    path.write_bytes(bytes(data[: len(data) + cut]))
    try:
        with bounded(path, seconds=5.0, factor=3):
            open_gguf(path)
    except CheckpointError as e:
        assert_one_line(e, path, f"{path} (metadata)")
