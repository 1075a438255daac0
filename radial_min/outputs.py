"""Result files written atomically: to a temporary name in the same folder, then renamed into place, so an
interrupted or failed run never leaves a half-written file behind."""
import csv
import io
import json
import os
from pathlib import Path

import numpy as np

from .errors import RadialError


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
    if not isinstance(d, dict):
        raise error(f"{path}: expected {what}, got {type(d).__name__}")
    return d


def write_csv(path, rows: list[dict]) -> Path:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return write_text(path, buf.getvalue())


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
