"""Storage dtypes and their conversions, at the bottom of the import graph (NumPy, and errors.py for its message).

NumPy has no bfloat16, so bfloat16 weights are kept as their raw 16 bits in uint16 arrays. int8 weights are an
`Int8Matrix`: int8 values and one float32 scale per row. Every module that widens or narrows weights
(checkpoint, torch_pickle, kernels, loading) uses the functions here.
"""

import numpy as np

from . import quant
from .errors import SettingError

STORAGE_DTYPES = ("float32", "float16", "bfloat16", "int8", "native")  # native: as stored; cli.py takes [:2]
_CHUNK = 1 << 20  # elements converted at a time: no full-size temporaries while loading


class Int8Matrix:
    """A weight matrix [out, in] in 8 bits: symmetric, one scale per output row (channel),

        w[n, k] ~= q[n, k] * scale[n],    scale[n] = max_k |w[n, k]| / 127,    q = round(w / scale) in [-127, 127]

    so the largest weight of each row is exact and every other is within scale / 2. Rows of it (an embedding
    lookup) are again an Int8Matrix. The kernels dequantize inside their loops (kernels.matvec, kernels.matmul)."""

    def __init__(self, q: np.ndarray, scale: np.ndarray):
        self.q, self.scale = q, scale  # [out, in] int8, [out] float32

    @classmethod
    def quantize(cls, w: np.ndarray) -> "Int8Matrix":
        if w.ndim != 2:
            raise ValueError(f"int8 weights are [out, in] matrices, got shape {list(w.shape)}")
        q, scale = np.empty(w.shape, np.int8), np.empty(len(w), np.float32)
        step = max(1, _CHUNK // max(1, w.shape[1]))
        for i in range(0, len(w), step):
            rows = np.asarray(w[i : i + step], np.float32)
            s = np.abs(rows).max(axis=1) / np.float32(127)
            s[s == 0] = 1  # an all-zero row: any scale reproduces it
            q[i : i + step] = np.clip(np.rint(rows / s[:, None]), -127, 127)
            scale[i : i + step] = s
        return cls(q, scale)

    def dequantize(self) -> np.ndarray:
        return self.q.astype(np.float32) * self.scale[:, None]  # [out, in]

    def __getitem__(self, rows):
        return Int8Matrix(self.q[rows], self.scale[rows])

    @property
    def shape(self):
        return self.q.shape

    @property
    def size(self) -> int:
        return self.q.size

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scale.nbytes


def stack_rows(mats: list):
    """Matrices stacked along their rows (the q, k, v projections into one): per-row scales stack with them. Kept
    as they are stored when all are stored alike; else (a GGUF file may mix formats) widened to float32."""
    kinds = {(type(m), getattr(m, "kind", None), getattr(m, "dtype", None)) for m in mats}
    if len(kinds) > 1:
        return np.concatenate([to_float32(m) for m in mats])
    if isinstance(mats[0], quant.BlockMatrix):
        return quant.stack_rows(mats)
    if isinstance(mats[0], Int8Matrix):
        return Int8Matrix(np.concatenate([m.q for m in mats]), np.concatenate([m.scale for m in mats]))
    return np.concatenate(mats)


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 is the top half of a float32: shift the 16 stored bits up and reinterpret."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def to_float32(w) -> np.ndarray:
    """Weights in any storage dtype as float32: uint16 arrays are bfloat16 bits, an Int8Matrix or a GGUF block
    matrix (quant.BlockMatrix) is dequantized,
    anything else is cast."""
    if isinstance(w, (Int8Matrix, quant.BlockMatrix)):
        return w.dequantize()
    if w.dtype == np.uint16:
        return bf16_to_float32(w)
    return w.astype(np.float32, copy=False)


def check_storage_dtype(dtype: str) -> None:
    if dtype not in STORAGE_DTYPES:
        raise SettingError(f"weights dtype must be one of {', '.join(STORAGE_DTYPES)}, got {dtype!r}")


def to_storage(w: np.ndarray, dtype: str):
    """float32 weights in the storage dtype: "float32", "float16", "bfloat16" (uint16 bits, rounded to nearest),
    or "int8" (an Int8Matrix; 2-D only). ("native" is decided per tensor by the loader, from the file.)"""
    check_storage_dtype(dtype)
    if dtype in ("float32", "native"):
        return w.astype(np.float32, copy=False)
    if dtype == "float16":
        return w.astype(np.float16)
    if dtype == "int8":
        return Int8Matrix.quantize(w)
    bits = np.ascontiguousarray(w, dtype=np.float32).reshape(-1).view(np.uint32)  # bfloat16: round half to even
    out = np.empty(bits.size, np.uint16)
    for i in range(0, bits.size, _CHUNK):
        b = bits[i : i + _CHUNK]
        out[i : i + len(b)] = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    return out.reshape(w.shape)
