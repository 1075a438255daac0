"""The OPT decoder for training, in NumPy: its parameters under Hugging Face's names, and its forward and backward
(a loop over the residual blocks, then the same loop reversed), the model-level half of backprop.py.

train.py optimizes `loss_and_grads`; radial_train.py routes the same pieces (embedding, blocks, head). Parameters
live in a dict under Hugging Face's names (`decoder.layers.0.fc1.weight`, ...), so the result is saved as a
genuine OPT checkpoint. Only the pre-LN, tied-embedding OPT layout (OPT-125m and up) is trained.
"""

import math

import numpy as np

from . import backprop as bp
from .config import OPTConfig
from .errors import RadialError
from .models.opt import POSITION_OFFSET

# --------------------------------------------------------------------------------------------- parameters


def init_params(cfg: OPTConfig, seed: int) -> dict:
    """GPT-2's init: N(0, 0.02) weights, zero biases, unit norms; projections into the residual stream scaled
    by 1/sqrt(2L) so the stream's variance does not grow with depth."""
    rng = np.random.default_rng(seed)
    E, F, L = cfg.hidden_size, cfg.ffn_dim, cfg.num_hidden_layers

    def normal(*shape, std=0.02):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    p = {
        "decoder.embed_tokens.weight": normal(cfg.vocab_size, E),
        "decoder.embed_positions.weight": normal(cfg.max_position_embeddings + POSITION_OFFSET, E, std=0.01),
    }
    if cfg.has_final_layer_norm:  # pre-LN models normalise the stream once more before the head
        p["decoder.final_layer_norm.weight"] = np.ones(E, np.float32)
        p["decoder.final_layer_norm.bias"] = np.zeros(E, np.float32)
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
            p[pre + name + ".weight"] = normal(*shape, std=std)
            p[pre + name + ".bias"] = np.zeros(shape[0], np.float32)
        for norm in ("self_attn_layer_norm", "final_layer_norm"):
            p[pre + norm + ".weight"] = np.ones(E, np.float32)
            p[pre + norm + ".bias"] = np.zeros(E, np.float32)
    return p


def check_trainable(cfg: OPTConfig):
    if not (
        cfg.enable_bias
        and cfg.tie_word_embeddings
        and cfg.layer_norm_elementwise_affine
        and cfg.word_embed_proj_dim == cfg.hidden_size
        and cfg.activation_function == "relu"
        and cfg.has_final_layer_norm == cfg.do_layer_norm_before
    ):
        raise RadialError("training supports OPT with biases, affine norms, ReLU, tied embeddings and no projections")


# ---------------------------------------------------------------------------------- forward and backward


# Each residual block's weights under the short names backprop's block functions use, and back.
_BLOCK_NAMES = {
    "att": {"ln.w": "self_attn_layer_norm.weight", "ln.b": "self_attn_layer_norm.bias",
            "out.w": "self_attn.out_proj.weight", "out.b": "self_attn.out_proj.bias"},
    "ffn": {"ln.w": "final_layer_norm.weight", "ln.b": "final_layer_norm.bias", "fc1.w": "fc1.weight",
            "fc1.b": "fc1.bias", "fc2.w": "fc2.weight", "fc2.b": "fc2.bias"},
}  # fmt: skip


def blocks_of(cfg: OPTConfig) -> list[tuple[int, str]]:
    """The sequential model's blocks in order, (layer, kind), as OPT.blocks lists them."""
    return [(i, kind) for i in range(cfg.num_hidden_layers) for kind in ("att", "ffn")]


def block_weights(P: dict, layer: int, kind: str) -> dict:
    pre = f"decoder.layers.{layer}."
    w = {short: P[pre + name] for short, name in _BLOCK_NAMES[kind].items()}
    if kind == "att":  # q, k and v projections stacked, as blocks.AttentionBlock holds them: [3E, E]
        w["qkv.w"] = np.concatenate([P[pre + f"self_attn.{c}_proj.weight"] for c in "qkv"])
        w["qkv.b"] = np.concatenate([P[pre + f"self_attn.{c}_proj.bias"] for c in "qkv"])
    return w


