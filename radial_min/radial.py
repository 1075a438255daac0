"""Radial execution (paper, Sec. 5): instead of running blocks 0, 1, 2, ... in order, each token asks a router
which block to run next, until the router says EXIT or the token reaches the maximum depth.

`RadialNetwork` wraps a sequential model's blocks with a router and a unified KV cache, and offers the same
`forward(input_ids, cache, last_only)` / `new_cache()` interface as the model, so `generate` runs either. Every
token is routed on its own, prompt tokens included; `routes` records the blocks each token ran.

The engine allows any order and reuse of blocks; a router distilled from a sequential model is masked to move
forward only. `RouterDecisions` evaluates such a forward-only router on whole sequences at once (block by
block, as the oracle does), which is how perplexity over long texts stays fast; the tests check it against
this token-by-token engine.
"""
import numpy as np

from .blocks import Step, begin, run_block
from .cache import UnifiedKVCache, dense_cache_bytes
from .oracle import Decisions


class RadialNetwork:
    def __init__(self, model, router, max_depth: int | None = None, cache_policy: str = "per-layer",
                 step_encoding_scale: float = 1.0, gate: bool = False):  # fmt: skip
        self.model, self.router = model, router
        self.config = model.config
        self.blocks = model.blocks
        self.max_depth = router.config.depth_limit if max_depth is None else max_depth
        if self.max_depth < 0:
            raise ValueError(f"max_depth must be >= 0, got {self.max_depth}")
        self.cache_policy, self.step_encoding_scale = cache_policy, step_encoding_scale
        self.gate = gate  # co-trained networks scale each block's branch by the router's probability of it
        self.routes = []  # one list of block indices per token processed
        self.cache = None  # the latest cache made by new_cache (for memory reports)

    def new_cache(self) -> UnifiedKVCache:
        width, n_kv_head = self.model.kv_shape  # keys/values are narrower than the model under grouped-query attention
        self.cache = UnifiedKVCache(width, n_kv_head, self.cache_policy, self.step_encoding_scale)
        return self.cache

    def decide(self, x, prev, depth):
        """The router's next moves for rows x [N, E] ([N] ints, n_blocks = EXIT) and the gates [N] that scale the
        blocks' branches: the router's probabilities of its moves if the network was trained with them, else None."""
        if self.gate:
            return self.router.decide(x, prev, depth)
        return self.router.choose(x, prev, depth), None

    def route_token(self, token: int, pos: int, cache, observe=None):
        """Run one token through the blocks its router picks; returns its final hidden state [1, E]."""
        x = self.model.embed(np.array([token]), np.array([pos]))  # [1, E]
        begin(observe, x)
        prev, route, exit_ = -1, [], len(self.blocks)
        while len(route) < self.max_depth:
            moves, gate = self.decide(x, [prev], [len(route)])
            nxt = int(moves[0])
            if nxt == exit_:
                break
            x = run_block(nxt, self.blocks[nxt], x, Step(np.array([pos]), cache, hop=len(route)), observe, gate)
            prev = nxt
            route.append(nxt)
        self.routes.append(route)
        return x

    def forward(self, input_ids, cache: UnifiedKVCache | None = None, last_only: bool = False, observe=None):
        """Logits for `input_ids` continuing `cache` (a fresh one if None), each token routed alone."""
        cache = cache if cache is not None else self.new_cache()
        states = []
        for token in np.asarray(input_ids):
            states.append(self.route_token(int(token), cache.n_tokens, cache, observe))
            cache.n_tokens += 1
        x = np.concatenate(states[-1:] if last_only else states)
        return self.model.head(x)

    __call__ = forward


class RouterDecisions(Decisions):
    """A forward-only router as the `Decisions` of `oracle.run_sequence`: at block b, the tokens
    whose chosen next block is b run it, then choose again from their new state."""

    def __init__(self, router, max_depth: int | None = None):
        if not router.config.forward_only:
            raise ValueError("RouterDecisions evaluates block by block, in order: it needs a forward-only router")
        self.router = router
        self.max_depth = router.config.depth_limit if max_depth is None else max_depth
        self.next = self.depth = None

    def __call__(self, b, rows, ratios):
        return self.next[rows] == b

    def after(self, b, x, ran):
        """b = -1: the embeddings, every token chooses its first block; else the tokens that ran block b."""
        if b < 0:
            self.next, self.depth = np.zeros(len(x), np.int64), np.zeros(len(x), np.int64)
            rows = np.arange(len(x))
        else:
            rows = np.flatnonzero(ran)
            self.depth[rows] += 1
        if len(rows):
            choice = self.router.choose(x[rows], np.full(len(rows), b), self.depth[rows])
            self.next[rows] = np.where(self.depth[rows] >= self.max_depth, self.router.config.exit, choice)


def format_routing(radial, n_prompt: int) -> str:
    """One line on what routing saved in a generation: blocks per token and the unified KV cache's size."""
    if not radial.routes:
        return "[routing: no token was routed]"
    depths = np.array([len(r) for r in radial.routes])
    producing = depths[n_prompt - 1 :]  # each new token comes from the pass over the token before it
    n, cache = len(radial.blocks), radial.cache
    dense = dense_cache_bytes(radial.model.n_layer, cache.n_tokens, radial.config.hidden_size)
    return (f"[routing: {depths.mean():.2f} of {n} blocks per token ({1 - depths.mean() / n:.1%} saved; new tokens "
            f"produced by {producing.mean():.2f}, min {depths.min()}, max {depths.max()}); KV cache "
            f"{cache.nbytes / 1024:.1f} KiB unified ({cache.policy}) vs {dense / 1024:.1f} KiB dense per-layer]")
