"""Key/value caches for incremental decoding.

`KVCache` is the sequential model's cache: one store per layer, each row tagged with its token position, so a
layer may hold fewer rows than there are tokens (a token that skipped the layer under the oracle's `drop` rule
leaves a hole, and attention masks by position, not by row index).
"""
import numpy as np


class _Rows:
    """A growable [n, width] float32 table plus an int64 tag per row; capacity doubles when full."""

    def __init__(self, width: int, capacity: int = 64):
        self.k = np.empty((capacity, width), np.float32)
        self.v = np.empty((capacity, width), np.float32)
        self.pos = np.empty(capacity, np.int64)
        self.n = 0

    def append(self, k, v, pos):  # [T, E], [T, E], [T]
        need = self.n + len(pos)
        if need > len(self.pos):
            cap = max(need, 2 * len(self.pos))
            for name in ("k", "v"):
                grown = np.empty((cap, self.k.shape[1]), np.float32)
                grown[: self.n] = getattr(self, name)[: self.n]
                setattr(self, name, grown)
            grown = np.empty(cap, np.int64)
            grown[: self.n] = self.pos[: self.n]
            self.pos = grown
        self.k[self.n : need], self.v[self.n : need], self.pos[self.n : need] = k, v, pos
        self.n = need

    def view(self):
        return self.k[: self.n], self.v[: self.n], self.pos[: self.n]  # [n, E], [n, E], [n]

    @property
    def nbytes(self) -> int:
        return self.n * (2 * self.k.shape[1] * 4 + 8)


class KVCache:
    """One key/value store per layer. `n_tokens` counts the tokens the model has consumed so far."""

    def __init__(self, n_layer: int, width: int):
        self.layers = [_Rows(width) for _ in range(n_layer)]
        self.n_tokens = 0

    def update(self, layer: int, k, v, pos):
        """Store the new rows of `layer`, return every row it holds: keys, values, positions."""
        rows = self.layers[layer]
        rows.append(k, v, pos)
        return rows.view()

    @property
    def nbytes(self) -> int:
        """Bytes of keys, values and position tags actually held (not capacity)."""
        return sum(r.nbytes for r in self.layers)
