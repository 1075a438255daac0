"""Llama (Touvron et al., 2023) and Qwen2: token embeddings, a list of residual blocks, a final RMSNorm and an LM
head (tied to the embeddings in SmolLM2, separate in most others).

The same two residual blocks as OPT, with three differences inside them: RMSNorm instead of LayerNorm, rotary
position embeddings applied to queries and keys (no position table), grouped-query attention (fewer key/value heads
than query heads) and a gated FFN, fc2(silu(gate(x)) * up(x)). Qwen2 adds biases to the q, k and v projections.
Follow one token: `embed` looks up its row; each block adds its branch; `head` normalises and projects to logits.
"""

import numpy as np

from .. import kernels
from ..blocks import AttentionBlock, FFNBlock, Linear, RMSNorm, Rotary
from ..cache import KVCache
from ..config import LlamaConfig
from ..dtypes import stack_rows
from .opt import OPT, _check_ids


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
    """Layer i's attention ("att") or FFN ("ffn") block from tensors `t` (consumed); `stream.py` builds one block
    at a time with it."""
    p = f"layers.{i}."
    if kind == "att":
        qkv = Linear(  # q, k, v stacked: [H*D + 2*Hkv*D, E]; popped, so the separate copies are freed (peak memory)
            stack_rows([t.pop(p + f"self_attn.{x}_proj.weight") for x in "qkv"]),
            np.concatenate([t.pop(p + f"self_attn.{x}_proj.bias") for x in "qkv"]) if cfg.qkv_bias else None,
        )
        out = Linear.from_tensors(t, p + "self_attn.o_proj")
        norm = RMSNorm(t[p + "input_layernorm.weight"], cfg.rms_norm_eps)
        rotary = Rotary(cfg.head_dim, float(cfg.rope_theta))
        return AttentionBlock(i, norm, True, qkv, out, cfg.num_attention_heads, cfg.num_key_value_heads, rotary)
    up, gate, down = (Linear.from_tensors(t, p + f"mlp.{x}_proj") for x in ("up", "gate", "down"))
    norm = RMSNorm(t[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
    return FFNBlock(i, norm, True, up, down, cfg.hidden_act, gate=gate)


class Llama:
    """A Llama or Qwen2 causal language model as a list of residual blocks. Built from tensors `t` (consumed)."""

    def __init__(self, cfg: LlamaConfig, t: dict):
        self.config = cfg
        self.n_layer = cfg.num_hidden_layers
        self.embed_tokens = t["embed_tokens.weight"]  # [V, E]
        self.final_norm = RMSNorm(t["norm.weight"], cfg.rms_norm_eps)
        self.lm_head = self.embed_tokens if cfg.tie_word_embeddings else t["lm_head.weight"]
        self.blocks = [make_block(cfg, t, i, kind) for i in range(self.n_layer) for kind in ("att", "ffn")]

    # --------------------------------------------------------------------------------------------- pieces

    def embed(self, input_ids, pos):
        """Token rows; positions enter inside attention (rotary), so `pos` is only checked here."""
        input_ids = _check_ids(input_ids, self.config.vocab_size)
        if np.min(pos) < 0:
            raise ValueError(f"positions must be >= 0, got {np.min(pos)}")
        return kernels.to_float32(self.embed_tokens[input_ids])  # [T] -> [T, E]

    def final(self, x):
        """What the LM head multiplies: the last states normalised."""
        return self.final_norm(x)

    def head(self, x):
        return kernels.linear(self.final(x), self.lm_head)  # [T, E] -> [T, V]

    @property
    def kv_shape(self) -> tuple[int, int]:
        """(width, heads) of the keys and values a cache stores: Hkv heads under grouped-query attention."""
        return self.config.num_key_value_heads * self.config.head_dim, self.config.num_key_value_heads

    def new_cache(self) -> KVCache:
        return KVCache(self.n_layer, *self.kv_shape)

    # -------------------------------------------------------------------------------------------- forward

    forward = OPT.forward  # the same walk: embed, every block in order over the cache, head
    __call__ = forward
