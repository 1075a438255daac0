"""Layer-major execution: every sequence through one block before the next block is read (stream.py's models).

The in-memory path runs sequence by sequence, every block in turn. Profiling, the oracle and the router's labels
only ever need one block at a time, so here the loops are swapped: every sequence is embedded first, then for
each block its weights are read, the block runs over all sequences' hidden states, and the weights are dropped
before the next block is read. This module is the loop and its checkpoints; what a pass does to each block sits
beside its in-memory version (`profiling.ProfilePass`, `oracle.SimulationPass`, `distill.LabelPass`) and runs the
in-memory path's own per-sequence steps (`blocks.run_block`, `oracle.decide_block`), so every number is identical.

Memory: one block's weights at a time, the hidden states [n_seq, T, E] (in two memory-mapped scratch files when
they would not fit) and what the pass records per token. Resumption: with the model's `state_dir`, the states and
everything recorded so far are checkpointed atomically after each block, and each finished pass is kept, so an
interrupted command run again resumes at the block it was in.
"""

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np

from .memory import available_bytes, drop_pages


class Pass:
    """What one layer-major pass does besides carrying the hidden states. `arrays` (name -> array) is everything it
    records, checkpointed with the states after each block; `key` names the pass's settings for its checkpoint."""

    label = "pass"
    head = False  # True: `finish` gets each sequence's logits

    def __init__(self, model, sequences, what):
        self.model, self.sequences = model, np.asarray(sequences)
        self.key = fingerprint(model, self.sequences, what)
        self.arrays = {}

    def embedded(self, s, x):
        """Sequence s's states [T, E], just embedded."""

    def block(self, b, block, s, x, pos):
        """Block b on sequence s's states x [T, E]: returns the new states."""
        raise NotImplementedError

    def finish(self, s, x, logits):
        """Sequence s after the last block: its states [T, E] and, if `head`, its logits [T, V]."""

    def state(self) -> dict:
        """What must be saved besides `arrays` to resume (e.g. stateful decision rules)."""
        return {}

    def restore(self, saved: dict):
        pass


def run(job: Pass):
    """Run `job` block-major: embed every sequence, then for each block read it, run it on every sequence and drop
    it, checkpointing after each block; then the head (if the job wants logits) and `finish`, sequence by sequence.

    A model's `progress(items, i)` wraps the sequences of step i (a block, then the head) and may have
    `begin(label, steps, start, n_seq)`, told which steps the pass has, where it starts (len(steps): a pass an
    earlier run finished, nothing left to run) and over how many sequences."""
    model, seqs = job.model, job.sequences
    n_seq, T = seqs.shape
    n = len(model.blocks)
    steps = [b.name for b in model.blocks] + (["head"] if job.head else [])
    progress = model.progress or (lambda items, i: items)
    begin = getattr(progress, "begin", None)
    store = _States(model.state_dir, job.key, (n_seq, T, model.config.hidden_size), model.scratch_limit)
    if store.done(job):
        if begin is not None:
            begin(job.label, steps, len(steps), n_seq)
        return job
    start = store.resume(job)
    pos = np.arange(T)
    if begin is not None:
        begin(job.label, steps, start or 0, n_seq)
    if start is None:  # a fresh pass
        for s, ids in enumerate(seqs):
            x = model.embed(ids, pos)
            store.x[s] = x
            job.embedded(s, x)
        start = 0
    for b in range(start, n):
        block = model.load_block(b)  # read just before it runs ...
        for s in progress(range(n_seq), b):
            store.out[s] = job.block(b, block, s, np.asarray(store.x[s]), pos)
        del block  # ... and released after
        store.checkpoint(job, b + 1)
    _finish(job, store, progress, n)
    store.finished(job)
    return job


