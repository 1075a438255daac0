"""Mutation check: break key lines of the engine one at a time, in a copy of the tree, and check the tests fail.

    python tools/mutation_check.py               # every mutant; exit 1 if any survives (see the timing below)
    python tools/mutation_check.py rotary cache  # only the mutants whose name contains one of these words
    python tools/mutation_check.py --list        # the mutants and the tests each one runs

Each mutant is (name, file, exact fragment, replacement, tests): the fragment must occur exactly once in the file,
and only the tests named run against it (`pytest -x`, so the first failure ends the run). A mutant is *caught*
when pytest reports a failing test; it *survives* when the tests pass, and is *stale* when its fragment is no longer
in the file (the code moved: update the mutant). Before the mutants, the union of their tests runs once on the
unbroken tree, so a failure can only come from the mutant. A surviving mutant is a gap in the suite: add a test
that fails on it, then keep the mutant here so the gap stays closed.

The tracked and untracked, not ignored, files (git ls-files) are copied to a temporary folder, so the worktree is
never touched. Run it under `nice -n 10` on a shared machine; set RADIAL_MIN_DATA if ../shared/data is not beside
the checkout.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent


class Mutant(NamedTuple):
    name: str
    file: str
    old: str
    new: str
    tests: tuple  # pytest arguments: test files, optionally "-k" and an expression


R, K, C, B, O, P, G = (
    "radial_min/" + f + ".py"
    for f in ("radial", "kernels", "cache", "blocks", "analysis/oracle", "analysis/profiling", "generation")
)
T = "tests/test_{}.py".format
RADIAL, KERNELS, LLAMA, PROFILING = T("radial"), T("kernels"), T("llama"), T("profiling")
RULES = T("routing_rules")
EST = T("estimators")
REF = T("refusals")
OUT, TOK, IMG, GGUF = (f"radial_min/io/{f}.py" for f in ("outputs", "tokenizer", "images", "gguf_file"))
MUTANTS = [
    # routing and the unified KV cache
    Mutant(
        "global policy: query without step encoding",
        C,
        "return q + np.repeat(enc, group, axis=1).reshape(len(enc), -1), k + enc.reshape(len(enc), -1)",
        "return q, k + enc.reshape(len(enc), -1)",
        (RADIAL,),
    ),
    Mutant(
        "global policy: every step encoded as step 0",
        C,
        "enc = self.code(step, k.shape[1])",
        "enc = self.code(0 * np.asarray(step), k.shape[1])",
        (RADIAL,),
    ),
    Mutant(
        "router not told the block just run",
        R,
        "net.router.decide(self.X[rows], self.prev[rows], self.step[rows], pos)",
        "net.router.decide(self.X[rows], np.full(len(rows), -1), self.step[rows], pos)",
        (RADIAL,),
    ),
    Mutant("max_depth ignored (the walk)", R, "rows = rows[self.step[rows] < net.max_depth]", "rows = rows", (RADIAL,)),
    Mutant(
        "max_depth ignored (the oracle's router decisions)",
        "radial_min/analysis/distill.py",
        "np.where(self.step[rows] >= self.max_depth, self.router.config.exit, choice)",
        "choice",
        (RADIAL,),
    ),
    Mutant(
        "prefill attention: a row's weights beyond its visible keys left in place",
        K,
        "        p[i, n_i:n_vis] = 0.0",
        "        pass",
        (KERNELS, "-k", "blocked_attention"),
    ),
    Mutant(
        "half-precision KV cache: entries stored float32 anyway",
        C,
        'dtype = np.uint16 if self.kv_dtype == "float16" else dtype',
        "dtype = dtype",
        (RADIAL, "-k", "half_precision_cache"),
    ),
    Mutant(
        "half-precision KV cache: decode attention reads the bits as integers",
        K,
        "s += q[h, i, d] * widen(k[g, r, d])",
        "s += q[h, i, d] * np.float32(k[g, r, d])",
        (KERNELS, "-k", "half_precision_storage"),
    ),
    Mutant(
        "half-precision KV cache: the model's setting never reaches its caches",
        R,
        'kv_dtype = "float32" if train else self.model.kv_dtype',
        'kv_dtype = "float32"',
        (RADIAL, "-k", "half_precision_cache"),
    ),
    Mutant(
        "an inference walk left in last_walk keeps the cache it wrote (two prefill caches alive at once)",
        R,
        "        if tape is None:  # last_walk outlives",
        "        if tape is None and False:  # last_walk outlives",
        (RADIAL,),
    ),
    Mutant(
        "routing step not passed to the cache",
        R,
        "Rows(pos, self.cache, self.step[r], self.seq[r])",
        "Rows(pos, self.cache, 0 * self.step[r], self.seq[r])",
        (RADIAL,),
    ),
    Mutant(
        "KV cache: positions left out of the order keys",
        C,
        "keys = order_key(rows.pos, rows.step)",
        "keys = order_key(0 * rows.pos, rows.step)",
        (RADIAL, T("generation"), LLAMA),
    ),
    Mutant(
        "KV cache: one per-layer partition for all layers",
        C,
        "    def partition(self, layer: int, step: int) -> int:\n        return layer",
        "    def partition(self, layer: int, step: int) -> int:\n        return 0",
        (RADIAL,),
    ),
    Mutant("KV cache: growth keeps no old rows", C, "grown[index] = a[index]", "pass", (T("generation"), RADIAL)),
    # attention
    Mutant(
        "causal mask off (numba kernel)",
        K,
        'n_i = np.searchsorted(k_pos[:n_keys], q_pos[i], side="right") if causal else n_keys',
        'n_i = np.searchsorted(k_pos[:n_keys], q_pos[i], side="right") if False else n_keys',
        (KERNELS, "-k", "attention"),
    ),
    Mutant(
        "causal mask off (the prefill kernels' softmax)",
        K,
        'n_i = np.searchsorted(k_pos[:n_keys], q_pos[i], side="right") if causal else n_keys',
        'n_i = np.searchsorted(k_pos[:n_keys], q_pos[i], side="right") if False else n_keys',
        (KERNELS, "-k", "attention"),
    ),
    Mutant(
        "causal mask hides the query itself (numba kernel)",
        K,
        'n_vis = np.searchsorted(k_pos[:n_keys], q_pos[i], side="right")',
        'n_vis = np.searchsorted(k_pos[:n_keys], q_pos[i], side="left")',
        (KERNELS, "-k", "attention"),
    ),
    Mutant(
        "causal mask hides the query itself (the prefill kernels' softmax)",
        K,
        'n_i = np.searchsorted(k_pos[:n_keys], q_pos[i], side="right")',
        'n_i = np.searchsorted(k_pos[:n_keys], q_pos[i], side="left")',
        (KERNELS, "-k", "attention"),
    ),
    Mutant(
        "causal mask off (NumPy reference)",
        K,
        "visible = True if q_pos is None else k_pos[None, None, :] <= q_pos[None, :, None]",
        "visible = True",
        (KERNELS, "-k", "attention"),
    ),
    Mutant(
        "attention without 1/sqrt(d) (numba kernel)",
        K,
        "math.sqrt(d_head))\n    picked = rows.size > 0\n    for task",
        "1.0)\n    picked = rows.size > 0\n    for task",
        (KERNELS, "-k", "attention"),
    ),
    Mutant(
        "GQA: query head h reads key/value head h % Hkv (kernel)",
        K,
        "g = h // group\n        n_vis",
        "g = h % k.shape[0]\n        n_vis",
        (LLAMA, KERNELS),
    ),
    Mutant(
        "serial kernel copies compiled with Python's error model (zero checks: scalar loops, exceptions)",
        K,
        'cache=True, nogil=True, error_model="numpy")(g)',
        "cache=True, nogil=True)(g)",
        (KERNELS, "-k", "error_model"),
    ),
    Mutant(
        "GQA: wrong key/value head (the prefill kernels' gather)",
        K,
        "kb[j, d] = widen(k[g, r, d])",
        "kb[j, d] = widen(k[(g + 1) % k.shape[0], r, d])",
        (LLAMA, KERNELS),
    ),
    Mutant(
        "GQA: reference tiles key/value heads instead of repeating",
        K,
        "kh = np.repeat(k.reshape(len(k), -1, D).transpose(1, 0, 2), group, axis=0)",
        "kh = np.tile(k.reshape(len(k), -1, D).transpose(1, 0, 2), (group, 1, 1))",
        (LLAMA, KERNELS),
    ),
    Mutant(
        "GQA: unified cache encodes query heads in the wrong order",
        C,
        "np.repeat(enc, group, axis=1)",
        "np.tile(enc, (1, group, 1))",
        (LLAMA, RADIAL),
    ),
    Mutant(
        "GQA: key/value width split as if MHA",
        B,
        "kv = (qkv.shape[1] * self.n_kv_head) // (self.n_head + 2 * self.n_kv_head)",
        "kv = qkv.shape[1] // 3",
        (LLAMA,),
    ),
    # rotary
    Mutant(
        "rotary: rotation sign flipped (kernel)",
        K,
        "out[t, o + i] = a * cos[t, i] - b * sin[t, i]",
        "out[t, o + i] = a * cos[t, i] + b * sin[t, i]",
        (LLAMA,),
    ),
    Mutant("rotary: keys not rotated", B, "self.rotary(k, self.n_kv_head, pos, tape)", "k", (LLAMA,)),
    Mutant(
        "rotary: frequencies of head_dim + 2",
        K,
        "astype(np.float32) / head_dim  # [D/2]",
        "astype(np.float32) / (head_dim + 2)  # [D/2]",
        (LLAMA,),
    ),
    # blocks and models
    Mutant(
        "residual add dropped",
        B,
        "y = x + (f if gate is None else gate[:, None] * f)  # [n, E]",
        "y = f if gate is None else gate[:, None] * f  # [n, E]",
        (T("parity"), "-k", "opt_logits"),
    ),
    Mutant(
        "post-LN: no LayerNorm after the add",
        B,
        "        if not self.pre_norm:\n            y = self.norm(y, tape)",
        "        if False:\n            y = self.norm(y, tape)",
        (T("parity"),),
    ),
    Mutant(
        "SwiGLU: gate and up projections swapped",
        B,
        "a = kernels.gate_up_silu(h, self.gate.weight, self.fc1.weight)  # [n, E] -> [n, F], one call",
        "a = kernels.gate_up_silu(h, self.fc1.weight, self.gate.weight)  # [n, E] -> [n, F], one call",
        (LLAMA,),
    ),
    Mutant(
        "OPT: position table without its offset of 2",
        "radial_min/models/opt.py",
        "self.embed_positions(np.asarray(pos) + POSITION_OFFSET, tape)",
        "self.embed_positions(np.asarray(pos), tape)",
        (T("parity"),),
    ),
    Mutant(
        "layernorm: eps ignored (kernel)",
        K,
        "return mean, 1.0 / math.sqrt(var / n + eps)",
        "return mean, 1.0 / math.sqrt(var / n + 1e-2)",
        (KERNELS, "-k", "layernorm"),
    ),
    # residual ratios and the oracle
    Mutant(
        "ratio 'output': ||f|| / ||x|| instead of ||x + f||",
        P,
        "np.linalg.norm((x + f).astype(np.float64), axis=-1)",
        "np.linalg.norm(x.astype(np.float64), axis=-1)",
        (PROFILING,),
    ),
    Mutant(
        "ratio 'sum': ||f|| left out of the denominator", P, "axis=-1) + fx, 1e-30)", "axis=-1), 1e-30)", (PROFILING,)
    ),
    Mutant(
        "oracle keeps on ratio > tau instead of >=",
        O,
        "return (r >= tau) | (rows < sink)",
        "return (r > tau) | (rows < sink)",
        (PROFILING,),
    ),
    Mutant(
        "oracle comparison inverted",
        O,
        "return (r >= tau) | (rows < sink)",
        "return (r < tau) | (rows < sink)",
        (PROFILING,),
    ),
    Mutant(
        "oracle: skipped rows take the block's output",
        O,
        "y = np.where(keep[:, None], block.residual(x, f), x)",
        "y = block.residual(x, f)",
        (PROFILING,),
    ),
    Mutant(
        "drop rule: skipped tokens stay visible",
        B,
        "visible = np.append(np.flatnonzero(keep[:t]), t)",
        "visible = np.arange(t + 1)",
        (PROFILING,),
    ),
    # the router
    Mutant(
        "router features: previous block one-hot off by one",
        "radial_min/router.py",
        "onehot[np.arange(len(prev)), np.asarray(prev) + 1] = 1.0",
        "onehot[np.arange(len(prev)), np.asarray(prev)] = 1.0",
        (T("router"),),
    ),
    Mutant(
        "fused router: previous block column off by one",
        "radial_min/router.py",
        "acc = b1[j] + w1[j, E + prev[i] + 1]",
        "acc = b1[j] + w1[j, E + prev[i]]",
        (T("router"),),
    ),
    Mutant(
        "router mask lets a forward-only router rerun its block",
        "radial_min/router.py",
        "ok = cols[None, :] > prev[:, None] if cfg.forward_only",
        "ok = cols[None, :] >= prev[:, None] if cfg.forward_only",
        (T("router"),),
    ),
    Mutant(
        "fused router may rerun its block",
        "radial_min/router.py",
        "if forward_only and m <= prev[i] and m != exit_ or m > reach[prev[i] + 1]:",
        "if forward_only and m < prev[i] and m != exit_ or m > reach[prev[i] + 1]:",
        (T("router"),),
    ),
    Mutant(
        "router config: max_depth unbounded",
        "radial_min/router.py",
        'int, 1, MAX_PASSES * d["n_blocks"])',
        "int, 1, 1 << 40)",
        (T("hostile"), T("fuzz")),
    ),
    # the one engine's backward (tests/test_ops.py: op by op; tests/test_backward.py: blocks, models, networks)
    Mutant(
        "layernorm backward: the mean of g left out",
        "radial_min/ops.py",
        "dx = rstd * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))",
        "dx = rstd * (g - xhat * (g * xhat).mean(-1, keepdims=True))",
        (T("ops"), "-k", "layernorm"),
    ),
    Mutant(
        "rmsnorm backward: the normalisation's own term left out",
        "radial_min/ops.py",
        "return rstd * (g - xhat * (g * xhat).mean(-1, keepdims=True)), (dy * xhat).sum(0)",
        "return rstd * g, (dy * xhat).sum(0)",
        (T("ops"), "-k", "rmsnorm"),
    ),
    Mutant(
        "rotary backward: rotated forward again",
        "radial_min/ops.py",
        "return rotary_forward(dy, n_head, cos, -sin)",
        "return rotary_forward(dy, n_head, cos, sin)",
        (T("ops"), "-k", "rotary"),
    ),
    Mutant(
        "SwiGLU backward: silu's derivative taken as sigmoid",
        "radial_min/ops.py",
        "return da * s * (1 + u * (1 - s))",
        "return da * s",
        (T("ops"), "-k", "swiglu or activations"),
    ),
    Mutant(
        "attention backward kernel: softmax's dy.y term dropped",
        "radial_min/ops.py",
        "ds[j] = p[j] * (ds[j] - dot_y) * scale",
        "ds[j] = p[j] * ds[j] * scale",
        (T("ops"), "-k", "kernels"),
    ),
    Mutant(
        "cache: an interleaved step round left out of key order",
        C,
        "        if not in_order:\n",
        "        if False:\n",
        (T("backward"), "-k", "interleave"),
    ),
    Mutant(
        "the gate's gradient not sent to the router",
        R,
        "dprobs[k][chooser[mine, 1], b] += dgate[mine]",
        "dprobs[k][chooser[mine, 1], b] += 0 * dgate[mine]",
        (T("backward"), "-k", "whole_radial"),
    ),
    Mutant(
        "the compute term's price of a block not applied",
        R,
        "d[:, self.exit] -= d_expected / n",
        "d[:, self.exit] -= 0 * d_expected / n",
        (T("backward"), "-k", "whole_radial"),
    ),
    Mutant(
        "a tied head's gradient kept apart from its embedding's",
        "radial_min/models/base.py",
        "m.grad[attr] = by_array.setdefault(id(a), np.zeros(a.shape, a.dtype))",
        "m.grad[attr] = np.zeros(a.shape, a.dtype)",
        (T("backward"), "-k", "whole_model"),
    ),
    Mutant(
        "deferred linear gradients: the bias forgotten",
        "radial_min/blocks.py",
        '                self.grad["bias"] += dy.sum(0)',
        "                pass",
        (T("backward"), "-k", "block_backward"),
    ),
    # generation
    Mutant(
        "repetition penalty: positive logits multiplied",
        G,
        "np.where(out[seen] > 0, out[seen] / penalty, out[seen] * penalty)",
        "np.where(out[seen] > 0, out[seen] * penalty, out[seen] / penalty)",
        (T("generation"), T("parity")),
    ),
    Mutant(
        "repetition penalty: the prompt's tokens not counted",
        G,
        "np.concatenate([input_ids, new]).astype(np.int64)",
        "np.asarray(new, np.int64)",
        (T("generation"), T("parity")),
    ),
    Mutant(
        "top-p keeps one token too few", G, "keep = cum - p[order] < top_p", "keep = cum < top_p", (T("generation"),)
    ),
    Mutant(
        "top-k drops the k-th token",
        G,
        "z = np.where(z < kth, -np.inf, z)",
        "z = np.where(z <= kth, -np.inf, z)",
        (T("generation"),),
    ),
    Mutant(
        "EOS does not stop generation",
        G,
        "({model.config.eos_token_id} if stop_at_eos else set())",
        "set()",
        (T("generation"),),
    ),
    Mutant("stop ids ignored", G, "ends = {int(t) for t in stop_ids} |", "ends = set() |", (T("generation"),)),
    Mutant("min-p: bar not relative to the best", G, "p >= min_p * p.max()", "p >= min_p", (T("generation"),)),
    Mutant(
        "presence penalty not applied",
        G,
        "out[tokens] -= presence + frequency * counts",
        "out[tokens] -= frequency * counts",
        (T("generation"),),
    ),
    Mutant(
        "frequency penalty not per repeat",
        G,
        "out[tokens] -= presence + frequency * counts",
        "out[tokens] -= presence + frequency",
        (T("generation"),),
    ),
    Mutant(
        "presence/frequency penalties count the prompt",
        G,
        "penalize_counts(logits, new, presence_penalty, frequency_penalty)",
        "penalize_counts(logits, np.concatenate([input_ids, new]), presence_penalty, frequency_penalty)",
        (T("generation"),),
    ),
    Mutant(
        "continued cache fed from the start",
        G,
        "feed = np.asarray(input_ids[cached:], np.int64)",
        "feed = np.asarray(input_ids, np.int64)",
        (T("generation"),),
    ),
    Mutant(
        "stop string: a partial match is shown before it completes",
        G,
        "return len(text) - hold",
        "return len(text)",
        (T("generation"),),
    ),
    Mutant(
        "the model's repetition penalty ignored",
        G,
        "if penalty is not None:\n            return penalty",
        "if False:\n            return penalty",
        (T("generation"),),
    ),
    # what a first session meets
    Mutant(
        "a mistyped local folder is taken for a Hub id",
        "radial_min/io/hub.py",
        'if "/" in text and Path(first).is_dir():',
        "if False:",
        (T("hub"),),
    ),
    Mutant(
        "a slow load is not reported",
        "cli.py",
        "if model.load_seconds > LOADING_NOTE_AFTER:",
        "if False:",
        (T("console"), "-k", "load"),
    ),
    Mutant(
        "Ctrl-C while cli.py imports gives a traceback",
        "cli.py",
        "    quiet_interrupt()\n\nimport radial_min\n",
        "\nimport radial_min\n",
        (T("console"), "-k", "ctrl"),
    ),
    # chat templates
    Mutant(
        "chat template: trim_blocks off",
        "radial_min/chat.py",
        "trim_blocks=True, lstrip_blocks=True",
        "trim_blocks=False, lstrip_blocks=True",
        (T("chat"),),
    ),
    Mutant(
        "chat template: jinja's HTML-escaping tojson",
        "radial_min/chat.py",
        'env.filters["tojson"] = tojson',
        "pass",
        (T("chat"),),
    ),
    Mutant(
        "chat: the end of turn is not a stop",
        "radial_min/chat.py",
        "(ids.add(i) if i is not None else strings.append(end))",
        "None",
        (T("chat"),),
    ),
    Mutant(
        "chat: the cache is never reused",
        "radial_min/chat.py",
        "reuse = self.cache is not None and",
        "reuse = False and",
        (T("chat"),),
    ),
    Mutant(
        "chat: BOS added twice",
        "radial_min/chat.py",
        "and not text.startswith(bos)",
        "",
        (T("chat"),),
    ),
    Mutant(
        "context limit one token too far",
        G,
        "max_position_embeddings - len(input_ids) + 1))",
        "max_position_embeddings - len(input_ids) + 2))",
        (T("generation"),),
    ),
    # checkpoints: shapes, safetensors rules, pickles, configs, images
    Mutant(
        "loader: tensor shapes not checked against the config",
        "radial_min/io/loading.py",
        "if ours in expected and tuple(store.shape(theirs)) != tuple(expected[ours])",
        "if False",
        (T("loading"), T("hostile")),
    ),
    Mutant(
        "loader: NaN/Inf weights not checked",
        "radial_min/io/loading.py",
        'if a.dtype.kind == "f" and not np.isfinite(a).all():',
        "if False:",
        (T("hostile"),),
    ),
    Mutant(
        "safetensors: overlapping tensors accepted",
        "radial_min/io/checkpoint.py",
        "if begin != end:",
        "if begin > end:",
        (T("hostile"), T("fuzz")),
    ),
    Mutant(
        "safetensors: trailing bytes accepted",
        "radial_min/io/checkpoint.py",
        "if self.data_start + end != size:",
        "if self.data_start + end > size:",
        (T("hostile"), T("fuzz")),
    ),
    Mutant(
        "safetensors: a tensor's byte span not checked",
        "radial_min/io/checkpoint.py",
        "if stop < begin or stop - begin != nbytes:",
        "if stop < begin:",
        (T("hostile"), T("fuzz")),
    ),
    Mutant(
        "shard names may leave the checkpoint folder",
        "radial_min/io/checkpoint.py",
        "if bad or len(os.fsencode(shard)) > 255:",
        "if len(os.fsencode(shard)) > 255:",
        (T("hostile"),),
    ),
    Mutant(
        "pickle: storage bounds off by one",
        "radial_min/io/torch_pickle.py",
        "if last >= storage_numel:",
        "if last > storage_numel:",
        (T("torch_pickle"),),
    ),
    Mutant(
        "pickle: memo index unbounded",
        "radial_min/io/torch_pickle.py",
        "not 0 <= arg < len(data)",
        "arg < 0",
        (T("torch_pickle"), T("fuzz")),
    ),
    Mutant(
        "pickle: zip bomb not refused",
        "radial_min/io/torch_pickle.py",
        "if size > limit:",
        "if False:",
        (T("torch_pickle"), T("fuzz")),
    ),
    Mutant(
        "pickle: zero-stride bomb not refused",
        "radial_min/io/torch_pickle.py",
        "if math.prod(ref.shape) > max(elements.size, _MAX_EXPANDED):",
        "if False:",
        (T("torch_pickle"),),
    ),
    Mutant(
        "config: layer count unbounded",
        "radial_min/config.py",
        '"num_hidden_layers": (int, 1, 1024),\n        "num_attention_heads": (int, 1, 1024),\n        "ffn_dim"',
        '"num_hidden_layers": (int, 1, 1 << 40),\n        "num_attention_heads": (int, 1, 1024),\n        "ffn_dim"',
        (T("hostile"), T("fuzz")),
    ),
    Mutant(
        "config: heads need not divide the width",
        "radial_min/config.py",
        "if cfg.hidden_size % cfg.num_attention_heads:",
        "if False:",
        (T("hostile"), T("fuzz"), T("loading")),
    ),
    Mutant(
        "image bomb: pixels not bounded",
        "radial_min/io/images.py",
        "if width * height > MAX_PIXELS:",
        "if False:",
        (T("hostile"), T("images"), REF, "-k", "bomb or pixel_limit"),
    ),
    # hostile inputs through the command line (tools/hostile_inputs.py found each of these)
    Mutant(
        "tokenizer: special tokens not type-checked",
        "radial_min/io/tokenizer.py",
        "if token is not None and not isinstance(token, str):",
        "if False:",
        (T("hostile_cli"), "-k", "tokenizer"),
    ),
    Mutant(
        "tokens.npz: ids not checked against its vocabulary",
        "radial_min/data.py",
        "(a.size and not 0 <= a.min() <= a.max() < size)",
        "False",
        (T("hostile_cli"), "-k", "token_cache"),
    ),
    Mutant(
        ".npy header not bounded by the file's size",
        "radial_min/io/outputs.py",
        "math.prod(shape) * dtype.itemsize > nbytes",
        "False",
        (T("hostile_cli"), "-k", "images"),
    ),
    Mutant(
        "router weights may be NaN",
        "radial_min/router.py",
        'if a.dtype.kind != "f" or not np.isfinite(a).all():',
        "if False:",
        (T("hostile_cli"), "-k", "router"),
    ),
    Mutant(
        "error lines not escaped",
        "cli.py",
        'print(f"error: {_one_line(str(e))}"',
        'print(f"error: {e}"',
        (T("hostile_cli"), "-k", "control"),
    ),
    Mutant(
        "training size not bounded by the memory available",
        "radial_min/train.py",
        "        if need > available_bytes:\n",
        "        if False:\n",
        (T("hostile_cli"), "-k", "fit"),
    ),
    Mutant(
        "resume: state tensors not checked against the run",
        "radial_min/train.py",
        "    if wrong:",
        "    if False:",
        (T("hostile_cli"), "-k", "state_tensors"),
    ),
    Mutant(
        "a walk's depth not capped at its router's limit (generate --max-depth 10**9: 22 GiB of routes)",
        R,
        "self.max_depth = limit if max_depth is None else min(max_depth, limit)",
        "self.max_depth = limit if max_depth is None else max_depth",
        (T("cli"), "-k", "router"),
    ),
    # bounds on hostile files and settings, each at its mechanism (tests/test_refusals.py)
    Mutant("JSON: integers unbounded", OUT, "if digits > MAX_INT_DIGITS:", "if False:", (REF, "-k", "json")),
    Mutant("JSON: nesting unbounded", OUT, "if depth > MAX_DEPTH:", "if False:", (REF, "-k", "json_reader")),
    Mutant("JSON: a key twice kept", OUT, "if len(d) != len(pairs):", "if False:", (REF, "-k", "json_reader")),
    Mutant(
        "JSON: lone surrogates kept",
        OUT,
        "surrogates = _SURROGATE.search(text) is not None",
        "surrogates = False",
        (REF, "-k", "json_reader or surrogate"),
    ),
    Mutant("JSON: file size unbounded", OUT, "if len(raw) > max_bytes:", "if False:", (REF, "-k", "regular_file")),
    Mutant(
        "files: a folder or FIFO read as a file",
        OUT,
        "if not stat.S_ISREG(mode):",
        "if False:",
        (REF, "-k", "regular_file"),
    ),
    Mutant(
        "JSON: every JSON file not through the bounded reader (config.json)",
        "radial_min/models/__init__.py",
        "return parse_config(read_json(path, CheckpointError), str(path))",
        "return parse_config(__import__('json').loads(path.read_text()), str(path))",
        (REF, "-k", "every_json"),
    ),
    Mutant(
        "safetensors: a file's first bytes shown as a header length",
        "radial_min/io/checkpoint.py",
        'f"{self.path}: not a safetensors file, or truncated: its first 8 bytes do not give a header "',
        'f"{self.path}: not a safetensors file {n}, or truncated: its first 8 bytes do not give a header "',
        (REF, "-k", "linked_text"),
    ),
    Mutant(
        "checkpoint: a FIFO in place of the weights skipped",
        "radial_min/io/checkpoint.py",
        "if present(single, CheckpointError):",
        "if single.is_file():",
        (REF, "-k", "fifo_in_place"),
    ),
    Mutant(
        "checkpoint: shard names of any length",
        "radial_min/io/checkpoint.py",
        "if bad or len(os.fsencode(shard)) > 255:",
        "if bad:",
        (REF, "-k", "100_kb"),
    ),
    Mutant(
        "router: shapes from allocated weights",
        "radial_min/router.py",
        "expected = router_shapes(cfg)",
        "expected = {k: v.shape for k, v in init_router(cfg).items()}",
        (REF, "-k", "router_shapes"),
    ),
    Mutant(
        "router: logits may overflow float32",
        "radial_min/router.py",
        "if not bound < _FLOAT32_SAFE:",
        "if False:",
        (REF, "-k", "overflow_float32"),
    ),
    Mutant(
        "config: nulls taken as defaults",
        "radial_min/config.py",
        "if key not in NULLABLE[cls]:",
        "if False:",
        (REF, "-k", "nulls"),
    ),
    Mutant(
        "config: OPT token ids beyond the vocabulary",
        "radial_min/config.py",
        "if not _NO_TOKEN <= v < cfg.vocab_size:",
        "if False:",
        (REF, "-k", "token_ids"),
    ),
    Mutant(
        "tokenizer: a tokenizer.json FIFO taken as absent",
        TOK,
        "if _library_file(whole):",
        "if whole.is_file():",
        (REF, "-k", "tokenizer_json_fifo"),
    ),
    Mutant(
        "tokenizer: the file's truncation kept", TOK, "self.backend.no_truncation()", "pass", (REF, "-k", "truncation")
    ),
    Mutant(
        "tokenizer: duplicate ids kept",
        TOK,
        "if len(set(vocab.values())) != len(vocab):",
        "if False:",
        (REF, "-k", "duplicate_ids"),
    ),
    Mutant("tokenizer: one enormous word tokenized", TOK, "if not cuts:", "if False:", (REF, "-k", "enormous")),
    Mutant(
        "tokenizer: pieces cut without checking the tokens",
        TOK,
        "if self._cuts_cleanly(text, c)), None)",
        "if True), None)",
        (REF, "-k", "tokenize"),
    ),
    Mutant(
        "images: no side limit for the model",
        IMG,
        "if max_side is not None and max(width, height) > max_side:",
        "if False:",
        (REF, "-k", "far_larger"),
    ),
    Mutant(
        "images: .npy pixels outside 0..255",
        IMG,
        "if a.dtype != np.uint8 and a.size and not 0 <= a.min() <= a.max() <= 255:",
        "if False:",
        (REF, "-k", "npy_pixels"),
    ),
    Mutant(
        "images: TIFF directories not followed",
        IMG,
        "_check_tiff_directories(data, path)  #",
        "pass  #",
        (REF, "-k", "tiff"),
    ),
    Mutant(
        "images: only Pillow's OSError named",
        IMG,
        "except Exception as e:  # Pillow's decoders",
        "except OSError as e:  # Pillow's decoders",
        (REF, "-k", "decoder"),
    ),
    Mutant(
        "GGUF: the vocabulary and merges decoded at open and kept by the reader",
        GGUF,
        "return self._skip_strings(n)",
        "return self.strings(self._skip_strings(n))",
        (T("gguf"), "-k", "vocabulary"),
    ),
    Mutant(
        "GGUF: the tokenizer library's error on damaged metadata let through",
        TOK,
        "_build(folder, lambda: read_tokenizer(folder), what)",
        "read_tokenizer(folder)",
        (T("gguf"), "-k", "damaged"),
    ),
    Mutant("GGUF: tensors need not tile the data", GGUF, "if offset != expected:", "if False:", (REF, "-k", "gguf")),
    Mutant(
        "GGUF: blocks and dimensions unchecked",
        GGUF,
        "if len(dims) > 4 or dims and dims[0] % block:",
        "if False:",
        (REF, "-k", "gguf"),
    ),
    Mutant(
        "GGUF: the file's end unchecked",
        GGUF,
        "if not data_offset + end <= size <= data_offset + expected:",
        "if False:",
        (REF, "-k", "gguf"),
    ),
    Mutant(
        "sampling: an infinite temperature accepted",
        G,
        "if not 0 <= temperature < np.inf:",
        "if not temperature >= 0:",
        (REF, "-k", "sampling"),
    ),
    Mutant(
        "sampling: an infinite repetition penalty accepted",
        G,
        "if not 0 < repetition_penalty < np.inf:",
        "if not repetition_penalty > 0:",
        (REF, "-k", "sampling"),
    ),
    Mutant(
        "sampling: logits divided before the largest is subtracted",
        G,
        "z = (z - top) / temperature if np.isfinite(top)",
        "z = z / temperature if np.isfinite(top)",
        (REF, "-k", "tiny_temperature"),
    ),
    Mutant(
        "resume: a negative Adam v accepted",
        "radial_min/optim.py",
        'if prefix == "adam.v." and (a < 0).any():',
        "if False:",
        (REF, "-k", "resumed_state"),
    ),
    Mutant(
        "resume: NaN in a state accepted",
        "radial_min/optim.py",
        "            if bad:",
        "            if False:",
        (REF, "-k", "resumed_state"),
    ),
    Mutant(
        "--out: an empty name is the current folder",
        OUT,
        "if not text.strip():",
        "if False:",
        (REF, "-k", "output_folders"),
    ),
    Mutant(
        "--out: a file taken as the folder",
        OUT,
        "if mode is not None and not stat.S_ISDIR(mode):",
        "if False:",
        (REF, "-k", "output_folders"),
    ),
    Mutant(
        "--out: a path under a file", OUT, "if not stat.S_ISDIR(base_mode):", "if False:", (REF, "-k", "output_folders")
    ),
    Mutant(
        "--out: a read-only mount",
        OUT,
        "if not os.access(base, os.W_OK | os.X_OK):",
        "if False:",
        (REF, "-k", "read_only"),
    ),
    Mutant(
        "--out: the run's files not checked",
        OUT,
        "            present(path / name)",
        "            pass",
        (REF, "-k", "output_folders"),
    ),
    Mutant(
        "perplexity of sequences of one token",
        O,
        "    check_scorable(sequences)\n    if getattr",
        "    if getattr",
        (REF, "-k", "one_token"),
    ),
    # the tests that missed real bugs
    Mutant(
        "streamed .bin: storage offset in bytes, not elements",
        "radial_min/io/torch_pickle.py",
        "+ ref.offset * stored.itemsize, stored",
        "+ ref.offset, stored",
        (T("torch_pickle"), "-k", "storage_offset"),
    ),
    Mutant(
        "a token decoded alone runs one block past max_depth",
        R,
        "            if step < net.max_depth:\n                moves, gate = net.router.decide(",
        "            if step <= net.max_depth:\n                moves, gate = net.router.decide(",
        (RADIAL, "-k", "max_depth"),
    ),
    Mutant(
        "RMSNorm kernel without eps",
        K,
        "r = np.float32(1.0 / math.sqrt(ss / n + eps))",
        "r = np.float32(1.0 / math.sqrt(ss / n))",
        (KERNELS, "-k", "rmsnorm"),
    ),
    Mutant(
        "RMSNorm reference without eps",
        K,
        "rstd = (1.0 / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + eps)).astype(x.dtype)",
        "rstd = (1.0 / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True))).astype(x.dtype)",
        (KERNELS, "-k", "rmsnorm"),
    ),
    # the test suite's own guards
    Mutant(
        "tests: matmul backend not restored after a test",
        "tests/conftest.py",
        "    kernels.set_backend(before)",
        "    pass",
        (KERNELS,),
    ),
    # training
    Mutant(
        "AdamW without bias correction",
        "radial_min/optim.py",
        "m_hat = m[name] / (1 - beta1**step)",
        "m_hat = m[name]",
        (T("train"), T("router")),
    ),
    Mutant(
        "resume: batches not seeded by the step",
        "radial_min/train.py",
        "rng = np.random.default_rng([cfg.run.seed, step])",
        "rng = np.random.default_rng([cfg.run.seed, 0])",
        (T("train"),),
    ),
    # the variable-depth task
    Mutant(
        "hop task: answers one hop short",
        "radial_min/tasks.py",
        "for _ in range(k):",
        "for _ in range(k - 1):",
        (T("tasks"),),
    ),
    Mutant(
        "hop task: f two cycles instead of one",
        "radial_min/tasks.py",
        "f[cycle] = np.roll(cycle, -1)",
        "f[cycle] = np.roll(cycle, -2)",
        (T("tasks"),),
    ),
    Mutant(
        "hop task: start nodes may repeat",
        "radial_min/tasks.py",
        "rng.permutation(n)[: task.queries]",
        "rng.integers(0, n, task.queries)",
        (T("tasks"),),
    ),
    Mutant(
        "hop task: sequences not seeded by their index",
        "radial_min/tasks.py",
        "np.random.default_rng([_SALT[stream], seed, i])",
        "np.random.default_rng([_SALT[stream], seed, 0])",
        (T("tasks"),),
    ),
    Mutant(
        "hop task: the eval stream is the train stream",
        "radial_min/tasks.py",
        '_SALT = {"train": 0x7A51, "eval": 0x3E7A}',
        '_SALT = {"train": 0x7A51, "eval": 0x7A51}',
        (T("tasks"),),
    ),
    Mutant(
        "hop task: accuracy scores the noise tokens",
        "radial_min/tasks.py",
        "if label != NOISE:",
        "if True:",
        (T("tasks"),),
    ),
    Mutant(
        "hop task: the loss mask keeps the noise tokens",
        "radial_min/tasks.py",
        "    return scored_mask(labels).astype(np.float32)",
        "    return np.ones(labels[:, 1:].shape, np.float32)",
        (T("tasks"),),
    ),
    Mutant(
        "trainer: a batch's loss mask dropped",
        "radial_min/train.py",
        "loss_and_grads(net, batch, rs, rng=rng, mask=mask)",
        "loss_and_grads(net, batch, rs, rng=rng, mask=None)",
        (T("tasks"), "-k", "trainer"),
    ),
    Mutant(
        "masked cross-entropy: the backward ignores the mask",
        "radial_min/ops.py",
        "        probs *= (weights / weights.sum())[:, None].astype(probs.dtype)",
        "        probs /= len(targets)",
        (T("tasks"), "-k", "mask"),
    ),
    Mutant(
        "hop task: blocks per label read one position late",
        "radial_min/tasks.py",
        "depth = net.last_walk.depth.reshape(B, T)  # blocks run at each input position",
        "depth = np.roll(net.last_walk.depth.reshape(B, T), -1, 1)  # blocks run at each input position",
        (T("tasks"), "-k", "score"),
    ),
    Mutant(
        "trainer: --kv-rule not passed to the router",
        "radial_min/train.py",
        "rc = dataclasses.replace(r.router_config(model.config), kv_rule=r.kv_rule)  # saved with the router",
        "rc = r.router_config(model.config)",
        (T("estimators"), "-k", "fill"),
    ),
    Mutant(
        "hop routes: a token shown under its own position's blocks",
        "radial_min/tasks.py",
        "run = [int(b) for b in routes[t - 1] if b >= 0]",
        "run = [int(b) for b in routes[min(t, len(routes) - 1)] if b >= 0]",
        (T("depth_task"), "-k", "show_routes"),
    ),
    Mutant(
        "hop task: depth against difficulty paired with the input token's label",
        "radial_min/tasks.py",
        "target_labels = labels[:, 1:]  # [B, T]: the label of what position t predicts",
        "target_labels = labels[:, :-1]  # [B, T]: the label of what position t predicts",
        (T("tasks"), "-k", "difficulty"),
    ),
    Mutant(
        "hop task: Spearman's ranks break ties by order",
        "radial_min/tasks.py",
        "    return sums[inverse] / np.bincount(inverse)[inverse]",
        "    return r",
        (T("tasks"), "-k", "spearman"),
    ),
    # GGUF block formats kept quantized (quant.py) and their kernels
    Mutant(
        "the thread pool ignores other processes' running threads",
        K,
        '_CPUS - round(_LOAD["others"])',
        "_CPUS",
        (KERNELS, "-k", "busy"),
    ),
    Mutant(
        "the caller's numba.set_num_threads overridden by the free-core rule",
        K,
        '_LOAD["free"] = max(1, min(_CPUS, _thread_ceiling(), _CPUS - round(_LOAD["others"])))',
        '_LOAD["free"] = max(1, min(_CPUS, numba.config.NUMBA_NUM_THREADS, _CPUS - round(_LOAD["others"])))',
        (KERNELS, "-k", "ceiling"),
    ),
    Mutant(
        "the module's own lowered thread count taken as the caller's ceiling",
        K,
        '    _THREADS["set"] = threads\n',
        "",
        (KERNELS, "-k", "ceiling"),
    ),
    Mutant(
        "a sleeping thread of ours counted as running",
        K,
        'own += f.read().rpartition(b")")[2].split()[0] == b"R"',
        'own += f.read().rpartition(b")")[2].split()[0] in b"RS"',
        (KERNELS, "-k", "proc"),
    ),
    Mutant(
        "many-row block product on the pool: every tile widens the first rows",
        K,
        "dequantize_q4_serial(q, scale, offset, j_lo // G, cols)",
        "dequantize_q4_serial(q, scale, offset, 0, cols)",
        (T("quant"), "-k", "pool"),
    ),
    Mutant(
        "block matvec: the fourth byte of each pass dropped",
        K,
        "part[r] += (_byte4(v0, l0, d0) + _byte4(v1, l1, d1)) + (_byte4(v2, l2, d2) + _byte4(v3, l3, d3))",
        "part[r] += (_byte4(v0, l0, d0) + _byte4(v1, l1, d1)) + _byte4(v2, l2, d2)",
        (T("quant"),),
    ),
    Mutant(
        "8-bit block matvec: the second weight of each pass dropped",
        K,
        "part[r] += (w0 * x0 + w1 * x1) + (w2 * x2 + w3 * x3)",
        "part[r] += w0 * x0 + (w2 * x2 + w3 * x3)",
        (T("quant"),),
    ),
    Mutant(
        "block matvec: high nibbles dropped",
        K,
        "return v * lo + np.floor(v * _SIXTEENTH) * d",
        "return v * lo",
        (T("quant"),),
    ),
    Mutant(
        "block matvec: offsets (Q4_1's minimum) dropped",
        K,
        "acc[r] += widen(scale[g, b, r]) * part[r] + widen(offset[g, b, r]) * sums[b]",
        "acc[r] += widen(scale[g, b, r]) * part[r]",
        (T("quant"),),
    ),
    Mutant(
        "prefill tiles: every tile widened from the first rows",
        K,
        "(w.q, w.scale, w.offset, lo // G, cols)",
        "(w.q, w.scale, w.offset, 0, cols)",
        (T("quant"),),
    ),
    Mutant(
        "fused gate/up (int8, float32): silu(gate) times gate, not up",
        K,
        "out[n] = g / (np.float32(1.0) + exp32(-g)) * u",
        "out[n] = g / (np.float32(1.0) + exp32(-g)) * g",
        (T("quant"), T("llama")),
    ),
    Mutant(
        "rotary table: angles of position 2p (p + 1 would survive: rotary scores depend on differences only)",
        K,
        "self.cos, self.sin = rope_angles(np.arange(n_positions), head_dim, theta)  # [P, D/2] each",
        "self.cos, self.sin = rope_angles(2 * np.arange(n_positions), head_dim, theta)  # [P, D/2] each",
        (T("llama"),),
    ),
    Mutant(
        "Q4_K: the high bits of the minimums dropped",
        "radial_min/quant.py",
        "(s[..., 8:12] >> 4) | ((s[..., 4:8] >> 2) & 48)",
        "(s[..., 8:12] >> 4)",
        (T("quant"),),
    ),
    Mutant(
        "Q6_K: values not centred on 32",
        "radial_min/quant.py",
        ".astype(np.int16) - 32)",
        ".astype(np.int16) - 31)",
        (T("quant"),),
    ),
    Mutant(
        "GGUF native: q/k rows left in llama.cpp's order",
        "radial_min/io/gguf_file.py",
        "raw = _unpermute(raw, heads)  # whole rows move",
        "raw = raw  # whole rows move",
        (T("gguf"), "-k", "writer_fixture"),
    ),
    Mutant(
        "sgemm in one call of the whole width (a streamed head's pieces round differently)",
        K,
        "(sgemm, x, wf, out, BLAS_ROWS, BLAS_COLUMNS)",
        "(sgemm, x, wf, out, BLAS_ROWS, max(BLAS_COLUMNS, wf.shape[0]))",
        (T("stream"), "-k", "head_is_read"),
    ),
    Mutant(
        "fused gate/up: silu on the up projection",
        K,
        "out[g * G + r] = v / (np.float32(1.0) + exp32(-v)) * up[r]",
        "out[g * G + r] = up[r] / (np.float32(1.0) + exp32(-up[r])) * v",
        (T("quant"), "-k", "gate_up"),
    ),
    Mutant(
        "train --preset ignored",
        "cli.py",
        "cfg = tr.TrainConfig.of(**{**tr.PRESETS.get(args.preset, {}), **given})",
        "cfg = tr.TrainConfig.of(**given)",
        (T("cli"), "-k", "preset"),
    ),
    # the routing rules a real model needs: fill, the sink, restricted skipping, the relaxed walk
    Mutant(
        "fill: tokens passing over a block write no keys (block schedule)",
        R,
        "self.fill_block(b, np.flatnonzero((self.move > b) & (self.prev < b)))",
        "self.fill_block(b, np.flatnonzero((self.move > b) & (self.prev < b))[:0])",
        (RULES, "-k", "oracle_under_both_rules or fill_writes"),
    ),
    Mutant(
        "fill: a decoded token writes no key at the last block it passes over",
        R,
        "for skipped in range(prev + 1, b) if self.fill else ():",
        "for skipped in range(prev + 1, b - 1) if self.fill else ():",
        (RULES, "-k", "oracle_under_both_rules"),
    ),
    Mutant(
        "fill: the token schedule writes no keys",
        R,
        "self.fill_moves(rows)",
        "self.fill_moves(rows[:0])",
        (RULES, "-k", "oracle_under_both_rules"),
    ),
    Mutant(
        "fill: keys not rotated",
        B,
        "k = self.rotary(k, self.n_kv_head, rows.pos)",
        "k = k",
        (RULES, "-k", "oracle_under_both_rules"),
    ),
    Mutant(
        "fill: keys and values swapped",
        B,
        "k, v = kvs[:, :half], np.ascontiguousarray(kvs[:, half:])",
        "v, k = kvs[:, :half], np.ascontiguousarray(kvs[:, half:])",
        (RULES, "-k", "oracle_under_both_rules"),
    ),
    Mutant(
        "fill: the filled keys' gradient dropped",
        R,
        "dX[r] += blocks[b].write_kv_backward(tape)",
        "blocks[b].write_kv_backward(tape)",
        (RULES, "-k", "fill_rule_gradients"),
    ),
    Mutant(
        "row_slice: a block matrix cut one group late",
        B,
        "cut = slice(lo // G, -(-hi // G))",
        "cut = slice(lo // G + 1, -(-hi // G) + 1)",
        (RULES, "-k", "row_slice"),
    ),
    Mutant(
        "sink: position 0 routed like the rest",
        "radial_min/router.py",
        "sink |= np.broadcast_to(np.asarray(pos) < cfg.sink, sink.shape)",
        "sink |= np.broadcast_to(np.asarray(pos) < cfg.sink - 1, sink.shape)",
        (RULES, "-k", "sink"),
    ),
    Mutant(
        "sink: decide's sink-free early return taken when only sink_norm is set",
        "radial_min/router.py",
        "if not (cfg.sink or cfg.sink_norm):",
        "if not cfg.sink:",
        (RULES, "-k", "sink"),
    ),
    Mutant(
        "decide's sink-free early return: the gate halved (a gated network's branches scaled wrong)",
        "radial_min/router.py",
        "return moves, prob\n        sink = self.sinks(x, step, pos)",
        "return moves, prob * 0.5\n        sink = self.sinks(x, step, pos)",
        (T("depth_task"), "-k", "hop_network"),
    ),
    Mutant(
        "sink: a sink row jumps two blocks",
        "radial_min/router.py",
        "moves[sink], prob[sink] = prev[sink] + 1, 1.0",
        "moves[sink], prob[sink] = prev[sink] + 2, 1.0",
        (RULES, "-k", "sink"),
    ),
    Mutant(
        "sink: trained as any other row",
        "radial_min/router.py",
        "probs[sink] = 0.0",
        "probs[sink] = probs[sink]",
        (RULES, "-k", "sink"),
    ),
    Mutant(
        "restriction: the kernel may pass over a mandatory block",
        "radial_min/router.py",
        "and m != exit_ or m > reach[prev[i] + 1]:",
        "and m != exit_:",
        (RULES, "-k", "mandatory"),
    ),
    Mutant(
        "restriction: the training mask may pass over a mandatory block",
        "radial_min/router.py",
        "ok &= cols[None, :] <= cfg.reach()[prev + 1][:, None]",
        "ok &= cols[None, :] <= cfg.exit",
        (RULES, "-k", "mandatory"),
    ),
    Mutant(
        "restriction: the reach stops one block past a mandatory block",
        "radial_min/router.py",
        "                nxt = p\n",
        "                nxt = p + 1\n",
        (RULES, "-k", "mandatory"),
    ),
    Mutant(
        "oracle: the sink and mandatory blocks ignored",
        O,
        "(rows < sink) | (b in fixed)",
        "(b < 0)",
        (RULES, "-k", "oracle_follows"),
    ),
    Mutant(
        "relaxed walk: rows take the router's argmax",
        R,
        "moves = np.minimum(prev + 1, self.exit)\n",
        "moves = probs.argmax(-1)\n",
        (RULES, "-k", "relaxed"),
    ),
    Mutant(
        "relaxed walk: the compute term rewards the gates",
        R,
        "d[run, moves[run]] += d_expected / n",
        "d[run, moves[run]] -= d_expected / n",
        (RULES, "-k", "relaxed"),
    ),
    # the router estimators: expert choice (Mixture-of-Depths / -Recursions) and the score function
    Mutant(
        "expert choice: the gate's sigmoid backward dropped",
        "radial_min/router.py",
        "ds = dprobs[:, block] * gate * (1 - gate)  # sigmoid backward",
        "ds = dprobs[:, block] * gate  # sigmoid backward",
        (EST, "-k", "expert_choice_gradients"),
    ),
    Mutant(
        "expert choice: the auxiliary loss's gradient reversed",
        "radial_min/router.py",
        "ds = ds + self.aux_weight * (gate - target) / free.sum()",
        "ds = ds + self.aux_weight * (target - gate) / free.sum()",
        (EST, "-k", "expert_choice_gradients"),
    ),
    Mutant(
        "expert choice: capacity rounded down",
        "radial_min/router.py",
        "keep = np.ceil(self.config.capacity * counts - 1e-9).astype(np.int64)",
        "keep = np.floor(self.config.capacity * counts).astype(np.int64)",
        (EST, "-k", "pick or capacity"),
    ),
    Mutant(
        "expert choice: the sinks not kept",
        "radial_min/router.py",
        "chosen |= sink\n",
        "chosen |= sink & False\n",
        (EST, "-k", "pick"),
    ),
    Mutant(
        "expert choice: generation runs blocks of any score",
        "radial_min/router.py",
        "run = later if sink[i] else later[s[i, later] > 0]",
        "run = later",
        (EST, "-k", "decide or causal"),
    ),
    Mutant(
        "router gradients pile up over steps (only the MLP router's are zeroed)",
        "radial_min/train.py",
        "    if isinstance(router, LEARNED):\n        router.grad",
        "    if isinstance(router, Router):\n        router.grad",
        (EST, "-k", "pile_up"),
    ),
    Mutant(
        "score function: 1/p left out of d log p",
        R,
        "d[i, moves[i]] += advantage[rows[i]] / (n * probs[i, moves[i]])",
        "d[i, moves[i]] += advantage[rows[i]] / n",
        (EST, "-k", "score_function"),
    ),
    Mutant(
        "score function: moves drawn from half the distribution",
        R,
        "u = rng.random(len(probs)) * cdf[:, -1]",
        "u = rng.random(len(probs)) * 0.5 * cdf[:, -1]",
        (EST, "-k", "sample_moves"),
    ),
    Mutant(
        "expert choice: no capacity warm-up",
        "radial_min/train.py",
        "net.router.config.capacity = capacity_at(step, final_capacity, rs.capacity_warmup)",
        "net.router.config.capacity = final_capacity",
        (EST, "-k", "resume and recursion"),
    ),
    Mutant(
        "expert-choice recursion trains under the per-layer cache (a later pass writes keys read before)",
        R,
        'if not router.config.forward_only and net.cache_policy != "per-step":',
        "if False:",
        (EST, "-k", "recursion_trains_with"),
    ),
    Mutant(
        "expert-choice recursion with the per-layer cache passes the settings' checks",
        "radial_min/train.py",
        'r.cache_policy == "global" or (not r.forward_only and r.cache_policy != "per-step")',
        'r.cache_policy == "global"',
        (EST, "-k", "recursion_trains_with"),
    ),
    Mutant(
        "a training cache takes an entry behind a key already read",
        C,
        "if self.train and (np.asarray(keys) <= self.read_to[seq]).any():",
        "if False:",
        (EST, "-k", "behind_a_read"),
    ),
    Mutant(
        "a training cache remembers no key read",
        C,
        "np.maximum.at(store.read_to, seq, keys)",
        "pass",
        (EST, "-k", "behind_a_read"),
    ),
    Mutant(
        "hop grid: expert-choice recursion keeps the per-layer cache",
        "tools/depth_task.py",
        'flat.update(cache_policy="per-step")',
        "pass",
        (T("depth_task"), "-k", "recursion_runs"),
    ),
    Mutant(
        "hop report: a control trained on from a sequential run is a point of the curve",
        "tools/depth_task.py",
        'return "sequential, trained on" if r["train"].get("init_from") else "sequential"',
        'return "sequential"',
        (T("depth_task"), "-k", "paired"),
    ),
    Mutant(
        "hop report: routed runs paired with a control of another start",
        "tools/depth_task.py",
        'key = (r["train"].get("init_from"), r["train"]["steps"])',
        'key = (r["train"].get("init_from", "")[:-1] + "0", r["train"]["steps"])',
        (T("depth_task"), "-k", "paired"),
    ),
    Mutant(
        "hop report: reused blocks paired with the sequential runs of seed 0",
        "tools/depth_task.py",
        "same, deep = (np.array([acc(seq[seed_of(r), width, b]) for r in rs]) for b in (blocks, depth))",
        "same, deep = (np.array([acc(seq[0, width, b]) for r in rs]) for b in (blocks, depth))",
        (T("depth_task"), "-k", "reused"),
    ),
    Mutant(
        "bench: the routing timer asks the network instead of its router",
        "bench/routing.py",
        "    net.router.decide(x, [-1], [0])",
        "    net.decide(x, [-1], [0])",
        (T("bench"),),
    ),
    Mutant(
        "the installed SmolLM2 file's name alone is not resolved",
        "cli.py",
        "if text == SMOLLM2_FILE and not Path(text).exists() and (found := installed_smollm2()) is not None:",
        "if False and (found := installed_smollm2()) is not None:",
        (T("chat"), "-k", "file_name"),
    ),
    Mutant(
        "radial.json naming a missing router: the error names the router's file, not radial.json's field",
        R,
        "    if missing:\n        raise CheckpointError(",
        "    if False:\n        raise CheckpointError(",
        (T("cotrained"), "-k", "co_trained_files"),
    ),
    Mutant(
        "OpenBLAS keeps its own threads (they spin on the Numba pool's cores)",
        K,
        '        _BLAS["found"][0](1)\n',
        '        _BLAS["found"][0](2)\n',
        (T("kernels"), "-k", "one_thread"),
    ),
    Mutant(
        "int8 weights sent to the float32 sgemm kernel (their scales lost)",
        K,
        "if sgemm is not None and q.dtype == np.int8:",
        "if sgemm is not None and q.dtype == np.uint8:",
        (T("kernels"), "-k", "auto_backend"),
    ),
    Mutant(
        "auto backend: plain matrices kept on our matmul",
        K,
        "sgemm = _cblas_sgemm()\n    if sgemm is not None:\n        _blas_one_thread()",
        "sgemm = None\n    if sgemm is not None:\n        _blas_one_thread()",
        (T("kernels"), "-k", "auto_backend"),
    ),
    Mutant(
        "float64 rows sent to sgemm (read as float32)",
        K,
        'if _BACKEND["matmul"] == "numba" or x.dtype != np.float32:\n        return None',
        'if _BACKEND["matmul"] == "numba":\n        return None',
        (T("kernels"), "-k", "float64"),
    ),
    Mutant(
        "exp32: the exponent's bias off by one (every value halved)",
        K,
        "_EXPONENT_MAGIC = 1023.0 + 2.0**52",
        "_EXPONENT_MAGIC = 1022.0 + 2.0**52",
        (T("kernels"), "-k", "exp32"),
    ),
    Mutant(
        "exp32: the series' coefficients a millionth off",
        K,
        "math.log(2.0) ** k / math.factorial(k)",
        "math.log(2.0) ** k / math.factorial(k) * 1.000001",
        (T("kernels"), "-k", "exp32"),
    ),
    Mutant(
        "many-row linear: the bias left out after sgemm",
        K,
        "    if b is not None:\n        out += b\n    return out",
        "    if b is not None:\n        out += 0 * b\n    return out",
        (T("kernels"), "-k", "dispatch"),
    ),
    Mutant(
        "auto backend: block tiles sent to our matmul",
        K,
        "if sgemm is not None:\n        kernel = _sized(matmul_blas_blocks",
        "if False:\n        kernel = _sized(matmul_blas_blocks",
        (T("kernels"), "-k", "auto_backend"),
    ),
    Mutant(
        "block tiles: the widened buffer not kept alive (freed before sgemm reads it)",
        K,
        "        _keep_alive(cols)\n",
        "",
        (T("kernels"), "-k", "stay_alive"),
    ),
    Mutant(
        "int8 tiles: the widened buffer not kept alive (freed before sgemm reads it)",
        K,
        "        _keep_alive(rows)\n",
        "",
        (T("kernels"), "-k", "stay_alive"),
    ),
    Mutant(
        "the pool asks for more threads than Numba started",
        K,
        "threads = min(free_cores(), numba.config.NUMBA_NUM_THREADS) if work >= PARALLEL_FROM else 1",
        "threads = free_cores() if work >= PARALLEL_FROM else 1",
        (T("kernels"), "-k", "never_asks"),
    ),
    Mutant(
        "blas backend without OpenBLAS: our matmul instead of NumPy's",
        K,
        'elif _BACKEND["matmul"] == "blas" and x.dtype == np.float32:',
        "elif False:",
        (T("kernels"), "-k", "numpys_matmul"),
    ),
    Mutant(
        "int8 tiles on the pool: every row widened with the first rows' scales",
        K,
        "rows[j, k] = np.float32(q[j_lo + j, k]) * scale[j_lo + j]",
        "rows[j, k] = np.float32(q[j_lo + j, k]) * scale[j]",
        (T("kernels"), "-k", "sgemm_on_the_pool"),
    ),
    # search labels (analysis/route_search.py)
    Mutant(
        "route search: the greedy step takes the costliest candidate",
        "radial_min/analysis/route_search.py",
        "best = names[int(np.argmin([costs[c] for c in names]))]",
        "best = names[int(np.argmax([costs[c] for c in names]))]",
        (T("route_search"), "-k", "brute_force"),
    ),
    Mutant(
        "route search: a candidate run from the stream entering the block before it",
        "radial_min/analysis/route_search.py",
        "run_from(model, states[c] if reuse else x0, start, trial, kv_rule)",
        "run_from(model, states[max(c - 1, 0)] if reuse else x0, start, trial, kv_rule)",
        (T("route_search"), "-k", "brute_force or reusing"),
    ),
    Mutant(
        "route search: the sink skips the chosen blocks too",
        "radial_min/analysis/route_search.py",
        "keep[sink:, list(skipped)] = False",
        "keep[:, list(skipped)] = False",
        (T("route_search"), "-k", "labels"),
    ),
]


def copy_tree(dst: Path) -> None:
    listed = ["git", "ls-files", "--cached", "--others", "--exclude-standard"]  # tracked, and new files not ignored
    files = subprocess.run(listed, cwd=ROOT, capture_output=True, text=True, check=True).stdout.splitlines()
    for f in files:
        if (ROOT / f).is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dst / f)


def pytest(tree: Path, args, timeout: int) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": str(tree)}  # the copy, never the editable install of the worktree
    if "RADIAL_MIN_DATA" not in env and (ROOT.parent / "shared" / "data").is_dir():
        env["RADIAL_MIN_DATA"] = str(ROOT.parent / "shared" / "data")  # the copy has no ../shared beside it
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *args]
    try:
        p = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, "timeout"
    lines = [line for line in p.stdout.splitlines() if line.strip()] or p.stderr.strip().splitlines() or [""]
    failed = [line for line in lines if line.startswith(("FAILED", "ERROR"))]  # the test that caught it
    return p.returncode, (failed or lines)[-1 if not failed else 0][:160]


def run_mutant(tree: Path, m: Mutant, timeout: int) -> tuple[str, str]:
    """(verdict, pytest's last line): caught, SURVIVED, STALE or ERROR (pytest could not run the tests)."""
    path = tree / m.file
    text = path.read_text(encoding="utf-8")
    if text.count(m.old) != 1:
        return "STALE", f"fragment found {text.count(m.old)} times in {m.file}"
    stat = path.stat()
    path.write_text(text.replace(m.old, m.new), encoding="utf-8")
    try:
        code, last = pytest(tree, m.tests, timeout)
    finally:
        path.write_text(text, encoding="utf-8")
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # numba's cache of the unbroken file stays valid
    if code == 1:
        return "caught", last
    if code == -1:
        return "caught", f"timeout after {timeout} s (the tests hang on it)"
    return ("SURVIVED" if code == 0 else "ERROR"), last


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("words", nargs="*", help="run only mutants whose name contains one of these (default: all)")
    ap.add_argument("--list", action="store_true", help="list the mutants and their tests, run nothing")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per mutant before it counts as a hang")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.words or any(w.lower() in m.name.lower() for w in args.words)]
    if args.list:
        for m in chosen:
            print(f"{m.name:60s} {m.file:26s} {' '.join(m.tests)}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        copy_tree(tree)
        tests = sorted({a for m in chosen for a in m.tests if a.startswith("tests/")})
        t0 = time.time()
        code, last = pytest(tree, tests, 1800)
        print(
            f"{'unbroken tree':60s} {'':26s} {'passes' if code == 0 else 'FAILS':9s} {time.time() - t0:6.1f}s  {last}"
        )
        if code != 0:
            print("the tests fail without any mutant: fix that first", file=sys.stderr)
            return 2
        verdicts = []
        for m in chosen:
            t0 = time.time()
            verdict, last = run_mutant(tree, m, args.timeout)
            verdicts.append((m.name, verdict))
            print(f"{m.name:60s} {m.file:26s} {verdict:9s} {time.time() - t0:6.1f}s  {last}", flush=True)
    missed = [name for name, v in verdicts if v != "caught"]
    print(f"{len(verdicts) - len(missed)}/{len(verdicts)} mutants caught" + (f"; missed: {missed}" if missed else ""))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
