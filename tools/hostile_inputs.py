"""Hostile inputs: mutants of every file and argument the command line reads, run through the commands that read them.

    python tools/hostile_inputs.py                  # every kind; prints a table, exits 1 on any defect
    python tools/hostile_inputs.py config router    # only these kinds (see --list)
    python tools/hostile_inputs.py --show refused   # also print every refusal's message (or: accepted, all)

A case is one mutated input (a config.json field, a safetensors header, a pickle opcode, a router, a co-trained
network's radial.json, a GGUF tensor table (with the gguf extra), a tokenizer file, an image, a training run's
state, tokens.npz or log, a text file, a command-line value; or a folder, FIFO or link where a file should be) and
one `cli.py` command that reads it, run in this process through `cli.main` on tiny checkpoints built from
tests/fixtures. Every JSON file also gets the bounds of the JSON reader: a 5,000-digit integer (over Python's own
limit), 65-deep lists, a key twice, a lone surrogate. Silent wrong results (a command that exits 0 on input it
should refuse) show as `accepted`: read that list (`--show accepted`).
Each case ends as one of:

    accepted   exit 0: the mutant is still a usable input
    refused    exit 2 with exactly one `error:` line, the last, naming the mutated file (or option)
    VAGUE      exit 2, but the error line does not name the file or option (or there are several)
    TRACEBACK  any other exception escaped: a bug, since bad input must be refused by name
    HANG       still running after --timeout seconds
    MEMORY     tracemalloc's peak was over --memory-factor x the case's input bytes + 64 MiB

Upper-case outcomes are defects: they are listed, and the exit code is 1. The mutants are deterministic (seeded).
Run it under `nice -n 10` on a shared machine; it takes a few minutes.
"""

import argparse
import contextlib
import dataclasses
import io
import json
import os
import pickletools
import random
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback
import tracemalloc
import zipfile
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
FIXTURES = ROOT / "tests" / "fixtures"

import cli  # noqa: E402
from radial_min import data  # noqa: E402
from radial_min.config import LlamaConfig, OPTConfig, ViTConfig  # noqa: E402
from radial_min.radial import write_radial  # noqa: E402
from radial_min.router import Router, RouterConfig, init_router  # noqa: E402

DEFECTS = ("VAGUE", "TRACEBACK", "HANG", "MEMORY")
TEXT = (
    "In the beginning God created the heaven and the earth. And the earth was without form, and void; and "
    "darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters.\n"
) * 30


class Case(NamedTuple):
    kind: str
    label: str
    base: str  # the folder copied for the case: a key of `bases`
    edits: dict  # relative path -> bytes to write, None to delete (a .json: a folder instead), or a Make
    commands: tuple  # argv lists; "{d}" is the case's folder, "{o}" a fresh output folder
    names: tuple  # an error line must contain one of these (the mutated file's name, or the option)


class Make(NamedTuple):
    """Something other than bytes in a file's place: a "folder", a "fifo" (a read would block), or a "link" to
    `target` ("{d}" is the case's folder)."""

    kind: str
    target: str = ""


# ------------------------------------------------------------------------------------------- base inputs


def build_bases(root: Path) -> dict:
    """Tiny, valid inputs of every kind, from the test fixtures."""
    bases = {}
    opt = root / "opt"
    shutil.copytree(FIXTURES / "opt-pre", opt)
    data.train_tokenizer(TEXT.splitlines() * 10, 384, opt)
    (opt / "text.txt").write_text(TEXT)
    cfg = RouterConfig(width=32, n_blocks=6, hidden=8, max_depth=6)
    Router(cfg, init_router(cfg)).save(opt / "router")
    bases["opt"] = opt
    for name, src in (
        ("bin", "opt-hub-bin"),
        ("sharded", "opt-fp16-sharded"),
        ("llama", "llama-gqa-tied"),
        ("qwen2", "qwen2-bias"),
        ("vit", "vit-cls"),
    ):
        shutil.copytree(FIXTURES / src, root / name)
        bases[name] = root / name
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(opt / name, bases["bin"] / name)
    vit = bases["vit"]
    np.save(vit / "img.npy", np.random.default_rng(0).integers(0, 256, (40, 48, 3)).astype(np.uint8))
    try:
        from PIL import Image

        for suffix in ("png", "tif", "ppm"):
            Image.fromarray(np.load(vit / "img.npy")).save(vit / f"img.{suffix}")
    except ImportError:
        pass
    radial = root / "radial"  # a co-trained network: the opt base with radial.json beside its router
    shutil.copytree(opt, radial)
    write_radial(radial, Router.load(opt / "router"), "global", 1.0)
    bases["radial"] = radial
    try:
        import gguf  # noqa: F401 (the optional extra that reads .gguf files)

        (root / "gguf").mkdir()
        shutil.copy(FIXTURES / "gguf" / "llama-gqa-untied.gguf", root / "gguf" / "model.gguf")
        bases["gguf"] = root / "gguf"
    except ImportError:
        pass
    run = root / "run"  # a training run after 2 steps: tokens.npz, tokenizer, state, train_config.json, log.jsonl
    docs = TEXT.split(". ")
    data.prepare_corpus(run, 300, docs=docs, val_docs={"kjv": docs[:20], "wiki": docs[20:]})
    with contextlib.redirect_stderr(io.StringIO()):
        assert cli.main(TRAIN + ["--out", str(run), "--steps", "2"]) == 0
    bases["run"] = run
    bases["none"] = root / "none"
    bases["none"].mkdir()
    return bases


