"""Training on the one engine: the network that trains is the network that generates.

A step: a batch of token windows goes through `RadialNetwork.forward` with a tape (a sequential model is the
Radial Network with the in-order router), the loss is the next-token cross-entropy (plus, for a Radial Network
trained with its router, a compute term), `backward` leaves every parameter's gradient in the model's and the
router's modules, and AdamW (optim.py) updates the parameters in place. OPT, Llama and Qwen2 train alike, from
scratch (each architecture's `init_tensors`) or from a checkpoint (`init_from`: a folder or a .gguf, dequantised
to float32). The trainer checkpoints atomically and resumes bit-identically; the run's settings are four
dataclasses composed into one `TrainConfig`, from which the command line's options are made (cli.py).

The compute term sets a Radial Network's budget over E, the mean over tokens of the expected number of blocks each
goes on to (the sum over its decisions of 1 - p_EXIT): loss += cost * E, and with `target_depth` K also
depth_weight * (E - K)^2, while `update_cost` moves `cost` between steps so that the mean depth settles at K
(a proportional and an integral controller). docs/cotraining.md says why.
"""

import dataclasses
import json
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import ops
from .config import LlamaConfig, OPTConfig, config_to_dict
from .data import MIN_VOCAB, pack
from .generation import GENERATION_CONFIG
from .errors import RadialError
from .io.checkpoint import SafetensorsFile, write_safetensors
from .io.loading import load
from .io.outputs import read_json, read_json_lines, write_bytes, write_folder, write_json, write_text
from .models import ARCHITECTURES
from .optim import adamw_step, check_state, clip_grads, lr_at
from .progress import Bar
from .radial import RadialNetwork, write_radial
from .router import MAX_PASSES, ExpertChoice, Router, RouterConfig, capacity_for, init_router

# ------------------------------------------------------------------------------------------------ settings


def setting(default, help: str, flag: str | None = None, unset: str = "none", choices=None, low=1):
    """A training setting: its default, the help text of its command-line option (--flag, or --name-with-dashes),
    what its default means when that is None (`unset`), its choices, and the least whole number it takes."""
    return field(default=default, metadata={"help": help, "flag": flag, "unset": unset, "choices": choices, "low": low})


def flag(name: str) -> str:
    """A setting's command-line option."""
    for group in GROUPS.values():
        for f in dataclasses.fields(group):
            if f.name == name:
                return f.metadata["flag"] or "--" + name.replace("_", "-")
    raise KeyError(name)


@dataclass
class ModelSettings:
    """The network trained: its architecture and shape (or a checkpoint it starts from)."""

    architecture: str = setting(
        "opt", "architecture of a model trained from scratch", choices=("opt", "llama", "qwen2")
    )
    vocab_size: int = setting(8192, "BPE vocabulary (a tokenizer trained with the model), >= 260")
    hidden_size: int = setting(256, "model width E")
    num_hidden_layers: int = setting(6, "transformer layers, two blocks each", "--layers")
    num_attention_heads: int = setting(8, "attention heads, dividing the width", "--heads")
    num_key_value_heads: int | None = setting(
        None, "llama/qwen2: key/value heads, dividing --heads (grouped-query)", "--kv-heads", "--heads"
    )
    ffn_dim: int | None = setting(None, "FFN width", unset="4 x hidden size")
    seq_len: int = setting(256, "training context, also the model's max positions")
    init_from: str | None = setting(
        None, "fine-tune this checkpoint (a folder or .gguf, float32) instead of a new model"
    )

    def __post_init__(self):
        if self.ffn_dim is None:
            self.ffn_dim = 4 * self.hidden_size

    def model_config(self):
        """The architecture's config (config.py) for a model of these settings."""
        F = self.ffn_dim
        if self.architecture == "opt":
            return OPTConfig(
                vocab_size=self.vocab_size,
                hidden_size=self.hidden_size,
                num_hidden_layers=self.num_hidden_layers,
                num_attention_heads=self.num_attention_heads,
                ffn_dim=F,
                max_position_embeddings=self.seq_len,
                word_embed_proj_dim=self.hidden_size,
            )
        return LlamaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=F,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            max_position_embeddings=self.seq_len,
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
            model_type=self.architecture,
            bos_token_id=2,
            eos_token_id=2,
        )


ESTIMATORS = ("gate", "reinforce", "expert-choice")
LEARNED = (Router, ExpertChoice)  # the routers with parameters the trainer updates


