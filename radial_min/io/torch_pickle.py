"""Read PyTorch's `pytorch_model.bin` (a `torch.save` of a state dict) without torch and without running its pickle.

Since torch 1.6, `torch.save` writes a zip archive (entries stored uncompressed) under one top folder whose name
varies ("archive", the file's stem, ...):

    <folder>/data.pkl        pickle (protocol 2) of the state dict; tensors refer to storages by key
    <folder>/data/<key>      one raw storage each: numel elements, packed, in the byte order below
    <folder>/byteorder       "little" or "big" (absent in old files: little)
    <folder>/version, ...    bookkeeping we do not need

In data.pkl each tensor is `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)`
and each storage is a persistent id `('storage', torch.FloatStorage, key, location, numel)`. Unpickling normally
imports and calls whatever globals the pickle names, so a hostile file can run any code. We unpickle with an
allow-list instead: the few globals a state dict needs map to our own inert stand-ins, everything else is
refused before it is called. The result is a description of each tensor, which we then cut out of its storage
with NumPy. Nothing from torch is imported.
"""

import _compat_pickle
import io
import math
import pickle
import pickletools
import re
import zipfile
import zlib
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import as_strided

from ..dtypes import bf16_to_float32
from ..errors import CheckpointError

# torch dtype name -> NumPy dtype of the stored elements, byte order still to be set. bfloat16 is kept as raw
# 16-bit patterns and widened to float32 at the end.
_ELEMENT_DTYPES = {
    "float32": "f4",
    "float16": "f2",
    "bfloat16": "u2",
    "float64": "f8",
    "int64": "i8",
    "int32": "i4",
    "int16": "i2",
    "int8": "i1",
    "uint8": "u1",
    "bool": "?",
    "uint16": "u2",  # the unsigned types beyond uint8 come through _rebuild_tensor_v3, see below
    "uint32": "u4",
    "uint64": "u8",
}

# The legacy typed storage classes torch still names in data.pkl (torch.<Name>Storage) -> torch dtype name.
_STORAGE_CLASSES = {
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "DoubleStorage": "float64",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
}

# `torch.save` of the pre-1.6 format starts by pickling this magic number (protocol 2, LONG1 with 10 bytes).
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


class _FormatError(Exception):
    """Raised while unpickling, where the file path is not at hand; turned into a CheckpointError with it."""


# ---------------------------------------------------------------------------------------------------------
# Inert stand-ins for the globals a state dict names. None of them can be changed by the pickle's BUILD opcode
# (which would otherwise let it set attributes on them): __setstate__ refuses.


class _Sealed:
    __slots__ = ()

    def __setstate__(self, state):
        raise _FormatError(f"data.pkl tries to set the state of {self!r}, which a state dict never does")


class _StorageClass(_Sealed):
    """Stands for `torch.<Name>Storage` (dtype known) or `torch.storage.UntypedStorage` (dtype None: bytes)."""

    __slots__ = ("name", "dtype")

    def __init__(self, name, dtype):
        self.name, self.dtype = name, dtype

    def __repr__(self):
        return f"torch.{self.name}"


class _DType(_Sealed):
    """Stands for a `torch.<dtype>` object, which `_rebuild_tensor_v3` takes to type an untyped storage."""

    __slots__ = ("name",)

    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return f"torch.{self.name}"


class _StorageRef(_Sealed):
    """One `<folder>/data/<key>` record: `dtype` is None for an untyped (byte) storage; `nbytes` as declared."""

    __slots__ = ("key", "dtype", "nbytes")

    def __init__(self, key, dtype, nbytes):
        self.key, self.dtype, self.nbytes = key, dtype, nbytes

    def __repr__(self):
        return f"storage {self.key!r}"


class _TensorRef(_Sealed):
    """A tensor as data.pkl describes it: a strided view (in elements) of one storage."""

    __slots__ = ("storage", "dtype", "offset", "shape", "strides")

    def __init__(self, storage, dtype, offset, shape, strides):
        self.storage, self.dtype, self.offset, self.shape, self.strides = storage, dtype, offset, shape, strides

    def __repr__(self):
        return "tensor"


class _StateDict(dict):
    """Stands for collections.OrderedDict (dicts keep order anyway). `nn.Module.state_dict()` carries a
    `_metadata` attribute (module versions) that the pickle restores with BUILD; we have no use for it."""

    __slots__ = ()

    def __setstate__(self, state):
        pass


