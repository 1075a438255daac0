"""Compute kernels: Numba-jitted, each beside the plain-NumPy reference it is tested against.

Everything is float32 in, float32 out. Shapes in the trailing comments use T for tokens (rows), E for the model
width, N for keys in a cache and H, D for heads and head size.

Which kernel runs where (measured in docs/performance.md):
- one row (decode): `matvec`, a dot product per output row, the rows split across the cores: bandwidth-bound.
  Weights in float32 or int8 (an Int8Matrix, widened as read); `matvec_half` for 16-bit weights; `matvec_q4` and
  `matvec_q8` for GGUF blocks kept quantized (quant.BlockMatrix), 32 rows at a time; `gate_up_silu` fuses Llama's
  two FFN input projections and the activation.
- many rows (prefill, ViT): by default ("auto") NumPy's sgemm (OpenBLAS, one thread per call) in fixed tiles of
  the output, called from the tasks of Numba's pool: `matmul_blas` for float32 weights, `matmul_blas_int8` and
  `matmul_blas_blocks` widening int8 and GGUF block weights tile by tile. Where NumPy's BLAS is not an OpenBLAS,
  or with `set_backend("numba")`, our own `matmul`: 4x4 register tiles over 64-column panels of the weights
  (`_gemm`, also the core of the blocked attention), the readable reference.
- attention: one task per query and head for a few queries (decode); for many (prefill), one task per head, its
  two products per block of queries through sgemm (`_attention_blas`), or our GEMM (`_attention_blocked`, the
  reference, with the "numba" backend or without an OpenBLAS).
- anything small runs a serial copy of its kernel (PARALLEL_FROM), the rest on as many threads as other processes
  leave cores free (free_cores: one free core, serial), and
  OpenBLAS one thread.
"""

import contextlib
import functools
import math
import os
import time
import types

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange
from numba import types as nb_types
from numba.core import cgutils, event
from numba.experimental import function_type  # noqa: F401 (lets kernels take C functions as arguments)
from numba.extending import intrinsic, overload

from .dtypes import Int8Matrix, to_float32, to_storage  # noqa: F401 (kernels.to_storage is public API)
from .quant import GROUP_ROWS, BlockMatrix

# "auto": OpenBLAS's sgemm (one thread per call) in fixed tiles of the output, the calls being the tasks of Numba's
# pool, for every many-row product: float32 weights as they are (`matmul_blas`), int8 and GGUF block weights
# widened to float32 tile by tile inside the task (`matmul_blas_int8`, `matmul_blas_blocks`). Measured on this
# project's 2-core machine (Sapphire Rapids), prefill of 512 tokens, trees interleaved, load ~1.3 with other jobs
# paused: SmolLM2 float32 642-655 tokens/s against 495-572 for our matmul; SmolLM2 Q4_1 as stored 637-672 against
# 469-524 for the sgemm tiles dealt to Python threads that came before; int8 642-666 against 432-529 (OPT-125M
# shapes: 965-1,022 against 739-780) for our matmul. Sgemm on Python threads had lost to our matmul inside a
# forward though it won alone on its shapes (228-256 GFLOP/s against our 156-179): Numba's pool threads spin
# between kernels on the cores the Python threads need; on the pool's own threads that conflict is gone.
BACKENDS = ("auto", "blas", "numba")
_BACKEND = {"matmul": "auto"}


def get_backend() -> str:
    return _BACKEND["matmul"]


def set_backend(matmul: str) -> None:
    """Choose the many-row matmul: "auto" (the default: OpenBLAS's sgemm in tiles on Numba's pool where NumPy's BLAS
    is an OpenBLAS, else ours), "blas" (the same, else NumPy's matmul of the widened matrix) or "numba" (ours, the
    readable reference, 4x4 register tiles). Decode always uses the matvec kernels."""
    if matmul not in BACKENDS:
        raise ValueError(f"matmul backend must be one of {', '.join(BACKENDS)}, got {matmul!r}")
    _BACKEND["matmul"] = matmul


class _FirstCompile(event.Listener):
    def __init__(self, callback):
        self.callback = callback

    def on_start(self, event):
        callback, self.callback = self.callback, None
        if callback is not None:
            callback()

    def on_end(self, event):
        pass


class _CompileClock(event.Listener):
    """Seconds this process spends compiling kernels (outermost compiles: a kernel's callees compile inside it)."""

    def __init__(self):
        self.depth, self.seconds, self.since = 0, 0.0, 0.0

    def on_start(self, event):
        if self.depth == 0:
            self.since = time.perf_counter()
        self.depth += 1

    def on_end(self, event):
        self.depth -= 1
        if self.depth == 0:
            self.seconds += time.perf_counter() - self.since


_COMPILE_CLOCK = _CompileClock()
event.register("numba:compile", _COMPILE_CLOCK)


def compile_seconds() -> float:
    """Seconds spent compiling Numba kernels so far in this process, a compile under way counted up to now:
    progress bars leave it out of their rates, so a first run's time left is not inflated by it."""
    c = _COMPILE_CLOCK
    return c.seconds + (time.perf_counter() - c.since if c.depth else 0.0)


@contextlib.contextmanager
def on_first_compile(callback):
    """Within the block, call `callback()` once, when Numba really compiles a kernel (every kernel is
    `cache=True`, so that happens on the first run after installing or editing the code, not when the disk cache
    has it)."""
    listener = _FirstCompile(callback)
    event.register("numba:compile", listener)
    try:
        yield
    finally:
        event.unregister("numba:compile", listener)


# Training kernels must give the same bits on every run, or a resumed run drifts from an uninterrupted one. With
# fast-math's "reassoc" (and "contract"), LLVM may vectorize a loop or not depending on a run-time check of the
# arrays' addresses, and the two paths sum in different orders (seen: a resumed radial run 2e-8 off). So training
# kernels leave both out, and arrange their loops so that the vectorized ones are elementwise (a dot product per
# key is a sweep over the keys, accumulating one dimension at a time: see radial_train._dots).
TRAINING_FASTMATH = {"nnan", "ninf", "nsz", "arcp"}


# When to wake Numba's thread pool. On an idle machine a parallel call costs ~2 us more than a serial one (OpenMP
# layer, measured on this project's 2-core machine), which pays once a kernel reads about 64 KB: a [576] x [576,
# 576] Q4_1 matvec reads 207 KB (~20 us on one core), SmolLM2's gate/up/down 553 KB each, OPT-125M's fc1 in
# float32 9.4 MB. So the rule is in bytes: a kernel reading (or, for the compute-bound matmul and attention,
# multiply-adding) at least PARALLEL_FROM runs on the pool.
#
# With fewer free cores than pool threads a parallel call costs milliseconds instead: it waits until its last
# thread gets a core, and the threads that finished first spin (OpenMP's default) on the cores the late one
# needs. Measured on 2 cores with one other busy process (a niced training run), SmolLM2 Q4_1 decode on a 2-thread
# pool: 1.0 tokens/s, against 49 on one thread; at a load average of 23, a [768] x [3072, 768] matvec took 36 ms
# with the pool against 0.13 ms without it. Spinning less (GOMP_SPINCOUNT=0) avoids the collapse (49 tokens/s)
# but halves the idle machine's speed (78 -> 40 tokens/s: a sleeping thread takes ~10 us to wake, 200 times a
# token). So the pool gets the free cores: the CPUs less the threads of other processes that want one right now
# (Linux's /proc: its running count less ours, smoothed over the last ~second), one free core meaning the serial
# copies. Without /proc, a load average above the CPUs by more than one (ours counted) means serial.
PARALLEL_FROM = 64 << 10
_LOAD = {"checked": -1.0, "others": 0.0, "free": 1}
_CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def others_running(proc="/proc") -> int | None:
    """Threads of other processes runnable right now: the running count in /proc/loadavg less this process's own
    running threads (/proc/self/task/*/stat), or None where /proc is not Linux's."""
    try:
        with open(f"{proc}/loadavg") as f:
            running = int(f.read().split()[3].split("/")[0])  # "0.52 0.58 0.59 3/412 1234": 3 running
        own = 0
        for task in os.scandir(f"{proc}/self/task"):
            with open(f"{task.path}/stat", "rb") as f:
                own += f.read().rpartition(b")")[2].split()[0] == b"R"  # "pid (name) R ...": the state
    except (OSError, ValueError, IndexError):
        return None
    return max(0, running - own)


def free_cores() -> int:
    """Cores this process's thread pool can have now (see PARALLEL_FROM), read at most four times a second (with
    the caller's thread count: a decode token asks ~300 times, and each reading costs microseconds)."""
    now = time.monotonic()
    if now - _LOAD["checked"] > 0.25:
        others = others_running()
        if others is None:
            try:
                others = _CPUS if os.getloadavg()[0] > _CPUS + 1 else 0
            except (AttributeError, OSError):  # no load average either (Windows): assume the cores are free
                others = 0
        _LOAD.update(checked=now, others=0.5 * _LOAD["others"] + 0.5 * others)
        _LOAD["free"] = max(1, min(_CPUS, _thread_ceiling(), _CPUS - round(_LOAD["others"])))
    return _LOAD["free"]


_THREADS = {"set": None, "ceiling": None}  # the pool size this module last chose, and the caller's


