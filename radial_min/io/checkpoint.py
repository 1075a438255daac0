"""Weight files as Hugging Face writes them: safetensors (single or sharded) and PyTorch's pytorch_model.bin.

The `safetensors` package writes the .safetensors files we make from tensors in memory (`write_safetensors`: its
serializer, our atomic rename: routers, training states, exports) and is the reference our reader is fuzzed
against (tests/test_fuzz.py: we accept exactly what it accepts, with the same values). A checkpoint converted tensor
by tensor, larger than memory, is written by `write_safetensors_from`, since the package's serializer takes every
tensor at once. Reading is our own, for two reasons the package cannot serve: its NumPy API has no
bfloat16 (NumPy has no such dtype; we widen the raw bits to float32, see dtypes.py), and its errors do not name
the file and tensor at fault, while ours check every header rule of the package (each one of its
`SafeTensorError`s) in one line naming both, before anything is allocated. Tensors are read one at a time
straight into float32 arrays, so peak memory is the model plus one tensor; a pytorch_model.bin likewise, each
tensor cut out of its storage only after the names and shapes have been checked against the config.
"""

import json
import math
import os
import struct
from pathlib import Path

import numpy as np
import safetensors

from ..dtypes import bf16_to_float32, to_float32, to_storage  # noqa: F401 (bf16_to_float32 re-exported)
from ..errors import CheckpointError, count
from .outputs import parse_json, present, read_json, write_bytes
from .torch_pickle import TorchFile as open_bin

