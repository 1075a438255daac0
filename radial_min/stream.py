"""Layer-major execution with streamed weights: profile models larger than memory, one block at a time.

The in-memory path runs sequence by sequence, every block in turn. Profiling only ever needs one block at a time,
so here the loops are swapped: every sequence is embedded first, then for each block its weights are read from
the checkpoint, the block runs over all sequences' hidden states, and the weights are dropped before the next
block is read. Same blocks, same kernels (`opt.make_block`, `blocks.run_block`): only where the weights come from
and when they go changes, so the ratios are identical to `profiling.profile_text`'s.

Hidden states [n_seq, T, E] stay in memory, or in a memory-mapped scratch file when they would not fit. After each
block the states and ratios so far are checkpointed atomically, so an interrupted run resumes at that block.
"""
import hashlib
import os
from pathlib import Path

import numpy as np

from . import opt
from .blocks import Step, run_block
from .checkpoint import _ST_DTYPES, SafetensorsFile, open_checkpoint, to_float32
from .config import read_config
from .errors import CheckpointError
from .hub import resolve
from .loading import _match
from .profiling import residual_ratio


class NotStreamable(CheckpointError):
    """The checkpoint cannot be read one block at a time (the caller may fall back to loading it whole)."""


class _Slot:
    """A block whose weights are still on disk: its name and kind, for tables and plots."""

    def __init__(self, layer: int, kind: str):
        self.layer, self.kind = layer, kind

    @property
    def name(self) -> str:
        return f"L{self.layer}.{self.kind}"


class _Rows:
    """An embedding matrix left on disk: indexing reads only the rows asked for, widened to float32."""

    def __init__(self, f: SafetensorsFile, name: str):
        code, shape, begin = f.entries[name]
        self.code, self.shape = code, shape
        self.raw = np.memmap(f.path, dtype=_ST_DTYPES[code], mode="r", offset=f.data_start + begin, shape=shape)

    def __getitem__(self, ids):
        return to_float32(np.asarray(self.raw[ids]))  # [T] -> [T, P] (uint16 rows are bfloat16 bits)


class StreamedOPT:
    """An OPT checkpoint opened without reading its blocks: `load_block(b)` reads block b's weights when asked.
    `embed` is OPT's own, on an embedding matrix whose rows are read on demand."""

    def __init__(self, source):
        folder = resolve(source)
        self.config = cfg = read_config(folder)
        if cfg.model_type != "opt":
            raise NotStreamable(f"{folder}: streaming covers OPT checkpoints, this is {cfg.model_type}")
        self.store = open_checkpoint(folder)
        if not all(isinstance(f, SafetensorsFile) for f in self.store.files.values()):
            raise NotStreamable(f"{self.store.description}: a pytorch_model.bin is unpickled whole, it cannot be streamed")
        self.names = _match(self.store, cfg, opt)  # every name and shape checked before anything is read
        self.path, self.n_layer = Path(folder), cfg.num_hidden_layers
        self.blocks = [_Slot(i, kind) for i in range(self.n_layer) for kind in ("att", "ffn")]
        self.n_params = sum(int(np.prod(self.store.shape(t), dtype=np.int64)) for t in self.names.values())
        self.embed_tokens = _Rows(self.store.files[self.store.where[self.names["decoder.embed_tokens.weight"]]],
                                  self.names["decoder.embed_tokens.weight"])  # fmt: skip
        self.embed_positions = self._read("decoder.embed_positions.weight")
        self.project_in = opt.Linear(self._read("decoder.project_in.weight")) if "decoder.project_in.weight" in self.names else None

    def _read(self, ours):
        return self.store.read(self.names[ours])

    def embed(self, input_ids, pos):
        return opt.OPT.embed(self, input_ids, pos)  # [T] -> [T, E]

    def block_bytes(self, b: int) -> int:
        """Block b's weights as float32 in memory."""
        return 4 * sum(int(np.prod(self.store.shape(self.names[n]), dtype=np.int64)) for n in self._block_tensors(b))

    def _block_tensors(self, b):
        slot = self.blocks[b]
        p = f"decoder.layers.{slot.layer}."
        mine = ("self_attn.", "self_attn_layer_norm.") if slot.kind == "att" else ("fc1.", "fc2.", "final_layer_norm.")
        return [n for n in self.names if n.startswith(p) and n[len(p) :].startswith(mine)]

    def load_block(self, b: int):
        """Block b, read from the checkpoint now; it owns its arrays, so dropping it frees them."""
        return opt.make_block(self.config, {n: self._read(n) for n in self._block_tensors(b)}, self.blocks[b].layer, self.blocks[b].kind)


