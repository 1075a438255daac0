"""Write the pytorch_model.bin fixtures for tests/test_torch_pickle.py into tests/fixtures/torch_bin/.

Dev-only: needs torch, which the package and its tests never import. Run from anywhere, with a Python that has it:

    python tools/make_torch_fixtures.py

Re-runnable and deterministic (fixed seeds, fixed zip timestamps): running it twice gives identical files.
Every fixture is checked against torch itself: the good files load in torch to the expected values, and each
hostile file really does run its payload under `torch.load(weights_only=False)`, so the tests that refuse them
refuse something live.
"""

import io
import json
import os
import pickle
import struct
import subprocess
import tempfile
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch import nn

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "torch_bin"
FIXED_TIME = (1980, 1, 1, 0, 0, 0)


# ---------------------------------------------------------------------------------------------------------
# The good state dict.


def build_state_dict() -> OrderedDict:
    """A tiny OPT-shaped module's state_dict() (so it carries `_metadata`, restored by BUILD), plus one tensor per
    dtype and layout the reader must handle."""
    torch.manual_seed(20240601)
    layer = nn.Module()
    layer.self_attn = nn.Module()
    layer.self_attn.k_proj = nn.Linear(8, 6)
    layer.self_attn_layer_norm = nn.LayerNorm(8)
    decoder = nn.Module()
    decoder.embed_tokens = nn.Embedding(16, 8)
    decoder.layers = nn.ModuleList([layer])
    root = nn.Module()
    root.decoder = decoder
    root.lm_head = nn.Linear(8, 16, bias=False)
    root.lm_head.weight = decoder.embed_tokens.weight  # tied: two names, one storage
    with torch.no_grad():
        for p in root.parameters():
            p.copy_(torch.randn_like(p))
    sd = root.state_dict()

    k_proj = sd["decoder.layers.0.self_attn.k_proj.weight"]
    sd["extra.float16"] = torch.randn(3, 5).half()
    sd["extra.alias_of_float16"] = sd["extra.float16"]  # the same tensor object: pickled once, then memo-referenced
    scale = torch.tensor([1e-30, 1.0, 3e30])
    sd["extra.bfloat16"] = (torch.randn(4, 3) * scale).bfloat16()
    sd["extra.float64"] = torch.randn(2, 3, dtype=torch.float64)
    sd["extra.int64"] = torch.tensor([-(2**40), -1, 0, 7, 2**62], dtype=torch.int64)
    sd["extra.int32"] = torch.tensor([[-(2**31), 5], [2**31 - 1, 0]], dtype=torch.int32)
    sd["extra.int16"] = torch.tensor([-32768, 300, 32767], dtype=torch.int16)
    sd["extra.int8"] = torch.tensor([-128, -1, 127], dtype=torch.int8)
    sd["extra.uint8"] = torch.tensor([0, 200, 255], dtype=torch.uint8)
    sd["extra.bool"] = torch.tensor([True, False, True])
    sd["extra.uint16"] = torch.tensor([0, 1, 65535, 4660], dtype=torch.uint16)  # saved via _rebuild_tensor_v3
    sd["extra.transposed"] = k_proj.t()  # non-contiguous view of k_proj's storage
    sd["extra.block"] = torch.randn(5, 7)[1:4, 2:6]  # offset 9, row stride 7
    sd["extra.tail"] = torch.arange(20, dtype=torch.float32)[12:17]  # contiguous, offset 12
    sd["extra.half_columns"] = torch.randn(4, 6).half()[:, ::2]  # float16, stride (6, 2)
    sd["extra.expanded"] = torch.randn(3, 1).expand(3, 4)  # stride 0
    sd["extra.scalar"] = torch.tensor(3.5)
    sd["extra.empty"] = torch.zeros(0, 3)
    return sd


def expected_array(t: torch.Tensor) -> np.ndarray:
    """What the reader must return: bf16 widened to float32, everything else as stored, contiguous."""
    t = t.float() if t.dtype == torch.bfloat16 else t
    return t.contiguous().numpy().copy()  # not np.ascontiguousarray, which turns 0-d into 1-d


def dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------------------------------------
# Zip helpers: fixed timestamps and stored entries, so output is byte-for-byte repeatable.


def write_zip(path: Path, records: list) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, data in records:
            zf.writestr(zipfile.ZipInfo(name, FIXED_TIME), data)