def store_block_grads(G: dict, g: dict, layer: int, kind: str) -> None:
    """Add one block's gradients (short names) into G (Hugging Face names); added, so a reused block sums."""
    pre = f"decoder.layers.{layer}."
    named = {pre + name: g[short] for short, name in _BLOCK_NAMES[kind].items()}
    if kind == "att":
        for c, dw, db in zip("qkv", np.split(g["qkv.w"], 3), np.split(g["qkv.b"], 3)):
            named[pre + f"self_attn.{c}_proj.weight"], named[pre + f"self_attn.{c}_proj.bias"] = dw, db
    for name, grad in named.items():
        G[name] = G[name] + grad if name in G else grad


def block_forward(x, w, kind, cfg: OPTConfig, attention):
    if kind == "att":
        return bp.attention_block_forward(x, w, cfg.num_attention_heads, attention, cfg.do_layer_norm_before)
    return bp.ffn_block_forward(x, w, cfg.do_layer_norm_before)


def block_backward(dy, cache, kind):
    return (bp.attention_block_backward if kind == "att" else bp.ffn_block_backward)(dy, cache)


def embed_forward(ids, P):
    """Token rows plus position rows for sequences [B, T] starting at position 0 -> [B, T, E]."""
    return bp.embedding_forward(
        ids, P["decoder.embed_tokens.weight"], P["decoder.embed_positions.weight"], np.arange(ids.shape[1])
    )


def head_forward(x, P):
    """The final layer norm (pre-LN models) and the LM head tied to the token embeddings: [..., E] -> [..., V]."""
    c_lnf = None
    if "decoder.final_layer_norm.weight" in P:
        x, c_lnf = bp.layernorm_forward(x, P["decoder.final_layer_norm.weight"], P["decoder.final_layer_norm.bias"])
    logits, c_lin = bp.linear_forward(x, P["decoder.embed_tokens.weight"])
    return logits, (c_lnf, c_lin)


def head_backward(dlogits, cache, G: dict):
    """-> dx; the head's gradients go into G, the embedding's as the head's share (the lookup adds its own)."""
    c_lnf, c_lin = cache
    dx, G["decoder.embed_tokens.weight"], _ = bp.linear_backward(dlogits, c_lin)
    if c_lnf is not None:
        dx, G["decoder.final_layer_norm.weight"], G["decoder.final_layer_norm.bias"] = bp.layernorm_backward(dx, c_lnf)
    return dx


def embed_backward(dx, cache, P, G: dict) -> None:
    """The token and position lookups' gradients; the token rows add to the tied head's share already in G."""
    dwte, G["decoder.embed_positions.weight"] = bp.embedding_backward(
        dx, cache, P["decoder.embed_tokens.weight"].shape, P["decoder.embed_positions.weight"].shape
    )
    G["decoder.embed_tokens.weight"] = G["decoder.embed_tokens.weight"] + dwte  # tied: head and lookup add up


def loss_and_grads(params: dict, cfg: OPTConfig, batch: np.ndarray, need_grads: bool = True, fast: bool = True):
    """Mean next-token cross-entropy over a batch [B, T + 1] of token ids, and its gradient for every parameter.

    The forward is a loop over the residual blocks and the backward the same loop reversed. `fast` uses the
    Numba attention kernels (float32); the NumPy ones run in any dtype (float64 for checks)."""
    P = params
    attention = bp.ATTENTION_FAST if fast else bp.ATTENTION_NUMPY
    ids, targets = batch[:, :-1], batch[:, 1:]
    B, T = ids.shape
    x, emb_cache = embed_forward(ids, P)  # [B, T] -> [B, T, E]
    caches = []
    for layer, kind in blocks_of(cfg):
        x, cache = block_forward(x, block_weights(P, layer, kind), kind, cfg, attention)  # [B, T, E]
        caches.append(cache)
    logits, c_head = head_forward(x, P)  # [B, T, E] -> [B, T, V]
    loss, c_ce = bp.crossentropy_forward(logits.reshape(B * T, -1), targets.ravel())
    if not need_grads:
        return float(loss), None

    G = {}
    dlogits = bp.crossentropy_backward(c_ce).reshape(B, T, -1)
    dx = head_backward(dlogits, c_head, G)
    for (layer, kind), cache in zip(reversed(blocks_of(cfg)), reversed(caches)):
        dx, g = block_backward(dx, cache, kind)
        store_block_grads(G, g, layer, kind)
    embed_backward(dx, emb_cache, P, G)
    return float(loss), G
