"""The oracle (paper, Sec. 4): skip a block for a token when its residual ratio is under a threshold tau.

Decisions are greedy along depth: at each block, every token's ratio is computed from the hidden state that
actually reaches it (after its own earlier skips), and the block is kept when the ratio is >= tau. A skipped
block passes its input on unchanged (y = x). This gives each token its own *dynamic depth*.

A token that skips an attention block leaves a question for later tokens: what keys and values does it offer
at that layer? Two rules, both reported:
- fill: compute its keys/values from the hidden state passing by anyway, as CALM does for early-exited tokens;
- drop: it offers none; later tokens attend only to the tokens that ran the block.
The paper's oracle only counts skipped compute; here every setting is also scored by perplexity.

The oracle can follow a router's rules (router.py): `threshold(tau, sink=1, mandatory=...)` keeps every block for
the first `sink` positions (the attention sink) and keeps the mandatory blocks for every token (skipping
restricted to attention or FFN blocks), so its labels are routes such a router can take.
"""

import copy
from dataclasses import dataclass

import numpy as np

from . import layer_major
from ..blocks import AttentionBlock, Rows, begin
from ..errors import SettingError, count
from ..ops import log_softmax
from .profiling import block_ratio

KV_RULES = ("fill", "drop")


@dataclass
class Run:
    """What a simulation did to each token of each sequence."""

    keep: np.ndarray  # [n_seq, T, n_blocks] bool: block executed for the token
    ratios: np.ndarray  # [n_seq, T, n_blocks] the ratio each decision saw
    nll: np.ndarray  # [n_seq, T - 1] negative log-likelihood of each next token

    @property
    def depth(self) -> np.ndarray:
        """Blocks executed per token: [n_seq * T]."""
        return self.keep.sum(-1).ravel()

    @property
    def ppl(self) -> float:
        return float(np.exp(self.nll.mean()))

    @property
    def skip_rate(self) -> np.ndarray:
        """Fraction of tokens that skipped each block: [n_blocks]."""
        return 1.0 - self.keep.reshape(-1, self.keep.shape[-1]).mean(0)


def next_token_nll(logits, ids) -> np.ndarray:
    """-log p(ids[t + 1] | ids[:t + 1]) for t < T - 1: [T, V], [T] -> [T - 1]."""
    return -log_softmax(logits[:-1])[np.arange(len(ids) - 1), ids[1:]]


def check_scorable(sequences) -> None:
    """Perplexity needs a next token to predict: sequences of one token have none, and their mean NLL is NaN."""
    lengths = {len(s) for s in sequences}
    if not lengths or min(lengths) < 2:
        raise SettingError(
            f"sequences of {count(min(lengths, default=0), 'token')} have no next token to score: perplexity needs "
            "at least 2 tokens per sequence (--seq-len)"
        )


def perplexity(model, sequences: np.ndarray) -> float:
    """exp of the mean next-token NLL over packed sequences [n, T], each run whole by the inference engine."""
    check_scorable(sequences)
    return float(np.exp(np.concatenate([next_token_nll(model.forward(s), s) for s in sequences]).mean()))


class Decisions:
    """A decision rule with state, for `run_sequence`: called as `decide(b, rows, ratios) -> keep [len(rows)] bool`
    at block b, and `after(b, x, ran)` sees the states [T, E] after the embedding (b = -1, ran = None) and after
    each block, with ran [T] the tokens that ran it. Plain functions (`threshold`, `static`, `forced`) are the
    stateless case: they have no `after`."""

    def __call__(self, b, rows, ratios):
        raise NotImplementedError

    def after(self, b, x, ran):
        pass


def run_sequence(model, ids, decide, kv_rule: str = "fill", kind: str = "output", observe=None):
    """One sequence through the blocks with per-token decisions; returns (logits [T, V], keep, ratios).

    `decide(b, rows, ratios) -> keep` gets a block index, the token rows being decided and their ratios; a
    `Decisions` also sees the states after the embedding and after each block.
    `observe` follows the contract of `blocks.run_block`; here y = x for the rows that skip the block.
    """
    if kv_rule not in KV_RULES:
        raise ValueError(f"kv rule must be one of {KV_RULES}, got {kv_rule!r}")
    T = len(ids)
    pos = np.arange(T)
    x = model.embed(ids, pos)
    keep = np.zeros((T, len(model.blocks)), bool)
    ratios = np.zeros((T, len(model.blocks)))
    after = getattr(decide, "after", None)
    if after is not None:
        after(-1, x, None)
    begin(observe, x)
    for b, block in enumerate(model.blocks):
        x = decide_block(b, block, x, pos, decide, kv_rule, kind, keep[:, b], ratios[:, b], observe)
        if after is not None:
            after(b, x, keep[:, b])
    return model.head(x), keep, ratios


