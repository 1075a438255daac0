"""Radial execution (paper, Sec. 5): instead of running blocks 0, 1, 2, ... in order, each token asks a router
which block to run next, until the router says EXIT or the token reaches the maximum depth.

`RadialNetwork` wraps a sequential model's blocks with a router and a unified KV cache, and offers the same
`forward(input_ids, cache, last_only)` / `new_cache()` interface as the model, so `generate` runs either.
`routes` records the blocks each token ran.

Follow one token through `route_token`: embed it, ask the router, run the block it picked over the cache, ask
again, until EXIT. The engine allows any order and reuse of blocks. When the router may only move forward and each
query reads only its own layer's keys (the per-layer policy), many tokens can go together (`route_tokens`, block
by block: at block b, the tokens that chose b run it as one batch), which is how a prompt's prefill and the
perplexity of a long text (`forward` over the whole text, e.g. oracle.perplexity) stay fast; each token then runs
exactly the blocks, over exactly the keys, it would have alone (tests/test_radial.py). `router.RouterDecisions` is
the same router inside the oracle's simulation, which also measures the ratios at the blocks a token skips.
"""

import sys
from pathlib import Path

import numpy as np

from .blocks import Step, begin, run_block
from .cache import POLICIES, UnifiedKVCache, dense_cache_bytes
from .config import check_field
from .errors import CheckpointError
from .io.outputs import read_json, write_json
from .router import MAX_PASSES, Router

RADIAL_CONFIG = "radial.json"  # beside a co-trained network's checkpoint: its routing settings; the router beside


class RadialNetwork:
    """A model's blocks run in the order its router picks, token by token, over a unified KV cache."""

    def __init__(
        self,
        model,
        router,
        max_depth: int | None = None,
        cache_policy: str = "per-layer",
        step_encoding_scale: float = 1.0,
        gate: bool = False,
    ):
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
        self.path = getattr(model, "path", None)  # a co-trained network's folder (its tokenizer is there)

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

    @property
    def routes_together(self) -> bool:
        """Whether many tokens may be routed at once, block by block: true when no token can come back to a block it
        has passed (a forward-only router) and a query reads only its own layer's entries (per-layer policy), so
        every key a token may see at block b was written before block b ran, or by block b itself."""
        return self.router.config.forward_only and self.cache_policy == "per-layer"

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

    def route_tokens(self, ids, pos, cache):
        """Route tokens ids [T] at positions pos [T] together, block by block (needs `routes_together`): at block b
        the tokens whose router chose b run it as one batch and choose again from their new states, so block b
        runs once, over every token that visits it. Returns the final hidden states [T, E]."""
        x = self.model.embed(ids, pos)  # [T, E]
        cache.reserve(len(ids) * self.model.n_layer)  # at most one entry per token and attention block
        exit_, depth = len(self.blocks), np.zeros(len(ids), np.int64)
        moves, gates = np.full(len(ids), exit_), np.ones(len(ids), np.float32)  # next block, gate of that block
        routes = [[] for _ in ids]

        def decide(rows, prev):  # as route_token: a token at max_depth is not asked, it exits
            rows = rows[depth[rows] < self.max_depth]
            if len(rows):
                moves[rows], gate = self.decide(x[rows], np.full(len(rows), prev), depth[rows])
                gates[rows] = 1.0 if gate is None else gate

        decide(np.arange(len(ids)), -1)
        for b, block in enumerate(self.blocks):
            rows = np.flatnonzero(moves == b)
            if len(rows) == 0:
                continue
            gate = gates[rows] if self.gate else None
            x[rows] = run_block(b, block, x[rows], Step(pos[rows], cache, hop=depth[rows]), gate=gate)  # [rows, E]
            moves[rows] = exit_
            depth[rows] += 1
            for r in rows:
                routes[r].append(b)
            decide(rows, b)
        self.routes += routes
        return x

    def forward(self, input_ids, cache: UnifiedKVCache | None = None, last_only: bool = False, observe=None):
        """Logits for `input_ids` continuing `cache` (a fresh one if None). Several tokens go together when the
        router allows it (`routes_together`) and nobody observes; otherwise, and for an observer, which follows one
        token's walk at a time (see blocks.run_blocks), each token is routed alone."""
        cache = cache if cache is not None else self.new_cache()
        ids = np.asarray(input_ids)
        pos = cache.n_tokens + np.arange(len(ids))
        if len(ids) > 1 and self.routes_together and observe is None:
            x = self.route_tokens(ids, pos, cache)
        else:
            x = np.concatenate([self.route_token(int(t), int(p), cache, observe) for t, p in zip(ids, pos)])
        cache.n_tokens += len(ids)
        return self.model.head(x[-1:] if last_only else x)

    __call__ = forward


# ------------------------------------------------------------------------------ a co-trained network's files


