"""GGUF files (llama.cpp's format): the header read here (`GGUFFile`: metadata, tensor places, the data memory-mapped),
the config from its metadata, the tensors kept in their block format (`GGUFStore.read_blocks`, quant.BlockMatrix)
or widened to float32 (`read`; Q5_0, Q5_1, Q2_K, Q3_K and Q5_K through the optional `gguf` package), and the
tokenizer from its `tokenizer.ggml.*` fields. `loading.open_gguf` checks a file's tensors against its config, as for
a Hugging Face folder.

Two things differ from a Hugging Face checkpoint. Names: `blk.3.attn_q.weight` is `layers.3.self_attn.q_proj.weight`.
Layout: for Llama, llama.cpp's converter permutes the rows of the q and k weights (each head's rotary pairs
interleaved rather than split in halves); `_unpermute` puts them back, as transformers' GGUF loader does. Qwen2's
rotary already pairs the halves (llama.cpp's NEOX mode), so its q and k are stored as they are.
"""

import struct
import math
from pathlib import Path

import numpy as np

from ..dtypes import to_float32
from ..errors import CheckpointError
from ..quant import FORMATS, BlockMatrix
from .outputs import present

ARCHITECTURES = ("llama", "qwen2")
# what gguf.quants dequantizes (the K-quants included); anything else in a file is refused before reading
QUANT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

_NAMES = {  # GGUF name (after `blk.N.`) -> transformers' name (after `layers.N.`)
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}  # fmt: skip
_TOP = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head"}


def is_gguf(source) -> bool:
    return str(source).lower().endswith(".gguf")


def _gguf_module(path):
    try:
        import gguf
    except ImportError:
        raise CheckpointError(
            f'{path}: reading .gguf files needs the optional gguf package: pip install -e ".[gguf]"'
        ) from None
    return gguf


# ggml's tensor types: id -> (name, weights per block, bytes per block)
TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 30: ("BF16", 1, 2),
    2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
}  # fmt: skip
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}  # struct = NumPy
_STRING, _ARRAY = 8, 9


class _Type:
    def __init__(self, ident: int):
        self.value = ident
        self.name = TYPES[ident][0] if ident in TYPES else f"type {ident}"


class _Strings:
    """Where an array of n strings sits in the header (GGUFFile.strings reads it)."""

    def __init__(self, start: int, n: int):
        self.start, self.n = start, n


class Tensor:
    """One tensor of a GGUF file: name, type, shape (GGUF's order: fastest dimension first) and its bytes, a view of
    the memory-mapped file: [rows, bytes per row] uint8 for block types, the values for F32/F16, uint16 for BF16."""

    def __init__(self, name, tensor_type: _Type, shape, data):
        self.name, self.tensor_type, self.shape, self.data = name, tensor_type, shape, data


