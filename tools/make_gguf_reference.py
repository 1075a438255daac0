"""Build the GGUF parity fixtures in tests/fixtures/gguf/: tiny random-weight Llama and Qwen2 models written with
gguf's own writer (GGUFWriter, the package llama.cpp maintains), in a mix of tensor types (F32, F16, Q8_0, Q4_1),
with a byte-level BPE tokenizer in their `tokenizer.ggml.*` fields; beside each, transformers' outputs from its
own GGUF loading (`from_pretrained(folder, gguf_file=...)`): logits of a prompt, 20 greedy tokens, and the ids
its GGUF tokenizer gives a few texts.

Written as llama.cpp's converter writes: Llama's q/k rows permuted (each head's rotary pairs interleaved),
Qwen2's not (its rotary already pairs halves); every 2-D weight quantized along its rows in blocks of 32.

Dev-only: a Python with torch, transformers, gguf and accelerate. Run from the repo root:

    python tools/make_gguf_reference.py
"""

import json
import shutil
import sys
from importlib.metadata import version
from pathlib import Path

import gguf
import numpy as np
import torch
import transformers
from gguf import GGMLQuantizationType as Q
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "gguf"
VERSIONS = {"torch": torch.__version__, "transformers": transformers.__version__, "gguf": version("gguf")}
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in SmolLM2: unk, BOS, EOS
CORPUS = (
    "The quick brown fox jumps over the lazy dog. A tiny model, written by gguf's own writer, is read by "
    "transformers and by radial_min; the two must agree on every logit and on twenty greedy tokens. "
    "Residual blocks add their branch to the stream: y = x + f(x). 0123456789 and ( ) [ ] { } : ; , . ! ?"
)
TEXTS = ["The lazy dog reads a model.", "y = x + f(x), twenty tokens!", "  two spaces\nand a newline", "caf\u00e9 42"]

# tensor types by role: each GGUF name (after blk.N.) and the types it gets in layers 0, 1, ...
TYPES = {
    "llama": {"attn_q": [Q.Q4_1, Q.Q8_0], "attn_k": [Q.Q8_0, Q.Q4_1], "attn_v": [Q.F16, Q.Q4_1],
              "attn_output": [Q.Q4_1, Q.F32], "ffn_gate": [Q.Q8_0, Q.Q4_1], "ffn_up": [Q.Q4_1, Q.Q8_0],
              "ffn_down": [Q.F32, Q.Q4_1], "token_embd": [Q.Q8_0], "output": [Q.Q4_1]},
    "qwen2": {"attn_q": [Q.Q8_0, Q.Q4_1], "attn_k": [Q.Q4_1, Q.Q8_0], "attn_v": [Q.Q8_0, Q.F32],
              "attn_output": [Q.F16, Q.Q4_1], "ffn_gate": [Q.Q4_1, Q.Q8_0], "ffn_up": [Q.Q8_0, Q.F16],
              "ffn_down": [Q.Q4_1, Q.Q8_0], "token_embd": [Q.Q4_1]},
}  # fmt: skip


def tokenizer(vocab_size):
    """A byte-level BPE (GPT-2's byte alphabet) trained on CORPUS: (tokens, merges) in id order."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([CORPUS] * 4, trainer)
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    merges = json.loads(tok.to_str())["model"]["merges"]
    return tokens, [m if isinstance(m, str) else " ".join(m) for m in merges]


def permute(w, n_head):
    """llama.cpp's convert_hf_to_gguf.py: per head, rows (0, 1, ..., D-1) -> (0, D/2, 1, D/2+1, ...)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def weights(cfg, rng):
    """Random O(1) weights by GGUF name, in transformers' layout: [out, in] (norms near 1, biases ~0.2)."""
    E, F, H, Hkv, V = cfg["hidden"], cfg["ffn"], cfg["heads"], cfg["kv_heads"], cfg["vocab"]
    D = E // H

    def mat(rows, cols):
        return (rng.standard_normal((rows, cols)) * 1.5 / np.sqrt(cols)).astype(np.float32)

    embed_scale = 0.3 if cfg["tied"] else 1.0  # tied: a smaller own-token term in the logits, or greedy repeats it
    t = {
        "token_embd.weight": (embed_scale * rng.standard_normal((V, E))).astype(np.float32),
        "output_norm.weight": (1 + 0.2 * rng.standard_normal(E)).astype(np.float32),
    }
    if not cfg["tied"]:
        t["output.weight"] = mat(V, E)
    for i in range(cfg["layers"]):
        p = f"blk.{i}."
        t |= {
            p + "attn_norm.weight": (1 + 0.2 * rng.standard_normal(E)).astype(np.float32),
            p + "attn_q.weight": mat(H * D, E),
            p + "attn_k.weight": mat(Hkv * D, E),
            p + "attn_v.weight": mat(Hkv * D, E),
            p + "attn_output.weight": mat(E, H * D),
            p + "ffn_norm.weight": (1 + 0.2 * rng.standard_normal(E)).astype(np.float32),
            p + "ffn_gate.weight": mat(F, E),
            p + "ffn_up.weight": mat(F, E),
            p + "ffn_down.weight": mat(E, F),
        }
        if cfg["arch"] == "qwen2":
            for x, n in (("q", H * D), ("k", Hkv * D), ("v", Hkv * D)):
                t[p + f"attn_{x}.bias"] = (0.2 * rng.standard_normal(n)).astype(np.float32)
    return t


