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

    It tells the tokens apart as the engines call it: a call where every row is at depth 0 brings the next tokens
    (one, token by token; several, routed together); a later call is about the tokens of that group that just ran
    block `prev` (in token order: routed together, a token visits a block at most once). Routes must fit the
    network's max_depth (a token stopped early would still be expected)."""

    def __init__(self, routes: list, n_blocks: int):
        self.routes, self.group, self.next_token = routes, [], 0
        forward = all(all(a < b for a, b in zip(r, r[1:])) for r in routes)  # every route moves forward only
        self.config = RouterConfig(
            width=0, n_blocks=n_blocks, forward_only=forward, max_depth=max(map(len, routes), default=0) + 1
        )

    def choose(self, x, prev, depth):
        prev, depth = np.asarray(prev), np.asarray(depth)
        if (depth == 0).all():
            self.group = list(range(self.next_token, self.next_token + len(depth)))
            self.next_token += len(depth)
            tokens = self.group
        else:
            tokens = [t for t in self.group if prev[0] in self.routes[t]]
        assert len(tokens) == len(depth), "ScriptedRouter: calls out of the order it expects"
        exit_ = self.config.exit
        return np.array([self.routes[t][d] if d < len(self.routes[t]) else exit_ for t, d in zip(tokens, depth)])
