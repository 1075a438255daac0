"""Training an OPT-architecture model from scratch in NumPy: the whole decoder's forward and backward (a loop
over its residual blocks) and a trainer that checkpoints atomically and resumes without losing progress. AdamW and
its schedule are in optim.py, the corpus and its tokenizer in data.py.

Parameters live in a dict under Hugging Face's names (`decoder.layers.0.fc1.weight`, ...), so the result is
saved as a genuine OPT checkpoint. Only the pre-LN, tied-embedding OPT layout (OPT-125m and up) is trained.
"""
import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import backprop as bp
from .checkpoint import SafetensorsFile, write_safetensors
from .config import OPTConfig, config_to_dict
from .errors import RadialError
from .opt import expected_tensors
from .optim import adamw_step, clip_grads, lr_at
from .outputs import read_json, write_bytes, write_json, write_text

# --------------------------------------------------------------------------------------------- parameters


def init_params(cfg: OPTConfig, seed: int) -> dict:
    """GPT-2's init: N(0, 0.02) weights, zero biases, unit norms; projections into the residual stream scaled
    by 1/sqrt(2L) so the stream's variance does not grow with depth."""
    rng = np.random.default_rng(seed)
    E, F, L = cfg.hidden_size, cfg.ffn_dim, cfg.num_hidden_layers

    def normal(*shape, std=0.02):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    p = {
        "decoder.embed_tokens.weight": normal(cfg.vocab_size, E),
        "decoder.embed_positions.weight": normal(cfg.max_position_embeddings + 2, E, std=0.01),
        "decoder.final_layer_norm.weight": np.ones(E, np.float32),
        "decoder.final_layer_norm.bias": np.zeros(E, np.float32),
    }
    for i in range(L):
        pre = f"decoder.layers.{i}."
        for name, shape, std in (("self_attn.q_proj", (E, E), 0.02), ("self_attn.k_proj", (E, E), 0.02),
                                 ("self_attn.v_proj", (E, E), 0.02), ("self_attn.out_proj", (E, E), 0.02 / math.sqrt(2 * L)),
                                 ("fc1", (F, E), 0.02), ("fc2", (E, F), 0.02 / math.sqrt(2 * L))):  # fmt: skip
            p[pre + name + ".weight"] = normal(*shape, std=std)
            p[pre + name + ".bias"] = np.zeros(shape[0], np.float32)
        for norm in ("self_attn_layer_norm", "final_layer_norm"):
            p[pre + norm + ".weight"] = np.ones(E, np.float32)
            p[pre + norm + ".bias"] = np.zeros(E, np.float32)
    return p


def check_trainable(cfg: OPTConfig):
    if not (cfg.do_layer_norm_before and cfg.has_final_layer_norm and cfg.enable_bias and cfg.tie_word_embeddings
            and cfg.layer_norm_elementwise_affine and cfg.word_embed_proj_dim == cfg.hidden_size
            and cfg.activation_function == "relu"):  # fmt: skip
        raise RadialError("training supports pre-LN OPT with biases, affine norms, ReLU and tied embeddings only")


# ---------------------------------------------------------------------------------- forward and backward


# Each residual block's weights under the short names backprop's block functions use, and back.
_BLOCK_NAMES = {
    "att": {"ln.w": "self_attn_layer_norm.weight", "ln.b": "self_attn_layer_norm.bias",
            "out.w": "self_attn.out_proj.weight", "out.b": "self_attn.out_proj.bias"},
    "ffn": {"ln.w": "final_layer_norm.weight", "ln.b": "final_layer_norm.bias", "fc1.w": "fc1.weight",
            "fc1.b": "fc1.bias", "fc2.w": "fc2.weight", "fc2.b": "fc2.bias"},
}  # fmt: skip


def blocks_of(cfg: OPTConfig) -> list[tuple[int, str]]:
    """The sequential model's blocks in order, (layer, kind), as OPT.blocks lists them."""
    return [(i, kind) for i in range(cfg.num_hidden_layers) for kind in ("att", "ffn")]


