"""Residual blocks, the unit of Radial Networks: every transformer layer is an attention block and an FFN block.

A block computes its main branch f(x) and its residual add, y = x + f(x) (pre-LN), or y = LN(x + f(x)) for
post-LN models such as OPT-350m. The two halves are separate methods so that a caller can run a block, skip it
(y = x), or look at x, f(x) and y on their own: profiling, the oracle and the router all hook in here. A Radial
Network trained with its router scales the branch by the router's probability of the block, y = x + p f(x).

Every forward has its backward beside it, mirroring it op by op (llm.c at block level). The forward takes an
optional `tape`, a list used as a stack: with one, each op pushes what its backward needs and runs the training
path (ops.py, NumPy's BLAS, deterministic kernels); without, nothing is kept and inference's Numba kernels run
(kernels.py). The backward pops the tape in reverse, returns the gradient of the input and adds the gradients of
the parameters into each module's `grad` (arrays the model hands out: models.base.CausalLM.zero_grad).
"""

from dataclasses import dataclass, field

import numpy as np

from . import kernels, ops
from .cache import KVCache, read_backward, write_backward
from .quant import BlockMatrix

# ------------------------------------------------------------------------------------ modules with parameters


class Module:
    """A piece with parameters: `params()` gives them by attribute ("weight", "bias"); `grad` holds their gradients
    under the same keys; `names` says which Hugging Face tensor each is, {attribute: [(name, rows or None)]}."""

    def params(self) -> dict:
        return {name: a for name in ("weight", "bias") if (a := getattr(self, name, None)) is not None}

    def flush(self):
        """Gradients a backward deferred (Linear's), added in now."""


def _names(t: dict, prefix: str) -> dict:
    """{"weight": [(prefix.weight, None)], "bias": [...]}, for those of the two that t holds."""
    return {a: [(f"{prefix}.{a}", None)] for a in ("weight", "bias") if f"{prefix}.{a}" in t}


@dataclass(eq=False)
class Linear(Module):
    weight: np.ndarray  # [out, in], as nn.Linear stores it
    bias: np.ndarray | None = None  # [out]
    grad: dict = field(default_factory=dict, repr=False)
    pending: list = field(default_factory=list, repr=False)
    names: dict = field(default_factory=dict, repr=False)

    def __call__(self, x, tape=None):  # [n, in] -> [n, out]
        if tape is None:
            return kernels.linear(x, self.weight, self.bias)
        tape.append(x)
        return ops.linear_forward(x, self.weight, self.bias)

    def backward(self, dy, tape):
        """-> dx. dw and db wait in `pending` for `flush`: a Radial Network runs a block on many small groups of tokens
        in a step, and one GEMM over all of them is much faster than one per group."""
        self.pending.append((dy, tape.pop()))
        return dy @ self.weight

    def flush(self):
        if self.pending:
            dy, x = (np.concatenate(a) for a in zip(*self.pending))
            self.pending = []
            self.grad["weight"] += dy.T @ x
            if self.bias is not None:
                self.grad["bias"] += dy.sum(0)

    @classmethod
    def from_tensors(cls, t: dict, prefix: str):
        """The Linear of tensors `prefix`.weight and .bias (if there) of t, its parameters named after them."""
        return cls(t[prefix + ".weight"], t.get(prefix + ".bias"), names=_names(t, prefix))


@dataclass(eq=False)
class LayerNorm(Module):
    weight: np.ndarray | None  # [E]; None when the config says layer_norm_elementwise_affine = False
    bias: np.ndarray | None
    eps: float = 1e-5
    grad: dict = field(default_factory=dict, repr=False)
    names: dict = field(default_factory=dict, repr=False)

    def __call__(self, x, tape=None):  # [n, E] -> [n, E]
        if tape is None:
            return kernels.layernorm(x, self.weight, self.bias, self.eps)
        y, cache = ops.layernorm_forward(x, self.weight, self.bias, self.eps)
        tape.append(cache)
        return y

    def backward(self, dy, tape):
        dx, dw, db = ops.layernorm_backward(dy, self.weight, tape.pop())
        if self.weight is not None:
            self.grad["weight"] += dw
            self.grad["bias"] += db
        return dx

    @classmethod
    def from_tensors(cls, t: dict, prefix: str, eps: float):
        return cls(t.get(prefix + ".weight"), t.get(prefix + ".bias"), eps, names=_names(t, prefix))


