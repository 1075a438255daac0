"""Files in and out. Results are written atomically: to a temporary name in the same folder, then renamed into
place, so an interrupted or failed run never leaves a half-written file behind. Every JSON file the project reads
(configs, indexes, safetensors headers, tokenizer settings, routers, training logs) goes through `parse_json`,
which bounds what a hostile file can make Python do (integer size, nesting, file size) and names the file in its
one-line error; output folders are checked by `check_out` before a command does any work."""

import csv
import io
import json
import math
import os
import re
import shutil
import stat
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


# ------------------------------------------------------------------------------------------------ reading JSON

MAX_JSON_BYTES = 64 << 20  # a config, index or settings file: real ones are kilobytes (tokenizer.json is not read here)
MAX_DEPTH = 64  # objects and lists inside each other; real files nest a handful deep
MAX_INT_DIGITS = 40  # 2**64 has 20 digits; Python refuses int strings over 4,300 digits with an uncaught ValueError
_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")  # a \uD800..\uDFFF escape: only valid as half of a pair


class _Refused(Exception):
    """Raised inside the decoder's hooks: (verb, what), made one `error` line by parse_json."""


def _bounded_int(text: str) -> int:
    digits = len(text) - text.startswith("-")
    if digits > MAX_INT_DIGITS:
        raise _Refused("has", f"an integer of {digits:,} digits (at most {MAX_INT_DIGITS})")
    return int(text)


def _unique_keys(pairs):
    d = dict(pairs)
    if len(d) != len(pairs):
        seen = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _Refused("names", f"{dup!r:.60} twice")
    return d


