"""Storage dtypes and their conversions, at the bottom of the import graph (NumPy only, imports nothing of ours).

NumPy has no bfloat16, so bfloat16 weights are kept as their raw 16 bits in uint16 arrays. Every module that
widens or narrows weights (checkpoint, torch_pickle, kernels, loading) uses these three functions.
"""
import numpy as np

STORAGE_DTYPES = ("float32", "float16", "bfloat16")


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 is the top half of a float32: shift the 16 stored bits up and reinterpret."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def to_float32(w: np.ndarray) -> np.ndarray:
    """Weights in any storage dtype as float32: uint16 arrays are bfloat16 bits, anything else is cast."""
    if w.dtype == np.uint16:
        return bf16_to_float32(w)
    return w.astype(np.float32, copy=False)


def to_storage(w: np.ndarray, dtype: str) -> np.ndarray:
    """float32 weights in the storage dtype: "float32", "float16", or "bfloat16" (uint16 bits, rounded to nearest)."""
    if dtype == "float32":
        return w.astype(np.float32, copy=False)
    if dtype == "float16":
        return w.astype(np.float16)
    if dtype == "bfloat16":  # round half to even, a million values at a time (no full-size temporaries)
        bits = np.ascontiguousarray(w, dtype=np.float32).reshape(-1).view(np.uint32)
        out = np.empty(bits.size, np.uint16)
        for i in range(0, bits.size, 1 << 20):
            b = bits[i : i + (1 << 20)]
            out[i : i + len(b)] = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        return out.reshape(w.shape)
    raise ValueError(f"weights dtype must be float32, float16 or bfloat16, got {dtype!r}")