@dataclass(eq=False)
class RMSNorm(Module):
    """Llama's norm: rows scaled to unit root mean square, then by `weight` (no mean, no bias)."""

    weight: np.ndarray  # [E]
    eps: float = 1e-6
    grad: dict = field(default_factory=dict, repr=False)
    names: dict = field(default_factory=dict, repr=False)

    def __call__(self, x, tape=None):  # [n, E] -> [n, E]
        if tape is None:
            return kernels.rmsnorm(x, self.weight, self.eps)
        y, cache = ops.rmsnorm_forward(x, self.weight, self.eps)
        tape.append(cache)
        return y

    def backward(self, dy, tape):
        dx, dw = ops.rmsnorm_backward(dy, self.weight, tape.pop())
        self.grad["weight"] += dw
        return dx


@dataclass(eq=False)
class Embedding(Module):
    """A table of rows looked up by id: [V, E] (possibly half or int8 storage; looked-up rows are float32)."""

    weight: np.ndarray
    grad: dict = field(default_factory=dict, repr=False)
    names: dict = field(default_factory=dict, repr=False)

    def __call__(self, ids, tape=None):  # [n] -> [n, E]
        if tape is not None:
            tape.append(ids)
            return self.weight[ids]
        return kernels.to_float32(self.weight[ids])

    def backward(self, dx, tape):
        self.grad["weight"] += ops.embedding_backward(dx, tape.pop(), len(self.weight))


@dataclass
class Rotary:
    """Rotary position embeddings (Su et al.): each head's query and key pairs rotated by position x frequency."""

    head_dim: int
    theta: float = 10000.0
    table: kernels.RopeTable | None = field(default=None, repr=False)  # every position's angles, made once

    def __call__(self, x, n_head, pos, tape=None):  # [n, H*D], [n] -> [n, H*D]
        if self.table is None:  # one model's attention blocks share this Rotary, so the table is built once
            self.table = kernels.RopeTable(self.head_dim, self.theta)
        cos, sin = self.table(pos)  # [n, D/2] each
        if tape is None:
            return kernels.rope(x, n_head, cos, sin)
        tape.append((n_head, cos.astype(x.dtype), sin.astype(x.dtype)))
        return ops.rotary_forward(x, n_head, cos.astype(x.dtype), sin.astype(x.dtype))

    def backward(self, dy, tape):
        return ops.rotary_backward(dy, *tape.pop())


# -------------------------------------------------------------------------------------------------- blocks


@dataclass
class Rows:
    """What a block needs besides its input rows: where each row comes from. An attention block writes its keys and
    values into `cache` and reads what the cache's policy shows; without a cache it attends among these rows only
    (causal by position, or fully when `pos` is None: ViT)."""

    pos: np.ndarray | None = None  # [n] token positions
    cache: KVCache | None = None
    step: int | np.ndarray = 0  # routing step: the blocks each row's token ran before this one, [n] or one for all
    seq: int | np.ndarray = 0  # the sequence of each row in the cache's batch, [n] or one for all


class Block:
    """y = x + f(x), or LN(x + f(x)) when `pre_norm` is False. Subclasses define `branch` (f) and its backward."""

    kind = "?"

    def __init__(self, layer: int, norm, pre_norm: bool):
        self.layer, self.norm, self.pre_norm = layer, norm, pre_norm

    @property
    def name(self) -> str:
        return f"L{self.layer}.{self.kind}"

    def branch(self, x, rows: Rows, tape=None):  # [n, E] -> f(x) [n, E]
        return self.branch_out(self.branch_in(x, rows, tape), rows, tape)

    def branch_backward(self, df, tape):  # -> dx [n, E]
        return self.branch_in_backward(self.branch_out_backward(df, tape), tape)

    # A branch in two halves, for the walk's rounds (radial.py): every block of a round runs its first half before
    # any runs its second, so that an attention block's queries read the keys every block of the round wrote.

    def branch_in(self, x, rows: Rows, tape=None):
        raise NotImplementedError

    def branch_out(self, h, rows: Rows, tape=None):
        return h

    def branch_in_backward(self, dh, tape):
        raise NotImplementedError

    def branch_out_backward(self, df, tape):
        return df

    def residual(self, x, f, gate=None, tape=None):
        """Join the branch to the residual stream: y = x + p f with p the router's probability of this block [n]
        (a co-trained Radial Network), 1 without a gate; then the norm in post-LN models."""
        y = x + (f if gate is None else gate[:, None] * f)  # [n, E]
        if not self.pre_norm:
            y = self.norm(y, tape)
        if tape is not None:
            tape.append((f, gate))
        return y

    def residual_backward(self, dy, tape):
        """-> dx, df, dgate (None without a gate)."""
        f, gate = tape.pop()
        if not self.pre_norm:
            dy = self.norm.backward(dy, tape)
        if gate is None:
            return dy, dy, None
        return dy, gate[:, None] * dy, (dy * f).sum(-1)

    def __call__(self, x, rows: Rows, gate=None, tape=None):
        return self.residual(x, self.branch(x, rows, tape), gate, tape)

    def backward(self, dy, tape):
        """-> dx and dgate: the forward's steps undone in reverse."""
        dx, df, dgate = self.residual_backward(dy, tape)
        return dx + self.branch_backward(df, tape), dgate

    def modules(self) -> list:
        return [m for m in vars(self).values() if isinstance(m, Module)]

    def __repr__(self):
        return f"<{type(self).__name__} {self.name}>"