@dataclass
class RadialSettings:
    """A Radial Network trained from scratch with its router (--radial; docs/cotraining.md)."""

    radial: bool = setting(False, "train the router with the blocks; the export then routes by default")
    target_depth: float | None = setting(None, "compute budget: the blocks per token the compute term steers to")
    cost: float = setting(0.0, "compute budget instead: a fixed loss per expected block run")
    max_depth: int | None = setting(
        None, "most blocks a token may run, > 2 x --layers to reuse blocks more", unset="2 x --layers"
    )
    forward_only: bool = setting(False, "blocks in order, each at most once (off: any order, blocks may be reused)")
    cache_policy: str = setting(
        "global", "what attention reads in the unified KV cache", choices=("per-layer", "per-step", "global")
    )
    kv_rule: str = setting(
        "drop",
        "what a token that skips an attention block offers later tokens there: drop (no keys) or fill (keys and "
        "values from the state passing by; --forward-only, --cache-policy per-layer, gate or reinforce)",
        choices=("drop", "fill"),
    )
    step_encoding_scale: float = setting(1.0, "global policy: scale of the step encodings added to queries and keys")
    router_hidden: int = setting(16, "router hidden units, > 2 x --layers")
    in_order: float = setting(6.0, "the router starts routing the blocks in order with this logit margin, 0 = random")
    router_warmup: int = setting(100, "first steps in which only the blocks learn, the router waits", low=0)
    router_lr: float = setting(0.1, "the router's learning rate as a share of --lr")
    cost_rate: float = setting(0.0002, "with --target-depth: how fast the cost follows it, per step and block of error")
    depth_weight: float = setting(0.05, "with --target-depth: weight of (expected blocks - target)^2 in the loss")
    explore: float = setting(0.0, "share of block decisions swapped for another allowed block while training")
    estimator: str = setting(
        "gate",
        "how the router learns: gate (y = x + p f(x)), reinforce (routes sampled, the score function with the batch "
        "mean as baseline), expert-choice (each block keeps its top tokens: Mixture-of-Depths/-Recursions)",
        choices=ESTIMATORS,
    )
    aux_weight: float = setting(0.1, "expert-choice: weight of the loss that teaches the causal rule the top-k choice")
    capacity_warmup: int = setting(0, "expert-choice: steps over which the capacity falls from 1 to its target")

    def router_config(self, model_cfg) -> RouterConfig:
        n = 2 * model_cfg.num_hidden_layers
        return RouterConfig(model_cfg.hidden_size, n, self.router_hidden, self.forward_only, self.max_depth)


@dataclass
class OptimSettings:
    """AdamW and its schedule (optim.py)."""

    lr: float = setting(2e-3, "peak learning rate")
    min_lr_ratio: float = setting(0.1, "the cosine schedule's floor, as a share of --lr")
    warmup: int = setting(60, "linear warm-up steps", low=0)
    weight_decay: float = setting(0.1, "AdamW decay on matrices")
    grad_clip: float = setting(1.0, "global gradient-norm clip, 0 = off")


@dataclass
class RunSettings:
    """Where the run lives, how long it runs, what it evaluates."""

    out: str = setting("runs/opt-kjv-wiki", "run folder: tokenizer, tokens, state, log")
    steps: int = setting(1200, "optimizer steps")
    batch_size: int = setting(16, "sequences per step")
    eval_every: int = setting(100, "steps between validation losses")
    eval_sequences: int = setting(64, "sequences per validation set, fixed across evaluations")
    eval_tokens: int = setting(100_000, "the export's report: tokens scored per held-out stream, 0 = all", low=0)
    save_every: int = setting(50, "steps between checkpoints")
    seed: int = setting(0, "seed for init and batches", low=0)
    task: str = setting(
        "text",
        "training data: text (KJV + WikiText-2) or hop[:field=value,...], the pointer-chasing task of tasks.py "
        "(e.g. hop:nodes=8,max_hops=3,curriculum=300; docs/depth-task.md)",
    )


GROUPS = {"model": ModelSettings, "radial": RadialSettings, "optim": OptimSettings, "run": RunSettings}

# named sets of settings (`train --preset NAME`), under any option given beside them. quick: nanoGPT's
# shakespeare_char in spirit, a small OPT (2 layers of width 128, 2,048-token BPE, 64-token context) that goes from
# a loss of 7.6 (uniform) to ~4.3 in ~2 minutes on 2 cores, evaluated on 20,000 tokens per stream, then sampled
PRESETS = {
    "quick": dict(
        vocab_size=2048, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, seq_len=64, lr=3e-3, warmup=30,
        out="runs/quick", steps=400, eval_every=100, eval_sequences=16, eval_tokens=20_000, save_every=100,
    ),
}  # fmt: skip


