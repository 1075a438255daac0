#!/usr/bin/env python
"""radial_min's command line: generate text, classify images, inspect, train, profile and route.

    python cli.py generate "In the beginning"              # the shipped model, offline
    python cli.py generate "Hello" --model facebook/opt-125m --temperature 0.8 --top-p 0.9
    python cli.py classify photo.jpg --model weights/vit-base-patch16-224
    python cli.py info
    python cli.py train --out runs/opt-kjv-wiki --export weights/opt-kjv-wiki

Bad input ends with one line on stderr naming what is wrong, and exit code 2.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np

from radial_min.data import SHARED
from radial_min.errors import RadialError
from radial_min.hub import DEFAULT_MODEL


def cmd_generate(args):
    import radial_min

    model = _load(args.model, "opt")
    tok = radial_min.Tokenizer(model.path)
    ids = tok.encode(args.prompt)
    write = sys.stdout.write
    if not args.quiet:
        write(args.prompt)
        sys.stdout.flush()
    stream = radial_min.tokenizer.Streamer(tok, lambda s: (write(s), sys.stdout.flush()))
    t0 = time.perf_counter()
    new = radial_min.generate(model, ids, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed,
                              on_token=None if args.quiet else stream)  # fmt: skip
    dt = time.perf_counter() - t0
    if args.quiet:
        write(tok.decode(new))
    write("\n")
    if args.stats:
        print(f"[{len(ids)} prompt + {len(new)} new tokens in {dt:.2f} s, {len(new) / dt:.1f} tokens/s]", file=sys.stderr)


def cmd_classify(args):
    from radial_min import images

    model = _load(args.model, "vit")
    settings = images.read_preprocessor(model.path, model.config.image_size)
    for path in images.list_images(args.image):
        pixels = images.preprocess(images.read_image(path), settings)[None]
        out = model.forward(pixels)[0]
        if model.classifier is None:
            print(f"{path}: {args.model} is a ViTModel without a classifier; pooled output has {out.size} features")
            continue
        from radial_min.kernels import softmax_ref

        probs = softmax_ref(out.astype("float64"))
        print(f"{path}:")
        for i in probs.argsort()[::-1][: args.top]:
            print(f"  {probs[i]:7.2%}  {model.config.id2label.get(int(i), str(i))}")


def cmd_info(args):
    import radial_min

    model = radial_min.load(args.model)
    cfg = model.config
    n_bytes = model.n_params * 4
    print(f"model       {model.path}")
    print(f"type        {cfg.model_type}  ({type(model).__name__})")
    print(f"parameters  {model.n_params:,}")
    print(f"on disk     {', '.join(f'{n} tensors {d}' for d, n in sorted(model.dtypes_on_disk.items()))}")
    print(f"in memory   {n_bytes / 2**20:.1f} MiB float32")
    print(f"blocks      {len(model.blocks)} ({model.n_layer} layers x attention + FFN)")
    if cfg.model_type == "opt":
        print(f"width       hidden {cfg.hidden_size}, ffn {cfg.ffn_dim}, heads {cfg.num_attention_heads}, vocab {cfg.vocab_size}")
        print(f"layout      {'pre' if cfg.do_layer_norm_before else 'post'}-LN, {cfg.activation_function}, context {cfg.max_position_embeddings}")
    else:
        print(f"width       hidden {cfg.hidden_size}, mlp {cfg.intermediate_size}, heads {cfg.num_attention_heads}")
        print(f"image       {cfg.image_size}px, patch {cfg.patch_size}, {cfg.num_patches} patches, labels {cfg.num_labels}")


def cmd_train(args):
    from radial_min import train as tr

    cfg = tr.TrainConfig(out=args.out, vocab_size=args.vocab_size, hidden_size=args.hidden_size,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads, ffn_dim=args.ffn_dim or 4 * args.hidden_size,
                         seq_len=args.seq_len, batch_size=args.batch_size, steps=args.steps, lr=args.lr, warmup=args.warmup,
                         weight_decay=args.weight_decay, grad_clip=args.grad_clip, eval_every=args.eval_every,
                         save_every=args.save_every, seed=args.seed)  # fmt: skip
    print(f"preparing corpus and tokenizer in {cfg.out} ...", file=sys.stderr)
    train_ids, val_streams = tr.prepare_corpus(cfg.out, cfg.vocab_size)
    val = {k: tr.validation_sequences(s, cfg.seq_len, cfg.eval_sequences) for k, s in val_streams.items()}
    print(f"train {len(train_ids):,} tokens; validation {', '.join(f'{k} {len(s):,}' for k, s in val_streams.items())}", file=sys.stderr)
    params = tr.train(cfg, train_ids, val)
    if args.export:
        tr.export_checkpoint(params, cfg.model_config(), cfg.out, args.export, args.dtype)
        print(f"exported {args.export}", file=sys.stderr)


def cmd_profile(args):
    from radial_min import images, plots, profiling
    from radial_min.outputs import write_csv, write_json, write_npz

    out = Path(args.out)
    hist, layer_summaries, csv_rows, report = {}, {}, [], {}
    for source in args.model:
        model = _load(source, None)
        label = model.path.name
        names = profiling.block_names(model)
        phases = {}
        if model.config.model_type == "opt":
            seqs, tok = _sequences(model, args)
            phases["prefill"] = profiling.profile_text(model, seqs, args.kind, progress=_bar(f"profile {label}", "seq"))
            if args.generate:
                prompts = [s[: args.prompt_len] for s in seqs[: args.generate_prompts]]
                phases["generation"], _ = profiling.profile_generation(model, prompts, args.generate, args.kind, _bar(f"generate {label}", "prompt"))
        else:
            settings = images.read_preprocessor(model.path, model.config.image_size)
            files = images.list_images(args.images)
            pixels = [images.preprocess(images.read_image(f), settings) for f in files]
            phases["images"] = profiling.profile_images(model, pixels, args.kind, _bar(f"profile {label}", "image"))
        for phase, ratios in phases.items():
            summary = profiling.summarize(ratios, names)
            print(profiling.format_summary(summary, f"\n{label}, {phase}: residual ratio ({args.kind}) over {len(ratios):,} tokens"))
            print(f"overall median {summary['overall']['median']:.4f}")
            report[f"{label}/{phase}"] = summary
            csv_rows += [{"model": label, "phase": phase, "block": b, **s} for b, s in [*summary["blocks"].items(), *((f"all_{k}", v) for k, v in summary["types"].items()), ("overall", summary["overall"])]]
            write_npz(out / f"ratios_{label}_{phase}.npz", ratios=ratios.astype("float32"), blocks=names)
        main_phase = next(iter(phases))
        hist[label], layer_summaries[label] = phases[main_phase], report[f"{label}/{main_phase}"]
        keep = phases[main_phase] >= args.tau  # per block, on the sequential path (the oracle's greedy path: `simulate`)
        plots.routing_trace(keep[: args.trace_tokens], names, out / f"routing_trace_{label}.png", f"{label}, ratio >= {args.tau}")
        plots.depth_histogram({f"{label}, tau={args.tau}": np.bincount(keep.sum(1), minlength=len(names) + 1)}, out / f"depth_hist_{label}.png")
    write_json(out / "summary.json", report)
    write_csv(out / "summary.csv", csv_rows)
    made = [plots.ratio_histogram(hist, out / "ratio_hist.png", args.kind), plots.layer_profile(layer_summaries, out / "layer_profile.png")]
    print(f"\nresults in {out}/" + ("" if all(made) else " (no plots: pip install matplotlib)"))


def cmd_simulate(args):
    from radial_min import oracle, plots, profiling
    from radial_min.outputs import write_csv, write_json

    model = _load(args.model, "opt")
    seqs, _ = _sequences(model, args)
    taus = [float(t) for t in args.taus.split(",")]
    rules = args.kv_rule.split(",")
    for r in rules:
        if r not in oracle.KV_RULES:
            raise RadialError(f"--kv-rule: {r!r} is not one of {', '.join(oracle.KV_RULES)}")
    print(f"{model.path.name}: {len(seqs)} sequences x {seqs.shape[1]} tokens, {len(model.blocks)} blocks", file=sys.stderr)
    res = oracle.sweep(model, seqs, taus, rules, args.kind, progress=_bar("simulate", "seq"))
    n = len(model.blocks)
    head = f"{'rule':<6}{'tau':>6}{'ppl':>10}{'depth':>8}{'min':>5}{'max':>5}{'k':>4}{'static ppl':>12}{'exit ppl':>10}"
    print(head + "\n" + "-" * len(head))
    for row in res["rows"]:
        print(f"{row['rule']:<6}{row['tau']:6.3f}{row['ppl']:10.3f}{row['mean_depth']:8.2f}{row['min_depth']:5d}{row['max_depth']:5d}"
              f"{row['static_k']:4d}{row['static_lowest_ppl']:12.3f}{row['early_exit_ppl']:10.3f}")  # fmt: skip
    print(f"(depth: blocks executed per token, of {n}; k: blocks the static baselines drop for the same mean depth;\n"
          " static: the k blocks of lowest mean ratio; exit: the last k blocks)")  # fmt: skip
    print("skip rate per block at each setting:")
    names = profiling.block_names(model)
    print(f"{'':<12}" + "".join(f"{b:>8}" for b in names))
    for row in res["rows"]:
        print(f"{row['rule']} {row['tau']:<7.3f}" + "".join(f"{s:8.2f}" for s in row["skip_rate"]))
    out = Path(args.out)
    write_json(out / "simulate.json", {"model": str(model.path), "sequences": int(len(seqs)), "seq_len": int(seqs.shape[1]),
                                       "blocks": names, "mean_ratio": res["mean_ratio"], "rows": res["rows"],
                                       "depth_hist": {f"{r}/{t}": h for (r, t), h in res["depth_hist"].items()}})  # fmt: skip
    write_csv(out / "simulate.csv", [{k: v for k, v in r.items() if k not in ("skip_rate", "static_lowest_blocks")} for r in res["rows"]])
    curves = {}
    for rule in rules:
        rows = [r for r in res["rows"] if r["rule"] == rule]
        curves[f"oracle ({rule})"] = ([r["mean_depth"] for r in rows], [r["ppl"] for r in rows])
    fill = [r for r in res["rows"] if r["rule"] == rules[0]]
    curves["static: lowest-ratio blocks"] = ([n - r["static_k"] for r in fill], [r["static_lowest_ppl"] for r in fill])
    curves["static: early exit"] = ([n - r["static_k"] for r in fill], [r["early_exit_ppl"] for r in fill])
    made = plots.ppl_vs_depth(curves, n, out / "ppl_vs_depth.png")
    plots.depth_histogram({f"{r}, tau={t}": h for (r, t), h in res["depth_hist"].items() if t in (args.trace_tau,) or t == max(taus)}, out / "depth_hist.png")
    trace = oracle.simulate(model, seqs[:1], oracle.threshold(args.trace_tau), rules[0], args.kind)
    plots.routing_trace(trace.keep[0], names, out / "routing_trace.png", f"oracle, tau={args.trace_tau}, {rules[0]}")
    print(f"results in {out}/" + ("" if made else " (no plots: pip install matplotlib)"))


def _sequences(model, args):
    """The text of --text (default WikiText-2 test), tokenized with the model's tokenizer and packed."""
    import radial_min
    from radial_min import data

    tok = radial_min.Tokenizer(args.tokenizer or model.path)
    text = data.read_text(args.text or data.default_text("test"))
    ids = tok.encode(text)
    if ids.max() >= model.config.vocab_size:
        raise RadialError(f"--tokenizer: ids up to {ids.max()} but the model's vocab_size is {model.config.vocab_size}")
    return data.pack(ids, args.seq_len, args.max_sequences), tok


