"""llama.cpp's block-quantized weight matrices (GGUF's Q4_0, Q4_1, Q4_K, Q8_0, Q6_K) kept quantized in memory.

Every GGUF format stores a row of weights as blocks: a few bits per weight and, per block of 16 or 32 weights, a
scale (and for some an offset), so that w = scale * q + offset. Decoding them all comes down to two shapes:

    4-bit (Q4_0, Q4_1, Q4_K):  q in 0..15, two per byte,   w = scale * q + offset,  blocks of 32
    8-bit (Q8_0, Q6_K):        q signed, one per byte,     w = scale * q,           blocks of 32 (Q8_0), 16 (Q6_K)

Q4_0's offset is -8 scale; Q4_K's 8 sub-blocks of 32 each have their own 6-bit scale and minimum inside a
256-weight super-block (scale = d * sc, offset = -dmin * m); Q6_K's 16 sub-blocks of 16 have an int8 scale each and
its 6-bit values are stored here minus 32. The quantized values are the file's, bit for bit; only the order of the
bytes changes. Scales stay float16 where the file's are (Q4_0, Q4_1, Q8_0: the same bytes as the file), float32
where they are a product (the K-quants).

The order: the rows are interleaved in groups of GROUP_ROWS. For each group and block, byte j of all 32 rows sits
side by side, q[group, block, j, row]. The file's order (each row's blocks one after the other) asks a dot product
to reduce 16 or 32 products per block to one sum, which LLVM does not vectorize well from Numba (measured in
docs/performance.md: 3-7 GMAC/s against 11-14 for this order on one core); in this order the decode kernel
(kernels.matvec_q4, matvec_q8) runs over the 32 rows of a group in one SIMD loop, one weight byte and one
activation at a time, with no sum across a vector until the row ends. llama.cpp repacks Q4_0 the same way on
x86 for the same reason.

Plain NumPy here (decoding, `dequantize`); the kernels are in kernels.py, tested against `dequantize`, which is
tested against the gguf package's own dequantization.
"""

import numpy as np

GROUP_ROWS = 32  # rows interleaved in a group: the decode kernel's SIMD width (two AVX-512 or four AVX2 registers)
FORMATS = ("Q4_0", "Q4_1", "Q4_K", "Q8_0", "Q6_K")
# bytes of one block in the file, and weights per block (a K-quant's super-block is 256 weights)
FILE_BLOCK = {"Q4_0": (18, 32), "Q4_1": (20, 32), "Q4_K": (144, 256), "Q8_0": (34, 32), "Q6_K": (210, 256)}


