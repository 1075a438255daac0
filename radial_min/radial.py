"""Radial execution (paper, Sec. 5): instead of running blocks 0, 1, 2, ... in order, each token asks a router which
block to run next, until the router says EXIT or the token reaches the maximum depth.

`RadialNetwork` is the one walk over the blocks. Generation, a prompt's prefill, perplexity, the oracle's routed
runs and training all go through it, and so does the sequential model: a model's own `forward` is the Radial Network
with the `InOrder` router (models/base.py). Follow one token through `forward`: the model embeds it; `_Walk.decide`
asks the router for its first move; each round runs the blocks its tokens chose, over the KV cache (cache.py); the
tokens choose again from their new states; the model's head reads the final states.

Which tokens go together in a round is the walk's `schedule`, the cheapest order that is exact for the cache policy
(every token then runs exactly the blocks, over exactly the keys, it would run alone, token by token):
- block: a round per block, in order, over every token that chose it: a forward-only router with the per-layer
  policy (block b is read only by block b, and every token that will run block b has chosen it by then). The
  sequential model, and the fast prefill and perplexity of forward-only routers;
- step: a round per routing step over every token still going: the per-step policy (step s reads only step s);
- token: each token's steps in turn, all its sequences at once: any policy (the global one, reuse under per-layer).
Within a round every block first writes its keys and values, then reads (blocks.Block.branch_in / branch_out).

What a token that skips an attention block offers later tokens there is the walk's `kv_rule` (the oracle's two
rules, analysis/oracle.py): `drop`, nothing (the per-layer cache has a hole there); `fill`, its keys and values
projected from the state passing by, which a skipped block leaves unchanged (AttentionBlock.write_kv). Fill is
defined for forward-only routers under the per-layer policy, where a token's state at a skipped block is its state
when it jumped: in the block schedule the tokens passing over block b write there just before its round (so every
query of the round reads them); a token walked alone (a decode step, the token schedule) writes at each skipped
block as soon as it has chosen its move. A Llama-family model needs it (docs/real-model.md).

Training uses the same walk with a tape (a list of what each op's backward needs): `forward(ids, tape=tape)` then
`backward(dlogits, tape)`, which replays the rounds and decisions in reverse and leaves the gradients in the
model's and the router's `grad`. A network trained with its router (`gate=True`) scales each block's branch by the
router's probability of choosing it, y = x + p f(x) (Mixture-of-Depths' gate), so the language-model loss reaches
the router through p; the compute term of train.py reaches it through p(EXIT).
"""

import sys
from pathlib import Path

import numpy as np

from .blocks import Rows, begin, run_block
from .cache import POLICIES, KVCache, dense_cache_bytes, make_policy
from .config import check_field
from .errors import CheckpointError
from .io.outputs import read_json, write_json
from .router import MAX_PASSES, ExpertChoice, InOrder, Router, router_files

RADIAL_CONFIG = "radial.json"  # beside a co-trained network's checkpoint: its routing settings; the router beside
SCHEDULES = ("block", "step", "token")
KV_RULES = ("drop", "fill")  # what a token that skips an attention block offers later tokens there (module doc)
FILL = "fill"  # marks a round of `fill` writes in a walk's tape