def parse_json(text, source, error=RadialError, part: str = ""):
    """The JSON value in `text` (bytes: UTF-8) from `source`, or one `error` line naming `source` (and `part`, e.g.
    "header") and saying why.

    Stricter than json.loads, as the Rust parser of the safetensors and tokenizers packages (serde_json) is: no
    integer over MAX_INT_DIGITS digits, no nesting deeper than MAX_DEPTH, no key twice in one object (serde refuses a
    duplicate field; Python would keep the last silently), no lone UTF-16 surrogate in a string (it cannot be
    encoded as UTF-8, so no library downstream can take it). NaN and Infinity are read, as Python writes them."""

    def refuse(verb, what):  # "header is nested ...", but "config.json: nested ..."
        if part:
            return error(f"{source}: {part} {verb} {what}")
        return error(f"{source}: {what}" if verb == "is" else f"{source}: {verb} {what}")

    if isinstance(text, (bytes, bytearray, memoryview)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as e:
            raise refuse("is", f"not UTF-8 (byte {e.object[e.start]:#04x} at {e.start})") from None
    try:
        value = json.loads(text, parse_int=_bounded_int, object_pairs_hook=_unique_keys)
    except _Refused as e:
        raise refuse(*e.args) from None
    except RecursionError:
        raise refuse("is", f"nested more than {MAX_DEPTH} levels deep") from None
    except json.JSONDecodeError as e:
        raise refuse("is", f"not valid JSON ({e})") from None
    surrogates = _SURROGATE.search(text) is not None
    if surrogates or text.count("[") + text.count("{") > MAX_DEPTH:
        problem = _check_tree(value, surrogates)
        if problem:
            raise refuse(*problem)
    return value


def _check_tree(value, surrogates: bool):
    """(verb, what) if a parsed value nests deeper than MAX_DEPTH or, with `surrogates`, holds a string that cannot be
    encoded as UTF-8; else None. Without recursion."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return "has", f"a lone UTF-16 surrogate in a string: {v!r:.60}"
        elif isinstance(v, (dict, list)):
            if depth > MAX_DEPTH:
                return "is", f"nested more than {MAX_DEPTH} levels deep"
            items = [*v.keys(), *v.values()] if isinstance(v, dict) else v
            stack.extend(
                (x, depth + 1) for x in items if isinstance(x, (dict, list)) or surrogates and isinstance(x, str)
            )
    return None


_KINDS = {
    stat.S_IFREG: "a file",
    stat.S_IFDIR: "a folder",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


def _kind(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def present(path, error=RadialError) -> bool:
    """Whether `path` is there to be read: False if nothing is (so a default applies), True for a regular file (or a
    link to one); anything else there (a folder, a FIFO that would block the read, a device, a dangling link, a
    name too long) is refused by name rather than silently taken as absent."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if os.path.lexists(path):
            raise error(f"{path}: a symbolic link to nothing") from None
        return False
    except (OSError, ValueError) as e:  # a name too long, a NUL byte in it
        raise error(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    if not stat.S_ISREG(mode):
        raise error(f"{path}: is {_kind(mode)}, expected a file")
    return True


def read_bytes(path, error=RadialError, max_bytes: int = MAX_JSON_BYTES) -> bytes:
    """A regular file's bytes, at most `max_bytes` of them, or one `error` line naming the file."""
    path = Path(path)
    if not present(path, error):
        raise error(f"{path}: not found")
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            raw = f.read(min(size, max_bytes) + 1)  # read(n) allocates n bytes first: never more than the file
    except OSError as e:  # no read permission
        raise error(f"{path}: cannot read ({e.strerror or e})") from None
    if len(raw) > max_bytes:
        raise error(f"{path}: over the {count(max_bytes, 'byte')} a file of this kind may hold")
    return raw


def read_json(path, error=RadialError, what: str = "a JSON object", max_bytes: int = MAX_JSON_BYTES) -> dict:
    """A JSON object from `path`, or one `error` line naming the file: the reading twin of write_json."""
    d = parse_json(read_bytes(path, error, max_bytes), path, error)
    if not isinstance(d, dict):
        raise error(f"{path}: expected {what}, got {type(d).__name__}")
    return d


def read_json_lines(path, error=RadialError, max_bytes: int = 1 << 30) -> list:
    """A JSON-lines file (a training log) as (line, value) pairs, the line with its ending; value is None where the
    line does not hold one JSON value within parse_json's bounds (a partial last line after a kill, garbage)."""
    out = []
    for line in read_bytes(path, error, max_bytes).decode("utf-8", errors="replace").splitlines(keepends=True):
        try:
            out.append((line, parse_json(line, path, ValueError)))
        except ValueError:
            out.append((line, None))
    return out


# ------------------------------------------------------------------------------------------------ output folders


def check_out(path, option: str = "--out", files=()) -> Path:
    """An output folder a command may write into, checked before any work: a non-empty name, a folder or nothing
    yet (then its nearest existing parent a folder), writable, and each of `files` in it that exists a regular file
    (a folder or FIFO named log.jsonl would otherwise fail, or hang, after the work). One error naming `option`."""
    text = os.fspath(path)
    if not text.strip():
        raise RadialError(f"{option} {text!r}: expected a folder name")
    path = Path(text)
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):  # not made yet, or a parent is a file (found below)
        mode = None
    except (OSError, ValueError) as e:  # a name too long, a NUL byte in it
        raise RadialError(f"{option} {path}: cannot use it ({getattr(e, 'strerror', None) or e})") from None
    if mode is not None and not stat.S_ISDIR(mode):
        raise RadialError(f"{option} {path}: is {_kind(mode)}, expected a folder")
    base = path if mode is not None else path.parent
    while True:  # the nearest part of the path that exists: where the folder will be made
        try:
            base_mode = os.stat(base).st_mode
            break
        except (FileNotFoundError, NotADirectoryError):
            base = base.parent
        except OSError as e:
            raise RadialError(f"{option} {path}: cannot use {base} ({e.strerror or e})") from None
    if not stat.S_ISDIR(base_mode):
        raise RadialError(f"{option} {path}: {base} is {_kind(base_mode)}, not a folder to write in")
    if not os.access(base, os.W_OK | os.X_OK):
        read_only = hasattr(os, "statvfs") and os.statvfs(base).f_flag & os.ST_RDONLY
        why = "on a read-only file system" if read_only else "not writable"
        raise RadialError(f"{option} {path}: cannot write there ({base} is {why})")
    if mode is not None:
        for name in files:
            present(path / name)
    return path


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
    try:  # numpy parses the header's dictionary with Python's tokenizer: a damaged one raises any of its errors
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
    except (ValueError, EOFError, OSError):
        raise
    except Exception as e:
        raise ValueError(f"its header does not parse ({type(e).__name__}: {str(e)[:80]})") from None
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