def decide_block(b, block, x, pos, decide, kv_rule, kind, keep, ratios, observe=None):
    """Block b on every row of one sequence, each row kept or skipped by `decide`: fills keep [T] and ratios [T],
    returns the new states [T, E]. One step of `run_sequence`, also driven block-major by `stream.py`."""
    if isinstance(block, AttentionBlock) and kv_rule == "drop":

        def keeps(t, f_t):  # the drop rule runs token by token inside the block
            ratios[t] = block_ratio(block, x[t : t + 1], f_t, kind)[0]
            return decide(b, np.array([t]), ratios[t : t + 1])[0]

        f, keep[:] = block.branch_dropping(x, keeps)
    else:
        f = block.branch(x, Rows(pos))  # fill: every token's keys/values from the state passing by
        ratios[:] = block_ratio(block, x, f, kind)
        keep[:] = decide(b, np.arange(len(x)), ratios)
    y = np.where(keep[:, None], block.residual(x, f), x)  # a skipped row passes its state on unchanged
    if observe is not None:
        observe(b, block, x, f, y)
    return y


def simulate(model, sequences, decide, kv_rule: str = "fill", kind: str = "output", progress=None) -> Run:
    """Run every packed sequence [n_seq, T] under `decide`, scoring the next-token likelihood."""
    check_scorable(sequences)
    if getattr(model, "layer_major", False):  # weights streamed block by block (stream.py): the same Run
        a = layer_major.run(SimulationPass(model, sequences, decide, kv_rule, kind)).arrays
        return Run(a["keep"], a["ratios"], a["nll"])
    keeps, ratios, nlls = [], [], []
    for ids in sequences if progress is None else progress(sequences):
        logits, keep, r = run_sequence(model, ids, decide, kv_rule, kind)
        keeps.append(keep)
        ratios.append(r)
        nlls.append(next_token_nll(logits, ids))
    return Run(np.stack(keeps), np.stack(ratios), np.stack(nlls))


class SimulationPass(layer_major.Pass):
    """`simulate` block-major (a streamed model): each sequence keeps its own copy of a stateful decision rule."""

    head = True

    def __init__(self, model, sequences, decide, kv_rule, kind):
        if kv_rule not in KV_RULES:
            raise ValueError(f"kv rule must be one of {KV_RULES}, got {kv_rule!r}")
        super().__init__(model, sequences, ("simulate", kv_rule, kind, decide))
        n_seq, T = self.sequences.shape
        n = len(model.blocks)
        label = getattr(decide, "label", None) or f"{layer_major.describe(decide)}, {kv_rule}"  # a given label: whole
        self.kv_rule, self.kind, self.label = kv_rule, kind, label
        self.arrays.update(
            keep=np.zeros((n_seq, T, n), bool), ratios=np.zeros((n_seq, T, n)), nll=np.zeros((n_seq, T - 1))
        )
        stateful = getattr(decide, "after", None) is not None
        self.decide = [copy.copy(decide) if stateful else decide for _ in range(n_seq)]

    def embedded(self, s, x):
        after = getattr(self.decide[s], "after", None)
        if after is not None:
            after(-1, x, None)

    def block(self, b, block, s, x, pos):
        keep, ratios = self.arrays["keep"][s, :, b], self.arrays["ratios"][s, :, b]
        y = decide_block(b, block, x, pos, self.decide[s], self.kv_rule, self.kind, keep, ratios)
        after = getattr(self.decide[s], "after", None)
        if after is not None:
            after(b, y, keep)
        return y

    def finish(self, s, x, logits):
        self.arrays["nll"][s] = next_token_nll(logits, self.sequences[s])

    def state(self):
        """A stateful rule's state is its array attributes (a RouterDecisions' next block and depth per token)."""
        return {
            f"{s}.{k}": v
            for s, d in enumerate(self.decide)
            if hasattr(d, "after")
            for k, v in vars(d).items()
            if isinstance(v, np.ndarray)
        }

    def restore(self, saved):
        for name, v in saved.items():
            s, attr = name.split(".", 1)
            setattr(self.decide[int(s)], attr, np.array(v))


def threshold(tau: float, label: str | None = None, sink: int = 0, mandatory=None):
    """The oracle: keep a block for a token when its ratio is at least tau, and always for the first `sink`
    positions and at the `mandatory` blocks (module doc). `label` names its pass on progress bars (the rule
    included, e.g. 'oracle tau=0.2, drop')."""
    fixed = frozenset(mandatory or ())

    def decide(b, rows, r):
        return (r >= tau) | (rows < sink) | (b in fixed)

    decide.label = label
    return decide


