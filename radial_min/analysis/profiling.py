"""Residual ratios: how much a block's branch f(x) contributes to its output, token by token (paper, Sec. 4).

    output (default):  r = ||f(x)|| / ||x + f(x)||       the share of the block's output that f(x) makes up
    sum:               r = ||f(x)|| / (||x|| + ||f(x)||)  bounded by 1; equals `output` when f(x) and x align

x is the residual stream entering the block and f(x) its branch before the residual add. A small r means
y = x + f(x) is close to x, so skipping the block (y = x) changes little. Post-LN blocks (OPT-350m) compute
y = LN(x + f(x)), and skipping one skips its LN too: y = x. So there the ratio is taken of what running the
block changes, d = y - x, in place of f(x) (r = ||y - x|| / ||y||), which is what predicts the skip's effect.
The same formula on f(x) before the LN would not: with the LN's learned gains LN(x + 0) is not x (see
docs/profiling.md). For pre-LN blocks d = f(x) exactly, so the two readings agree there.

Profiling hooks into the model's `observe` callback, which costs nothing when it is not given.
"""

import numpy as np

from . import layer_major
from ..blocks import Rows, run_block
from ..generation import generate

KINDS = ("output", "sum")


def residual_ratio(x, f, kind: str = "output"):
    """Per-row ratio of branch to block output: [T, E], [T, E] -> [T]."""
    fx = np.linalg.norm(f.astype(np.float64), axis=-1)
    if kind == "output":
        return fx / np.maximum(np.linalg.norm((x + f).astype(np.float64), axis=-1), 1e-30)
    if kind == "sum":
        return fx / np.maximum(np.linalg.norm(x.astype(np.float64), axis=-1) + fx, 1e-30)
    raise ValueError(f"ratio kind must be one of {KINDS}, got {kind!r}")


def block_ratio(block, x, f, kind: str = "output"):
    """The residual ratio of `block` on rows x from its branch f: of f for a pre-LN block, of the change
    LN(x + f) - x that running it makes for a post-LN one (recomputed here: an observer's y is x for rows that
    skip the block): [T, E], [T, E] -> [T]."""
    return residual_ratio(x, f if block.pre_norm else block.residual(x, f) - x, kind)


class RatioRecorder:
    """An observer (see `blocks.run_block`) collecting each block's ratios: `rows()` -> [tokens, blocks].
    One row per token that entered the blocks; NaN where the token did not run the block (routed execution)."""

    def __init__(self, n_blocks: int, kind: str = "output"):
        if kind not in KINDS:
            raise ValueError(f"ratio kind must be one of {KINDS}, got {kind!r}")
        self.n_blocks, self.kind, self.chunks, self.current = n_blocks, kind, [], None

    def begin(self, x):
        self.current = np.full((len(x), self.n_blocks), np.nan)  # [T, blocks]
        self.chunks.append(self.current)

    def __call__(self, i, block, x, f, y):
        self.current[:, i] = block_ratio(block, x, f, self.kind)

    def rows(self) -> np.ndarray:
        return np.concatenate(self.chunks) if self.chunks else np.zeros((0, self.n_blocks))


def block_names(model) -> list[str]:
    return [b.name for b in model.blocks]


def profile_text(model, sequences, kind: str = "output", progress=None) -> np.ndarray:
    """Ratios of every block for every token of packed sequences (teacher forcing): [n_seq * T, n_blocks]."""
    if getattr(model, "layer_major", False):  # weights streamed block by block (stream.py): the same ratios
        return layer_major.run(ProfilePass(model, sequences, kind)).arrays["ratios"]
    rec = RatioRecorder(len(model.blocks), kind)
    for seq in sequences if progress is None else progress(sequences):
        model.forward(seq, observe=rec)
    return rec.rows()


class ProfilePass(layer_major.Pass):
    """`profile_text` block-major (a streamed model): the ratios of every block for every token,
    rows [n_seq * T, n_blocks]."""

    def __init__(self, model, sequences, kind):
        super().__init__(model, sequences, ("profile", kind))
        n_seq, T = self.sequences.shape
        self.kind, self.T, self.label = kind, T, f"profile ({kind})"
        self.arrays["ratios"] = np.zeros((n_seq * T, len(model.blocks)))
        self.rows = None

    def block(self, b, block, s, x, pos):
        self.rows = slice(s * self.T, (s + 1) * self.T)
        return run_block(b, block, x, Rows(pos), self)

    def __call__(self, i, block, x, f, y):  # the observer of run_block
        self.arrays["ratios"][self.rows, i] = block_ratio(block, x, f, self.kind)


