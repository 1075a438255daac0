"""Routes found by search (Dr.LLM, CoLa): for one sequence, the set of blocks whose skipping costs the model's own
next-token distribution least, grown greedily one block at a time, so one trajectory gives every budget.

    trajectory, blocks_run = greedy_search(model, ids, candidates, budget, sink=1)
    keep = keep_for(len(ids), n_blocks, trajectory[:k], sink)        the route for budget k: [T, n] bool
    examples = route_examples(model, sequences, keeps)               router training examples, as the oracle's

The cost of a route is the mean over positions of KL(full model || routed model), the routed model run by the
oracle's simulation (oracle.decide_block), which under `fill` is exactly what routed execution computes
(tests/test_routing_rules.py). Every non-sink token skips the same blocks (a route per sequence, Dr.LLM's
granularity); the first `sink` positions run every block, as the router's rule makes them.

Why the search is affordable: a candidate c changes the route only from block c on, so the stream entering c is the
one the current route already computed. Each step runs the current route once, keeps the state entering every
block, and runs each candidate from its own block: n - c blocks and the head instead of n and the head.
"""

import time

import numpy as np

from ..ops import log_softmax
from . import oracle
from .distill import routes_as_examples


class Teacher:
    """The full model's next-token distribution over one sequence, kept in the form `mean_kl` needs: p [T, V] and
    sum_v p log p [T], so a candidate costs one log-sum-exp of its logits and a dot product per position."""

    def __init__(self, logits):
        logp = log_softmax(logits)
        self.p = np.exp(logp)  # [T, V] float64
        self.p_logp = (self.p * logp).sum(-1)  # [T]


def mean_kl(teacher: Teacher, logits) -> float:
    """Mean over positions of KL(teacher || softmax(logits)) = sum_v p log p - (sum_v p z - log sum_v e^z), z the
    logits less their maximum (float32 exponentials, float64 sums: 1e-8 nats of the float64 value)."""
    z = logits - logits.max(-1, keepdims=True)  # [T, V]
    lse = np.log(np.exp(z).sum(-1, dtype=np.float64))  # [T]
    return float((teacher.p_logp - np.einsum("tv,tv->t", teacher.p, z) + lse).mean())


def keep_for(T: int, n: int, skipped, sink: int = 0) -> np.ndarray:
    """The per-sequence route as decisions [T, n]: every position from `sink` on skips the `skipped` blocks."""
    keep = np.ones((T, n), bool)
    keep[sink:, list(skipped)] = False
    return keep


def run_from(model, x, start, keep, kv_rule="fill", states=None, head=True):
    """Blocks start.. on states x [T, E] (those entering block `start`), each row run or skipped by keep [T, n];
    states[b] receives the state entering block b. -> logits [T, V] (None without `head`)."""
    pos = np.arange(len(x))
    decide = oracle.forced(keep)
    ran, ratios = np.zeros(len(x), bool), np.zeros(len(x))
    for b in range(start, len(model.blocks)):
        if states is not None:
            states[b] = x
        x = oracle.decide_block(b, model.blocks[b], x, pos, decide, kv_rule, "output", ran, ratios)
    return model.head(x) if head else None


def greedy_search(model, ids, candidates, budget, sink=0, kv_rule="fill", reuse=True, log=None):
    """Grow a set of skipped blocks for sequence `ids` [T]: at each step, of the `candidates` not yet skipped, the
    one whose skipping (with those already skipped) gives the least mean KL(full || routed). `reuse` runs each
    candidate from the stream entering its block (module doc); without it, from the embedding (the same numbers,
    slower: tests check both). -> (trajectory: a dict per step with the block, its KL, every candidate's KL,
    blocks run, CPU seconds; blocks run by the whole search)."""
    T, n = len(ids), len(model.blocks)
    x0 = model.embed(ids, np.arange(T))
    states = [None] * n
    teacher = Teacher(run_from(model, x0, 0, keep_for(T, n, [], sink), kv_rule, states))
    skipped, trajectory, blocks_run = [], [], n
    for step in range(min(budget, len(candidates))):
        t0 = time.process_time()
        keep, costs, step_blocks = keep_for(T, n, skipped, sink), {}, 0
        for c in candidates:
            if c in skipped:
                continue
            trial = keep.copy()
            trial[sink:, c] = False
            start = c if reuse else 0
            costs[c] = mean_kl(teacher, run_from(model, states[c] if reuse else x0, start, trial, kv_rule))
            step_blocks += n - start
        names = list(costs)
        best = names[int(np.argmin([costs[c] for c in names]))]
        skipped.append(best)
        run_from(model, states[best], best, keep_for(T, n, skipped, sink), kv_rule, states, head=False)
        step_blocks += n - best
        blocks_run += step_blocks
        entry = {"block": int(best), "kl": costs[best], "candidates": {str(c): v for c, v in costs.items()}}
        trajectory.append(entry | {"blocks_run": step_blocks, "cpu_s": round(time.process_time() - t0, 2)})
        if log is not None:
            log(f"  step {step + 1}: skip block {best} (mean KL {costs[best]:.4f}; {step_blocks} blocks run)")
    return trajectory, blocks_run


def consensus(trajectories, k: int) -> list:
    """The static route the searches agree on: the k blocks most often among the first k of each trajectory (lists
    of blocks in the order chosen), ties to the block chosen earlier on average, then the lower index."""
    count, rank = {}, {}
    for blocks in trajectories:
        for i, b in enumerate(blocks[:k]):
            count[b] = count.get(b, 0) + 1
            rank[b] = rank.get(b, 0) + i
    return sorted(sorted(count, key=lambda b: (-count[b], rank[b] / count[b], b))[:k])


def route_examples(model, sequences, keeps, kv_rule="fill") -> dict:
    """Router training examples (distill.oracle_examples' format: x, prev, step, label, token) for given decisions
    keeps [n_seq, T, n]: the states each route passes through, and at each of them the route's next block."""
    examples, kept = routes_as_examples(model, ((ids, oracle.forced(k)) for ids, k in zip(sequences, keeps)), kv_rule)
    assert all((a == b).all() for a, b in zip(kept, keeps))
    return examples
