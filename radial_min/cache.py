"""Key/value caches for incremental decoding.

`KVCache` is the sequential model's cache: one store per layer, each row tagged with its token position, so a
layer may hold fewer rows than there are tokens (a token that skipped the layer leaves a hole, and attention
masks by position, not by row index).

`UnifiedKVCache` is the Radial Network's (paper, Sec. 5.2): when tokens skip and reuse blocks, per-layer
caches have holes and no fixed shape, so every key/value pair any executed attention block writes goes into one
global store, tagged with (token position, layer, routing step). Memory grows with the attention blocks
actually run, not with layers x tokens. A query chooses what it sees by a named policy:

- per-layer: the entries written by the same layer (the paper's per-block policy: a layer has one attention
  block, and only attention blocks write). With nothing skipped this is exactly the sequential cache; with skips
  it is the oracle's `drop` rule (a token that skipped a layer offers no keys there).
- per-step: the entries written at the same routing step, whichever block wrote them (Mixture-of-Recursions'
  recursion-wise caching): step s of a token reads step s of the tokens before it, and its own.
- global: every entry so far, i.e. all previous tokens' entries and the current token's earlier steps.
  Entries from different steps are told apart by a sinusoidal encoding of the step added to keys and
  queries, so q.k gains a term PE(s_q).PE(s_k) that is largest for equal steps. A model trained sequentially
  never learned this mixing; the policy is meant for networks trained with it (radial_train.py).
"""

import numpy as np

POLICIES = ("per-layer", "per-step", "global")


class _Rows:
    """Growable key and value tables, head-major [H, capacity, D] so attention reads each head's keys
    contiguously, plus int64 tags per row; capacity doubles when full."""

    def __init__(self, width: int, n_head: int, tags=("pos",), capacity: int = 64):
        self.n_head, self.d_head = n_head, width // n_head
        self.k = np.empty((n_head, capacity, self.d_head), np.float32)
        self.v = np.empty_like(self.k)
        self.tags = {t: np.empty(capacity, np.int64) for t in tags}
        self.n = 0

    def reserve(self, need: int):
        """Room for `need` rows in all (one copy, instead of doublings each copying everything so far)."""
        if need > self.k.shape[1]:
            cap = max(need, 2 * self.k.shape[1])
            self.k, self.v = _grow(self.k, self.n, cap, axis=1), _grow(self.v, self.n, cap, axis=1)
            self.tags = {t: _grow(a, self.n, cap) for t, a in self.tags.items()}

    def append(self, k, v, **tags):  # [T, E], [T, E], each tag [T] or a scalar
        T = len(k)
        need = self.n + T
        self.reserve(need)
        self.k[:, self.n : need] = k.reshape(T, self.n_head, self.d_head).transpose(1, 0, 2)
        self.v[:, self.n : need] = v.reshape(T, self.n_head, self.d_head).transpose(1, 0, 2)
        for t, value in tags.items():
            self.tags[t][self.n : need] = value
        self.n = need

    def tag(self, name):
        return self.tags[name][: self.n]

    def view(self):
        """Keys and values as stored, [H, capacity, D] (the first n valid), and the n positions."""
        return self.k, self.v, self.tag("pos")

    @property
    def nbytes(self) -> int:
        """Bytes held by the rows in use: keys, values and tags."""
        return self.n * (2 * self.n_head * self.d_head * 4 + 8 * len(self.tags))


def _grow(a, n, cap, axis=0):
    shape = list(a.shape)
    shape[axis] = cap
    grown = np.empty(shape, a.dtype)
    index = (slice(None),) * axis + (slice(0, n),)
    grown[index] = a[index]
    return grown


class KVCache:
    """One key/value store per layer. `n_tokens` counts the tokens the model has consumed so far."""

    def __init__(self, n_layer: int, width: int, n_head: int):
        self.layers = [_Rows(width, n_head) for _ in range(n_layer)]
        self.n_tokens = 0

    def update(self, layer: int, q, k, v, pos, hop: int = 0):
        """Store the new rows of `layer`. Returns what the query attends to: (query, key storage, value storage,
        key positions, rows), where rows = None means the first len(positions) rows of the storage."""
        rows = self.layers[layer]
        rows.append(k, v, pos=pos)
        return (q, *rows.view(), None)

    @property
    def nbytes(self) -> int:
        """Bytes of keys, values and position tags actually held (not capacity)."""
        return sum(r.nbytes for r in self.layers)


def step_encoding(hop: int, width: int) -> np.ndarray:
    """The sinusoidal encoding of Vaswani et al. for one step index: sin at even, cos at odd dims, [width]."""
    angle = hop / 10000.0 ** (np.arange(0, width, 2) / width)
    pe = np.empty(width, np.float32)
    pe[0::2], pe[1::2] = np.sin(angle), np.cos(angle)[: width // 2]
    return pe


class UnifiedKVCache:
    """One global store of every key/value pair written, tagged (position, layer, step); see the module doc."""

    def __init__(self, width: int, n_head: int, policy: str = "per-layer", step_encoding_scale: float = 1.0):
        if policy not in POLICIES:
            raise ValueError(f"cache policy must be one of {POLICIES}, got {policy!r}")
        self.width, self.policy, self.scale = width, policy, step_encoding_scale
        self.rows = _Rows(width, n_head, tags=("pos", "layer", "hop"))
        self.views = {}  # layer (per-layer) or step (per-step) -> (growable int64 array of entry indices, count)
        self.n_tokens = 0

    def update(self, layer: int, q, k, v, pos, hop: int = 0):
        if self.policy == "global" and self.scale:
            enc = self.scale * step_encoding(hop, self.width)  # [Ekv]
            group = q.shape[1] // k.shape[1]  # grouped-query: each query head gets its key/value head's encoding
            q, k = q + np.repeat(enc.reshape(self.rows.n_head, -1), group, axis=0).reshape(-1), k + enc
        first = self.rows.n
        self.rows.append(k, v, pos=pos, layer=layer, hop=hop)
        if self.policy == "global":  # tokens arrive in order, so everything stored is visible
            return (q, *self.rows.view(), None)
        key = layer if self.policy == "per-layer" else hop  # the view this query reads, kept as entries arrive
        index, n = self.views.get(key, (np.empty(16, np.int64), 0))
        if n + len(pos) > len(index):
            index = _grow(index, n, max(2 * len(index), n + len(pos)))
        index[n : n + len(pos)] = np.arange(first, self.rows.n)
        n += len(pos)
        self.views[key] = (index, n)
        return q, self.rows.k, self.rows.v, self.rows.tag("pos")[index[:n]], index[:n]

    def reserve(self, n_more: int):
        """Room for n_more entries beyond those stored (a prompt's tokens x attention blocks, say)."""
        self.rows.reserve(self.rows.n + n_more)

    def __len__(self) -> int:
        return self.rows.n

    @property
    def nbytes(self) -> int:
        """Keys and values plus three int64 tags per entry."""
        return self.rows.nbytes


def dense_cache_bytes(n_layer: int, n_tokens: int, width: int) -> int:
    """What a sequential per-layer cache holds for the same tokens: every layer, every token."""
    return n_layer * n_tokens * (2 * width * 4 + 8)