class GGUFFile:
    """A GGUF file's header read with `struct` (its metadata as Python values, its tensors' places) and its tensors
    memory-mapped, nothing copied. Format: magic "GGUF", version, tensor and key counts, the key/value pairs (typed
    scalars, strings, arrays), the tensor infos (name, dimensions, type, offset), then the data, aligned. The gguf
    package's reader does the same in ~4 s for SmolLM2 (it builds a NumPy array for each of the 100,000
    vocabulary strings); this takes ~0.1 s."""

    def __init__(self, path: Path):
        self.path = path
        self.data = np.memmap(path, dtype=np.uint8, mode="r")
        self.buf, self.pos = memoryview(self.data), 0
        if bytes(self._take(4)) != b"GGUF":
            raise ValueError("no GGUF magic number")
        version, n_tensors, n_fields = self._unpack("<IQQ")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version}")
        self._count(n_fields, 12), self._count(n_tensors, 24)
        self.fields = {}
        for _ in range(n_fields):
            key = self._string()
            self.fields[key] = self._value(self._unpack("<I")[0])
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            (n_dims,) = self._unpack("<I")
            if n_dims > 4:
                raise ValueError(f"tensor {name!r} has {n_dims} dimensions")
            shape = self._unpack(f"<{n_dims}Q")
            ident, offset = self._unpack("<IQ")
            infos.append((name, shape, ident, offset))
        align = self.fields.get("general.alignment", 32)
        if not isinstance(align, int) or not 0 < align <= 1 << 20:
            raise ValueError(f"general.alignment {align!r}")
        self.alignment, self.data_offset = align, -(-self.pos // align) * align
        check_layout(
            path,
            [
                (name, TYPES.get(ident, (f"type {ident}",))[0], list(shape), offset)
                for name, shape, ident, offset in infos
            ],
            align,
            self.data_offset,
            len(self.data),
        )
        self.tensors = [self._tensor(self.data_offset, *info) for info in infos]

    def _take(self, n: int):
        if n < 0 or self.pos + n > len(self.buf):
            raise ValueError("truncated")
        piece = self.buf[self.pos : self.pos + n]
        self.pos += n
        return piece

    def _unpack(self, fmt: str) -> tuple:
        return struct.unpack(fmt, self._take(struct.calcsize(fmt)))

    def _count(self, n: int, least: int):
        """A count of items each at least `least` bytes long must fit in what is left of the file."""
        if n * least > len(self.buf) - self.pos:
            raise ValueError(f"a count of {n:,} items does not fit in the file")

    def _string(self) -> str:
        (n,) = self._unpack("<Q")
        return str(self._take(n), "utf-8")

    def _skip_strings(self, n: int) -> "_Strings":
        """n strings (the vocabulary, the merges: 100,000 for SmolLM2) stepped over, their lengths checked against
        the file; decoded only when asked for (`strings`), so the ~7 MB they take as Python objects are not kept."""
        buf, pos, size, unpack = self.buf, self.pos, len(self.buf), struct.unpack_from
        for _ in range(n):
            if pos + 8 > size:
                raise ValueError("truncated")
            (k,) = unpack("<Q", buf, pos)
            if pos + 8 + k > size:
                raise ValueError("truncated")
            pos += 8 + k
        start, self.pos = self.pos, pos
        return _Strings(start, n)

    def strings(self, array: "_Strings") -> list:
        """The strings of an array stepped over by `_skip_strings` (bounds checked there), in one tight loop."""
        buf, pos, unpack, out = self.buf, array.start, struct.unpack_from, []
        for _ in range(array.n):
            (k,) = unpack("<Q", buf, pos)
            out.append(str(buf[pos + 8 : pos + 8 + k], "utf-8"))
            pos += 8 + k
        return out

    def _value(self, kind: int):
        if kind == _STRING:
            return self._string()
        if kind in _SCALARS:
            return self._unpack("<" + _SCALARS[kind])[0]
        if kind == _ARRAY:
            item, n = self._unpack("<IQ")
            if item == _STRING:
                self._count(n, 8)
                return self._skip_strings(n)
            if item not in _SCALARS:
                raise ValueError(f"array of type {item}")
            dtype = np.dtype("<" + _SCALARS[item])
            self._count(n, dtype.itemsize)
            return np.frombuffer(self._take(n * dtype.itemsize), dtype).tolist()
        raise ValueError(f"metadata value of type {kind}")

    def _tensor(self, start, name, shape, ident, offset) -> Tensor:
        tensor_type = _Type(ident)
        if ident not in TYPES:
            return Tensor(name, tensor_type, np.array(shape), None)  # refused by name in GGUFStore
        _, per, size = TYPES[ident]
        n = int(np.prod(shape, dtype=np.uint64)) if shape else 1
        if not shape or shape[0] % per:
            raise ValueError(f"tensor {name!r}: rows of {shape[0] if shape else 0} are not whole blocks of {per}")
        nbytes = n // per * size
        begin = start + offset
        if begin + nbytes > len(self.data):
            raise ValueError(f"tensor {name!r} runs past the end of the file")
        raw = self.data[begin : begin + nbytes]
        rows = n // shape[0]
        if per == 1:
            data = raw.view({"F32": np.float32, "F16": np.float16, "BF16": np.uint16}[TYPES[ident][0]])
            data = data.reshape(tuple(reversed(shape)))
        else:
            data = raw.reshape(rows, shape[0] // per * size)
        return Tensor(name, tensor_type, np.array(shape), data)


def open_reader(path):
    """The file's header read (GGUFFile). A command opens the file twice (the model, then its tokenizer): the last
    reader is kept, for as long as the file keeps its inode, size and mtime."""
    path = Path(path)
    if not present(path, CheckpointError):  # a FIFO (memory-mapping would fail oddly) or a folder: refused by name
        raise CheckpointError(f"{path}: no such .gguf file")
    st = path.stat()
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    if _last_reader[0] != key:
        _last_reader[:] = [None, None]  # the old reader's memory map is released before the next opens
        _last_reader[:] = [key, _open_reader(path)]
    _last_reader[1].path = path  # messages name the path this caller gave
    return _last_reader[1]


_last_reader = [None, None]  # (key, reader) of the last file opened


def _open_reader(path):
    try:
        reader = GGUFFile(path)
    except (ValueError, struct.error, UnicodeDecodeError, OSError, OverflowError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable GGUF file, truncated or corrupt ({reason})") from None
    return reader


def check_layout(path, table, alignment: int, data_offset: int, size: int, sizes=None) -> None:
    """The tensor table checked as llama.cpp's loader (gguf.cpp) checks it, before any tensor is read: at most 4
    dimensions, the fastest a whole number of its type's blocks, each tensor at the offset where the previous one
    ended (rounded up to general.alignment), the last ending inside the file and the file ending there (plus
    padding). A type field changed (F32 relabelled Q8_0) changes the tensor's size and so breaks the tiling; an
    offset of 2**64 - 1 is refused here. `table`: (name, type name, dims fastest first, offset) per tensor in the
    file's order; `sizes`: each type name's (elements per block, bytes per block), by default ggml's (TYPES). A type
    not in it ends the check: GGUFStore refuses it by name."""
    sizes = sizes or {name: (per, nbytes) for name, per, nbytes in TYPES.values()}
    expected, end = 0, 0
    for name, kind, dims, offset in table:
        if kind not in sizes:
            return
        bad = f"{path}: tensor {name!r:.80}"
        block, type_size = sizes[kind]
        if len(dims) > 4 or dims and dims[0] % block:
            raise CheckpointError(
                f"{bad} has dimensions {dims}: expected at most 4, the first a multiple of {kind}'s block of {block}"
            )
        if offset != expected:
            raise CheckpointError(
                f"{bad} ({kind}) starts at data byte {offset}, expected {expected} (where the previous "
                f"tensor ends, aligned to {alignment}): its type, shape or offset does not match the file"
            )
        end = offset + math.prod(dims) // block * type_size
        expected = -(-end // alignment) * alignment
    if not data_offset + end <= size <= data_offset + expected:
        raise CheckpointError(
            f"{path}: the tensors end at byte {data_offset + end} but the file has {size}: "
            + ("truncated" if size < data_offset + end else "bytes after the last tensor")
        )


def field(reader, key, default=None):
    """A metadata value; an array of strings is decoded for this caller and not kept by the reader."""
    value = reader.fields.get(key, default)
    if isinstance(value, _Strings):
        try:
            return reader.strings(value)
        except UnicodeDecodeError as e:
            raise CheckpointError(f"{reader.path}: metadata {key}: a string that is not UTF-8 ({e.reason})") from None
    return value


def config_dict(reader) -> dict:
    """A config.json-style dict from the GGUF metadata, checked afterwards by config_from_dict like any other."""
    path = reader.path
    arch = field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{path}: architecture {arch!r} is not supported (expected one of {list(ARCHITECTURES)})")

    def meta(key, default=None):
        v = field(reader, f"{arch}.{key}", default)
        if v is None:
            raise CheckpointError(f"{path}: metadata field {arch}.{key} is missing")
        return v

    scaling = field(reader, f"{arch}.rope.scaling.type", "none")
    n_head = meta("attention.head_count")
    tokens = reader.fields.get("tokenizer.ggml.tokens")  # counted, not decoded (the tokenizer decodes it)
    n_tokens = tokens.n if isinstance(tokens, _Strings) else None if tokens is None else len(tokens)
    d = {
        "model_type": arch,
        "vocab_size": meta("vocab_size", n_tokens),
        "hidden_size": meta("embedding_length"),
        "intermediate_size": meta("feed_forward_length"),
        "num_hidden_layers": meta("block_count"),
        "num_attention_heads": n_head,
        "num_key_value_heads": meta("attention.head_count_kv", n_head),
        "max_position_embeddings": meta("context_length"),
        "rms_norm_eps": float(meta("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(meta("rope.freq_base", 10000.0)),
        "rope_scaling": None if scaling == "none" else {"rope_type": scaling},
        "bos_token_id": field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": field(reader, "tokenizer.ggml.eos_token_id"),
        "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors),
    }
    rotary_dim = field(reader, f"{arch}.rope.dimension_count")  # transformers' head_dim when key_length is absent
    head_dim = field(reader, f"{arch}.attention.key_length", rotary_dim)
    if head_dim is not None:
        d["head_dim"] = head_dim
    return d


def hf_name(name: str) -> str:
    """`blk.3.attn_q.weight` -> `layers.3.self_attn.q_proj.weight`; unknown names are returned unchanged."""
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _NAMES:
        return f"layers.{parts[1]}.{_NAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _TOP:
        return f"{_TOP[parts[0]]}.{parts[1]}"
    return name


def _unpermute(w, n_head):
    """Undo llama.cpp's q/k row order: per head, rows (0, D/2, 1, D/2+1, ...) back to (0, 1, ..., D-1)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)  # [rows, ...]


class GGUFStore:
    """A GGUF file's tensors behind the TensorStore interface of checkpoint.py, dequantized on read (`read`), or kept
    in their block format (`read_blocks`)."""

    float_types = set(QUANT_TYPES)

    def __init__(self, reader, n_head: int, n_kv_head: int, permuted: bool = True):
        self.reader, self.description = reader, str(reader.path)
        self.tensors = {t.name: t for t in reader.tensors}
        self.heads = {"attn_q": n_head, "attn_k": n_kv_head} if permuted else {}  # rows to un-permute, by head count
        bad = sorted(
            {f"{t.tensor_type.name} ({t.name})" for t in reader.tensors if t.tensor_type.name not in QUANT_TYPES}
        )
        if bad:
            raise CheckpointError(
                f"{self.description}: unsupported tensor type {bad[0]} (expected one of {', '.join(QUANT_TYPES)})"
            )

    def names(self):
        return list(self.tensors)

    def shape(self, name) -> tuple:
        return tuple(int(n) for n in reversed(self.tensors[name].shape))  # GGUF lists dimensions fastest first

    def dtype(self, name) -> str:
        return self.tensors[name].tensor_type.name

    def _permuted(self, name) -> int | None:
        """The head count whose rotary pairs llama.cpp interleaved in this tensor's rows (q, k), else None."""
        part = name.split(".")[2] if name.startswith("blk.") and name.count(".") == 3 else ""
        return self.heads.get(part)

    def read_blocks(self, name, lo=0, hi=None):
        """A tensor (or its rows lo..hi) in a block format kept quantized (quant.FORMATS) as a BlockMatrix, its bytes
        decoded from the memory-mapped file (q and k rows put back in transformers' order first); None for any other
        type."""
        t = self.tensors[name]
        kind = t.tensor_type.name
        if kind not in FORMATS or len(t.shape) != 2:
            return None
        raw, heads = t.data, self._permuted(name)
        if heads is not None:
            raw = _unpermute(raw, heads)  # whole rows move: their blocks stay together
        raw = raw[lo:hi]
        try:
            return BlockMatrix.from_gguf(kind, raw, (len(raw), self.shape(name)[1]))
        except ValueError as e:
            raise CheckpointError(f"{self.description}: tensor {name!r} cannot be read ({e})") from None

    def read(self, name) -> np.ndarray:
        """The tensor as float32 (q and k rows in transformers' order)."""
        w = self.read_rows(name)
        heads = self._permuted(name)
        return w if heads is None else _unpermute(w, heads)

    def read_rows(self, name, rows=None) -> np.ndarray:
        """Rows of a tensor (all of them if None) as float32, in the file's order."""
        t = self.tensors[name]
        kind, shape = t.tensor_type.name, self.shape(name)
        data = np.array(t.data if rows is None else t.data[np.asarray(rows)])  # a copy: the map can let its pages go
        if rows is not None:
            shape = (len(data), *shape[1:])
        try:
            if kind in ("F32", "F16", "BF16"):
                return to_float32(data).reshape(shape)
            if kind in FORMATS:
                flat = data.reshape(-1, data.shape[-1])  # [rows, bytes]
                w = BlockMatrix.from_gguf(kind, flat, (len(flat), shape[-1])).dequantize()
            else:
                gguf = _gguf_module(self.description)
                w = gguf.quants.dequantize(data, gguf.GGMLQuantizationType(t.tensor_type.value))
            return np.asarray(w, np.float32).reshape(shape)
        except (ValueError, IndexError) as e:
            raise CheckpointError(f"{self.description}: tensor {name!r} ({kind}) cannot be read ({e})") from None


class Renamed:
    """The store as loading checks it: under transformers' names, so one check serves both formats."""

    def __init__(self, store):
        self.store, self.description, self.float_types = store, store.description, store.float_types
        self.gguf = {hf_name(n): n for n in store.names()}

    def names(self):
        return list(self.gguf)

    def shape(self, name):
        return self.store.shape(self.gguf[name])

    def dtype(self, name):
        return self.store.dtype(self.gguf[name])


# ---------------------------------------------------------------------------------------------------- tokenizer


def read_tokenizer(path):
    """(backend, bos_id, eos_id, add_bos) from `tokenizer.ggml.*`: byte-level BPE (model "gpt2") from the token list
    and merges; control tokens (type 3) are special; BOS is prepended only if the file says so."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    reader = open_reader(path)
    kind = field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise CheckpointError(
            f"{path}: tokenizer.ggml.model {kind!r} is not supported (expected 'gpt2', byte-level BPE)"
        )
    tokens, merges = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise CheckpointError(f"{path}: tokenizer.ggml.tokens and tokenizer.ggml.merges are required")
    types = field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    bpe = models.BPE(vocab, [tuple(m.split(" ", 1)) for m in merges], fuse_unk=False)
    backend = HFTokenizer(bpe)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if field(reader, "tokenizer.ggml.pre") == "smollm":  # llama.cpp's smollm pre-tokenizer: digits split one by one
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        backend.pre_tokenizer = byte_level
    backend.decoder = decoders.ByteLevel()
    special = [t for t, k in zip(tokens, types) if k == 3]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    bos, eos = field(reader, "tokenizer.ggml.bos_token_id"), field(reader, "tokenizer.ggml.eos_token_id")
    add_bos = bool(field(reader, "tokenizer.ggml.add_bos_token", True)) and bos is not None
    return backend, bos, eos, add_bos
