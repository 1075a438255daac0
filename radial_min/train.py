"""Training an OPT-architecture model from scratch in NumPy: a trainer that checkpoints atomically and resumes
without losing progress, for the sequential decoder (opt_backprop.py) or a Radial Network trained with its router
(radial_train.py). AdamW and its schedule are in optim.py, the corpus and its tokenizer in data.py.
"""

import json
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import radial_train
from .io.checkpoint import SafetensorsFile, write_safetensors
from .config import OPTConfig, config_to_dict, read_config
from .data import pack
from .dtypes import to_float32
from .errors import RadialError
from .models.opt import expected_tensors
from .opt_backprop import check_trainable, init_params, loss_and_grads
from .optim import adamw_step, clip_grads, lr_at
from .io.outputs import read_json, write_bytes, write_folder, write_json, write_text
from .progress import Bar
from .radial import RADIAL_CONFIG, write_radial
from .radial_train import RadialTrainConfig, update_cost
from .router import Router, init_router

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
    # radial = True trains a Radial Network from scratch, the router with the blocks (radial_train.py), with:
    radial: bool = False
    max_depth: int | None = None  # most blocks a token may run (None: as many as there are blocks)
    forward_only: bool = False  # blocks in order, each at most once; else any order, with reuse
    cache_policy: str = "global"  # what attention reads in the unified KV cache: per-layer, per-step or global
    step_encoding_scale: float = 1.0  # global policy: the step encodings' scale
    target_depth: float | None = None  # blocks/token the compute term steers to (None: a fixed `cost`)
    cost: float = 0.0  # loss per expected block run; with target_depth, its starting value
    router_hidden: int = 16
    in_order: float = 6.0  # the router starts with this margin for the next block in order (0: random routes)
    router_warmup: int = 100  # steps in which only the blocks learn (the router keeps its start, the cost its value)
    router_lr: float = 0.1  # the router's learning rate, as a share of lr
    cost_rate: float = 0.0002  # how fast the cost follows target_depth (radial_train.update_cost)
    depth_weight: float = 0.05  # weight of (expected blocks - target_depth)^2 (radial_train.compute_term)
    explore: float = 0.0  # share of block decisions swapped for another allowed block while training (radial_train)

    def radial_config(self):
        """The routing settings as radial_train reads them, or None for a plain sequential model."""
        if not self.radial:
            return None
        return RadialTrainConfig(
            max_depth=self.max_depth,
            forward_only=self.forward_only,
            cache_policy=self.cache_policy,
            step_encoding_scale=self.step_encoding_scale,
            cost=self.cost,
            target_depth=self.target_depth,
            router_hidden=self.router_hidden,
            in_order=self.in_order,
            cost_rate=self.cost_rate,
            depth_weight=self.depth_weight,
            explore=self.explore,
        )

    def model_config(self) -> OPTConfig:
        return OPTConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            ffn_dim=self.ffn_dim,
            max_position_embeddings=self.seq_len,
            word_embed_proj_dim=self.hidden_size,
        )


_MODEL_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "ffn_dim", "seq_len")
RADIAL_FIELDS = (  # the routing settings of a Radial Network trained from scratch (--radial)
    "radial",
    "max_depth",
    "forward_only",
    "cache_policy",
    "step_encoding_scale",
    "target_depth",
    "cost",
    "router_hidden",
    "in_order",
    "router_warmup",
    "router_lr",
    "cost_rate",
    "depth_weight",
    "explore",
)
# Settings a resume must keep for the run to be the one that was started (the batches and the updates it makes).
_RESUME_FIELDS = (
    *_MODEL_FIELDS,
    "batch_size",
    "lr",
    "min_lr_ratio",
    "warmup",
    "weight_decay",
    "grad_clip",
    "seed",
    *RADIAL_FIELDS,
)
ROUTER = "router."  # the router's parameters in a Radial Network's training state: router.w1, ...


