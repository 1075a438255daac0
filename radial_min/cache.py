"""The KV cache: every key/value pair an executed attention block wrote, and the rule for which a query reads.

One cache serves the sequential model and the Radial Network, generation and training (paper, Sec. 5.2: when
tokens skip and reuse blocks, per-layer caches have holes and no fixed shape, so the Radial Network keeps one
*unified* cache of whatever was written). Each entry is tagged with its token's position and its routing step (how
many blocks the token had run before this one), and goes into the partition its cache policy names:

- per-layer (the paper's per-block policy): a partition per layer, the entries written by that layer's attention
  block. With nothing skipped this is the sequential model's cache; with skips it is the oracle's `drop` rule (a
  token that skipped a layer offers no keys there).
- per-step: a partition per routing step, whichever block wrote the entry (Mixture-of-Recursions' recursion-wise
  caching): step s of a token reads step s of the tokens before it, and its own.
- global: one partition, every entry so far. Entries of different steps are told apart by a sinusoidal encoding of
  the step added to keys and queries, so q.k gains a term PE(s_q).PE(s_k) that is largest for equal steps. A model
  trained sequentially never learned this mixing; it is meant for networks trained with it (train --radial).

The visibility rule is one for every policy: a query at (position p, step s) reads the entries of its partition
whose (position, step) is at most (p, s), in that order: every earlier token's entries, and its own entries of
earlier steps (and the one it just wrote). Entries are stored in that order, as `order_key(pos, step)`, so what a
query reads is a prefix of its partition: the attention kernels count it by binary search. The order holds however
the walk batches its tokens (radial.py: token by token, a routing step of every token at once, or a block of every
token at once), so every batch order that the policy allows gives each token the same keys.

A cache has a batch axis (B sequences, for training and evaluation; 1 in generation) and, when made for training, a
backward: the gradients of its entries accumulate as queries are differentiated, in reverse order of the walk.

An inference cache may keep its keys and values in half precision (`kv_dtype="float16"`, as llama.cpp does by
default): half the memory (SmolLM2-135M, 512 tokens: 11.8 MB instead of 23.6), each entry rounded once to float16
(relative error <= 2^-11) and widened back to float32 as the attention kernels read it. The default is float32,
exact against the references.
"""

import numpy as np

from . import kernels, ops

KV_DTYPES = ("float32", "float16")
STEP_BITS = 16  # order_key: the routing step in the low 16 bits (router.MAX_PASSES * n_blocks stays below)


def order_key(pos, step):
    """Entries' order within a partition, and a query's bound: position first, then routing step. [n] -> [n]
    (positions are int64 arrays; the step an int, or one per row)."""
    return (pos << STEP_BITS) | step


