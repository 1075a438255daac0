"""Weight files as Hugging Face writes them: safetensors (single or sharded) and PyTorch's pytorch_model.bin.

We parse safetensors ourselves (an 8-byte header length, a JSON header, raw little-endian data) because NumPy
has no bfloat16 and because checking every header before reading any data is what lets a truncated or corrupt
file fail with one clear message instead of a half-loaded model. Tensors are read one at a time straight into
float32 arrays, so peak memory is the model plus one tensor (a pytorch_model.bin is unpickled whole first).
"""
import json
import os
import struct
from pathlib import Path

import numpy as np

from .errors import CheckpointError

# safetensors dtype codes -> NumPy dtype as stored
_ST_DTYPES = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # raw bits; see `to_float32`
    "F64": np.dtype("<f8"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_FLOAT_CODES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
_DTYPE_NAMES = {**_FLOAT_CODES, "I64": "int64", "I32": "int32", "U8": "uint8", "BOOL": "bool"}


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 is the top half of a float32: shift the 16 stored bits up and reinterpret."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def to_float32(raw: np.ndarray, code: str) -> np.ndarray:
    if code == "BF16":
        return bf16_to_float32(raw)
    return raw.astype(np.float32, copy=False)


class SafetensorsFile:
    """The header of one .safetensors file, checked against the file's size; tensors are read on demand."""

    def __init__(self, path):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{self.path}: too short to be a safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100_000_000:
                raise CheckpointError(f"{self.path}: header length {n} exceeds the file ({size} bytes): truncated or not safetensors")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise CheckpointError(f"{self.path}: header is not valid JSON: corrupt or not safetensors") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        self.entries = {}
        for name, e in header.items():
            try:
                code, shape, (begin, end) = e["dtype"], tuple(e["shape"]), e["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.path}: tensor {name!r} has a malformed header entry") from None
            if code not in _ST_DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {code}")
            nbytes = int(np.prod(shape, dtype=np.int64)) * _ST_DTYPES[code].itemsize
            if end - begin != nbytes or begin < 0:
                raise CheckpointError(f"{self.path}: tensor {name!r} spans {end - begin} bytes, expected {nbytes} for {code}{list(shape)}")
            if self.data_start + end > size:
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} ends at byte {self.data_start + end} but the file has {size}: truncated"
                )
            self.entries[name] = (code, shape, begin)

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
        return to_float32(raw, code) if code in _FLOAT_CODES else raw


class InMemoryFile:
    """Tensors already in memory (from pytorch_model.bin), with the same interface as SafetensorsFile."""

    def __init__(self, path, tensors: dict, dtypes: dict):
        self.path, self.entries, self.dtypes = Path(path), tensors, dtypes

    def dtype(self, name) -> str:
        return self.dtypes[name]

    def shape(self, name) -> tuple:
        return tuple(self.entries[name].shape)

    def read(self, name) -> np.ndarray:
        a = self.entries[name]
        return a.astype(np.float32, copy=False) if a.dtype.kind == "f" else a


class TensorStore:
    """All tensors of a checkpoint folder behind one interface, whatever files they live in."""

    def __init__(self, files: dict, where: dict, description: str):
        self.files = files  # file name -> SafetensorsFile or InMemoryFile
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


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def open_checkpoint(folder) -> TensorStore:
    """Find and open the weights in a checkpoint folder: safetensors preferred, then pytorch_model.bin."""
    folder = Path(folder)
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        f = SafetensorsFile(single)
        return TensorStore({single.name: f}, {n: single.name for n in f.entries}, str(single))
    if index.is_file():
        return _open_sharded(folder, index, SafetensorsFile)
    bin_single, bin_index = folder / "pytorch_model.bin", folder / "pytorch_model.bin.index.json"
    if bin_single.is_file() or bin_index.is_file():
        from .torch_pickle import load_torch_file

        def open_bin(path):
            return InMemoryFile(path, *load_torch_file(path))

        if bin_single.is_file():
            f = open_bin(bin_single)
            return TensorStore({bin_single.name: f}, {n: bin_single.name for n in f.entries}, str(bin_single))
        return _open_sharded(folder, bin_index, open_bin)
    raise CheckpointError(f"{folder}: no weights found (expected one of {', '.join(WEIGHT_FILES)})")


def _open_sharded(folder: Path, index_path: Path, opener) -> TensorStore:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise CheckpointError(f"{index_path}: expected JSON with a 'weight_map' of tensor name -> shard file") from None
    files = {}
    for shard in sorted(set(weight_map.values())):
        path = folder / shard
        if not path.is_file():
            raise CheckpointError(f"{index_path}: shard {shard} is listed but {path} does not exist")
        files[shard] = opener(path)
    for name, shard in weight_map.items():
        if name not in files[shard].entries:
            raise CheckpointError(f"{folder / shard}: tensor {name!r} is listed in {index_path.name} but not in the shard")
    return TensorStore(files, dict(weight_map), str(index_path))


def write_safetensors(path, tensors: dict, metadata: dict | None = None, bfloat16=()) -> None:
    """Write float32/float16/int arrays as safetensors, atomically (a temporary file renamed into place).
    Tensors named in `bfloat16` are float32 arrays stored as BF16 (rounded to nearest even)."""
    from .kernels import to_storage

    dtype_codes = {np.dtype("float32"): "F32", np.dtype("float16"): "F16", np.dtype("int64"): "I64", np.dtype("int32"): "I32"}
    header, offset, arrays = {}, 0, []
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        code = dtype_codes.get(a.dtype)
        if name in bfloat16 and a.dtype == np.float32:
            a, code = to_storage(a, "bfloat16"), "BF16"
        if code is None:
            raise ValueError(f"tensor {name!r}: cannot write dtype {a.dtype}")
        header[name] = {"dtype": code, "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # align the data to 8 bytes, as the reference writer does
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")  # streamed here, then renamed: never half-written
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(head)))
            f.write(head)
            for a in arrays:
                f.write(a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