class RadialNetwork:
    """A model's blocks run in the order its router picks, token by token, over a unified KV cache."""

    def __init__(
        self,
        model,
        router=None,
        max_depth: int | None = None,
        cache_policy: str = "per-layer",
        step_encoding_scale: float = 1.0,
        gate: bool = False,
        explore: float = 0.0,
        keep_routes: bool = True,
        kv_rule: str | None = None,
        relax: bool = False,
        sample: bool = False,
    ):
        self.model, self.blocks = model, model.blocks
        self.router = router if router is not None else InOrder(len(model.blocks))
        limit = self.router.config.depth_limit  # the router exits every token there: no walk goes deeper
        self.max_depth = limit if max_depth is None else min(max_depth, limit)
        if self.max_depth < 0:
            raise ValueError(f"max_depth must be >= 0, got {self.max_depth}")
        make_policy(cache_policy)  # refuse an unknown policy now
        self.cache_policy, self.step_encoding_scale = cache_policy, step_encoding_scale
        self.gate = gate  # networks trained with their router scale each block's branch by the router's probability
        self.explore = explore  # training only: the share of block decisions swapped for another block (`explore`)
        self.sample = sample  # training only: moves drawn from the router's softmax (the score-function estimator)
        self.keep_routes = keep_routes
        self.kv_rule = self._kv_rule(kv_rule)
        # training only: every row runs the next block, its branch scaled by the router's probability of that move
        # (a soft skip, Router-Tuning's relaxation, exact when each move is "run the next block or pass over it");
        # the compute term then prices those probabilities (`expected_blocks`)
        self.relax = relax
        self.routes = []  # with keep_routes: one list of block indices per token processed
        self.cache = None  # the latest cache made by new_cache (for memory reports)
        self.last_walk = None  # the latest forward's walk: routes [n, max_depth] and decisions

    # --------------------------------------------------------------------------------- what it is made of

    @property
    def config(self):
        return self.model.config

    @property
    def path(self):
        return self.model.path

    @property
    def load_seconds(self) -> float:
        return self.model.load_seconds

    @property
    def n_params(self) -> int:
        router = getattr(self.router, "params", {})
        return self.model.n_params + sum(a.size for a in router.values())

    @property
    def in_order(self) -> bool:
        return isinstance(self.router, InOrder)

    def _kv_rule(self, rule):
        """The rule asked for, else the one the router was distilled under when the walk can run it, else drop."""
        fillable = self.router.config.forward_only and self.cache_policy in ("per-layer", "per-block")
        if rule is None:
            return "fill" if self.router.config.kv_rule == "fill" and fillable else "drop"
        if rule not in KV_RULES:
            raise ValueError(f"kv_rule must be one of {', '.join(KV_RULES)}, got {rule!r}")
        if rule == "fill" and not fillable:
            raise ValueError("kv_rule 'fill' needs a forward-only router and the per-layer cache policy")
        return rule

    def new_cache(self, batch: int = 1, train: bool = False) -> KVCache:
        n_kv_head, head_dim = self.model.kv_heads
        policy = make_policy(self.cache_policy, self.step_encoding_scale)
        kv_dtype = "float32" if train else self.model.kv_dtype
        self.cache = KVCache(policy, n_kv_head, head_dim, batch, train, kv_dtype=kv_dtype)
        return self.cache

    def schedule(self, observe=None) -> str:
        """The cheapest order of rounds that is exact for this policy (module doc). An observer of a routed network
        follows one token's walk at a time (blocks.run_block), so then the token schedule."""
        if self.router.config.forward_only and self.cache_policy in ("per-layer", "per-block"):
            return "block" if observe is None or self.in_order else "token"
        return "step" if self.cache_policy == "per-step" and observe is None else "token"

    # ------------------------------------------------------------------------------------ forward, backward

    def forward(self, input_ids, cache=None, last_only=False, observe=None, tape=None, rng=None):
        """Logits of input_ids [T] (one sequence) or [B, T] -> [B * T, V] (row b * T + t is token t of sequence b), or
        [1, V] with `last_only` (one sequence). The tokens continue `cache` (a fresh one if None: a whole sequence from
        position 0). With a `tape` (a list) the walk keeps what `backward` needs; `rng` draws its exploration."""
        ids = np.asarray(input_ids)
        B, T = (1, len(ids)) if ids.ndim == 1 else ids.shape
        if cache is None and (B > 1 or tape is not None or not self.in_order):
            cache = self.new_cache(B, train=tape is not None)
        start = 0 if cache is None else cache.n_tokens  # no cache: one whole sequence, attention among its tokens
        pos = start + np.arange(T) if B == 1 else np.tile(start + np.arange(T), B)  # [n]
        x = self.model.embed(ids.ravel(), pos, tape)  # [n] -> [n, E]
        walk = self.walk(x, 0 if B == 1 else np.repeat(np.arange(B), T), pos, cache, observe, tape, rng, T)
        if cache is not None:
            cache.n_tokens += T
        if last_only:
            return self.model.head(walk.X[-1:])
        return self.model.head(walk.X, tape)  # [n, V]

    def walk(self, x, seq, pos, cache, observe=None, tape=None, rng=None, T=None):
        """Rows x [n, E] (the states of tokens at positions pos [n] of sequences seq [n] (0: all of one sequence),
        T tokens each; or an image's patches with pos None: attention among them all) from their embedding to EXIT
        -> the walk: its `X` are the final states, its `routes` the blocks each row ran."""
        walk = _Walk(self, x, seq, pos, cache, observe, tape is not None, rng)
        walk.run(self.schedule(observe), len(x) if T is None else T)
        if tape is None:  # last_walk outlives the call; the cache it wrote must not (a prefill's is ~24 MB on 135M)
            walk.cache = None
        self.last_walk = walk
        if tape is not None:
            tape.append(walk)
        if self.keep_routes:
            self.routes += walk.route_lists()
        return walk

    __call__ = forward

    def backward(self, dlogits, tape, d_expected: float = 0.0, advantage=None):
        """The forward undone in reverse: head, walk, embedding. `d_expected`: d loss / d the mean number of blocks
        the tokens expect to run (the compute term's price of a block); `advantage`: the score-function estimator's
        (_Walk.backward). Gradients go to the model's and the router's `grad` (zeroed by the caller)."""
        dx = self.model.head_backward(dlogits, tape)
        dx = tape.pop().backward(dx, d_expected, advantage)
        self.model.embed_backward(dx, tape)