class _Function(_Sealed):
    """An allowed callable, wrapped so that BUILD cannot reach the function's attributes."""

    __slots__ = ("name", "fn")

    def __init__(self, name, fn):
        self.name, self.fn = name, fn

    def __call__(self, *args):
        return self.fn(*args)

    def __repr__(self):
        return f"torch._utils.{self.name}"


def _check_ints(what, values):
    if not isinstance(values, tuple) or not all(isinstance(v, int) for v in values):
        raise _FormatError(f"data.pkl gives a tensor {what} of {values!r}, expected a tuple of ints")
    return values


def _tensor(storage, offset, size, stride, dtype):
    if not isinstance(storage, _StorageRef):
        raise _FormatError(f"data.pkl rebuilds a tensor from {storage!r}, expected a storage")
    if not isinstance(offset, int):
        raise _FormatError(f"data.pkl gives a storage offset of {offset!r}, expected an int")
    shape, strides = _check_ints("size", size), _check_ints("stride", stride)
    if len(shape) != len(strides):
        raise _FormatError(f"data.pkl gives a tensor of size {shape} with strides {strides} (lengths differ)")
    return _TensorRef(storage, dtype, offset, shape, strides)


def _rebuild_tensor(storage, storage_offset, size, stride):
    """The older form, without grad flag and hooks: dtype from the storage class."""
    return _tensor(storage, storage_offset, size, stride, _typed(storage))


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    """What torch writes for every dense CPU/CUDA tensor of a classic dtype; grad flag, hooks, metadata unused."""
    return _tensor(storage, storage_offset, size, stride, _typed(storage))


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    """What torch writes for newer dtypes (uint16/32/64, float8, ...): an untyped byte storage plus a dtype."""
    if not isinstance(dtype, _DType):
        raise _FormatError(f"data.pkl gives a tensor dtype of {dtype!r}, expected a torch dtype")
    if dtype.name not in _ELEMENT_DTYPES:
        raise _FormatError(f"unsupported tensor dtype torch.{dtype.name}")
    if not isinstance(storage, _StorageRef) or storage.dtype is not None:
        raise _FormatError(f"data.pkl rebuilds a torch.{dtype.name} tensor from {storage!r}, expected untyped storage")
    return _tensor(storage, storage_offset, size, stride, dtype.name)


def _rebuild_parameter(data, requires_grad, backward_hooks):
    """An nn.Parameter (saved by `torch.save(dict(model.named_parameters()))`) is just its tensor to us."""
    if not isinstance(data, _TensorRef):
        raise _FormatError(f"data.pkl makes a parameter of {data!r}, expected a tensor")
    return data


def _typed(storage):
    if isinstance(storage, _StorageRef) and storage.dtype is None:
        raise _FormatError(f"data.pkl rebuilds a tensor from untyped {storage!r} without giving its dtype")
    return getattr(storage, "dtype", None)


_ALLOWED_FUNCTIONS = {
    ("torch._utils", fn.__name__): _Function(fn.__name__, fn)
    for fn in (_rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter)
}
# Storage classes and dtypes are matched by shape of name, so a dtype we do not read (complex, float8, ...) gets
# "unsupported" rather than "refused"; what comes back is a marker that cannot be called.
_STORAGE_NAME = re.compile(r"[A-Z][A-Za-z0-9]*Storage")
_DTYPE_NAME = re.compile(r"(float|bfloat|int|uint|complex|bits|bool|qint|quint)[a-z0-9_]*")


def _allowed_global(module, name):
    """The stand-in for global `module.name`, or None if a state dict has no business naming it."""
    if (module, name) == ("collections", "OrderedDict"):
        return _StateDict
    if (module, name) in _ALLOWED_FUNCTIONS:
        return _ALLOWED_FUNCTIONS[module, name]
    if (module, name) == ("torch.storage", "UntypedStorage"):
        return _StorageClass("storage.UntypedStorage", None)
    if module == "torch" and _STORAGE_NAME.fullmatch(name):
        return _StorageClass(name, _STORAGE_CLASSES.get(name))  # dtype None here: unsupported, see persistent_load
    if module == "torch" and _DTYPE_NAME.fullmatch(name):
        return _DType(name)
    return None