@dataclass
class TrainConfig:
    """Every setting of a training run, in four groups; `flat()` / `of(**flat)` for train_config.json and tests."""

    model: ModelSettings = field(default_factory=ModelSettings)
    radial: RadialSettings = field(default_factory=RadialSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    run: RunSettings = field(default_factory=RunSettings)

    @classmethod
    def of(cls, **flat):
        """Settings by field name, whatever their group: TrainConfig.of(hidden_size=64, steps=10)."""
        unknown = set(flat) - {f.name for g in GROUPS.values() for f in dataclasses.fields(g)}
        if unknown:
            raise TypeError(f"unknown training settings: {', '.join(sorted(unknown))}")
        return cls(
            **{
                k: g(**{f.name: flat[f.name] for f in dataclasses.fields(g) if f.name in flat})
                for k, g in GROUPS.items()
            }
        )

    def flat(self) -> dict:
        return {k: v for g in GROUPS for k, v in asdict(getattr(self, g)).items()}

    def problems(self, available_bytes: int) -> list[str]:
        """Every setting the run would trip over later, each naming its option: checked before any work."""
        m, r, o, run = self.model, self.radial, self.optim, self.run
        out, need = [], training_bytes(self)
        if need > available_bytes:
            out.append(
                f"--hidden-size {m.hidden_size} --layers {m.num_hidden_layers} --ffn-dim {m.ffn_dim} "
                f"--vocab-size {m.vocab_size} --seq-len {m.seq_len} --batch-size {run.batch_size}: training "
                f"would need about {need / 2**30:,.1f} GiB (weights, gradients, Adam moments and a batch's "
                f"activations), {available_bytes / 2**30:,.1f} GiB are available"
            )
        if m.vocab_size < MIN_VOCAB and not m.init_from and run.task == "text":  # a task brings its vocabulary
            out.append(
                f"--vocab-size {m.vocab_size}: a byte-level BPE needs at least {MIN_VOCAB} "
                "(256 bytes + 4 special tokens)"
            )
        if m.hidden_size % m.num_attention_heads:
            out.append(f"--heads {m.num_attention_heads} must divide --hidden-size {m.hidden_size}")
        kv = m.num_key_value_heads
        if kv is not None and (m.architecture == "opt" or m.num_attention_heads % kv):
            out.append(f"--kv-heads {kv}: llama/qwen2 only, dividing --heads {m.num_attention_heads}")
        if m.seq_len < 2:
            out.append(f"--seq-len {m.seq_len}: training needs at least 2 tokens per sequence")
        for name in ("lr", "weight_decay", "grad_clip", "min_lr_ratio"):
            if not (getattr(o, name) >= 0 and np.isfinite(getattr(o, name))):
                out.append(f"{flag(name)} must be a finite number >= 0, got {getattr(o, name)}")
        if o.lr == 0:
            out.append("--lr must be > 0")
        if r.radial:
            out += self._radial_problems()
        return out

    def _radial_problems(self) -> list[str]:
        r, n, out = self.radial, 2 * self.model.num_hidden_layers, []
        depth = n if r.max_depth is None else r.max_depth
        if r.forward_only and depth > n:
            out.append(f"--max-depth {depth}: a --forward-only network runs each of its {n} blocks at most once")
        elif depth > MAX_PASSES * n:
            out.append(f"--max-depth {depth}: at most {MAX_PASSES} passes over the {n} blocks")
        if r.target_depth is not None and not 0 < r.target_depth <= depth:
            out.append(f"--target-depth {r.target_depth}: expected blocks per token in (0, {depth}]")
        if not (r.cost >= 0 and np.isfinite(r.cost)):
            out.append(f"--cost must be a finite number >= 0, got {r.cost}")
        if not 0 <= r.explore <= 1:
            out.append(f"--explore {r.explore}: expected a share in [0, 1]")
        if r.in_order and r.router_hidden < n + 1:
            out.append(
                f"--router-hidden {r.router_hidden}: routing {n} blocks in order needs >= {n + 1} (or --in-order 0)"
            )
        if not 0 <= r.step_encoding_scale < 1e3:
            out.append(f"--step-encoding-scale must be in [0, 1000), got {r.step_encoding_scale}")
        if r.kv_rule == "fill" and not (r.forward_only and r.cache_policy == "per-layer"):
            out.append("--kv-rule fill: needs --forward-only and --cache-policy per-layer")
        if r.kv_rule == "fill" and r.estimator == "expert-choice":
            out.append("--kv-rule fill: gate or reinforce (expert choice trains without it)")
        if r.estimator == "expert-choice":
            if r.target_depth is None:
                out.append("--estimator expert-choice: its capacity comes from --target-depth BLOCKS")
            if not r.forward_only and depth % n:
                out.append(f"--max-depth {depth}: expert-choice recursion runs whole passes over the {n} blocks")
            if r.cache_policy == "global" or (not r.forward_only and r.cache_policy != "per-step"):
                out.append(  # recursion trains a round per pass: under per-layer a later pass writes keys that
                    # the earlier passes of later tokens should have read (radial._Walk.run_expert_choice)
                    "--estimator expert-choice: --cache-policy per-layer or per-step (forward-only), per-step "
                    f"(recursion, --max-depth {depth} without --forward-only)"
                )
        return out


def training_bytes(cfg: TrainConfig) -> int:
    """A rough float32 budget of a run: four copies of the weights (weights, gradients, two Adam moments) and the
    activations the tape keeps for one batch, attention and logits included."""
    m, B = cfg.model, cfg.run.batch_size
    E, F, L, V, T, H = m.hidden_size, m.ffn_dim, m.num_hidden_layers, m.vocab_size, m.seq_len, m.num_attention_heads
    weights = V * E + (T + 2) * E + L * (4 * E * E + 3 * E * F + 10 * E)
    activations = B * T * (L * (12 * E + 4 * F + 2 * H) + 3 * V)
    return 4 * (4 * weights + activations)


RESUME_GROUPS = ("model", "radial", "optim")  # and the batches: batch_size, seed and task
ROUTER = "router."  # the router's parameters in a Radial Network's training state: router.w1, ...


def check_resume(cfg: TrainConfig) -> None:
    """A state saved in run.out resumes only with the settings it was trained with, read from train_config.json:
    checked before any work (the command line calls it before preparing the corpus)."""
    out = Path(cfg.run.out)
    state_path, config_path = out / "state.safetensors", out / "train_config.json"
    if not state_path.is_file():
        return
    if not config_path.is_file():
        raise RadialError(
            f"{config_path}: missing beside {state_path.name}, so the run's settings are unknown: "
            "restore it or use a new --out"
        )
    saved = read_json(config_path, RadialError, "a JSON object of training settings")
    default, now = TrainConfig().flat(), cfg.flat()  # a setting the file lacks was saved by an older version
    keys = [f.name for g in RESUME_GROUPS for f in dataclasses.fields(GROUPS[g])] + ["batch_size", "seed", "task"]
    changed = [k for k in keys if saved.get(k, default[k]) != now[k]]
    if changed:
        was = ", ".join(f"{k}={saved.get(k)!r:.24} (now {now[k]!r})" for k in changed[:4])
        raise RadialError(
            f"{config_path}: {state_path.name} was saved with {was}; resume with the same settings or use a new --out"
        )


# ------------------------------------------------------------------------------------------------- network


def build_network(cfg: TrainConfig):
    """The network a run trains: a fresh model of ModelSettings (or the init_from checkpoint in float32), wrapped
    in its Radial Network (the in-order router for a sequential model, a fresh router for --radial)."""
    m, r = cfg.model, cfg.radial
    if m.init_from:
        model = load(m.init_from, weights_dtype="float32")
        if isinstance(model, RadialNetwork):
            model = model.model
    else:
        arch = ARCHITECTURES[m.architecture]
        model_cfg = m.model_config()
        model = arch.model(model_cfg, arch.module.init_tensors(model_cfg, cfg.run.seed))
    if not r.radial:
        return model.sequential
    rc = dataclasses.replace(r.router_config(model.config), kv_rule=r.kv_rule)  # saved with the router
    if r.estimator == "expert-choice":
        rc = dataclasses.replace(rc, kind="expert-choice")
        rc.capacity = capacity_for(r.target_depth, rc.n_blocks, rc.depth_limit, rc.forward_only)
        router = ExpertChoice.new(rc, cfg.run.seed, r.aux_weight)
    else:
        router = Router(rc, init_router(rc, cfg.run.seed, r.in_order))
    return RadialNetwork(
        model,
        router,
        r.max_depth,
        r.cache_policy,
        r.step_encoding_scale,
        gate=r.estimator != "reinforce",
        explore=r.explore,
        keep_routes=False,
        sample=r.estimator == "reinforce",
    )


def parameters(net) -> dict:
    """Every trained parameter by name: the model's (Hugging Face names) and the router's (router.w1, ...)."""
    router = getattr(net.router, "params", {})
    return {**net.model.named_parameters(), **{ROUTER + k: a for k, a in router.items()}}


def compute_term(rs: RadialSettings, expected: float) -> float:
    """The loss's compute term for a batch whose tokens expect to run `expected` blocks each (module doc)."""
    term = rs.cost * expected
    if rs.target_depth is not None:
        term += rs.depth_weight * (expected - rs.target_depth) ** 2
    return term


def compute_slope(rs: RadialSettings, expected: float) -> float:
    """d compute_term / d expected: the price of one more expected block in this batch."""
    slope = rs.cost
    if rs.target_depth is not None:
        slope += 2 * rs.depth_weight * (expected - rs.target_depth)
    return slope


def reinforce_advantage(c_ce, depth, cost: float):
    """The score-function estimator's signal per token [n]: its own loss (next-token NLL, times its mask weight
    scaled so that the mean over tokens is the LM loss) plus cost x the blocks it ran, minus the batch's mean (the
    baseline, which keeps the estimate unbiased and cuts its variance). Each token is credited with its own loss
    only: what its route did to later tokens (through the keys it wrote) is not in it."""
    probs, targets, weights = c_ce
    nll = -np.log(np.maximum(probs[np.arange(len(targets)), targets].astype(np.float64), 1e-30))
    if weights is not None:
        nll *= weights * len(weights) / weights.sum()
    reward = nll + cost * depth
    return (reward - reward.mean()).astype(probs.dtype)


def capacity_at(step: int, final: float, warmup: int) -> float:
    """An expert-choice router's capacity at `step`: from 1 (every token runs every block, as the sequential model
    the blocks start as) down to `final` linearly over `warmup` steps (Mixture-of-Recursions' capacity warm-up)."""
    return final if step >= warmup else 1.0 - (1.0 - final) * step / warmup


def update_cost(rs: RadialSettings, mean_depth: float) -> None:
    """Dual ascent on the constraint "mean blocks/token = target": the cost per block rises while tokens run more
    blocks than asked and falls while they run fewer, below 0 if need be (then each block earns a little, which is
    what lets tokens that exit too early learn to stay: EXIT itself gets no gradient from the LM loss). In place;
    the trainer saves it with the state, so resumes are exact."""
    if rs.target_depth is not None:
        rs.cost += rs.cost_rate * (mean_depth - rs.target_depth)


def loss_and_grads(net, batch, rs: RadialSettings | None = None, need_grads=True, rng=None, mask=None):
    """One batch [B, T + 1] of token ids through `net`: (loss, {name: gradient} or None, info). The loss is the mean
    next-token cross-entropy (over the tokens `mask` [B, T] weights, if given) plus a Radial Network's compute term;
    info has the LM loss alone, the blocks per token, the expected blocks and the routes [B * T, max_depth]."""
    ids, targets = batch[:, :-1], batch[:, 1:]
    tape = [] if need_grads else None
    logits = net.forward(ids, tape=tape, rng=rng)  # [B * T, V]
    weights = None if mask is None else mask.ravel().astype(logits.dtype)
    lm_loss, c_ce = ops.crossentropy_forward(logits, targets.ravel(), weights)
    walk = net.last_walk
    expected = walk.expected_blocks()
    info = {"lm_loss": float(lm_loss), "blocks": float(walk.depth.mean()), "expected_blocks": expected}
    info["routes"], info["aux_loss"] = walk.routes, walk.aux_loss
    budget = rs is not None and rs.radial and rs.estimator == "gate"  # expert choice: its capacity is the budget
    loss = float(lm_loss) + walk.aux_loss + (compute_term(rs, expected) if budget else 0.0)
    advantage = None
    if need_grads and rs is not None and rs.radial and rs.estimator == "reinforce":
        advantage = reinforce_advantage(c_ce, walk.depth, rs.cost)
    if not need_grads:
        return loss, None, info
    model, router = net.model, net.router
    model.zero_grad()
    if isinstance(router, LEARNED):
        router.grad = {k: np.zeros_like(a) for k, a in router.params.items()}
    slope = compute_slope(rs, expected) if budget else 0.0
    net.backward(ops.crossentropy_backward(c_ce), tape, slope, advantage)
    model.flush_grads()
    grads = {**model.gradients(), **{ROUTER + k: g for k, g in getattr(router, "grad", {}).items()}}
    return loss, grads, info


def evaluate(net, sequences: np.ndarray, batch_size: int = 16) -> float:
    """Mean next-token loss over fixed sequences [n, T + 1] (a Radial Network's without the compute term), by the
    inference path (no tape): the numbers generation would give."""
    total = 0.0
    for i in range(0, len(sequences), batch_size):
        batch = sequences[i : i + batch_size]
        total += loss_and_grads(net, batch, need_grads=False)[2]["lm_loss"] * len(batch)
    return float(total / len(sequences))


def sequence_nll(net, sequences: np.ndarray, batch_size: int = 64, progress=None):
    """Next-token NLL [n_seq, T - 1], blocks per token [n_seq, T] and every token's route [n_seq, T, max_depth]
    (-1 = none) of packed sequences [n_seq, T], by the inference path in batches (what generation computes)."""
    nll, depth, routes = [], [], []
    starts = range(0, len(sequences), batch_size)
    for i in starts if progress is None else progress(starts):
        ids = sequences[i : i + batch_size]
        logp = ops.log_softmax(net.forward(ids).reshape(*ids.shape, -1)[:, :-1])
        nll.append(-np.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0])
        depth.append(net.last_walk.depth.reshape(ids.shape))
        routes.append(net.last_walk.routes.reshape(*ids.shape, -1))
    return np.concatenate(nll), np.concatenate(depth), np.concatenate(routes)


