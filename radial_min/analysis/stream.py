"""Streamed weights: a checkpoint opened without reading its blocks, each block read when asked.

`StreamedModel` stands where a loaded model stands for profiling, the oracle and the router's labels, but its
`blocks` are placeholders: `load_block(b)` reads block b's tensors from the checkpoint and builds it with the
model's own `make_block` (opt.py, llama.py), so the very same blocks and kernels run. The embedding matrix and the
LM head stay on disk: embedding rows are read when asked, the head in pieces no larger than half a block.
Safetensors (single or sharded), pytorch_model.bin (each tensor cut from its own storage record) and GGUF.

    model = StreamedModel("facebook/opt-13b", state_dir="runs/x/.stream")   # reads headers only
    ratios = profiling.profile_text(model, sequences)                        # these three stream it block-major
    run = oracle.simulate(model, sequences, oracle.threshold(0.2), "drop")   # (layer_major.py)
    ex = distill.oracle_examples(model, sequences, 0.2)
"""

import os
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..models import ARCHITECTURES
from ..io.checkpoint import _ST_DTYPES, SafetensorsFile, open_checkpoint, quote
from ..dtypes import to_float32
from ..errors import CheckpointError
from ..io.gguf_file import GGUFStore, is_gguf, open_reader
from ..io.hub import resolve
from .. import kernels
from ..kernels import linear
from ..io.loading import open_checkpoint_folder, open_gguf, read_stored
from ..errors import RadialError
from ..progress import BlockBar
from . import memory
from .memory import drop_pages

# model type -> (module, layer prefix, the names of each block's tensors start with these after the prefix)
_ROWS = ("embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight")  # [V, P] matrices left on disk
HEAD_ROWS_ALIGN = kernels.BLAS_COLUMNS  # the LM head is read in pieces of whole sgemm column tiles (4 numba tasks)


class NotStreamable(CheckpointError):
    """The checkpoint cannot be read one block at a time (the caller may fall back to loading it whole)."""


class _Slot:
    """A block whose weights are still on disk: its name and kind, for tables and plots."""

    def __init__(self, layer: int, kind: str):
        self.layer, self.kind = layer, kind

    @property
    def name(self) -> str:
        return f"L{self.layer}.{self.kind}"


# ---------------------------------------------------------------------------------------------- matrices on disk


class _FileRows:
    """A [V, P] matrix left in its file: `[ids]` and `rows(lo, hi)` read only those rows, widened to float32.
    Read with pread, not mapped, so rows read once do not stay in the process's resident memory."""

    def __init__(self, path, stored: np.dtype, offset: int, shape: tuple):
        self.path, self.stored, self.offset, self.shape = Path(path), np.dtype(stored), offset, tuple(shape)
        self.row_bytes = self.shape[1] * self.stored.itemsize

    def _widen(self, raw):
        return to_float32(raw.astype(raw.dtype.newbyteorder("="), copy=False))  # uint16 rows are bfloat16 bits

    def rows(self, lo: int, hi: int) -> np.ndarray:
        with open(self.path, "rb") as f:
            data = os.pread(f.fileno(), (hi - lo) * self.row_bytes, self.offset + lo * self.row_bytes)
        return self._widen(np.frombuffer(data, self.stored).reshape(hi - lo, self.shape[1]))  # [hi - lo, P]

    def __getitem__(self, ids) -> np.ndarray:
        ids = np.asarray(ids)
        out = np.empty((len(ids), self.shape[1]), np.float32)
        with open(self.path, "rb") as f:
            for i, row in enumerate(ids.tolist()):
                data = os.pread(f.fileno(), self.row_bytes, self.offset + row * self.row_bytes)
                out[i] = self._widen(np.frombuffer(data, self.stored))
        return out  # [T] -> [T, P]