class AttentionBlock(Block):
    """Multi-head self-attention. Causal over a KV cache for OPT and Llama; full attention over the image for ViT.
    Llama adds rotary embeddings to queries and keys (the cache stores keys rotated) and grouped-query attention:
    n_kv_head key/value heads, each shared by n_head // n_kv_head query heads."""

    kind = "att"

    def __init__(self, layer, norm, pre_norm, qkv: Linear, out: Linear, n_head: int, n_kv_head=None, rotary=None):
        super().__init__(layer, norm, pre_norm)
        self.qkv, self.out, self.n_head = qkv, out, n_head  # qkv: q, k and v projections stacked, [E + 2Ekv, E]
        self.n_kv_head, self.rotary = n_kv_head or n_head, rotary

    def project_qkv(self, x, pos=None, tape=None):
        """The block's queries, keys and values for rows x at positions `pos` (rotated if the model is rotary);
        also what the `fill` rule caches for skipped tokens."""
        h = self.norm(x, tape) if self.pre_norm else x
        qkv = self.qkv(h, tape)  # [n, E] -> [n, E + 2Ekv]
        kv = (qkv.shape[1] * self.n_kv_head) // (self.n_head + 2 * self.n_kv_head)  # Ekv
        q, k, v = qkv[:, : -2 * kv], qkv[:, -2 * kv : -kv], qkv[:, -kv:]  # -> [n, E], 2 x [n, Ekv]
        if self.rotary is not None:
            q, k = self.rotary(q, self.n_head, pos, tape), self.rotary(k, self.n_kv_head, pos, tape)
        return q, k, np.ascontiguousarray(v)

    def branch_in(self, x, rows: Rows, tape=None):
        """Queries, keys and values; the keys and values stored in the cache (`KVCache.write`)."""
        q, k, v = self.project_qkv(x, rows.pos, tape)
        if rows.cache is None:  # attention among these rows only (the oracle's fill rule, ViT)
            return q, k, v
        return rows.cache.write(self.layer, q, k, v, rows, tape)

    def write_kv(self, x, rows: Rows, tape=None):
        """The `fill` rule of routed execution (radial.py): rows x that skip this block still write their keys and
        values into the cache, projected from the state passing by (a skipped block leaves it unchanged), so that
        later tokens attend to them as if they had run it. Only the key and value rows of the stacked projection
        are multiplied (a quarter of the block's weights in SmolLM2: 2 x 576 x 192 of 576 x 960 + 576 x 576); with a
        tape, the block's whole first half, whose backward (`write_kv_backward`) gives the weights their gradient."""
        if tape is not None:
            q = self.branch_in(x, rows, tape)[0]
            tape.append((q.shape, q.dtype))
            return
        kv = self.kv_projection()
        if kv is None:  # the key/value rows cannot be cut out as stored: project all three
            _, k, v = self.project_qkv(x, rows.pos)
        else:
            h = self.norm(x) if self.pre_norm else x
            kvs = kv(h)  # [n, E] -> [n, 2Ekv]
            half = kvs.shape[1] // 2
            k, v = kvs[:, :half], np.ascontiguousarray(kvs[:, half:])
            if self.rotary is not None:
                k = self.rotary(k, self.n_kv_head, rows.pos)
        rows.cache.write(self.layer, np.empty((len(x), 0), k.dtype), k, v, rows)  # no query: the policy's encode
        # is the identity under per-layer, the only policy with this rule

    def write_kv_backward(self, tape):  # -> dx
        shape, dtype = tape.pop()
        return self.branch_in_backward(np.zeros(shape, dtype), tape)

    def kv_projection(self):
        """A Linear of the key and value rows of the stacked projection, sharing its storage (made once), or None
        when they cannot be cut out as stored (`row_slice`)."""
        if not hasattr(self, "_kv"):
            total = self.qkv.weight.shape[0]
            lo = total - 2 * (total * self.n_kv_head // (self.n_head + 2 * self.n_kv_head))
            w = row_slice(self.qkv.weight, lo, total)
            b = None if self.qkv.bias is None else self.qkv.bias[lo:]
            self._kv = None if w is None else Linear(w, b)
        return self._kv

    def branch_out(self, h, rows: Rows, tape=None):
        """Each query reads what the cache's policy shows it (`KVCache.read`), then the output projection."""
        if rows.cache is None:
            a = kernels.attention(*h, self.n_head, rows.pos, rows.pos, None, self.n_kv_head)
        else:
            a = rows.cache.read(h, tape)
        return self.out(a, tape)  # [n, E] -> [n, E]

    def branch_out_backward(self, df, tape):  # -> dq
        return read_backward(self.out.backward(df, tape), tape)

    def branch_in_backward(self, dq, tape):
        dk, dv = write_backward(tape)
        if self.rotary is not None:
            dk, dq = self.rotary.backward(dk, tape), self.rotary.backward(dq, tape)
        dh = self.qkv.backward(np.concatenate([dq, dk, dv], axis=1), tape)
        return self.norm.backward(dh, tape) if self.pre_norm else dh

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
    `gate` is given: fc2(silu(gate(x)) * fc1(x)), with fc1 as the "up" and fc2 as the "down" projection."""

    kind = "ffn"

    def __init__(self, layer, norm, pre_norm, fc1: Linear, fc2: Linear, act: str, gate: Linear | None = None):
        super().__init__(layer, norm, pre_norm)
        self.fc1, self.fc2, self.act, self.gate = fc1, fc2, act, gate

    def branch_in(self, x, rows: Rows = None, tape=None):
        h = self.norm(x, tape) if self.pre_norm else x
        if tape is None and self.gate is None:
            a = kernels.activation(self.act, self.fc1(h))  # [n, E] -> [n, F]
        elif tape is None and self.act == "silu" and self.gate.bias is None and self.fc1.bias is None:
            a = kernels.gate_up_silu(h, self.gate.weight, self.fc1.weight)  # [n, E] -> [n, F], one call
        elif tape is None:
            a = kernels.activation(self.act, self.gate(h)) * self.fc1(h)  # [n, E] -> [n, F]
        elif self.gate is None:
            a, u = ops.activation_forward(self.act, self.fc1(h, tape))
            tape.append(u)
        else:
            a, cache = ops.swiglu_forward(self.gate(h, tape), self.fc1(h, tape))
            tape.append(cache)
        return self.fc2(a, tape)  # [n, F] -> [n, E]

    def branch_in_backward(self, df, tape):
        da = self.fc2.backward(df, tape)
        if self.gate is None:
            dh = self.fc1.backward(ops.activation_backward(self.act, da, tape.pop()), tape)
        else:
            dg, du = ops.swiglu_backward(da, tape.pop())
            dh = self.fc1.backward(du, tape)
            dh += self.gate.backward(dg, tape)
        return self.norm.backward(dh, tape) if self.pre_norm else dh


def row_slice(w, lo: int, hi: int):
    """Rows lo:hi of a weight matrix [out, in] as it is stored, sharing its memory: a view of a float array, of an
    Int8Matrix's values and scales, or of a GGUF block matrix's row groups when lo and hi fall on group edges
    (quant.GROUP_ROWS); None otherwise."""
    if isinstance(w, BlockMatrix):
        G = w.q.shape[-1]
        if lo % G or (hi % G and hi != w.shape[0]):
            return None
        cut = slice(lo // G, -(-hi // G))
        offset = None if w.offset is None else w.offset[cut]
        return BlockMatrix(w.kind, (hi - lo, w.shape[1]), w.q[cut], w.scale[cut], offset)
    return w[lo:hi]  # an ndarray, or an Int8Matrix (its __getitem__ cuts values and scales alike)


def run_block(i, block, x, rows: Rows, observe=None, gate=None, tape=None):
    """Block i on rows x: its branch, its residual add (the branch scaled by `gate` [n] if given), and the observer
    told. The observe contract, shared by every walk over the blocks (radial.RadialNetwork's, the oracle's
    `run_sequence`): `observe(i, block, x, f, y)` sees block i's input rows x, their branch f and the output y the
    walk goes on with (the oracle passes y = x for rows that skip the block); an observer with a `begin(x)` method
    is told first when new rows [n, E] enter the blocks. Blocks a walk does not visit are not observed."""
    f = block.branch(x, rows, tape)  # [n, E]
    y = block.residual(x, f, gate, tape)  # [n, E]
    if observe is not None:
        observe(i, block, x, f, y)
    return y


def begin(observe, x):
    """Tell an observer that rows x (just embedded) start a walk over the blocks, if it wants to know."""
    start = getattr(observe, "begin", None)
    if start is not None:
        start(x)