# --------------------------------------------------------------------------------------------- the trainer


def batch_at(tokens: np.ndarray, step: int, cfg: TrainConfig) -> np.ndarray:
    """The batch of step `step`: random windows drawn from a generator seeded by (seed, step), so a resumed
    run sees exactly the batches an uninterrupted one would have."""
    rng = np.random.default_rng([cfg.run.seed, step])
    starts = rng.integers(0, len(tokens) - cfg.model.seq_len - 1, size=cfg.run.batch_size)
    return np.stack([tokens[s : s + cfg.model.seq_len + 1] for s in starts])  # [B, T + 1]


def _repair_log(log_path: Path, step: int) -> None:
    """Keep log.jsonl's whole records of steps 1..`step` (the saved state): a partial last line (a full disk or a
    kill mid-write) and the records of steps lost since the last save are dropped, so steps are never duplicated."""
    if not log_path.is_file():
        return
    kept, seen = [], set()
    for line, record in read_json_lines(log_path, RadialError):
        whole = line.endswith("\n") and isinstance(record, dict) and isinstance(record.get("step"), int)
        if whole and record["step"] <= step and record["step"] not in seen:
            kept.append(line)
            seen.add(record["step"])
    write_text(log_path, "".join(kept))


def read_log(out) -> list[dict]:
    """The records of run `out`'s log.jsonl, one a step (validation losses on the steps that ran them)."""
    return [r for _, r in read_json_lines(Path(out) / "log.jsonl", RadialError) if r is not None]


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