def check_resume(cfg: TrainConfig) -> None:
    """A state saved in `cfg.out` resumes only with the settings it was trained with, read from train_config.json:
    checked before any work (the command line calls it before preparing the corpus)."""
    state_path, config_path = Path(cfg.out) / "state.safetensors", Path(cfg.out) / "train_config.json"
    if not state_path.is_file():
        return
    if not config_path.is_file():
        raise RadialError(
            f"{config_path}: missing beside {state_path.name}, so the run's settings are unknown: "
            "restore it or use a new --out"
        )
    saved = read_json(config_path, RadialError, "a JSON object of training settings")
    default = TrainConfig()  # a setting the file does not name was saved by an older version, with its default
    changed = [k for k in _RESUME_FIELDS if saved.get(k, getattr(default, k)) != getattr(cfg, k)]
    if changed:
        was = ", ".join(f"{k}={saved.get(k)!r:.24} (now {getattr(cfg, k)!r})" for k in changed[:4])
        raise RadialError(
            f"{config_path}: {state_path.name} was saved with {was}; resume with the same settings or use a new --out"
        )


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


def read_log(out) -> list[dict]:
    """The records of run `out`'s log.jsonl, one a step (validation losses on the steps that ran them)."""
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines() if line.strip()]


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


def split_router(params: dict) -> tuple[dict, dict]:
    """A Radial Network's parameters -> (the model's, under Hugging Face names; the router's: w1, b1, w2, b2)."""
    model = {k: a for k, a in params.items() if not k.startswith(ROUTER)}
    return model, {k[len(ROUTER) :]: a for k, a in params.items() if k.startswith(ROUTER)}


def batch_grads(params, model_cfg, rcfg, batch, need_grads=True, rng=None):
    """One batch: (loss, gradients of every parameter, info). A plain model's info is {}; a Radial Network's
    (rcfg not None) has its LM loss without the compute term, blocks/token and routes (radial_train); `rng`
    (training steps only) draws its exploration."""
    if rcfg is None:
        loss, G = loss_and_grads(params, model_cfg, batch, need_grads)
        return loss, G, {"lm_loss": loss}

    model, router = split_router(params)
    loss, G, GR, info = radial_train.loss_and_grads(model, router, model_cfg, rcfg, batch, need_grads, rng=rng)
    if need_grads:
        G.update({ROUTER + k: g for k, g in GR.items()})
    return loss, G, info


def evaluate(params, model_cfg, sequences: np.ndarray, batch_size: int = 16, rcfg=None) -> float:
    """Mean next-token loss over fixed sequences [n, T + 1] (a Radial Network's without the compute term)."""
    losses = [
        batch_grads(params, model_cfg, rcfg, sequences[i : i + batch_size], need_grads=False)[2]["lm_loss"]
        * len(sequences[i : i + batch_size])
        for i in range(0, len(sequences), batch_size)
    ]
    return float(sum(losses) / len(sequences))


def save_state(path: Path, params, m, v, step: int, cost: float | None = None) -> None:
    """Parameters and Adam moments in one safetensors file, written atomically (temp file + rename); a Radial
    Network's current compute cost in the metadata (repr: the exact float, so a resume is bit-identical)."""
    tensors = {**params, **{"adam.m." + k: a for k, a in m.items()}, **{"adam.v." + k: a for k, a in v.items()}}
    write_safetensors(path, tensors, {"step": step, **({} if cost is None else {"cost": repr(cost)})})


def saved_step(path: Path, f: SafetensorsFile | None = None) -> int:
    """The number of steps a saved state reached, from its metadata (checked)."""
    step = (f or SafetensorsFile(path)).metadata.get("step", "")
    if not (step.isascii() and step.isdigit() and len(step) < 19):
        raise RadialError(f"{path}: metadata 'step' is {step!r:.40}, expected the number of steps done")
    return int(step)


def load_state(path: Path, model_cfg: OPTConfig, rcfg=None):
    """Parameters, Adam moments, step and a Radial Network's compute cost (None if the state has none) of a saved
    state, its tensors checked against the run's model (and router) first."""
    f = SafetensorsFile(path)
    step = saved_step(path, f)
    shapes = expected_tensors(model_cfg)[0]  # the loader's spec: the names and shapes init_params makes
    if rcfg is not None:
        shapes.update({ROUTER + k: a.shape for k, a in init_router(rcfg.router_config(model_cfg)).items()})
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
    cost = f.metadata.get("cost")
    try:
        cost = None if cost is None else float(cost)
    except ValueError:
        raise RadialError(f"{path}: metadata 'cost' is {cost!r:.40}, expected a number") from None
    return params, m, v, step, cost


