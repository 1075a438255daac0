"""A language task whose tokens need different depths, and we know which: pointer chasing ("p-hop").

Why this task. Routing per token can only pay where tokens differ in how much computation they need, and on
natural text at our scale they do not measurably (docs/cotraining.md: sequential models of 6 to 12 blocks tie).
Following a pointer k times is the textbook case where they do: each sequence holds a random table f over a few
node symbols, then queries "follow f from x, k times". One attention block can fetch one table entry, so a model
that reads each hop in turn needs about k attention blocks for a k-hop answer; tables can also be composed in
parallel (pointer doubling: f, f∘f, f^4, ...), which still needs about log2(k) + 1 of them. Either way, depth
grows with k (Sanford, Hsu & Telgarsky 2024, "Transformers, parallel computation, and logarithmic depth";
Saunshi et al. 2025, "Reasoning with latent thoughts", p-hop induction). Copies and fixed layout tokens need
none, and the table's own entries are random draws that no depth predicts.

One sequence (seq_len + 1 tokens; the model predicts tokens 1..seq_len from those before them):

    <s>  TABLE  |  +k0 x0 a0  +k1 x1 a1  ...      (cut at seq_len + 1 tokens, possibly inside a query)

- TABLE, `table="array"`: f(0) f(1) ... f(n-1), entry i at position 1 + i (the key of a lookup is a position);
  `table="pairs"`: the n pairs "x f(x)" in a random order (the key is the symbol before: induction, as Sanford et
  al.'s k-hop). f is one random cycle through all n nodes, so f^k(x) != x for 0 < k < n and every answer is
  uniformly distributed: no prior over answers helps.
- A query is three tokens: the hop token `+k` (k drawn from `hop_weights` over 0..max_hops), the start node x_q
  and the answer a_q = f^k(x_q). `starts="ordered"`: x_q = q, fixed by the layout; `"random"`: drawn without
  repeats, so the first hop too must be looked up by content. Either way the starts of a sequence are distinct,
  so no answer repeats an earlier query's.

Labels, one per token (`labels[t]` says how hard token t is to predict from tokens < t, that is how hard the
model's output at position t - 1 is):

- `k >= 1`: a k-hop answer;
- `0`: needs no lookup: the separator `|`, ordered start nodes (fixed by the layout) and 0-hop answers (a copy
  of the token just before);
- `NOISE` (-1): the table's entries, the hop tokens, random start nodes, and `<s>` (never predicted): random
  draws, at best partly guessable by elimination, left out of accuracies.

Vocabulary (`vocab_size` = nodes + max_hops + 3 <= 64): ids 0..n-1 the nodes (shown as a..z, A..Z), then the hop
tokens +0..+max_hops, then `<s>` and `|`.

Streams: sequence i of (seed, stream) is drawn from `np.random.default_rng([stream salt, seed, i])`, so batch k
of a run is a pure function of (seed, k) and a resumed run sees the batches an uninterrupted one would; the
"eval" stream never meets a "train" one.

Files: `save` writes tokens and labels as one safetensors file (int32 tensors `tokens` and `labels`, [N,
seq_len + 1]) whose metadata holds the task (JSON), the vocabulary's names and the label meanings; `read` checks
it and gives them back; `show` prints a sequence with each token's label under it.
"""

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np

from .errors import RadialError, SettingError

NOISE = -1  # label of a token no model can be expected to predict (and of <s>, never predicted)
FORMAT = "radial_min.hop_task"
_SALT = {"train": 0x7A51, "eval": 0x3E7A}  # the streams' first seed word: a train sequence is never an eval one
_NODE_NAMES = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
LABEL_MEANINGS = {
    str(NOISE): "not scored: a random draw (table entry, hop token, random start node) or <s>",
    "0": "no lookup needed: the separator, an ordered start node (fixed by the layout), a 0-hop answer (a copy)",
    "k>=1": "a k-hop answer: f applied k times to the query's start node",
}


