"""int8 with one scale per row against one scale per group of a row: the shipped model's WikiText-2 test perplexity
(the full stream in 256-token sequences, as docs/training.md scores it) with its weight matrices rounded each way
and computed in float32 (docs/performance.md, "int8 weights"). About 5 minutes per row of the table on 2 cores.

    python tools/int8_groups.py [--groups 128,64,32]
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import radial_min  # noqa: E402
from radial_min import data  # noqa: E402
from radial_min.blocks import Linear  # noqa: E402
from radial_min.dtypes import Int8Matrix  # noqa: E402
from radial_min.analysis.oracle import perplexity  # noqa: E402


def rounded(w, group):
    """w as int8 would hold it: per row, or per group of `group` weights of a row (each group a row of its own)."""
    rows = w if group is None else w.reshape(-1, group)
    return Int8Matrix.quantize(rows).dequantize().reshape(w.shape)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--groups", default="128", help="group sizes to try besides one scale per row (default: 128)")
    args = p.parse_args()
    model = radial_min.load(radial_min.io.hub.DEFAULT_MODEL)
    tok = radial_min.Tokenizer(model.path)
    seqs = data.pack(data.tokenize_documents(tok, data.default_corpus()[1]["wiki"]), 256)
    linears = [part for block in model.blocks for part in vars(block).values() if isinstance(part, Linear)]
    weights, embedding = [lin.weight for lin in linears], model.embed_tokens
    base = perplexity(model, seqs)
    print(f"{'weights':<40}{'perplexity':>12}{'vs float32':>12}\n{'float32':<40}{base:12.3f}")
    for group in [None] + [int(g) for g in args.groups.split(",")]:
        for lin, w in zip(linears, weights):
            lin.weight = rounded(w, group)
        model.embed_tokens = model.lm_head = rounded(embedding, group)
        ppl = perplexity(model, seqs)
        label = "int8, one scale per row" if group is None else f"int8, one scale per {group} weights of a row"
        print(f"{label:<40}{ppl:12.3f}{100 * (ppl / base - 1):+11.3f}%")


if __name__ == "__main__":
    main()