def read_zip(path: Path) -> list:
    with zipfile.ZipFile(path) as zf:
        return [(info.filename, zf.read(info)) for info in zf.infolist()]


def write_npz(path: Path, arrays: dict) -> None:
    """Like np.savez, minus the current time np.savez stamps into each entry."""
    records = []
    for name, a in arrays.items():
        buf = io.BytesIO()
        np.lib.format.write_array(buf, a, allow_pickle=False)
        records.append((name + ".npy", buf.getvalue()))
    write_zip(path, records)


def storage_itemsizes(sd) -> dict:
    """Storage key -> element size, in the order torch.save numbers storages (first use, in dict order)."""
    keys = {}
    for t in sd.values():
        keys.setdefault(t.untyped_storage()._cdata, (str(len(keys)), t.element_size()))
    return dict(keys.values())


def big_endian_copy(src: Path, dst: Path, sd) -> None:
    """Rewrite a little-endian torch.save file as a big-endian machine would have written it."""
    itemsizes = storage_itemsizes(sd)
    records = []
    for name, data in read_zip(src):
        rest = name.partition("/")[2]
        name = "archive/" + rest  # a different folder name than torch.save's, to exercise that too
        if rest == "byteorder":
            data = b"big"
        elif rest.startswith("data/") and itemsizes[rest[5:]] > 1:
            data = np.frombuffer(data, dtype=f"u{itemsizes[rest[5:]]}").byteswap().tobytes()
        records.append((name, data))
    write_zip(dst, records)


# ---------------------------------------------------------------------------------------------------------
# Hand-made pickles.


def p_str(s: str) -> bytes:
    """BINUNICODE."""
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def p_int(i: int) -> bytes:
    """BININT (signed 32-bit)."""
    return b"J" + struct.pack("<i", i)


def p_global(module: str, name: str) -> bytes:
    """GLOBAL: the opcode protocol 0-2 use to name a class or function."""
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def p_tensor_1d(key: str, numel: int) -> bytes:
    """A float32 vector on storage `key`, spelled the way torch.save spells it."""
    storage_class = p_global("torch", "FloatStorage")
    storage_id = b"(" + p_str("storage") + storage_class + p_str(key) + p_str("cpu") + p_int(numel) + b"tQ"
    hooks = p_global("collections", "OrderedDict") + b")R"
    args = b"(" + storage_id + p_int(0) + b"(" + p_int(numel) + b"t(" + p_int(1) + b"t\x89" + hooks + b"t"
    return p_global("torch._utils", "_rebuild_tensor_v2") + args + b"R"


def hostile_os_system_pickle(marker: str) -> bytes:
    """A plausible first tensor, then `posix.system("touch <marker>")` as the second entry's value.

    posix.system is what pickling os.system gives on Linux."""
    body = p_str("decoder.embed_tokens.weight") + p_tensor_1d("0", 4)
    body += p_str("decoder.final_layer_norm.weight") + p_global("posix", "system") + p_str(f"touch {marker}") + b"\x85R"
    return b"\x80\x02}(" + body + b"u."


def hostile_eval_pickle(marker: str) -> bytes:
    """Protocol 4, naming the global with STACK_GLOBAL rather than GLOBAL: {"w": eval("open(marker).close()")}."""

    def short(s):  # SHORT_BINUNICODE
        return b"\x8c" + bytes([len(s.encode())]) + s.encode()

    call = short("builtins") + short("eval") + b"\x93" + short(f"open({marker!r}, 'w').close()") + b"\x85R"
    return b"\x80\x04}" + short("w") + call + b"s."