TRAIN = (
    "train --vocab-size 300 --hidden-size 16 --layers 1 --heads 2 --seq-len 8 --batch-size 2 --eval-every 1 "
    "--save-every 1 --warmup 1"
).split()
TEXT_ARGS = "--seq-len 8 --max-sequences 2 --out {o}".split()
INFO = ("info", "--model", "{d}")
GENERATE = ("generate", "In the", "--model", "{d}", "--max-new-tokens", "3")
PROFILE = tuple("profile --model {d} --text {d}/text.txt".split() + TEXT_ARGS)
SIMULATE = tuple("simulate --model {d} --text {d}/text.txt --taus 0,0.3".split() + TEXT_ARGS)
ROUTER_TRAIN = tuple(
    "train-router --model {d} --train-text {d}/text.txt --test-text {d}/text.txt --test-sequences 1 --epochs 1".split()
    + TEXT_ARGS
)
CLASSIFY = ("classify", "{d}/img.npy", "--model", "{d}")
RESUME = tuple(TRAIN + ["--out", "{d}", "--steps", "3"])


# ------------------------------------------------------------------------------------------- mutators

VALUES = [
    None,
    True,
    False,
    0,
    -1,
    1,
    3,
    0.5,
    -2.5,
    2**31,
    2**63,
    10**30,
    1e308,
    float("nan"),
    float("inf"),
    "",
    "x",
    "64",
    "false",
    [],
    [1],
    [[2]],
    {},
    {"a": 1},
    "a" * 5000,
]


def dumps(obj) -> bytes:
    return json.dumps(obj).encode()  # NaN and Infinity as JSON extensions, as Python (and Hub files) write them


