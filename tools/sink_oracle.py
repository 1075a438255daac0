"""The first token and the oracle: does skipping blocks for the first token of a sequence (the attention sink of
Xiao et al., 2023) explain what the `drop` rule costs? For each tau, the plain oracle beside an oracle that makes
the first token of every sequence run every block (its keys and values stay visible to every later token), both
on the same packed sequences; and the first token's residual ratios and residual-stream norm against the rest.

    python tools/sink_oracle.py --model <model folder or .gguf> --taus 0.05,0.1,0.15 --max-sequences 8
"""

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import radial_min  # noqa: E402
from radial_min import data
from radial_min.analysis import oracle  # noqa: E402
from radial_min.errors import count  # noqa: E402


def first_token_runs_all(tau):
    """The oracle at tau, except that position 0 keeps every block."""
    return lambda b, rows, r: (r >= tau) | (rows == 0)


class StreamNorms:
    """An observer: the norm of the residual stream entering each block, per token: rows() -> [tokens, blocks]."""

    def __init__(self):
        self.chunks = []

    def begin(self, x):
        self.chunks.append([])

    def __call__(self, i, block, x, f, y):
        self.chunks[-1].append(np.linalg.norm(x.astype(np.float64), axis=-1))

    def rows(self):
        return np.concatenate([np.stack(c, 1) for c in self.chunks])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model folder or .gguf file")
    p.add_argument("--taus", default="0.05,0.1,0.15", help="comma-separated thresholds (default: %(default)s)")
    p.add_argument("--kv-rule", default="drop,fill", help="rules, comma-separated (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--max-sequences", type=int, default=8)
    args = p.parse_args(argv)
    model, tok = radial_min.load(args.model), radial_min.Tokenizer(args.model)
    seqs = data.pack(tok.encode(data.read_text(data.default_text("test"))), args.seq_len, args.max_sequences)
    T = seqs.shape[1]
    print(
        f"{model.path.name}: {count(len(seqs), 'sequence')} x {T} tokens of WikiText-2 test, {len(model.blocks)} blocks"
    )

    norms = StreamNorms()
    full = oracle.simulate(model, seqs, oracle.threshold(0.0))
    for s in seqs:
        model.forward(s, observe=norms)
    ratios, stream = full.ratios.reshape(len(seqs), T, -1), norms.rows().reshape(len(seqs), T, -1)
    for name, sel in (("first token", np.s_[:, 0]), ("other tokens", np.s_[:, 1:])):
        r, n = ratios[sel], stream[sel]
        print(
            f"{name:<13} median ratio {np.median(r):.3f} (att {np.median(r[..., 0::2]):.3f}, ffn "
            f"{np.median(r[..., 1::2]):.3f}); median norm of the stream entering blocks 2..: "
            f"{np.median(n[..., 2:]):,.0f}"
        )
    print(f"sequential perplexity {full.ppl:.3f}\n")
    print(
        f"{'rule':<6}{'tau':>6}{'oracle ppl':>12}{'depth':>8}{'first token':>13}   "
        f"{'first token runs all: ppl':>26}{'depth':>8}"
    )
    for rule in args.kv_rule.split(","):
        for tau in map(float, args.taus.split(",")):
            plain = oracle.simulate(model, seqs, oracle.threshold(tau), rule)
            sink = oracle.simulate(model, seqs, first_token_runs_all(tau), rule)
            print(
                f"{rule:<6}{tau:6.3f}{plain.ppl:12.3f}{plain.depth.mean():8.2f}"
                f"{plain.keep[:, 0].sum(-1).mean():8.1f} run   {sink.ppl:26.3f}{sink.depth.mean():8.2f}"
            )


if __name__ == "__main__":
    sys.exit(main())
