"""Each Numba kernel against its plain-NumPy reference, over shapes that hit every tile edge."""

import os
import subprocess
import sys

import numba
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from radial_min import kernels

RNG = np.random.default_rng(0)


def randn(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


NONE = np.zeros(0, np.float32)  # an absent bias or scale


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 13),
    n_in=st.integers(1, 40),
    n_out=st.integers(1, 23),
    bias=st.booleans(),
    cols_per_task=st.sampled_from([4, 8, 64]),
    int8=st.booleans(),
)
@pytest.mark.slow
def test_matmul_matches_reference(rows, n_in, n_out, bias, cols_per_task, int8):
    """The 4x4-tiled kernel, including ragged row and column tails, several tasks, and int8 weights against
    float32 math on their dequantized values."""
    a, w = randn(rows, n_in), randn(n_out, n_in)
    b = randn(n_out) if bias else None
    q = kernels.Int8Matrix.quantize(w)
    out = np.empty((rows, n_out), np.float32)
    kernels.matmul(a, q.q if int8 else w, q.scale if int8 else NONE, NONE if b is None else b, out, cols_per_task)
    np.testing.assert_allclose(out, kernels.linear_ref(a, q.dequantize() if int8 else w, b), rtol=1e-5, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(1, 11),
    n_in=st.integers(1, 30),
    extra=st.integers(0, 5),
    n_out=st.integers(1, 13),
    k_block=st.sampled_from([1, 3, 8, 1024]),
)
@pytest.mark.slow
def test_gemm_matches_reference(rows, n_in, extra, n_out, k_block):
    """The serial tiled core of matmul and attention: the first n_in columns of wider rows, summed in slices."""
    a, w = randn(rows, n_in + extra), randn(n_out, n_in + extra)
    out = np.full((rows, n_out + 2), 7.0, np.float32)
    kernels._gemm(a, w, out, n_in, k_block)
    np.testing.assert_allclose(out[:, :n_out], a[:, :n_in] @ w[:, :n_in].T, rtol=1e-5, atol=1e-5)
    assert (out[:, n_out:] == 7.0).all()


@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("n_in,n_out", [(1, 1), (7, 5), (768, 3072)])
@pytest.mark.slow
def test_matvec_matches_reference(n_in, n_out, int8):
    x, w, b = randn(n_in), randn(n_out, n_in), randn(n_out)
    q = kernels.Int8Matrix.quantize(w)
    out = np.empty(n_out, np.float32)
    kernels.matvec(x, q.q if int8 else w, q.scale if int8 else NONE, b, out)
    ref = kernels.linear_ref(x[None], q.dequantize() if int8 else w, b)[0]
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_int8_quantization_per_row():
    """Symmetric per-row int8: each row's largest |weight| is exact, every weight within half a step of its row's
    scale, all-zero rows stay zero; rows picked from the matrix (an embedding lookup) keep their scales."""
    w = randn(6, 50) * np.array([1e-3, 1, 10, 0, 1, 5], np.float32)[:, None]
    q = kernels.Int8Matrix.quantize(w)
    assert q.q.dtype == np.int8 and q.scale.dtype == np.float32 and q.shape == (6, 50) and q.nbytes == 6 * 50 + 6 * 4
    assert np.abs(q.q).max() == 127 and q.q.min() >= -127
    back = q.dequantize()
    big = np.abs(w).argmax(1)
    np.testing.assert_allclose(back[np.arange(6), big], w[np.arange(6), big], rtol=1e-6)
    assert (np.abs(back - w) <= q.scale[:, None] / 2 * (1 + 1e-5)).all()
    assert (back[3] == 0).all()
    np.testing.assert_array_equal(kernels.to_float32(q[np.array([4, 1])]), back[[4, 1]])
    with pytest.raises(ValueError, match="matrices"):
        kernels.Int8Matrix.quantize(randn(2, 3, 4))