def block_weights(P: dict, layer: int, kind: str) -> dict:
    pre = f"decoder.layers.{layer}."
    w = {short: P[pre + name] for short, name in _BLOCK_NAMES[kind].items()}
    if kind == "att":  # q, k and v projections stacked, as blocks.AttentionBlock holds them: [3E, E]
        w["qkv.w"] = np.concatenate([P[pre + f"self_attn.{c}_proj.weight"] for c in "qkv"])
        w["qkv.b"] = np.concatenate([P[pre + f"self_attn.{c}_proj.bias"] for c in "qkv"])
    return w


def store_block_grads(G: dict, g: dict, layer: int, kind: str) -> None:
    """Add one block's gradients (short names) into G (Hugging Face names); added, so a reused block sums."""
    pre = f"decoder.layers.{layer}."
    named = {pre + name: g[short] for short, name in _BLOCK_NAMES[kind].items()}
    if kind == "att":
        for c, dw, db in zip("qkv", np.split(g["qkv.w"], 3), np.split(g["qkv.b"], 3)):
            named[pre + f"self_attn.{c}_proj.weight"], named[pre + f"self_attn.{c}_proj.bias"] = dw, db
    for name, grad in named.items():
        G[name] = G[name] + grad if name in G else grad


def block_forward(x, w, kind, cfg: OPTConfig, attention):
    if kind == "att":
        return bp.attention_block_forward(x, w, cfg.num_attention_heads, attention)
    return bp.ffn_block_forward(x, w)


def block_backward(dy, cache, kind):
    return (bp.attention_block_backward if kind == "att" else bp.ffn_block_backward)(dy, cache)


def loss_and_grads(params: dict, cfg: OPTConfig, batch: np.ndarray, need_grads: bool = True, fast: bool = True):
    """Mean next-token cross-entropy over a batch [B, T + 1] of token ids, and its gradient for every parameter.

    The forward is a loop over the residual blocks and the backward the same loop reversed. `fast` uses the
    Numba attention kernels (float32); the NumPy ones run in any dtype (float64 for checks)."""
    P = params
    attention = bp.ATTENTION_FAST if fast else bp.ATTENTION_NUMPY
    ids, targets = batch[:, :-1], batch[:, 1:]
    B, T = ids.shape
    wte, wpe = P["decoder.embed_tokens.weight"], P["decoder.embed_positions.weight"]
    x, emb_cache = bp.embedding_forward(ids, wte, wpe, np.arange(T))  # [B, T] -> [B, T, E]
    caches = []
    for layer, kind in blocks_of(cfg):
        x, cache = block_forward(x, block_weights(P, layer, kind), kind, cfg, attention)  # [B, T, E]
        caches.append(cache)
    h, c_lnf = bp.layernorm_forward(x, P["decoder.final_layer_norm.weight"], P["decoder.final_layer_norm.bias"])
    logits, c_head = bp.linear_forward(h, P["decoder.embed_tokens.weight"])  # tied head: [B, T, E] -> [B, T, V]
    loss, c_ce = bp.crossentropy_forward(logits.reshape(B * T, -1), targets.ravel())
    if not need_grads:
        return float(loss), None

    G = {}
    dlogits = bp.crossentropy_backward(c_ce).reshape(B, T, -1)
    dh, dwte_head, _ = bp.linear_backward(dlogits, c_head)
    dx, G["decoder.final_layer_norm.weight"], G["decoder.final_layer_norm.bias"] = bp.layernorm_backward(dh, c_lnf)
    for (layer, kind), cache in zip(reversed(blocks_of(cfg)), reversed(caches)):
        dx, g = block_backward(dx, cache, kind)
        store_block_grads(G, g, layer, kind)
    dwte, G["decoder.embed_positions.weight"] = bp.embedding_backward(
        dx, emb_cache, P["decoder.embed_tokens.weight"].shape, P["decoder.embed_positions.weight"].shape
    )
    G["decoder.embed_tokens.weight"] = dwte_head + dwte  # tied: the head's gradient and the lookup's add up
    return float(loss), G


# ---------------------------------------------------------------------------------------------- trainer