def train(
    cfg: TrainConfig, train_tokens: np.ndarray, val_sets: dict, progress: bool = True, stop_after: int | None = None
):
    """Train (or resume) into `cfg.out`; returns the parameters. Interrupting (Ctrl-C, SIGTERM) saves the state
    after the current step, so a rerun of the same command continues where it stopped."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    model_cfg, rcfg = cfg.model_config(), cfg.radial_config()
    check_trainable(model_cfg)
    state_path, log_path = out / "state.safetensors", out / "log.jsonl"
    config_path = out / "train_config.json"
    _remove_stale_temps(out)
    check_resume(cfg)  # resuming: the run must be the one that was saved
    write_json(config_path, asdict(cfg))
    if state_path.is_file():
        params, m, v, step, cost = load_state(state_path, model_cfg, rcfg)
        if rcfg is not None and cost is not None:
            rcfg.cost = cost  # where the compute term's controller had got to
        _repair_log(log_path, step)
    else:
        params, step = init_params(model_cfg, cfg.seed), 0
        if rcfg is not None:
            router = init_router(rcfg.router_config(model_cfg), cfg.seed, rcfg.in_order)
            params.update({ROUTER + k: a for k, a in router.items()})
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
                rng = np.random.default_rng([cfg.seed, step, 1])  # its own stream, resumable
                loss, grads, info = batch_grads(params, model_cfg, rcfg, batch_at(train_tokens, step, cfg), rng=rng)
                routing = rcfg is not None and step >= cfg.router_warmup
                if rcfg is not None and not routing:  # warm-up: untrained blocks would teach the router to exit
                    grads = {k: g for k, g in grads.items() if not k.startswith(ROUTER)}
                norm = clip_grads(grads, cfg.grad_clip)
                router = {k: g for k, g in grads.items() if k.startswith(ROUTER)}  # learns at its own, slower rate
                blocks = {k: g for k, g in grads.items() if k not in router}
                adamw_step(params, blocks, m, v, step + 1, lr, weight_decay=cfg.weight_decay)
                if router:
                    adamw_step(params, router, m, v, step + 1, lr * cfg.router_lr, weight_decay=cfg.weight_decay)
                step += 1
                tokens_done += cfg.batch_size * cfg.seq_len
                record = {"step": step, "loss": round(loss, 4), "lr": lr, "grad_norm": round(norm, 3)}
                if rcfg is not None:  # the LM loss, blocks/token, and the cost that the depth target sets
                    record.update(lm_loss=round(info["lm_loss"], 4), blocks=round(info["blocks"], 3), cost=rcfg.cost)
                    if routing:
                        update_cost(rcfg, info["blocks"])
                if step % cfg.eval_every == 0 or step == cfg.steps:
                    for name, seqs in val_sets.items():
                        record[f"val_{name}"] = round(evaluate(params, model_cfg, seqs, rcfg=rcfg), 4)
                rate = tokens_done / (time.perf_counter() - t0)
                record["tok_s"] = round(rate)
                try:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                except OSError as e:  # a full disk: the state saved so far is intact, a rerun repairs the log
                    why = e.strerror or e
                    raise RadialError(f"{log_path}: cannot write ({why}); free space and rerun to resume") from None
                val = {k: v_ for k, v_ in record.items() if k.startswith("val_")}
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate:.0f}", **val)
                bar.update(1)
                if step - last_save >= cfg.save_every or step == cfg.steps:
                    save_state(state_path, params, m, v, step, rcfg and rcfg.cost)
                    last_save = step
        if step != last_save:
            save_state(state_path, params, m, v, step, rcfg and rcfg.cost)  # interrupted: keep every finished step
    finally:
        bar.close()
        for s, h in handlers.items():
            signal.signal(s, h)
    if interrupted:
        raise KeyboardInterrupt(f"stopped at step {step}; rerun the same command to resume")
    return params


def export_checkpoint(
    params: dict,
    model_cfg: OPTConfig,
    tokenizer_dir,
    out_dir,
    dtype: str = "float16",
    rcfg=None,
    overwrite: bool = False,
) -> None:
    """Write a Hugging Face OPT checkpoint, whole or not at all: config.json, model.safetensors (`model.decoder.*`
    keys, as transformers' save_pretrained writes them), and the tokenizer files. A Radial Network (rcfg) adds its
    router (float32) and radial.json, so `radial_min.load` returns the routed network; transformers still loads
    the blocks as a plain OPT."""
    params, router = split_router(params)
    model_cfg.dtype = dtype
    with write_folder(out_dir, overwrite) as tmp:
        write_json(tmp / "config.json", config_to_dict(model_cfg))
        tensors = {"model." + k: a.astype(dtype) for k, a in params.items()}
        write_safetensors(tmp / "model.safetensors", tensors, {"format": "pt"})
        for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
            write_bytes(tmp / name, (Path(tokenizer_dir) / name).read_bytes())
        if rcfg is not None:
            write_radial(
                tmp,
                Router(rcfg.router_config(model_cfg), router),
                rcfg.cache_policy,
                rcfg.max_depth,
                rcfg.step_encoding_scale,
            )


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
    best = min(
        (float(np.exp(-np.log(lam * bigram + (1 - lam) * uni[nxt]).mean())), lam) for lam in np.linspace(0.05, 0.95, 19)
    )
    unigram = float(np.exp(-np.log(uni[nxt]).mean()))
    return {"unigram": unigram, "bigram": best[0], "bigram_lambda": round(float(best[1]), 2)}


def read_export(folder):
    """An exported checkpoint as the trainer sees it: (params in float32 under Hugging Face names, the router's
    as router.* for a co-trained network, OPTConfig, RadialTrainConfig or None)."""
    folder = Path(folder)
    cfg = read_config(folder)
    f = SafetensorsFile(folder / "model.safetensors")
    params = {k.removeprefix("model."): to_float32(f.read(k)) for k in f.entries}
    if not (folder / RADIAL_CONFIG).is_file():
        return params, cfg, None

    radial = read_json(folder / RADIAL_CONFIG)
    router = Router.load(folder / radial["router"])
    rcfg = RadialTrainConfig(
        max_depth=router.config.max_depth,
        forward_only=router.config.forward_only,
        cache_policy=radial["cache_policy"],
        step_encoding_scale=radial["step_encoding_scale"],
        router_hidden=router.config.hidden,
    )
    return {**params, **{ROUTER + k: a for k, a in router.params.items()}}, cfg, rcfg


def report(export, train_ids, val_streams: dict, seq_len: int, bar=None, batch_size: int = 64) -> dict:
    """Perplexity of the exported checkpoint `export` on every full validation stream, packed in sequences of
    `seq_len`, beside the n-gram baselines, and a co-trained network's blocks per token. Scored by the training
    forward in batches, which the tests hold equal to the inference engine (test_backprop, test_cotrained);
    `bar` (a `progress.Bar`) counts the sequences."""
    params, model_cfg, rcfg = read_export(export)
    out = {}
    packed = {name: pack(stream, seq_len) for name, stream in val_streams.items()}
    if bar is not None:
        bar.extend(sum(len(s) for s in packed.values()))
    for name, seqs in packed.items():  # each row: tokens 0..T-2 predict 1..T-1, as the engine scores a sequence
        nll, blocks = 0.0, 0.0
        if bar is not None:
            bar.set(name)
        for i in range(0, len(seqs), batch_size):
            batch = seqs[i : i + batch_size]
            _, _, info = batch_grads(params, model_cfg, rcfg, batch, need_grads=False)
            nll += info["lm_loss"] * len(batch)
            blocks += info.get("blocks", 0.0) * len(batch)
            if bar is not None:
                bar.update(len(batch))
        row = {"tokens": int(seqs[:, 1:].size), "model": float(np.exp(nll / len(seqs)))}
        if rcfg is not None:
            row["blocks"] = blocks / len(seqs)
        out[name] = {**row, **ngram_perplexities(train_ids, seqs, model_cfg.vocab_size)}
    return out