def _python3_name(module, name) -> str:
    """Protocol 0-2 pickles spell some globals the Python 2 way (pickling subprocess.Popen writes
    "commands Popen", builtins.eval "__builtin__ eval"); name both so the message says what would have run."""
    written = _shown(f"{module}.{name}")
    py3 = _compat_pickle.NAME_MAPPING.get((module, name))
    py3 = py3 or (_compat_pickle.IMPORT_MAPPING.get(module, module), name)
    return written if py3 == (module, name) else f"{written} (= {py3[0]}.{py3[1]})"


def _shown(text: str) -> str:
    """A name from the file, safe to print in one line: as is if printable, else quoted (repr escapes it)."""
    return text if text.isprintable() else repr(text)


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles data.pkl with the allow-list: any other global stops the load before anything is called."""

    def __init__(self, data: bytes, path: Path, record: str):
        super().__init__(io.BytesIO(data))
        self.path, self.record = path, record
        self.storages = {}  # key -> _StorageRef; tensors sharing a storage (tied weights, views) name one key

    def find_class(self, module, name):
        found = _allowed_global(module, name)
        if found is None:
            raise CheckpointError(
                f"{self.path}: refused to load global {_python3_name(module, name)} named in {_shown(self.record)}: "
                "a state dict needs only tensors, so this file may be malicious (refused before it could run)"
            )
        return found

    def persistent_load(self, pid):
        """('storage', storage class, key, location, numel): location ("cpu", "cuda:0") is ignored, we load to RAM."""
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise _FormatError(f"data.pkl has persistent id {pid!r}, expected ('storage', type, key, location, numel)")
        _, cls, key, _location, numel = pid
        if not isinstance(cls, _StorageClass) or not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
            raise _FormatError(f"data.pkl has malformed storage id {pid!r}")
        if cls.dtype is None and cls.name != "storage.UntypedStorage":
            raise _FormatError(f"storage {key!r} has unsupported dtype torch.{cls.name}")
        itemsize = np.dtype(_ELEMENT_DTYPES[cls.dtype]).itemsize if cls.dtype else 1
        ref = _StorageRef(key, cls.dtype, numel * itemsize)
        known = self.storages.setdefault(key, ref)
        if (known.dtype, known.nbytes) != (ref.dtype, ref.nbytes):
            raise _FormatError(f"storage {key!r} is declared twice, as {known.dtype} and as {ref.dtype}")
        return known


# ---------------------------------------------------------------------------------------------------------
# The zip archive.


def load_torch_file(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Return (tensors, dtypes): tensors by state-dict name, and each tensor's dtype on disk
    ("float32", "float16", "bfloat16", "float64", "int64", ...). bfloat16 is upcast to float32
    (NumPy has no bf16: shift the 16 bits left into a uint32 and view as float32); every other
    dtype is returned as stored (float16 stays float16).

    Each tensor is a fresh C-contiguous array in native byte order. Names bound to the very same tensor object in
    the pickle share one array; names that are different views of one storage get arrays of their own.
    """
    path = Path(path)
    with _open_zip(path) as zf:
        folder = _archive_folder(zf, path)
        big_endian = _is_big_endian(zf, folder, path)
        state = _unpickle(zf, folder + "data.pkl", path)
        refs = _tensor_refs(state, path)
        return _materialize(zf, folder, refs, big_endian, path)