@pytest.mark.parametrize("rows", [1, 2, 9])
@pytest.mark.slow
def test_linear_on_int8_weights(rows):
    """linear() on an Int8Matrix (matvec for one row, matmul for more, serial or parallel) equals float32 math on
    the dequantized weights."""
    x, w, b = randn(rows, 300), randn(4100, 300), randn(4100)  # 9 x 4100 x 300 multiply-adds: the parallel kernel
    q = kernels.to_storage(w, "int8")
    np.testing.assert_allclose(kernels.linear(x, q, b), kernels.linear_ref(x, q.dequantize(), b), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        kernels.linear(x[:, :7], kernels.to_storage(w[:9, :7], "int8")),
        kernels.linear_ref(x[:, :7], kernels.Int8Matrix.quantize(w[:9, :7]).dequantize()),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize("backend", ["auto", "blas", "numba"])  # "auto" not last: see the next test
@pytest.mark.parametrize("rows", [1, 2, 9])
def test_linear_dispatch(backend, rows):
    """linear() picks matvec for one row and the chosen backend otherwise; all give the reference."""
    x, w, b = randn(rows, 33), randn(17, 33), randn(17)
    kernels.set_backend(backend)  # conftest's autouse fixture restores the previous backend afterwards
    np.testing.assert_allclose(kernels.linear(x, w, b), kernels.linear_ref(x, w, b), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(kernels.linear(x, w), kernels.linear_ref(x, w), rtol=1e-5, atol=1e-5)


def test_default_backend_is_auto():
    """Runs after test_linear_dispatch in file order: a test that left another backend behind would show here."""
    assert kernels.get_backend() == "auto"


def _record_kernels(monkeypatch, calls):
    """Record which many-row kernel linear() calls."""
    names = ["matmul", "matmul_blas", "matmul_blas_int8", "matmul_blas_blocks"]
    for name in names + [n + "_serial" for n in names]:
        real, tag = getattr(kernels, name), name.removesuffix("_serial")
        monkeypatch.setattr(kernels, name, lambda *a, real=real, tag=tag: calls.append(tag) or real(*a))


def test_auto_backend_sends_every_many_row_product_to_sgemm_on_the_pool(monkeypatch):
    """ "auto": OpenBLAS's sgemm in tiles on Numba's pool for float32 and half-precision weights, and for int8 and
    GGUF block weights widened tile by tile; without an OpenBLAS to call, our matmul for all."""
    if kernels._cblas_sgemm() is None:
        pytest.skip("NumPy's BLAS is not an OpenBLAS this process can reach")
    from radial_min.quant import BlockMatrix
    from test_quant import raw_blocks

    calls = []
    _record_kernels(monkeypatch, calls)
    kernels.set_backend("auto")
    x = randn(20, 64)
    weights = [randn(8, 64), kernels.to_storage(randn(8, 64), "float16"), kernels.to_storage(randn(8, 64), "int8")]
    weights += [BlockMatrix.from_gguf(kind, raw_blocks(kind, 32, 64), (32, 64)) for kind in ("Q4_1", "Q8_0")]
    for w in weights:
        kernels.linear(x, w)
    assert calls == ["matmul_blas", "matmul_blas", "matmul_blas_int8", "matmul_blas_blocks", "matmul_blas_blocks"]
    calls.clear()
    monkeypatch.setitem(kernels._BLAS, "sgemm", False)  # another BLAS
    for w in weights:
        want = kernels.linear_ref(x, w.dequantize() if isinstance(w, BlockMatrix) else kernels.to_float32(w))
        np.testing.assert_allclose(kernels.linear(x, w), want, atol=1e-4)
    assert calls == ["matmul"] * 5


def test_exp32_is_within_one_ulp_of_e_to_the_x():
    """exp32 (the softmax's and SiLU's e^x, vectorizable) against float64's exp over float32's whole range: at most
    one unit in the last place off where float32 has normal numbers, 0 below e^-104, inf above e^89."""
    x = np.concatenate([np.linspace(-110, 90, 200_001), RNG.standard_normal(10_000)]).astype(np.float32)
    got, want = kernels.exp32_array(x).astype(np.float64), np.exp(x.astype(np.float64))
    normal = (want > np.finfo(np.float32).tiny) & (want < np.finfo(np.float32).max)
    ulp = np.spacing(want[normal].astype(np.float32)).astype(np.float64)
    assert (np.abs(got[normal] - want[normal]) <= ulp).all()
    assert (got[x < -104] == 0).all() and (got[x > 89] == np.inf).all()


def test_blas_backend_without_openblas_uses_numpys_matmul(monkeypatch):
    """ "blas" where NumPy's BLAS is not an OpenBLAS to call: NumPy's own matmul on the widened weights (any
    BLAS), not our matmul; float32, int8 and block weights all give the product, bias included."""
    from radial_min.quant import BlockMatrix
    from test_quant import raw_blocks

    calls = []
    _record_kernels(monkeypatch, calls)
    monkeypatch.setitem(kernels._BLAS, "sgemm", False)
    kernels.set_backend("blas")
    x, b = randn(20, 64), randn(32)
    for w in (
        randn(32, 64),
        kernels.to_storage(randn(32, 64), "int8"),
        BlockMatrix.from_gguf("Q8_0", raw_blocks("Q8_0", 32, 64), (32, 64)),
    ):
        dense = w.dequantize() if isinstance(w, BlockMatrix) else kernels.to_float32(w)
        np.testing.assert_allclose(kernels.linear(x, w, b), kernels.linear_ref(x, dense, b), rtol=1e-5, atol=1e-5)
    assert calls == []


@pytest.mark.parametrize("backend", ["auto", "blas"])
def test_linear_of_float64_rows_is_not_sent_to_sgemm(backend):
    """The router's features and the trainer's checks pass float64 rows: sgemm would read their bytes as float32,
    so they go to our matmul (compiled for float64)."""
    kernels.set_backend(backend)
    x, w = RNG.standard_normal((9, 33)), randn(17, 33)
    np.testing.assert_allclose(kernels.linear(x, w), x @ w.T.astype(np.float64), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [3, kernels.BLAS_ROWS + 130])
def test_sgemm_on_the_pool_gives_the_same_bits_on_any_number_of_threads(rows):
    """matmul_blas and matmul_blas_int8 cut the output in fixed tiles, whatever the thread count: the pool on 2
    threads gives the bits of the serial copy, and both give the product."""
    sgemm = kernels._cblas_sgemm()
    if sgemm is None:
        pytest.skip("NumPy's BLAS is not an OpenBLAS this process can reach")
    x, w = randn(rows, 70), randn(2 * kernels.BLAS_COLUMNS + 30, 70)
    w8 = kernels.Int8Matrix.quantize(w)
    tiles = (kernels.BLAS_ROWS, kernels.BLAS_COLUMNS)
    for kernel, args, want in [
        ("matmul_blas", (w,), kernels.linear_ref(x, w)),
        ("matmul_blas_int8", (w8.q, w8.scale), kernels.linear_ref(x, w8.dequantize())),
    ]:
        one, two = (np.full((rows, w.shape[0]), np.nan, np.float32) for _ in range(2))
        getattr(kernels, kernel + "_serial")(sgemm, x, *args, one, *tiles)
        before = numba.get_num_threads()
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        try:
            getattr(kernels, kernel)(sgemm, x, *args, two, *tiles)
        finally:
            numba.set_num_threads(before)
        assert np.array_equal(one, two), kernel
        np.testing.assert_allclose(one, want, rtol=1e-4, atol=1e-4)


_WIDENED_TILES = """
import numpy as np
from radial_min import kernels
from radial_min.quant import BlockMatrix

rng = np.random.default_rng(0)
x = rng.standard_normal((300, 576)).astype(np.float32)
q = rng.integers(0, 256, (24, 18, 16, 32), dtype=np.uint8)  # 768 x 576, 4-bit
scale, offset = (rng.uniform(0.01, 0.1, (24, 18, 32)).astype(np.float32) for _ in range(2))
w4 = BlockMatrix("Q4_1", (768, 576), q, scale, offset)
w8 = kernels.Int8Matrix.quantize(rng.standard_normal((768, 576)).astype(np.float32))
for w, dense in ((w4, w4.dequantize()), (w8, w8.dequantize())):
    want = x.astype(np.float64) @ dense.T.astype(np.float64)
    assert np.abs(kernels.linear(x, w) - want).max() <= 1e-4 * np.abs(want).max()
print("ok")
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc tunables")
def test_widened_weight_tiles_stay_alive_until_sgemm_has_read_them():
    """The pool kernels widen each int8 or block weight tile into a buffer that sgemm then reads. Allocated inside
    the task, a buffer was freed before sgemm read it (Numba frees an array after its last use, taking its
    address), unnoticed where glibc kept the memory mapped; with every allocation of 128 KB or more mapped on its
    own (MALLOC_MMAP_THRESHOLD_), reading a freed one is a segfault. In a subprocess, so a crash fails this test."""
    if kernels._cblas_sgemm() is None:
        pytest.skip("NumPy's BLAS is not an OpenBLAS this process can reach")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    run = subprocess.run([sys.executable, "-c", _WIDENED_TILES], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", (run.returncode, run.stderr[-2000:])


def test_set_backend_rejects_unknown():
    with pytest.raises(ValueError, match="blas"):
        kernels.set_backend("cuda")


@pytest.mark.parametrize("affine", [True, False])
def test_layernorm(affine):
    x = randn(5, 48) * 3 + 1
    w, b = (randn(48), randn(48)) if affine else (None, None)
    np.testing.assert_allclose(
        kernels.layernorm(x, w, b, 1e-5), kernels.layernorm_ref(x, w, b, 1e-5), rtol=1e-4, atol=1e-5
    )


def test_activations():
    x = randn(4, 37) * 3
    np.testing.assert_array_equal(kernels.activation("relu", x.copy()), kernels.relu_ref(x))
    np.testing.assert_allclose(kernels.activation("gelu", x.copy()), kernels.gelu_ref(x), rtol=1e-6, atol=1e-7)
    # exact (erf) GELU, not the tanh approximation: they differ by ~1e-4 around |x| = 2
    assert abs(kernels.gelu_ref(np.array([[2.0]], np.float32))[0, 0] - 1.9544997) < 1e-6


def test_softmax():
    x = randn(3, 50) * 40  # large logits: the max shift keeps exp finite
    out = kernels.softmax(x)
    np.testing.assert_allclose(out, kernels.softmax_ref(x.astype(np.float64)), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(out.sum(-1), 1, rtol=1e-6)


@settings(max_examples=25, deadline=None)
@given(n_q=st.integers(1, 6), n_past=st.integers(0, 9), n_head=st.sampled_from([1, 2, 4]), d=st.integers(1, 8))
def test_causal_attention_over_cache(n_q, n_past, n_head, d):
    """Queries at the end of a cache see every key at or before their position."""
    E = n_head * d
    q, k, v = randn(n_q, E), randn(n_past + n_q, E), randn(n_past + n_q, E)
    k_pos = np.arange(n_past + n_q)
    q_pos = k_pos[n_past:]
    np.testing.assert_allclose(
        kernels.attention(q, k, v, n_head, q_pos, k_pos),
        kernels.attention_ref(q, k, v, n_head, q_pos, k_pos),
        rtol=1e-5,
        atol=1e-5,
    )


def test_attention_with_holes_and_full():
    """Positions, not row indices, decide visibility: a cache missing some tokens still masks correctly."""
    q, k, v = randn(3, 8), randn(5, 8), randn(5, 8)
    k_pos = np.array([0, 2, 3, 5, 7])  # tokens 1, 4, 6 skipped this layer
    q_pos = np.array([3, 6, 7])
    out = kernels.attention(q, k, v, 2, q_pos, k_pos)
    np.testing.assert_allclose(out, kernels.attention_ref(q, k, v, 2, q_pos, k_pos), rtol=1e-5, atol=1e-6)
    # the query at position 3 sees exactly keys 0, 2, 3: compare with attention over those rows alone
    np.testing.assert_allclose(out[0], kernels.attention_ref(q[:1], k[:3], v[:3], 2)[0], rtol=1e-5, atol=1e-6)
    full = kernels.attention(q, k, v, 2)
    np.testing.assert_allclose(full, kernels.attention_ref(q, k, v, 2), rtol=1e-5, atol=1e-6)
    assert not np.allclose(full[0], out[0])


def test_attention_over_head_major_storage():
    """Keys from a cache's storage: head-major [H, capacity, D], only the first len(k_pos) valid."""
    from radial_min.kernels import split_heads

    q, k, v = randn(2, 8), randn(5, 8), randn(5, 8)
    storage_k, storage_v = np.zeros((2, 9, 4), np.float32), np.zeros((2, 9, 4), np.float32)
    storage_k[:, :5], storage_v[:, :5] = split_heads(k, 2), split_heads(v, 2)
    storage_k[:, 5:], storage_v[:, 5:] = 1e4, 1e4  # garbage beyond the valid rows must not be read
    q_pos, k_pos = np.array([3, 4]), np.arange(5)
    np.testing.assert_allclose(
        kernels.attention(q, storage_k, storage_v, 2, q_pos, k_pos),
        kernels.attention_ref(q, k, v, 2, q_pos, k_pos),
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize("n_q", [1, 40])  # decode's kernel, and the blocked one a prefill of 32+ queries takes
def test_attention_over_half_precision_storage(n_q):
    """A half-precision cache's keys and values (float16 bits, uint16) give exactly what the float32 kernel gives
    over the same values widened, and the reference within float16's rounding of the entries."""
    from radial_min.kernels import split_heads

    q, k, v = randn(n_q, 8), randn(n_q + 5, 8), randn(n_q + 5, 8)
    k16, v16 = (split_heads(a, 2).astype(np.float16) for a in (k, v))  # [H, N, D]
    q_pos, k_pos = np.arange(5, 5 + n_q), np.arange(n_q + 5)
    half = kernels.attention(q, k16.view(np.uint16), v16.view(np.uint16), 2, q_pos, k_pos)
    wide = kernels.attention(q, k16.astype(np.float32), v16.astype(np.float32), 2, q_pos, k_pos)
    np.testing.assert_array_equal(half, wide)
    ref = kernels.attention_ref(q, k, v, 2, q_pos, k_pos)
    np.testing.assert_allclose(half, ref, rtol=0, atol=2e-2)
    assert not np.array_equal(half, kernels.attention(q, split_heads(k, 2), split_heads(v, 2), 2, q_pos, k_pos))


def test_attention_accepts_strided_views():
    """q, k, v arrive as column slices of one [T, 3E] projection."""
    qkv = randn(6, 24)
    q, k, v = np.split(qkv, 3, axis=1)
    pos = np.arange(6)
    out = kernels.attention(q, k, v, 2, pos, pos)
    ref = kernels.attention_ref(q.copy(), k.copy(), v.copy(), 2, pos, pos)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_attention_refuses_unsorted_key_positions():
    q, k = randn(1, 4), randn(3, 4)
    with pytest.raises(ValueError, match="increasing order"):
        kernels.attention(q, k, k, 1, np.array([5]), np.array([0, 3, 2]))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.slow
def test_half_precision_weights(dtype):
    """matvec over half-precision weights equals float32 math on the same (rounded) weights; sign, subnormals."""
    x, w, b = randn(70), randn(45, 70), randn(45)
    w[0, :4] = [1e-6, -6e-8, -2.5, 0.0]  # a float16 subnormal, a tiny negative, an exact value, zero
    stored = kernels.to_storage(w, dtype)
    assert stored.dtype == (np.float16 if dtype == "float16" else np.uint16)
    wide = kernels.to_float32(stored)
    assert np.abs(wide - w).max() <= (1e-3 if dtype == "float16" else 1e-2) * np.abs(w).max()
    np.testing.assert_allclose(
        kernels.linear(x[None], stored, b), kernels.linear_ref(x[None], wide, b), rtol=1e-5, atol=1e-5
    )
    pair = kernels.linear(np.stack([x, x]), stored, b)
    np.testing.assert_allclose(pair[1], kernels.linear_ref(x[None], wide, b)[0], rtol=1e-5, atol=1e-5)


def test_bfloat16_rounds_to_nearest_even():
    x = np.array([1.0 + 2**-8, 1.0 + 3 * 2**-8, 1.0 + 2**-9], np.float32)  # halfway, halfway, below half
    back = kernels.to_float32(kernels.to_storage(x, "bfloat16"))
    np.testing.assert_array_equal(back, np.array([1.0, 1.0 + 4 * 2**-8, 1.0], np.float32))
    with pytest.raises(ValueError, match="weights dtype"):
        kernels.to_storage(x, "int4")


def test_attention_over_picked_rows():
    """`rows` picks keys out of a larger head-major store without copying: same as attending to those rows."""
    from radial_min.kernels import split_heads

    q, k, v = randn(2, 8), randn(7, 8), randn(7, 8)
    rows, k_pos = np.array([0, 2, 5, 6]), np.array([0, 1, 3, 4])
    out = kernels.attention(q, split_heads(k, 2), split_heads(v, 2), 2, np.array([3, 4]), k_pos, rows)
    ref = kernels.attention_ref(q, k[rows], v[rows], 2, np.array([3, 4]), k_pos)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


@settings(max_examples=25, deadline=None)
@example(n_q=40, n_past=3, n_head=4, group=2, causal=True, picked=False, seed=0)  # always: 2 query heads per kv head
@given(
    n_q=st.integers(1, 100),
    n_past=st.integers(0, 40),
    n_head=st.sampled_from([1, 2, 4]),
    group=st.sampled_from([1, 2]),
    causal=st.booleans(),
    picked=st.booleans(),
    seed=st.integers(0, 1000),
)
@pytest.mark.slow
def test_blocked_attention_matches_reference(n_q, n_past, n_head, group, causal, picked, seed):
    """The prefill kernels (_attention_blocked, one task per head, scores and outputs through _gemm, and
    _attention_blas, the same through sgemm) against the reference: causal or not, grouped-query, over keys picked
    out of a larger store with holes in the positions, query blocks with ragged ends."""
    rng = np.random.default_rng(seed)
    d, n_kv = 8, max(1, n_head // group)
    n = n_past + n_q
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((n_q, n_head * d), (n, n_kv * d), (n, n_kv * d)))
    k_pos = np.sort(rng.choice(3 * n + 1, n, replace=False))
    q_pos = k_pos[n_past:]  # each query sees its own key and the earlier ones
    ref = kernels.attention_ref(q, k, v, n_head, q_pos if causal else None, k_pos if causal else None, n_kv)
    store = np.concatenate([k, rng.standard_normal((5, n_kv * d)).astype(np.float32)])  # extra rows never read
    rows = rng.permutation(len(store))[:n] if picked else np.arange(n)
    rows = np.sort(rows) if picked else rows
    ks, vs = np.zeros_like(store), np.zeros_like(store)
    ks[rows], vs[rows] = k, v
    kh, vh = kernels.split_heads(ks, n_kv), kernels.split_heads(vs, n_kv)
    args = (kernels.split_heads(q, n_head), kh, vh, rows if picked else np.zeros(0, np.int64), n)
    args += (q_pos if causal else k_pos[:0], k_pos, causal)
    out = np.empty((n_head, n_q, d), np.float32)
    kernels._attention_blocked(*args, out)
    np.testing.assert_allclose(kernels.merge_heads(out), ref, rtol=1e-5, atol=1e-5)
    sgemm = kernels._cblas_sgemm()
    if sgemm is not None:  # the same blocks through OpenBLAS's sgemm, in blocks of 16 queries (ragged ends)
        out = np.empty((n_head, n_q, d), np.float32)
        kernels._attention_blas(sgemm, *args, out, 16)
        np.testing.assert_allclose(kernels.merge_heads(out), ref, rtol=1e-5, atol=1e-5)


def test_serial_copies_follow_the_parallel_kernels_error_model():
    """A kernel's serial copy (one thread) computes what its parallel twin does, a division by zero included:
    RMSNorm of an all-zero row with eps 0 is 0/0 in both (nan), not a ZeroDivisionError in one of them."""
    x, w = np.zeros((2, 8), np.float32), np.ones(8, np.float32)
    x[1] = 1.0
    outs = []
    for kernel in (kernels._rmsnorm, kernels._rmsnorm_serial):
        out = np.empty_like(x)
        kernel(x, w, 0.0, out)
        outs.append(out)
    assert np.isnan(outs[1][0]).all() and np.allclose(outs[1][1], 1.0)
    np.testing.assert_array_equal(outs[0], outs[1])


def test_small_work_and_a_busy_machine_run_serial(monkeypatch):
    """The thread pool only for work above PARALLEL_FROM, on as many threads as other processes leave cores free
    (their running threads smoothed over readings at most four a second); one free core means the serial copy."""
    monkeypatch.setattr(kernels, "_LOAD", {"checked": -1.0, "others": 0.0})
    monkeypatch.setattr(kernels, "_THREADS", {"set": None, "ceiling": None})
    monkeypatch.setattr(kernels, "_CPUS", 4)
    monkeypatch.setattr(kernels.numba.config, "NUMBA_NUM_THREADS", 4)
    threads = []
    monkeypatch.setattr(kernels.numba, "set_num_threads", threads.append)
    monkeypatch.setattr(kernels.numba, "get_num_threads", lambda: threads[-1] if threads else 4)
    others = iter([0, 2, 2, 2, 9])
    monkeypatch.setattr(kernels, "others_running", lambda: next(others))
    assert kernels._sized("pool", "serial", kernels.PARALLEL_FROM) == "pool" and threads == []
    assert kernels._sized("pool", "serial", kernels.PARALLEL_FROM - 1) == "serial"
    assert kernels._sized("pool", "serial", kernels.PARALLEL_FROM) == "pool"  # the last reading is recent: no read
    for expected in (3, 2, 2):  # 2 others running: the smoothed count goes 1, 1.5, 1.75 (rounded: 1, 2, 2)
        kernels._LOAD["checked"] = -1.0
        assert kernels._sized("pool", "serial", kernels.PARALLEL_FROM) == "pool" and threads[-1] == expected
    kernels._LOAD["checked"] = -1.0
    assert kernels._sized("pool", "serial", 1 << 40) == "serial" and kernels.machine_busy()


def test_the_pool_never_asks_for_more_threads_than_numba_started(monkeypatch):
    """More free cores than Numba's pool has threads (NUMBA_NUM_THREADS=1 on a 2-core machine, or a free-core
    reading above it): the pool gets what it has, not a ValueError from numba.set_num_threads."""
    monkeypatch.setattr(kernels, "free_cores", lambda: numba.config.NUMBA_NUM_THREADS + 1)
    monkeypatch.setattr(kernels, "_THREADS", {"set": None, "ceiling": None})
    before = numba.get_num_threads()
    try:
        got = kernels._sized("pool", "serial", kernels.PARALLEL_FROM)
        assert got == ("serial" if numba.config.NUMBA_NUM_THREADS == 1 else "pool")
        assert numba.get_num_threads() <= numba.config.NUMBA_NUM_THREADS
    finally:
        numba.set_num_threads(before)


def test_the_callers_thread_count_is_a_ceiling(monkeypatch):
    """numba.set_num_threads by the caller (a bench's --threads 1) bounds the pool; the module's own choices
    (fewer threads while other processes run) do not lower it for good."""
    monkeypatch.setattr(kernels, "_LOAD", {"checked": -1.0, "others": 0.0})
    monkeypatch.setattr(kernels, "_THREADS", {"set": None, "ceiling": None})
    monkeypatch.setattr(kernels, "_CPUS", 4)
    monkeypatch.setattr(kernels.numba.config, "NUMBA_NUM_THREADS", 4)
    pool = {"n": 4}
    monkeypatch.setattr(kernels.numba, "get_num_threads", lambda: pool["n"])
    monkeypatch.setattr(kernels.numba, "set_num_threads", lambda n: pool.update(n=n))
    others = {"n": 0}
    monkeypatch.setattr(kernels, "others_running", lambda: others["n"])

    def sized():
        kernels._LOAD["checked"] = -1.0
        return kernels._sized("pool", "serial", kernels.PARALLEL_FROM)

    assert sized() == "pool" and pool["n"] == 4
    pool["n"] = 1  # the caller asks for one thread
    assert sized() == "serial" and sized() == "serial" and pool["n"] == 1
    pool["n"] = 2
    assert sized() == "pool" and pool["n"] == 2
    others["n"], kernels._LOAD["others"] = 3, 3.0  # ours lowered to 1 by other work: serial, pool left at 2
    assert sized() == "serial" and pool["n"] == 2
    others["n"], kernels._LOAD["others"] = 0, 0.0
    assert sized() == "pool" and pool["n"] == 2  # back to the caller's 2, not the CPUs' 4
    pool["n"] = 4
    others["n"], kernels._LOAD["others"] = 1, 1.0
    assert sized() == "pool" and pool["n"] == 3  # one core taken: three threads, set by the module
    others["n"], kernels._LOAD["others"] = 0, 0.0
    assert sized() == "pool" and pool["n"] == 4  # the module's 3 was not a ceiling


def test_other_processes_running_threads_are_read_from_proc(tmp_path):
    """The running count of /proc/loadavg less this process's own running threads (state R in their stat files,
    whose command names may hold spaces and parentheses); None where the files are not Linux's."""
    (tmp_path / "loadavg").write_text("1.20 0.90 0.70 5/312 4242\n")
    for i, state in enumerate("RSR"):
        (tmp_path / "self" / "task" / str(i)).mkdir(parents=True)
        (tmp_path / "self" / "task" / str(i) / "stat").write_text(f"{i} (a (b) c) {state} 1 1 1 0\n")
    assert kernels.others_running(str(tmp_path)) == 3
    (tmp_path / "loadavg").write_text("1.20 0.90 0.70 1/312 4242\n")
    assert kernels.others_running(str(tmp_path)) == 0  # never negative
    assert kernels.others_running(str(tmp_path / "missing")) is None


@pytest.mark.parametrize("norm", [kernels.rmsnorm, kernels.rmsnorm_ref])
def test_rmsnorm_eps_counts_for_small_inputs(norm):
    """Rows of +-1e-3 have a mean square of 1e-6, as large as eps: y = 1e-3 / sqrt(1e-6 + 1e-6) = 1 / sqrt(2), not
    1 (eps dropped). Inputs of order 1, as in the kernel-against-reference test, cannot tell the two apart."""
    x = np.full((3, 16), 1e-3, np.float32)
    x[1] *= -1
    x[2, ::2] *= -1
    w = np.full(16, 2.0, np.float32)
    np.testing.assert_allclose(norm(x, w, 1e-6), 2.0 * np.sign(x) / np.sqrt(2.0), rtol=1e-5)
    np.testing.assert_allclose(norm(x, w, 0.0), 2.0 * np.sign(x), rtol=1e-5)


def test_openblas_runs_on_one_thread():
    """A many-row linear goes through NumPy's sgemm with OpenBLAS on one thread: its own threads would spin on the
    cores Numba's pool then waits for (kernels._blas_one_thread)."""
    found = kernels._blas_threads()
    if not found:
        pytest.skip("NumPy's BLAS is not an OpenBLAS this process can reach")
    kernels.set_backend("blas")
    kernels.linear(np.ones((4, 8), np.float32), np.ones((3, 8), np.float32))  # many rows: sgemm
    assert found[1]() == 1