# safetensors dtype codes -> NumPy dtype as stored
_ST_DTYPES = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # raw bits; see dtypes.to_float32
    "F64": np.dtype("<f8"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_FLOAT_CODES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
_DTYPE_NAMES = {**_FLOAT_CODES, "I64": "int64", "I32": "int32", "U8": "uint8", "BOOL": "bool"}


_MAX_HEADER = 100_000_000  # bytes, the safetensors package's limit


def quote(name, limit: int = 120) -> str:
    """A tensor name (or any file-supplied text) safe to print: repr escapes newlines and terminal escapes; a name
    longer than `limit` characters is cut (a 100 KB name would otherwise fill the terminal)."""
    text = repr(name)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class SafetensorsFile:
    """The header of one .safetensors file, checked as the safetensors package checks it (every rule below is one
    of its `SafeTensorError`s): tensors are read on demand, and no header field is trusted before it is checked."""

    def __init__(self, path):
        self.path = Path(path)
        if not present(self.path, CheckpointError):  # a FIFO would block the read: refused, as a folder is
            raise CheckpointError(f"{self.path}: not found")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{self.path}: too short to be a safetensors file ({count(size, 'byte')})")
            (n,) = struct.unpack("<Q", head)
            if n > min(_MAX_HEADER, size - 8):  # the number is the file's first bytes: never shown (a link to a
                raise CheckpointError(  # text file would print them), only what they fail
                    f"{self.path}: not a safetensors file, or truncated: its first 8 bytes do not give a header "
                    f"length within the file ({count(size, 'byte')}) and the {_MAX_HEADER:,}-byte limit"
                )
            header = self._parse_header(f.read(n))
        self.metadata = header.pop("__metadata__", None) or {}
        if not isinstance(self.metadata, dict) or not all(isinstance(v, str) for v in self.metadata.values()):
            raise CheckpointError(f"{self.path}: header __metadata__ must be an object of strings")
        self.data_start = 8 + n
        self.entries = {name: self._entry(name, e) for name, e in header.items()}
        end = 0  # the tensors must tile the data exactly: sorted by offset, each begins where the previous ended
        for name, (code, shape, begin, stop) in sorted(self.entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
            if begin != end:
                what = "overlaps the previous tensor" if begin < end else f"leaves a gap (bytes {end}..{begin})"
                raise CheckpointError(f"{self.path}: tensor {quote(name)} starts at data byte {begin} and {what}")
            if self.data_start + stop > size:
                raise CheckpointError(
                    f"{self.path}: tensor {quote(name)} ends at byte {self.data_start + stop} "
                    f"but the file has {size}: truncated"
                )
            end = stop
        if self.data_start + end != size:
            raise CheckpointError(
                f"{self.path}: the tensors cover {end} data bytes but the file holds {size - self.data_start}: "
                "trailing bytes after the last tensor"
            )
        self.entries = {name: (code, shape, begin) for name, (code, shape, begin, _) in self.entries.items()}

    def _parse_header(self, raw: bytes) -> dict:
        if not raw.startswith(b"{"):
            raise CheckpointError(f"{self.path}: header does not start with '{{': corrupt or not safetensors")
        header = parse_json(raw, self.path, CheckpointError, "header")  # a key twice is refused, as the package does
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: header is not a JSON object")
        return header

    def _entry(self, name, e):
        bad = f"{self.path}: tensor {quote(name)}"
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            raise CheckpointError(f"{bad}: header entry must be an object with exactly dtype, shape, data_offsets")
        code, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
        if not isinstance(code, str) or code not in _ST_DTYPES:
            expected = ", ".join(_ST_DTYPES)
            raise CheckpointError(f"{bad} has unsupported dtype {quote(code)} (expected one of {expected})")
        if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
            raise CheckpointError(f"{bad}: shape must be a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_uint(o) for o in offsets)):
            raise CheckpointError(f"{bad}: data_offsets must be two non-negative integers")
        begin, stop = offsets
        nbytes = math.prod(shape) * _ST_DTYPES[code].itemsize  # Python ints: no overflow
        if stop < begin or stop - begin != nbytes:
            raise CheckpointError(
                f"{bad} spans {count(stop - begin, 'byte')}, expected {nbytes} for {code}{shape} "
                f"(offsets {begin}..{stop})"
            )
        return code, tuple(shape), begin, stop

    def dtype(self, name) -> str:
        return _DTYPE_NAMES[self.entries[name][0]]

    def shape(self, name) -> tuple:
        return self.entries[name][1]

    def read(self, name) -> np.ndarray:
        """The tensor as float32 (floats) or its stored integer type."""
        code, shape, begin = self.entries[name]
        count = int(np.prod(shape, dtype=np.int64))
        raw = np.fromfile(self.path, dtype=_ST_DTYPES[code], count=count, offset=self.data_start + begin)
        if raw.size != count:
            raise CheckpointError(f"{self.path}: tensor {name!r} is truncated")
        raw = raw.reshape(shape)
        return to_float32(raw) if code in _FLOAT_CODES else raw


def _safe(name: str) -> str:
    return name if name.isprintable() else quote(name)


def _is_uint(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**64


class TensorStore:
    """All tensors of a checkpoint folder behind one interface, whatever files they live in."""

    def __init__(self, files: dict, where: dict, description: str):
        self.files = files  # file name -> SafetensorsFile or torch_pickle.TorchFile
        self.where = where  # tensor name -> file name
        self.description = description

    def names(self):
        return list(self.where)

    def shape(self, name) -> tuple:
        return self.files[self.where[name]].shape(name)

    def dtype(self, name) -> str:
        return self.files[self.where[name]].dtype(name)

    def read(self, name) -> np.ndarray:
        return self.files[self.where[name]].read(name)


WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def open_checkpoint(folder) -> TensorStore:
    """Find and open the weights in a checkpoint folder: safetensors preferred, then pytorch_model.bin."""
    folder = Path(folder)
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if present(single, CheckpointError):  # a folder or FIFO of that name is refused, not skipped for the next
        f = SafetensorsFile(single)
        return TensorStore({single.name: f}, {n: single.name for n in f.entries}, str(single))
    if present(index, CheckpointError):
        return _open_sharded(folder, index, SafetensorsFile)
    bin_single, bin_index = folder / "pytorch_model.bin", folder / "pytorch_model.bin.index.json"
    if present(bin_single, CheckpointError) or present(bin_index, CheckpointError):
        if bin_single.is_file():
            f = open_bin(bin_single)
            return TensorStore({bin_single.name: f}, {n: bin_single.name for n in f.entries}, str(bin_single))
        return _open_sharded(folder, bin_index, open_bin)
    raise CheckpointError(f"{folder}: no weights found (expected one of {', '.join(WEIGHT_FILES)})")


def _open_sharded(folder: Path, index_path: Path, opener) -> TensorStore:
    weight_map = read_json(index_path, CheckpointError, "an object with a 'weight_map'").get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index_path}: 'weight_map' must be an object of tensor name -> shard file name")
    files = {}
    for shard in sorted(set(weight_map.values())):
        path = _shard_path(folder, shard, index_path)
        if not present(path, CheckpointError):
            raise CheckpointError(f"{index_path}: shard {_safe(shard)} is listed but is not a file in {folder}")
        files[shard] = opener(path)
    for name, shard in weight_map.items():
        if name not in files[shard].entries:
            raise CheckpointError(
                f"{folder / shard}: tensor {quote(name)} is listed in {index_path.name} but not in the shard"
            )
    return TensorStore(files, dict(weight_map), str(index_path))


def _shard_path(folder: Path, shard: str, index_path: Path) -> Path:
    """A shard is a plain file name in the checkpoint folder: no absolute path, no directory, no '..'. (A symlink
    placed in the folder is followed: that is how the Hugging Face cache lays out snapshots.)"""
    path = folder / shard
    bad = Path(shard).name != shard or shard in ("", ".", "..") or "\\" in shard or "/" in shard or "\0" in shard
    if bad or len(os.fsencode(shard)) > 255:  # 255 bytes: the longest file name (NAME_MAX) Linux and macOS take
        raise CheckpointError(f"{index_path}: shard {quote(shard)} is not a file name inside {folder}: refused")
    return path


def write_safetensors(path, tensors: dict, metadata: dict | None = None, bfloat16=()) -> None:
    """Write float32/float16/int arrays as safetensors: the package's serializer makes the bytes, `write_bytes` puts
    them in place atomically (a temporary file renamed, named so a killed run's leftovers are found and removed).
    Tensors named in `bfloat16` are float32 arrays stored as BF16 (rounded to nearest even). The whole file is
    built in memory first: peak memory is the tensors plus the file."""
    specs, alive = {}, []  # the serializer reads raw pointers: every array stays alive until it is done
    for name, a in tensors.items():
        a = np.ascontiguousarray(a)
        dtype = a.dtype.name
        if name in bfloat16 and a.dtype == np.float32:
            a, dtype = to_storage(a, "bfloat16"), "bfloat16"  # the uint16 bits
        if dtype not in _WRITABLE:
            raise ValueError(f"tensor {name!r}: cannot write dtype {a.dtype}")
        a = a.astype(a.dtype.newbyteorder("<"), copy=False)
        alive.append(a)
        specs[name] = safetensors.TensorSpec(dtype=dtype, shape=a.shape, data_ptr=a.ctypes.data, data_len=a.nbytes)
    data = safetensors.serialize(specs, metadata={k: str(v) for k, v in metadata.items()} if metadata else None)
    write_bytes(path, data)


_WRITABLE = {"float32", "float16", "bfloat16", "int64", "int32"}


_WRITE_CODES = {
    np.dtype("float32"): "F32",
    np.dtype("float16"): "F16",
    np.dtype("int64"): "I64",
    np.dtype("int32"): "I32",
}


def write_safetensors_from(path, specs: dict, read, metadata: dict | None = None, bfloat16=()) -> None:
    """`write_safetensors` one tensor at a time: `specs` gives each name's (dtype, shape) for the header, `read(name)`
    the array when its turn comes, so peak memory is one tensor (converting a checkpoint larger than memory). The
    package's serializer cannot do this (it takes every tensor at once), so this writes the format itself, by the
    rules our reader checks; tests/test_loading.py reads its files back with the package."""
    header, offset, order = {}, 0, []
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    for name in sorted(specs):
        dtype, shape = np.dtype(specs[name][0]), tuple(specs[name][1])
        code = "BF16" if name in bfloat16 and dtype == np.float32 else _WRITE_CODES.get(dtype)
        if code is None:
            raise ValueError(f"tensor {name!r}: cannot write dtype {dtype}")
        nbytes = math.prod(shape) * _ST_DTYPES[code].itemsize
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
        order.append((name, code, shape))
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # align the data to 8 bytes, as the reference writer does
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")  # streamed here, then renamed: never half-written
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(head)))
            f.write(head)
            for name, code, shape in order:
                a = np.ascontiguousarray(read(name))
                if a.shape != shape:
                    raise ValueError(f"tensor {name!r}: read {a.shape}, the header says {shape}")
                a = to_storage(a, "bfloat16") if code == "BF16" else a.astype(_ST_DTYPES[code], copy=False)
                f.write(a.tobytes())
        os.replace(tmp, path)
    except OSError as e:  # a full disk, a read-only folder: name the file
        raise CheckpointError(f"{path}: cannot write ({e.strerror or e})") from None
    finally:
        tmp.unlink(missing_ok=True)
