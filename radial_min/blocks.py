"""Residual blocks, the unit of Radial Networks: every transformer layer is an attention block and an FFN block.

A block computes its main branch f(x) and its residual add, y = x + f(x) (pre-LN), or y = LN(x + f(x)) for
post-LN models such as OPT-350m. The two halves are separate methods so that a caller can run a block, skip it
(y = x), or look at x, f(x) and y on their own: profiling, the oracle and the router all hook in here.
"""

from dataclasses import dataclass

import numpy as np

from . import kernels


@dataclass
class LayerNorm:
    weight: np.ndarray | None  # [E]; None when the config says layer_norm_elementwise_affine = False
    bias: np.ndarray | None
    eps: float = 1e-5

    def __call__(self, x):
        return kernels.layernorm(x, self.weight, self.bias, self.eps)  # [T, E] -> [T, E]

    @classmethod
    def from_tensors(cls, t: dict, prefix: str, eps: float):
        return cls(t.get(prefix + ".weight"), t.get(prefix + ".bias"), eps)


@dataclass
class RMSNorm:
    """Llama's norm: rows scaled to unit root mean square, then by `weight` (no mean, no bias)."""

    weight: np.ndarray  # [E]
    eps: float = 1e-6

    def __call__(self, x):
        return kernels.rmsnorm(x, self.weight, self.eps)  # [T, E] -> [T, E]


@dataclass
class Rotary:
    """Rotary position embeddings (Su et al.): each head's query and key pairs rotated by position x frequency."""

    head_dim: int
    theta: float = 10000.0

    def __call__(self, x, n_head, pos):  # [T, H*D], [T] -> [T, H*D]
        cos, sin = kernels.rope_angles(pos, self.head_dim, self.theta)  # [T, D/2] each
        return kernels.rope(x, n_head, cos, sin)


@dataclass
class Linear:
    weight: np.ndarray  # [out, in], as nn.Linear stores it
    bias: np.ndarray | None = None  # [out]

    def __call__(self, x):
        return kernels.linear(x, self.weight, self.bias)  # [T, in] -> [T, out]

    @classmethod
    def from_tensors(cls, t: dict, prefix: str):
        return cls(t[prefix + ".weight"], t.get(prefix + ".bias"))


@dataclass
class Step:
    """What an attention block needs besides its input rows: their positions and where keys/values live."""

    pos: np.ndarray | None = None  # [T] absolute token positions (causal models); None: full attention (ViT)
    cache: object = None  # a KV cache (see cache.py), or None: attend within these rows only
    hop: object = 0  # blocks the token ran before this one (its routing step), an int or one per row [T]


class Block:
    """y = x + f(x), or LN(x + f(x)) when `pre_norm` is False. Subclasses define `branch`, i.e. f."""

    kind = "?"

    def __init__(self, layer: int, norm: LayerNorm, pre_norm: bool):
        self.layer, self.norm, self.pre_norm = layer, norm, pre_norm

    @property
    def name(self) -> str:
        return f"L{self.layer}.{self.kind}"

    def branch(self, x, step: Step):  # [T, E] -> f(x) [T, E]
        raise NotImplementedError

    def residual(self, x, f):
        """Join the branch to the residual stream: the only place pre- and post-LN differ after f."""
        y = x + f  # [T, E]
        return y if self.pre_norm else self.norm(y)

    def __call__(self, x, step: Step):
        return self.residual(x, self.branch(x, step))

    def __repr__(self):
        return f"<{type(self).__name__} {self.name}>"