def _bar(desc, unit):
    from tqdm import tqdm

    return lambda items: tqdm(items, desc=desc, unit=unit, leave=False, dynamic_ncols=True, disable=None)


def _load(source, kind):
    import radial_min

    model = radial_min.load(source)
    if kind is not None and model.config.model_type != kind:
        raise RadialError(f"--model {source}: is a {model.config.model_type} checkpoint, this command needs {kind}")
    return model


def build_parser():
    p = argparse.ArgumentParser(prog="cli.py", description="radial_min: Radial Networks on the CPU, in NumPy + Numba")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser("generate", help="continue a prompt with an OPT model")
    g.add_argument("prompt", nargs="?", default="In the beginning", help="text to continue (default: %(default)r)")
    g.add_argument("--model", default=str(DEFAULT_MODEL), help="checkpoint folder or Hub id (default: the shipped model)")
    g.add_argument("--max-new-tokens", type=_nonneg_int, default=60, help="tokens to generate (default: %(default)s)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); higher = more random")
    g.add_argument("--top-k", type=int, default=None, help="sample only among the k most likely tokens")
    g.add_argument("--top-p", type=float, default=None, help="sample only within the smallest set of mass p (nucleus)")
    g.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    g.add_argument("--quiet", action="store_true", help="print only the new text at the end, no streaming")
    g.add_argument("--stats", action="store_true", help="print tokens/s to stderr")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("classify", help="top labels of a ViT classifier for an image file or folder")
    c.add_argument("image", help="PNG/JPEG (needs Pillow) or .npy [H, W(, C)] in 0..255, or a folder of them")
    c.add_argument("--model", required=True, help="ViTForImageClassification folder or Hub id")
    c.add_argument("--top", type=int, default=5, help="labels to show (default: %(default)s)")
    c.set_defaults(func=cmd_classify)

    i = sub.add_parser("info", help="parameters, blocks, dtype on disk and memory of a checkpoint")
    i.add_argument("--model", default=str(DEFAULT_MODEL), help="checkpoint folder or Hub id (default: the shipped model)")
    i.set_defaults(func=cmd_info)

    t = sub.add_parser("train", help="train an OPT from scratch in NumPy (KJV + WikiText-2 by default); resumes if interrupted",
                       description="Trains a byte-level BPE and an OPT-architecture model on the KJV (every 20th chapter "
                       "held out) plus WikiText-2 valid.txt, validating on the held-out KJV and WikiText-2 test.txt. "
                       "State is saved atomically every --save-every steps and on Ctrl-C; rerun the same command to resume.")  # fmt: skip
    t.add_argument("--out", default="runs/opt-kjv-wiki", help="run folder: tokenizer, tokens, state, log (default: %(default)s)")
    t.add_argument("--export", default=None, help="after training, write a Hugging Face OPT checkpoint here")
    t.add_argument("--dtype", default="float16", choices=["float32", "float16"], help="dtype of the exported weights")
    t.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary (default: %(default)s)")
    t.add_argument("--hidden-size", type=int, default=256, help="model width E (default: %(default)s)")
    t.add_argument("--layers", type=int, default=6, help="transformer layers, two blocks each (default: %(default)s)")
    t.add_argument("--heads", type=int, default=8, help="attention heads (default: %(default)s)")
    t.add_argument("--ffn-dim", type=int, default=None, help="FFN width (default: 4 x hidden size)")
    t.add_argument("--seq-len", type=int, default=256, help="training context, also the model's max positions (default: %(default)s)")
    t.add_argument("--batch-size", type=int, default=16, help="sequences per step (default: %(default)s)")
    t.add_argument("--steps", type=int, default=1200, help="optimizer steps (default: %(default)s)")
    t.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default: %(default)s)")
    t.add_argument("--warmup", type=int, default=60, help="linear warm-up steps (default: %(default)s)")
    t.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decay on matrices (default: %(default)s)")
    t.add_argument("--grad-clip", type=float, default=1.0, help="global gradient-norm clip, 0 = off (default: %(default)s)")
    t.add_argument("--eval-every", type=int, default=100, help="steps between validation losses (default: %(default)s)")
    t.add_argument("--save-every", type=int, default=50, help="steps between checkpoints (default: %(default)s)")
    t.add_argument("--seed", type=int, default=0, help="seed for init and batches (default: %(default)s)")
    t.set_defaults(func=cmd_train)
    def add_text_args(q, max_sequences):
        q.add_argument("--text", default=None, help="text file to pack (default: ../shared/data/wikitext-2/test.txt, else fetched)")
        q.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model's)")
        q.add_argument("--seq-len", type=int, default=256, help="tokens per packed sequence, batch size 1 (default: %(default)s)")
        q.add_argument("--max-sequences", type=int, default=max_sequences, help="use at most this many sequences (default: %(default)s)")
        q.add_argument("--kind", choices=["output", "sum"], default="output", help="ratio: ||f||/||x+f|| (output) or ||f||/(||x||+||f||) (sum)")

    pr = sub.add_parser("profile", help="residual ratio of every block and token: tables, .npz/CSV/JSON, plots")
    pr.add_argument("--model", action="append", default=None, help="checkpoint folder or Hub id; repeat to compare models (default: the shipped model)")
    add_text_args(pr, None)
    pr.add_argument("--images", default=str(SHARED / "images"), help="ViT: image file or folder (default: %(default)s)")
    pr.add_argument("--generate", type=int, default=0, help="also profile N greedily generated tokens per prompt (default: off)")
    pr.add_argument("--generate-prompts", type=int, default=8, help="prompts for --generate: the first tokens of this many sequences")
    pr.add_argument("--prompt-len", type=int, default=32, help="prompt length for --generate (default: %(default)s)")
    pr.add_argument("--tau", type=float, default=0.05, help="threshold for the trace and depth plots (default: %(default)s)")
    pr.add_argument("--trace-tokens", type=int, default=128, help="tokens shown in the routing trace (default: %(default)s)")
    pr.add_argument("--out", default="runs/profile", help="output folder (default: %(default)s)")
    pr.set_defaults(func=cmd_profile)

    si = sub.add_parser("simulate", help="the oracle: skip blocks with ratio < tau; depth and perplexity over a sweep of tau")
    si.add_argument("--model", default=str(DEFAULT_MODEL), help="checkpoint folder or Hub id (default: the shipped model)")
    add_text_args(si, 32)
    si.add_argument("--taus", default="0,0.01,0.02,0.05,0.1,0.2", help="comma-separated thresholds (default: %(default)s)")
    si.add_argument("--kv-rule", default="fill,drop", help="keys/values of skipped attention: fill, drop or both (default: %(default)s)")
    si.add_argument("--trace-tau", type=float, default=0.05, help="threshold of the routing-trace plot (default: %(default)s)")
    si.add_argument("--out", default="runs/simulate", help="output folder (default: %(default)s)")
    si.set_defaults(func=cmd_simulate)
    return p


def _nonneg_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def main(argv=None):
    args = build_parser().parse_args(argv)
    if getattr(args, "model", "") is None:
        args.model = [str(DEFAULT_MODEL)]
    try:
        args.func(args)
    except (RadialError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"\ninterrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