class _PopenPayload:
    """Pickles as subprocess.Popen(["touch", marker]), the way an attacker's class with __reduce__ would."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return subprocess.Popen, (["touch", self.marker],)


def torch_like_zip(path: Path, data_pkl: bytes, storages: dict) -> None:
    records = [("archive/data.pkl", data_pkl), ("archive/byteorder", b"little")]
    records += [(f"archive/data/{k}", v) for k, v in storages.items()]
    records.append(("archive/version", b"3\n"))
    write_zip(path, records)


def write_legacy(path: Path) -> None:
    """The pre-1.6 format. It names storages by memory address; pin that to a same-length constant to stay
    deterministic (same length keeps the pickle's length prefixes right)."""
    w = torch.randn(3)
    buf = io.BytesIO()
    torch.save({"w": w}, buf, _use_new_zipfile_serialization=False)
    address = str(w.untyped_storage()._cdata).encode()
    data = buf.getvalue()
    assert data.count(address) == 2, "expected the storage key in the tensor and in the key list"
    path.write_bytes(data.replace(address, b"1" * len(address)))
    assert torch.equal(torch.load(path, weights_only=True)["w"], w)


def check_payload_is_live(path: Path, marker: str) -> None:
    """The payload must really run under an unrestricted load; otherwise refusing it proves nothing."""
    here = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        try:
            with warnings.catch_warnings():  # torch warns about protocol 4 in hostile_eval.bin
                warnings.simplefilter("ignore")
                loaded = torch.load(path, weights_only=False)
            for v in loaded.values():
                if isinstance(v, subprocess.Popen):
                    v.wait()
            assert Path(marker).exists(), f"{path.name}: payload did not run"
        finally:
            os.chdir(here)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.load(path, weights_only=True)
    except Exception:
        pass
    else:
        raise AssertionError(f"{path.name}: torch's own weights_only loader accepted it")


# ---------------------------------------------------------------------------------------------------------


def assert_torch_loads_as(path: Path, sd, unswapped=()) -> None:
    """torch.load gives back `sd`, except names in `unswapped`, which it returns byte-swapped (see main)."""
    back = torch.load(path, weights_only=True)
    assert list(back) == list(sd), path
    for name, t in sd.items():
        want = torch.from_numpy(t.numpy().byteswap()) if name in unswapped else t
        assert back[name].dtype == t.dtype and torch.equal(back[name], want), (path, name)


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    for old in OUT.iterdir():
        old.unlink()

    sd = build_state_dict()
    good = OUT / "state_dict.bin"
    torch.save(sd, good)
    assert_torch_loads_as(good, sd)
    write_npz(OUT / "state_dict.npz", {name: expected_array(t) for name, t in sd.items()})
    (OUT / "state_dict.json").write_text(json.dumps({name: dtype_name(t) for name, t in sd.items()}, indent=1) + "\n")

    big_endian_copy(good, OUT / "state_dict_big_endian.bin", sd)
    # torch byte-swaps a big-endian storage by the dtype in its persistent id, which for the untyped storages of
    # _rebuild_tensor_v3 (uint16/32/64, float8) is uint8: torch leaves them unswapped. A big-endian machine writes
    # its uint16 big-endian, so we swap them, and the expected values stay the true ones.
    assert_torch_loads_as(OUT / "state_dict_big_endian.bin", sd, unswapped={"extra.uint16"})

    # Broken files.
    data = good.read_bytes()
    (OUT / "truncated.bin").write_bytes(data[: len(data) * 6 // 10])
    (OUT / "not_a_zip.bin").write_bytes(
        b"version https://git-lfs.github.com/spec/v1\n"
        b"oid sha256:0000000000000000000000000000000000000000000000000000000000000000\nsize 250540281\n"
    )
    write_zip(OUT / "missing_storage.bin", [(n, d) for n, d in read_zip(good) if n != "state_dict/data/1"])
    write_legacy(OUT / "legacy.bin")
    torch.save({"w": torch.randn(2, dtype=torch.complex64)}, OUT / "complex64.bin")

    # Hostile files: if its payload runs, each creates a marker file in the current directory.
    popen = pickle.dumps({"decoder.fc1.weight": _PopenPayload("pwned_popen")}, protocol=2)
    hostile = {  # file -> (marker, data.pkl, storages)
        "hostile_os_system.bin": ("pwned_os_system", hostile_os_system_pickle("pwned_os_system"), {"0": bytes(16)}),
        "hostile_eval.bin": ("pwned_eval", hostile_eval_pickle("pwned_eval"), {}),
        "hostile_popen.bin": ("pwned_popen", popen, {}),
    }
    for name, (marker, pkl, storages) in hostile.items():
        torch_like_zip(OUT / name, pkl, storages)
        check_payload_is_live(OUT / name, marker)

    total = sum(p.stat().st_size for p in OUT.iterdir())
    assert total < 200_000, total
    for p in sorted(OUT.iterdir()):
        print(f"{p.stat().st_size:8d}  {p.name}")
    print(f"{total:8d}  total")


if __name__ == "__main__":
    main()
