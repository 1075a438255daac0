#!/usr/bin/env python
"""radial_min's command line: generate text, classify images, inspect, train, profile and route.

    python cli.py generate "In the beginning"              # the shipped model, offline
    python cli.py generate "Hello" --model facebook/opt-125m --temperature 0.8 --top-p 0.9
    python cli.py classify photo.jpg --model weights/vit-base-patch16-224
    python cli.py info
    python cli.py train --out runs/opt-kjv-wiki --export runs/opt-kjv-wiki/export

Results go under runs/ by default; a command refuses to replace files that exist unless given --overwrite.
Bad input ends with one line on stderr naming what is wrong, and exit code 2; anything else is a bug and keeps
its traceback.
"""

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

import radial_min
from radial_min import data, kernels, progress
from radial_min.io import images
from radial_min.analysis import layer_major, memory, oracle, plots, profiling, stream
from radial_min import router as R
from radial_min import train as tr
from radial_min.cache import POLICIES
from radial_min.data import SHARED
from radial_min.dtypes import STORAGE_DTYPES
from radial_min.errors import RadialError, SettingError, count
from radial_min.generation import check_sampling
from radial_min.io.gguf_file import is_gguf
from radial_min.io.hub import DEFAULT_MODEL
from radial_min.kernels import softmax
from radial_min.models.opt import POSITION_OFFSET
from radial_min.io.outputs import check_out, write_csv, write_json, write_npz
from radial_min.radial import DEPTH_STYLES, RadialNetwork, depth_streamer, format_routing
from radial_min.io.tokenizer import Streamer

TAU = 0.2  # the default threshold: the shipped router's; on the shipped model 0.05 skips almost nothing
MIN_VOCAB = 260  # a byte-level BPE: 256 bytes + 4 special tokens


# ----------------------------------------------------------------------------------------------- generate


def cmd_generate(args):
    try:
        check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.repetition_penalty)
    except SettingError as e:  # "top_k must be >= 1, ..." names the API's argument: name the option too
        raise RadialError(f"--{str(e).split(' ', 1)[0].replace('_', '-')}: {e}") from None
    prompt = _utf8(args.prompt, "the prompt")
    model = _load(args.model, "lm", args.weights_dtype)
    _warn_without_effect(args, co_trained=isinstance(model, RadialNetwork))
    tok = radial_min.Tokenizer(model.path)
    ids = _check_vocab(tok.encode(prompt), model, tok.source)
    context = model.config.max_position_embeddings
    if not 0 < len(ids) <= context:
        raise RadialError(
            f"the prompt is {count(len(ids), 'token')} long; the model takes 1 to {context}"
            + ("" if len(ids) else " (its tokenizer adds no BOS to an empty prompt)")
        )
    room = context - len(ids) + 1
    if args.max_new_tokens > room:
        _warn(
            f"--max-new-tokens {args.max_new_tokens}: the model's context of {model.config.max_position_embeddings} "
            f"tokens leaves room for {max(0, room)} after the {len(ids)}-token prompt; generation stops there"
        )
    runner = _radial_network(model, args) if args.router is not None or isinstance(model, RadialNetwork) else model
    routed = isinstance(runner, RadialNetwork)
    pending = [] if args.quiet else [prompt]  # echoed with the first new text, after any compile notice

    def write(text):
        sys.stdout.write((pending.pop() if pending else "") + text)
        sys.stdout.flush()

    stream = streamer = Streamer(tok, write)
    if routed and not args.quiet:
        stream = depth_streamer(stream, runner, args.show_depth, write)
    stamps = []  # when each new token was chosen: the first one comes out of the prefill

    def on_token(token):
        stamps.append(time.perf_counter())
        if not args.quiet:
            stream(token)

    t0 = time.perf_counter()
    new = radial_min.generate(
        runner,
        ids,
        args.max_new_tokens,
        args.temperature,
        args.top_k,
        args.top_p,
        args.seed,
        on_token=on_token,
        repetition_penalty=args.repetition_penalty,
    )
    dt = time.perf_counter() - t0
    if args.quiet:
        write(tok.decode(new))
    else:
        streamer.finish()  # a character the last token left incomplete: printed as --quiet would print it
    write("\n")  # (with the prompt, if no new text came)
    if args.stats:
        print(format_stats(len(ids), dt, [s - t0 for s in stamps]), file=sys.stderr)
    if routed:
        sys.stdout.flush()
        print(format_routing(runner, len(ids)), file=sys.stderr)


def format_stats(n_prompt: int, dt: float, stamps: list) -> str:
    """Tokens and time in all, then apart: the first new token (the prefill) and the decode rate after it.
    `stamps`: seconds from the start to each new token."""
    n = len(stamps)
    line = f"[{count(n_prompt, 'prompt token')} + {count(n, 'new token')} in {dt:.2f} s, {n / dt:.1f} tokens/s"
    if n > 1:
        line += f"; the first after {stamps[0]:.2f} s (prefill), then {(n - 1) / (stamps[-1] - stamps[0]):.1f} tokens/s"
    return line + "]"


def _warn_without_effect(args, co_trained=False):
    """Options that would silently do nothing, named (as transformers warns about unused generation flags)."""
    if args.temperature <= 0 and (args.top_k is not None or args.top_p is not None):
        _warn("--top-k/--top-p have no effect at --temperature 0 (greedy decoding); set --temperature > 0 to sample")
    if args.router is None and not co_trained:
        unused = [
            f"--{k.replace('_', '-')}"
            for k in ("max_depth", "cache_policy", "step_encoding_scale", "show_depth")
            if getattr(args, k) is not None
        ]
        if unused:
            _warn(f"{', '.join(unused)} {'has' if len(unused) == 1 else 'have'} no effect without --router")


def _radial_network(model, args):
    """The routed network: a co-trained one as loaded (--max-depth and --cache-policy change it), or the model
    with a distilled --router."""
    if isinstance(model, RadialNetwork):
        if args.router is not None:
            raise RadialError(f"--router {args.router}: {args.model} was trained with its own router (radial.json)")
        if args.cache_policy is not None and args.cache_policy != model.cache_policy:
            _warn(
                f"--cache-policy {args.cache_policy}: {args.model} was trained with {model.cache_policy}, so its "
                "queries never learned to read another policy's keys"
            )
            model.cache_policy = args.cache_policy
        if args.step_encoding_scale is not None:
            model.step_encoding_scale = args.step_encoding_scale
        if args.max_depth is not None:
            model.max_depth = min(model.max_depth, args.max_depth)
        return model
    router = _load_router(model, args.router, "--router")
    scale = 1.0 if args.step_encoding_scale is None else args.step_encoding_scale
    return RadialNetwork(model, router, args.max_depth, args.cache_policy or POLICIES[0], scale)