def load_state(path: Path, params: dict):
    """A saved state into `params` (the network's own arrays, in place), its tensors checked against them first:
    -> Adam moments m, v, the step, and a Radial Network's compute cost (None if the state has none)."""
    f = SafetensorsFile(path)
    step = saved_step(path, f)
    shapes = {k: a.shape for k, a in params.items()}
    expected = {**shapes, **{f"adam.{m}.{k}": s for m in "mv" for k, s in shapes.items()}}
    found = {name: f.shape(name) for name in f.entries}
    wrong = sorted(set(expected) ^ set(found)) + [n for n in expected if n in found and found[n] != expected[n]]
    if wrong:
        shown = ", ".join(map(repr, wrong[:3])) + (f" and {len(wrong) - 3} more" if len(wrong) > 3 else "")
        raise RadialError(f"{path}: tensors missing, unexpected or of the wrong shape for this run's model: {shown}")
    saved = {k: f.read(k) for k in shapes}
    m, v = ({k: f.read(f"adam.{moment}.{k}") for k in shapes} for moment in "mv")
    cost = f.metadata.get("cost")
    try:
        cost = None if cost is None else float(cost)
    except ValueError:
        raise RadialError(f"{path}: metadata 'cost' is {cost!r:.40}, expected a number") from None
    check_state(saved, m, v, path)  # a NaN or a negative second moment: refused before any weight is replaced
    for k, a in saved.items():
        params[k][...] = a
    return m, v, step, cost