def _finish(job, store, progress, n):
    """The head and `finish`, in groups of sequences whose logits together stay within half a block's size."""
    model, seqs = job.model, job.sequences
    n_seq, T = seqs.shape
    if not job.head:
        for s in range(n_seq):
            job.finish(s, np.array(store.x[s]), None)
        return
    group = max(1, model.largest_block_bytes() // 2 // (T * model.shell.lm_head.weight.shape[0] * 4))
    done = set()
    for s in progress(range(n_seq), n):
        if s in done:
            continue
        members = list(range(s, min(n_seq, s + group)))
        xs = [np.array(store.x[i]) for i in members]
        for i, x, logits in zip(members, xs, model.heads(xs)):
            job.finish(i, x, logits)
            done.add(i)


class _States:
    """The hidden states of a pass and its checkpoints.

    In memory, the states are updated in place and saved with the pass's arrays in one file, replaced atomically
    after each block. Too large for memory, they live in two memory-mapped scratch files: a block reads one and
    writes the other, and the checkpoint (written after, atomically) says which is current, so an interruption in
    the middle of a block leaves the last checkpoint's states intact. A finished pass's arrays are kept as
    `pass-<key>.npz` until the command that made them clears the folder (`clear`)."""

    def __init__(self, state_dir, key, shape, scratch_limit):
        self.dir, self.key, self.shape = state_dir, key, shape
        limit = available_bytes() // 4 if scratch_limit is None else scratch_limit
        self.on_disk = int(np.prod(shape, dtype=np.int64)) * 4 > limit
        self.current, self.x, self.out, self._tmp = 0, None, None, None

    def _scratch(self, i) -> Path:
        if self.dir is None and self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="radial-min-states-")
        folder = self.dir if self.dir is not None else Path(self._tmp.name)
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"states-{i}.npy"

    def _map(self, i, fresh: bool):
        if fresh:
            return np.lib.format.open_memmap(self._scratch(i), mode="w+", dtype=np.float32, shape=self.shape)
        m = np.load(self._scratch(i), mmap_mode="r+")
        if m.shape != self.shape or m.dtype != np.float32:
            raise ValueError("scratch file of another shape")
        return m

    def done(self, job) -> bool:
        """A pass already finished by an earlier run of the same command: its arrays restored."""
        saved = self._saved(f"pass-{self.key}.npz")
        if saved is None:
            return False
        _restore(job, saved)
        return True

    def _saved(self, name):
        path = None if self.dir is None else self.dir / name
        return _load(path, self.key) if path is not None and path.is_file() else None

    def resume(self, job):
        """The block to resume at (states and arrays restored from this pass's checkpoint), or None: a fresh start."""
        saved = self._saved("state.npz")
        if saved is not None:
            try:
                if bool(saved["on_disk"]):  # the mode the checkpoint was made in, whatever memory says now
                    self.on_disk, self.current = True, int(saved["current"])
                    self.x, self.out = self._map(self.current, False), self._map(1 - self.current, False)
                else:
                    self.on_disk, self.x = False, np.array(saved["x"])
                    self.out = self.x
                if self.x.shape == self.shape:
                    _restore(job, saved)
                    return int(saved["next_block"])
            except (OSError, ValueError, KeyError):
                pass  # a checkpoint that cannot be used: start the pass over
        self.current = 0
        if self.on_disk:
            self.x, self.out = self._map(0, True), self._map(1, True)
        else:
            self.x = self.out = np.zeros(self.shape, np.float32)
        return None

    def checkpoint(self, job, next_block: int):
        if self.on_disk:  # the block wrote `out`: it becomes the current states
            self.out.flush()
            self.current, self.x, self.out = 1 - self.current, self.out, self.x
            for m in (self.x, self.out):
                drop_pages(m)
        if self.dir is None:
            return
        extra = {"current": self.current, "on_disk": True} if self.on_disk else {"x": self.x, "on_disk": False}
        _save(self.dir / "state.npz", self.key, next_block=next_block, **extra, **_arrays(job))

    def finished(self, job):
        if self.dir is not None:
            _save(self.dir / f"pass-{self.key}.npz", self.key, **_arrays(job))
            (self.dir / "state.npz").unlink(missing_ok=True)
        if self.on_disk:
            self.x = self.out = None
            for i in (0, 1):
                self._scratch(i).unlink(missing_ok=True)
        if self._tmp is not None:
            self._tmp.cleanup()