def _load_router(model, path, option):
    """The router at `path` (a folder or the files' prefix), refused unless it routes this model's blocks."""
    return _check_router(R.Router.load(_router_path(path)), model, path, option)


def _check_router(router, model, path, option):
    if router.config.width != model.config.hidden_size or router.config.n_blocks != len(model.blocks):
        raise RadialError(
            f"{option} {path}: routes {router.config.n_blocks} blocks of width "
            f"{router.config.width}, but the model has {len(model.blocks)} blocks of width "
            f"{model.config.hidden_size}"
        )
    return router


def _router_path(path):
    """A router: `train-router --out`'s folder (its router.json/.safetensors) or the files' common prefix."""
    return Path(path) / "router" if Path(path).is_dir() else path


# ------------------------------------------------------------------------------------------- classify, info


def cmd_classify(args):
    if args.top < 1:
        raise RadialError(f"--top must be >= 1, got {args.top}")
    model = _load(args.model, "vit")
    settings = images.read_preprocessor(model.path, model.config.image_size)
    for path in images.list_images(args.image):
        pixels = images.model_pixels(path, settings, model.config.image_size)[None]
        out = model.forward(pixels)[0]
        if model.classifier is None:
            print(f"{path}: {args.model} is a ViTModel without a classifier; pooled output has {out.size} features")
            continue
        probs = softmax(out[None])[0]
        print(f"{path}:")
        for i in probs.argsort()[::-1][: args.top]:
            print(f"  {probs[i]:7.2%}  {model.config.id2label.get(int(i), str(i))}")


def cmd_info(args):
    model = radial_min.load(args.model)
    print(format_info(model))


def format_info(model):
    cfg = model.config
    lines = [
        f"model       {model.path}",
        f"type        {cfg.model_type}  ({type(model).__name__})",
        f"parameters  {model.n_params:,}",
        f"on disk     {', '.join(count(n, 'tensor') + ' ' + d for d, n in sorted(model.dtypes_on_disk.items()))}",
        *_gguf_file_line(model),
        f"in memory   {model.n_params * 4 / 2**20:.1f} MiB float32",
        f"blocks      {len(model.blocks)} ({count(model.n_layer, 'layer')} x attention + FFN)",
    ]
    if cfg.model_type == "opt":
        lines += [
            f"width       hidden {cfg.hidden_size}, ffn {cfg.ffn_dim}, heads {cfg.num_attention_heads}, "
            f"vocab {cfg.vocab_size}",
            f"layout      {'pre' if cfg.do_layer_norm_before else 'post'}-LN, {cfg.activation_function}, "
            f"context {cfg.max_position_embeddings}",
        ]
    elif cfg.model_type in ("llama", "qwen2"):
        lines += [
            f"width       hidden {cfg.hidden_size}, ffn {cfg.intermediate_size} (SwiGLU), "
            f"heads {cfg.num_attention_heads} ({cfg.num_key_value_heads} key/value), vocab {cfg.vocab_size}",
            f"layout      RMSNorm, rotary theta {cfg.rope_theta:g}, "
            f"{'tied' if cfg.tie_word_embeddings else 'untied'} head, context {cfg.max_position_embeddings}"
            f"{', qkv biases' if cfg.qkv_bias else ''}",
        ]
    else:
        lines += [
            f"width       hidden {cfg.hidden_size}, mlp {cfg.intermediate_size}, heads {cfg.num_attention_heads}",
            f"image       {cfg.image_size}px, patch {cfg.patch_size}, {count(cfg.num_patches, 'patch', 'patches')}, "
            f"labels {cfg.num_labels}",
        ]
    if isinstance(model, RadialNetwork):  # co-trained: its router and routing settings
        rc = model.router.config
        order = "forward only" if rc.forward_only else "any order, blocks reusable"
        steps = f", step encodings x{model.step_encoding_scale:g}" if model.cache_policy == "global" else ""
        lines += [
            f"routing     co-trained router ({rc.hidden} hidden units), {order}, max depth {model.max_depth}",
            f"KV cache    unified, {model.cache_policy} policy{steps}",
        ]
    return "\n".join(lines)


def _gguf_file_line(model):
    """A .gguf file's size and llama.cpp's name for its quantization mix (general.file_type), as one line."""
    if not is_gguf(model.path):
        return []
    kind = getattr(model, "file_type", None)
    try:
        import gguf

        name = f" ({gguf.LlamaFileType(kind).name})"
    except (ImportError, ValueError, TypeError):
        name = ""
    described = "not given" if kind is None else f"{kind}{name}"
    return [f"file        GGUF, {model.path.stat().st_size / 2**20:.1f} MiB, general.file_type {described}"]


# -------------------------------------------------------------------------------------------------- train


def cmd_train(args):
    cfg = tr.TrainConfig(
        out=args.out,
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        ffn_dim=args.ffn_dim or 4 * args.hidden_size,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        steps=args.steps,
        lr=args.lr,
        warmup=args.warmup,
        weight_decay=args.weight_decay,
        grad_clip=args.grad_clip,
        eval_every=args.eval_every,
        save_every=args.save_every,
        seed=args.seed,
        **_radial_settings(args),
    )
    check_train_settings(cfg)
    check_out(cfg.out, "--out", RUN_FILES)  # a file, a read-only mount, a folder named log.jsonl: refused now
    if args.export:
        check_out(args.export, "--export")
    tr.check_resume(cfg)  # a saved run resumed with other settings: refused before the corpus is prepared
    done = _saved_step(Path(cfg.out) / "state.safetensors")
    if args.export and not args.overwrite and _nonempty(args.export):
        if done is not None and done >= cfg.steps:
            print(
                f"{cfg.out}: already finished (step {done:,} of {cfg.steps:,}) and exported to {args.export}; "
                "nothing to do (--overwrite redoes the export and evaluation)",
                file=sys.stderr,
            )
            return
        raise RadialError(f"--export {args.export}: the folder exists and is not empty; pass --overwrite to replace it")
    print(f"preparing corpus and tokenizer in {cfg.out} ...", file=sys.stderr)
    train_ids, val_streams = data.prepare_corpus(cfg.out, cfg.vocab_size)
    short = [k for k, ids in {"train": train_ids, **val_streams}.items() if len(ids) < cfg.seq_len + 2]
    if short:
        raise RadialError(
            f"{Path(cfg.out) / 'tokens.npz'}: the {', '.join(short)} stream holds fewer than --seq-len "
            f"+ 2 = {cfg.seq_len + 2} tokens"
        )
    val = {k: data.validation_sequences(s, cfg.seq_len, cfg.eval_sequences) for k, s in val_streams.items()}
    print(
        f"train {len(train_ids):,} tokens; validation {', '.join(f'{k} {len(s):,}' for k, s in val_streams.items())}",
        file=sys.stderr,
    )
    if done is not None:
        print(
            f"{cfg.out}: resuming at step {done:,} of {cfg.steps:,}"
            if done < cfg.steps
            else f"{cfg.out}: training already finished at step {done:,}",
            file=sys.stderr,
        )
    params = tr.train(cfg, train_ids, val)
    plots.training_curve(tr.read_log(cfg.out), Path(cfg.out) / "loss.png")
    if args.export:
        tr.export_checkpoint(
            params, cfg.model_config(), cfg.out, args.export, args.dtype, cfg.radial_config(), overwrite=args.overwrite
        )
        print(f"exported {args.export}; validation perplexity on the full held-out streams ...", file=sys.stderr)
        with progress.Bar(0, "evaluate", "seq", leave=False) as bar:
            rep = tr.report(args.export, train_ids, val_streams, cfg.seq_len, bar)
        write_json(Path(cfg.out) / "report.json", rep)
        print(format_train_report(rep))