def train(cfg: TrainConfig, train_tokens, val_sets: dict, progress: bool = True, stop_after: int | None = None):
    """Train (or resume) into run.out; returns the network. `train_tokens` is a token stream [N] (random windows,
    `batch_at`) or an object whose `batch(step)` gives a step's batch [B, T + 1] (or (batch, loss mask)).
    Interrupting (Ctrl-C, SIGTERM) saves the state after the current step, so a rerun continues where it stopped."""
    out, rs = Path(cfg.run.out), dataclasses.replace(cfg.radial)  # rs.cost moves as training goes: a copy
    out.mkdir(parents=True, exist_ok=True)
    state_path, log_path, config_path = out / "state.safetensors", out / "log.jsonl", out / "train_config.json"
    _remove_stale_temps(out)
    check_resume(cfg)  # resuming: the run must be the one that was saved
    write_json(config_path, cfg.flat())
    net = build_network(cfg)
    params = parameters(net)
    if state_path.is_file():
        m, v, step, cost = load_state(state_path, params)
        if rs.radial and cost is not None:
            rs.cost = cost  # where the compute term's controller had got to
        _repair_log(log_path, step)
    else:
        step = 0
        m = {k: np.zeros_like(a) for k, a in params.items()}
        v = {k: np.zeros_like(a) for k, a in params.items()}
    batches = train_tokens.batch if hasattr(train_tokens, "batch") else (lambda s: batch_at(train_tokens, s, cfg))
    interrupted = []
    handlers = {s: signal.signal(s, lambda *_: interrupted.append(True)) for s in (signal.SIGINT, signal.SIGTERM)}
    bar = Bar(cfg.run.steps, "train", "step", initial=step, enabled=progress)
    final_capacity = getattr(net.router.config, "capacity", None)
    last_save, t0, tokens_done = step, time.perf_counter(), 0
    try:  # signals only raise a flag, so a step is never cut in half; the loop ends after a whole step
        with open(log_path, "a") as log:
            while step < cfg.run.steps and not interrupted and (stop_after is None or step < stop_after):
                lr = lr_at(step, cfg.optim.lr, cfg.optim.warmup, cfg.run.steps, cfg.optim.min_lr_ratio)
                rng = np.random.default_rng([cfg.run.seed, step, 1])  # its own stream, resumable
                batch = batches(step)
                batch, mask = batch if isinstance(batch, tuple) else (batch, None)
                if isinstance(net.router, ExpertChoice):
                    net.router.config.capacity = capacity_at(step, final_capacity, rs.capacity_warmup)
                loss, grads, info = loss_and_grads(net, batch, rs, rng=rng, mask=mask)
                routing = rs.radial and step >= rs.router_warmup
                if rs.radial and not routing:  # warm-up: untrained blocks would teach the router to exit
                    grads = {k: g for k, g in grads.items() if not k.startswith(ROUTER)}
                norm = clip_grads(grads, cfg.optim.grad_clip)
                router = {k: g for k, g in grads.items() if k.startswith(ROUTER)}  # learns at its own, slower rate
                blocks = {k: g for k, g in grads.items() if k not in router}
                adamw_step(params, blocks, m, v, step + 1, lr, weight_decay=cfg.optim.weight_decay)
                if router:
                    adamw_step(params, router, m, v, step + 1, lr * rs.router_lr, weight_decay=cfg.optim.weight_decay)
                step += 1
                tokens_done += batch[:, 1:].size
                record = {"step": step, "loss": round(loss, 4), "lr": lr, "grad_norm": round(norm, 3)}
                if rs.radial:  # the LM loss, blocks/token, and the cost that the depth target sets
                    record.update(lm_loss=round(info["lm_loss"], 4), blocks=round(info["blocks"], 3), cost=rs.cost)
                    if routing:
                        update_cost(rs, info["blocks"])
                if step % cfg.run.eval_every == 0 or step == cfg.run.steps:
                    for name, seqs in val_sets.items():
                        record[f"val_{name}"] = round(evaluate(net, seqs), 4)
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
                if step - last_save >= cfg.run.save_every or step == cfg.run.steps:
                    save_state(state_path, params, m, v, step, rs.cost if rs.radial else None)
                    last_save = step
        if step != last_save:  # interrupted: keep every finished step
            save_state(state_path, params, m, v, step, rs.cost if rs.radial else None)
    finally:
        bar.close()
        for s, h in handlers.items():
            signal.signal(s, h)
    if interrupted:
        raise KeyboardInterrupt(f"stopped at step {step}; rerun the same command to resume")
    return net


