"""OPT (Zhang et al., 2022), the decoder the paper profiles: token + learned position embeddings, a list of
residual blocks, a final layer norm and an LM head tied to the token embeddings.

Follow one token: `embed` looks up its row and adds its position's row; each block adds its branch to the
residual stream; `head` normalises and multiplies by the embedding matrix to get one logit per vocabulary entry.
`init_tensors` makes a fresh model's tensors for training (GPT-2's initialisation).
"""

import math

import numpy as np

from ..blocks import AttentionBlock, Embedding, FFNBlock, LayerNorm, Linear
from ..config import OPTConfig
from .base import CausalLM, check_ids, stacked

LN_EPS = 1e-5  # nn.LayerNorm's default; OPT configs do not set it
POSITION_OFFSET = 2  # OPT's learned position table starts at row 2 (a fairseq padding legacy)


def expected_tensors(cfg: OPTConfig) -> tuple[dict, dict, dict]:
    """Tensor shapes by name, (required, optional, accepted but not read), as in the Hub's checkpoints."""
    E, P, F = cfg.hidden_size, cfg.word_embed_proj_dim, cfg.ffn_dim
    req = {
        "decoder.embed_tokens.weight": (cfg.vocab_size, P),
        "decoder.embed_positions.weight": (cfg.max_position_embeddings + POSITION_OFFSET, E),
    }
    if P != E:
        req["decoder.project_in.weight"] = (E, P)
        req["decoder.project_out.weight"] = (P, E)

    def add(prefix, shape, bias: bool, weight: bool = True):
        if weight:
            req[prefix + ".weight"] = shape
        if bias:
            req[prefix + ".bias"] = shape[:1]

    affine = cfg.layer_norm_elementwise_affine
    if cfg.has_final_layer_norm:
        add("decoder.final_layer_norm", (E,), affine, affine)
    for i in range(cfg.num_hidden_layers):
        p = f"decoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            add(p + "self_attn." + proj, (E, E), cfg.enable_bias)
        add(p + "self_attn_layer_norm", (E,), affine, affine)
        add(p + "fc1", (F, E), cfg.enable_bias)
        add(p + "fc2", (E, F), cfg.enable_bias)
        add(p + "final_layer_norm", (E,), affine, affine)
    lm_head = {"lm_head.weight": (cfg.vocab_size, P)}
    if cfg.tie_word_embeddings:
        return req, {}, lm_head  # tied: a stored copy of the embeddings is not read, as transformers ignores it
    return {**req, **lm_head}, {}, {}


def normalize_name(name: str) -> str:
    """Hub OPT repos say `decoder.*`; transformers' save_pretrained says `model.decoder.*`."""
    return name[len("model.") :] if name.startswith("model.") else name


def make_block(cfg: OPTConfig, t: dict, i: int, kind: str):
    """Layer i's attention ("att") or FFN ("ffn") block from tensors `t` (consumed); analysis/stream.py builds one
    block at a time with it."""
    p, pre = f"decoder.layers.{i}.", cfg.do_layer_norm_before
    if kind == "att":
        qkv = stacked(t, [p + f"self_attn.{x}_proj" for x in "qkv"], cfg.enable_bias)
        out = Linear.from_tensors(t, p + "self_attn.out_proj")
        norm = LayerNorm.from_tensors(t, p + "self_attn_layer_norm", LN_EPS)
        return AttentionBlock(i, norm, pre, qkv, out, cfg.num_attention_heads)
    fc1, fc2 = Linear.from_tensors(t, p + "fc1"), Linear.from_tensors(t, p + "fc2")
    norm = LayerNorm.from_tensors(t, p + "final_layer_norm", LN_EPS)
    return FFNBlock(i, norm, pre, fc1, fc2, cfg.activation_function)