def write_radial(folder, router: Router, cache_policy: str, max_depth: int | None, step_encoding_scale: float):
    """A co-trained network's routing beside its checkpoint: router.safetensors + router.json, and radial.json."""
    folder = Path(folder)
    router.save(folder / "router")
    write_json(
        folder / RADIAL_CONFIG,
        {
            "router": "router",
            "cache_policy": cache_policy,
            "max_depth": router.config.depth_limit,
            "step_encoding_scale": step_encoding_scale,
            "gate": True,
            "n_blocks": router.config.n_blocks,
            "width": router.config.width,
            "trained": "router and blocks from scratch, together (cli.py train --radial)",
        },
    )


def load_radial(model, folder) -> RadialNetwork:
    """The routed network of a co-trained checkpoint `folder` (its radial.json and router), every field checked
    against the router and the model: one error naming the file and the field if they disagree."""
    path = Path(folder) / RADIAL_CONFIG
    d = read_json(path, CheckpointError, "a co-trained network's routing settings")
    n, width = len(model.blocks), model.config.hidden_size
    src = str(path)
    name = check_field(src, "router", d.get("router"), str)
    if Path(name).name != name or name in ("", ".", ".."):
        raise CheckpointError(f"{path}: field 'router' is {name!r}, expected a file name in {folder}")
    policy = check_field(src, "cache_policy", d.get("cache_policy"), str)
    if policy not in POLICIES:
        raise CheckpointError(f"{path}: field 'cache_policy' is {policy!r}, expected one of {', '.join(POLICIES)}")
    max_depth = check_field(src, "max_depth", d.get("max_depth"), int, 1, MAX_PASSES * n)
    scale = check_field(src, "step_encoding_scale", d.get("step_encoding_scale", 1.0), float, 0.0, 1e3)
    gate = check_field(src, "gate", d.get("gate", True), bool)
    for field, want in (("n_blocks", n), ("width", width)):
        if field in d and check_field(src, field, d[field], int) != want:
            raise CheckpointError(f"{path}: field {field!r} is {d[field]}, but the checkpoint has {want}")
    router = Router.load(Path(folder) / name)
    rc, rsrc = router.config, Path(folder) / (name + ".json")
    checks = (("n_blocks", rc.n_blocks, n), ("width", rc.width, width), ("max_depth", rc.depth_limit, max_depth))
    for field, got, want in checks:
        if got != want:
            whose = "radial.json" if field == "max_depth" else "the checkpoint"
            raise CheckpointError(f"{rsrc}: field {field!r} is {got}, but {whose} has {want}")
    net = RadialNetwork(model, router, max_depth, policy, scale, gate)
    net.n_params = model.n_params + sum(a.size for a in router.params.values())
    net.dtypes_on_disk, net.weights_dtype, net.n_layer = model.dtypes_on_disk, model.weights_dtype, model.n_layer
    return net


def format_routing(radial, n_prompt: int) -> str:
    """One line on what routing saved in a generation: blocks per token and the unified KV cache's size."""
    if not radial.routes:
        return "[routing: no token was routed]"
    depths = np.array([len(r) for r in radial.routes])
    producing = depths[n_prompt - 1 :]  # each new token comes from the pass over the token before it
    n, cache = len(radial.blocks), radial.cache
    dense = dense_cache_bytes(radial.model.n_layer, cache.n_tokens, radial.config.hidden_size)
    return (
        f"[routing: {depths.mean():.2f} of {n} blocks per token ({1 - depths.mean() / n:.1%} saved; new tokens "
        f"produced by {producing.mean():.2f}, min {depths.min()}, max {depths.max()}); KV cache "
        f"{cache.nbytes / 1024:.1f} KiB unified ({cache.policy}) vs {dense / 1024:.1f} KiB dense per-layer]"
    )


DEPTH_STYLES = ("auto", "count", "shade", "none")  # generate --show-depth: how each token's depth is marked
_SUBSCRIPT = str.maketrans("0123456789", "₀₁₂₃₄₅₆₇₈₉")


def depth_streamer(stream, radial, style, write):
    """Stream text with the depth that produced each token: a subscript count, or a grey shade (darker = deeper).
    By default markers appear only on a terminal, so piped text stays plain."""
    deepest = max(len(radial.blocks), radial.max_depth)  # a network that reuses blocks may go deeper than it has
    if style in (None, "auto"):
        style = "shade" if sys.stdout.isatty() else "none"

    def on_token(token):
        piece, depth = stream.push(token), len(radial.routes[-1])
        if style == "count":
            piece += str(depth).translate(_SUBSCRIPT)
        elif style == "shade" and piece:
            return write(shade(piece, depth, deepest))
        write(piece)

    return on_token


def shade(piece, depth, deepest):
    """`piece` on a grey background, from white (depth 0) to near-black (`deepest`, the most blocks a token may
    run): the 24 ANSI 256-colour greys 255..232, all used. Up to 23 blocks deep, neighbouring depths are at least
    one grey apart (a 12-block model's one or two); deeper, neighbours may share a grey. Light text on the dark half."""
    grey = 255 - round(23 * min(depth, deepest) / max(1, deepest))
    ink = 16 if grey >= 244 else 231
    return f"\x1b[48;5;{grey}m\x1b[38;5;{ink}m{piece}\x1b[0m"