@dataclass
class TrainConfig:
    out: str = "runs/opt-kjv-wiki"
    vocab_size: int = 8192
    hidden_size: int = 256
    num_hidden_layers: int = 6
    num_attention_heads: int = 8
    ffn_dim: int = 1024
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 1200
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 60
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_sequences: int = 64  # per validation set, fixed across evaluations
    save_every: int = 50
    seed: int = 0

    def model_config(self) -> OPTConfig:
        return OPTConfig(vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_hidden_layers=self.num_hidden_layers,
                         num_attention_heads=self.num_attention_heads, ffn_dim=self.ffn_dim,
                         max_position_embeddings=self.seq_len, word_embed_proj_dim=self.hidden_size)  # fmt: skip


_MODEL_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "ffn_dim", "seq_len")
# Settings a resume must keep for the run to be the one that was started (the batches and the updates it makes).
_RESUME_FIELDS = (*_MODEL_FIELDS, "batch_size", "lr", "min_lr_ratio", "warmup", "weight_decay", "grad_clip", "seed")


def _check_resume(state_path: Path, config_path: Path, cfg: TrainConfig) -> None:
    """A saved state resumes only with the settings it was trained with, read from train_config.json."""
    if not config_path.is_file():
        raise RadialError(f"{config_path}: missing beside {state_path.name}, so the run's settings are unknown: "
                          "restore it or use a new --out")  # fmt: skip
    saved = read_json(config_path, RadialError, "a JSON object of training settings")
    changed = [k for k in _RESUME_FIELDS if saved.get(k) != getattr(cfg, k)]
    if changed:
        was = ", ".join(f"{k}={saved.get(k)!r:.24} (now {getattr(cfg, k)!r})" for k in changed[:4])
        raise RadialError(f"{config_path}: {state_path.name} was saved with {was}; resume with the same settings "
                          "or use a new --out")  # fmt: skip


def _repair_log(log_path: Path, step: int) -> None:
    """Keep log.jsonl's whole records of steps 1..`step` (the saved state): a partial last line (a full disk or a
    kill mid-write) and the records of steps lost since the last save are dropped, so steps are never duplicated."""
    if not log_path.is_file():
        return
    kept, seen = [], set()
    for line in log_path.read_text(errors="replace").splitlines(keepends=True):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        whole = line.endswith("\n") and isinstance(record, dict) and isinstance(record.get("step"), int)
        if whole and record["step"] <= step and record["step"] not in seen:
            kept.append(line)
            seen.add(record["step"])
    write_text(log_path, "".join(kept))