class _GGUFRows:
    """A [V, P] GGUF tensor (quantized or not): rows dequantized when read. GGUF files are memory-mapped, so the
    pages read are handed back afterwards (`_release_mapped`), as after each block."""

    def __init__(self, store: GGUFStore, name: str):
        self.store, self.name, self.shape = store, name, store.shape(name)

    def rows(self, lo: int, hi: int) -> np.ndarray:
        return self[np.arange(lo, hi)]  # [hi - lo, P]

    def weights(self, lo: int, hi: int):
        """Rows lo..hi as the head multiplies them: kept in their block format (as `load` keeps the whole matrix,
        so the same kernels give the same bits), else float32."""
        w = self.store.read_blocks(self.name, lo, hi)
        _release_mapped(self.store)
        return self.rows(lo, hi) if w is None else w

    def __getitem__(self, ids) -> np.ndarray:
        w = self.store.read_rows(self.name, np.asarray(ids))
        _release_mapped(self.store)
        return w  # [T] -> [T, P]


def _release_mapped(store):
    """Hand the pages of a memory-mapped GGUF file back (they stay in the page cache): after each block or piece."""
    data = getattr(getattr(store, "reader", None), "data", None)
    if data is not None:
        drop_pages(data)


def _row_chunks(n_rows: int, row_bytes: int, budget: int):
    """(lo, hi) pieces of a matrix, each a multiple of HEAD_ROWS_ALIGN rows and at most `budget` bytes as float32
    (at least one aligned piece)."""
    step = max(HEAD_ROWS_ALIGN, budget // max(1, row_bytes) // HEAD_ROWS_ALIGN * HEAD_ROWS_ALIGN)
    return [(lo, min(n_rows, lo + step)) for lo in range(0, n_rows, step)]


# ---------------------------------------------------------------------------------------------- the streamed model


class StreamedModel:
    """An OPT, Llama or Qwen2 checkpoint opened without reading its blocks: `load_block(b)` reads block b's weights
    when asked. `embed`, `final` and the small tensors are the model's own (a model of zero layers), on an embedding
    matrix and an LM head left on disk. Safetensors (single or sharded), pytorch_model.bin and GGUF.

    `state_dir`: where passes checkpoint (None: nothing is kept; {} is the model's name); `progress`: see
    `layer_major.run` (True: a progress.BlockBar over every block);
    `scratch_limit`: hidden states larger than this many bytes go to a memory-mapped file (default: a quarter of
    the memory available)."""

    layer_major = True  # profiling.profile_text, oracle.simulate and distill.oracle_examples run it block-major

    def __init__(self, source, state_dir=None, progress=None, scratch_limit: int | None = None):
        opened = open_gguf(source) if is_gguf(source) else open_checkpoint_folder(source)
        path, self.config, self.store, self.names = opened
        self.path = Path(path)
        cfg = self.config
        arch = ARCHITECTURES[cfg.model_type]
        if arch.block_parts is None:
            raise NotStreamable(f"{self.path}: streaming covers OPT, Llama and Qwen2, this is {cfg.model_type}")
        self.module, prefix, self.parts = arch.module, arch.layer_prefix, arch.block_parts
        self.prefix, self.n_layer = prefix, cfg.num_hidden_layers
        self.blocks = [_Slot(i, kind) for i in range(self.n_layer) for kind in ("att", "ffn")]
        self.block_names = [self._block_tensors(b) for b in range(len(self.blocks))]
        self._check_partition()
        self._check_storages()
        self.n_params = sum(int(np.prod(self.store.shape(t), dtype=np.int64)) for t in self.names.values())
        dtype = "native" if is_gguf(source) else "float32"  # as `load` keeps them by default: the same kernels run
        self._read = lambda ours: read_stored(self.store, ours, self.names[ours], dtype)
        small = {o: self._read(o) for o in self._top() if o not in _ROWS}  # norms, positions, projections
        small.update({o: self._rows(o) for o in self._top() if o in _ROWS})
        self.shell = arch.model(replace(cfg, num_hidden_layers=0), small)  # the model's embed and final, no blocks
        self.state_dir = None if state_dir is None else Path(str(state_dir).format(self.path.name))
        if progress is True:  # a bar over every block of every pass (and the head)
            progress = BlockBar(self.path.name, len(self.blocks) + 1)
        self.progress, self.scratch_limit = progress, scratch_limit

    # ------------------------------------------------------------------------------------- what is read when

    def _top(self):
        return [o for o in self.names if not o.startswith(self.prefix.split("{")[0])]

    def _block_tensors(self, b):
        slot = self.blocks[b]
        p = self.prefix.format(slot.layer)
        return [n for n in self.names if n.startswith(p) and n[len(p) :].startswith(self.parts[slot.kind])]

    def _check_partition(self):
        """Every tensor the model reads belongs to exactly one block or to the embedding/head side."""
        owners = {}
        for b, names in enumerate(self.block_names):
            for n in names:
                owners.setdefault(n, []).append(b)
        top = set(self._top())
        stray = [n for n in self.names if n not in owners and n not in top]
        twice = [n for n, bs in owners.items() if len(bs) > 1]
        if stray or twice:
            raise NotStreamable(
                f"{self.path}: tensors {', '.join(map(quote, (stray + twice)[:3]))} belong to no block "
                "or to two: this layout cannot be streamed"
            )

    def _check_storages(self):
        """A pytorch_model.bin tensor is cut out of its storage record, read whole: when one storage holds tensors
        of several blocks, each block would read them all, so such a checkpoint is not streamed."""
        users = {}
        for group, names in [
            ("embeddings and head", self._top()),
            *((self.blocks[b].name, ns) for b, ns in enumerate(self.block_names)),
        ]:
            for ours in names:
                theirs = self.names[ours]
                f = self._file(theirs)
                if hasattr(f, "storage"):
                    users.setdefault((f.path.name, f.storage(theirs)), set()).add(group)
        shared = [(k, g) for k, g in users.items() if len(g) > 1]
        if shared:
            (file, key), groups = shared[0]
            named = " and ".join(sorted(groups)[:2]) + (" and more" if len(groups) > 2 else "")
            raise NotStreamable(
                f"{self.path / file}: storage {key!r} holds tensors of {named}: it would be read whole for each block"
            )

    def _file(self, theirs):
        files = getattr(self.store, "files", None)
        return files[self.store.where[theirs]] if files is not None else self.store

    def _rows(self, ours):
        """An embedding or LM-head matrix left on disk (its values checked for NaN/Inf piece by piece)."""
        theirs = self.names[ours]
        f = self._file(theirs)
        if isinstance(f, GGUFStore):
            rows = _GGUFRows(f, theirs)
        elif isinstance(f, SafetensorsFile):
            code, shape, begin = f.entries[theirs]
            rows = _FileRows(f.path, _ST_DTYPES[code], f.data_start + begin, shape)
        else:  # a pytorch_model.bin record stored uncompressed
            span = f.span(theirs)
            if span is None:
                raise NotStreamable(
                    f"{f.path}: tensor {quote(theirs)} is not stored as plain rows in an uncompressed "
                    "record, so its rows cannot be read one by one"
                )
            rows = _FileRows(f.path, span[1], span[0], f.shape(theirs))
        for lo, hi in _row_chunks(rows.shape[0], rows.shape[1] * 4, 1 << 26):
            if not np.isfinite(rows.rows(lo, hi)).all():
                raise CheckpointError(f"{self.store.description}: tensor {quote(theirs)} has NaN or infinite values")
        return rows

    def signature(self) -> str:
        """The weight files as they are now (name, size, modification time): a checkpoint of a pass over other
        weights is never resumed."""
        files = getattr(self.store, "files", None)
        paths = [f.path for f in files.values()] if files is not None else [self.path]
        return ";".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in paths)

    def block_bytes(self, b: int) -> int:
        """Block b's weights as float32 in memory."""
        return 4 * sum(int(np.prod(self.store.shape(self.names[n]), dtype=np.int64)) for n in self.block_names[b])

    def largest_block_bytes(self) -> int:
        return max(self.block_bytes(b) for b in range(len(self.blocks)))

    def load_block(self, b: int):
        """Block b, read from the checkpoint now; it owns its arrays, so dropping it frees them."""
        slot = self.blocks[b]
        tensors = {n: self._read(n) for n in self.block_names[b]}
        block = self.module.make_block(self.config, tensors, slot.layer, slot.kind)
        del tensors  # consumed by make_block
        _release_mapped(self.store)
        return block

    # ------------------------------------------------------------------------------------------- embed, head

    def embed(self, input_ids, pos):
        return self.shell.embed(input_ids, pos)  # [T] -> [T, E]

    def head_pieces(self):
        """The LM head's (lo, hi) row ranges, each no larger than half the largest block as float32 (the logits
        they make are bounded the same way, so the head never holds more than a block)."""
        V, P = self.shell.lm_head.weight.shape
        return _row_chunks(V, P * 4, self.largest_block_bytes() // 2)

    def heads(self, xs) -> list:
        """Logits [T, V] for each of several final states [T, E], the head read once in pieces for all of them:
        equal to the in-memory `model.head(x)` (the matmul's columns do not interact)."""
        hs = [self.shell.final(x) for x in xs]  # [T, P] each
        out = [np.empty((len(h), self.shell.lm_head.weight.shape[0]), np.float32) for h in hs]
        for lo, hi in self.head_pieces():
            head = self.shell.lm_head.weight  # on disk: its rows in float32, or in a GGUF's own blocks
            w = getattr(head, "weights", head.rows)(lo, hi)  # [hi - lo, P]
            for h, logits in zip(hs, out):
                logits[:, lo:hi] = linear(h, w)
            del w
        return out

    def head(self, x):
        return self.heads([x])[0]  # [T, E] -> [T, V]


# --------------------------------------------------------------------------------------------------- memory


def streamed_or_none(source, want_stream: bool, state_dir):
    """(a StreamedModel, why) when the model is to be streamed: asked (`want_stream`), or it would not fit in the
    memory available; (None, "") when it is to be loaded whole; (None, why not) when it cannot be streamed but fits.
    `state_dir` ({} for the model's name): where its passes checkpoint, so that a rerun resumes."""
    need, avail = model_bytes(source), memory.available_bytes()
    if not want_stream and need <= avail:
        return None, ""
    if want_stream:
        why = "--stream"
    else:
        why = f"automatic: the model needs {need / 2**30:.1f} GiB as float32, {avail / 2**30:.1f} GiB available"
    try:
        return StreamedModel(source, state_dir, progress=True), why
    except NotStreamable as e:
        if need > avail:
            raise RadialError(f"--model {source}: does not fit in memory and cannot be streamed: {e}") from None
        return None, str(e)


def memory_report(models, extra=""):
    """The peak resident memory of a streamed command beside what bounds it: two blocks' weights and the states
    ([(model, tokens)], the largest of each)."""
    two = max(sum(sorted(m.block_bytes(b) for b in range(len(m.blocks)))[-2:]) for m, _ in models)
    states = max(n_tokens * m.config.hidden_size * 4 for m, n_tokens in models)
    return (
        f"peak memory (VmHWM) {memory.peak_rss_bytes() / 2**20:,.0f} MiB; two largest blocks "
        f"{two / 2**20:,.1f} MiB as float32, hidden states {states / 2**20:,.1f} MiB{extra}"
    )


def model_bytes(source) -> int:
    """What the whole model takes in memory as float32, from the headers alone."""
    if is_gguf(source):
        reader = open_reader(source)
        return 4 * sum(int(np.prod([int(n) for n in t.shape], dtype=np.int64)) for t in reader.tensors)
    store = open_checkpoint(resolve(source))
    return 4 * sum(int(np.prod(store.shape(n), dtype=np.int64)) for n in store.names())
