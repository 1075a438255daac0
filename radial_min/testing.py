"""Routers that follow a rule instead of a trained MLP, for tests and benchmarks: one that runs every block in
order (routed execution must then be the sequential model), and one that replays given routes."""
import numpy as np

from .router import RouterConfig


class SequentialRouter:
    """Always the next block in order: a radial network that reproduces the sequential model."""

    def __init__(self, n_blocks: int, max_depth: int | None = None):
        self.config = RouterConfig(width=0, n_blocks=n_blocks, max_depth=max_depth)

    def choose(self, x, prev, depth):
        nxt = np.asarray(prev) + 1
        return np.where(np.asarray(depth) >= self.config.depth_limit, self.config.exit, nxt)


class ScriptedRouter:
    """Follows given routes, `routes[t]` being the blocks of token t in order (any order, repeats allowed).

    Token by token (`RadialNetwork`), a decision at depth 0 starts the next token. Evaluating many tokens at once
    (`RouterDecisions`), set `rows` to the token index of each row before each decision."""

    def __init__(self, routes: list, n_blocks: int):
        self.routes, self.token, self.rows = routes, -1, None
        forward = all(all(a < b for a, b in zip(r, r[1:])) for r in routes)  # every route moves forward only
        self.config = RouterConfig(width=0, n_blocks=n_blocks, forward_only=forward,
                                   max_depth=max(map(len, routes), default=0) + 1)  # fmt: skip

    def choose(self, x, prev, depth):
        if self.rows is None:
            self.token += int(depth[0] == 0)
        tokens = [self.token] * len(depth) if self.rows is None else self.rows
        return np.array([self.routes[t][d] if d < len(self.routes[t]) else self.config.exit for t, d in zip(tokens, depth)])