class AttentionBlock(Block):
    """Multi-head self-attention. Causal over a KV cache for OPT and Llama; full attention over the image for ViT.
    Llama adds rotary embeddings to queries and keys (the cache stores keys rotated) and grouped-query attention:
    n_kv_head key/value heads, each shared by n_head // n_kv_head query heads."""

    kind = "att"

    def __init__(
        self,
        layer,
        norm,
        pre_norm,
        qkv: Linear,
        out: Linear,
        n_head: int,
        n_kv_head: int | None = None,
        rotary: Rotary | None = None,
    ):
        super().__init__(layer, norm, pre_norm)
        self.qkv, self.out, self.n_head = qkv, out, n_head  # qkv: q, k and v projections stacked, [E + 2Ekv, E]
        self.n_kv_head, self.rotary = n_kv_head or n_head, rotary

    def project_qkv(self, x, pos=None):
        """The block's queries, keys and values for rows x at positions `pos` (rotated if the model is rotary);
        also what the `fill` rule caches for skipped tokens."""
        h = self.norm(x) if self.pre_norm else x
        qkv = self.qkv(h)  # [T, E] -> [T, E + 2Ekv]
        kv = (qkv.shape[1] * self.n_kv_head) // (self.n_head + 2 * self.n_kv_head)  # Ekv
        q, k, v = qkv[:, : -2 * kv], qkv[:, -2 * kv : -kv], qkv[:, -kv:]  # -> [T, E], 2 x [T, Ekv]
        if self.rotary is not None:
            q, k = self.rotary(q, self.n_head, pos), self.rotary(k, self.n_kv_head, pos)
        return q, k, np.ascontiguousarray(v)

    def branch(self, x, step: Step):
        q, k, v = self.project_qkv(x, step.pos)
        k_pos, rows = step.pos, None
        if step.cache is not None:  # store the new keys/values; get back everything this query may see
            q, k, v, k_pos, rows = step.cache.update(self.layer, q, k, v, step.pos, step.hop)
        a = kernels.attention(q, k, v, self.n_head, step.pos, k_pos, rows, self.n_kv_head)  # [T, E]
        return self.out(a)  # [T, E] -> [T, E]

    def branch_dropping(self, x, keeps):
        """f(x) when a token that skips this block offers no keys/values to later tokens (the `drop` rule).

        Token by token, since whether token t is seen by later tokens depends on its own decision:
        `keeps(t, f_t) -> bool` decides token t from its branch f_t [1, E]. Returns f [T, E] and keep [T]."""
        T = len(x)
        q, k, v = self.project_qkv(x, np.arange(T))  # one sequence from position 0
        f = np.empty_like(x)
        keep = np.zeros(T, bool)
        for t in range(T):
            visible = np.append(np.flatnonzero(keep[:t]), t)  # tokens that ran this block, and itself
            a = kernels.attention(q[t : t + 1], k[visible], v[visible], self.n_head, n_kv_head=self.n_kv_head)  # <= t
            f[t] = self.out(a)[0]
            keep[t] = keeps(t, f[t : t + 1])
        return f, keep


class FFNBlock(Block):
    """Position-wise feed-forward: fc2(act(fc1(x))). ReLU in OPT, exact GELU in ViT. Gated (Llama's SwiGLU) when
    `gate` is given: fc2(act(gate(x)) * fc1(x)), with fc1 as the "up" and fc2 as the "down" projection."""

    kind = "ffn"

    def __init__(self, layer, norm, pre_norm, fc1: Linear, fc2: Linear, act: str, gate: Linear | None = None):
        super().__init__(layer, norm, pre_norm)
        self.fc1, self.fc2, self.act, self.gate = fc1, fc2, act, gate

    def branch(self, x, step: Step = None):
        h = self.norm(x) if self.pre_norm else x
        if self.gate is None:
            h = kernels.activation(self.act, self.fc1(h))  # [T, E] -> [T, F]
        else:
            h = kernels.activation(self.act, self.gate(h)) * self.fc1(h)  # [T, E] -> [T, F]
        return self.fc2(h)  # [T, F] -> [T, E]


def run_block(i, block, x, step: Step, observe=None, gate=None):
    """Block i on rows x: its branch, scaled by `gate` [T] if given (a co-trained Radial Network's router
    probability, see radial_train.py), its residual add, and the observer told (see `run_blocks`)."""
    f = block.branch(x, step)  # [T, E]
    if gate is not None:
        f = gate[:, None] * f  # y = x + p f(x)
    y = block.residual(x, f)  # [T, E]
    if observe is not None:
        observe(i, block, x, f, y)
    return y


def begin(observe, x):
    """Tell an observer that rows x (just embedded) start a walk over the blocks, if it wants to know."""
    start = getattr(observe, "begin", None)
    if start is not None:
        start(x)


def run_blocks(blocks, x, step: Step, observe=None):
    """The sequential model: every block in order.

    The observe contract, shared by every walk over the blocks (this one, `oracle.run_sequence` and
    `RadialNetwork.route_token`): `observe(i, block, x, f, y)` sees block i's input rows x, their branch f and
    the output y the walk goes on with (the oracle passes y = x for rows that skip the block); an observer with a
    `begin(x)` method is told first when new rows [T, E] enter the blocks. Blocks a walk does not visit (a router
    skips them) are not observed. When `observe` is None the walk costs one `is None` test per block."""
    begin(observe, x)
    for i, block in enumerate(blocks):
        x = run_block(i, block, x, step, observe)
    return x