def _remove_stale_temps(out: Path) -> None:
    """Temporary files (.NAME.tmpPID) left by a killed run: removed when process PID no longer exists."""
    for tmp in out.glob(".*.tmp*"):
        pid = tmp.name.rsplit(".tmp", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def batch_at(tokens: np.ndarray, step: int, cfg: TrainConfig) -> np.ndarray:
    """The batch of step `step`: random windows drawn from a generator seeded by (seed, step), so a resumed
    run sees exactly the batches an uninterrupted one would have."""
    rng = np.random.default_rng([cfg.seed, step])
    starts = rng.integers(0, len(tokens) - cfg.seq_len - 1, size=cfg.batch_size)
    return np.stack([tokens[s : s + cfg.seq_len + 1] for s in starts])  # [B, T + 1]


def evaluate(params, model_cfg, sequences: np.ndarray, batch_size: int = 16) -> float:
    """Mean next-token loss over fixed sequences [n, T + 1]."""
    losses = [loss_and_grads(params, model_cfg, sequences[i : i + batch_size], need_grads=False)[0] * len(sequences[i : i + batch_size])
              for i in range(0, len(sequences), batch_size)]  # fmt: skip
    return float(sum(losses) / len(sequences))


def save_state(path: Path, params, m, v, step: int) -> None:
    """Parameters and Adam moments in one safetensors file, written atomically (temp file + rename)."""
    tensors = {**params, **{"adam.m." + k: a for k, a in m.items()}, **{"adam.v." + k: a for k, a in v.items()}}
    write_safetensors(path, tensors, {"step": step})


def saved_step(path: Path, f: SafetensorsFile | None = None) -> int:
    """The number of steps a saved state reached, from its metadata (checked)."""
    step = (f or SafetensorsFile(path)).metadata.get("step", "")
    if not (step.isascii() and step.isdigit() and len(step) < 19):
        raise RadialError(f"{path}: metadata 'step' is {step!r:.40}, expected the number of steps done")
    return int(step)


def load_state(path: Path, model_cfg: OPTConfig):
    """Parameters, Adam moments and step of a saved state, its tensors checked against the run's model first."""
    f = SafetensorsFile(path)
    step = saved_step(path, f)
    shapes = expected_tensors(model_cfg)[0]  # the loader's spec: the names and shapes init_params makes
    expected = {**shapes, **{f"adam.{m}.{k}": s for m in "mv" for k, s in shapes.items()}}
    found = {name: f.shape(name) for name in f.entries}
    wrong = sorted(set(expected) ^ set(found)) + [n for n in expected if n in found and found[n] != expected[n]]
    if wrong:
        shown = ", ".join(map(repr, wrong[:3])) + (f" and {len(wrong) - 3} more" if len(wrong) > 3 else "")
        raise RadialError(f"{path}: tensors missing, unexpected or of the wrong shape for this run's model: {shown}")
    params, m, v = {}, {}, {}
    for name in f.entries:
        target = m if name.startswith("adam.m.") else v if name.startswith("adam.v.") else params
        target[name.removeprefix("adam.m.").removeprefix("adam.v.")] = f.read(name)
    return params, m, v, step


def train(cfg: TrainConfig, train_tokens: np.ndarray, val_sets: dict, progress: bool = True, stop_after: int | None = None):
    """Train (or resume) into `cfg.out`; returns the parameters. Interrupting (Ctrl-C, SIGTERM) saves the state
    after the current step, so a rerun of the same command continues where it stopped."""
    from .progress import Bar

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    model_cfg = cfg.model_config()
    check_trainable(model_cfg)
    state_path, log_path = out / "state.safetensors", out / "log.jsonl"
    config_path = out / "train_config.json"
    _remove_stale_temps(out)
    if state_path.is_file():  # resuming: the run must be the one that was saved
        _check_resume(state_path, config_path, cfg)
    write_json(config_path, asdict(cfg))
    if state_path.is_file():
        params, m, v, step = load_state(state_path, model_cfg)
        _repair_log(log_path, step)
    else:
        params, step = init_params(model_cfg, cfg.seed), 0
        m = {k: np.zeros_like(a) for k, a in params.items()}
        v = {k: np.zeros_like(a) for k, a in params.items()}
    interrupted = []
    handlers = {s: signal.signal(s, lambda *_: interrupted.append(True)) for s in (signal.SIGINT, signal.SIGTERM)}
    bar = Bar(cfg.steps, "train", "step", initial=step, enabled=progress)
    last_save, t0, tokens_done = step, time.perf_counter(), 0
    try:  # signals only raise a flag, so a step is never cut in half; the loop ends after a whole step
        with open(log_path, "a") as log:
            while step < cfg.steps and not interrupted and (stop_after is None or step < stop_after):
                lr = lr_at(step, cfg.lr, cfg.warmup, cfg.steps, cfg.min_lr_ratio)
                loss, grads = loss_and_grads(params, model_cfg, batch_at(train_tokens, step, cfg))
                norm = clip_grads(grads, cfg.grad_clip)
                adamw_step(params, grads, m, v, step + 1, lr, weight_decay=cfg.weight_decay)
                step += 1
                tokens_done += cfg.batch_size * cfg.seq_len
                record = {"step": step, "loss": round(loss, 4), "lr": lr, "grad_norm": round(norm, 3)}
                if step % cfg.eval_every == 0 or step == cfg.steps:
                    for name, seqs in val_sets.items():
                        record[f"val_{name}"] = round(evaluate(params, model_cfg, seqs), 4)
                rate = tokens_done / (time.perf_counter() - t0)
                record["tok_s"] = round(rate)
                try:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                except OSError as e:  # a full disk: the state saved so far is intact, a rerun repairs the log
                    why = e.strerror or e
                    raise RadialError(f"{log_path}: cannot write ({why}); free space and rerun to resume") from None
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate:.0f}", **{k: v_ for k, v_ in record.items() if k.startswith("val_")})
                bar.update(1)
                if step - last_save >= cfg.save_every or step == cfg.steps:
                    save_state(state_path, params, m, v, step)
                    last_save = step
        if step != last_save:
            save_state(state_path, params, m, v, step)  # interrupted: keep every finished step
    finally:
        bar.close()
        for s, h in handlers.items():
            signal.signal(s, h)
    if interrupted:
        raise KeyboardInterrupt(f"stopped at step {step}; rerun the same command to resume")
    return params