# what a run folder holds: each, if there, must be a regular file (a FIFO named state.safetensors would be
# taken as no state, and the run would start again at step 0)
RUN_FILES = ("state.safetensors", "train_config.json", "log.jsonl", "tokens.npz", "vocab.json", "merges.txt")
_RADIAL_OPTIONS = tuple(f for f in tr.RADIAL_FIELDS if f != "radial")  # train --radial's routing options


def _radial_settings(args) -> dict:
    """`train --radial`'s routing options as TrainConfig fields; without --radial, naming any that was given."""
    given = {k: getattr(args, k) for k in _RADIAL_OPTIONS if getattr(args, k) not in (None, False)}
    if not args.radial:
        if given:
            raise RadialError(f"{', '.join('--' + k.replace('_', '-') for k in given)}: routing options need --radial")
        return {}
    if args.target_depth is not None and args.cost is not None:
        raise RadialError("--target-depth and --cost: give one (the target sets the cost as training goes)")
    if args.target_depth is None and args.cost is None:
        raise RadialError("--radial needs a compute budget: --target-depth BLOCKS (blocks per token) or --cost C")
    return {"radial": True, **given}


def check_train_settings(cfg):
    """Every setting `train` would trip over later, checked before any work: one error naming the option."""
    problems = []
    need, avail = _training_bytes(cfg), memory.available_bytes()
    if need > avail:
        problems.append(
            f"--hidden-size {cfg.hidden_size} --layers {cfg.num_hidden_layers} --ffn-dim {cfg.ffn_dim} "
            f"--vocab-size {cfg.vocab_size} --seq-len {cfg.seq_len} --batch-size {cfg.batch_size}: "
            f"training would need about {need / 2**30:,.1f} GiB (weights, gradients, Adam moments and a "
            f"batch's activations), {avail / 2**30:,.1f} GiB are available"
        )
    if cfg.vocab_size < MIN_VOCAB:
        problems.append(
            f"--vocab-size {cfg.vocab_size}: a byte-level BPE needs at least {MIN_VOCAB} (256 bytes + 4 special tokens)"
        )
    if cfg.hidden_size % cfg.num_attention_heads:
        problems.append(f"--heads {cfg.num_attention_heads} must divide --hidden-size {cfg.hidden_size}")
    if cfg.seq_len < 2:
        problems.append(f"--seq-len {cfg.seq_len}: training needs at least 2 tokens per sequence")
    for name, value in (("--lr", cfg.lr), ("--weight-decay", cfg.weight_decay), ("--grad-clip", cfg.grad_clip)):
        if not (value >= 0 and np.isfinite(value)):
            problems.append(f"{name} must be a finite number >= 0, got {value}")
    if cfg.lr == 0:
        problems.append("--lr must be > 0")
    if cfg.radial:
        n = 2 * cfg.num_hidden_layers
        depth = n if cfg.max_depth is None else cfg.max_depth
        if cfg.forward_only and depth > n:
            problems.append(f"--max-depth {depth}: a --forward-only network runs each of its {n} blocks at most once")
        elif depth > R.MAX_PASSES * n:
            problems.append(f"--max-depth {depth}: at most {R.MAX_PASSES} passes over the {n} blocks")
        if cfg.target_depth is not None and not 0 < cfg.target_depth <= depth:
            problems.append(f"--target-depth {cfg.target_depth}: expected blocks per token in (0, {depth}]")
        if not (cfg.cost >= 0 and np.isfinite(cfg.cost)):
            problems.append(f"--cost must be a finite number >= 0, got {cfg.cost}")
        if not 0 <= cfg.explore <= 1:
            problems.append(f"--explore {cfg.explore}: expected a share in [0, 1]")
        if cfg.in_order and cfg.router_hidden < n + 1:
            problems.append(
                f"--router-hidden {cfg.router_hidden}: routing {n} blocks in order needs >= {n + 1} (or --in-order 0)"
            )
        if not (0 <= cfg.step_encoding_scale < 1e3):
            problems.append(f"--step-encoding-scale must be in [0, 1000), got {cfg.step_encoding_scale}")
    if problems:
        raise RadialError("; ".join(problems))


def _training_bytes(cfg) -> int:
    """A rough float32 budget of `train`: four copies of the weights (weights, gradients, two Adam moments) and the
    activations backprop keeps for one batch, attention scores and logits included."""
    E, F, L, V, T, B, H = (
        cfg.hidden_size,
        cfg.ffn_dim,
        cfg.num_hidden_layers,
        cfg.vocab_size,
        cfg.seq_len,
        cfg.batch_size,
        cfg.num_attention_heads,
    )
    weights = V * E + (T + POSITION_OFFSET) * E + L * (4 * E * E + 2 * E * F + 10 * E)
    activations = B * T * (L * (12 * E + 3 * F + 2 * H * T) + 3 * V)
    return 4 * (4 * weights + activations)


def _saved_step(state_path):
    """The step a run's saved state reached, or None if there is none."""
    return tr.saved_step(state_path) if Path(state_path).is_file() else None