class TorchFile:
    """A pytorch_model.bin opened lazily, with SafetensorsFile's interface: the pickle is read and checked at once,
    each tensor is cut out of its storage only when read, so names and shapes can be checked against the config
    before any tensor is built (a hostile pickle's sizes cost nothing until they have been checked)."""

    def __init__(self, path):
        self.path = Path(path)
        with _open_zip(self.path) as zf:
            self.folder = _archive_folder(zf, self.path)
            self.big_endian = _is_big_endian(zf, self.folder, self.path)
            self.entries = _tensor_refs(_unpickle(zf, self.folder + "data.pkl", self.path), self.path)

    def dtype(self, name) -> str:
        return self.entries[name].dtype

    def shape(self, name) -> tuple:
        return self.entries[name].shape

    def read(self, name) -> np.ndarray:
        """The tensor as float32 (floats) or its stored integer type."""
        out = self.read_stored(name)
        return out.astype(np.float32, copy=False) if out.dtype.kind == "f" else out

    def read_stored(self, name) -> np.ndarray:
        """The tensor in its stored dtype (bfloat16 widened to float32, as `load_torch_file` does)."""
        ref = self.entries[name]
        with _open_zip(self.path) as zf:
            raw = _read_storage(zf, self.folder, ref.storage, name, self.path)
            return _cut_tensor(raw, ref, self.big_endian, name, self.path)

    def storage(self, name) -> str:
        """The key of the storage record the tensor is cut from (tensors that share one name the same key)."""
        return self.entries[name].storage.key

    def span(self, name):
        """(byte offset in the .bin file, stored dtype; bfloat16 as uint16 bits) of a row-major tensor whose
        record torch.save stored uncompressed, so rows can be read straight from the file (once the record's CRC
        has been checked, in pieces); None for any other layout. `stream.py` reads embedding rows this way."""
        ref = self.entries[name]
        stored = np.dtype(_ELEMENT_DTYPES[ref.dtype]).newbyteorder(">" if self.big_endian else "<")
        contiguous = tuple(math.prod(ref.shape[i + 1 :]) for i in range(len(ref.shape)))
        if math.prod(ref.shape) == 0 or tuple(ref.strides) != contiguous:
            return None
        record = f"{self.folder}data/{ref.storage.key}"
        with _open_zip(self.path) as zf:
            if not _has_record(zf, record):
                raise CheckpointError(f"{self.path}: storage record {record} (for {name!r}) is missing from the zip")
            info = zf.getinfo(record)
            _check_bounds(ref, info.file_size // stored.itemsize, name, self.path)
            if info.compress_type != zipfile.ZIP_STORED:
                return None
            with zf.open(info) as f:  # the CRC of the whole record, 16 MiB at a time
                try:
                    while f.read(1 << 24):
                        pass
                except zipfile.BadZipFile as e:
                    why = f"record {record} is unreadable ({e})"
                    raise CheckpointError(f"{self.path}: {why}: truncated or corrupt") from None
        with open(self.path, "rb") as f:  # the record's data follows its local header (30 bytes, name, extra field)
            f.seek(info.header_offset)
            head = f.read(30)
        if len(head) < 30 or head[:4] != b"PK\x03\x04":
            raise CheckpointError(f"{self.path}: record {record} has no local header where the zip directory says")
        n_name, n_extra = int.from_bytes(head[26:28], "little"), int.from_bytes(head[28:30], "little")
        return info.header_offset + 30 + n_name + n_extra + ref.offset * stored.itemsize, stored


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, EOFError, ValueError, NotImplementedError):  # all seen from corrupt directories
        raise CheckpointError(_not_a_zip_message(path)) from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open ({e.strerror or e})") from None


def _not_a_zip_message(path: Path) -> str:
    """Say what the file looks like instead, since the fix differs."""
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"version https://git-lfs"):
        return f"{path}: is a Git LFS pointer, not the weights: fetch the file itself (git lfs pull, or from the Hub)"
    if head.startswith(b"PK\x03\x04"):
        return f"{path}: starts like a zip archive but its directory is unreadable: the file is truncated or corrupt"
    if head.startswith(_LEGACY_MAGIC) or head.startswith(b"\x80"):
        return (
            f"{path}: looks like the legacy PyTorch format (torch < 1.6, or _use_new_zipfile_serialization=False), "
            "which is not supported: re-save it with torch >= 1.6 or convert it to safetensors"
        )
    return f"{path}: not a zip archive; expected a PyTorch checkpoint written by torch.save (torch >= 1.6 zip format)"


def _archive_folder(zf: zipfile.ZipFile, path: Path) -> str:
    """The top folder holding data.pkl ("archive/", "pytorch_model/", ...)."""
    pickles = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        found = "none" if not pickles else ", ".join(map(_shown, pickles))
        raise CheckpointError(
            f"{path}: expected one <folder>/data.pkl record in the zip, found {found}: not a torch.save checkpoint"
        )
    return pickles[0][: -len("data.pkl")]


def _has_record(zf: zipfile.ZipFile, name: str) -> bool:
    try:
        zf.getinfo(name)
        return True
    except KeyError:
        return False


