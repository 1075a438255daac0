"""Reading pytorch_model.bin without torch (radial_min.io.torch_pickle).

The fixtures in fixtures/torch_bin/ were written by real torch (tools/make_torch_fixtures.py), together with the
values torch itself reads back (state_dict.npz) and each tensor's dtype (state_dict.json). Variations that need
no torch (corrupt records, odd pickles) are made here, in a temporary directory.
"""

import json
import pickle
import pickletools
import struct
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from radial_min.errors import CheckpointError
from radial_min.io.torch_pickle import TorchFile, load_torch_file

FIXTURES = Path(__file__).parent / "fixtures" / "torch_bin"
GOOD = FIXTURES / "state_dict.bin"


@pytest.fixture(scope="module")
def expected():
    with np.load(FIXTURES / "state_dict.npz") as npz:
        values = {name: npz[name] for name in npz.files}
    dtypes = json.loads((FIXTURES / "state_dict.json").read_text())
    assert len(values) == len(dtypes) >= 20
    return values, dtypes


@pytest.fixture(scope="module")
def good():
    return load_torch_file(GOOD)


def assert_matches(tensors, dtypes, expected):
    want_values, want_dtypes = expected
    assert list(tensors) == list(want_dtypes)  # every tensor, in state-dict order
    assert dtypes == want_dtypes
    for name, want in want_values.items():
        got = tensors[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert got.flags.c_contiguous and got.dtype.isnative, name
        np.testing.assert_array_equal(got, want, err_msg=name)


# ---------------------------------------------------------------------------------------------------------
# Good files.


def test_every_tensor_matches_what_torch_reads(good, expected):
    assert_matches(*good, expected)


def test_big_endian_file_is_byteswapped(expected):
    """Same state dict, storages rewritten big-endian with byteorder "big" and a different archive folder name."""
    with zipfile.ZipFile(FIXTURES / "state_dict_big_endian.bin") as zf:
        assert zf.read("archive/byteorder") == b"big"
        little = zipfile.ZipFile(GOOD).read("state_dict/data/0")
        assert zf.read("archive/data/0") != little  # really swapped, not a copy
    assert_matches(*load_torch_file(FIXTURES / "state_dict_big_endian.bin"), expected)


def test_dtypes_on_disk_and_in_memory(good):
    tensors, dtypes = good
    assert dtypes["lm_head.weight"] == "float32" and tensors["lm_head.weight"].dtype == np.float32
    assert dtypes["extra.float16"] == "float16" and tensors["extra.float16"].dtype == np.float16  # not upcast
    assert dtypes["extra.bfloat16"] == "bfloat16" and tensors["extra.bfloat16"].dtype == np.float32  # upcast
    assert dtypes["extra.uint16"] == "uint16" and tensors["extra.uint16"].tolist() == [0, 1, 65535, 4660]
    assert tensors["extra.int64"].tolist() == [-(2**40), -1, 0, 7, 2**62]
    assert tensors["extra.int8"].tolist() == [-128, -1, 127]
    assert tensors["extra.bool"].tolist() == [True, False, True]


def test_bfloat16_upcast_is_exact(good):
    bf = good[0]["extra.bfloat16"]
    bits = bf.view(np.uint32)
    assert np.all(bits & 0xFFFF == 0)  # a widened bf16 has zero low half
    magnitudes = np.abs(bf[bf != 0])
    assert magnitudes.min() < 1e-25 and magnitudes.max() > 1e25  # bf16's float32-sized range survived


def test_tied_weights_share_one_storage(good):
    with zipfile.ZipFile(GOOD) as zf:
        storages = [n for n in zf.namelist() if "/data/" in n]
    tensors = good[0]
    assert len(storages) < len(tensors)  # the fixture really shares storages
    embed, head = tensors["decoder.embed_tokens.weight"], tensors["lm_head.weight"]
    assert embed.shape == (16, 8) and np.array_equal(embed, head) and embed.std() > 0.5
    assert embed is not head  # two tensor objects in the pickle: two arrays


def test_same_tensor_object_gives_same_array(good):
    tensors = good[0]
    assert tensors["extra.alias_of_float16"] is tensors["extra.float16"]


def test_views_offsets_and_odd_shapes(good):
    t = good[0]
    k_proj = t["decoder.layers.0.self_attn.k_proj.weight"]
    assert k_proj.shape == (6, 8) and np.array_equal(t["extra.transposed"], k_proj.T)
    assert t["extra.tail"].tolist() == [12.0, 13.0, 14.0, 15.0, 16.0]  # storage offset 12
    assert t["extra.block"].shape == (3, 4)
    assert t["extra.half_columns"].shape == (4, 3) and t["extra.half_columns"].dtype == np.float16
    expanded = t["extra.expanded"]  # stride 0 on disk
    assert expanded.shape == (3, 4) and np.all(expanded == expanded[:, :1]) and len(set(expanded[:, 0])) == 3
    assert t["extra.scalar"].shape == () and t["extra.scalar"] == np.float32(3.5)
    assert t["extra.empty"].shape == (0, 3) and t["extra.empty"].dtype == np.float32


def test_arrays_are_writable_copies_not_views_of_the_file(good):
    a = good[0]["extra.transposed"]
    assert a.flags.writeable and a.flags.owndata  # not a read-only view of the storage bytes


def test_torch_is_never_imported(good):
    assert "torch" not in sys.modules


def test_archive_folder_name_does_not_matter(tmp_path, expected):
    renamed = rewrite(tmp_path, lambda name, data: [(name.replace("state_dict/", "pytorch_model/"), data)])
    assert_matches(*load_torch_file(renamed), expected)


# ---------------------------------------------------------------------------------------------------------
# Hostile files: refused by name, before the payload runs.

HOSTILE = [
    # file, the global as the pickle writes it, as the message must name it, the marker its payload creates
    ("hostile_os_system.bin", "posix system", "posix.system", "pwned_os_system"),
    ("hostile_eval.bin", "builtins eval", "builtins.eval", "pwned_eval"),
    ("hostile_popen.bin", "commands Popen", "subprocess.Popen", "pwned_popen"),  # protocol 2 spells it commands
]


@pytest.mark.parametrize("fname, written, named, marker", HOSTILE)
def test_hostile_pickle_is_refused_without_side_effect(fname, written, named, marker, tmp_path, monkeypatch):
    path = FIXTURES / fname
    assert written in pickle_globals(path)  # the fixture really calls it
    monkeypatch.chdir(tmp_path)  # where the payload would create its marker
    with pytest.raises(CheckpointError) as err:
        load_torch_file(path)
    message = str(err.value)
    assert str(path) in message and named in message and "refused" in message and "\n" not in message
    time.sleep(0.2)  # a started Popen would need a moment
    assert not (tmp_path / marker).exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fname, marker", [("hostile_eval.bin", "pwned_eval"), ("hostile_popen.bin", "pwned_popen")])
def test_hostile_payload_is_live_under_plain_pickle(fname, marker, tmp_path, monkeypatch):
    """These two need no torch, so show that the very bytes we refuse do run under an ordinary unpickler."""
    monkeypatch.chdir(tmp_path)
    with zipfile.ZipFile(FIXTURES / fname) as zf:
        result = pickle.loads(zf.read("archive/data.pkl"))
    for value in result.values():
        if hasattr(value, "wait"):
            value.wait()
    assert (tmp_path / marker).exists()


def test_hostile_global_after_a_good_tensor_is_still_refused():
    """hostile_os_system.bin starts with a well-formed tensor; the refusal comes at the second entry."""
    globals_in_order = pickle_globals(FIXTURES / "hostile_os_system.bin")
    assert globals_in_order.index("torch._utils _rebuild_tensor_v2") < globals_in_order.index("posix system")


@pytest.mark.parametrize(
    "module, name, named",
    [
        ("os", "system", "os.system"),
        ("builtins", "exec", "builtins.exec"),
        ("__builtin__", "eval", "__builtin__.eval (= builtins.eval)"),  # Python 2 spelling, mapped by protocol 2
        ("torch", "load", "torch.load"),
        ("numpy", "load", "numpy.load"),
    ],
)
def test_any_other_global_is_refused(module, name, named, tmp_path):
    pkl = b"\x80\x02}" + p_str("x") + p_global(module, name) + b")R" + b"s."
    assert_refused(torch_like_zip(tmp_path, pkl), f"refused to load global {named} named in archive/data.pkl")


# ---------------------------------------------------------------------------------------------------------
# Broken files: one line, naming the file and what was expected.


@pytest.mark.parametrize(
    "fname, expect",
    [
        ("truncated.bin", "truncated or corrupt"),
        ("not_a_zip.bin", "Git LFS pointer"),
        ("missing_storage.bin", "storage record state_dict/data/1"),
        ("legacy.bin", "re-save it with torch >= 1.6 or convert it to safetensors"),
        ("complex64.bin", "unsupported dtype torch.ComplexFloatStorage"),
    ],
)
def test_broken_fixture(fname, expect):
    assert_refused(FIXTURES / fname, expect)


def test_plain_file_and_empty_file_are_not_zips(tmp_path):
    for content in (b"hello, I am not a checkpoint\n", b""):
        path = tmp_path / "pytorch_model.bin"
        path.write_bytes(content)
        assert_refused(path, "not a zip archive")


def test_missing_file_and_directory(tmp_path):
    assert_refused(tmp_path / "absent.bin", "cannot open")
    assert_refused(tmp_path, "cannot open")


def test_missing_data_pkl(tmp_path):
    path = rewrite(tmp_path, lambda name, data: [] if name.endswith("data.pkl") else [(name, data)])
    assert_refused(path, "expected one <folder>/data.pkl")


def test_storage_too_short(tmp_path):
    path = rewrite(tmp_path, lambda name, data: [(name, data[: len(data) // 2] if name.endswith("/data/0") else data)])
    assert_refused(path, "storage record state_dict/data/0 holds 256 bytes, expected 512")


def test_corrupt_storage_bytes_fail_the_crc(tmp_path):
    raw = bytearray(GOOD.read_bytes())
    with zipfile.ZipFile(GOOD) as zf:
        header = zf.getinfo("state_dict/data/0").header_offset
    name_len, extra_len = struct.unpack("<HH", raw[header + 26 : header + 30])  # local file header fields
    raw[header + 30 + name_len + extra_len] ^= 1  # first byte of the stored (uncompressed) storage
    path = tmp_path / "flipped.bin"
    path.write_bytes(bytes(raw))
    assert_refused(path, "record state_dict/data/0 is unreadable (Bad CRC-32")


def test_bad_byteorder_record(tmp_path):
    path = rewrite(tmp_path, lambda name, data: [(name, b"middle" if name.endswith("/byteorder") else data)])
    assert_refused(path, "expected 'little' or 'big'")


def test_missing_byteorder_means_little(tmp_path, expected):
    path = rewrite(tmp_path, lambda name, data: [] if name.endswith("/byteorder") else [(name, data)])
    assert_matches(*load_torch_file(path), expected)


@pytest.mark.parametrize(
    "pkl, expect",
    [
        (pickle.dumps([1, 2], protocol=2), "data.pkl holds a list, expected a state dict"),
        (pickle.dumps({"a": 1}, protocol=2), "entry 'a' is a int, expected a tensor"),
        (pickle.dumps({"model": {}}, protocol=2), "a training checkpoint?"),
        (pickle.dumps({3: None}, protocol=2), "key 3 is not a string"),
        (b"\x80\x02}(garbage", "not a valid state-dict pickle"),
        (b"", "not a valid state-dict pickle"),
    ],
)
def test_pickle_that_is_not_a_dict_of_tensors(pkl, expect, tmp_path):
    assert_refused(torch_like_zip(tmp_path, pkl), expect)


@pytest.mark.parametrize(
    "size, stride, offset, expect",
    [
        ((3,), (2,), 0, "reaches element 4 but its storage '0' holds 4 float32 elements"),
        ((2, 2), (2, 1), 1, "reaches element 4"),
        ((5,), (1,), 0, "reaches element 4"),
        ((2,), (-1,), 1, "negative offset or stride"),
        ((2,), (1,), -1, "negative offset or stride"),
        ((-2,), (1,), 0, "negative size"),
        ((2, 2), (1,), 0, "lengths differ"),
    ],
)
def test_tensor_outside_its_storage(size, stride, offset, expect, tmp_path):
    pkl = b"\x80\x02}" + p_str("w") + p_tensor(size, stride, offset, numel=4) + b"s."
    path = torch_like_zip(tmp_path, pkl, {"0": np.arange(4, dtype="<f4").tobytes()})
    assert_refused(path, expect)


def test_hand_made_tensor_reads_back(tmp_path):
    """The hand-made pickle of the tests above is right: in bounds, it reads the expected view."""
    pkl = b"\x80\x02}" + p_str("w") + p_tensor((2, 2), (1, 2), 1, numel=6) + b"s."
    path = torch_like_zip(tmp_path, pkl, {"0": np.arange(6, dtype="<f4").tobytes()})
    tensors, dtypes = load_torch_file(path)
    assert tensors["w"].tolist() == [[1.0, 3.0], [2.0, 4.0]] and dtypes == {"w": "float32"}


def test_a_tensor_at_a_storage_offset_streams_from_the_right_bytes(tmp_path):
    """A [2, 3] tensor starting 4 elements into its storage (as torch.save writes a view, or a tensor sharing a
    storage): the streamed path reads its rows straight from the file at span()'s byte offset, which counts the
    storage offset in elements times their size; taken as bytes it would read the storage from element 1."""
    from radial_min.analysis.stream import _FileRows

    pkl = b"\x80\x02}" + p_str("w") + p_tensor((2, 3), (3, 1), 4, numel=10) + b"s."
    path = torch_like_zip(tmp_path, pkl, {"0": np.arange(10, dtype="<f4").tobytes()})
    f = TorchFile(path)
    assert f.read("w").tolist() == [[4.0, 5.0, 6.0], [7.0, 8.0, 9.0]]
    offset, stored = f.span("w")
    rows = _FileRows(path, stored, offset, (2, 3))
    np.testing.assert_array_equal(rows.rows(0, 2), f.read("w"))
    np.testing.assert_array_equal(rows[[1, 0]], f.read("w")[[1, 0]])


@settings(
    max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(position=st.integers(min_value=0), xor=st.integers(min_value=1, max_value=255))
@pytest.mark.slow
def test_any_flipped_byte_gives_the_right_values_or_a_checkpoint_error(position, xor, expected, tmp_path):
    data = bytearray(GOOD.read_bytes())
    data[position % len(data)] ^= xor
    path = tmp_path / "flipped.bin"
    path.write_bytes(bytes(data))
    try:
        result = load_torch_file(path)
    except CheckpointError as e:
        assert str(path) in str(e)
    else:
        assert_matches(*result, expected)  # only bytes nobody reads (timestamps, padding) may change


@pytest.mark.slow
def test_every_truncation_gives_a_checkpoint_error(tmp_path):
    data = GOOD.read_bytes()
    path = tmp_path / "cut.bin"
    for n in range(0, len(data), 97):
        path.write_bytes(data[:n])
        assert_refused(path, "")


# ---------------------------------------------------------------------------------------------------------
# Helpers.


def assert_refused(path, expect):
    with pytest.raises(CheckpointError) as err:
        load_torch_file(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and expect in message and "\n" not in message, message


def pickle_globals(path) -> list:
    """The globals data.pkl names, as "module name", whether by GLOBAL or STACK_GLOBAL."""
    with zipfile.ZipFile(path) as zf:
        data = zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl")))
    found, strings = [], []
    for op, arg, _ in pickletools.genops(data):
        if op.name == "GLOBAL":
            found.append(arg)
        elif op.name == "STACK_GLOBAL":
            found.append(" ".join(strings[-2:]))
        elif isinstance(arg, str):
            strings.append(arg)
    return found


def rewrite(tmp_path, change) -> Path:
    """A copy of state_dict.bin with each (name, data) record replaced by change(name, data)'s list of records."""
    out = tmp_path / "changed.bin"
    with zipfile.ZipFile(GOOD) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            for name, data in change(info.filename, src.read(info)):
                dst.writestr(zipfile.ZipInfo(name), data)
    return out


def torch_like_zip(tmp_path, data_pkl: bytes, storages=None) -> Path:
    path = tmp_path / "made.bin"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", data_pkl)
        zf.writestr("archive/byteorder", b"little")
        for key, data in (storages or {}).items():
            zf.writestr(f"archive/data/{key}", data)
    return path


def p_str(s: str) -> bytes:
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def p_int(i: int) -> bytes:
    return b"J" + struct.pack("<i", i)


def p_global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def p_tuple(values) -> bytes:
    return b"(" + b"".join(p_int(v) for v in values) + b"t"


def p_tensor(size, stride, offset, numel) -> bytes:
    """torch._utils._rebuild_tensor_v2 over FloatStorage '0', as torch.save spells it."""
    storage_class = p_global("torch", "FloatStorage")
    storage = b"(" + p_str("storage") + storage_class + p_str("0") + p_str("cpu") + p_int(numel) + b"tQ"
    hooks = p_global("collections", "OrderedDict") + b")R"
    args = b"(" + storage + p_int(offset) + p_tuple(size) + p_tuple(stride) + b"\x89" + hooks + b"t"
    return p_global("torch._utils", "_rebuild_tensor_v2") + args + b"R"


# ---------------------------------------------------------------------------------------------------------
# Memory bombs: every size is bounded by what the archive really holds before anything is allocated.


def test_zero_stride_bomb_is_refused_before_allocating(tmp_path):
    pkl = b"\x80\x02}" + p_str("w") + p_tensor((30000, 30000), (0, 0), 0, numel=1) + b"s."  # 3.6 GB from 4 bytes
    path = torch_like_zip(tmp_path, pkl, {"0": np.zeros(1, "<f4").tobytes()})
    assert_refused(path, "far more than the file holds")  # load_torch_file: the whole file's budget
    assert TorchFile(path).shape("w") == (30000, 30000)  # the lazy reader (radial_min.load's) only describes it...
    with pytest.raises(CheckpointError, match=r"overlapping strides \[0, 0\]"):  # ...and refuses to build it
        TorchFile(path).read("w")


def test_small_expanded_tensor_still_reads(tmp_path):
    pkl = b"\x80\x02}" + p_str("w") + p_tensor((3, 4), (1, 0), 0, numel=3) + b"s."
    path = torch_like_zip(tmp_path, pkl, {"0": np.arange(3, dtype="<f4").tobytes()})
    assert load_torch_file(path)[0]["w"].tolist() == [[0.0] * 4, [1.0] * 4, [2.0] * 4]


def test_zip_bomb_record_is_refused_before_inflating(tmp_path):
    numel = 5 << 20  # 20 MB of zeros deflate to ~20 KB
    pkl = b"\x80\x02}" + p_str("w") + p_tensor((numel,), (1,), 0, numel=numel) + b"s."
    path = tmp_path / "bomb.bin"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/data.pkl", pkl)
        zf.writestr("archive/data/0", bytes(4 * numel))
    assert path.stat().st_size < 100_000
    with pytest.raises(CheckpointError, match="record archive/data/0 would inflate to 20971520 bytes"):
        TorchFile(path).read("w")


def test_huge_memo_index_is_refused_before_unpickling(tmp_path):
    pkl = b"\x80\x02}r" + struct.pack("<I", 1 << 24) + b"."  # LONG_BINPUT 2**24: the C unpickler's memo grows to it
    assert_refused(torch_like_zip(tmp_path, pkl), "memo index 16777216")


def test_many_views_of_one_storage_are_refused(tmp_path):
    """A small storage viewed by many names would copy it once per name: bounded by the file's size."""
    n, numel = 600, 1 << 14
    body = b"".join(p_str(f"w{i}") + p_tensor((numel,), (1,), 0, numel=numel) for i in range(n))
    path = torch_like_zip(tmp_path, b"\x80\x02}(" + body + b"u.", {"0": np.zeros(numel, "<f4").tobytes()})
    assert_refused(path, "far more than the file holds")