class BlockMatrix:
    """A weight matrix [out, in] kept in a GGUF block format (see the module docstring).

    q: [groups, blocks, 16, GROUP_ROWS] uint8 (4-bit: two weights per byte, the low nibble weight j of a block of 32,
       the high nibble weight j + 16) or [groups, blocks, block, GROUP_ROWS] int8 (8-bit);
    scale, offset: [groups, blocks, GROUP_ROWS] float32, or uint16 (float16 bits); offset is None for 8-bit.
    Rows past `shape[0]` in the last group are zero."""

    def __init__(self, kind: str, shape: tuple, q: np.ndarray, scale: np.ndarray, offset: np.ndarray | None):
        self.kind, self.shape, self.q, self.scale, self.offset = kind, tuple(shape), q, scale, offset

    @property
    def bits(self) -> int:
        return 4 if self.offset is not None else 8

    @property
    def block(self) -> int:
        """Weights per block (one scale each)."""
        return self.shape[1] // self.q.shape[1]

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scale.nbytes + (0 if self.offset is None else self.offset.nbytes)

    # ------------------------------------------------------------------------------------------ building

    @classmethod
    def from_gguf(cls, kind: str, raw: np.ndarray, shape: tuple) -> "BlockMatrix":
        """The matrix from its bytes in a GGUF file, raw [out, bytes per row] uint8 (as gguf's reader maps them)."""
        if kind not in FORMATS:
            raise ValueError(f"{kind} is not one of the block formats kept quantized ({', '.join(FORMATS)})")
        n_out, n_in = shape
        size, per = FILE_BLOCK[kind]
        if n_in % per or raw.shape != (n_out, n_in // per * size):
            raise ValueError(f"{kind} matrix {list(shape)}: expected {n_out} rows of {n_in // per * size} bytes")
        blocks = raw.reshape(n_out, n_in // per, size)  # [out, file blocks, bytes]
        q, scale, offset = _DECODE[kind](blocks)  # row-major: [out, blocks, bytes], [out, blocks] x2
        return cls(kind, shape, _interleave(q), _interleave(scale), None if offset is None else _interleave(offset))

    # ------------------------------------------------------------------------------------------ reading

    def row_major(self):
        """(q [out, blocks, bytes], scale [out, blocks] float32, offset or None): the rows back in order."""
        n_out = self.shape[0]
        q = _deinterleave(self.q, n_out)
        scale = _widen(_deinterleave(self.scale, n_out))
        offset = None if self.offset is None else _widen(_deinterleave(self.offset, n_out))
        return q, scale, offset

    def dequantize(self, rows=None) -> np.ndarray:
        """The weights as float32 [out, in] (or the rows `rows` of them): the reference the kernels are tested
        against. w = scale * q + offset, each block's q taken from its bytes."""
        if rows is None:
            q, scale, offset = self.row_major()
        else:
            g, r = np.divmod(np.asarray(rows, np.int64).reshape(-1), GROUP_ROWS)
            q = self.q[g, ..., r]  # [T, blocks, bytes]
            scale = _widen(self.scale[g, :, r])
            offset = None if self.offset is None else _widen(self.offset[g, :, r])
        if self.bits == 4:
            values = np.concatenate([q & 15, q >> 4], axis=-1).astype(np.float32)  # [T, blocks, 32]
            w = values * scale[..., None] + offset[..., None]
        else:
            w = q.astype(np.float32) * scale[..., None]
        return w.reshape(len(q), self.shape[1])

    def finite(self) -> bool:
        """Whether every scale and offset is a finite number (a damaged file may hold NaN or infinity)."""
        return all(np.isfinite(_widen(a)).all() for a in (self.scale, self.offset) if a is not None)

    def __getitem__(self, rows) -> np.ndarray:
        """Rows as float32 (an embedding lookup): [T] ids -> [T, in]."""
        if isinstance(rows, slice):
            rows = np.arange(*rows.indices(self.shape[0]))
        return self.dequantize(rows)

    def __repr__(self):
        return f"<BlockMatrix {self.kind} {list(self.shape)}>"


def stack_rows(mats: list) -> BlockMatrix:
    """Block matrices of one format stacked along their rows (q, k and v into one)."""
    kinds = {m.kind for m in mats}
    if len(kinds) != 1:
        raise ValueError(f"cannot stack matrices of formats {sorted(kinds)} into one")
    parts = [m.row_major() for m in mats]
    q = np.concatenate([p[0] for p in parts])
    scale = np.concatenate([p[1] for p in parts])
    offset = None if parts[0][2] is None else np.concatenate([p[2] for p in parts])
    if all(m.scale.dtype == np.uint16 for m in mats):  # back to the float16 bits they came from (exact)
        scale = _as_f16_bits(scale)
        offset = None if offset is None else _as_f16_bits(offset)
    shape = (sum(m.shape[0] for m in mats), mats[0].shape[1])
    offset = None if offset is None else _interleave(offset)
    return BlockMatrix(mats[0].kind, shape, _interleave(q), _interleave(scale), offset)


# ---------------------------------------------------------------------------------------------- the row order


def _interleave(a: np.ndarray) -> np.ndarray:
    """Rows in groups of GROUP_ROWS, the row index last: [out, ...] -> [groups, ..., GROUP_ROWS] (zero-padded)."""
    n_out = a.shape[0]
    groups = -(-n_out // GROUP_ROWS)
    if groups * GROUP_ROWS != n_out:
        a = np.concatenate([a, np.zeros((groups * GROUP_ROWS - n_out, *a.shape[1:]), a.dtype)])
    a = a.reshape(groups, GROUP_ROWS, *a.shape[1:])
    return np.ascontiguousarray(np.moveaxis(a, 1, -1))


def _deinterleave(a: np.ndarray, n_out: int) -> np.ndarray:
    return np.moveaxis(a, -1, 1).reshape(-1, *a.shape[1:-1])[:n_out]


def _widen(a: np.ndarray) -> np.ndarray:
    """Scales as float32: uint16 arrays hold float16 bits."""
    return a.view(np.float16).astype(np.float32) if a.dtype == np.uint16 else a


# ---------------------------------------------------------------------------------------------- the formats
# Each decoder takes the file's blocks [out, blocks, bytes] and returns q [out, blocks', bytes'], scale and offset
# [out, blocks'] (blocks' of 32 weights, or 16 for Q6_K), following ggml-quants.c's dequantize_row_* functions.


def _f16(blocks, at: int) -> np.ndarray:
    """The float16 field at byte `at` of every block, as its uint16 bits [out, blocks]."""
    return np.ascontiguousarray(blocks[..., at : at + 2]).view(np.uint16)[..., 0]


def _as_f16_bits(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).view(np.uint16)


def _q4_0(blocks):  # d (f16), 16 bytes: w = d * (q - 8)
    d = _f16(blocks, 0)
    minus_8d = -8 * d.view(np.float16).astype(np.float32)  # exact in float16 (a power of two) unless it overflows
    offset = _as_f16_bits(minus_8d) if np.isfinite(minus_8d.astype(np.float16)).all() else None
    if offset is None:  # |d| > 8188: keep float32
        return blocks[..., 2:], _widen(d), minus_8d
    return blocks[..., 2:], d, offset


def _q4_1(blocks):  # d, m (f16), 16 bytes: w = d * q + m
    return blocks[..., 4:], _f16(blocks, 0), _f16(blocks, 2)


def _q8_0(blocks):  # d (f16), 32 int8: w = d * q
    return blocks[..., 2:].view(np.int8), _f16(blocks, 0), None


def _q4_k(blocks):
    """Super-blocks of 256: d, dmin (f16), 12 bytes of 6-bit scales and minimums for 8 sub-blocks of 32, 128 bytes
    of nibbles. In each 32 bytes the low nibbles are one sub-block, the high nibbles the next; here each sub-block
    is packed as the other 4-bit formats are (weight j low, weight j + 16 high)."""
    n_out, n_super, _ = blocks.shape
    d = _widen(_f16(blocks, 0))[..., None]
    dmin = _widen(_f16(blocks, 2))[..., None]
    s = blocks[..., 4:16].astype(np.uint8)  # [out, super, 12]
    sc = np.concatenate([s[..., 0:4] & 63, (s[..., 8:12] & 15) | ((s[..., 0:4] >> 2) & 48)], axis=-1)  # [.., 8]
    mn = np.concatenate([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 2) & 48)], axis=-1)
    nib = blocks[..., 16:].reshape(n_out, n_super, 4, 1, 32)
    values = np.concatenate([nib & 15, nib >> 4], axis=3).reshape(n_out, n_super * 8, 32)  # [out, sub-blocks, 32]
    q = values[..., :16] | (values[..., 16:] << 4)
    scale = (d * sc.astype(np.float32)).reshape(n_out, -1)
    offset = -(dmin * mn.astype(np.float32)).reshape(n_out, -1)
    return q, scale, offset


def _q6_k(blocks):
    """Super-blocks of 256: 128 bytes of low nibbles, 64 of high 2-bit pairs, 16 int8 scales, d (f16); 16
    sub-blocks of 16 weights, w = d * scale_i * (q - 32). Kept as q - 32 in int8 with scale d * scale_i."""
    n_out, n_super, _ = blocks.shape
    ql = blocks[..., :128].reshape(n_out, n_super, 2, 1, 64)
    qh = blocks[..., 128:192].reshape(n_out, n_super, 2, 1, 32)
    sc = blocks[..., 192:208].view(np.int8).astype(np.float32)  # [out, super, 16]
    d = _widen(_f16(blocks, 208))[..., None]
    low = np.concatenate([ql & 15, ql >> 4], axis=3).reshape(n_out, n_super, 2, 4, 32)
    high = (qh >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 1, 4, 1)) & 3  # [out, super, 2, 4, 32]
    q = ((low | (high << 4)).astype(np.int16) - 32).astype(np.int8).reshape(n_out, n_super * 16, 16)
    return q, (d * sc).reshape(n_out, -1), None


_DECODE = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q4_K": _q4_k, "Q8_0": _q8_0, "Q6_K": _q6_k}