def _read_record(zf: zipfile.ZipFile, name: str, path: Path) -> bytes:
    """Read one record whole; the zip's CRC check catches corrupt data. torch.save stores records uncompressed, so
    a record that would inflate beyond the archive's own size is refused before it is read (a zip bomb)."""
    try:
        size, limit = zf.getinfo(name).file_size, path.stat().st_size
        if size > limit:
            raise CheckpointError(
                f"{path}: record {_shown(name)} would inflate to {size} bytes, more than the whole archive "
                f"({limit} bytes): "
                "torch.save never compresses, so this file is corrupt or hostile (a zip bomb?)"
            )
        return zf.read(name)
    except KeyError:
        raise CheckpointError(f"{path}: record {_shown(name)} is missing from the zip archive") from None
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError, RuntimeError, ValueError) as e:
        why = f"{_shown(name)} is unreadable ({_shown(str(e)) or type(e).__name__})"
        raise CheckpointError(f"{path}: record {why}: the file is truncated or corrupt") from None


def _is_big_endian(zf: zipfile.ZipFile, folder: str, path: Path) -> bool:
    if not _has_record(zf, folder + "byteorder"):
        return False  # files from before the record existed were written on little-endian machines
    order = _read_record(zf, folder + "byteorder", path)
    if order not in (b"little", b"big"):
        raise CheckpointError(
            f"{path}: record {_shown(folder)}byteorder has {len(order)} bytes, expected 'little' or 'big'"
        )
    return order == b"big"


def _check_memo(data: bytes, path: Path, record: str) -> None:
    """The C unpickler grows its memo to the largest index a PUT names (LONG_BINPUT 2**28 allocates gigabytes):
    refuse any memo index beyond what a pickle of this length can have filled, before unpickling."""
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name in _MEMO_OPS and isinstance(arg, int) and not 0 <= arg < len(data):
                raise CheckpointError(
                    f"{path}: {record} uses memo index {arg} in a {len(data)}-byte pickle: corrupt or hostile"
                )
            if op.name == "STOP":
                return
    except (ValueError, UnicodeDecodeError):
        return  # malformed from here on: the unpickler stops at the same place, with its own message


_MEMO_OPS = {"PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET"}


def _unpickle(zf: zipfile.ZipFile, record: str, path: Path):
    data = _read_record(zf, record, path)
    _check_memo(data, path, record)
    try:
        return _SafeUnpickler(data, path, record).load()
    except CheckpointError:
        raise
    except _FormatError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except Exception as e:  # whatever a malformed pickle makes the unpickler raise
        why = _shown(str(e))
        raise CheckpointError(
            f"{path}: {_shown(record)} is not a valid state-dict pickle ({type(e).__name__}: {why})"
        ) from None