class _Walk:
    """Rows x [n, E] from their embedding to EXIT: each row's state, its route so far, its next move and the gate of
    that move; in training, the decisions and rounds the backward replays."""

    def __init__(self, net: RadialNetwork, x, seq, pos, cache, observe, train: bool, rng):
        self.net, self.X, self.seq, self.pos, self.cache, self.observe = net, x, seq, pos, cache, observe
        self.exit, self.train = len(net.blocks), train
        self.rng = rng if net.explore > 0 or net.sample else None
        self.routes = np.full((len(x), max(1, net.max_depth)), -1)  # [n, max_depth] blocks run, -1 = none
        self.decisions, self.router_tape, self.rounds, self.start = [], [], [], None  # decisions: (rows, probs)
        self.priced = []  # relaxed training: each decision's moves, whose probabilities are the expected blocks
        self.fill = net.kv_rule == "fill" and not net.in_order
        self.fill_on_decision = False  # the token schedule's fill: each row writes once it has chosen (module doc)
        self.taken, self.aux_loss = [], 0.0  # each decision's moves (-1: forced), an expert choice's auxiliary loss

    def run(self, schedule: str, T: int):
        """Every row from its embedding to EXIT, in rounds ordered by `schedule` (T tokens per sequence)."""
        n = len(self.X)
        if self.net.in_order:
            return self.run_in_order()
        if n == 1 and not self.train:
            return self.run_one()
        self.seq = np.broadcast_to(self.seq, (n,))  # each row's own: rounds take subsets
        self.prev, self.step = np.full(n, -1), np.zeros(n, np.int64)
        self.move, self.gate = np.full(n, self.exit), np.ones(n, self.X.dtype)
        self.chooser = np.zeros((n, 2), np.int64)  # (decision, row in it) that chose each row's current move
        if self.fill and schedule == "token":
            if self.train:
                raise ValueError("the fill rule trains in the block schedule only (no observer)")
            self.fill_on_decision = True
        if self.train and isinstance(self.net.router, ExpertChoice):
            return self.run_expert_choice()
        self.decide(np.arange(n))  # START: every row's first move, from its embedding
        self.start = 0 if self.decisions else None  # the START decision, if the router was asked (training)
        if schedule == "token":
            for t in range(T):
                rows = t + T * np.arange(n // T)  # token t of every sequence
                begin(self.observe, self.X[rows])
                while len(rows := rows[self.move[rows] != self.exit]):
                    self.round(rows)
            return
        begin(self.observe, self.X)
        if schedule == "step":
            while len(rows := np.flatnonzero(self.move != self.exit)):  # every row still going takes its next step
                self.round(rows)
        else:
            for b in range(self.exit):  # forward-only: a row that has just run block b moves to a later one
                if self.fill:
                    self.fill_block(b, np.flatnonzero((self.move > b) & (self.prev < b)))  # rows passing over b
                if len(rows := np.flatnonzero(self.move == b)):
                    self.round(rows)

    def fill_block(self, b, rows):
        """The fill rule at block b (an attention block): the rows passing over it write their keys and values there
        from their states (blocks.AttentionBlock.write_kv); in training a round of its own on the tape."""
        write = getattr(self.net.blocks[b], "write_kv", None)
        if write is None or not len(rows):
            return
        tape = [] if self.train else None
        pos = None if self.pos is None else self.pos[rows]
        write(self.X[rows], Rows(pos, self.cache, self.step[rows], self.seq[rows]), tape)
        if self.train:
            self.rounds.append(([(b, rows, tape)], FILL))

    def fill_moves(self, rows):
        """The fill rule for rows that have just chosen their moves: each writes at the blocks it passes over."""
        for b in range(int(self.prev[rows].min()) + 1, int(self.move[rows].max())):
            self.fill_block(b, rows[(self.prev[rows] < b) & (self.move[rows] > b)])

    def run_in_order(self):
        """The in-order router's walk, known in advance: every row runs every block, one round per block, the block
        schedule without asking (the sequential model; its per-token cost is what the old block loop's was)."""
        depth, net, rows = min(len(self.net.blocks), self.net.max_depth), self.net, np.arange(len(self.X))
        begin(self.observe, self.X)
        at = Rows(self.pos, self.cache, 0, self.seq)
        for b in range(depth):
            tape = [] if self.train else None
            at.step = b  # every row at its step b
            self.X = run_block(b, net.blocks[b], self.X, at, self.observe, None, tape)
            if self.train:
                self.rounds.append(([(b, rows, tape, None)], None))
        self.routes[:, :depth] = np.arange(depth)

    def run_expert_choice(self):
        """Training an expert-choice router (router.ExpertChoice): step by step, each decision's candidates (every
        row forward-only, the rows still going otherwise) scored together and the top of each sequence run, so the
        rounds follow the steps; a decision is recorded as the `after` of the round before it (the START decision
        for step 0), which is where the backward wants it."""
        net, router = self.net, self.net.router
        if not router.config.forward_only and net.cache_policy != "per-step":
            raise ValueError(  # a later pass would write keys that earlier passes of later tokens should have read
                f"expert-choice recursion trains a pass per round: cache policy per-step, not {net.cache_policy}"
            )
        active, seq = np.arange(len(self.X)), np.zeros(len(self.X), np.int64) + self.seq  # seq: 0 for one sequence
        begin(self.observe, self.X)
        for p in range(net.max_depth):
            b, m = router.block_at(p), router.decision_at(p)
            if m is not None:
                k = len(self.decisions)
                chosen, probs, aux = router.pick(self.X[active], m, b, seq[active], self.pos[active], self.router_tape)
                self.decisions.append((active, probs))
                self.priced.append(np.where(chosen, b, self.exit))
                self.taken.append(None)
                self.aux_loss += aux
                if self.rounds:
                    self.rounds[-1] = (self.rounds[-1][0], k)
                else:
                    self.start = k
                rows = active[chosen]
                self.gate[rows] = probs[chosen, b]
                self.chooser[rows] = np.stack([np.full(len(rows), k), np.flatnonzero(chosen)], 1)
                if not router.config.forward_only:
                    active = rows  # the others exit
            else:
                rows = active
            self.move[rows] = b
            self.round(rows, decide=False, gated=m is not None)
            if not len(active):
                break

    def run_one(self):
        """One token, not training (a decode step): its rounds are one block each, so the walk runs them without
        arrays of rows, as a loop: ask the router, run the block it picked over the cache, ask again."""
        net, x, prev, step, pos = self.net, self.X, -1, 0, self.pos
        begin(self.observe, x)
        while True:
            b, gate = self.exit, None
            if step < net.max_depth:
                moves, gate = net.router.decide(x, np.array([prev]), np.array([step]), pos)
                b = int(moves[0])
            for skipped in range(prev + 1, b) if self.fill else ():  # the fill rule: keys where it passes over
                write = getattr(net.blocks[skipped], "write_kv", None)
                if write is not None:
                    write(x, Rows(pos, self.cache, step, self.seq))
            if b == self.exit:
                break
            x = run_block(
                b, net.blocks[b], x, Rows(pos, self.cache, step, self.seq), self.observe, gate if net.gate else None
            )
            self.routes[0, step], prev, step = b, b, step + 1
        self.X = x

    def decide(self, rows):
        """The rows' next moves, asked of the router; a row at the depth limit exits. Training asks the router's
        softmax (`Router.probabilities`, its gradient kept) for every row, generation its fused argmax for the rows
        below the limit."""
        net = self.net
        if self.train and isinstance(net.router, Router):
            x, prev, step = self.X[rows], self.prev[rows], self.step[rows]
            pos = None if self.pos is None else self.pos[rows]
            probs = net.router.probabilities(x, prev, step, self.router_tape, pos)  # [r, N + 1]
            if net.relax:
                moves = np.minimum(prev + 1, self.exit)
            else:
                moves = sample_moves(probs, self.rng) if net.sample else probs.argmax(-1)
            if net.explore > 0 and self.rng is not None:
                moves = explore(moves, probs, net.explore, self.rng)
            forced = step >= net.max_depth
            moves[forced] = self.exit
            self.chooser[rows] = np.stack([np.full(len(rows), len(self.decisions)), np.arange(len(rows))], 1)
            self.decisions.append((rows, probs))
            self.priced.append(moves)
            self.taken.append(np.where(forced, -1, moves))
            self.move[rows], self.gate[rows] = moves, probs[np.arange(len(rows)), moves]
            return
        self.move[rows] = self.exit
        rows = rows[self.step[rows] < net.max_depth]
        if len(rows):
            pos = None if self.pos is None else self.pos[rows]
            moves, gate = net.router.decide(self.X[rows], self.prev[rows], self.step[rows], pos)
            self.move[rows] = moves
            if gate is not None:
                self.gate[rows] = gate
        if self.fill_on_decision:
            self.fill_moves(rows)

    def round(self, rows, decide=True, gated=True):
        """The rows run the blocks they chose, a group per block: every group's first half (an attention block
        writes its keys and values), then every group's second half and its residual join y = x + p f(x) (the gate
        p if the network has one and `gated`); then they choose again (`decide`)."""
        moves, net = self.move[rows], self.net
        gated = net.gate and gated
        blocks = np.unique(moves)
        groups = []
        for b in blocks:
            r = rows if len(blocks) == 1 else rows[moves == b]
            pos = None if self.pos is None else self.pos[r]
            at, x, tape = Rows(pos, self.cache, self.step[r], self.seq[r]), self.X[r], [] if self.train else None
            groups.append((b, r, at, x, tape, net.blocks[b].branch_in(x, at, tape)))
        for b, r, at, x, tape, h in groups:
            block = net.blocks[b]
            f = block.branch_out(h, at, tape)
            y = block.residual(x, f, self.gate[r] if gated else None, tape)
            if self.observe is not None:
                self.observe(b, block, x, f, y)
            self.X[r] = y
            self.routes[r, self.step[r]] = b
        chosen_by = [self.chooser[r].copy() for _, r, *_ in groups]  # the decisions whose gates these blocks used
        self.prev[rows], self.step[rows] = moves, self.step[rows] + 1
        decided = len(self.decisions)
        if decide:
            self.decide(rows)
        if self.train:
            after = decided if len(self.decisions) > decided else None  # the decision that followed, if any
            record = [(b, r, tape, c) for (b, r, _, _, tape, _), c in zip(groups, chosen_by)]
            self.rounds.append((record, after))

    def backward(self, dX, d_expected: float, advantage=None):
        """The walk in reverse: the decision after each round, then the round (second halves, then first halves),
        then the START decision. -> the gradient of the embeddings [n, E]. `advantage` [n] (the score-function
        estimator, sampled moves): each row's loss minus a baseline, times d log p(move) of each move it drew."""
        n, blocks = len(dX), self.net.blocks
        dprobs = [np.zeros_like(p) for _, p in self.decisions]
        for d, moves in zip(dprobs, self.priced):  # expected blocks = (1/n) sum over decisions of (1 - p_EXIT)
            if self.net.relax:  # relaxed: (1/n) sum over decisions of p(the next block), EXIT not a block
                run = np.flatnonzero(moves < self.exit)
                d[run, moves[run]] += d_expected / n
            else:
                d[:, self.exit] -= d_expected / n
        if advantage is not None:  # d/dp of (1/n) sum_rows A log p(move) = A / (n p(move)) at the move drawn
            for (rows, probs), moves, d in zip(self.decisions, self.taken, dprobs):
                i = np.flatnonzero(moves >= 0)
                d[i, moves[i]] += advantage[rows[i]] / (n * probs[i, moves[i]])
        for groups, after in reversed(self.rounds):
            if after is FILL:  # the fill rule's writes: every query that read them is behind
                for b, r, tape in groups:
                    dX[r] += blocks[b].write_kv_backward(tape)
                continue
            if after is not None:
                self._decision_backward(after, dX, dprobs)
            halves = []
            for b, r, tape, chooser in reversed(groups):
                dx, df, dgate = blocks[b].residual_backward(dX[r], tape)
                halves.append((b, r, tape, dx, blocks[b].branch_out_backward(df, tape)))
                if dgate is not None:  # the gate's gradient goes to the decisions that chose these moves
                    for k in np.unique(chooser[:, 0]):
                        mine = chooser[:, 0] == k
                        dprobs[k][chooser[mine, 1], b] += dgate[mine]
            for b, r, tape, dx, dh in halves:
                dX[r] = dx + blocks[b].branch_in_backward(dh, tape)
        if self.start is not None:
            self._decision_backward(self.start, dX, dprobs)
        return dX

    def _decision_backward(self, k, dX, dprobs):
        rows, _ = self.decisions[k]
        dX[rows] += self.net.router.backward(dprobs[k], self.router_tape)

    def route_lists(self) -> list:
        return [r[r >= 0].tolist() for r in self.routes]

    @property
    def depth(self) -> np.ndarray:
        """Blocks each row ran: [n]."""
        return (self.routes >= 0).sum(1)

    def expected_blocks(self) -> float:
        """The mean over rows of the blocks each expected to run: the sum over its decisions of 1 - p(EXIT); relaxed,
        of p(the next block), the gates it ran its blocks with; an expert-choice router's: the blocks run, fixed by
        its capacity."""
        if isinstance(self.net.router, ExpertChoice):
            return float(self.depth.mean())
        if self.net.relax:
            gates = [p[np.arange(len(p)), m][m < self.exit] for (_, p), m in zip(self.decisions, self.priced)]
            return sum(float(g.sum()) for g in gates) / len(self.X)
        return sum(float((1 - p[:, self.exit]).sum()) for _, p in self.decisions) / len(self.X)


def sample_moves(probs, rng):
    """One move per row [r] drawn from its probabilities [r, N + 1] (inverse CDF; forbidden moves have p = 0)."""
    cdf = np.cumsum(probs, 1)
    u = rng.random(len(probs)) * cdf[:, -1]
    return np.minimum((cdf <= u[:, None]).sum(1), probs.shape[1] - 1)


def explore(moves, probs, share: float, rng):
    """Moves [r] with each block move, with probability `share`, swapped for another allowed block (probability > 0,
    not EXIT), drawn uniformly; EXIT moves, and blocks with no other allowed block, stay. The gate gives a block the
    router did not choose no gradient, so from its in-order start a router only ever learns about the blocks it
    already runs; an explored block runs under the gate of its own (small) probability, so the loss says, through
    p, whether it would have helped. EXIT decisions are left alone, so exploring costs no extra blocks."""
    N = probs.shape[1] - 1  # the last column is EXIT
    others = probs[:, :N] > 0
    others[np.arange(len(moves)), np.minimum(moves, N - 1)] &= moves == N  # not the block already chosen
    swap = (moves != N) & (rng.random(len(moves)) < share) & others.any(1)
    pick = rng.random(len(moves))  # a uniform draw among each row's other blocks, by inverse CDF
    counts = others.sum(1)
    nth = np.minimum((pick * counts).astype(np.int64), np.maximum(counts - 1, 0))
    chosen = np.argmax(np.cumsum(others, 1) > nth[:, None], 1)
    return np.where(swap, chosen, moves)


# ------------------------------------------------------------------------------ a co-trained network's files


def write_radial(folder, router: Router, cache_policy: str, step_encoding_scale: float, gate: bool = True):
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
            "gate": gate,
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
    if Path(name).name != name or name in ("", ".", "..") or len(name) > 200:  # its .safetensors: a name's 255
        raise CheckpointError(f"{path}: field 'router' is {name!r:.60}, expected a file name in {folder}")
    policy = check_field(src, "cache_policy", d.get("cache_policy"), str)
    if policy not in POLICIES:
        raise CheckpointError(f"{path}: field 'cache_policy' is {policy!r}, expected one of {', '.join(POLICIES)}")
    max_depth = check_field(src, "max_depth", d.get("max_depth"), int, 1, MAX_PASSES * n)
    scale = check_field(src, "step_encoding_scale", d.get("step_encoding_scale", 1.0), float, 0.0, 1e3)
    gate = check_field(src, "gate", d.get("gate", True), bool)
    for field, want in (("n_blocks", n), ("width", width)):
        if field in d and check_field(src, field, d[field], int) != want:
            raise CheckpointError(f"{path}: field {field!r} is {d[field]}, but the checkpoint has {want}")
    weights, config = router_files(Path(folder) / name)
    missing = [f.name for f in (config, weights) if not f.is_file()]
    if missing:
        raise CheckpointError(f"{path}: field 'router' is {name!r}, but {' and '.join(missing)} not found in {folder}")
    router = Router.load(Path(folder) / name)
    rc, rsrc = router.config, Path(folder) / (name + ".json")
    checks = (("n_blocks", rc.n_blocks, n), ("width", rc.width, width), ("max_depth", rc.depth_limit, max_depth))
    for field, got, want in checks:
        if got != want:
            whose = "radial.json" if field == "max_depth" else "the checkpoint"
            raise CheckpointError(f"{rsrc}: field {field!r} is {got}, but {whose} has {want}")
    return RadialNetwork(model, router, max_depth, policy, scale, gate)


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
        f"{cache.nbytes / 1024:.1f} KiB unified ({radial.cache_policy}) vs {dense / 1024:.1f} KiB dense per-layer]"
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
