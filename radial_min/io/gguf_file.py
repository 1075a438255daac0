"""GGUF files (llama.cpp's format) through the optional `gguf` package: the config from the file's metadata, every
tensor dequantized to float32 when read, and the tokenizer from its `tokenizer.ggml.*` fields. `loading.open_gguf`
checks a file's tensors against its config, as for a Hugging Face folder.

Two things differ from a Hugging Face checkpoint. Names: `blk.3.attn_q.weight` is `layers.3.self_attn.q_proj.weight`.
Layout: for Llama, llama.cpp's converter permutes the rows of the q and k weights (each head's rotary pairs
interleaved rather than split in halves); `_unpermute` puts them back, as transformers' GGUF loader does. Qwen2's
rotary already pairs the halves (llama.cpp's NEOX mode), so its q and k are stored as they are.
"""

import math
from pathlib import Path

import numpy as np

from ..errors import CheckpointError
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


def open_reader(path):
    path = Path(path)
    if not present(path, CheckpointError):  # a FIFO (memory-mapping would fail oddly) or a folder: refused by name
        raise CheckpointError(f"{path}: no such .gguf file")
    gguf = _gguf_module(path)
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as e:  # truncated or not GGUF: the reader raises ValueError, struct or memmap errors
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable GGUF file, truncated or corrupt ({reason})") from None
    reader.path = path
    check_layout(reader, path.stat().st_size)
    return reader


def check_layout(reader, size: int, sizes=None) -> None:
    """The tensor table checked as llama.cpp's loader (gguf.cpp) checks it, before any tensor is read: at most 4
    dimensions, the fastest a whole number of its type's blocks, each tensor at the offset where the previous one
    ended (rounded up to general.alignment), the last ending inside the file and the file ending there (plus
    padding). A type field changed (F32 relabelled Q8_0) changes the tensor's size and so breaks the tiling; an
    offset of 2**64 - 1, which the gguf package adds to the data start and wraps around, is refused here.
    Header-level only: which types can be dequantized is GGUFStore's business. `sizes`: each type's (elements per
    block, bytes per block), by default the gguf package's table."""
    if sizes is None:
        from gguf import GGML_QUANT_SIZES as sizes

    align, expected, end = reader.alignment, 0, 0
    for t in reader.tensors:
        _, _, _, dims, _, offset = t.field.parts
        dims, offset = [int(d) for d in dims], int(offset[0])
        bad = f"{reader.path}: tensor {t.name!r:.80}"
        block, type_size = sizes[t.tensor_type]
        if len(dims) > 4 or dims and dims[0] % block:
            raise CheckpointError(
                f"{bad} has dimensions {dims}: expected at most 4, the first a multiple of "
                f"{t.tensor_type.name}'s block of {block}"
            )
        if offset != expected:
            raise CheckpointError(
                f"{bad} ({t.tensor_type.name}) starts at data byte {offset}, expected {expected} (where the previous "
                f"tensor ends, aligned to {align}): its type, shape or offset does not match the file"
            )
        end = offset + math.prod(dims) // block * type_size
        expected = -(-end // align) * align
    if not reader.data_offset + end <= size <= reader.data_offset + expected:
        raise CheckpointError(
            f"{reader.path}: the tensors end at byte {reader.data_offset + end} but the file has {size}: "
            + ("truncated" if size < reader.data_offset + end else "bytes after the last tensor")
        )


def field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    try:
        return f.contents()
    except Exception:
        raise CheckpointError(f"{reader.path}: metadata field {key!r} is malformed") from None


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
    tokens = field(reader, "tokenizer.ggml.tokens")
    d = {
        "model_type": arch,
        "vocab_size": meta("vocab_size", len(tokens) if tokens is not None else None),
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
    """A GGUF file's tensors behind the TensorStore interface of checkpoint.py, dequantized on read."""

    float_types = set(QUANT_TYPES)

    def __init__(self, reader, n_head: int, n_kv_head: int, permuted: bool = True):
        self.reader, self.description = reader, str(reader.path)
        self.tensors = {t.name: t for t in reader.tensors}
        self.heads = {"attn_q": n_head, "attn_k": n_kv_head} if permuted else {}  # rows to un-permute, by head count
        from gguf import quants

        self.quants = quants
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

    def read(self, name) -> np.ndarray:
        t = self.tensors[name]
        try:
            w = np.asarray(self.quants.dequantize(t.data, t.tensor_type), np.float32).reshape(self.shape(name))
        except (ValueError, IndexError) as e:
            raise CheckpointError(
                f"{self.description}: tensor {name!r} ({t.tensor_type.name}) cannot be read ({e})"
            ) from None
        kind = name.split(".")[2] if name.startswith("blk.") else ""
        return _unpermute(w, self.heads[kind]) if kind in self.heads else w


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