def static(dropped_blocks, label: str | None = None):
    """A fixed set of blocks skipped by every token (the static baselines); `label` as for `threshold`."""
    dropped = set(int(b) for b in dropped_blocks)

    def decide(b, rows, r):
        return np.full(len(rows), b not in dropped)

    decide.label = label
    return decide


def forced(keep):
    """Replay given decisions [T, n_blocks] for one sequence."""
    return lambda b, rows, r: keep[rows, b]


def agreement(run: Run, tau: float) -> dict:
    """How often the decisions of `run` (a router's, say) are the oracle's on the states they produced: at each
    block a token reaches, the oracle at `tau` keeps it iff its ratio there, on that very state, is >= tau.
    Counted per move, in the units the router is trained in (from the start and after each block it runs, the
    next block or EXIT: a move agrees when the oracle would skip every block it skips and run the one it runs),
    per block, and per token (its whole route)."""
    keep = run.keep.reshape(-1, run.keep.shape[-1])  # [N, B]
    same = keep == (run.ratios.reshape(keep.shape) >= tau)
    move = np.cumsum(keep, 1) - keep  # [N, B]: blocks run before b = the move deciding b (after the last: EXIT's)
    wrong = np.zeros((len(keep), keep.shape[1] + 1), bool)  # [N, B + 1]: move m disagrees on some block
    np.logical_or.at(wrong, (np.broadcast_to(np.arange(len(keep))[:, None], keep.shape), move), ~same)
    moves = keep.sum() + len(keep)  # one per block run, plus the first
    return {
        "move": float(1 - wrong.sum() / moves),
        "block": float(same.mean()),
        "route": float(same.all(1).mean()),
        "moves": int(moves),
    }


def around_depth(
    model, sequences, tau, kv_rule, kind, depth, sequential: Run, bar=None, step=0.02, most=5, **rules
) -> dict:
    """The oracle at `tau` and, to compare with a router at its own `depth` (blocks per token), at thresholds `step`
    apart toward that depth until two of them bracket it (tau = 0 is the `sequential` run): {tau: Run}, by tau.
    `bar` (a `progress.Passes`) counts each pass; `rules` (sink, mandatory) go to `threshold`."""
    runs = {0.0: sequential}
    for _ in range(most):
        if tau not in runs:
            label = f"oracle tau={tau:g} on test"
            progress = None if bar is None else (lambda items: bar.track(items, label))
            runs[tau] = simulate(model, sequences, threshold(tau, label, **rules), kv_rule, kind, progress)
        depths = [r.depth.mean() for r in runs.values()]
        if min(depths) <= depth <= max(depths) and len(runs) > 2 or tau == 0:
            break
        tau = max(0.0, round(tau - step if depth > runs[tau].depth.mean() else tau + step, 6))
    return dict(sorted(runs.items()))


def lowest_ratio_blocks(mean_ratio: np.ndarray, k: int) -> list[int]:
    """The k blocks with the smallest mean ratio: the best static guess at what the oracle skips."""
    return sorted(np.argsort(mean_ratio, kind="stable")[:k].tolist())


def last_blocks(n_blocks: int, k: int) -> list[int]:
    """Early exit: the last k blocks."""
    return list(range(n_blocks - k, n_blocks))


def at_depth(points, depth: float) -> float | None:
    """Perplexity at `depth` blocks per token from measured (mean depth, mean NLL) points: the mean NLL is
    interpolated linearly between the two nearest measured depths. That is exactly the expected score of a
    policy that exists: run one of the two settings on each sequence, at random, in the proportion that gives
    `depth` on average. None outside the measured range (never extrapolated)."""
    points, eps = sorted(points), 1e-9  # eps: a mean depth that is whole up to rounding counts as whole
    for (d0, l0), (d1, l1) in zip(points, points[1:] + points[-1:]):
        if d0 - eps <= depth <= d1 + eps:
            w = 0.0 if d1 == d0 else min(1.0, max(0.0, (depth - d0) / (d1 - d0)))
            return float(np.exp(l0 + w * (l1 - l0)))
    return None


def bracketing_ks(n_blocks: int, depth: float) -> list[int]:
    """The whole numbers of dropped blocks k whose depths n - k bracket `depth`: one k when it is whole."""
    return sorted({int(np.floor(n_blocks - depth + 1e-9)), int(np.ceil(n_blocks - depth - 1e-9))})