def profile_generation(model, prompts, max_new_tokens: int, kind: str = "output", progress=None):
    """Ratios while generating greedily from each prompt, and the generated ids. Rows: the tokens fed back
    during decode, max_new_tokens - 1 per prompt (the last token is never fed back), [n, n_blocks]. The prompt's
    prefill is profiled by `profile_text`."""
    rows, generated = [], []
    for prompt in prompts if progress is None else progress(prompts):
        rec = RatioRecorder(len(model.blocks), kind)
        new = generate(model, prompt, max_new_tokens, observe=rec, stop_at_eos=False)
        rows.append(rec.rows()[len(prompt) :])  # drop the prefill rows
        generated.append(new)
    return np.concatenate(rows), generated


def profile_images(model, pixel_batches, kind: str = "output", progress=None) -> np.ndarray:
    """Ratios for every patch token (CLS included) of every image: [n_images * (N + 1), n_blocks]."""
    rec = RatioRecorder(len(model.blocks), kind)
    for pixels in pixel_batches if progress is None else progress(pixel_batches):
        model.forward(pixels[None], observe=rec)
    return rec.rows()


def summarize(ratios: np.ndarray, names: list[str]) -> dict:
    """Statistics per block, per block type (att/ffn) and overall, as plain numbers for CSV/JSON."""

    def stats(a):
        a = np.asarray(a, np.float64).ravel()
        p10, p50, p90 = np.percentile(a, [10, 50, 90])
        return {
            "mean": float(a.mean()),
            "std": float(a.std()),
            "median": float(p50),
            "p10": float(p10),
            "p90": float(p90),
            "n": int(a.size),
        }

    kinds = np.array([n.split(".")[1] for n in names])
    return {
        "blocks": {name: stats(ratios[:, i]) for i, name in enumerate(names)},
        "types": {k: stats(ratios[:, kinds == k]) for k in ("att", "ffn") if (kinds == k).any()},
        "overall": stats(ratios),
    }


def summary_rows(summary: dict) -> list[dict]:
    """`summarize`'s statistics as CSV rows, one per block, then per block type (all_att, all_ffn), then overall."""
    rows = [*summary["blocks"].items(), *((f"all_{k}", v) for k, v in summary["types"].items())]
    return [{"block": b, **s} for b, s in [*rows, ("overall", summary["overall"])]]


def medians(summary: dict) -> dict:
    """The median ratio overall and per block type: {"overall", "att", "ffn": median}."""
    return {k: s["median"] for k, s in [("overall", summary["overall"]), *summary["types"].items()]}


def kept_blocks(ratios: np.ndarray, tau: float) -> np.ndarray:
    """[tokens, blocks] ratios -> [tokens, blocks] bool: the blocks a threshold of `tau` keeps, each judged on the
    sequential path, not the oracle's (that is `simulate`)."""
    return ratios >= tau


def depth_counts(keep: np.ndarray) -> np.ndarray:
    """[tokens, blocks] bool -> [blocks + 1]: how many tokens keep 0, 1, ..., every block."""
    return np.bincount(keep.sum(1), minlength=keep.shape[1] + 1)


def size_rows(sizes: dict) -> list[dict]:
    """sizes.csv's rows, smallest model first: {label: (parameters, {"overall", "att", "ffn": median})}."""
    return [
        {"model": label, "parameters": p, **{f"median_{k}": v for k, v in m.items()}}
        for label, (p, m) in sorted(sizes.items(), key=lambda kv: kv[1][0])
    ]


def format_summary(summary: dict, title: str = "") -> str:
    """A plain-text table: one row per block, then per block type, then overall."""
    head = f"{'block':<10}{'mean':>8}{'std':>8}{'median':>8}{'p10':>8}{'p90':>8}"
    lines = [title, head, "-" * len(head)] if title else [head, "-" * len(head)]
    rows = list(summary["blocks"].items()) + [("-", None)] + [(f"all {k}", v) for k, v in summary["types"].items()]
    rows.append(("overall", summary["overall"]))
    for name, s in rows:
        if s is None:
            lines.append("-" * len(head))
            continue
        lines.append(f"{name:<10}{s['mean']:8.3f}{s['std']:8.3f}{s['median']:8.3f}{s['p10']:8.3f}{s['p90']:8.3f}")
    return "\n".join(lines)


def format_sizes(sizes):
    """Median ratio per model, smallest first: {label: (parameters, {"overall", "att", "ffn": median})}."""
    lines = [f"{'model':<24}{'parameters':>16}{'median':>8}{'att':>8}{'ffn':>8}"]
    for label, (p, m) in sorted(sizes.items(), key=lambda kv: kv[1][0]):
        lines.append(
            f"{label:<24}{p:>16,}{m['overall']:8.3f}{m.get('att', float('nan')):8.3f}{m.get('ffn', float('nan')):8.3f}"
        )
    return "\n".join(lines)