def _tensor_refs(state, path: Path) -> dict:
    """Check the pickle gave a flat {name: tensor} dict."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: data.pkl holds a {_kind(state)}, expected a state dict (tensor name -> tensor)")
    for name, value in state.items():
        if not isinstance(name, str):
            raise CheckpointError(f"{path}: state dict key {name!r} is not a string")
        if not isinstance(value, _TensorRef):
            hint = " (a training checkpoint? save its model state dict alone)" if isinstance(value, dict) else ""
            raise CheckpointError(f"{path}: state dict entry {name!r} is a {_kind(value)}, expected a tensor{hint}")
    return state


def _kind(value) -> str:
    if isinstance(value, _TensorRef):
        return "single tensor"
    return "dict" if isinstance(value, dict) else type(value).__name__.lstrip("_")


# ---------------------------------------------------------------------------------------------------------
# Cutting tensors out of storages.


_MAX_EXPANDED = 1 << 20  # elements an expanded (zero-stride) tensor may have beyond its storage's


def _materialize(zf, folder, refs: dict, big_endian: bool, path: Path):
    """Read each storage once and copy out every tensor on it, so peak memory is the tensors plus one storage."""
    distinct = {id(ref): ref for ref in refs.values()}.values()
    sizes = [math.prod(r.shape) * np.dtype(_ELEMENT_DTYPES[r.dtype]).itemsize for r in distinct]
    total = sum(n for n in sizes if n > 0)
    budget = 2 * path.stat().st_size + (1 << 24)  # tied weights saved as two views of one storage: twice the file
    if total > budget:
        raise CheckpointError(f"{path}: its tensors would take {total} bytes, far more than the file holds: refused")
    users = {}  # storage key -> [(name, ref)] in file order
    for name, ref in refs.items():
        users.setdefault(ref.storage.key, []).append((name, ref))
    done = {}  # id(ref) -> array, so names bound to one tensor object share it
    for named in users.values():
        raw = _read_storage(zf, folder, named[0][1].storage, named[0][0], path)
        for name, ref in named:
            if id(ref) not in done:
                done[id(ref)] = _cut_tensor(raw, ref, big_endian, name, path)
        del raw
    arrays = {name: done[id(ref)] for name, ref in refs.items()}  # back in state-dict order
    dtypes = {name: ref.dtype for name, ref in refs.items()}
    return arrays, dtypes


def _read_storage(zf, folder, storage: _StorageRef, first_user: str, path: Path) -> np.ndarray:
    """The storage's bytes (uint8), checked to hold at least what data.pkl declares."""
    record = _shown(f"{folder}data/{storage.key}")
    name = f"{folder}data/{storage.key}"
    if not _has_record(zf, name):
        raise CheckpointError(f"{path}: storage record {record} (for tensor {first_user!r}) is missing from the zip")
    held = zf.getinfo(name).file_size
    if held < storage.nbytes:
        raise CheckpointError(
            f"{path}: storage record {record} holds {held} bytes, expected {storage.nbytes} (truncated or corrupt)"
        )
    data = _read_record(zf, name, path)
    if len(data) < storage.nbytes:
        raise CheckpointError(
            f"{path}: storage record {record} holds {len(data)} bytes, expected {storage.nbytes} (truncated or corrupt)"
        )
    return np.frombuffer(data, dtype=np.uint8, count=storage.nbytes)


def _cut_tensor(raw: np.ndarray, ref: _TensorRef, big_endian: bool, name: str, path: Path) -> np.ndarray:
    """Copy tensor `ref` out of storage bytes `raw` into a fresh C-contiguous native-order array."""
    stored = np.dtype(_ELEMENT_DTYPES[ref.dtype]).newbyteorder(">" if big_endian else "<")
    native = stored.newbyteorder("=")
    if any(n < 0 for n in ref.shape):
        raise CheckpointError(f"{path}: tensor {name!r} has negative size {list(ref.shape)}")
    try:
        if math.prod(ref.shape) == 0:
            out = np.empty(ref.shape, dtype=native)
        else:
            elements = raw[: raw.size - raw.size % stored.itemsize].view(stored)  # storage as elements, 1-D
            _check_bounds(ref, elements.size, name, path)
            if math.prod(ref.shape) > max(elements.size, _MAX_EXPANDED):  # only overlapping (zero-stride) views can
                raise CheckpointError(  # exceed their storage: small expanded buffers are fine, a bomb is not
                    f"{path}: tensor {name!r} of size {list(ref.shape)} has more elements than its storage "
                    f"{ref.storage.key!r} ({elements.size}) through overlapping strides {list(ref.strides)}: refused"
                )
            view = as_strided(
                elements[ref.offset :],
                shape=ref.shape,
                strides=tuple(s * stored.itemsize for s in ref.strides),
                writeable=False,
            )
            out = view.astype(native, order="C")  # copies: contiguous, native byte order, detached from the storage
    except (MemoryError, ValueError, OverflowError) as e:  # absurd sizes or strides (the bounds check passed)
        raise CheckpointError(f"{path}: tensor {name!r} of size {list(ref.shape)} cannot be built ({e})") from None
    if ref.dtype == "bfloat16":
        out = bf16_to_float32(out)
    return out


def _check_bounds(ref: _TensorRef, storage_numel: int, name: str, path: Path) -> None:
    """Every element the view can reach must lie inside the storage (as_strided does not check)."""
    if ref.offset < 0 or any(s < 0 for s in ref.strides):
        raise CheckpointError(f"{path}: tensor {name!r} has negative offset or stride ({ref.offset}, {ref.strides})")
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.strides))
    if last >= storage_numel:
        raise CheckpointError(
            f"{path}: tensor {name!r} (size {list(ref.shape)}, stride {list(ref.strides)}, offset {ref.offset}) "
            f"reaches element {last} but its storage {ref.storage.key!r} holds {storage_numel} {ref.dtype} elements"
        )
