"""Result files written atomically: to a temporary name in the same folder, then renamed into place, so an
interrupted or failed run never leaves a half-written file behind."""

import csv
import io
import json
import math
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..errors import RadialError, count


def write_bytes(path, data: bytes) -> Path:
    """`data` into `path` through a temporary `.NAME.tmpPID` beside it; a failed write (a full disk, a read-only
    folder) leaves `path` as it was and says which file could not be written."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as e:
        raise RadialError(f"{path}: cannot write ({e.strerror or e})") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text(path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=2, default=_plain) + "\n")


def read_json(path, error=RadialError, what: str = "a JSON object") -> dict:
    """A JSON object from `path`, or one `error` line naming the file: the reading twin of write_json."""
    try:
        d = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    except OSError as e:  # a folder, a file without read permission
        raise error(f"{path}: cannot read ({e.strerror or e})") from None
    if not isinstance(d, dict):
        raise error(f"{path}: expected {what}, got {type(d).__name__}")
    return d


@contextmanager
def write_folder(path, overwrite: bool = False):
    """A folder written whole or not at all: the body fills the temporary folder this yields, which then takes
    `path`'s place (an existing folder is replaced only with `overwrite`); on an error it is removed."""
    path = Path(path)
    if path.exists() and not overwrite and (path.is_file() or any(path.iterdir())):
        raise RadialError(f"{path}: exists and is not empty; pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = (path.with_name(f".{path.name}.{what}{os.getpid()}") for what in ("tmp", "old"))
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            os.replace(path, old)  # two renames: at no point is there a half-written `path`
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def write_csv(path, rows: list[dict]) -> Path:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return write_text(path, buf.getvalue())


def npy_header(f, nbytes: int):
    """The (shape, dtype) a .npy stream declares, read from its header only; ValueError unless it is a plain array
    that fits in the `nbytes` the file (or zip record) holds, so nothing is allocated for a lying header."""
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read(f)
    if dtype.hasobject or any(n < 0 for n in shape) or math.prod(shape) * dtype.itemsize > nbytes:
        raise ValueError(f"the header declares {dtype}{list(shape)}, more than the {count(nbytes, 'byte')} it holds")
    return shape, dtype


def write_npz(path, **arrays) -> Path:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return write_bytes(path, buf.getvalue())


def _plain(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")