def json_mutants(obj, rng, fields=None, values=VALUES):
    """(label, bytes): broken files, then every field deleted or replaced by each value of VALUES."""
    text = dumps(obj)
    yield "not JSON", b"{not json"
    yield "empty file", b""
    yield "truncated", text[: len(text) // 2]
    yield "invalid UTF-8", b'{"\xff\xfe": 1}'
    yield "UTF-16", json.dumps(obj).encode("utf-16")
    yield "a directory", None  # made by the runner: the file is replaced by a folder
    for top in ([], 1, "x", None, [obj]):
        yield f"top level {json.dumps(top)[:20]}", dumps(top)
    yield "1,000-deep list", b"[" * 1000 + b"]" * 1000
    yield "100,000-deep list", b"[" * 100_000 + b"]" * 100_000
    yield "65-deep list", b"[" * 65 + b"]" * 65
    if not isinstance(obj, dict) or not obj:
        return
    first = next(iter(obj)).encode()
    yield "a 5,000-digit integer", text[:-1] + b', "x": ' + b"9" * 5000 + b"}"  # over Python's int(str) limit
    yield "a 41-digit integer", text[:-1] + b', "x": -' + b"9" * 41 + b"}"
    yield "a key twice", text[:-1] + b', "' + first + b'": ' + dumps(obj[next(iter(obj))]) + b"}"
    yield "a lone surrogate", text[:-1] + b', "x": "\\udc80"}'
    yield "a FIFO", Make("fifo")
    keys = list(obj) if fields is None else fields
    for key in keys:
        if key in obj:
            yield f"{key} deleted", dumps({k: v for k, v in obj.items() if k != key})
        for v in values:
            yield f"{key}: {json.dumps(v)[:24]}", dumps({**obj, key: v})
        yield f"{key}: 1,000-deep", text[:-1] + b', "' + key.encode() + b'": ' + b"[" * 1000 + b"]" * 1000 + b"}"


def byte_mutants(raw: bytes, rng, n_flips=30, cuts=(1, 8, 0.5)):
    """(label, bytes): seeded byte flips, truncations and trailing bytes."""
    for i in range(n_flips):
        b = bytearray(raw)
        for _ in range(rng.choice([1, 1, 2, 8])):
            pos = rng.randrange(len(b)) if rng.random() < 0.5 else rng.randrange(min(len(b), 512))
            b[pos] ^= rng.randrange(1, 256)
        yield f"byte flips #{i}", bytes(b)
    for cut in cuts:
        n = int(len(raw) * cut) if isinstance(cut, float) else len(raw) - cut
        yield f"truncated to {n} bytes", raw[:n]
    yield "trailing bytes", raw + b"\0" * 8
    yield "empty file", b""


def safetensors_mutants(raw: bytes, rng):
    """A model.safetensors broken in its header length, JSON, entries, and bytes."""
    (n,) = struct.unpack("<Q", raw[:8])
    header, body = json.loads(raw[8 : 8 + n]), raw[8 + n :]

    def pack(h: bytes):
        return struct.pack("<Q", len(h)) + h + body

    for length in (0, 1, 2, n - 1, n + 1, len(raw) - 8, len(raw), 2**63, 2**64 - 1):
        yield f"header length {length}", struct.pack("<Q", length) + raw[8:]
    for label, h in json_mutants(header, rng, fields=[]):
        if isinstance(h, bytes):
            yield f"header {label}", pack(h)
    yield "header with a duplicate key", pack(dumps(header)[:-1] + b', "' + next(iter(header)).encode() + b'": {}}')
    name = sorted(k for k in header if k != "__metadata__")[0]
    entry = header[name]
    for field, values in (
        ("dtype", ["f32", "F8_E5M2", "BF16", "I64", "U8", "BOOL", ["F32"], 3, None, ""]),
        ("shape", ["2", [2**62, 2**62], [-1], [], [0], [1.5], [None], [True], [2**64]]),
        ("data_offsets", [["0", "8"], [0], [8, 0], [0, 2**70], [-1, 7], [0, 8, 9], "0,8", None]),
    ):
        for v in values:
            yield f"{name} {field}: {json.dumps(v)[:24]}", pack(dumps({**header, name: {**entry, field: v}}))
    yield f"{name} entry deleted", pack(dumps({k: v for k, v in header.items() if k != name}))
    yield f"{name} entry a list", pack(dumps({**header, name: [1, 2]}))
    yield f"{name} extra field", pack(dumps({**header, name: {**entry, "x": 1}}))
    yield (
        "a tensor named with a newline and ANSI codes",
        pack(dumps({**{k: v for k, v in header.items() if k != name}, "x\nerror: all good\x1b[0m": entry})),
    )
    for v in ({"k": 1}, [1], "x", {"format": None}):
        yield f"__metadata__ {json.dumps(v)}", pack(dumps({**header, "__metadata__": v}))
    nan = bytearray(body)
    begin = entry["data_offsets"][0]
    nan[begin : begin + 4] = struct.pack("<f", float("nan"))
    yield f"{name} holds a NaN", pack(dumps(header)) if entry["dtype"] != "F32" else raw[: 8 + n] + bytes(nan)
    yield from byte_mutants(raw, rng)


def pickle_mutants(raw: bytes, rng):
    """A pytorch_model.bin broken in its zip, its data.pkl (every integer and string opcode replaced), its records."""
    zf = zipfile.ZipFile(io.BytesIO(raw))
    records = {i.filename: zf.read(i.filename) for i in zf.infolist()}
    pkl_name = next(k for k in records if k.endswith("/data.pkl"))
    pkl = records[pkl_name]

    def rezip(changes: dict, compress=zipfile.ZIP_STORED):
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w", compress) as z:
            for k, v in {**records, **changes}.items():
                if v is not None:
                    z.writestr(k, v)
        return out.getvalue()

    ops = list(pickletools.genops(pkl))
    ints = [(op, arg, pos) for op, arg, pos in ops if op.name in ("BININT", "BININT1", "BININT2", "LONG1")]
    strs = [(op, arg, pos) for op, arg, pos in ops if op.name in ("BINUNICODE", "SHORT_BINUNICODE", "GLOBAL")]
    for i, (op, arg, pos) in enumerate(rng.sample(ints, min(40, len(ints)))):
        for v in (-1, 0, 2**31 - 1, 2**62):
            enc = b"\x8a" + bytes([8]) + v.to_bytes(8, "little", signed=True)  # LONG1 of 8 bytes
            end = pos + 1 + {"BININT": 4, "BININT1": 1, "BININT2": 2}.get(op.name, 1 + (pkl[pos + 1]))
            yield f"data.pkl int #{i} ({arg}) -> {v}", rezip({pkl_name: pkl[:pos] + enc + pkl[end:]})
    for i, (op, arg, pos) in enumerate(strs[:30]):
        if op.name == "GLOBAL":
            new = b"cos\nsystem\n" if i % 2 else b"ctorch\nComplexFloatStorage\n"
            end = pkl.index(b"\n", pkl.index(b"\n", pos + 1) + 1) + 1
        else:
            s = {0: "99", 1: "", 2: "x\n\x1b[31m"}[i % 3].encode()
            new = b"\x8c" + bytes([len(s)]) + s  # SHORT_BINUNICODE
            end = (
                pos
                + 1
                + (4 + struct.unpack("<I", pkl[pos + 1 : pos + 5])[0] if op.name == "BINUNICODE" else 1 + pkl[pos + 1])
            )
        yield f"data.pkl string #{i} ({str(arg)[:20]!r}) replaced", rezip({pkl_name: pkl[:pos] + new + pkl[end:]})
    yield "memo index 2**28", rezip({pkl_name: b"\x80\x02}r\x00\x00\x00\x10."})
    yield "pickle of a list", rezip({pkl_name: b"\x80\x02]q\x00."})
    for label, new in byte_mutants(pkl, rng, n_flips=20, cuts=(1, 0.5)):
        yield f"data.pkl {label}", rezip({pkl_name: new})
    storage = next(k for k in records if "/data/" in k)
    yield "a storage record truncated", rezip({storage: records[storage][:-4]})
    yield "a storage record missing", rezip({storage: None})
    yield "a storage record as a zip bomb", rezip({storage: bytes(50_000_000)}, zipfile.ZIP_DEFLATED)
    folder = pkl_name[: -len("data.pkl")]
    for order in (b"big", b"middle", b""):
        yield f"byteorder {order!r}", rezip({folder + "byteorder": order})
    yield "two data.pkl records", rezip({"other/data.pkl": pkl})
    yield from byte_mutants(raw, rng, n_flips=20)


def png_mutants(raw: bytes, rng):
    def chunk(kind, body):

        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    rows = zlib.compress(bytes(7000 * (1 + 3 * 7000)), 9)  # 143 KB, under Pillow's bomb limit, 147 MB decoded
    ihdr = struct.pack(">IIBBBBB", 7000, 7000, 8, 2, 0, 0, 0)
    yield (
        "a 7000x7000 PNG of zeros",
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", rows) + chunk(b"IEND", b""),
    )
    for w, h in ((12000, 12000), (20000, 20000), (0, 10), (1, 10**6), (2**31 - 1, 1)):
        ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
        yield (
            f"PNG header {w}x{h}",
            b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", b"x\x9c\x03\x00\x00\x00\x00\x01")
            + chunk(b"IEND", b""),
        )
    yield from byte_mutants(raw, rng, n_flips=20)


def npy_mutants(raw: bytes, rng):
    good = np.load(io.BytesIO(raw))
    with np.errstate(invalid="ignore"):
        yield from _npy_mutants(raw, rng, good)


def _npy_mutants(raw, rng, good):

    def npy(a):
        buf = io.BytesIO()
        np.save(buf, a)
        return buf.getvalue()

    for a, label in (
        (np.full(good.shape, np.nan), "NaN pixels"),
        (good.astype(np.float32) * np.inf, "inf pixels"),
        (good.astype(np.float32) * -1 - 1, "negative pixels"),
        (good.astype(np.float32) * 1e6, "pixels over 255"),
        (good[None], "4-D"),
        (good[:, :, :2], "2 channels"),
        (good[:0], "0 rows"),
        (good.astype(bool), "bool"),
        (good.astype(np.complex64), "complex"),
        (good.astype("<U3"), "strings"),
        (good[:, :, 0], "grey"),
        (np.zeros((1, 1, 3), np.uint8), "1x1"),
        (np.zeros((1, 9000, 3), np.uint8), "1x9000"),
        (np.array(3), "0-D"),
        (good.astype(">u2"), "big-endian uint16"),
    ):
        yield label, npy(a)
    head_end = raw.index(b"\n", 10) + 1
    for shape in ("(100000, 100000, 3)", "(-1, 3, 3)", "(2**70,)"):
        header = f"{{'descr': '|u1', 'fortran_order': False, 'shape': {shape}, }}"
        yield (
            f"header shape {shape}",
            raw[:8] + struct.pack("<H", len(header) + 1) + header.encode() + b"\n" + raw[head_end:],
        )
    yield "object array header", raw[:10] + raw[10:head_end].replace(b"|u1", b"|O ") + raw[head_end:]
    yield from byte_mutants(raw, rng, n_flips=15)


def npz_mutants(raw: bytes, rng):
    z = dict(np.load(io.BytesIO(raw)))

    def npz(**arrays):
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue()

    t = z["train"]
    for label, changes in (
        ("train ids out of the vocabulary", {"train": t + 10_000}),
        ("negative ids", {"train": t - 500}),
        ("float ids", {"train": t.astype(np.float32) + 0.5}),
        ("2-D ids", {"train": t[:20].reshape(4, 5)}),
        ("5 ids", {"train": t[:5]}),
        ("no ids", {"train": t[:0]}),
        ("no train array", {"train": None}),
        ("vocab_size 7", {"vocab_size": np.int64(7)}),
        ("vocab_size a string", {"vocab_size": np.array("x")}),
        ("no validation", {k: None for k in z if k.startswith("val_")}),
        ("2 validation ids", {k: z[k][:2] for k in z if k.startswith("val_")}),
        ("strings", {"train": t.astype("<U4")}),
    ):
        yield label, npz(**{k: v for k, v in {**z, **changes}.items() if v is not None})
    yield "an object array (needs pickle)", npz(**{**z, "train": np.array([1, "x"], dtype=object)})
    yield from byte_mutants(raw, rng, n_flips=15)


def tiff_mutants(raw: bytes, rng):
    """A TIFF whose directory chain loops back to itself (Pillow stops there quietly) or runs off the file."""
    offset = struct.unpack("<I", raw[4:8])[0]
    (n,) = struct.unpack("<H", raw[offset : offset + 2])
    at = offset + 2 + 12 * n  # the next-directory pointer of the first directory
    yield "a directory that points to itself", raw[:at] + struct.pack("<I", offset) + raw[at + 4 :]
    yield "a directory that points past the end", raw[:at] + struct.pack("<I", len(raw) + 100) + raw[at + 4 :]
    yield "the first directory past the end", raw[:4] + struct.pack("<I", 2**32 - 1) + raw[8:]
    yield from byte_mutants(raw, rng, n_flips=15)


def ppm_mutants(raw: bytes, rng):
    """Netpbm files cut short (Pillow raises ValueError for some, OSError for others) or with odd headers."""
    for cut in (3, 8, 12, len(raw) // 2, len(raw) - 1):
        yield f"truncated to {cut} bytes", raw[:cut]
    yield "16-bit, truncated", b"P6\n48 40\n65535\n" + bytes(1000)
    yield "plain P3, truncated", b"P3\n4 4\n255\n1 2 3"
    yield "plain P1, truncated", b"P1\n4 4\n1 0"
    yield "a float PFM, truncated", b"Pf\n4 4\n-1.0\n" + bytes(10)
    yield "size 100000x100000", b"P6\n100000 100000\n255\n" + bytes(100)
    yield from byte_mutants(raw, rng, n_flips=10)


def state_mutants(raw: bytes):
    """A training state whose tensors hold NaN or infinity, or a negative Adam second moment."""
    from radial_min.io.checkpoint import SafetensorsFile, write_safetensors

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s.safetensors"
        path.write_bytes(raw)
        f = SafetensorsFile(path)
        tensors = {n: f.read(n) for n in f.entries}
        param = next(n for n in tensors if not n.startswith("adam."))
        for label, name, value in (
            ("a parameter NaN", param, np.nan),
            ("a parameter inf", param, np.inf),
            ("an Adam m NaN", "adam.m." + param, np.nan),
            ("an Adam v negative", "adam.v." + param, -1.0),
            ("an Adam v inf", "adam.v." + param, np.inf),
        ):
            changed = {**tensors, name: tensors[name].copy()}
            changed[name].flat[0] = value
            write_safetensors(path, changed, f.metadata)
            yield label, path.read_bytes()


def gguf_mutants(raw: bytes, rng):
    """A GGUF file whose tensor table lies: a type relabelled (F32 as Q8_0), an offset misaligned or 2**64 - 1."""
    import gguf

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "m.gguf").write_bytes(raw)
        tensors = [
            (t.name, t.tensor_type.name, t.field.offset, t.field.parts)
            for t in gguf.GGUFReader(Path(tmp) / "m.gguf").tensors
        ]
    for name, kind, at, parts in tensors[:3] + tensors[-1:]:
        at += sum(int(part.nbytes) for part in parts[:4])  # the type field follows the name and the dimensions
        if kind == "F32":
            yield f"{name} F32 relabelled Q8_0", raw[:at] + struct.pack("<I", 8) + raw[at + 4 :]
        offset = struct.unpack("<Q", raw[at + 4 : at + 12])[0]
        for label, value in (("misaligned", offset + 4), ("2**64 - 1", 2**64 - 1), ("0", 0)):
            yield f"{name} offset {label}", raw[: at + 4] + struct.pack("<Q", value) + raw[at + 12 :]
    yield from byte_mutants(raw, rng, n_flips=20)


def text_mutants():
    yield "invalid UTF-8", b"In the \xff\xfe beginning\n" * 50
    yield "empty", b""
    yield "only spaces", b" " * 100
    yield "NUL bytes", b"\0" * 1000
    yield "one 2 MB line", b"word " * 400_000
    yield "one 20 MB word", b"In the " + b"a" * 20_000_000  # byte-level BPE on it: 3.8 GB and growing at 60 s
    yield "UTF-16", TEXT.encode("utf-16")
    yield "fewer tokens than one sequence", b"In"


# ------------------------------------------------------------------------------------------- cases


def cases(bases: dict, rng: random.Random):
    opt, vit, run = bases["opt"], bases["vit"], bases["run"]
    load_cmds = (INFO, GENERATE)

    def file_cases(kind, base, rel, mutants, commands, names=None):
        for label, new in mutants:
            yield Case(kind, f"{rel}: {label}", base, {rel: new}, commands, names or (Path(rel).name,))

    # checkpoints
    read = {f.name for c in (OPTConfig, ViTConfig, LlamaConfig) for f in dataclasses.fields(c)}
    read |= {
        "_remove_final_layer_norm",
        "torch_dtype",
        "rope_parameters",
        "rope_scaling",
        "use_sliding_window",
        "pretraining_tp",
        "label2id",
    }
    for base in ("opt", "vit", "llama", "qwen2"):
        d = json.loads((bases[base] / "config.json").read_text())
        fields = [k for k in d if k in read] + ["rope_parameters", "word_embed_proj_dim", "head_dim"]
        yield from file_cases(
            "config", base, "config.json", json_mutants(d, rng, fields), (INFO,) if base != "opt" else load_cmds
        )
    d = json.loads((opt / "config.json").read_text())
    beyond = [(f"{k}: vocab_size", dumps({**d, k: d["vocab_size"]})) for k in ("bos_token_id", "eos_token_id")]
    beyond.append(("config.json a FIFO", Make("fifo")))
    yield from file_cases("config", "opt", "config.json", beyond, load_cmds)
    yield from file_cases(
        "safetensors",
        "opt",
        "model.safetensors",
        safetensors_mutants((opt / "model.safetensors").read_bytes(), rng),
        (INFO, GENERATE, PROFILE[:-2] + ("--stream", "--out", "{o}")),
    )
    index = json.loads((bases["sharded"] / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    wm = index["weight_map"]
    first = next(iter(wm))
    idx_mutants = list(json_mutants(index, rng, fields=["weight_map"]))
    for v in (
        "/etc/passwd",
        "../opt/model.safetensors",
        "x/../" + shard,
        "",
        ".",
        "missing.safetensors",
        3,
        None,
        "a\nb\x1b[0m",
    ):
        idx_mutants.append((f"weight_map entry -> {v!r}", dumps({**index, "weight_map": {**wm, first: v}})))
    idx_mutants.append(("weight_map names an unknown tensor", dumps({**index, "weight_map": {**wm, "ghost": shard}})))
    idx_mutants.append(("a shard name of 100 KB", dumps({**index, "weight_map": {**wm, first: "x" * 100_000}})))
    yield from file_cases("index", "sharded", "model.safetensors.index.json", idx_mutants, (INFO,))
    shard_mutants = list(byte_mutants((bases["sharded"] / shard).read_bytes(), rng))
    shard_mutants += [("a link to a text file", Make("link", "{d}/config.json")), ("a FIFO", Make("fifo"))]
    yield from file_cases("safetensors", "sharded", shard, shard_mutants, (INFO,))
    yield from file_cases(
        "pickle",
        "bin",
        "pytorch_model.bin",
        pickle_mutants((bases["bin"] / "pytorch_model.bin").read_bytes(), rng),
        (INFO,),
    )
    # routers
    router = json.loads((opt / "router.json").read_text())
    router_json = list(json_mutants(router, rng))
    for width, hidden in ((16384, 16384), (65536, 65536), (32, 65536)):  # a 1 KB file that would need gigabytes
        router_json.append((f"width {width}, hidden {hidden}", dumps({**router, "width": width, "hidden": hidden})))
    yield from file_cases("router", "opt", "router.json", router_json, (GENERATE + ("--router", "{d}/router"),))
    huge = {k: v * 0 + 3e38 for k, v in init_router(RouterConfig(**router)).items()}  # finite, but logits overflow
    with tempfile.TemporaryDirectory() as tmp:
        Router(RouterConfig(**router), huge).save(Path(tmp) / "r")
        weights = (Path(tmp) / "r.safetensors").read_bytes()
    yield from file_cases(
        "router", "opt", "router.safetensors", [("weights of 3e38", weights)], (GENERATE + ("--router", "{d}/router"),)
    )
    yield from file_cases(
        "router",
        "opt",
        "router.safetensors",
        safetensors_mutants((opt / "router.safetensors").read_bytes(), rng),
        (GENERATE + ("--router", "{d}/router"),),
    )
    # tokenizers
    for rel in ("tokenizer_config.json", "special_tokens_map.json"):
        d = json.loads((opt / rel).read_text())
        yield from file_cases(
            "tokenizer",
            "opt",
            rel,
            json_mutants(d, rng, values=VALUES[:16] + [{"content": 5}, {"content": "<zz>"}]),
            (GENERATE,),
        )
        surrogate = dumps(d)[:-1] + b', "unk_token": "\\udc80"}'  # tokenizers raised its own exception on it
        yield from file_cases("tokenizer", "opt", rel, [("unk_token a lone surrogate", surrogate)], (GENERATE,))
    vocab = json.loads((opt / "vocab.json").read_text())
    voc = list(json_mutants(vocab, rng, fields=[]))
    for label, change in (
        ("an id of 10**6", {"Ġthe": 10**6}),
        ("a negative id", {"Ġthe": -3}),
        ("a string id", {"Ġthe": "x"}),
        ("a duplicate id", {"Ġthe": 5}),
        ("no </s>", {"</s>": None}),
    ):
        v = {k: val for k, val in {**vocab, **change}.items() if val is not None}
        voc.append((label, dumps(v)))
    yield from file_cases("tokenizer", "opt", "vocab.json", voc, (GENERATE,))
    merges = (opt / "merges.txt").read_bytes()
    mer = [
        ("invalid UTF-8", merges + b"\xff \xfe\n"),
        ("one token per line", merges + b"abc\n"),
        ("unknown tokens", merges + b"zz qq\n"),
        ("three tokens", merges + b"a b c\n"),
    ]
    yield from file_cases("tokenizer", "opt", "merges.txt", mer + list(text_mutants())[:4], (GENERATE,))
    from tokenizers import Tokenizer as HF

    hf = json.loads(HF.from_file(str(_tokenizer_json(opt))).to_str())
    tj = [
        (
            "a pre-tokenizer regex that does not compile",
            {"pre_tokenizer": {"type": "Split", "pattern": {"Regex": "("}, "behavior": "Isolated", "invert": False}},
        ),
        (
            "a normalizer regex that does not compile",
            {"normalizer": {"type": "Replace", "pattern": {"Regex": "[a-"}, "content": "x"}},
        ),
        ("unknown model type", {"model": {"type": "Nope"}}),
        ("model a list", {"model": [1]}),
        ("added_tokens a string", {"added_tokens": "x"}),
        (
            "truncation.max_length 0",  # silently dropped the prompt: now off, as transformers turns it off
            {"truncation": {"max_length": 0, "stride": 0, "strategy": "LongestFirst", "direction": "Right"}},
        ),
        (
            "a normalizer that makes the library panic",
            {"normalizer": {"type": "Replace", "pattern": {"Regex": ""}, "content": "xx"}},
        ),
    ]
    tj_mutants = [(label, dumps({**hf, **change})) for label, change in tj] + list(
        json_mutants(hf, rng, fields=["model"])
    )
    yield from file_cases("tokenizer", "opt", "tokenizer.json", tj_mutants, (GENERATE,))
    # images and ViT preprocessing
    if (vit / "img.png").is_file():
        yield from file_cases(
            "image",
            "vit",
            "img.png",
            png_mutants((vit / "img.png").read_bytes(), rng),
            (("classify", "{d}/img.png", "--model", "{d}"),),
        )
    yield from file_cases("image", "vit", "img.npy", npy_mutants((vit / "img.npy").read_bytes(), rng), (CLASSIFY,))
    for suffix, mutants in (("tif", tiff_mutants), ("ppm", ppm_mutants)):
        if (vit / f"img.{suffix}").is_file():
            yield from file_cases(
                "image",
                "vit",
                f"img.{suffix}",
                mutants((vit / f"img.{suffix}").read_bytes(), rng),
                (("classify", f"{{d}}/img.{suffix}", "--model", "{d}"),),
            )
    pre = {
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "resample": 2,
        "rescale_factor": 1 / 255,
        "size": {"height": 32, "width": 32},
    }
    pre_mutants = list(json_mutants(pre, rng))
    for v in ({"height": 10**6, "width": 10**6}, {"height": 0, "width": 32}, {"height": "x"}, {"shortest_edge": 32}):
        pre_mutants.append((f"size {json.dumps(v)}", dumps({**pre, "size": v})))
    for v in ([0, 0, 0], [1, 2], [[1]], ["a", "b", "c"]):
        pre_mutants.append((f"image_std {json.dumps(v)}", dumps({**pre, "image_std": v})))
    yield from file_cases("image", "vit", "preprocessor_config.json", pre_mutants, (CLASSIFY,))
    # training runs
    state = (run / "state.safetensors").read_bytes()
    st = list(safetensors_mutants(state, rng))
    st += [
        ("metadata without step", _replace_metadata(state, {"format": "pt"})),
        ("step 'abc'", _replace_metadata(state, {"step": "abc"})),
        ("step '-3'", _replace_metadata(state, {"step": "-3"})),
        ("step 10**30", _replace_metadata(state, {"step": str(10**30)})),
        ("a FIFO", Make("fifo")),  # was taken as no state: the run started again at step 0
        *state_mutants(state),
    ]
    yield from file_cases("state", "run", "state.safetensors", st, (RESUME,))
    tc = json.loads((run / "train_config.json").read_text())
    yield from file_cases(
        "state", "run", "train_config.json", json_mutants(tc, rng, fields=["seq_len", "lr", "seed"]), (RESUME,)
    )
    log = (run / "log.jsonl").read_bytes()
    logs = [
        ("a partial last line", log + b'{"step": 3, "lo'),
        ("garbage lines", b"x\n[1]\n" + log + b"\xff\n"),
        ("a NUL-filled file", b"\0" * 4096),
        ("step a string", log.replace(b'"step": 1', b'"step": "1"')),
        ("a folder", Make("folder")),
        ("a FIFO", Make("fifo")),
        ("a line nested 100,000 deep", log + b"[" * 100_000 + b"]" * 100_000 + b"\n"),
        ("a step of 5,000 digits", log + b'{"step": ' + b"9" * 5000 + b"}\n"),
    ]
    yield from file_cases("state", "run", "log.jsonl", logs, (RESUME,))
    yield from file_cases("tokens", "run", "tokens.npz", npz_mutants((run / "tokens.npz").read_bytes(), rng), (RESUME,))
    # a co-trained network's radial.json
    radial = json.loads((bases["radial"] / "radial.json").read_text())
    yield from file_cases("radial", "radial", "radial.json", json_mutants(radial, rng), load_cmds)
    # GGUF (with the optional gguf package)
    if "gguf" in bases:
        yield from file_cases(
            "gguf",
            "gguf",
            "model.gguf",
            gguf_mutants((bases["gguf"] / "model.gguf").read_bytes(), rng),
            (("info", "--model", "{d}/model.gguf"),),
        )
    # text files
    for label, new in text_mutants():
        yield Case(
            "text", f"text.txt: {label}", "opt", {"text.txt": new}, (PROFILE, SIMULATE, ROUTER_TRAIN), ("text.txt",)
        )
    # command lines
    yield from cli_cases()


def cli_cases():
    def bad(command, option, values, names=None, base="opt"):
        for v in values:
            argv = list(command)
            if option in argv:  # the option replaced, its value with it
                del argv[argv.index(option) : argv.index(option) + 2]
            yield Case(
                "cli", f"{command[0]} {option} {v!r}"[:60], base, {}, (tuple(argv) + (option, v),), names or (option,)
            )

    yield from bad(GENERATE, "--max-new-tokens", ["-1", "10**9", "1e3", "x"])
    yield from bad(GENERATE, "--temperature", ["nan", "inf", "-1", "1e400", "1e309"])
    yield from bad(GENERATE, "--top-k", ["0", "-1", str(10**30)])
    yield from bad(GENERATE, "--top-p", ["nan", "0", "1.5", "inf"])
    yield from bad(GENERATE, "--seed", ["-1", str(2**70), "x"])
    yield from bad(GENERATE, "--repetition-penalty", ["0", "nan", "inf", "-1"])
    yield from bad(GENERATE, "--min-p", ["-0.1", "2", "nan"])
    yield from bad(GENERATE, "--presence-penalty", ["nan", "inf", "x"])
    yield from bad(GENERATE, "--frequency-penalty", ["nan", "-inf"])
    yield from bad(GENERATE, "--threads", ["0", "x"])
    yield from bad(tuple(a for a in GENERATE if a != "In the"), "--prompt-file", ["{d}/no-such-file", "{d}"])
    yield from bad(GENERATE + ("--router", "{d}/router"), "--max-depth", ["0", "-1", str(10**9)])
    yield from bad(
        GENERATE + ("--router", "{d}/router", "--cache-policy", "global"),
        "--step-encoding-scale",
        ["nan", "inf", "1e308", "-1e308", "-1"],
    )
    yield from bad(
        GENERATE,
        "--router",
        ["{d}/nope", "{d}", "{d}/config.json", "/dev/null"],
        names=("--router", "nope.json", "router.json", "config.json", "/dev/null.json"),
    )
    yield from bad(
        GENERATE,
        "--model",
        ["{d}/nope", "{d}/config.json", "/dev/null", "bad name!", "{d}/../none"],
        names=("--model", "/", "bad name!"),
    )
    for prompt, label in (
        ("\udcff\udcfe", "invalid UTF-8"),
        ("", "empty"),
        ("\0", "NUL"),
        ("word " * 5000, "5000 words"),
        ("\u202e\x1b[31m", "control characters"),
    ):
        yield Case("cli", f"generate prompt: {label}", "opt", {}, (("generate", prompt) + GENERATE[2:],), ("prompt",))
    yield from bad(PROFILE, "--seq-len", ["0", "-1", str(10**9), "100"])
    yield from bad(PROFILE, "--max-sequences", ["0", "-5"])
    yield from bad(PROFILE, "--tau", ["nan", "-1", "inf", "x"])
    yield from bad(PROFILE, "--generate", ["1", "-1", str(10**6)])
    yield from bad(PROFILE + ("--generate", "4"), "--prompt-len", ["0", str(10**9)])
    yield from bad(PROFILE, "--trace-tokens", ["0", str(10**9)])
    yield from bad(
        PROFILE, "--text", ["{d}/nope.txt", "{d}", "/dev/null"], names=("--text", "nope.txt", "{d}", "/dev/null")
    )
    yield from bad(PROFILE, "--tokenizer", ["{d}/nope", "{d}/text.txt"], names=("--tokenizer", "nope", "text.txt"))
    yield from bad(SIMULATE, "--taus", ["", ",", "nan", "1,abc", "-1", "inf"])
    yield from bad(SIMULATE, "--kv-rule", ["", "x", "fill,fill", "both", ","])
    yield from bad(SIMULATE, "--seq-len", ["1"])
    outs = ["", "{d}/text.txt", "/dev/null", "{d}/text.txt/sub"]  # not a folder (a read-only mount: the suite)
    for command in (SIMULATE, PROFILE, ROUTER_TRAIN):
        yield from bad(command, "--out", outs)
    yield from bad(RESUME, "--out", ["{d}/log.jsonl", "/dev/null", "{d}/log.jsonl/sub"], base="run")
    # train on the prepared run: settings are checked before any work, so a changed one is refused by name (a
    # sane but different value then by the resume check, naming train_config.json)
    for option, values in (
        ("--hidden-size", [str(10**6), str(2**40)]),
        ("--layers", [str(10**6)]),
        ("--heads", [str(10**6), "3"]),
        ("--ffn-dim", [str(10**9)]),
        ("--seq-len", [str(10**9), "1"]),
        ("--batch-size", [str(10**9)]),
        ("--steps", ["0", "-1"]),
        ("--lr", ["nan", "inf", "-1", "0"]),
        ("--warmup", [str(10**18)]),
        ("--weight-decay", ["nan"]),
        ("--grad-clip", ["-1", "inf"]),
        ("--seed", ["-1", str(2**70)]),
        ("--vocab-size", [str(10**9), "5"]),
        ("--eval-every", ["0"]),
        ("--dtype", ["bfloat16"]),
    ):
        yield from bad(RESUME, option, values, names=(option, "train_config.json", "--hidden-size"), base="run")
    yield from bad(ROUTER_TRAIN, "--hidden", [str(10**9), "0"])
    yield from bad(ROUTER_TRAIN, "--max-depth", [str(10**9), "0"])
    yield from bad(ROUTER_TRAIN, "--lr", ["nan", "-1"])
    yield from bad(ROUTER_TRAIN, "--batch-size", [str(10**12)])
    yield from bad(ROUTER_TRAIN, "--seed", ["-1"])
    yield from bad(ROUTER_TRAIN, "--tau", ["nan", "1e400"])
    yield from bad(CLASSIFY, "--top", ["0", "-1", str(10**9)], base="vit")


def _tokenizer_json(folder: Path) -> Path:
    """A tokenizer.json equivalent to the folder's vocab.json + merges.txt (written once, beside them)."""
    path = folder.parent / "tokenizer.json"
    if not path.is_file():
        from radial_min.io.tokenizer import Tokenizer

        Tokenizer(folder).backend.save(str(path))
    return path


def _replace_metadata(raw: bytes, metadata: dict) -> bytes:
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header["__metadata__"] = metadata
    h = dumps(header)
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + raw[8 + n :]


# ------------------------------------------------------------------------------------------- running


class Hang(BaseException):
    """Raised by the alarm: not an Exception, so no `except Exception` in the code under test can swallow it."""


def run_case(case: Case, bases: dict, work: Path, timeout: float, factor: float):
    d = work / "case"
    shutil.rmtree(d, ignore_errors=True)
    shutil.rmtree(work / "out", ignore_errors=True)
    shutil.copytree(bases[case.base], d, symlinks=True)
    for rel, new in case.edits.items():
        path = d / rel
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
        if new is None and not rel.endswith(".json"):
            continue
        if new is None or isinstance(new, Make) and new.kind == "folder":
            path.mkdir()
        elif isinstance(new, Make) and new.kind == "fifo":
            os.mkfifo(path)
        elif isinstance(new, Make):
            path.symlink_to(new.target.replace("{d}", str(d)))
        else:
            path.write_bytes(new)
    size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file() and not f.is_symlink())
    outcomes = []
    for command in case.commands:
        argv = [str(a).replace("{d}", str(d)).replace("{o}", str(work / "out")) for a in command]
        names = [n.replace("{d}", str(d)) for n in case.names]
        outcomes.append(run_command(argv, names, size, timeout, factor))
        shutil.rmtree(work / "out", ignore_errors=True)
    return outcomes


def run_command(argv, names, size, timeout, factor):
    out, err = io.StringIO(), io.StringIO()
    signal.signal(signal.SIGALRM, _alarm)
    tracemalloc.start()
    signal.setitimer(signal.ITIMER_REAL, timeout)
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(argv)
    except SystemExit as e:
        code = e.code
    except Hang:
        return "HANG", f"{timeout:g} s: {' '.join(argv)[:150]}", 0.0
    except BaseException as e:  # noqa: BLE001 (that is what we are looking for)
        frame = traceback.extract_tb(e.__traceback__)[-1]
        where = f"{Path(frame.filename).name}:{frame.lineno}"
        return "TRACEBACK", f"{type(e).__name__}: {str(e)[:150]} at {where}", 0.0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    dt = time.perf_counter() - t0
    if peak > factor * size + (64 << 20):
        return "MEMORY", f"peak {peak / 2**20:.0f} MiB for {size / 2**20:.1f} MiB of input", dt
    lines = [line for line in err.getvalue().replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    if code == 0:
        return "accepted", (lines or [""])[-1][:150], dt
    if code == 2 and len(errors) == 1 and lines[-1] == errors[0] and any(n in errors[0] for n in names):
        return "refused", errors[0][:300], dt
    return "VAGUE", f"exit {code}: " + (" | ".join(errors) or (lines or [""])[-1])[:300], dt


def _alarm(*_):
    raise Hang()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("kinds", nargs="*", help="only these kinds of input (default: all)")
    ap.add_argument("--list", action="store_true", help="list the cases, run nothing")
    ap.add_argument("--show", choices=["defects", "refused", "accepted", "all"], default="defects")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per command before it counts as a hang")
    ap.add_argument("--memory-factor", type=float, default=20.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            bases = build_bases(work / "bases")
        chosen = [c for c in cases(bases, rng) if not args.kinds or c.kind in args.kinds]
        if args.list:
            for c in chosen:
                print(f"{c.kind:12s} {c.label}")
            return 0
        tally, defects, t0 = {}, [], time.time()
        for i, case in enumerate(chosen):
            for command, (outcome, detail, dt) in zip(
                case.commands, run_case(case, bases, work, args.timeout, args.memory_factor)
            ):
                key = (case.kind, command[0])
                tally.setdefault(key, {}).setdefault(outcome, 0)
                tally[key][outcome] += 1
                line = f"{outcome:9s} {case.kind:11s} {command[0]:12s} {case.label[:60]:60s} {detail}"
                if outcome in DEFECTS:
                    defects.append(line)
                if outcome in DEFECTS or args.show == "all" or args.show == outcome:
                    print(line, flush=True)
            if (i + 1) % 100 == 0:
                print(f"... {i + 1}/{len(chosen)} cases, {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    outcomes = ("accepted", "refused", *DEFECTS)
    print(f"\n{'kind':12s} {'command':13s}" + "".join(f"{o:>10s}" for o in outcomes))
    for (kind, command), counts in sorted(tally.items()):
        print(f"{kind:12s} {command:13s}" + "".join(f"{counts.get(o, 0):10d}" for o in outcomes))
    total = {o: sum(c.get(o, 0) for c in tally.values()) for o in outcomes}
    print(f"{'all':26s}" + "".join(f"{total[o]:10d}" for o in outcomes))
    print(
        f"{len(chosen)} cases, {sum(total.values())} command runs in {time.time() - t0:.0f} s; {len(defects)} defects"
    )
    return 1 if defects else 0


if __name__ == "__main__":
    sys.exit(main())