class StaticBaselines:
    """The two static baselines (the k blocks of lowest mean ratio, or the last k: early exit) at whole k, run
    once each when first needed, and their perplexity at any depth between (`at_depth`)."""

    NAMES = {"lowest": "lowest-ratio", "exit": "last"}

    def __init__(self, model, sequences, mean_ratio, full: Run, bar=None):
        self.model, self.sequences, self.mean_ratio, self.bar = model, sequences, mean_ratio, bar
        self.n = len(model.blocks)
        self.runs = {("lowest", 0): ([], full), ("exit", 0): ([], full)}  # k = 0: the sequential model itself

    def blocks(self, kind: str, k: int) -> list[int]:
        return lowest_ratio_blocks(self.mean_ratio, k) if kind == "lowest" else last_blocks(self.n, k)

    def missing(self, depths) -> list[tuple[str, int]]:
        """The (kind, k) runs that `ppl_at` would need for these depths and that have not run yet."""
        need = {(kind, k) for d in depths for k in bracketing_ks(self.n, d) for kind in self.NAMES}
        return sorted(need - set(self.runs))

    def run(self, kind: str, k: int) -> Run:
        if (kind, k) not in self.runs:
            blocks = self.blocks(kind, k)
            decide = static(blocks, f"static, {self.NAMES[kind]} {k} dropped")
            progress = None if self.bar is None else (lambda items: self.bar.track(items, decide.label))
            run = simulate(self.model, self.sequences, decide, "fill", progress=progress)
            self.runs[(kind, k)] = (blocks, run)
        return self.runs[(kind, k)][1]

    def ppl_at(self, kind: str, depth: float) -> float:
        """Perplexity of baseline `kind` at `depth` blocks per token, between its two bracketing whole k."""
        return at_depth(
            [(self.n - k, float(self.run(kind, k).nll.mean())) for k in bracketing_ks(self.n, depth)], depth
        )

    def rows(self) -> list[dict]:
        """Every baseline run so far: k, its depth, its perplexity and the blocks it drops."""
        return [
            {"baseline": kind, "k": k, "depth": self.n - k, "ppl": run.ppl, "dropped": blocks}
            for (kind, k), (blocks, run) in sorted(self.runs.items())
        ]


def sweep(model, sequences, taus, kv_rules=KV_RULES, kind: str = "output", bar=None) -> dict:
    """Perplexity against mean depth for the oracle at each tau and rule, with everything compared at the same
    mean depth: each static baseline at the oracle's depth (between the whole block counts around it, `at_depth`),
    and the other rule's oracle curve at that depth. Returns rows for a table, the baseline runs, the depth
    histograms. `bar` (a `progress.Bar`) counts every pass, each under its rule's label; the baselines' passes are
    added once known. A streamed model's passes count on its own `progress` instead, which takes the same `extend`
    (sequences to run through whole passes): the CLI gives it as `bar`."""
    n_blocks, n_seq = len(model.blocks), len(sequences)
    passes = [(rule, tau) for rule in kv_rules for tau in taus if tau != 0]
    if bar is not None:
        bar.extend((1 + len(passes)) * n_seq, final=False)

    def run(decide, rule):
        return simulate(
            model, sequences, decide, rule, kind, None if bar is None else lambda s: bar.track(s, decide.label)
        )

    full = run(threshold(0.0, "tau=0 (sequential)"), "fill")
    runs = {(rule, tau): full if tau == 0 else None for rule in kv_rules for tau in taus}
    for rule, tau in passes:
        runs[(rule, tau)] = run(threshold(tau, f"oracle tau={tau:g}, {rule}"), rule)
    mean_ratio = full.ratios.reshape(-1, n_blocks).mean(0)
    statics = StaticBaselines(model, sequences, mean_ratio, full, bar)
    depths = [float(r.depth.mean()) for r in runs.values()]
    if bar is not None:
        bar.extend(len(statics.missing(depths)) * n_seq, final=True)
    curves = {
        rule: [(float(r.depth.mean()), float(r.nll.mean())) for (ru, _), r in runs.items() if ru == rule]
        for rule in kv_rules
    }
    rows, hists = [], {}
    for (rule, tau), run in runs.items():
        depth = float(run.depth.mean())
        same_depth = {f"{r}_ppl_at_depth": at_depth(curves[r], depth) for r in kv_rules}  # own rule: its own ppl
        rows.append(
            {
                "tau": tau,
                "rule": rule,
                "ppl": run.ppl,
                "mean_depth": depth,
                "min_depth": int(run.depth.min()),
                "max_depth": int(run.depth.max()),
                "skip_rate": [round(float(s), 4) for s in run.skip_rate],
                "static_lowest_ppl": statics.ppl_at("lowest", depth),
                "early_exit_ppl": statics.ppl_at("exit", depth),
                **same_depth,
            }
        )
        hists[(rule, tau)] = np.bincount(run.depth, minlength=n_blocks + 1)
    return {"rows": rows, "static": statics.rows(), "depth_hist": hists, "mean_ratio": mean_ratio, "full": full}