def step_encoding(step: int, width: int) -> np.ndarray:
    """The sinusoidal encoding of Vaswani et al. for one step index: sin at even, cos at odd dims, [width]."""
    angle = step / 10000.0 ** (np.arange(0, width, 2) / width)
    pe = np.empty(width, np.float32)
    pe[0::2], pe[1::2] = np.sin(angle), np.cos(angle)[: width // 2]
    return pe


# ------------------------------------------------------------------------------------------------ policies


class PerLayer:
    """A partition per layer: a query reads the entries its own layer wrote."""

    name = "per-layer"

    def partition(self, layer: int, step: int) -> int:
        return layer

    def encode(self, q, k, step, n_kv_head):
        return q, k


class PerStep(PerLayer):
    """A partition per routing step: a query reads the entries written at its own step, by any block."""

    name = "per-step"

    def partition(self, layer: int, step: int) -> int:
        return step


class Global(PerLayer):
    """One partition: a query reads every entry so far, keys and queries carrying a sinusoidal code of their step."""

    name = "global"

    def __init__(self, scale: float = 1.0):
        self.scale, self.table = scale, np.zeros((0, 0), np.float32)

    def partition(self, layer: int, step: int) -> int:
        return 0

    def code(self, step, width: int) -> np.ndarray:
        """scale * step_encoding(step) for a step ([width]) or each of several steps ([n] -> [n, width]), from a
        table made once for the steps seen so far."""
        top = int(np.max(step)) + 1
        if self.table.shape[1] != width or len(self.table) < top:
            self.table = np.stack([self.scale * step_encoding(s, width) for s in range(max(top, 2 * len(self.table)))])
        return self.table[step]

    def encode(self, q, k, step, n_kv_head):
        """q + code, k + code of each row's step (constants: the backward passes gradients through unchanged).
        Under grouped-query attention each query head gets its key/value head's code."""
        if not self.scale:
            return q, k
        enc = self.code(step, k.shape[1]).astype(k.dtype, copy=False).reshape(-1, n_kv_head, k.shape[1] // n_kv_head)
        group = q.shape[1] // k.shape[1]  # [1 or n, Hkv, D]: one step for every row, or one per row
        return q + np.repeat(enc, group, axis=1).reshape(len(enc), -1), k + enc.reshape(len(enc), -1)


POLICIES = {"per-layer": PerLayer, "per-block": PerLayer, "per-step": PerStep, "global": Global}


def make_policy(name: str, step_encoding_scale: float = 1.0):
    if name not in POLICIES:
        raise ValueError(f"cache policy must be one of {', '.join(POLICIES)}, got {name!r}")
    return Global(step_encoding_scale) if name == "global" else POLICIES[name]()


# ---------------------------------------------------------------------------------------------- the store


class _Entries:
    """One partition: per sequence, its entries in order, head-major [B, Hkv, cap, D] so attention reads each head's
    keys contiguously, their order keys [B, cap] and counts [B]; capacity doubles when full. For training also the
    keys and values transposed, [B, Hkv, D, cap] (the kernels' dot products sweep over the entries), and the
    entries' gradients. `dtype` uint16: keys and values kept as float16 bits (inference only)."""

    def __init__(self, batch, n_kv_head, d_head, dtype, train, capacity):
        self.train = train
        self.k = np.zeros((batch, n_kv_head, capacity, d_head), dtype)  # zeros: unwritten entries are finite
        self.v = np.zeros_like(self.k)
        self.kt = self.vt = None
        if train:
            self.kt, self.vt = (np.zeros((batch, n_kv_head, d_head, capacity), dtype) for _ in "kv")
        self.keys = np.zeros((batch, capacity), np.int64)
        self.count = np.zeros(batch, np.int64)
        self.dk = self.dv = None
        self.read_to = np.full(batch, -1, np.int64)  # training: per sequence, the largest order key a query read

    def reserve(self, need: int):
        cap = self.k.shape[2]
        if need <= cap:
            return
        cap = max(need, 2 * cap)
        n = int(self.count.max())
        for name, axis in (("k", 2), ("v", 2), ("kt", 3), ("vt", 3), ("keys", 1)):
            a = getattr(self, name)
            if a is not None:
                shape = list(a.shape)
                shape[axis] = cap
                grown = np.zeros(shape, a.dtype)
                index = (slice(None),) * axis + (slice(0, n),)
                grown[index] = a[index]
                setattr(self, name, grown)

    def append(self, seq, keys, k, v):
        """Entries k, v [n, Hkv, D] of sequences seq [n] with order keys [n], each put in its place in its sequence's
        key order. Entries almost always come after those stored (then they are appended); a round of the walk
        in which several blocks write one partition (per-step) may interleave them (then they are merged in).
        In training, an entry whose key is at most that of a query already read from this partition is refused:
        that query should have seen it (the visibility rule) but did not, and the backward, which recomputes each
        query's weights over what it sees then, would weigh it with the forward's normaliser (weights above 1,
        overflow): the walk's order is not exact for the cache policy."""
        if self.k.dtype == np.uint16:  # a half-precision cache: rounded once, here
            k, v = (a.astype(np.float16).view(np.uint16) for a in (k, v))
        if self.train and (np.asarray(keys) <= self.read_to[seq]).any():
            raise ValueError(
                "KV cache: an entry written after a query that should see it had read (the walk's order is not "
                "exact for this cache policy, e.g. blocks reused pass after pass under per-layer: use per-step)"
            )
        if len(self.count) == 1:  # one sequence (generation): the entries follow on, written as a slice
            n, m = int(self.count[0]), len(k)
            self.reserve(n + m)
            in_order = (n == 0 or keys[0] > self.keys[0, n - 1]) and (m == 1 or (np.diff(keys) > 0).all())
            self.k[0, :, n : n + m], self.v[0, :, n : n + m] = k.transpose(1, 0, 2), v.transpose(1, 0, 2)
            self.keys[0, n : n + m] = keys
            if self.train:
                self.kt[0, :, :, n : n + m], self.vt[0, :, :, n : n + m] = k.transpose(1, 2, 0), v.transpose(1, 2, 0)
            self.count[0] += m
        else:
            new = np.bincount(seq, minlength=len(self.count))
            first = np.cumsum(new) - new  # where each sequence's rows start in seq's stable order
            order = np.argsort(seq, kind="stable")
            rank = np.empty(len(seq), np.int64)
            rank[order] = np.arange(len(seq)) - np.repeat(first, new)
            slots = self.count[seq] + rank
            self.reserve(int(np.max(self.count + new)))
            last = np.where(self.count > 0, self.keys[np.arange(len(self.count)), np.maximum(self.count - 1, 0)], -1)
            s, kk = seq[order], keys[order]
            in_order = (keys > last[seq]).all() and not ((s[1:] == s[:-1]) & (kk[1:] <= kk[:-1])).any()
            self.count += new
            self.k[seq, :, slots], self.v[seq, :, slots], self.keys[seq, slots] = k, v, keys
            if self.train:
                self.kt[seq, :, :, slots], self.vt[seq, :, :, slots] = k, v
        if not in_order:
            for b in np.unique(seq):
                self._sort(b)

    def _sort(self, b):
        """Sequence b's entries back in key order (a stable sort)."""
        n = int(self.count[b])
        order = np.argsort(self.keys[b, :n], kind="stable")
        self.keys[b, :n] = self.keys[b, order]
        self.k[b, :, :n], self.v[b, :, :n] = (
            self.k[b, :, order].transpose(1, 0, 2),
            self.v[b, :, order].transpose(1, 0, 2),
        )
        if self.train:
            self.kt[b, :, :, :n], self.vt[b, :, :, :n] = (
                self.kt[b, :, :, order].transpose(1, 2, 0),
                self.vt[b, :, :, order].transpose(1, 2, 0),
            )

    def slots(self, seq, keys):
        """Where the entries of (sequence, key) are now: [n]."""
        out = np.empty(len(seq), np.int64)
        for b in np.unique(seq):
            mine = seq == b
            out[mine] = np.searchsorted(self.keys[b, : self.count[b]], keys[mine])
        return out

    @property
    def nbytes(self) -> int:
        """Bytes of the entries in use: keys, values and one order key each."""
        return int(self.count.sum()) * (2 * self.k.shape[1] * self.k.shape[3] * self.k.itemsize + 8)


class KVCache:
    """The entries of every attention block run so far, in partitions by policy; see the module doc.

    `n_tokens` counts the tokens each sequence has consumed (generation continues from there). `kv_dtype` "float16"
    keeps keys and values in half precision (inference only: training differentiates them in float32)."""

    def __init__(self, policy, n_kv_head, head_dim, batch=1, train=False, capacity=64, kv_dtype="float32"):
        if kv_dtype not in KV_DTYPES or train and kv_dtype != "float32":
            raise ValueError(f"kv_dtype must be one of {', '.join(KV_DTYPES)} (float32 for training), got {kv_dtype!r}")
        self.policy = make_policy(policy) if isinstance(policy, str) else policy
        self.n_kv_head, self.head_dim, self.batch, self.train = n_kv_head, head_dim, batch, train
        self.capacity, self.parts, self.n_tokens, self.kv_dtype = capacity, {}, 0, kv_dtype

    def entries(self, key: int, dtype) -> _Entries:
        if key not in self.parts:
            dtype = np.uint16 if self.kv_dtype == "float16" else dtype
            self.parts[key] = _Entries(self.batch, self.n_kv_head, self.head_dim, dtype, self.train, self.capacity)
        return self.parts[key]

    def write(self, layer: int, q, k, v, rows, tape=None):
        """Store layer `layer`'s keys and values [n, Hkv*D] for `rows` (blocks.Rows: each row's sequence, position and
        routing step) in the partition the policy names. -> what `read` needs: the queries [n, H*D] (with the
        global policy's step code), the partition, and the rows' sequences and order keys. The rows of one call
        fall in one partition (the walk's rounds see to it)."""
        if isinstance(rows.step, (int, np.integer)):  # one step for every row (the sequential model, decode)
            part = self.policy.partition(layer, int(rows.step))
        else:
            parts = {self.policy.partition(layer, int(s)) for s in np.unique(rows.step)}
            if len(parts) > 1:
                raise ValueError(
                    f"KVCache.write: rows of steps {sorted(set(rows.step.tolist()))} fall in several partitions"
                )
            part = parts.pop()
        q, k = self.policy.encode(q, k, rows.step, self.n_kv_head)
        store = self.entries(part, q.dtype)
        n, D = len(q), self.head_dim
        keys = order_key(rows.pos, rows.step)
        seq = 0 if self.batch == 1 and tape is None else np.broadcast_to(np.asarray(rows.seq, np.int64), (n,))
        store.append(seq, keys, k.reshape(n, -1, D), v.reshape(n, -1, D))
        if tape is not None:
            tape.append((store, seq, keys))
        return q, store, seq, keys

    def read(self, written, tape=None):
        """Each query reads the entries of its partition that it sees (module doc) -> [n, H*D]: the fast inference
        kernels (kernels.attention, one sequence at a time), or with a tape the training kernels (ops.py)."""
        q, store, seq, keys = written
        n, D = len(q), self.head_dim
        if tape is not None:
            np.maximum.at(store.read_to, seq, keys)  # later entries must come after every key read (append)
            qh = np.ascontiguousarray(q.reshape(n, -1, D))
            y, lse = ops.attention_forward(qh, store, seq, keys)
            tape.append((qh, store, seq, keys, y, lse))
            return y.reshape(n, -1)
        H = q.shape[1] // D
        if self.batch == 1:
            count = int(store.count[0])
            return kernels.attention(q, store.k[0], store.v[0], H, keys, store.keys[0, :count], None, self.n_kv_head)
        out = np.empty_like(q)
        for b in np.unique(seq):
            mine, count = np.flatnonzero(seq == b), int(store.count[b])
            out[mine] = kernels.attention(
                np.ascontiguousarray(q[mine]), store.k[b], store.v[b], H, keys[mine], store.keys[b, :count], None,
                self.n_kv_head,
            )  # fmt: skip
        return out

    def __len__(self) -> int:
        return int(sum(p.count.sum() for p in self.parts.values()))

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts.values())


def read_backward(da, tape):
    """The backward of `KVCache.read`: -> dq [n, H*D]; the gradients of the entries read are added into their
    partition (dk, dv), to be collected by `write_backward`."""
    qh, store, seq, keys, y, lse = tape.pop()
    if store.dk is None:
        store.dk, store.dv = np.zeros_like(store.k), np.zeros_like(store.v)
    return ops.attention_backward(np.ascontiguousarray(da.reshape(qh.shape)), qh, store, seq, keys, y, lse).reshape(
        len(qh), -1
    )


def write_backward(tape):
    """The backward of `KVCache.write`: the complete gradients dk, dv [n, Hkv*D] of the entries that call wrote.
    Complete once every query that reads them has been differentiated: the queries of the same round (the walk
    differentiates a round's reads before its writes) and of later rounds (the backward visits rounds in reverse)."""
    store, seq, keys = tape.pop()
    slots = store.slots(seq, keys)
    if store.dk is None:  # nothing read them (cannot happen: a query reads its own entry), zeros
        store.dk, store.dv = np.zeros_like(store.k), np.zeros_like(store.v)
    n = len(seq)
    return store.dk[seq, :, slots].reshape(n, -1), store.dv[seq, :, slots].reshape(n, -1)


def dense_cache_bytes(n_layer: int, n_tokens: int, width: int) -> int:
    """What a sequential per-layer cache holds for the same tokens: every layer, every token, one key each."""
    return n_layer * n_tokens * (2 * width * 4 + 8)