def format_train_report(rep):
    routed = any("blocks" in r for r in rep.values())  # a Radial Network: its blocks per token too
    head = f"{'split':<8}{'tokens':>10}{'model':>10}{'unigram':>10}{'bigram':>10}"
    lines = [head + (f"{'blocks':>10}" if routed else "")]
    for name, r in rep.items():
        lines.append(
            f"{name:<8}{r['tokens']:>10,}{r['model']:10.2f}{r['unigram']:10.2f}{r['bigram']:10.2f}"
            + (f"{r['blocks']:10.2f}" if routed else "")
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------- profile, simulate


def cmd_profile(args):
    out = check_out(args.out, "--out", ["summary.json", "summary.csv"])
    models = args.model or [str(DEFAULT_MODEL)]
    _check_free(out, ["summary.json", "summary.csv"], args.overwrite)
    hist, layer_summaries, csv_rows, report, sizes, streamed = {}, {}, [], {}, {}, []
    for source in models:
        model = _load_maybe_streamed(source, args.stream, None, out / ".stream-{}")
        label, names = model.path.name, profiling.block_names(model)
        phases = _profile_phases(model, args)
        streamed += [(model, phases["tokens"])] if getattr(model, "layer_major", False) else []
        for phase, ratios in phases["ratios"].items():
            summary = report[f"{label}/{phase}"] = profiling.summarize(ratios, names)
            title = f"\n{label}, {phase}: residual ratio ({args.kind}) over {count(len(ratios), 'token')}"
            print(profiling.format_summary(summary, title))
            print(f"overall median {summary['overall']['median']:.4f}")
            csv_rows += [{"model": label, "phase": phase, **row} for row in profiling.summary_rows(summary)]
            write_npz(out / f"ratios_{label}_{phase}.npz", ratios=ratios.astype("float32"), blocks=names)
        main_phase = next(iter(phases["ratios"]))
        hist[label], layer_summaries[label] = phases["ratios"][main_phase], report[f"{label}/{main_phase}"]
        sizes[label] = (model.n_params, profiling.medians(layer_summaries[label]))
        keep = profiling.kept_blocks(hist[label], args.tau)
        plots.routing_trace(
            keep[: args.trace_tokens], names, out / f"routing_trace_{label}.png", f"{label}, ratio >= {args.tau}"
        )
        plots.depth_histogram(
            {f"{label}, tau={args.tau}": profiling.depth_counts(keep)}, out / f"depth_hist_{label}.png"
        )
    write_json(out / "summary.json", report)
    write_csv(out / "summary.csv", csv_rows)
    made = [
        plots.ratio_histogram(hist, out / "ratio_hist.png", args.kind),
        plots.layer_profile(layer_summaries, out / "layer_profile.png"),
    ]
    if len(sizes) > 1:  # the paper's curve: median ratio against parameters
        print("\n" + profiling.format_sizes(sizes))
        write_csv(out / "sizes.csv", profiling.size_rows(sizes))
        made.append(plots.median_by_size(sizes, out / "median_by_size.png"))
    print(f"\nresults in {out}/" + ("" if all(made) else " (no plots: pip install matplotlib)"))
    for model, _ in streamed:
        layer_major.clear(model.state_dir)
    if streamed:
        print(_memory_report(streamed))


def _profile_phases(model, args) -> dict:
    """Every token's ratios [tokens, blocks] per phase (a language model's prefill and --generate's fed-back tokens,
    a ViT's images) and the number of tokens its hidden states held: {"ratios": {phase: ratios}, "tokens": n}."""
    label = model.path.name
    if model.config.model_type == "vit":
        settings = images.read_preprocessor(model.path, model.config.image_size)
        pixels = [images.model_pixels(f, settings, model.config.image_size) for f in images.list_images(args.images)]
        return {
            "ratios": {"images": profiling.profile_images(model, pixels, args.kind, _bar(f"profile {label}", "image"))},
            "tokens": 0,
        }
    seqs, _ = _sequences(model, args)
    if args.generate and getattr(model, "layer_major", False):
        raise RadialError(
            f"--generate: generation runs every block per token, it needs {label} loaded whole (no --stream)"
        )
    phases = {"prefill": profiling.profile_text(model, seqs, args.kind, progress=_bar(f"profile {label}", "seq"))}
    if args.generate:
        prompts = [s[: args.prompt_len] for s in seqs[: args.generate_prompts]]
        phases["generation"], _ = profiling.profile_generation(
            model, prompts, args.generate, args.kind, _bar(f"generate {label}", "prompt")
        )
    return {"ratios": phases, "tokens": seqs.size}


def _load_maybe_streamed(source, want_stream: bool, kind: str, state_dir: Path):
    """The model, with its weights streamed block by block (a `stream.StreamedModel`) with --stream or
    automatically when the whole model would not fit in the memory available, else loaded whole. A checkpoint
    that cannot be streamed is loaded whole if it fits. `state_dir` (with {} for the model's name) is where a
    streamed run checkpoints, so that running the command again resumes it."""
    need, avail = stream.model_bytes(source), memory.available_bytes()
    if not want_stream and need <= avail:
        return _load(source, kind)
    why = (
        "--stream"
        if want_stream
        else f"automatic: the model needs {need / 2**30:.1f} GiB as float32, {avail / 2**30:.1f} GiB available"
    )
    try:
        model = stream.StreamedModel(source)
    except stream.NotStreamable as e:
        if need > avail:
            raise RadialError(f"--model {source}: does not fit in memory and cannot be streamed: {e}") from None
        print(f"not streaming ({e}); it fits, loading it whole", file=sys.stderr)
        return _load(source, kind)
    model.state_dir = Path(str(state_dir).format(model.path.name))
    model.progress = progress.BlockBar(model.path.name, len(model.blocks) + 1)
    print(
        f"{model.path.name}: streaming weights block by block ({why}); largest block "
        f"{model.largest_block_bytes() / 2**20:,.1f} MiB as float32; checkpoints in {model.state_dir}/",
        file=sys.stderr,
    )
    return model


def _memory_report(models, extra=""):
    """The peak resident memory of a streamed command beside what bounds it: two blocks' weights and the states
    ([(model, tokens)], the largest of each)."""
    two = max(sum(sorted(m.block_bytes(b) for b in range(len(m.blocks)))[-2:]) for m, _ in models)
    states = max(n_tokens * m.config.hidden_size * 4 for m, n_tokens in models)
    return (
        f"peak memory (VmHWM) {memory.peak_rss_bytes() / 2**20:,.0f} MiB; two largest blocks "
        f"{two / 2**20:,.1f} MiB as float32, hidden states {states / 2**20:,.1f} MiB{extra}"
    )


def cmd_simulate(args):
    rules = args.kv_rule.split(",")
    for r in rules:
        if r not in oracle.KV_RULES:
            raise RadialError(f"--kv-rule: {r!r} is not one of {', '.join(oracle.KV_RULES)}")
    out = check_out(args.out, "--out", ["simulate.json", "simulate.csv"])
    _check_free(out, ["simulate.json", "simulate.csv"], args.overwrite)
    model = _load_maybe_streamed(args.model, args.stream, "lm", out / ".stream")
    streamed = getattr(model, "layer_major", False)
    seqs, _ = _sequences(model, args)
    taus = args.taus
    print(
        f"{model.path.name}: {count(len(seqs), 'sequence')} x {seqs.shape[1]} tokens, "
        f"{count(len(model.blocks), 'block')}",
        file=sys.stderr,
    )
    trace_rule = oracle.threshold(args.trace_tau, f"routing trace: oracle tau={args.trace_tau:g}, {rules[0]}")
    if streamed:  # one bar over every pass, by block (progress.BlockBar): the sweep's, then the routing trace's
        model.progress.extend(1, final=False)
        res = oracle.sweep(model, seqs, taus, rules, args.kind, model.progress)
    else:
        with progress.Bar(0, "simulate", "seq", final=False, leave=False) as bar:
            res = oracle.sweep(model, seqs, taus, rules, args.kind, bar)
    trace = oracle.simulate(model, seqs[:1], trace_rule, rules[0], args.kind)
    names = profiling.block_names(model)
    n = len(model.blocks)
    print(oracle.format_sweep(res["rows"], res["static"], names, rules))
    write_json(out / "simulate.json", oracle.simulate_record(model, seqs, names, res))
    write_csv(out / "simulate.csv", [{k: v for k, v in r.items() if k != "skip_rate"} for r in res["rows"]])
    made = plots.ppl_vs_depth(oracle.sweep_curves(res, rules), n, out / "ppl_vs_depth.png")
    plots.depth_histogram(
        {f"{r}, tau={t}": h for (r, t), h in res["depth_hist"].items() if t == args.trace_tau or t == max(taus)},
        out / "depth_hist.png",
    )
    plots.routing_trace(trace.keep[0], names, out / "routing_trace.png", f"oracle, tau={args.trace_tau}, {rules[0]}")
    print(f"results in {out}/" + ("" if made else " (no plots: pip install matplotlib)"))
    if streamed:
        layer_major.clear(model.state_dir)
        print(_memory_report([(model, seqs.size)]))


# ------------------------------------------------------------------------------------------- train-router


def cmd_train_router(args):
    if args.hidden > 1 << 16:
        raise RadialError(f"--hidden {args.hidden}: a router has at most {1 << 16} hidden units")
    if not (args.lr > 0 and np.isfinite(args.lr)):
        raise RadialError(f"--lr must be a finite number > 0, got {args.lr}")
    if args.evaluate:  # an existing router, judged against the oracle it was distilled from: its tau and rule
        router = R.Router.load(_router_path(args.evaluate))
        if router.config.tau is None or router.config.kv_rule is None:
            raise RadialError(f"--evaluate {args.evaluate}: its router.json records no tau/kv_rule to compare with")
        args.tau, args.kv_rule = router.config.tau, router.config.kv_rule
    out = check_out(args.out if args.out is not None else f"runs/router-tau{args.tau:g}")
    _check_free(
        out, ([] if args.evaluate else ["router.safetensors", "router.json"]) + ["train_router.json"], args.overwrite
    )
    model = _load_maybe_streamed(args.model, args.stream, "lm", out / ".stream")
    streamed = getattr(model, "layer_major", False)
    n = len(model.blocks)
    train_seqs = None
    if args.evaluate:
        ex, cfg = None, _check_router(router, model, args.evaluate, "--evaluate").config
    else:
        if args.max_depth is not None and args.max_depth > n:
            raise RadialError(
                f"--max-depth {args.max_depth}: a forward-only router runs each of the {n} blocks at most once"
            )
        train_seqs, _ = _sequences(
            model, args, args.train_text or data.default_text("valid", "--train-text"), args.max_sequences
        )
        print(
            f"{model.path.name}: oracle labels (tau={args.tau}, {args.kv_rule}) from "
            f"{count(len(train_seqs), 'sequence')} x {train_seqs.shape[1]} tokens",
            file=sys.stderr,
        )
        ex = R.oracle_examples(model, train_seqs, args.tau, args.kv_rule, args.kind, _bar("oracle labels", "seq"))
        cfg = R.RouterConfig(
            width=model.config.hidden_size,
            n_blocks=n,
            hidden=args.hidden,
            max_depth=args.max_depth,
            tau=args.tau,
            kv_rule=args.kv_rule,
            model=model.path.name,
        )
        router = R.train_router(ex, cfg, args.epochs, args.lr, args.batch_size, args.seed)
        router.save(out / "router")
    test_seqs, _ = _sequences(
        model, args, args.test_text or data.default_text("test", "--test-text"), args.test_sequences
    )
    ev = R.evaluate(model, router, test_seqs, args.kind, ex, progress.Passes("seq"))
    runs = ev["runs"]
    print(
        f"\nrouter {args.evaluate} evaluated"
        if args.evaluate
        else f"\nrouter saved to {out / 'router'}.safetensors (+ .json)"
    )
    print(R.format_router_report(ev, len(test_seqs)))
    report = R.router_report(ev, str(args.evaluate or out / "router"), cfg, n)
    write_json(out / "train_router.json", report)
    plots.ppl_vs_depth(
        {name: ([r.depth.mean()], [r.ppl]) for name, r in runs.items()}, n, out / "router_ppl_vs_depth.png"
    )
    plots.depth_histogram(
        {name: r["depth_hist"] for name, r in report["runs"].items() if "static" not in name and name != "sequential"},
        out / "router_depth_hist.png",
    )
    plots.routing_trace(runs["router"].keep[0], [b.name for b in model.blocks], out / "router_trace.png", "router")
    print(f"report in {out}/")
    if streamed:
        layer_major.clear(model.state_dir)
        labels = ((0 if ex is None else ex["x"].nbytes) + ev["test_examples"]["x"].nbytes) / 2**20
        tokens = max(0 if train_seqs is None else train_seqs.size, test_seqs.size)
        print(_memory_report([(model, tokens)], f", oracle labels {labels:,.1f} MiB"))


# ------------------------------------------------------------------------------------------------ helpers


def _sequences(model, args, text=None, max_sequences=None):
    """The text of --text (default WikiText-2 test), tokenized with the model's tokenizer and packed."""
    if args.seq_len > model.config.max_position_embeddings:
        raise RadialError(
            f"--seq-len {args.seq_len} exceeds the model's max_position_embeddings "
            f"{model.config.max_position_embeddings}"
        )
    tok = radial_min.Tokenizer(args.tokenizer or model.path)
    path = text or getattr(args, "text", None) or data.default_text("test")
    ids = _check_vocab(tok.encode(data.read_text(path), source=path), model, tok.source)
    return data.pack(ids, args.seq_len, max_sequences or args.max_sequences, source=path), tok


def _check_vocab(ids, model, tokenizer_file):
    """Token ids the model has embeddings for, or one error naming the tokenizer file that made them."""
    if len(ids) and ids.max() >= model.config.vocab_size:
        raise RadialError(
            f"{tokenizer_file}: the tokenizer gives id {ids.max()}, but the model's vocab_size is "
            f"{model.config.vocab_size}: not this model's tokenizer"
        )
    return ids


def _utf8(text, what):
    """Command-line text as Python got it (bytes that are not UTF-8 arrive as surrogate escapes), checked."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raw = os.fsencode(text)
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RadialError(f"{what} is not valid UTF-8 (byte {raw[e.start]:#04x} at position {e.start})") from None
        raise RadialError(f"{what} has characters that cannot be encoded as UTF-8 (lone surrogates)") from None
    return text


def _check_free(folder, names, overwrite):
    """Refuse to replace results already in `folder` (or anything the project ships) without --overwrite."""
    taken = [n for n in names if (Path(folder) / n).exists()]
    if taken and not overwrite:
        raise RadialError(
            f"--out {folder}: already holds {', '.join(taken)}; pass --overwrite to replace "
            f"{'it' if len(taken) == 1 else 'them'}, or choose another --out"
        )


def _nonempty(folder):
    return Path(folder).is_dir() and any(Path(folder).iterdir()) or Path(folder).is_file()


def _warn(message):
    print(f"warning: {message}", file=sys.stderr)


def _bar(label, unit):
    return lambda items: progress.track(items, label, unit)


def _load(source, kind, weights_dtype="float32"):
    model = radial_min.load(source, weights_dtype=weights_dtype)
    kinds = {"lm": ("opt", "llama", "qwen2")}.get(kind, (kind,))  # "lm": any causal language model
    if kind is not None and model.config.model_type not in kinds:
        article = "an" if model.config.model_type[0] in "aeiou" else "a"
        raise RadialError(
            f"--model {source}: is {article} {model.config.model_type} checkpoint, "
            f"this command needs {' or '.join(kinds)}"
        )
    return model


# ------------------------------------------------------------------------------------------------- parser


def build_parser():
    p = _Parser(prog="cli.py", description="radial_min: Radial Networks on the CPU, in NumPy + Numba")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, help, description=None):
        return sub.add_parser(name, help=help, description=description or help[0].upper() + help[1:] + ".")

    model_help = "checkpoint folder, .gguf file or Hub id (default: the shipped model, weights/opt-kjv-wiki)"
    g = command(
        "generate",
        "continue a prompt with a language model (OPT, Llama, Qwen2; a folder or a .gguf file)",
        "Continue a prompt with a language model (OPT, Llama, Qwen2; a folder or a .gguf file), streaming "
        "the text. Greedy by default; --temperature > 0 samples. With --router, tokens run only the blocks "
        "a trained router chooses.",
    )
    g.add_argument("prompt", nargs="?", default="In the beginning", help="text to continue (default: %(default)r)")
    g.add_argument("--model", default=str(DEFAULT_MODEL), help=model_help)
    g.add_argument(
        "--max-new-tokens",
        type=int,
        default=60,
        help="tokens to generate; stops earlier at EOS or the model's context (default: %(default)s)",
    )
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; higher = more random (default: 0)")
    g.add_argument(
        "--top-k", type=int, default=None, help="with --temperature: sample among the k most likely (default: off)"
    )
    g.add_argument(
        "--top-p",
        type=float,
        default=None,
        help="with --temperature: sample within the smallest set of mass p, nucleus (default: off)",
    )
    g.add_argument(
        "--seed", type=_nonneg_int, default=None, help="random seed for sampling (default: a fresh one each run)"
    )
    g.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.2,
        help="divide the logits of tokens already in the text by this (transformers' rule); 1 = off. "
        "The default 1.2 keeps a small model's greedy text from looping (default: %(default)s)",
    )
    g.add_argument(
        "--quiet", action="store_true", help="print only the new text at the end, no streaming (default: off)"
    )
    g.add_argument("--stats", action="store_true", help="print tokens/s to stderr (default: off)")
    g.add_argument(
        "--weights-dtype",
        choices=STORAGE_DTYPES,
        default="float32",
        help="keep weight matrices in this precision in memory; compute stays float32 (default: %(default)s)",
    )
    g.add_argument(
        "--router",
        default=None,
        help="route tokens with this trained router: a train-router --out folder or a .json/.safetensors "
        "pair (default: none, every block runs)",
    )
    g.add_argument(
        "--max-depth",
        type=_positive_int,
        default=None,
        help="with --router: most blocks a token may run (default: the router's)",
    )
    g.add_argument(
        "--cache-policy",
        choices=POLICIES,
        default=None,
        help=f"with --router: what a query attends to in the unified KV cache (default: {POLICIES[0]})",
    )
    g.add_argument(
        "--step-encoding-scale",
        type=_finite(1e3, low=0.0),  # the range radial.json allows
        default=None,
        help="with --router --cache-policy global: weight of the sinusoidal step codes (default: 1)",
    )
    g.add_argument(
        "--show-depth",
        choices=DEPTH_STYLES,
        default=None,
        help="with --router: mark each token with the blocks that produced it, as a subscript count or "
        "a grey shade (default: auto = shade on a terminal, none when piped)",
    )
    g.set_defaults(func=cmd_generate)

    c = command("classify", "top labels of a ViT classifier for an image file or folder")
    c.add_argument("image", help="PNG/JPEG (needs Pillow) or .npy [H, W(, C)] in 0..255, or a folder of them")
    c.add_argument("--model", required=True, help="ViTForImageClassification folder or Hub id (required)")
    c.add_argument("--top", type=int, default=5, help="labels to show (default: %(default)s)")
    c.set_defaults(func=cmd_classify)

    i = command("info", "parameters, blocks, dtype on disk and memory of a checkpoint")
    i.add_argument("--model", default=str(DEFAULT_MODEL), help=model_help)
    i.set_defaults(func=cmd_info)

    t = command(
        "train",
        "train an OPT from scratch in NumPy (KJV + WikiText-2 by default); resumes if interrupted",
        "Trains a byte-level BPE and an OPT-architecture model on the KJV (every 20th chapter held out) plus "
        "WikiText-2 valid.txt, validating on the held-out KJV and WikiText-2 test.txt (read from "
        "../shared/data when present). State is saved atomically every --save-every steps and on Ctrl-C; "
        "rerun the same command to resume.",
    )
    d = tr.TrainConfig()  # the defaults are the trainer's; the routing options default to None (= not given, see
    # _radial_settings), their values shown from it
    t.add_argument("--out", default=d.out, help="run folder: tokenizer, tokens, state, log (default: %(default)s)")
    t.add_argument(
        "--export",
        default=None,
        help="after training, write a Hugging Face OPT checkpoint to this folder (default: none)",
    )
    t.add_argument("--overwrite", action="store_true", help="replace an existing --export folder (default: off)")
    t.add_argument(
        "--dtype",
        default="float16",
        choices=STORAGE_DTYPES[:2],
        help="dtype of the exported weights (default: %(default)s)",
    )
    for option, field, kind, what in (  # every number of the run, with the trainer's default
        ("--vocab-size", "vocab_size", _positive_int, f"BPE vocabulary, >= {MIN_VOCAB}"),
        ("--hidden-size", "hidden_size", _positive_int, "model width E"),
        ("--layers", "num_hidden_layers", _positive_int, "transformer layers, two blocks each"),
        ("--heads", "num_attention_heads", _positive_int, "attention heads, dividing the width"),
        ("--ffn-dim", None, _positive_int, "FFN width"),
        ("--seq-len", "seq_len", _positive_int, "training context, also the model's max positions"),
        ("--batch-size", "batch_size", _positive_int, "sequences per step"),
        ("--steps", "steps", _positive_int, "optimizer steps"),
        ("--lr", "lr", float, "peak learning rate"),
        ("--warmup", "warmup", _nonneg_int, "linear warm-up steps"),
        ("--weight-decay", "weight_decay", float, "AdamW decay on matrices"),
        ("--grad-clip", "grad_clip", float, "global gradient-norm clip, 0 = off"),
        ("--eval-every", "eval_every", _positive_int, "steps between validation losses"),
        ("--save-every", "save_every", _positive_int, "steps between checkpoints"),
        ("--seed", "seed", _nonneg_int, "seed for init and batches"),
    ):
        default = "4 x hidden size" if field is None else "%(default)s"  # --ffn-dim: None, follows the width
        t.add_argument(option, type=kind, default=field and getattr(d, field), help=f"{what} (default: {default})")
    rad = t.add_argument_group("a Radial Network trained from scratch with its router (--radial; docs/cotraining.md)")
    rad.add_argument(
        "--radial",
        action="store_true",
        help="train the router with the blocks; the export then routes by default (default: off)",
    )
    rad.add_argument(
        "--target-depth",
        type=float,
        default=None,
        help="compute budget: the blocks per token the compute term steers to (default: none)",
    )
    rad.add_argument(
        "--cost",
        type=float,
        default=None,
        help="compute budget instead: a fixed loss per expected block run (default: none)",
    )
    rad.add_argument(
        "--max-depth",
        type=_positive_int,
        default=None,
        help="most blocks a token may run, > 2 x --layers to reuse blocks more (default: 2 x --layers)",
    )
    rad.add_argument(
        "--forward-only",
        action="store_true",
        help="blocks in order, each at most once (default: off, any order, blocks may be reused)",
    )
    rad.add_argument(
        "--cache-policy",
        choices=POLICIES,
        default=None,
        help=f"what attention reads in the unified KV cache (default: {d.cache_policy})",
    )
    rad.add_argument(
        "--step-encoding-scale",
        type=float,
        default=None,
        help=f"global policy: scale of the step encodings added to queries and keys (default: {d.step_encoding_scale})",
    )
    rad.add_argument(
        "--router-hidden",
        type=_positive_int,
        default=None,
        help=f"router hidden units, > 2 x --layers (default: {d.router_hidden})",
    )
    rad.add_argument(
        "--in-order",
        type=float,
        default=None,
        help="the router starts routing the blocks in order with this logit margin, and learns from "
        f"there; 0 = random routes (default: {d.in_order:g})",
    )
    rad.add_argument(
        "--router-warmup",
        type=_nonneg_int,
        default=None,
        help=f"first steps in which only the blocks learn, the router waits (default: {d.router_warmup})",
    )
    rad.add_argument(
        "--router-lr",
        type=float,
        default=None,
        help=f"the router's learning rate as a share of --lr (default: {d.router_lr})",
    )
    rad.add_argument(
        "--cost-rate",
        type=float,
        default=None,
        help=f"with --target-depth: how fast the cost follows it, per step and block of error (default: {d.cost_rate})",
    )
    rad.add_argument(
        "--depth-weight",
        type=float,
        default=None,
        help=f"with --target-depth: weight of (expected blocks - target)^2 in the loss (default: {d.depth_weight})",
    )
    rad.add_argument(
        "--explore",
        type=float,
        default=None,
        help="share of block decisions swapped for another allowed block while training, so the router learns "
        f"about blocks it does not choose (default: {d.explore})",
    )
    t.set_defaults(func=cmd_train)

    def add_text_args(q, max_sequences):
        q.add_argument(
            "--text",
            default=None,
            help="text file to pack (default: ../shared/data/wikitext-2/test.txt, else fetched from the Hub)",
        )
        q.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model's)")
        q.add_argument(
            "--seq-len",
            type=_positive_int,
            default=256,
            help="tokens per packed sequence, batch size 1 (default: %(default)s)",
        )
        q.add_argument(
            "--max-sequences",
            type=_positive_int,
            default=max_sequences,
            help=f"use at most this many sequences (default: {max_sequences or 'all'})",
        )
        q.add_argument(
            "--kind",
            choices=profiling.KINDS,
            default=profiling.KINDS[0],
            help="ratio: ||f||/||x+f|| (output) or ||f||/(||x||+||f||) (sum) (default: %(default)s)",
        )
        q.add_argument("--overwrite", action="store_true", help="replace results already in --out (default: off)")

    def add_stream_arg(q, where):
        q.add_argument(
            "--stream",
            action="store_true",
            help="read each block's weights from the checkpoint just before it runs over all sequences "
            "and free them after (OPT, Llama, Qwen2; safetensors, pytorch_model.bin, GGUF): memory "
            "bounded by the largest blocks and the hidden states, not the model. Run the same command again "
            f"to resume an interrupted run at its block (checkpoints in {where}) (default: off; on by itself "
            "when the model would not fit in memory)",
        )

    pr = command("profile", "residual ratio of every block and token: tables, .npz/CSV/JSON, plots")
    pr.add_argument(
        "--model",
        action="append",
        default=None,
        help="checkpoint folder, .gguf file or Hub id; repeat to compare models (default: the shipped model)",
    )
    add_text_args(pr, None)
    pr.add_argument(
        "--images",
        default=str(SHARED / "images"),
        help="ViT: image file or folder (default: the shared data's images/, ../shared/data/images beside the "
        "checkout or $RADIAL_MIN_DATA/images)",
    )
    pr.add_argument(
        "--generate",
        type=_generate_count,
        default=0,
        help="also profile N >= 2 greedily generated tokens per prompt; the N - 1 fed back are profiled (default: off)",
    )
    pr.add_argument(
        "--generate-prompts",
        type=_positive_int,
        default=8,
        help="prompts for --generate: the first tokens of this many sequences (default: %(default)s)",
    )
    pr.add_argument(
        "--prompt-len", type=_positive_int, default=32, help="prompt length for --generate (default: %(default)s)"
    )
    pr.add_argument(
        "--tau", type=_tau, default=TAU, help="threshold for the trace and depth plots (default: %(default)s)"
    )
    pr.add_argument(
        "--trace-tokens",
        type=_positive_int,
        default=128,
        help="tokens shown in the routing trace (default: %(default)s)",
    )
    pr.add_argument("--out", default="runs/profile", help="output folder (default: %(default)s)")
    add_stream_arg(pr, "<out>/.stream-<model>/")
    pr.set_defaults(func=cmd_profile)

    si = command("simulate", "the oracle: skip blocks with ratio < tau; depth and perplexity over a sweep of tau")
    si.add_argument("--model", default=str(DEFAULT_MODEL), help=model_help)
    add_text_args(si, 32)
    si.add_argument(
        "--taus",
        type=_tau_list,
        default=_tau_list("0,0.01,0.02,0.05,0.1,0.2"),
        help="comma-separated thresholds >= 0 (default: 0,0.01,0.02,0.05,0.1,0.2)",
    )
    si.add_argument(
        "--kv-rule",
        default=",".join(oracle.KV_RULES),
        help=f"keys/values of skipped attention: one or more of {', '.join(oracle.KV_RULES)}, "
        "comma-separated (default: %(default)s)",
    )
    si.add_argument(
        "--trace-tau", type=_tau, default=TAU, help="threshold of the routing-trace plot (default: %(default)s)"
    )
    si.add_argument("--out", default="runs/simulate", help="output folder (default: %(default)s)")
    add_stream_arg(si, "<out>/.stream/")
    si.set_defaults(func=cmd_simulate)

    tr_ = command(
        "train-router",
        "distill a router from the oracle; report its accuracy, depth and perplexity",
        "Labels: the greedy oracle's routes (the next block it runs, or EXIT) on --train-text (default "
        "WikiText-2 valid.txt). Evaluation on --test-text (default test.txt): accuracy against the oracle, "
        "and perplexity against mean blocks per token for router, oracle and static baselines. The router "
        "and its report go to the --out folder.",
    )
    tr_.add_argument("--model", default=str(DEFAULT_MODEL), help=model_help)
    tr_.add_argument(
        "--tau", type=_tau, default=TAU, help="oracle threshold the router imitates (default: %(default)s)"
    )
    tr_.add_argument(
        "--kv-rule",
        choices=oracle.KV_RULES,
        default="drop",
        help="oracle's rule for skipped attention; drop is what routed execution does (default: %(default)s)",
    )
    tr_.add_argument(
        "--kind",
        choices=profiling.KINDS,
        default=profiling.KINDS[0],
        help="residual ratio definition (default: %(default)s)",
    )
    tr_.add_argument("--train-text", default=None, help="text for the labels (default: wikitext-2/valid.txt)")
    tr_.add_argument("--test-text", default=None, help="held-out text (default: wikitext-2/test.txt)")
    tr_.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model's)")
    tr_.add_argument(
        "--seq-len", type=_positive_int, default=256, help="tokens per packed sequence (default: %(default)s)"
    )
    tr_.add_argument(
        "--max-sequences", type=_positive_int, default=64, help="training sequences (default: %(default)s)"
    )
    tr_.add_argument(
        "--test-sequences", type=_positive_int, default=32, help="held-out sequences (default: %(default)s)"
    )
    tr_.add_argument("--hidden", type=_positive_int, default=64, help="router hidden units (default: %(default)s)")
    tr_.add_argument("--max-depth", type=_positive_int, default=None, help="most blocks a token may run (default: all)")
    tr_.add_argument("--epochs", type=_positive_int, default=8, help="passes over the labels (default: %(default)s)")
    tr_.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default: %(default)s)")
    tr_.add_argument("--batch-size", type=_positive_int, default=512, help="decisions per step (default: %(default)s)")
    tr_.add_argument("--seed", type=_nonneg_int, default=0, help="seed (default: %(default)s)")
    tr_.add_argument(
        "--out",
        default=None,
        help="folder for router.json/.safetensors, the report and plots (default: runs/router-tau<tau>)",
    )
    tr_.add_argument(
        "--overwrite", action="store_true", help="replace a router or report already in --out (default: off)"
    )
    tr_.add_argument(
        "--evaluate",
        default=None,
        metavar="ROUTER",
        help="train nothing: evaluate this router (a folder or .json/.safetensors pair) against the "
        "oracle of the tau and rule it records (default: train one)",
    )
    add_stream_arg(tr_, "<out>/.stream/")
    tr_.set_defaults(func=cmd_train_router)
    return p


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def _nonneg_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def _generate_count(text):
    value = int(text)
    if value == 1 or value < 0:
        raise argparse.ArgumentTypeError(
            f"expected 0 (off) or an integer >= 2, got {text}: the last token is never fed back"
        )
    return value


def _finite(bound, low=None):
    """An argparse type: a float in [`low`, `bound`] (default low: -bound; NaN and infinities refused)."""
    low = -bound if low is None else low

    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not low <= value <= bound:
            raise argparse.ArgumentTypeError(f"expected a number between {low:g} and {bound:g}, got {text}")
        return value

    return parse


def _tau(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a threshold >= 0, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite threshold >= 0, got {text}")
    return value


def _tau_list(text):
    return [_tau(t) for t in text.split(",")]


def _one_line(message):
    """The last guard against a forged second `error:` line: control characters from a file or argument escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad option ends like every other error: one `error:` line on stderr and exit code 2."""

    def error(self, message):
        print(f"error: {self.prog}: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


COMPILE_NOTICE = (
    "compiling radial_min's Numba kernels for this machine: once, on the first run after installing "
    "or editing them (cached for later runs) ..."
)


def _compile_notice():
    """The first compile's one line; on a terminal it first clears a progress bar's line, which redraws below."""
    clear = "\r\x1b[K" if sys.stderr.isatty() else ""
    print(clear + COMPILE_NOTICE, file=sys.stderr, flush=True)


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        with kernels.on_first_compile(_compile_notice):
            args.func(args)
    except RadialError as e:  # bad input; anything else is a bug and keeps its traceback
        print(f"error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"\ninterrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader left (`| head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush cannot fail again
        return 141
    return 0


if __name__ == "__main__":
    sys.exit(main())
