"""The oracle (paper, Sec. 4): skip a block for a token when its residual ratio is under a threshold tau.

Decisions are greedy along depth: at each block, every token's ratio is computed from the hidden state that
actually reaches it (after its own earlier skips), and the block is kept when the ratio is >= tau. A skipped
block passes its input on unchanged (y = x). This gives each token its own *dynamic depth*.

A token that skips an attention block leaves a question for later tokens: what keys and values does it offer
at that layer? Two rules, both reported:
- fill: compute its keys/values from the hidden state passing by anyway, as CALM does for early-exited tokens;
- drop: it offers none; later tokens attend only to the tokens that ran the block.
The paper's oracle only counts skipped compute; here every setting is also scored by perplexity.
"""
from dataclasses import dataclass

import numpy as np

from .blocks import AttentionBlock, Step, begin
from .profiling import residual_ratio

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
    z = logits[:-1].astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return -logp[np.arange(len(ids) - 1), ids[1:]]


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
    `observe` follows the contract of `blocks.run_blocks`; here y = x for the rows that skip the block.
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
            ratios[t] = residual_ratio(x[t : t + 1], f_t, kind)[0]
            return decide(b, np.array([t]), ratios[t : t + 1])[0]

        f, keep[:] = block.branch_dropping(x, keeps)
    else:
        f = block.branch(x, Step(pos))  # fill: every token's keys/values from the state passing by
        ratios[:] = residual_ratio(x, f, kind)
        keep[:] = decide(b, np.arange(len(x)), ratios)
    y = np.where(keep[:, None], block.residual(x, f), x)  # a skipped row passes its state on unchanged
    if observe is not None:
        observe(b, block, x, f, y)
    return y


def simulate(model, sequences, decide, kv_rule: str = "fill", kind: str = "output", progress=None) -> Run:
    """Run every packed sequence [n_seq, T] under `decide`, scoring the next-token likelihood."""
    keeps, ratios, nlls = [], [], []
    for ids in sequences if progress is None else progress(sequences):
        logits, keep, r = run_sequence(model, ids, decide, kv_rule, kind)
        keeps.append(keep)
        ratios.append(r)
        nlls.append(next_token_nll(logits, ids))
    return Run(np.stack(keeps), np.stack(ratios), np.stack(nlls))


def threshold(tau: float):
    """The oracle: keep a block for a token when its ratio is at least tau."""
    return lambda b, rows, r: r >= tau


def static(dropped_blocks):
    """A fixed set of blocks skipped by every token (the static baselines)."""
    dropped = set(int(b) for b in dropped_blocks)
    return lambda b, rows, r: np.full(len(rows), b not in dropped)


def forced(keep):
    """Replay given decisions [T, n_blocks] for one sequence."""
    return lambda b, rows, r: keep[rows, b]


def lowest_ratio_blocks(mean_ratio: np.ndarray, k: int) -> list[int]:
    """The k blocks with the smallest mean ratio: the best static guess at what the oracle skips."""
    return sorted(np.argsort(mean_ratio, kind="stable")[:k].tolist())


def last_blocks(n_blocks: int, k: int) -> list[int]:
    """Early exit: the last k blocks."""
    return list(range(n_blocks - k, n_blocks))


def sweep(model, sequences, taus, kv_rules=KV_RULES, kind: str = "output", progress=None) -> dict:
    """Perplexity against mean depth for the oracle at each tau and rule, and for the two static baselines at
    the same (rounded) mean depth. Returns rows for a table plus the depth histograms."""
    n_blocks = len(model.blocks)
    full = simulate(model, sequences, threshold(0.0), "fill", kind, progress)  # tau = 0: the sequential model
    mean_ratio = full.ratios.reshape(-1, n_blocks).mean(0)
    baseline_cache = {}

    def baseline(kind_, k):
        if (kind_, k) not in baseline_cache:
            blocks = lowest_ratio_blocks(mean_ratio, k) if kind_ == "lowest" else last_blocks(n_blocks, k)
            baseline_cache[(kind_, k)] = (simulate(model, sequences, static(blocks), "fill", kind).ppl, blocks)
        return baseline_cache[(kind_, k)]

    rows, depths = [], {}
    for rule in kv_rules:
        for tau in taus:
            run = full if tau == 0 else simulate(model, sequences, threshold(tau), rule, kind, progress)  # tau 0: no skips
            k = int(round(n_blocks - run.depth.mean()))
            (low_ppl, low_blocks), (exit_ppl, _) = baseline("lowest", k), baseline("exit", k)
            rows.append({
                "tau": tau, "rule": rule, "ppl": run.ppl, "mean_depth": float(run.depth.mean()),
                "min_depth": int(run.depth.min()), "max_depth": int(run.depth.max()),
                "skip_rate": [round(float(s), 4) for s in run.skip_rate], "static_k": k,
                "static_lowest_ppl": low_ppl, "static_lowest_blocks": low_blocks, "early_exit_ppl": exit_ppl,
            })  # fmt: skip
            depths[(rule, tau)] = np.bincount(run.depth, minlength=n_blocks + 1)
    return {"rows": rows, "depth_hist": depths, "mean_ratio": mean_ratio, "full": full}
