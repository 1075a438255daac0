"""GGUF block formats kept quantized (quant.BlockMatrix): decoded bit for bit as the gguf package dequantizes them,
and the kernels that read them (matvec_q4/q8 for one row, widened tiles for many) equal to x @ W.T on the widened
weights, with and without the thread pool, under both many-row backends."""

import numba
import numpy as np
import pytest

from conftest import need_gguf
from radial_min import kernels, quant
from radial_min.dtypes import stack_rows, to_float32
from radial_min.quant import FILE_BLOCK, BlockMatrix

gguf = need_gguf()
QUANTIZABLE = ("Q4_0", "Q4_1", "Q8_0")  # gguf's writer quantizes these; the K-quants are made of random bytes


def raw_blocks(kind, n_out, n_in, seed=0):
    """A matrix's bytes as a GGUF file holds them: quantized by gguf from random weights, or (K-quants) random
    bytes with their float16 scales set to small finite values."""
    rng = np.random.default_rng(seed)
    if kind in QUANTIZABLE:
        w = rng.standard_normal((n_out, n_in)).astype(np.float32) * rng.uniform(0.1, 3, (n_out, 1)).astype(np.float32)
        return gguf.quants.quantize(w, getattr(gguf.GGMLQuantizationType, kind))
    size, per = FILE_BLOCK[kind]
    raw = rng.integers(0, 256, (n_out, n_in // per, size), dtype=np.uint8)
    scales = (0,) if kind == "Q6_K" else (0, 2)  # Q4_K: d, dmin at bytes 0 and 2; Q6_K: d at byte 208
    for at in scales:
        at = 208 if kind == "Q6_K" else at
        d = (rng.standard_normal((n_out, n_in // per)) * 0.02).astype(np.float16)
        raw[..., at : at + 2] = d[..., None].view(np.uint8)
    return raw.reshape(n_out, -1)


def gguf_dequantize(kind, raw, shape):
    return gguf.quants.dequantize(raw, getattr(gguf.GGMLQuantizationType, kind)).reshape(shape)


SHAPES = {
    "Q4_0": (70, 96),
    "Q4_1": (70, 96),
    "Q8_0": (70, 96),
    "Q4_K": (70, 512),
    "Q6_K": (70, 512),
}  # 70: a ragged group


@pytest.mark.parametrize("kind", quant.FORMATS)
def test_blocks_decode_bit_for_bit_as_gguf_dequantizes(kind):
    shape = SHAPES[kind]
    raw = raw_blocks(kind, *shape)
    w = BlockMatrix.from_gguf(kind, raw, shape)
    ref = gguf_dequantize(kind, raw, shape)
    assert w.shape == shape and w.bits == (4 if kind.startswith("Q4") else 8)
    assert w.q.shape[0] == 3 and w.q.shape[-1] == quant.GROUP_ROWS  # 70 rows: three groups, the last padded
    np.testing.assert_array_equal(w.dequantize(), ref)
    np.testing.assert_array_equal(to_float32(w), ref)
    rows = [69, 0, 33, 33]
    np.testing.assert_array_equal(w[rows], ref[rows])  # an embedding lookup
    np.testing.assert_array_equal(w[5:9], ref[5:9])


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
def test_file_scales_stay_float16_and_the_bytes_per_weight_are_the_files(kind):
    shape = (64, 256)
    raw = raw_blocks(kind, *shape)
    w = BlockMatrix.from_gguf(kind, raw, shape)
    assert w.scale.dtype == np.uint16 and w.nbytes == raw.nbytes  # the same bytes, reordered


def test_stacked_block_matrices_equal_stacked_weights():
    parts = [BlockMatrix.from_gguf("Q4_1", raw_blocks("Q4_1", n, 64, seed=n), (n, 64)) for n in (40, 8, 8)]
    stacked = stack_rows(parts)
    assert isinstance(stacked, BlockMatrix) and stacked.shape == (56, 64) and stacked.scale.dtype == np.uint16
    np.testing.assert_array_equal(stacked.dequantize(), np.concatenate([p.dequantize() for p in parts]))
    mixed = stack_rows([parts[0], BlockMatrix.from_gguf("Q8_0", raw_blocks("Q8_0", 8, 64), (8, 64))])
    assert mixed.dtype == np.float32 and mixed.shape == (48, 64)  # formats differ: widened


def test_damaged_scales_are_found():
    raw = raw_blocks("Q4_1", 32, 64)
    raw.reshape(32, 2, 20)[3, 1, 0:2] = np.array([np.inf], np.float16).view(np.uint8)
    assert not BlockMatrix.from_gguf("Q4_1", raw, (32, 64)).finite()
    assert BlockMatrix.from_gguf("Q4_1", raw_blocks("Q4_1", 32, 64), (32, 64)).finite()


@pytest.mark.parametrize("kind", quant.FORMATS)
@pytest.mark.parametrize("pool", [True, False])
def test_one_row_kernels_equal_the_widened_product(kind, pool, monkeypatch):
    """matvec_q4/q8 against x @ W.T + b on the dequantized weights (the NumPy reference), with the thread pool
    and with the serial copy, bias or not."""
    monkeypatch.setattr(kernels, "PARALLEL_FROM", 0 if pool else 1 << 62)
    monkeypatch.setattr(kernels, "free_cores", lambda: 2)
    shape = SHAPES[kind]
    w = BlockMatrix.from_gguf(kind, raw_blocks(kind, *shape), shape)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, shape[1])).astype(np.float32)
    b = rng.standard_normal(shape[0]).astype(np.float32)
    ref = x.astype(np.float64) @ w.dequantize().T.astype(np.float64)
    scale = np.abs(ref).max()
    np.testing.assert_allclose(kernels.linear(x, w), ref, rtol=0, atol=2e-6 * scale)
    np.testing.assert_allclose(kernels.linear(x, w, b), ref + b, rtol=0, atol=2e-6 * scale)


@pytest.mark.parametrize("kind", ["Q4_1", "Q6_K"])
@pytest.mark.parametrize("rows", [3, 20])  # 3: row by row (MATVEC_ROWS); 20: widened tiles
def test_many_row_products_equal_the_widened_product(kind, rows, matmul_backend, monkeypatch):
    monkeypatch.setattr(kernels, "DEQUANTIZE_ROWS", 32)  # several tiles, the last one ragged
    shape = SHAPES[kind]
    w = BlockMatrix.from_gguf(kind, raw_blocks(kind, *shape), shape)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((rows, shape[1])).astype(np.float32)
    b = rng.standard_normal(shape[0]).astype(np.float32)
    ref = x.astype(np.float64) @ w.dequantize().T.astype(np.float64) + b
    # float32 rounding: the 4-bit kernel's byte split (kernels._byte4) cancels terms up to ~17x its result
    np.testing.assert_allclose(kernels.linear(x, w, b), ref, rtol=0, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
def test_many_row_block_products_on_the_pool_equal_the_serial_copy_bit_for_bit(kind):
    """matmul_blas_blocks: each task widens its own tile of rows (ragged last tiles in both directions) and calls
    sgemm; on 2 threads the bits are the serial copy's, and the product is the widened one's."""
    sgemm = kernels._cblas_sgemm()
    if sgemm is None:
        pytest.skip("NumPy's BLAS is not an OpenBLAS this process can reach")
    shape = (2 * kernels.BLAS_COLUMNS + 70, 96)
    w = BlockMatrix.from_gguf(kind, raw_blocks(kind, *shape), shape)
    x = np.random.default_rng(3).standard_normal((kernels.BLAS_ROWS + 40, shape[1])).astype(np.float32)
    offset = kernels._NO_OFFSET if w.offset is None else w.offset
    one, two = (np.full((len(x), shape[0]), np.nan, np.float32) for _ in range(2))
    args = (sgemm, x, w.q, w.scale, offset)
    kernels.matmul_blas_blocks_serial(*args, one, kernels.BLAS_ROWS, kernels.BLAS_COLUMNS)
    before = numba.get_num_threads()
    numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
    try:
        kernels.matmul_blas_blocks(*args, two, kernels.BLAS_ROWS, kernels.BLAS_COLUMNS)
    finally:
        numba.set_num_threads(before)
    ref = x.astype(np.float64) @ w.dequantize().T.astype(np.float64)
    np.testing.assert_allclose(one, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    assert np.array_equal(one, two)


def test_dequantize_kernels_equal_the_reference():
    """The prefill's widening (kernels.dequantize_q4/q8, transposed tiles) against BlockMatrix.dequantize."""
    for kind in quant.FORMATS:
        shape = SHAPES[kind]
        w = BlockMatrix.from_gguf(kind, raw_blocks(kind, *shape), shape)
        cols = np.empty((shape[1], 2 * quant.GROUP_ROWS), np.float32)  # groups 1 and 2
        if w.bits == 4:
            kernels.dequantize_q4(w.q, w.scale, w.offset, 1, cols)
        else:
            kernels.dequantize_q8(w.q, w.scale, 1, cols)
        ref = w.dequantize()[quant.GROUP_ROWS :]
        np.testing.assert_allclose(cols.T[: len(ref)], ref, rtol=1e-6, atol=1e-7 * np.abs(ref).max())


# ------------------------------------------------------------------------------ the fused gate/up, the rope table


def _ffn_weights(kind, shape, seed):
    if kind == "float32":
        return np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 0.2
    if kind == "int8":
        return kernels.to_storage(_ffn_weights("float32", shape, seed), "int8")
    return BlockMatrix.from_gguf(kind, raw_blocks(kind, *shape, seed=seed), shape)


@pytest.mark.parametrize("kinds", [("Q4_1", "Q4_1"), ("Q4_0", "Q4_1"), ("int8", "int8"), ("float32", "float32"),
                                   ("Q8_0", "Q8_0"), ("Q4_1", "float32")])  # fmt: skip
@pytest.mark.parametrize("rows", [1, 6])
@pytest.mark.parametrize("pool", [True, False])
def test_gate_up_silu_equals_its_reference(kinds, rows, pool, monkeypatch):
    """One kernel for a decode row (4-bit blocks, int8, float32 pairs), linear + silu otherwise: all equal to
    silu(x @ gate.T) * (x @ up.T) on the widened weights."""
    monkeypatch.setattr(kernels, "PARALLEL_FROM", 0 if pool else 1 << 62)
    monkeypatch.setattr(kernels, "free_cores", lambda: 2)
    shape = (70, 96)
    gate, up = _ffn_weights(kinds[0], shape, 3), _ffn_weights(kinds[1], shape, 4)
    x = np.random.default_rng(5).standard_normal((rows, shape[1])).astype(np.float32)
    ref = kernels.gate_up_silu_ref(x.astype(np.float64), gate, up)
    np.testing.assert_allclose(kernels.gate_up_silu(x, gate, up), ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_rope_table_equals_rope_angles_and_grows():
    table = kernels.RopeTable(64, 100000.0, n_positions=16)
    for pos in (np.array([0, 3, 15]), np.array([5]), np.array([15, 16, 40])):  # the last one grows the table
        cos, sin = table(pos)
        ref_cos, ref_sin = kernels.rope_angles(pos, 64, 100000.0)
        np.testing.assert_array_equal(cos, ref_cos)
        np.testing.assert_array_equal(sin, ref_sin)
    assert len(table.cos) >= 41