# ------------------------------------------------------------------------------------------------- export


def checkpoint_name(model_type: str, name: str) -> str:
    """A parameter's name as transformers' save_pretrained writes it: everything under `model.` but Llama's
    untied `lm_head.weight`."""
    return name if name == "lm_head.weight" else "model." + name


def export_checkpoint(net, tokenizer_dir, out_dir, dtype: str = "float16", overwrite=False):
    """Write a Hugging Face checkpoint of `net`, whole or not at all: config.json, model.safetensors (the keys
    save_pretrained writes), and the tokenizer files. A Radial Network trained with its router adds its router
    (float32) and radial.json, so `radial_min.load` returns the routed network; transformers still loads the blocks
    as a plain model."""
    model = net.model
    model_cfg = dataclasses.replace(model.config, dtype=dtype)
    arch = ARCHITECTURES[model_cfg.model_type]
    with write_folder(out_dir, overwrite) as tmp:
        write_json(tmp / "config.json", {**config_to_dict(model_cfg), "architectures": [arch.hf_class]})
        tensors = {checkpoint_name(arch.name, k): a.astype(dtype) for k, a in model.named_parameters().items()}
        write_safetensors(tmp / "model.safetensors", tensors, {"format": "pt"})
        for f in sorted(Path(tokenizer_dir).iterdir()):
            if f.name in TOKENIZER_FILES:
                write_bytes(tmp / f.name, f.read_bytes())
        # generation defaults: a fine-tuned model's own; a small model trained here loops greedily without a penalty
        write_json(tmp / GENERATION_CONFIG, {"repetition_penalty": 1.2, **model.generation_defaults})
        if isinstance(net.router, LEARNED):
            write_radial(tmp, net.router, net.cache_policy, net.step_encoding_scale, net.gate)


TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


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


def format_report(rep) -> str:
    """`report`'s table: perplexity per held-out stream beside the n-gram baselines (and blocks per token)."""
    routed = any("blocks" in r for r in rep.values())  # a Radial Network: its blocks per token too
    head = f"{'split':<8}{'tokens':>10}{'model':>10}{'unigram':>10}{'bigram':>10}"
    lines = [head + (f"{'blocks':>10}" if routed else "")]
    for name, r in rep.items():
        lines.append(
            f"{name:<8}{r['tokens']:>10,}{r['model']:10.2f}{r['unigram']:10.2f}{r['bigram']:10.2f}"
            + (f"{r['blocks']:10.2f}" if routed else "")
        )
    return "\n".join(lines)


def report(export, train_ids, val_streams: dict, seq_len: int, bar=None, batch_size=64, max_tokens=0) -> dict:
    """Perplexity of the exported checkpoint `export` (loaded as generation loads it) on every validation stream
    (its first `max_tokens` tokens, 0: all), packed in sequences of `seq_len`, beside the n-gram baselines, and a
    Radial Network's blocks per token. `bar` (a `progress.Bar`) counts the sequences."""
    net = load(export)
    net = net if isinstance(net, RadialNetwork) else net.sequential
    out = {}
    packed = {name: pack(stream[: max_tokens or None], seq_len) for name, stream in val_streams.items()}
    if bar is not None:
        bar.extend(sum(len(s) for s in packed.values()))
    for name, seqs in packed.items():  # each row: tokens 0..T-2 predict 1..T-1, as the engine scores a sequence
        nll, blocks = 0.0, 0.0
        if bar is not None:
            bar.set(name)
        for i in range(0, len(seqs), batch_size):
            batch = seqs[i : i + batch_size]
            _, _, info = loss_and_grads(net, batch, need_grads=False)
            nll += info["lm_loss"] * len(batch)
            blocks += info["blocks"] * len(batch)
            if bar is not None:
                bar.update(len(batch))
        row = {"tokens": int(seqs[:, 1:].size), "model": float(np.exp(nll / len(seqs)))}
        if isinstance(net.router, LEARNED):
            row["blocks"] = blocks / len(seqs)
        out[name] = {**row, **ngram_perplexities(train_ids, seqs, net.config.vocab_size)}
    return out