def _thread_ceiling() -> int:
    """The most threads the caller lets the pool have: Numba's thread count, unless it is the one this module
    chose last (a numba.set_num_threads(1) by a user or a bench stays in force)."""
    now = numba.get_num_threads()
    if now != _THREADS["set"]:
        _THREADS["ceiling"] = now
    return _THREADS["ceiling"]


def machine_busy() -> bool:
    """Whether the pool gets a single thread (other work leaves one free core, or the caller set one thread):
    every kernel then runs serially."""
    return free_cores() == 1


def _one_thread(kernel):
    """`kernel` compiled again without the thread pool (prange runs as range), under its own name so Numba's
    disk cache keeps the two apart; it lets go of the GIL, so Python threads can run copies side by side. With
    NumPy's error model, as the pool's kernels have: under Python's (njit's default) every float division is checked
    for zero, a branch that kept loops such as SiLU's scalar (3.0 ms against 0.53 for SmolLM2's 512 x 1536 on one
    core; a one-thread prefill of 512 tokens 7-16% faster), and a serial copy raised where its parallel twin gives
    inf or nan."""
    f = kernel.py_func
    g = types.FunctionType(f.__code__, f.__globals__, f.__name__ + "_serial", f.__defaults__, f.__closure__)
    g.__qualname__ = g.__name__
    fastmath = kernel.targetoptions.get("fastmath", False)
    return njit(fastmath=fastmath, cache=True, nogil=True, error_model="numpy")(g)


def _sized(kernel, serial, work: int):
    """The parallel kernel, on as many threads as there are free cores, for work worth the thread pool (bytes read,
    or multiply-adds: see PARALLEL_FROM) on a machine with cores to spare; else its serial copy."""
    threads = min(free_cores(), numba.config.NUMBA_NUM_THREADS) if work >= PARALLEL_FROM else 1
    if threads == 1:
        return serial
    if _THREADS["set"] != threads:  # Numba's own getter takes a lock: asked only when the count changes
        if numba.get_num_threads() != threads:
            numba.set_num_threads(threads)
        _THREADS["set"] = threads
    return kernel


# ---------------------------------------------------------------------------------------------------- linear


@intrinsic
def prefetch(typingctx, array, byte):
    """Start loading the cache line holding byte `byte` of `array`'s data, for a read soon (LLVM's llvm.prefetch:
    a hint; an address past the array's end is harmless, as x86 and Arm ignore prefetches that would fault)."""

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        address = builder.gep(builder.bitcast(data, ir.IntType(8).as_pointer()), [args[1]])
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        hint = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), "llvm.prefetch.p0"
        )
        builder.call(hint, [address, i32(0), i32(3), i32(1)])  # read, keep in all cache levels, data
        return context.get_dummy_value()

    return nb_types.none(array, nb_types.intp), codegen


# Rows ahead for the row-by-row matvecs (int8, float32). SmolLM2 decode on one core, tokens/s, the other core busy:
# int8 36.4 without, 51.2 / 50.3 / 46.7 / 45.4 with 2 / 4 / 8 / 16 rows; float32 18.4 without, 20.0 with 2.
PREFETCH_ROWS = 2


@njit(inline="always")
def _prefetch_row(w, n):
    """Prefetch row n + PREFETCH_ROWS of a [out, in] matrix (a hint: past the last row it does nothing)."""
    row = w.shape[1] * w.itemsize
    for line in range(0, row, 64):
        prefetch(w, (n + PREFETCH_ROWS) * row + line)


def linear_ref(x, w, b=None):
    y = x @ w.T  # [T, in] @ [out, in].T -> [T, out]
    return y if b is None else y + b


@njit(parallel=True, fastmath=True, cache=True)
def matvec(x, w, scale, b, out):  # [in], [out, in] float32 or int8, [out] or [0], [out] or [0] -> out [out]
    """One row times a weight matrix: a dot product per output, split across cores. Bandwidth-bound. int8
    weights (an Int8Matrix's q and scale) are widened as they are read, each dot product times its row's scale."""
    n_out, n_in = w.shape
    for n in prange(n_out):
        _prefetch_row(w, n)
        acc = np.float32(0.0)
        for k in range(n_in):
            acc += x[k] * np.float32(w[n, k])
        if scale.size:
            acc *= scale[n]
        out[n] = acc + b[n] if b.size else acc


matvec_serial = _one_thread(matvec)


@njit(fastmath=True, inline="always")
def _dot(a, i, w, j, n_in):
    acc = np.float32(0.0)
    for k in range(np.uint64(n_in)):
        acc += a[i, k] * np.float32(w[j, k])
    return acc


@njit(fastmath=True, inline="always")
def _tile_4x4(a, i, w, j, k_lo, k_hi, out):
    """out[i:i+4, j:j+4] += a[i:i+4, k_lo:k_hi] @ w[j:j+4, k_lo:k_hi].T in 16 register accumulators, each loaded
    value used four times. The k bounds are unsigned: Numba then drops the negative-index wraparound test, which
    would keep LLVM from vectorizing the loop (measured: 16 against 144 GFLOP/s on one core)."""
    c00 = c01 = c02 = c03 = c10 = c11 = c12 = c13 = np.float32(0.0)
    c20 = c21 = c22 = c23 = c30 = c31 = c32 = c33 = np.float32(0.0)
    for k in range(np.uint64(k_lo), np.uint64(k_hi)):
        a0, a1, a2, a3 = a[i, k], a[i + 1, k], a[i + 2, k], a[i + 3, k]
        w0, w1 = np.float32(w[j, k]), np.float32(w[j + 1, k])
        w2, w3 = np.float32(w[j + 2, k]), np.float32(w[j + 3, k])
        c00 += a0 * w0
        c01 += a0 * w1
        c02 += a0 * w2
        c03 += a0 * w3
        c10 += a1 * w0
        c11 += a1 * w1
        c12 += a1 * w2
        c13 += a1 * w3
        c20 += a2 * w0
        c21 += a2 * w1
        c22 += a2 * w2
        c23 += a2 * w3
        c30 += a3 * w0
        c31 += a3 * w1
        c32 += a3 * w2
        c33 += a3 * w3
    out[i, j] += c00
    out[i, j + 1] += c01
    out[i, j + 2] += c02
    out[i, j + 3] += c03
    out[i + 1, j] += c10
    out[i + 1, j + 1] += c11
    out[i + 1, j + 2] += c12
    out[i + 1, j + 3] += c13
    out[i + 2, j] += c20
    out[i + 2, j + 1] += c21
    out[i + 2, j + 2] += c22
    out[i + 2, j + 3] += c23
    out[i + 3, j] += c30
    out[i + 3, j + 1] += c31
    out[i + 3, j + 2] += c32
    out[i + 3, j + 3] += c33


@njit(fastmath=True, cache=True)
def _gemm(a, w, out, n_in, k_block=1024):  # [T, >=n_in], [n, >=n_in] f32 or int8 -> out[:T, :n] (serial)
    """out[:T, :n] = a[:, :n_in] @ w[:, :n_in].T in 4x4 register tiles, the sum over n_in in slices of k_block so
    that the eight rows a tile reads (4 of a, 4 of w) stay in L1 (fc2's 3072-wide rows would not)."""
    n_rows, n_out = a.shape[0], w.shape[0]
    i_full, j_full = n_rows // 4 * 4, n_out // 4 * 4
    out[:i_full, :j_full] = 0.0
    for k_lo in range(0, n_in, k_block):
        for i in range(0, i_full, 4):
            for j in range(0, j_full, 4):
                _tile_4x4(a, i, w, j, k_lo, min(n_in, k_lo + k_block), out)
    for i in range(n_rows):  # ragged last rows and columns
        for j in range(j_full if i < i_full else 0, n_out):
            out[i, j] = _dot(a, i, w, j, n_in)