def init_tensors(cfg: OPTConfig, seed: int) -> dict:
    """A fresh model's tensors for training, under Hugging Face's names: GPT-2's init, N(0, 0.02) weights, zero
    biases, unit norms, the projections into the residual stream scaled by 1/sqrt(2L) so the stream's variance does
    not grow with depth."""
    rng = np.random.default_rng(seed)
    E, F, L = cfg.hidden_size, cfg.ffn_dim, cfg.num_hidden_layers

    def normal(*shape, std=0.02):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    t = {
        "decoder.embed_tokens.weight": normal(cfg.vocab_size, E),
        "decoder.embed_positions.weight": normal(cfg.max_position_embeddings + POSITION_OFFSET, E, std=0.01),
    }
    if cfg.has_final_layer_norm:  # pre-LN models normalise the stream once more before the head
        t["decoder.final_layer_norm.weight"] = np.ones(E, np.float32)
        t["decoder.final_layer_norm.bias"] = np.zeros(E, np.float32)
    for i in range(L):
        pre = f"decoder.layers.{i}."
        out_std = 0.02 / math.sqrt(2 * L)  # GPT-2's scaled init of the projections into the residual stream
        for name, shape, std in (
            ("self_attn.q_proj", (E, E), 0.02),
            ("self_attn.k_proj", (E, E), 0.02),
            ("self_attn.v_proj", (E, E), 0.02),
            ("self_attn.out_proj", (E, E), out_std),
            ("fc1", (F, E), 0.02),
            ("fc2", (E, F), out_std),
        ):
            t[pre + name + ".weight"] = normal(*shape, std=std)
            t[pre + name + ".bias"] = np.zeros(shape[0], np.float32)
        for norm in ("self_attn_layer_norm", "final_layer_norm"):
            t[pre + norm + ".weight"] = np.ones(E, np.float32)
            t[pre + norm + ".bias"] = np.zeros(E, np.float32)
    return t


class OPT(CausalLM):
    """An OPT causal language model as a list of residual blocks. Built from tensors `t` (consumed)."""

    def __init__(self, cfg: OPTConfig, t: dict, **origin):
        self.embed_tokens = Embedding(t["decoder.embed_tokens.weight"], names=_one("decoder.embed_tokens.weight"))
        self.embed_positions = Embedding(
            t["decoder.embed_positions.weight"], names=_one("decoder.embed_positions.weight")
        )
        self.project_in = Linear.from_tensors(t, "decoder.project_in") if "decoder.project_in.weight" in t else None
        self.project_out = Linear.from_tensors(t, "decoder.project_out") if "decoder.project_out.weight" in t else None
        final = cfg.has_final_layer_norm
        self.final_norm = LayerNorm.from_tensors(t, "decoder.final_layer_norm", LN_EPS) if final else None
        if cfg.tie_word_embeddings:  # the head multiplies by the embedding matrix itself
            self.lm_head = Linear(self.embed_tokens.weight, names=_one("decoder.embed_tokens.weight"))
        else:
            self.lm_head = Linear(t["lm_head.weight"], names=_one("lm_head.weight"))
        blocks = [make_block(cfg, t, i, kind) for i in range(cfg.num_hidden_layers) for kind in ("att", "ffn")]
        super().__init__(cfg, blocks, **origin)

    def embed(self, input_ids, pos, tape=None):
        """Token rows plus position rows. Every path into the blocks (forward, the oracle, routing, training) starts
        here, so ids and positions are checked here."""
        input_ids = check_ids(input_ids, self.config.vocab_size)
        if np.max(pos) >= self.config.max_position_embeddings or np.min(pos) < 0:
            raise ValueError(
                f"positions up to {np.max(pos)} exceed max_position_embeddings {self.config.max_position_embeddings}"
            )
        x = self.embed_tokens(input_ids, tape)  # [n] -> [n, P] (weights may be stored in half)
        if self.project_in is not None:
            x = self.project_in(x, tape)  # [n, P] -> [n, E]
        return x + self.embed_positions(np.asarray(pos) + POSITION_OFFSET, tape)  # [n, E]

    def embed_backward(self, dx, tape):
        self.embed_positions.backward(dx, tape)
        if self.project_in is not None:
            dx = self.project_in.backward(dx, tape)
        self.embed_tokens.backward(dx, tape)

    def final(self, x, tape=None):
        """What the LM head multiplies: the last states normalised (and projected back to the embedding width)."""
        if self.final_norm is not None:
            x = self.final_norm(x, tape)
        if self.project_out is not None:
            x = self.project_out(x, tape)  # [n, E] -> [n, P]
        return x

    def final_backward(self, dx, tape):
        if self.project_out is not None:
            dx = self.project_out.backward(dx, tape)
        return dx if self.final_norm is None else self.final_norm.backward(dx, tape)


def _one(name: str) -> dict:
    return {"weight": [(name, None)]}