def sweep_curves(res: dict, rules) -> dict:
    """A sweep's perplexity-against-depth curves, label -> (depths, perplexities): the oracle under each rule and
    the two static baselines, each sorted by depth."""
    curves = {}
    for rule in rules:
        rows = sorted((r["mean_depth"], r["ppl"]) for r in res["rows"] if r["rule"] == rule)
        curves[f"oracle ({rule})"] = ([d for d, _ in rows], [p for _, p in rows])
    for kind, label in (("lowest", "static: lowest-ratio blocks"), ("exit", "static: early exit")):
        points = sorted((r["depth"], r["ppl"]) for r in res["static"] if r["baseline"] == kind)
        curves[label] = ([d for d, _ in points], [p for _, p in points])
    return curves


def simulate_record(model, seqs, names, res) -> dict:
    """simulate.json: the sweep's rows, baselines, mean ratios and depth histograms, with what they were run on."""
    return {
        "model": str(model.path),
        "sequences": int(len(seqs)),
        "seq_len": int(seqs.shape[1]),
        "blocks": names,
        "mean_ratio": res["mean_ratio"],
        "rows": res["rows"],
        "static": res["static"],
        "depth_hist": {f"{r}/{t}": h for (r, t), h in res["depth_hist"].items()},
    }


def format_sweep(rows, statics, names, rules):
    """`oracle.sweep`'s rows: perplexity and depth per (rule, tau) beside the static baselines and the other
    rule, all at the row's mean depth; then the baselines' own runs, then skip rates."""
    other = {r: next((o for o in rules if o != r), None) for r in rules}
    head = f"{'rule':<6}{'tau':>6}{'ppl':>10}{'depth':>8}{'min':>5}{'max':>5}{'lowest-ratio':>14}{'early exit':>12}" + (
        f"{'other rule':>12}" if len(rules) > 1 else ""
    )
    lines = [
        "perplexity at the oracle's mean depth (blocks per token): the oracle, the static baselines and the other rule",
        head,
        "-" * len(head),
    ]
    for row in rows:
        line = (
            f"{row['rule']:<6}{row['tau']:6.3f}{format_number(row['ppl'], 10)}{row['mean_depth']:8.2f}"
            f"{row['min_depth']:5d}{row['max_depth']:5d}{format_number(row['static_lowest_ppl'], 14)}"
            f"{format_number(row['early_exit_ppl'], 12)}"
        )
        if other[row["rule"]]:
            line += format_number(row[f"{other[row['rule']]}_ppl_at_depth"], 12)
        lines.append(line)
    lines += [
        f"(depth: of {len(names)} blocks; lowest-ratio: the k blocks of lowest mean ratio dropped for every "
        "token; early exit: the last k;",
        " at a depth between whole k, or between two taus of the other rule: the mean NLL interpolated, the "
        "score of mixing",
        " the two settings over sequences; '-': outside the depths measured)",
        "",
        "static baselines run (whole blocks dropped for every token):",
        f"{'k':>3}{'depth':>7}{'lowest-ratio':>14}{'early exit':>12}  lowest-ratio blocks dropped",
    ]
    by_k = {}
    for r in statics:
        by_k.setdefault(r["k"], {})[r["baseline"]] = r
    for k, b in sorted(by_k.items()):
        dropped = ", ".join(names[i] for i in b["lowest"]["dropped"]) or "-"
        lines.append(
            f"{k:3d}{len(names) - k:7d}{format_number(b['lowest']['ppl'], 14)}"
            f"{format_number(b['exit']['ppl'], 12)}  {dropped}"
        )
    lines += ["", "skip rate per block at each setting:", f"{'':<12}" + "".join(f"{b:>8}" for b in names)]
    lines += [f"{row['rule']} {row['tau']:<7.3f}" + "".join(f"{s:8.2f}" for s in row["skip_rate"]) for row in rows]
    return "\n".join(lines)


def format_number(value, width, digits=3):
    """A right-aligned number, or '-' for None (a value outside what was measured); with 3 significant digits and
    an exponent when the fixed form would not leave a space before it (whole-block dropping reaches ppl 1e9)."""
    if value is None:
        return f"{'-':>{width}}"
    text = f"{value:.{digits}f}"
    return f"{text if not width or len(text) < width else f'{value:.3g}':>{width}}"