def model_bytes(source) -> int:
    """What the whole model takes in memory as float32, from the headers alone."""
    store = open_checkpoint(resolve(source))
    return 4 * sum(int(np.prod(store.shape(n), dtype=np.int64)) for n in store.names())


def available_bytes() -> int:
    """Memory this process may still use: MemAvailable, capped by an address-space limit if one is set."""
    import resource

    avail = 1 << 62
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    return min(avail, soft) if soft != resource.RLIM_INFINITY else avail


def peak_rss_bytes() -> int:
    """The process's peak resident memory so far (VmHWM), 0 where /proc is not available."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _fingerprint(model, sequences, kind) -> str:
    h = hashlib.sha256(str(model.path.resolve()).encode() + kind.encode())
    h.update(np.ascontiguousarray(sequences, np.int64).tobytes())
    return h.hexdigest()[:16]


def profile_text(model: StreamedOPT, sequences, kind: str = "output", state_dir=None, progress=None,
                 scratch_limit: int | None = None) -> np.ndarray:  # fmt: skip
    """Ratios of every block for every token, block-major: equal to `profiling.profile_text` on the loaded model.
    [n_seq, T] ids -> [n_seq * T, n_blocks]. With `state_dir`, resumes from and checkpoints to it after each block;
    the hidden states go to a memory-mapped file there when they exceed `scratch_limit` bytes (default: a quarter
    of the memory available)."""
    sequences = np.asarray(sequences)
    n_seq, T = sequences.shape
    n = len(model.blocks)
    E = model.config.hidden_size
    state_dir = Path(state_dir) if state_dir is not None else None
    key = _fingerprint(model, sequences, kind)
    start, x, ratios = _resume(state_dir, key, (n_seq, T, E), n)
    if x is None:
        limit = available_bytes() // 4 if scratch_limit is None else scratch_limit
        x = _states(state_dir, (n_seq, T, E), n_seq * T * E * 4 > limit)
        for s, ids in enumerate(sequences):
            x[s] = model.embed(ids, np.arange(T))
        ratios = np.zeros((n_seq * T, n))
    pos = np.arange(T)
    record = _RatioRows(ratios, kind)
    for b in range(start, n):
        block = model.load_block(b)  # read just before it runs ...
        for s in range(n_seq) if progress is None else progress(range(n_seq), b):
            record.rows = slice(s * T, (s + 1) * T)
            x[s] = run_block(b, block, x[s], Step(pos), record)
        del block  # ... and released after
        if state_dir is not None:
            _checkpoint(state_dir, key, b + 1, x, ratios)
    if state_dir is not None:
        _clear(state_dir)
    return ratios


class _RatioRows:
    """An observer writing block i's ratios for the rows of one sequence into the shared table."""

    def __init__(self, ratios, kind):
        self.ratios, self.kind, self.rows = ratios, kind, None

    def __call__(self, i, block, x, f, y):
        self.ratios[self.rows, i] = residual_ratio(x, f, self.kind)


def _states(state_dir, shape, to_disk: bool):
    if not to_disk or state_dir is None:
        return np.zeros(shape, np.float32)
    state_dir.mkdir(parents=True, exist_ok=True)
    return np.lib.format.open_memmap(state_dir / "scratch.npy", mode="w+", dtype=np.float32, shape=shape)


def _checkpoint(state_dir: Path, key: str, next_block: int, x, ratios):
    """Write states, ratios and the block to resume at as one file, renamed into place: all or nothing."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / "state.npz"
    tmp = state_dir / f".state.npz.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            np.savez(f, x=x, ratios=ratios, next_block=next_block, key=key)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _resume(state_dir, key, shape, n_blocks):
    """(next block, states, ratios) from a checkpoint of this very run, else (0, None, None)."""
    path = None if state_dir is None else state_dir / "state.npz"
    if path is None or not path.is_file():
        return 0, None, None
    try:
        with np.load(path) as z:
            if str(z["key"]) != key or z["x"].shape != shape or z["ratios"].shape[1] != n_blocks:
                return 0, None, None  # another run's state: start over (it is replaced at the first block)
            return int(z["next_block"]), z["x"], z["ratios"]
    except (OSError, ValueError, KeyError):
        return 0, None, None


def _clear(state_dir: Path):
    for name in ("state.npz", "scratch.npy"):
        (state_dir / name).unlink(missing_ok=True)
    try:
        state_dir.rmdir()
    except OSError:
        pass