def _arrays(job) -> dict:
    return {**{f"a.{k}": v for k, v in job.arrays.items()}, **{f"s.{k}": v for k, v in job.state().items()}}


def _restore(job, saved):
    for k in job.arrays:
        job.arrays[k][...] = saved[f"a.{k}"]
    job.restore({k[2:]: v for k, v in saved.items() if k.startswith("s.")})


def _save(path: Path, key: str, **arrays):
    """Arrays and the key of the pass they belong to, as one file renamed into place: all or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, key=key, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _load(path: Path, key: str):
    """The arrays of a checkpoint of this very pass, else None (another pass's file is replaced later)."""
    try:
        with np.load(path) as z:
            if str(z["key"]) != key:
                return None
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, KeyError, EOFError):
        return None


def clear(state_dir) -> None:
    """Remove a command's checkpoints once it has written its results."""
    state_dir = Path(state_dir)
    if not state_dir.is_dir():
        return
    for p in state_dir.iterdir():
        if p.name in ("state.npz", "states-0.npy", "states-1.npy") or p.name.startswith(("pass-", "labels-", ".")):
            p.unlink()
    try:
        state_dir.rmdir()
    except OSError:
        pass


def fingerprint(model, sequences, what) -> str:
    """A name for one pass: the model's files, the sequences and everything that decides what the pass computes."""
    h = hashlib.sha256(str(model.path.resolve()).encode() + model.signature().encode())
    h.update(np.ascontiguousarray(sequences, np.int64).tobytes())
    _digest(h, what, 0)
    return h.hexdigest()[:16]


def _digest(h, obj, depth):
    """Feed a decision rule (a closure, an object with arrays, a router ...) into a hash, by value."""
    if depth > 40:
        raise ValueError("decision rule too deeply nested to fingerprint")
    if isinstance(obj, np.ndarray):
        h.update(f"array{obj.dtype}{obj.shape}".encode())
        h.update(np.ascontiguousarray(obj).tobytes())
    elif isinstance(obj, (str, int, float, bool, type(None), np.generic)):
        h.update(repr(obj).encode())
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for o in obj:
            _digest(h, o, depth + 1)
        h.update(b"]")
    elif isinstance(obj, (set, frozenset)):
        _digest(h, sorted(obj, key=repr), depth + 1)
    elif isinstance(obj, dict):
        _digest(h, sorted(obj.items(), key=lambda kv: repr(kv[0])), depth + 1)
    elif callable(obj) and hasattr(obj, "__code__"):  # a function: its name and the values it closes over
        h.update(obj.__qualname__.encode())
        _digest(h, [c.cell_contents for c in obj.__closure__ or ()], depth + 1)
    elif hasattr(obj, "__dict__"):
        h.update(type(obj).__qualname__.encode())
        _digest(h, vars(obj), depth + 1)
    else:
        h.update(repr(obj).encode())


def describe(decide) -> str:
    """A short label for a decision rule, for progress bars: its own `label` if it has one ('oracle tau=0.2, drop'),
    else from its code: `threshold(0.2)`, `static([3, 5])`, `RouterDecisions`."""
    if getattr(decide, "label", None):
        return decide.label
    name = getattr(decide, "__qualname__", type(decide).__name__).split(".")[0]
    cells = [c.cell_contents for c in getattr(decide, "__closure__", None) or ()]
    shown = [
        repr(sorted(c)) if isinstance(c, (set, frozenset)) else repr(c) for c in cells if not isinstance(c, np.ndarray)
    ]
    return f"{name}({', '.join(shown)})" if cells else name