def write(path, cfg, seed):
    arch, H, Hkv = cfg["arch"], cfg["heads"], cfg["kv_heads"]
    tokens, merges = tokenizer(cfg["vocab"])
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"radial_min test fixture {path.stem}")
    w.add_block_count(cfg["layers"])
    w.add_context_length(cfg["context"])
    w.add_embedding_length(cfg["hidden"])
    w.add_feed_forward_length(cfg["ffn"])
    w.add_head_count(H)
    w.add_head_count_kv(Hkv)
    w.add_rope_dimension_count(cfg["hidden"] // H)
    w.add_rope_freq_base(cfg["theta"])
    w.add_layer_norm_rms_eps(cfg["eps"])
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIAL else 1 for t in tokens])  # 3: control (special) tokens
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(cfg["add_bos"])
    types = TYPES[arch]
    for name, a in weights(cfg, np.random.default_rng(seed)).items():
        parts = name.split(".")
        role, layer = (parts[2], int(parts[1])) if parts[0] == "blk" else (parts[0], 0)
        if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            a = permute(a, H if role == "attn_q" else Hkv)
        qtype = types[role][layer % len(types[role])] if role in types and parts[-1] == "weight" else Q.F32
        if qtype == Q.F32:
            w.add_tensor(name, a)
        elif qtype == Q.F16:
            w.add_tensor(name, a.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def reference(path, seed, vocab):
    """transformers' float32 logits, 20 greedy tokens (EOS ignored) and tokenizer ids, from the file alone."""
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    ids = [1] + np.random.default_rng(seed).integers(3, vocab, size=11).tolist()
    with torch.no_grad():
        logits = model(torch.tensor(ids)[None]).logits[0].numpy()
        model.generation_config.eos_token_id = None
        greedy = model.generate(torch.tensor(ids)[None], max_new_tokens=20, do_sample=False)[0, len(ids) :].numpy()
    ref = {"input_ids": np.array(ids), "logits": logits, "greedy": greedy, "texts": np.array(TEXTS)}
    for i, text in enumerate(TEXTS):
        ref[f"text_ids_{i}"] = np.array(tok(text).input_ids, np.int64)  # with BOS if the file says add_bos_token
    types = sorted({str(p.dtype) for p in model.parameters()})
    print(
        f"{path.name}: {model.config.model_type}, tied {model.config.tie_word_embeddings}, params {types}; "
        f"greedy {greedy.tolist()}; {TEXTS[0]!r} -> {ref['text_ids_0'].tolist()}"
    )
    return ref


def make(name, seed, **cfg):
    base = dict(vocab=320, hidden=64, ffn=96, heads=4, kv_heads=2, layers=2, context=128, eps=1e-5, add_bos=False)
    cfg = {**base, **cfg}
    path = OUT / f"{name}.gguf"
    write(path, cfg, seed)
    ref = reference(path, seed, cfg["vocab"])
    np.savez(OUT / f"{name}.npz", **ref, **{f"version_{k}": v for k, v in VERSIONS.items()})
    print(f"  {path.stat().st_size:,} + {(OUT / f'{name}.npz').stat().st_size:,} bytes")


def main():
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    make("llama-gqa-untied", 21, arch="llama", tied=False, theta=50000.0)
    make("qwen2-bias-tied", 22, arch="qwen2", tied=True, theta=1e6, kv_heads=1, add_bos=True)


if __name__ == "__main__":
    sys.exit(main())