@dataclass(frozen=True)
class HopTask:
    nodes: int = 32  # node symbols; one random cycle f through all of them per sequence
    max_hops: int = 8  # hop counts 0..max_hops
    seq_len: int = 128  # predicted tokens per sequence (a sequence holds seq_len + 1 with <s>)
    table: str = "array"  # "array": f(i) at position 1 + i; "pairs": "x f(x)" pairs in random order
    hop_weights: tuple = ()  # relative frequency of hop counts 0..max_hops; empty: all equally often
    starts: str = "ordered"  # query q starts at node q ("ordered") or at a node drawn without repeats ("random")

    def __post_init__(self):
        object.__setattr__(self, "hop_weights", tuple(float(w) for w in self.hop_weights))
        if not (isinstance(self.nodes, int) and 2 <= self.nodes <= len(_NODE_NAMES)):
            raise SettingError(f"HopTask.nodes is {self.nodes!r}, expected an integer in 2..{len(_NODE_NAMES)}")
        if not (isinstance(self.max_hops, int) and 0 <= self.max_hops < self.nodes):
            raise SettingError(f"HopTask.max_hops is {self.max_hops!r}, expected an integer in 0..nodes - 1")
        if self.vocab_size > 64:
            raise SettingError(f"HopTask: nodes + max_hops + 3 = {self.vocab_size} tokens, expected at most 64")
        if self.starts not in ("ordered", "random"):
            raise SettingError(f"HopTask.starts is {self.starts!r}, expected 'ordered' or 'random'")
        if self.table not in ("array", "pairs"):
            raise SettingError(f"HopTask.table is {self.table!r}, expected 'array' or 'pairs'")
        if not (isinstance(self.seq_len, int) and self.query_start + 3 <= self.seq_len + 1):
            raise SettingError(f"HopTask.seq_len is {self.seq_len!r}, expected room for the table and a query")
        if self.queries > self.nodes:
            raise SettingError(
                f"HopTask.seq_len {self.seq_len} holds {self.queries} queries but there are {self.nodes} nodes to"
                " start from; expected a shorter sequence or more nodes"
            )
        w = self.hop_weights
        if w and (len(w) != self.max_hops + 1 or not all(math.isfinite(x) and x >= 0 for x in w) or sum(w) <= 0):
            raise SettingError(
                f"HopTask.hop_weights is {w!r}, expected max_hops + 1 = {self.max_hops + 1} weights >= 0"
            )

    # the vocabulary and the layout
    @property
    def vocab_size(self) -> int:
        return self.nodes + self.max_hops + 3

    def hop_token(self, k: int) -> int:
        return self.nodes + k

    @property
    def bos(self) -> int:
        return self.nodes + self.max_hops + 1

    @property
    def sep(self) -> int:
        return self.nodes + self.max_hops + 2

    @property
    def table_len(self) -> int:
        return self.nodes if self.table == "array" else 2 * self.nodes

    @property
    def query_start(self) -> int:
        """Position of the first query's hop token."""
        return 1 + self.table_len + 1

    @property
    def queries(self) -> int:
        """Queries begun in a sequence (the last one may be cut off)."""
        return -(-(self.seq_len + 1 - self.query_start) // 3)

    def names(self) -> list[str]:
        """Every token id's display name."""
        return [*_NODE_NAMES[: self.nodes], *(f"+{k}" for k in range(self.max_hops + 1)), "<s>", "|"]

    def probabilities(self) -> np.ndarray:
        w = np.array(self.hop_weights or [1.0] * (self.max_hops + 1))
        return w / w.sum()


# ------------------------------------------------------------------------------------------------ sequences


def sample(task: HopTask, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One sequence and its labels, both [seq_len + 1] int32, from `rng`."""
    n = task.nodes
    cycle = rng.permutation(n)
    f = np.empty(n, np.int64)
    f[cycle] = np.roll(cycle, -1)  # one cycle through every node: f(cycle[i]) = cycle[i + 1]
    tokens, labels = [task.bos], [NOISE]
    if task.table == "array":
        tokens += f.tolist()
        labels += [NOISE] * n
    else:
        for x in rng.permutation(n):
            tokens += [int(x), int(f[x])]
        labels += [NOISE] * (2 * n)
    tokens.append(task.sep)
    labels.append(0)
    hops = rng.choice(task.max_hops + 1, size=task.queries, p=task.probabilities())
    ordered = task.starts == "ordered"
    starts = np.arange(task.queries) if ordered else rng.permutation(n)[: task.queries]
    for x, k in zip(starts.tolist(), hops.tolist()):
        answer = x
        for _ in range(k):
            answer = int(f[answer])
        tokens += [task.hop_token(k), x, answer]
        labels += [NOISE, 0 if ordered else NOISE, k]
    T = task.seq_len + 1
    return np.array(tokens[:T], np.int32), np.array(labels[:T], np.int32)


def sequences(task: HopTask, seed: int, start: int, count: int, stream: str = "train"):
    """Sequences start..start + count - 1 of the (seed, stream) stream: tokens and labels, [count, seq_len + 1]."""
    if stream not in _SALT:
        raise SettingError(f"stream is {stream!r}, expected one of {', '.join(_SALT)}")
    pairs = [sample(task, np.random.default_rng([_SALT[stream], seed, i])) for i in range(start, start + count)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def batch(task: HopTask, seed: int, k: int, batch_size: int, stream: str = "train"):
    """Training batch k of seed `seed`: sequences k * batch_size .. (k + 1) * batch_size - 1 of the stream."""
    return sequences(task, seed, k * batch_size, batch_size, stream)


def curriculum(task: HopTask, step: int, every: int) -> HopTask:
    """The task of training step `step` when one more hop count is let in every `every` steps: hops up to
    1 + step // every (weighted as in `task`), the whole task from then on. every = 0: the task itself.

    Why: a stationary mix gives the hop count a model learns next only its share of the answers, and a lookup is
    learned late when few answers need it (docs/depth-task.md); opening the counts in turn gives each its turn.
    The schedule depends on the step only, so a batch stays a pure function of (seed, step)."""
    top = task.max_hops if every <= 0 else min(task.max_hops, 1 + step // every)
    if top == task.max_hops:
        return task
    w = task.probabilities()
    w[top + 1 :] = 0
    return replace(task, hop_weights=tuple(w.tolist()))


# ------------------------------------------------------------------------------------------------ training

STREAM_OPTIONS = {"curriculum": 0, "loss": "scored"}  # a training stream's settings beside the task's own
LOSSES = ("scored", "all")


def parse_spec(spec: str, seq_len: int) -> tuple[HopTask, dict]:
    """`train --task`'s value -> (task, stream options). "hop" is the default task; "hop:nodes=8,max_hops=2,
    hop_weights=1/1/2,curriculum=300,loss=all" sets fields of HopTask (seq_len is the model's) and the stream's
    options: `curriculum` N lets in one more hop count every N steps (0: all from the start), `loss` "scored"
    trains on the scored tokens only (NOISE masked out of the loss) or "all" (the plain LM loss)."""
    name, _, rest = spec.partition(":")
    if name != "hop":
        raise SettingError(f"--task {spec!r:.60}: expected 'text' or 'hop[:field=value,...]'")
    kinds = {f.name: f.type for f in fields(HopTask)}
    task_args, options = {"seq_len": seq_len}, dict(STREAM_OPTIONS)
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or (key not in kinds and key not in options) or key == "seq_len":
            known = ", ".join(sorted(set(kinds) - {"seq_len"} | set(options)))
            raise SettingError(f"--task: {item!r:.40} is not field=value with a field among {known}")
        try:
            if key == "hop_weights":
                task_args[key] = tuple(float(w) for w in value.split("/"))
            elif key in ("nodes", "max_hops", "curriculum"):
                (task_args if key in kinds else options)[key] = int(value)
            else:
                (task_args if key in kinds else options)[key] = value
        except ValueError:
            raise SettingError(f"--task: {item!r:.40}: expected a whole number (hop_weights: w0/w1/...)") from None
    if options["loss"] not in LOSSES or options["curriculum"] < 0:
        raise SettingError(f"--task: loss={options['loss']!r:.20}, curriculum={options['curriculum']}: expected "
                           f"loss one of {', '.join(LOSSES)} and curriculum >= 0")  # fmt: skip
    return HopTask(**task_args), options


def loss_mask(labels: np.ndarray, loss: str) -> np.ndarray:
    """The loss's weight per predicted token [B, T] (float32): 1 for the scored ones and 0 for NOISE ("scored"),
    1 everywhere ("all"). Masking the random draws out keeps their irreducible loss from drowning the answers'."""
    if loss == "all":
        return np.ones(labels[:, 1:].shape, np.float32)
    return scored_mask(labels).astype(np.float32)


class HopStream:
    """Training batches for `train.train`: `batch(step)` -> (tokens [B, T + 1], loss mask [B, T]), a pure function
    of (seed, step), so resumed runs see the batches an uninterrupted one would."""

    def __init__(self, task: HopTask, seed: int, batch_size: int, curriculum: int = 0, loss: str = "scored"):
        self.task, self.seed, self.batch_size, self.curriculum, self.loss = task, seed, batch_size, curriculum, loss

    def batch(self, step: int):
        tokens, labels = batch(curriculum(self.task, step, self.curriculum), self.seed, step, self.batch_size)
        return tokens, loss_mask(labels, self.loss)


def score(net, tokens: np.ndarray, labels: np.ndarray, batch_size: int = 64) -> dict:
    """A network (sequential or radial) on held-out sequences [N, T + 1], by the inference path: greedy accuracy
    and mean blocks run per label (the blocks of the position that predicts the token), and blocks per token
    over all positions, and whether blocks follow difficulty (`depth_follows_difficulty` over the scored tokens).
    -> {"accuracy": {label: share}, "blocks": {label: mean}, "scored": {label: count}, "blocks_per_token": mean,
    "spearman": rho or None, "hard_easy_blocks": ratio or None}, labels as strings (JSON keys)."""
    counts, blocks, all_blocks, scored_pairs = {}, {}, [], []
    for i in range(0, len(tokens), batch_size):
        tok, lab = tokens[i : i + batch_size], labels[i : i + batch_size]
        B, T = tok[:, :-1].shape
        logits = net.forward(tok[:, :-1]).reshape(B, T, -1)  # [B, T, V]
        add_counts(counts, accuracy_by_label(logits, tok, lab))
        depth = net.last_walk.depth.reshape(B, T)  # blocks run at each input position
        all_blocks.append(depth.ravel())
        scored_pairs.append(scored_depths(depth, lab))
        for label in np.unique(lab[:, 1:]):
            chosen = lab[:, 1:] == label
            s, n = blocks.get(int(label), (0.0, 0))
            blocks[int(label)] = (s + float(depth[chosen].sum()), n + int(chosen.sum()))
    return {
        "accuracy": {str(k): c / m for k, (c, m) in sorted(counts.items())},
        "blocks": {str(k): s / n for k, (s, n) in sorted(blocks.items()) if k != NOISE},
        "scored": {str(k): m for k, (_, m) in sorted(counts.items())},
        "blocks_per_token": float(np.concatenate(all_blocks).mean()),
        **depth_follows_difficulty(*map(np.concatenate, zip(*scored_pairs))),
    }


def scored_depths(depth: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Blocks run and required depth of every scored token: depth [B, T] (blocks run at each input position) and
    labels [B, T + 1] -> (blocks [n], label [n]), the label of token t + 1 beside the blocks of position t that
    predicts it, NOISE left out."""
    target_labels = labels[:, 1:]  # [B, T]: the label of what position t predicts
    if depth.shape != target_labels.shape:
        raise SettingError(f"depth {depth.shape} needs labels of shape {(*depth.shape[:-1], depth.shape[-1] + 1)}")
    chosen = target_labels != NOISE
    return depth[chosen].astype(np.float64), target_labels[chosen].astype(np.float64)


def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of x, ties given their mean rank (as Spearman's coefficient needs)."""
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(1, len(x) + 1)
    _, inverse = np.unique(x, return_inverse=True)
    sums = np.bincount(inverse, weights=r)
    return sums[inverse] / np.bincount(inverse)[inverse]


def depth_follows_difficulty(blocks: np.ndarray, labels: np.ndarray) -> dict:
    """Does compute follow difficulty? Over scored tokens (blocks run [n], required depth = label [n]):
    "spearman": Spearman's rank correlation of the two (None when either is constant, as for a sequential model);
    "hard_easy_blocks": mean blocks of the hardest label present over mean blocks of label 0 (None without both)."""
    out = {"spearman": None, "hard_easy_blocks": None}
    if len(blocks) > 1 and np.ptp(blocks) > 0 and np.ptp(labels) > 0:
        out["spearman"] = float(np.corrcoef(ranks(blocks), ranks(labels))[0, 1])
    easy = blocks[labels == 0]
    if len(easy) and easy.mean() > 0 and labels.max() > 0:
        out["hard_easy_blocks"] = float(blocks[labels == labels.max()].mean() / easy.mean())
    return out


def format_score(rep: dict) -> str:
    """`score`'s numbers as a small table: one row per label, accuracy and blocks run."""
    lines = [f"{'label':<10}{'scored':>8}{'accuracy':>10}{'blocks':>8}"]
    for k, acc in rep["accuracy"].items():
        name = "easy (0)" if k == "0" else f"{k} hop" + ("s" if k != "1" else "")
        lines.append(f"{name:<10}{rep['scored'][k]:>8}{acc:>10.3f}{rep['blocks'][k]:>8.2f}")
    lines.append(f"blocks per token, every position: {rep['blocks_per_token']:.2f}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ accuracy


def accuracy_by_label(logits: np.ndarray, tokens: np.ndarray, labels: np.ndarray) -> dict[int, tuple[int, int]]:
    """Greedy accuracy per label: logits [B, T, V] at positions 0..T-1 predict tokens [B, T + 1]'s 1..T.
    -> {label: (correct, scored)} for every label present but NOISE (counts, so batches add up)."""
    B, T, _ = logits.shape
    if tokens.shape != (B, T + 1) or labels.shape != (B, T + 1):
        raise SettingError(f"logits {logits.shape} need tokens and labels of shape {(B, T + 1)}, got "
                           f"{tokens.shape} and {labels.shape}")  # fmt: skip
    right = logits.argmax(-1) == tokens[:, 1:]  # [B, T]
    target_labels = labels[:, 1:]
    out = {}
    for label in np.unique(target_labels):
        if label != NOISE:
            chosen = target_labels == label
            out[int(label)] = (int(right[chosen].sum()), int(chosen.sum()))
    return out


def add_counts(total: dict, counts: dict) -> dict:
    """Sum {label: (correct, scored)} dicts (in place into `total`, which is returned)."""
    for label, (c, n) in counts.items():
        c0, n0 = total.get(label, (0, 0))
        total[label] = (c0 + c, n0 + n)
    return total


def scored_mask(labels: np.ndarray) -> np.ndarray:
    """Which predicted tokens are scored, for a per-token loss mask: labels [B, T + 1] -> [B, T] bool."""
    return labels[:, 1:] != NOISE


# ------------------------------------------------------------------------------------------------ files


def save(path, task: HopTask, tokens: np.ndarray, labels: np.ndarray) -> Path:
    """Sequences and labels (int arrays [N, seq_len + 1]) as one safetensors file, the task in its metadata."""
    from .io.checkpoint import write_safetensors

    _check_arrays(path, task, tokens, labels)
    meta = {
        "format": FORMAT,
        "task": json.dumps(asdict(task)),
        "vocabulary": json.dumps(task.names()),
        "labels": json.dumps(LABEL_MEANINGS),
    }
    write_safetensors(path, {"tokens": tokens.astype(np.int32), "labels": labels.astype(np.int32)}, meta)
    return Path(path)


def read(path) -> tuple[HopTask, np.ndarray, np.ndarray]:
    """The task, tokens and labels `save` wrote; one RadialError line naming the file and field if anything is off."""
    from .io.checkpoint import SafetensorsFile

    path = Path(path)
    if not path.is_file():
        raise RadialError(f"{path}: no such file (expected a hop-task file written by `save`)")
    f = SafetensorsFile(path)
    if f.metadata.get("format") != FORMAT:
        raise RadialError(f"{path}: metadata 'format' is {f.metadata.get('format')!r:.40}, expected {FORMAT!r}")
    try:
        spec = json.loads(f.metadata.get("task", ""))
        known = {fl.name for fl in fields(HopTask)}
        if not isinstance(spec, dict) or set(spec) - known:
            raise ValueError(f"fields {sorted(set(spec) - known) if isinstance(spec, dict) else spec!r:.60}")
        task = HopTask(**spec)
    except (ValueError, TypeError) as e:
        raise RadialError(f"{path}: metadata 'task' is not a valid HopTask ({str(e)[:120]})") from None
    arrays = {}
    for name in ("tokens", "labels"):
        if name not in f.entries or f.dtype(name) != "int32":
            raise RadialError(f"{path}: expected an int32 tensor {name!r}")
        arrays[name] = f.read(name)
    _check_arrays(path, task, arrays["tokens"], arrays["labels"])
    return task, arrays["tokens"], arrays["labels"]


def _check_arrays(path, task: HopTask, tokens, labels) -> None:
    shape = (len(tokens), task.seq_len + 1)
    for name, a in (("tokens", tokens), ("labels", labels)):
        if a.ndim != 2 or a.shape != shape:
            raise RadialError(f"{path}: {name!r} has shape {a.shape}, expected [N, {task.seq_len + 1}] like tokens")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= task.vocab_size):
        raise RadialError(f"{path}: 'tokens' holds ids outside 0..{task.vocab_size - 1}")
    if labels.size and (labels.min() < NOISE or labels.max() > task.max_hops):
        raise RadialError(f"{path}: 'labels' holds values outside {NOISE}..{task.max_hops}")


def show(task: HopTask, tokens: np.ndarray, labels: np.ndarray, per_row: int = 16) -> str:
    """One sequence as text: rows of token names with each token's label under it ('.' = NOISE, not scored)."""
    names = task.names()
    cells = [(names[int(t)], "." if lab == NOISE else str(int(lab))) for t, lab in zip(tokens, labels)]
    rows = []
    for i in range(0, len(cells), per_row):
        row = cells[i : i + per_row]
        rows.append("token " + " ".join(f"{a:>3}" for a, _ in row))
        rows.append("label " + " ".join(f"{b:>3}" for _, b in row))
    return "\n".join(rows)


def show_routes(task: HopTask, tokens: np.ndarray, labels: np.ndarray, routes: np.ndarray, paint=None) -> str:
    """One sequence with the blocks that produced each token: under every token its label, the number of blocks
    run at the position that predicts it, and which (block indices in the order run, '.' = none). tokens and
    labels [T + 1], routes [T, max_depth] (the walk's `routes` at the input positions, -1 = none). `paint(text,
    blocks)` marks a token (e.g. a grey shade by depth, radial.shade), None: plain text."""
    names = task.names()
    cells = [(names[int(tokens[0])], ".", "", "")]
    for t in range(1, len(tokens)):
        run = [int(b) for b in routes[t - 1] if b >= 0]
        which = "".join(map(str, run)) if len(run) and max(run) < 10 else "-".join(map(str, run))
        label = "." if labels[t] == NOISE else str(int(labels[t]))
        cells.append((names[int(tokens[t])], label, str(len(run)), which or "."))
    w = max(3, max(len(c[3]) for c in cells))
    rows = []
    for i in range(0, len(cells), 12):
        row = cells[i : i + 12]
        token = " ".join(paint(f"{a:>{w}}", int(c)) if paint and c else f"{a:>{w}}" for a, _, c, _ in row)
        rows += ["token  " + token, "label  " + " ".join(f"{b:>{w}}" for _, b, _, _ in row)]
        rows += [
            "blocks " + " ".join(f"{c:>{w}}" for _, _, c, _ in row),
            "which  " + " ".join(f"{d:>{w}}" for *_, d in row),
        ]
    return "\n".join(rows)
