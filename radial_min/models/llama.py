"""Llama (Touvron et al., 2023) and Qwen2: token embeddings, a list of residual blocks, a final RMSNorm and an LM
head (tied to the embeddings in SmolLM2, separate in most others).

The same two residual blocks as OPT, with three differences inside them: RMSNorm instead of LayerNorm, rotary
position embeddings applied to queries and keys (no position table), grouped-query attention (fewer key/value heads
than query heads) and a gated FFN, fc2(silu(gate(x)) * up(x)). Qwen2 adds biases to the q, k and v projections.
Follow one token: `embed` looks up its row; each block adds its branch; `head` normalises and projects to logits.
"""

import math

import numpy as np

from ..blocks import AttentionBlock, Embedding, FFNBlock, Linear, RMSNorm, Rotary
from ..config import LlamaConfig
from .base import CausalLM, check_ids, stacked


def expected_tensors(cfg: LlamaConfig) -> tuple[dict, dict, dict]:
    """Tensor shapes by name, (required, optional, accepted but not read), as transformers saves them."""
    E, F, D = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    Q, KV = cfg.num_attention_heads * D, cfg.num_key_value_heads * D
    req = {"embed_tokens.weight": (cfg.vocab_size, E), "norm.weight": (E,)}
    for i in range(cfg.num_hidden_layers):
        p = f"layers.{i}."
        projections = (
            ("q", (Q, E), cfg.qkv_bias),
            ("k", (KV, E), cfg.qkv_bias),
            ("v", (KV, E), cfg.qkv_bias),
            ("o", (E, Q), cfg.attention_bias and cfg.model_type == "llama"),
        )
        for name, shape, bias in projections:
            req[p + f"self_attn.{name}_proj.weight"] = shape
            if bias:
                req[p + f"self_attn.{name}_proj.bias"] = shape[:1]
        for name, shape in (("gate", (F, E)), ("up", (F, E)), ("down", (E, F))):
            req[p + f"mlp.{name}_proj.weight"] = shape
            if cfg.mlp_bias:
                req[p + f"mlp.{name}_proj.bias"] = shape[:1]
        req[p + "input_layernorm.weight"] = (E,)
        req[p + "post_attention_layernorm.weight"] = (E,)
    lm_head = {"lm_head.weight": (cfg.vocab_size, E)}
    if cfg.tie_word_embeddings:
        return req, {}, lm_head  # tied: a stored copy is not read, as transformers ignores it
    return {**req, **lm_head}, {}, {}


def normalize_name(name: str) -> str:
    """transformers saves `model.layers.*`, `model.norm.*` and a bare `lm_head.weight`."""
    return name[len("model.") :] if name.startswith("model.") else name


def make_block(cfg: LlamaConfig, t: dict, i: int, kind: str):
    """Layer i's attention ("att") or FFN ("ffn") block from tensors `t` (consumed); analysis/stream.py builds one
    block at a time with it."""
    p = f"layers.{i}."
    if kind == "att":
        qkv = stacked(t, [p + f"self_attn.{x}_proj" for x in "qkv"], cfg.qkv_bias)  # [H*D + 2*Hkv*D, E]
        out = Linear.from_tensors(t, p + "self_attn.o_proj")
        norm = _rmsnorm(t, p + "input_layernorm", cfg.rms_norm_eps)
        rotary = Rotary(cfg.head_dim, float(cfg.rope_theta))
        return AttentionBlock(i, norm, True, qkv, out, cfg.num_attention_heads, cfg.num_key_value_heads, rotary)
    up, gate, down = (Linear.from_tensors(t, p + f"mlp.{x}_proj") for x in ("up", "gate", "down"))
    norm = _rmsnorm(t, p + "post_attention_layernorm", cfg.rms_norm_eps)
    return FFNBlock(i, norm, True, up, down, cfg.hidden_act, gate=gate)


def _rmsnorm(t, prefix, eps):
    return RMSNorm(t[prefix + ".weight"], eps, names={"weight": [(prefix + ".weight", None)]})


def init_tensors(cfg: LlamaConfig, seed: int) -> dict:
    """A fresh model's tensors for training, under transformers' names: N(0, 0.02) weights (the output and down
    projections, which write into the residual stream, scaled by 1/sqrt(2L) as GPT-2 does), zero biases, unit
    norms."""
    rng = np.random.default_rng(seed)
    E, F, L, D = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.head_dim
    Q, KV = cfg.num_attention_heads * D, cfg.num_key_value_heads * D

    def normal(*shape, std=0.02):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    t = {"embed_tokens.weight": normal(cfg.vocab_size, E), "norm.weight": np.ones(E, np.float32)}
    out_std = 0.02 / math.sqrt(2 * L)
    for i in range(L):
        p = f"layers.{i}."
        for name, shape, std in (
            ("self_attn.q_proj", (Q, E), 0.02),
            ("self_attn.k_proj", (KV, E), 0.02),
            ("self_attn.v_proj", (KV, E), 0.02),
            ("self_attn.o_proj", (E, Q), out_std),
            ("mlp.gate_proj", (F, E), 0.02),
            ("mlp.up_proj", (F, E), 0.02),
            ("mlp.down_proj", (E, F), out_std),
        ):
            t[p + name + ".weight"] = normal(*shape, std=std)
        if cfg.qkv_bias:
            for x, n in (("q", Q), ("k", KV), ("v", KV)):
                t[p + f"self_attn.{x}_proj.bias"] = np.zeros(n, np.float32)
        t[p + "input_layernorm.weight"] = np.ones(E, np.float32)
        t[p + "post_attention_layernorm.weight"] = np.ones(E, np.float32)
    if not cfg.tie_word_embeddings:
        t["lm_head.weight"] = normal(cfg.vocab_size, E)
    return t


class Llama(CausalLM):
    """A Llama or Qwen2 causal language model as a list of residual blocks. Built from tensors `t` (consumed)."""

    def __init__(self, cfg: LlamaConfig, t: dict, **origin):
        self.embed_tokens = Embedding(t["embed_tokens.weight"], names={"weight": [("embed_tokens.weight", None)]})
        self.final_norm = _rmsnorm(t, "norm", cfg.rms_norm_eps)
        head = "embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
        self.lm_head = Linear(
            self.embed_tokens.weight if cfg.tie_word_embeddings else t[head], names={"weight": [(head, None)]}
        )
        blocks = [make_block(cfg, t, i, kind) for i in range(cfg.num_hidden_layers) for kind in ("att", "ffn")]
        super().__init__(cfg, blocks, **origin)

    def embed(self, input_ids, pos, tape=None):
        """Token rows; positions enter inside attention (rotary), so `pos` is only checked here."""
        input_ids = check_ids(input_ids, self.config.vocab_size)
        if np.min(pos) < 0:
            raise ValueError(f"positions must be >= 0, got {np.min(pos)}")
        return self.embed_tokens(input_ids, tape)  # [n] -> [n, E]

    def embed_backward(self, dx, tape):
        self.embed_tokens.backward(dx, tape)

    def final(self, x, tape=None):
        """What the LM head multiplies: the last states normalised."""
        return self.final_norm(x, tape)

    def final_backward(self, dx, tape):
        return self.final_norm.backward(dx, tape)

    @property
    def kv_heads(self) -> tuple[int, int]:
        """(heads, head size) of the keys and values a cache stores: Hkv heads under grouped-query attention."""
        return self.config.num_key_value_heads, self.config.head_dim