def export_checkpoint(params: dict, model_cfg: OPTConfig, tokenizer_dir, out_dir, dtype: str = "float16") -> None:
    """Write a Hugging Face OPT checkpoint: config.json, model.safetensors (`model.decoder.*` keys, as
    transformers' save_pretrained writes them), and the tokenizer files."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_cfg.dtype = dtype
    write_json(out_dir / "config.json", config_to_dict(model_cfg))
    tensors = {"model." + k: a.astype(dtype) for k, a in params.items()}
    write_safetensors(out_dir / "model.safetensors", tensors, {"format": "pt"})
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        write_bytes(out_dir / name, (Path(tokenizer_dir) / name).read_bytes())


# ------------------------------------------------------------------------------------------------ report


def ngram_perplexities(train_ids: np.ndarray, sequences: np.ndarray, vocab_size: int) -> dict:
    """Unigram (add-one) and bigram (interpolated with the unigram) perplexities on the same next-token
    predictions as the model's: tokens 1..T-1 of each packed sequence. The bigram's mixing weight is picked
    on these very predictions, which flatters the baseline, not the model."""
    V = vocab_size
    train_ids = train_ids.astype(np.int64)
    uni = (np.bincount(train_ids, minlength=V) + 1.0) / (len(train_ids) + V)
    pairs, counts = np.unique(train_ids[:-1] * V + train_ids[1:], return_counts=True)
    context = np.bincount(train_ids[:-1], minlength=V)
    prev, nxt = sequences[:, :-1].ravel().astype(np.int64), sequences[:, 1:].ravel().astype(np.int64)
    key = prev * V + nxt
    at = np.minimum(np.searchsorted(pairs, key), len(pairs) - 1)
    bigram = np.where(pairs[at] == key, counts[at], 0) / np.maximum(context[prev], 1)
    best = min((float(np.exp(-np.log(lam * bigram + (1 - lam) * uni[nxt]).mean())), lam)
               for lam in np.linspace(0.05, 0.95, 19))  # fmt: skip
    return {"unigram": float(np.exp(-np.log(uni[nxt]).mean())), "bigram": best[0], "bigram_lambda": round(float(best[1]), 2)}


def perplexity(model, sequences: np.ndarray, progress=None) -> float:
    """exp of the mean next-token NLL over packed sequences, computed by the inference engine."""
    from .oracle import next_token_nll

    seqs = sequences if progress is None else progress(sequences)
    return float(np.exp(np.concatenate([next_token_nll(model.forward(s), s) for s in seqs]).mean()))


def report(model, train_ids, val_streams: dict, seq_len: int, bar=None) -> dict:
    """Validation perplexity of `model` on every full validation stream, beside the n-gram baselines; `bar` (a
    `progress.Bar`) counts the sequences."""
    from .data import pack

    out = {}
    packed = {name: pack(stream, seq_len) for name, stream in val_streams.items()}
    if bar is not None:
        bar.extend(sum(len(s) for s in packed.values()))
    for name, seqs in packed.items():
        track = None if bar is None else (lambda items, name=name: bar.track(items, name))
        out[name] = {"tokens": int(seqs[:, 1:].size), "model": perplexity(model, seqs, track),
                     **ngram_perplexities(train_ids, seqs, model.config.vocab_size)}  # fmt: skip
    return out