@njit(parallel=True, fastmath=True, cache=True)
def matmul(a, w, scale, b, out, cols_per_task=64):  # [T, in], [out, in] f32 or int8, [out] or [0] x2 -> [T, out]
    """a @ w.T. Each task owns 64 output columns, whose weight rows stay in L2 while `a` streams past (`_gemm`).
    int8 weights are widened as they are read; each output column is multiplied by its row's scale at the end,
    then the bias is added."""
    n_rows, n_in = a.shape
    n_out = w.shape[0]
    for t in prange((n_out + cols_per_task - 1) // cols_per_task):
        j_lo = t * cols_per_task
        j_hi = min(n_out, j_lo + cols_per_task)
        _gemm(a, w[j_lo:j_hi], out[:, j_lo:j_hi], n_in)
        for i in range(n_rows):
            for j in range(j_lo, j_hi):
                y = out[i, j] * scale[j] if scale.size else out[i, j]
                out[i, j] = y + b[j] if b.size else y


matmul_serial = _one_thread(matmul)


# Half-precision weights (an option of `load`): decode is bandwidth-bound, so reading 2 bytes per weight instead
# of 4 roughly doubles its speed. Each row is widened to float32 in a small buffer, then dotted in float32.
# float16 -> float32: move sign, exponent and mantissa into float32's fields ((h & 0x7fff) << 13) and multiply
# by 2^112 to correct the exponent bias (127 - 15); exact for normal and subnormal halves (weights hold no inf).
# bfloat16 -> float32: the 16 stored bits are float32's top half.

_F16_BIAS = np.float32(2.0**112)


@njit(parallel=True, fastmath=True, cache=True)
def matvec_half(x, w, b, is_bf16, out):  # [in], [out, in] uint16 bits, [out] or [0] -> out [out]
    n_out, n_in = w.shape
    rows_per_task = 32
    for t in prange((n_out + rows_per_task - 1) // rows_per_task):
        bits = np.empty(n_in, np.uint32)
        wide = bits.view(np.float32)
        for n in range(t * rows_per_task, min(n_out, (t + 1) * rows_per_task)):
            if is_bf16:
                for k in range(n_in):
                    bits[k] = np.uint32(w[n, k]) << 16
            else:
                for k in range(n_in):
                    h = np.uint32(w[n, k])
                    bits[k] = ((h & 0x8000) << 16) | ((h & 0x7FFF) << 13)
            acc = np.float32(0.0)
            for k in range(n_in):
                acc += x[k] * wide[k]
            if not is_bf16:
                acc *= _F16_BIAS
            out[n] = acc + b[n] if b.size else acc


matvec_half_serial = _one_thread(matvec_half)


# GGUF's block formats (quant.py): BlockMatrix, rows interleaved in groups of 32. A dot product per row needs, per
# block of 32 weights, sum_j (scale q_j + offset) x_j = scale * sum_j q_j x_j + offset * sum_j x_j: the block sums
# of x are computed once per matvec (`_q4_prepare`), and the kernels accumulate sum_j q_j x_j in float32 for the 32
# rows of a group side by side (one SIMD loop over the rows), then add the block's scale and offset terms.
#
# A 4-bit byte holds q_j (low nibble) and q_{j+16} (high): its value is v = q_j + 16 q_{j+16}. Rather than unpack
# the nibbles with integer shifts (Numba widens every integer operation to 64 bits, and LLVM then vectorizes
# them badly: 64-bit lanes, 3-7 GMAC/s), the kernel converts the byte to float once and splits it there:
#     q_j x_j + q_{j+16} x_{j+16} = v x_j + floor(v / 16) (x_{j+16} - 16 x_j)
# all exact in float32 (v < 256, dividing by 16 is exact), two multiply-adds per byte with x2 = x_{j+16} - 16 x_j
# prepared once per matvec like the block sums. llama.cpp instead quantizes x to 8 bits per block and multiplies
# integers; written that way in Numba (int32 partial sums, which LLVM turns into vpmaddwd), the kernel was no faster
# here than this one (docs/performance.md), and this one keeps x in float32: the only error is the file's own.
#
# Streamed from memory (a decode step reads every block matrix once: 66 MB for SmolLM2's layers), these kernels
# ran at 4.5 GB/s where the same work on cached data runs at 8 (one core, measured): the hardware's prefetcher
# does not run far enough ahead of a loop that reads a group's 512-byte block and then computes on it for ~200
# cycles. So each block's loop first asks for the block PREFETCH_BLOCKS ahead (`prefetch`, LLVM's llvm.prefetch,
# a hint with no effect on results): SmolLM2's 4-bit matrices 14.8 -> 10.1 ms per token on one core.


@intrinsic
def _half_bits_to_float(typingctx, bits):
    """float16 bits (uint16) -> float32 in one instruction (F16C's vcvtph2ps): LLVM's fpext from `half`."""

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return nb_types.float32(nb_types.uint16), codegen


PREFETCH_BLOCKS = 4  # blocks ahead (measured on SmolLM2's 4-bit matrices, one core: 2 -> 10.4 ms, 4 -> 9.9, 8 -> 10.7)


@njit(inline="always")
def _prefetch_block(q, scale, offset, g, b):
    """Prefetch block b + PREFETCH_BLOCKS of group g: its weight bytes [bytes, G] and its scales (and offsets)."""
    n_blocks, per_block = q.shape[1], q.shape[2] * q.shape[3]
    ahead = g * n_blocks + np.int64(b) + PREFETCH_BLOCKS
    for line in range(0, per_block, 64):
        prefetch(q, ahead * per_block + line)
    prefetch(scale, ahead * q.shape[3] * scale.itemsize)
    if offset.size:
        prefetch(offset, ahead * q.shape[3] * offset.itemsize)


def widen(v):
    """A scale as float32 inside a kernel: float16 bits (uint16) converted, float32 as it is."""
    return np.float32(v.view(np.float16)) if np.asarray(v).dtype == np.uint16 else np.float32(v)


@overload(widen, inline="always")
def _widen_jit(v):
    if v == nb_types.uint16:
        return lambda v: _half_bits_to_float(v)
    return lambda v: np.float32(v)


_SIXTEENTH = np.float32(1.0 / 16.0)
_NO_SCALE = np.zeros(0, np.uint16)  # an 8-bit matrix's absent offsets, for _prefetch_block
_NO_OFFSET = np.zeros((0, 0, 0), np.float32)  # and for matmul_blas_blocks (typed as a 4-bit matrix's offsets)


@njit(fastmath=True, cache=True)
def _q4_prepare(x):  # [in] -> block sums [in/32], x2 [in/2] = x_{j+16} - 16 x_j per block
    n_blocks = x.size // 32
    sums, x2 = np.empty(n_blocks, np.float32), np.empty(n_blocks * 16, np.float32)
    for b in range(n_blocks):
        block = x[b * 32 : b * 32 + 32]
        x2[b * 16 : b * 16 + 16] = block[16:] - np.float32(16.0) * block[:16]
        sums[b] = block.sum()
    return sums, x2


_1, _2, _3, _4 = (np.uint64(i) for i in range(1, 5))  # unsigned offsets: uint64 + int64 would be a float in Numba


@njit(fastmath=True, inline="always")
def _byte4(v, lo, d):  # a 4-bit byte's value v (float) -> q_j x_j + q_{j+16} x_{j+16} (see above)
    return v * lo + np.floor(v * _SIXTEENTH) * d


@njit(fastmath=True, inline="always")
def _q4_rows(x, x2, sums, q, scale, offset, g, acc, part):
    """acc[:G] = the dot products of x with the G rows of group g: q [groups, blocks, 16, G], scale/offset
    [groups, blocks, G] (part [G] scratch). The row loop's length is the constant GROUP_ROWS and the bounds are
    unsigned (Numba then drops its negative-index checks), so LLVM turns the row loop into a few SIMD registers.
    Four bytes per pass: LLVM cannot keep part in registers (it might alias q), so each pass reads and writes it
    once for four bytes, not four times (measured: SmolLM2's 4-bit matrices 10.5 -> 9.0 ms a token, one core)."""
    acc[:] = 0.0
    for b in range(np.uint64(q.shape[1])):
        _prefetch_block(q, scale, offset, g, b)
        part[:] = 0.0
        for j in range(np.uint64(0), np.uint64(16), _4):
            i, h = b * np.uint64(32) + j, b * np.uint64(16) + j
            l0, l1, l2, l3, d0, d1, d2, d3 = (
                x[i],
                x[i + _1],
                x[i + _2],
                x[i + _3],
                x2[h],
                x2[h + _1],
                x2[h + _2],
                x2[h + _3],
            )
            for r in range(np.uint64(GROUP_ROWS)):
                v0, v1 = np.float32(q[g, b, j, r]), np.float32(q[g, b, j + _1, r])
                v2, v3 = np.float32(q[g, b, j + _2, r]), np.float32(q[g, b, j + _3, r])
                part[r] += (_byte4(v0, l0, d0) + _byte4(v1, l1, d1)) + (_byte4(v2, l2, d2) + _byte4(v3, l3, d3))
        for r in range(np.uint64(GROUP_ROWS)):
            acc[r] += widen(scale[g, b, r]) * part[r] + widen(offset[g, b, r]) * sums[b]


@njit(fastmath=True, inline="always")
def _q8_rows(x, q, scale, g, acc, part):
    """acc[:G] for group g of an 8-bit matrix: q [groups, blocks, block, G] int8, scale [groups, blocks, G]. Here
    the row loop's length is read from q (measured: with the constant, LLVM unrolled it into scalar code, 4x slower;
    the 4-bit loop's extra floor() tips it the other way). Four bytes per pass, as in _q4_rows (blocks of 32 and
    16 both divide by 4; measured: SmolLM2's Q8_0 LM head 2.75 -> 2.13 ms, one core)."""
    block, n_rows = np.uint64(q.shape[2]), np.uint64(q.shape[3])
    acc[:] = 0.0
    for b in range(np.uint64(q.shape[1])):
        _prefetch_block(q, scale, _NO_SCALE, g, b)
        part[:] = 0.0
        for j in range(np.uint64(0), block, _4):
            i = b * block + j
            x0, x1, x2, x3 = x[i], x[i + _1], x[i + _2], x[i + _3]
            for r in range(n_rows):
                w0, w1 = np.float32(q[g, b, j, r]), np.float32(q[g, b, j + _1, r])
                w2, w3 = np.float32(q[g, b, j + _2, r]), np.float32(q[g, b, j + _3, r])
                part[r] += (w0 * x0 + w1 * x1) + (w2 * x2 + w3 * x3)
        for r in range(n_rows):
            acc[r] += widen(scale[g, b, r]) * part[r]


@njit(parallel=True, fastmath=True, cache=True)
def matvec_q4(x, q, scale, offset, b, out):  # [in], BlockMatrix 4-bit arrays, [out] or [0] -> out [out]
    """One row times a 4-bit block matrix (Q4_0, Q4_1, Q4_K): a task per group of 32 rows."""
    G = GROUP_ROWS
    sums, x2 = _q4_prepare(x)
    for g in prange(q.shape[0]):
        acc, part = np.empty(G, np.float32), np.empty(G, np.float32)
        _q4_rows(x, x2, sums, q, scale, offset, g, acc, part)
        for r in range(min(G, out.size - g * G)):
            out[g * G + r] = acc[r] + b[g * G + r] if b.size else acc[r]


matvec_q4_serial = _one_thread(matvec_q4)


@njit(parallel=True, fastmath=True, cache=True)
def matvec_q8(x, q, scale, b, out):  # [in], BlockMatrix 8-bit arrays, [out] or [0] -> out [out]
    """One row times an 8-bit block matrix (Q8_0, Q6_K): a task per group of 32 rows."""
    G = GROUP_ROWS
    for g in prange(q.shape[0]):
        acc, part = np.empty(G, np.float32), np.empty(G, np.float32)
        _q8_rows(x, q, scale, g, acc, part)
        for r in range(min(G, out.size - g * G)):
            out[g * G + r] = acc[r] + b[g * G + r] if b.size else acc[r]


matvec_q8_serial = _one_thread(matvec_q8)


@njit(parallel=True, cache=True)
def dequantize_q4(q, scale, offset, g_lo, out):  # groups g_lo.. -> out [in, rows] float32 (transposed)
    """Groups of a 4-bit block matrix as float32 columns, for many-row products (prefill): a task per group. The
    transposed layout keeps the group's 32 rows side by side as they are in q, so the stores are contiguous. No
    fastmath: scale * q + offset rounded twice, as BlockMatrix.dequantize does (a streamed LM head widens its rows
    that way), not fused into one multiply-add."""
    n_blocks, _, G = q.shape[1:]
    for g in prange(out.shape[1] // G):
        for b in range(np.uint64(n_blocks)):
            for j in range(np.uint64(16)):
                lo, hi = out[b * np.uint64(32) + j], out[b * np.uint64(32) + np.uint64(16) + j]
                for r in range(np.uint64(G)):
                    v = np.float32(q[g_lo + g, b, j, r])
                    high = np.floor(v * _SIXTEENTH)
                    s, o = widen(scale[g_lo + g, b, r]), widen(offset[g_lo + g, b, r])
                    lo[g * G + r] = s * (v - np.float32(16.0) * high) + o
                    hi[g * G + r] = s * high + o


@njit(parallel=True, fastmath=True, cache=True)
def dequantize_q8(q, scale, g_lo, out):  # groups g_lo.. -> out [in, rows] float32 (transposed)
    n_blocks, block, G = q.shape[1:]
    for g in prange(out.shape[1] // G):
        for b in range(np.uint64(n_blocks)):
            for j in range(np.uint64(block)):
                col = out[b * np.uint64(block) + j]
                for r in range(np.uint64(G)):
                    col[g * G + r] = widen(scale[g_lo + g, b, r]) * np.float32(q[g_lo + g, b, j, r])


dequantize_q4_serial, dequantize_q8_serial = _one_thread(dequantize_q4), _one_thread(dequantize_q8)
DEQUANTIZE_ROWS = 4096  # a prefill widens a block matrix this many rows at a time (the LM head: 9 MB, not 113)
MATVEC_ROWS = 16  # up to this many rows a block matrix is multiplied row by row: widening it costs more (measured)


def _block_linear(x, w: BlockMatrix, bias):
    """linear() for a BlockMatrix: matvec_q4/matvec_q8 for one row; for many, tiles of the weights widened to
    float32 inside the product (matmul_blas_blocks), or without OpenBLAS (or with the "numba" backend) up to
    DEQUANTIZE_ROWS rows at a time widened, then multiplied by `linear`."""
    if x.shape[0] == 1:
        out, b = np.empty((1, w.shape[0]), np.float32), _NO_BIAS if bias is None else bias
        if w.bits == 4:
            _sized(matvec_q4, matvec_q4_serial, w.nbytes)(x[0], w.q, w.scale, w.offset, b, out[0])
        else:
            _sized(matvec_q8, matvec_q8_serial, w.nbytes)(x[0], w.q, w.scale, b, out[0])
        return out
    if x.shape[0] <= MATVEC_ROWS:
        return np.concatenate([_block_linear(x[i : i + 1], w, bias) for i in range(x.shape[0])])
    y = np.empty((x.shape[0], w.shape[0]), np.float32)
    sgemm = _sgemm_for(x)
    if sgemm is not None:
        kernel = _sized(matmul_blas_blocks, matmul_blas_blocks_serial, x.shape[0] * w.size)
        offset = _NO_OFFSET if w.offset is None else w.offset
        kernel(sgemm, np.ascontiguousarray(x), w.q, w.scale, offset, y, BLAS_ROWS, BLAS_COLUMNS)
    else:
        for lo in range(0, w.shape[0], DEQUANTIZE_ROWS):
            hi = min(w.shape[0], lo + DEQUANTIZE_ROWS)
            y[:, lo:hi] = linear(x, _widened_rows(w, lo, hi))
    if bias is not None:
        y += bias
    return y


def _widened_rows(w: BlockMatrix, lo, hi):
    """Rows lo..hi of a block matrix (lo a multiple of GROUP_ROWS) as float32 [hi - lo, in]."""
    G = w.q.shape[3]
    cols = np.empty((w.shape[1], -(-(hi - lo) // G) * G), np.float32)  # [in, rows]
    if w.bits == 4:
        _sized(dequantize_q4, dequantize_q4_serial, cols.nbytes)(w.q, w.scale, w.offset, lo // G, cols)
    else:
        _sized(dequantize_q8, dequantize_q8_serial, cols.nbytes)(w.q, w.scale, lo // G, cols)
    return np.ascontiguousarray(cols[:, : hi - lo].T)


_NO_BIAS = np.zeros(0, np.float32)


def linear(x, w, b=None):
    """y = x @ w.T + b for weights in nn.Linear's [out, in] layout: our matvec for one row; for many, OpenBLAS's
    sgemm in tiles on Numba's pool (or our matmul: see set_backend). `w` may be stored as float16 or bfloat16
    (uint16 bits) or as an Int8Matrix; computation is float32 either way. A GGUF block matrix (quant.BlockMatrix)
    is read as it is stored for one row and widened in tiles for many (`_block_linear`)."""
    if isinstance(w, BlockMatrix):
        return _block_linear(x, w, b)
    bias = _NO_BIAS if b is None else b
    q, scale = (w.q, w.scale) if isinstance(w, Int8Matrix) else (w, _NO_BIAS)
    if x.shape[0] == 1:
        out = np.empty((1, q.shape[0]), np.float32)
        if q.dtype in (np.float32, np.int8):
            _sized(matvec, matvec_serial, q.nbytes)(x[0], q, scale, bias, out[0])  # [1, in] -> [1, out]
        else:
            _sized(matvec_half, matvec_half_serial, q.nbytes)(
                x[0], q.view(np.uint16), bias, q.dtype == np.uint16, out[0]
            )
        return out
    x, work = np.ascontiguousarray(x), x.shape[0] * q.size
    out = np.empty((x.shape[0], q.shape[0]), np.float32)
    sgemm = _sgemm_for(x)
    if sgemm is not None and q.dtype == np.int8:
        _sized(matmul_blas_int8, matmul_blas_int8_serial, work)(sgemm, x, q, scale, out, BLAS_ROWS, BLAS_COLUMNS)
    elif sgemm is not None:
        wf = np.ascontiguousarray(to_float32(q))  # half precision widened once: prefill is compute-bound
        _sized(matmul_blas, matmul_blas_serial, work)(sgemm, x, wf, out, BLAS_ROWS, BLAS_COLUMNS)
    elif _BACKEND["matmul"] == "blas" and x.dtype == np.float32:  # NumPy's BLAS is not an OpenBLAS we can call
        np.matmul(x, to_float32(w).T, out=out)
    else:
        q = q if q.dtype in (np.float32, np.int8) else to_float32(q)
        _sized(matmul, matmul_serial, work)(x, q, scale, bias, out)
        return out
    if b is not None:
        out += b
    return out


def _sgemm_for(x):
    """OpenBLAS's sgemm for a many-row product of x, on one thread per call; None with the "numba" backend, for
    float64 rows (the router's features: sgemm would read their bytes as float32) or without an OpenBLAS."""
    if _BACKEND["matmul"] == "numba" or x.dtype != np.float32:
        return None
    sgemm = _cblas_sgemm()
    if sgemm is not None:
        _blas_one_thread()
    return sgemm


BLAS_COLUMNS = 256  # sgemm computes the output in tiles of this many columns
BLAS_ROWS = 256  # and matmul_blas of this many rows (SmolLM2's shapes, 512 rows, 2 cores: 128 -> 168-237 GFLOP/s,
# 256 -> 190-271, 512 -> 146-283)


@functools.cache
def _openblas_libraries() -> tuple:
    """The OpenBLAS libraries this process has mapped (NumPy's), opened through ctypes; () without /proc."""
    import ctypes

    try:
        maps = open("/proc/self/maps").read().splitlines()
    except OSError:
        return ()
    paths = {ln.split()[-1] for ln in maps if "openblas" in ln.lower() and ln.split()[-1].startswith("/")}
    return tuple(ctypes.CDLL(path) for path in sorted(paths))


def _openblas(name):
    """NumPy's OpenBLAS's function `name` (without its build's prefix and suffix, e.g. "set_num_threads") through
    ctypes, or None if it is not found (another BLAS, another platform)."""
    for lib in _openblas_libraries():
        for prefix, suffix in (("scipy_", "64_"), ("", "64_"), ("", "")):
            if hasattr(lib, prefix + name + suffix):
                return getattr(lib, prefix + name + suffix)
    return None


class _CblasSgemm(nb_types.WrapperAddressProtocol):
    """OpenBLAS's cblas_sgemm as a function a Numba kernel takes as an argument (so the kernel's disk cache holds
    no address). Its integers are 64-bit (NumPy's OpenBLAS: the "64_" symbols, USE64BITINT), pointers as uintp."""

    def __init__(self, function):
        import ctypes

        self.address = ctypes.cast(function, ctypes.c_void_p).value

    def __wrapper_address__(self):
        return self.address

    def signature(self):
        i32, i64, f32, p = nb_types.int32, nb_types.int64, nb_types.float32, nb_types.uintp
        return nb_types.void(i32, i32, i32, i64, i64, i64, f32, p, i64, p, i64, f32, p, i64)


def _cblas_sgemm():
    """The 64-bit-integer cblas_sgemm of NumPy's OpenBLAS, or None (another BLAS: our matmul is used instead)."""
    if _BLAS["sgemm"] is None:
        config = _openblas("openblas_get_config")
        function = _openblas("cblas_sgemm")
        if config is not None:
            import ctypes

            config.restype = ctypes.c_char_p
        wide = function is not None and config is not None and b"USE64BITINT" in config()
        _BLAS["sgemm"] = _CblasSgemm(function) if wide else False
    return _BLAS["sgemm"] or None


def _blas_threads():
    """NumPy's OpenBLAS's (set_num_threads, get_num_threads), or None if it is not found."""
    setter, getter = _openblas("openblas_set_num_threads"), _openblas("openblas_get_num_threads")
    return (setter, getter) if setter and getter else None


_BLAS = {"found": None, "threads": None, "sgemm": None}


def _blas_one_thread():
    """OpenBLAS on one thread: the cores are Numba's pool's. OpenBLAS's own threads spin for a while after each call,
    on the cores the pool's next kernel then waits for: measured on this project's 2-core machine at load ~2, a
    prefill of 256 tokens of SmolLM2-135M ran at 131-148 tokens/s with OpenBLAS's default 2 threads against 337-363
    with one, and the shipped model's at 1,352 against 7,661 (decode after it: 224 against 682 tokens/s). The
    thread count does not change sgemm's rounding."""
    if _BLAS["found"] is None:
        _BLAS["found"] = _blas_threads() or False
    if _BLAS["found"] and _BLAS["threads"] != 1:
        _BLAS["found"][0](1)
        _BLAS["threads"] = 1


_ROW_MAJOR, _NO_TRANS, _TRANS = np.int32(101), np.int32(111), np.int32(112)  # CBLAS's enums


@njit(inline="always")
def _tile_count(n_rows, n_out, tile_rows, tile_cols):
    return ((n_rows + tile_rows - 1) // tile_rows) * ((n_out + tile_cols - 1) // tile_cols)


@njit(inline="always")
def _tile(t, n_rows, n_out, tile_rows, tile_cols):  # task t -> its outputs [i_lo:i_hi, j_lo:j_hi]
    row_tiles = (n_rows + tile_rows - 1) // tile_rows
    i_lo, j_lo = (t % row_tiles) * tile_rows, (t // row_tiles) * tile_cols
    return i_lo, min(n_rows, i_lo + tile_rows), j_lo, min(n_out, j_lo + tile_cols)


@njit(inline="always")
def _sgemm_tile(sgemm, a, i_lo, i_hi, w_ptr, ld_w, w_layout, out, j_lo, j_hi):  # out[i, j] = a[i_lo:i_hi] @ W tile
    """One sgemm call: the rows i_lo..i_hi of `a` times a tile of weights at address w_ptr (leading dimension
    ld_w; _TRANS for [cols, in] rows, _NO_TRANS for [in, cols] columns) into out[i_lo:i_hi, j_lo:j_hi]."""
    n_in = a.shape[1]
    ptr_a, ptr_out = a[i_lo:].ctypes.data, out[i_lo:, j_lo:].ctypes.data
    sgemm(_ROW_MAJOR, _NO_TRANS, w_layout, i_hi - i_lo, j_hi - j_lo, n_in, np.float32(1), ptr_a, n_in, w_ptr, ld_w,
          np.float32(0), ptr_out, out.shape[1])  # fmt: skip


@intrinsic
def _keep_alive(typingctx, array):
    """Nothing: a use of `array` after sgemm has read it. Numba frees an array after its last use, and the last use
    of a task's widened tile is otherwise taking its address for sgemm, so the buffer was freed before sgemm read
    it (found when glibc returned such buffers to the system at once: a segfault)."""

    def codegen(context, builder, signature, args):
        return context.get_dummy_value()

    return nb_types.none(array), codegen


@njit(parallel=True, cache=True)
def matmul_blas(sgemm, a, w, out, tile_rows, tile_cols):  # [T, in], [out, in] float32 -> out [T, out]
    """a @ w.T through OpenBLAS's sgemm on one thread per call, the calls being the tasks of Numba's pool, one
    per tile of tile_rows x tile_cols outputs (BLAS_ROWS x BLAS_COLUMNS). On Numba's pool rather than OpenBLAS's
    own threads or Python threads: between two kernels of a forward no second set of threads spins on the cores
    (see "auto" at the top). The tiling is fixed, not cut to the thread count: OpenBLAS's rounding depends on the
    shape of a call (measured: splitting 130 rows in 2 changes bits), so a fixed tiling gives the same bits on any
    number of free cores. Measured on SmolLM2's four shapes, 512 rows, 2 idle cores: 190-283 GFLOP/s against
    140-183 for our `matmul`."""
    n_rows, n_out = a.shape[0], out.shape[1]
    for t in prange(_tile_count(n_rows, n_out, tile_rows, tile_cols)):
        i_lo, i_hi, j_lo, j_hi = _tile(t, n_rows, n_out, tile_rows, tile_cols)
        _sgemm_tile(sgemm, a, i_lo, i_hi, w[j_lo:].ctypes.data, w.shape[1], _TRANS, out, j_lo, j_hi)


matmul_blas_serial = _one_thread(matmul_blas)


@njit(parallel=True, cache=True)
def matmul_blas_blocks(sgemm, a, q, scale, offset, out, tile_rows, tile_cols):  # [T, in], BlockMatrix's -> [T, out]
    """a @ W.T for a GGUF block matrix W (4-bit with offsets, else 8-bit): matmul_blas's tiles, each task widening
    its tile_cols rows of W to float32 first ([in, cols], the serial dequantize_q4/q8), then one sgemm call."""
    n_rows, n_in, n_out, G = a.shape[0], a.shape[1], out.shape[1], q.shape[3]
    for t in prange(_tile_count(n_rows, n_out, tile_rows, tile_cols)):
        i_lo, i_hi, j_lo, j_hi = _tile(t, n_rows, n_out, tile_rows, tile_cols)
        cols = np.empty((n_in, (j_hi - j_lo + G - 1) // G * G), np.float32)  # whole groups
        if offset.size:
            dequantize_q4_serial(q, scale, offset, j_lo // G, cols)
        else:
            dequantize_q8_serial(q, scale, j_lo // G, cols)
        _sgemm_tile(sgemm, a, i_lo, i_hi, cols.ctypes.data, cols.shape[1], _NO_TRANS, out, j_lo, j_hi)
        _keep_alive(cols)


matmul_blas_blocks_serial = _one_thread(matmul_blas_blocks)


@njit(parallel=True, cache=True)
def matmul_blas_int8(sgemm, a, q, scale, out, tile_rows, tile_cols):  # [T, in], Int8Matrix's q, scale -> [T, out]
    """a @ W.T for an int8 matrix W (row scales): matmul_blas's tiles, each task widening its tile_cols rows of W to
    float32 (q times the row's scale, as Int8Matrix.dequantize) before its sgemm call."""
    n_rows, n_in, n_out = a.shape[0], a.shape[1], out.shape[1]
    for t in prange(_tile_count(n_rows, n_out, tile_rows, tile_cols)):
        i_lo, i_hi, j_lo, j_hi = _tile(t, n_rows, n_out, tile_rows, tile_cols)
        rows = np.empty((j_hi - j_lo, n_in), np.float32)
        for j in range(j_hi - j_lo):
            for k in range(n_in):
                rows[j, k] = np.float32(q[j_lo + j, k]) * scale[j_lo + j]
        _sgemm_tile(sgemm, a, i_lo, i_hi, rows.ctypes.data, n_in, _TRANS, out, j_lo, j_hi)
        _keep_alive(rows)


matmul_blas_int8_serial = _one_thread(matmul_blas_int8)


# ------------------------------------------------------------------------------------------------- layernorm


def normalize(x, eps):
    """Rows to zero mean and unit (population) variance, and 1/std: the one NumPy definition of the layer norm,
    shared by layernorm_ref, the trainer (backprop.layernorm_forward) and the router's features."""
    centred = x - x.mean(-1, keepdims=True)
    rstd = 1.0 / np.sqrt((centred * centred).mean(-1, keepdims=True) + eps)  # what x.var computes, in fewer calls
    return centred * rstd, rstd  # [..., E], [..., 1]


def layernorm_ref(x, w, b, eps):
    y, _ = normalize(x, eps)  # [T, E] -> [T, E]
    if w is not None:
        y = y * w + b
    return y.astype(np.float32)


@njit(fastmath=True, cache=True)
def mean_rstd(row, eps):  # [n] -> the row's mean and 1 / sqrt(var + eps), statistics in float64
    n = row.size
    mean = 0.0
    for k in range(n):
        mean += row[k]
    mean /= n
    var = 0.0
    for k in range(n):
        d = row[k] - mean
        var += d * d
    return mean, 1.0 / math.sqrt(var / n + eps)


@njit(parallel=True, fastmath=True, cache=True)
def _layernorm(x, w, b, eps, out):  # [T, E], [E] or [0], [E] or [0] -> out [T, E]
    n_rows, n = x.shape
    for i in prange(n_rows):
        mean, rstd = mean_rstd(x[i], eps)
        for k in range(n):
            y = (x[i, k] - mean) * rstd
            out[i, k] = y * w[k] + b[k] if w.size else y


_layernorm_serial = _one_thread(_layernorm)


def start():
    """Numba sets up its compiler on the first call of any kernel: ~0.1 s on an idle machine, even when every kernel
    comes from its disk cache. `load` calls this, so that loading a model pays it, not its first token."""
    x = np.zeros((1, 1), np.float32)
    _layernorm_serial(x, _NO_BIAS, _NO_BIAS, 1e-5, np.empty_like(x))


def layernorm(x, w, b, eps):
    """Normalise each row to zero mean and unit variance (population), then scale and shift if affine."""
    out = np.empty_like(x)
    kernel = _sized(_layernorm, _layernorm_serial, 4 * x.size)
    kernel(x, _NO_BIAS if w is None else w, _NO_BIAS if b is None else b, eps, out)
    return out


# --------------------------------------------------------------------------------------------------- rmsnorm


def rms_normalize(x, eps):
    """Rows divided by their root mean square (no centring), and 1/rms: the one NumPy definition of RMSNorm,
    shared by rmsnorm_ref and the trainer (ops.rmsnorm_forward). Statistics in float64, results in x's dtype."""
    rstd = (1.0 / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + eps)).astype(x.dtype)
    return x * rstd, rstd  # [..., E], [..., 1]


def rmsnorm_ref(x, w, eps):
    """Llama's RMSNorm: divide each row by its root mean square, then scale."""
    return (rms_normalize(x, eps)[0] * w).astype(np.float32)  # [T, E] -> [T, E]


@njit(parallel=True, fastmath=True, cache=True)
def _rmsnorm(x, w, eps, out):  # [T, E], [E] -> out [T, E]
    n_rows, n = x.shape
    for i in prange(n_rows):
        ss = 0.0
        for k in range(n):
            ss += x[i, k] * x[i, k]
        r = np.float32(1.0 / math.sqrt(ss / n + eps))
        for k in range(n):
            out[i, k] = w[k] * (x[i, k] * r)


_rmsnorm_serial = _one_thread(_rmsnorm)


def rmsnorm(x, w, eps):
    out = np.empty_like(x)
    _sized(_rmsnorm, _rmsnorm_serial, 4 * x.size)(np.ascontiguousarray(x), w, eps, out)
    return out


# ---------------------------------------------------------------------------------------------------- rotary


def rope_angles(pos, head_dim, theta):
    """cos and sin of position x frequency, [T, D/2] each; the frequencies as transformers computes them (float32)."""
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim  # [D/2]
    inv_freq = (1.0 / theta**exponent).astype(np.float32)
    angle = np.asarray(pos, np.float32)[:, None] * inv_freq[None, :]  # [T, D/2]
    return np.cos(angle), np.sin(angle)


class RopeTable:
    """cos and sin of every position, computed once (rope_angles, called by every attention block for q and k,
    recomputed the same table 60 times per SmolLM2 token: ~1.2 ms). `table(pos)` -> (cos, sin) [T, D/2] each,
    equal to rope_angles(pos, head_dim, theta); the table doubles when a position goes past it."""

    def __init__(self, head_dim: int, theta: float, n_positions: int = 1024):
        self.head_dim, self.theta = head_dim, theta
        self.cos, self.sin = rope_angles(np.arange(n_positions), head_dim, theta)  # [P, D/2] each

    def __call__(self, pos):
        pos = np.asarray(pos)
        if pos.size and pos.max() >= len(self.cos):
            n = max(2 * len(self.cos), int(pos.max()) + 1)
            self.cos, self.sin = rope_angles(np.arange(n), self.head_dim, self.theta)
        return self.cos[pos], self.sin[pos]


def rope_ref(x, n_head, cos, sin):
    """Rotate each head's pairs (i, i + D/2) by its position's angles (the `rotate_half` layout of transformers)."""
    T, E = x.shape
    h = x.reshape(T, n_head, E // n_head)  # [T, H, D]
    x1, x2 = np.split(h, 2, axis=-1)
    c, s = cos[:, None, :], sin[:, None, :]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).reshape(T, E).astype(np.float32)


@njit(parallel=True, fastmath=True, cache=True)
def _rope(x, n_head, cos, sin, out):  # [T, E], [T, D/2] x2 -> out [T, E]
    T, E = x.shape
    D = E // n_head
    half = D // 2
    for task in prange(T * n_head):
        t, h = task // n_head, task % n_head
        o = h * D
        for i in range(half):
            a, b = x[t, o + i], x[t, o + i + half]
            out[t, o + i] = a * cos[t, i] - b * sin[t, i]
            out[t, o + i + half] = b * cos[t, i] + a * sin[t, i]


_rope_serial = _one_thread(_rope)


def rope(x, n_head, cos, sin):
    out = np.empty_like(x)
    _sized(_rope, _rope_serial, 4 * x.size)(np.ascontiguousarray(x), n_head, cos, sin, out)
    return out


# ----------------------------------------------------------------------------------------------- activations


def relu_ref(x):
    return np.maximum(x, 0)


def gelu_ref(x):
    """Exact GELU, x * Phi(x), with Phi from math.erf (NumPy has no erf)."""
    erf = np.vectorize(math.erf, otypes=[np.float64])
    return (0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))).astype(np.float32)


@njit(parallel=True, fastmath=True, cache=True)
def _relu(x):  # [T, F] in place
    for i in prange(x.shape[0]):
        for k in range(x.shape[1]):
            x[i, k] = max(x[i, k], np.float32(0.0))


@njit(parallel=True, cache=True)
def _gelu(x):  # [T, F] in place; no fastmath so erf keeps its precision
    for i in prange(x.shape[0]):
        for k in range(x.shape[1]):
            v = x[i, k]
            x[i, k] = 0.5 * v * (1.0 + math.erf(v * 0.7071067811865476))


# e^x for the softmax and SiLU kernels. Numba calls libm's expf once per element, so a loop around it stays
# scalar: in a prefill of 512 tokens the exponentials were half of the attention's time (SmolLM2: 1.2 M per layer at
# ~4 ns). exp32 needs no call, so LLVM vectorizes the loops around it: e^x = 2^t with t = x log2(e) = n + f, n the
# nearest integer and |f| <= 1/2; 2^f by its Taylor series to f^8 (remainder < 1e-10), 2^n by writing n + 1023 into
# a double's exponent bits. In float64 throughout, then rounded once: within 1 ulp of e^x for float32 inputs (as
# libm's expf, whose value it gives for 99% of inputs), 0 below e^-104, inf above e^89. The integer n + 1023 is read
# out of the double n + 1023 + 2^52 (the 52 low bits of a double in [2^52, 2^53) are the integer), so AVX2 needs no
# float-to-int64 conversion.
_EXP2_TAYLOR = tuple(math.log(2.0) ** k / math.factorial(k) for k in range(9))  # 2^f = sum (f ln 2)^k / k!
_C0, _C1, _C2, _C3, _C4, _C5, _C6, _C7, _C8 = _EXP2_TAYLOR
_EXPONENT_MAGIC = 1023.0 + 2.0**52


@intrinsic
def _double_bits(typingctx, x):
    """A float64's 64 bits as an int64 (a reinterpretation, no conversion)."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(64))

    return nb_types.int64(nb_types.float64), codegen


@intrinsic
def _bits_double(typingctx, bits):
    """64 bits (an int64) read as a float64."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return nb_types.float64(nb_types.int64), codegen


@njit(inline="always", fastmath=True)
def exp32(x):  # float32 -> e^x as float32, within 1 ulp (see above)
    t = min(max(np.float64(x), -104.0), 89.0) * 1.4426950408889634  # x log2(e)
    n = np.floor(t + 0.5)  # a float64: no conversion to an integer register
    f = t - n
    p = ((((((((_C8 * f + _C7) * f + _C6) * f + _C5) * f + _C4) * f + _C3) * f + _C2) * f + _C1) * f) + _C0
    two_n = _bits_double(_double_bits(n + _EXPONENT_MAGIC) << 52)  # 2^n: n + 1023 in the exponent field
    return np.float32(p * two_n)


@njit(fastmath=True, cache=True)
def exp32_array(x):  # [...] float32 -> e^x, elementwise (exp32 over an array: tests and the NumPy comparison)
    out = np.empty_like(x)
    flat, res = x.ravel(), out.ravel()
    for i in range(flat.size):
        res[i] = exp32(flat[i])
    return out


def silu_ref(x):
    return (x / (1.0 + np.exp(-x.astype(np.float64)))).astype(np.float32)


@njit(parallel=True, fastmath=True, cache=True)
def _silu(x):  # [T, F] in place
    for i in prange(x.shape[0]):
        for k in range(x.shape[1]):
            v = x[i, k]
            x[i, k] = v / (np.float32(1.0) + exp32(-v))


ACTIVATIONS = {
    "relu": (_relu, _one_thread(_relu)),
    "gelu": (_gelu, _one_thread(_gelu)),
    "silu": (_silu, _one_thread(_silu)),
}


def activation(name, x):
    """Apply an activation in place and return x; names as in Hugging Face configs."""
    _sized(*ACTIVATIONS[name], 4 * x.size)(x)
    return x


# ------------------------------------------------------------------------------------- gated FFN: gate and up


def gate_up_silu_ref(x, w_gate, w_up):
    """Llama's gated FFN input, silu(x @ gate.T) * (x @ up.T): [T, E] -> [T, F]."""
    return silu_ref(x @ to_float32(w_gate).T) * (x @ to_float32(w_up).T)


@njit(parallel=True, fastmath=True, cache=True)
def _gate_up_silu_q4(x, qg, sg, og, qu, su, ou, out):  # [E], two 4-bit BlockMatrix's arrays -> out [F]
    """Both 4-bit matvecs of one row in one call, x prepared once, silu(gate) * up written per group."""
    G = GROUP_ROWS
    sums, x2 = _q4_prepare(x)
    for g in prange(qg.shape[0]):
        gate, up, part = np.empty(G, np.float32), np.empty(G, np.float32), np.empty(G, np.float32)
        _q4_rows(x, x2, sums, qg, sg, og, g, gate, part)
        _q4_rows(x, x2, sums, qu, su, ou, g, up, part)
        for r in range(min(G, out.size - g * G)):
            v = gate[r]
            out[g * G + r] = v / (np.float32(1.0) + exp32(-v)) * up[r]


_gate_up_silu_q4_serial = _one_thread(_gate_up_silu_q4)


@njit(parallel=True, fastmath=True, cache=True)
def _gate_up_silu_rows(x, wg, sg, wu, su, out):  # [E], [F, E] float32 or int8 (+ row scales or [0]) x2 -> [F]
    """Both float32 (or int8) matvecs of one row in one call: each task reads a gate row and an up row."""
    for n in prange(wg.shape[0]):
        _prefetch_row(wg, n)
        _prefetch_row(wu, n)
        g, u = np.float32(0.0), np.float32(0.0)
        for k in range(wg.shape[1]):
            g += x[k] * np.float32(wg[n, k])
            u += x[k] * np.float32(wu[n, k])
        if sg.size:
            g, u = g * sg[n], u * su[n]
        out[n] = g / (np.float32(1.0) + exp32(-g)) * u


_gate_up_silu_rows_serial = _one_thread(_gate_up_silu_rows)


def _alike(a, b) -> bool:
    """Two weights stored the same way (one fused kernel can read both)."""
    if isinstance(a, BlockMatrix) or isinstance(b, BlockMatrix):
        return isinstance(a, BlockMatrix) and isinstance(b, BlockMatrix) and a.bits == b.bits == 4
    if isinstance(a, Int8Matrix) or isinstance(b, Int8Matrix):
        return isinstance(a, Int8Matrix) and isinstance(b, Int8Matrix)
    return a.dtype == b.dtype == np.float32


def gate_up_silu(x, w_gate, w_up):
    """silu(x @ w_gate.T) * (x @ w_up.T), Llama's gated FFN before its down projection: [T, E] -> [T, F].

    For one row (decode) with both weights 4-bit blocks, int8 or float32, one kernel computes both products and
    the activation (x read and prepared once, no [F] temporaries); otherwise (many rows, other storage) two
    `linear` calls and the activation."""
    if x.shape[0] == 1 and w_gate.shape == w_up.shape and _alike(w_gate, w_up):
        out = np.empty((1, w_gate.shape[0]), np.float32)
        work = 2 * w_gate.nbytes
        if isinstance(w_gate, BlockMatrix):
            kernel = _sized(_gate_up_silu_q4, _gate_up_silu_q4_serial, work)
            kernel(x[0], w_gate.q, w_gate.scale, w_gate.offset, w_up.q, w_up.scale, w_up.offset, out[0])
        elif isinstance(w_gate, Int8Matrix):
            kernel = _sized(_gate_up_silu_rows, _gate_up_silu_rows_serial, work)
            kernel(x[0], w_gate.q, w_gate.scale, w_up.q, w_up.scale, out[0])
        else:
            kernel = _sized(_gate_up_silu_rows, _gate_up_silu_rows_serial, work)
            kernel(x[0], w_gate, _NO_BIAS, w_up, _NO_BIAS, out[0])
        return out
    h = activation("silu", linear(x, w_gate))  # [T, E] -> [T, F]
    h *= linear(x, w_up)
    return h


# --------------------------------------------------------------------------------------------------- softmax


def softmax_ref(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@njit(parallel=True, fastmath=True, cache=True)
def _softmax(x, out):  # [T, V] -> [T, V]
    for i in prange(x.shape[0]):
        m = -np.inf
        for k in range(x.shape[1]):
            m = max(m, x[i, k])
        s = 0.0
        for k in range(x.shape[1]):
            e = math.exp(x[i, k] - m)
            out[i, k] = e
            s += e
        for k in range(x.shape[1]):
            out[i, k] /= s


def softmax(x):
    """Row-wise softmax, shifted by the row max so large logits do not overflow."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty_like(x)
    _softmax(x, out)
    return out


# ------------------------------------------------------------------------------------------------- attention


def attention_scores(q, k, visible=True):
    """q k^T / sqrt(D) over the keys each query may see, -inf elsewhere: the one NumPy definition of attention's
    scores, whose softmax weighs the values (`attention_weights`), shared by `attention_ref` and the trainer's
    reference (ops.attention_forward_ref). [..., Tq, D], [..., Tk, D], visible [..., Tq, Tk] bool (broadcast; every
    query must see a key) -> [..., Tq, Tk]."""
    scores = q @ np.swapaxes(k, -1, -2) / math.sqrt(q.shape[-1])  # a Python float keeps float32 float32
    return np.where(visible, scores, -np.inf)


def attention_weights(q, k, visible=True):
    """softmax of `attention_scores`: [..., Tq, Tk]."""
    return softmax_ref(attention_scores(q, k, visible))


def attention_ref(q, k, v, n_head, q_pos=None, k_pos=None, n_kv_head=None):
    """Multi-head attention; with positions, a query sees only keys at positions <= its own (causal).
    Grouped-query: n_kv_head key/value heads, each shared by n_head // n_kv_head query heads."""
    T, E = q.shape
    D = E // n_head
    group = n_head // (n_kv_head or n_head)
    qh = q.reshape(T, n_head, D).transpose(1, 0, 2)  # [T, E] -> [H, T, D]
    kh = np.repeat(k.reshape(len(k), -1, D).transpose(1, 0, 2), group, axis=0)  # [N, Hkv*D] -> [H, N, D]
    vh = np.repeat(v.reshape(len(v), -1, D).transpose(1, 0, 2), group, axis=0)
    visible = True if q_pos is None else k_pos[None, None, :] <= q_pos[None, :, None]  # [1, T, N]
    out = attention_weights(qh, kh, visible) @ vh  # [H, T, D]
    return out.transpose(1, 0, 2).reshape(T, E).astype(np.float32)


@njit(parallel=True, fastmath=True, cache=True)
def _attention(q, k, v, rows, n_keys, q_pos, k_pos, causal, out):  # [H, T, D], [Hkv, >=N, D] x2 -> out [H, T, D]
    """One task per (head, query): scores against the visible keys, softmax, weighted sum of values.

    Head-major layout keeps each head's keys contiguous, so the dot products stream and vectorize. Keys are in
    position order, so a causal query's visible keys are a prefix: nothing masked is touched. `rows` picks the
    keys out of a larger store without copying them (the unified cache's per-layer view); empty = the first
    n_keys rows. Grouped-query attention: query head h reads key/value head h // (H / Hkv). Keys and values are
    float32, or float16 bits (uint16: a half-precision cache, widened as read)."""
    n_head, n_q, d_head = q.shape
    group = n_head // k.shape[0]
    scale = np.float32(1.0 / math.sqrt(d_head))
    picked = rows.size > 0
    for task in prange(n_head * n_q):
        h, i = task // n_q, task % n_q
        g = h // group
        n_vis = np.searchsorted(k_pos[:n_keys], q_pos[i], side="right") if causal else n_keys
        scores = np.empty(n_vis, np.float32)
        best = np.float32(-np.inf)
        for j in range(n_vis):
            r = rows[j] if picked else j
            s = np.float32(0.0)
            for d in range(d_head):
                s += q[h, i, d] * widen(k[g, r, d])
            scores[j] = s * scale
            best = max(best, scores[j])
        total = np.float32(0.0)
        for j in range(n_vis):
            e = exp32(scores[j] - best)
            scores[j] = e
            total += e
        acc = np.zeros(d_head, np.float32)
        for j in range(n_vis):
            r = rows[j] if picked else j
            p = scores[j]
            for d in range(d_head):
                acc[d] += p * widen(v[g, r, d])
        for d in range(d_head):
            out[h, i, d] = acc[d] / total


_attention_serial = _one_thread(_attention)


BLOCKED_FROM = 32  # queries from which `attention` runs a prefill kernel (_attention_blocked: blocks of as many)


@njit(inline="always")
def _gather_visible(k, v, g, rows, kb, vb, v_transposed):  # head g's first len(kb) keys/values -> float32 rows
    """A prefill kernel's per-head copy of the keys it reads: kb[j] = k[g, rows[j]] (or k[g, j] without `rows`),
    widened to float32 (a half-precision cache stores float16 bits); the values likewise into vb[j], or into
    vb[:, j] (v_transposed)."""
    picked = rows.size > 0
    for j in range(kb.shape[0]):
        r = rows[j] if picked else j
        for d in range(kb.shape[1]):
            kb[j, d] = widen(k[g, r, d])
        if v_transposed:
            for d in range(kb.shape[1]):
                vb[d, j] = widen(v[g, r, d])
        else:
            for d in range(kb.shape[1]):
                vb[j, d] = widen(v[g, r, d])


@njit(inline="always")
def _softmax_visible(p, n_rows, n_vis, q_pos, k_pos, n_keys, causal, scale):  # p[:n_rows, :n_vis] -> weights
    """Each row of raw scores q.k, times `scale`, softmaxed over the keys its query (at q_pos[i]) sees: causal,
    the prefix of keys at positions <= its own, else all n_keys; zero beyond them up to n_vis (what the block's
    last query sees)."""
    for i in range(n_rows):
        n_i = np.searchsorted(k_pos[:n_keys], q_pos[i], side="right") if causal else n_keys
        best = np.float32(-np.inf)
        for j in range(n_i):
            best = max(best, p[i, j])
        total = np.float32(0.0)
        for j in range(n_i):
            p[i, j] = exp32((p[i, j] - best) * scale)
            total += p[i, j]
        for j in range(n_i):
            p[i, j] /= total
        p[i, n_i:n_vis] = 0.0


@njit(parallel=True, fastmath=True, cache=True)
def _attention_blocked(q, k, v, rows, n_keys, q_pos, k_pos, causal, out):  # as _attention
    """`_attention` for many queries (a prefill): one task per head, whose visible keys are gathered once into
    kb [N, D] and its values, transposed, into vt [D, N]; then for each block of 32 queries the scores Q K^T and
    the output P V are two calls of matmul's tiled core (`_gemm`). A causal block scores the keys its last query
    sees; each query's row is softmaxed over its own visible prefix and zero beyond."""
    n_head, n_q, d_head = q.shape
    group = n_head // k.shape[0]
    scale = np.float32(1.0 / math.sqrt(d_head))
    queries_per_block = BLOCKED_FROM
    for h in prange(n_head):
        g = h // group
        n_all = np.searchsorted(k_pos[:n_keys], q_pos[n_q - 1], side="right") if causal else n_keys
        kb, vt = np.empty((n_all, d_head), np.float32), np.empty((d_head, n_all), np.float32)
        _gather_visible(k, v, g, rows, kb, vt, True)
        scores = np.empty((queries_per_block, n_all), np.float32)
        for i_lo in range(0, n_q, queries_per_block):
            n_rows = min(queries_per_block, n_q - i_lo)
            n_vis = np.searchsorted(k_pos[:n_keys], q_pos[i_lo + n_rows - 1], side="right") if causal else n_keys
            p = scores[:n_rows]  # [rows, N]
            _gemm(q[h, i_lo : i_lo + n_rows], kb[:n_vis], p, d_head)  # Q K^T
            _softmax_visible(p, n_rows, n_vis, q_pos[i_lo:], k_pos, n_keys, causal, scale)
            _gemm(p, vt, out[h, i_lo : i_lo + n_rows], n_vis)  # P V


_attention_blocked_serial = _one_thread(_attention_blocked)


@njit(parallel=True, fastmath=True, cache=True)
def _attention_blas(sgemm, q, k, v, rows, n_keys, q_pos, k_pos, causal, out, queries_per_block):  # as _attention
    """`_attention_blocked` with its two products per block of queries, Q K^T and P V, through OpenBLAS's sgemm (one
    thread per call, one task per head, as `matmul_blas`): the head's visible keys and values gathered once, as
    float32 rows [N, D] (widened from a half-precision cache), then per block of queries the scores [rows, N] by one
    call, the causal softmax of each row over its own visible prefix (zero beyond), and the output by another. One
    task per head whatever the thread count, so the bits do not depend on it. q and out contiguous."""
    n_head, n_q, d_head = q.shape
    group = n_head // k.shape[0]
    scale = np.float32(1.0 / math.sqrt(d_head))
    for h in prange(n_head):
        g = h // group
        n_all = np.searchsorted(k_pos[:n_keys], q_pos[n_q - 1], side="right") if causal else n_keys
        kb, vb = np.empty((n_all, d_head), np.float32), np.empty((n_all, d_head), np.float32)
        _gather_visible(k, v, g, rows, kb, vb, False)
        p = np.empty((queries_per_block, max(n_all, 1)), np.float32)
        for i_lo in range(0, n_q, queries_per_block):
            n_rows = min(queries_per_block, n_q - i_lo)
            n_vis = np.searchsorted(k_pos[:n_keys], q_pos[i_lo + n_rows - 1], side="right") if causal else n_keys
            if n_vis == 0:
                out[h, i_lo : i_lo + n_rows] = 0.0
                continue
            sgemm(_ROW_MAJOR, _NO_TRANS, _TRANS, n_rows, n_vis, d_head, np.float32(1), q[h, i_lo:].ctypes.data,
                  d_head, kb.ctypes.data, d_head, np.float32(0), p.ctypes.data, p.shape[1])  # fmt: skip
            _softmax_visible(p, n_rows, n_vis, q_pos[i_lo:], k_pos, n_keys, causal, scale)
            sgemm(_ROW_MAJOR, _NO_TRANS, _NO_TRANS, n_rows, d_head, n_vis, np.float32(1), p.ctypes.data, p.shape[1],
                  vb.ctypes.data, d_head, np.float32(0), out[h, i_lo:].ctypes.data, d_head)  # fmt: skip
        _keep_alive(kb)
        _keep_alive(vb)
        _keep_alive(p)


_attention_blas_serial = _one_thread(_attention_blas)
ATTENTION_BLOCK = 64  # queries per sgemm call of _attention_blas
_NO_POS = np.zeros(0, np.int64)


def split_heads(x, n_head):
    """[T, E] -> [H, T, D], contiguous."""
    T, E = x.shape
    return np.ascontiguousarray(x.reshape(T, n_head, E // n_head).transpose(1, 0, 2))


def merge_heads(x):
    """[H, T, D] -> [T, E]."""
    H, T, D = x.shape
    return x.transpose(1, 0, 2).reshape(T, H * D)


def attention(q, k, v, n_head, q_pos=None, k_pos=None, rows=None, n_kv_head=None):
    """Scaled dot-product attention of T queries [T, E] over N keys/values; returns [T, E].

    Keys and values come token-major [N, E], or head-major [H, capacity, D] straight from a cache's storage:
    the first len(k_pos) rows, or the rows listed in `rows` (with k_pos their positions). Given positions,
    attention is causal: query i sees key j only if k_pos[j] <= q_pos[i]; keys must be in position order (every
    cache appends in token order). Positions rather than an offset let one kernel serve the dense cache, a cache
    with holes (skipped tokens) and the unified cache. With n_kv_head < n_head (grouped-query attention) keys and
    values have n_kv_head heads.
    """
    causal = q_pos is not None
    if causal and len(k_pos) > 1 and (np.diff(k_pos) < 0).any():
        raise ValueError("attention: key positions must be in increasing order")
    if k.ndim == 2:
        k, v = split_heads(k, n_kv_head or n_head), split_heads(v, n_kv_head or n_head)
    n_keys = len(k_pos) if causal else k.shape[1]
    qh = split_heads(q, n_head)
    out = np.empty_like(qh)
    rows = _NO_POS if rows is None else rows
    work = 2 * qh.size * n_keys  # q.k and p.v per visible key
    args = (qh, k, v, rows, n_keys, q_pos if causal else _NO_POS, k_pos if causal else _NO_POS, causal, out)
    sgemm = _sgemm_for(qh) if len(q) >= BLOCKED_FROM else None
    if sgemm is not None:
        _sized(_attention_blas, _attention_blas_serial, work)(sgemm, *args, ATTENTION_BLOCK)
    elif len(q) >= BLOCKED_FROM:
        _sized(_attention_blocked, _attention_blocked_serial, work)(*args)
    else:
        _sized(_attention, _attention_serial, work)(*args)
    return merge_heads(out)
