"""OPT (Zhang et al., 2022), the decoder the paper profiles: token + learned position embeddings, a list of
residual blocks, a final layer norm and an LM head tied to the token embeddings.

Follow one token: `embed` looks up its row and adds its position's row; each block adds its branch to the
residual stream; `head` normalises and multiplies by the embedding matrix to get one logit per vocabulary entry.
"""

import numpy as np

from .. import kernels
from ..blocks import AttentionBlock, FFNBlock, LayerNorm, Linear, Step, run_blocks
from ..cache import KVCache
from ..dtypes import stack_rows
from ..config import OPTConfig

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
    """Layer i's attention ("att") or FFN ("ffn") block from tensors `t` (consumed); `stream.py` builds one block
    at a time with it."""
    p, pre = f"decoder.layers.{i}.", cfg.do_layer_norm_before
    if kind == "att":
        qkv = Linear(  # popped: the separate copies are freed as the stacked one is made (peak memory)
            stack_rows([t.pop(p + f"self_attn.{x}_proj.weight") for x in "qkv"]),
            np.concatenate([t.pop(p + f"self_attn.{x}_proj.bias") for x in "qkv"]) if cfg.enable_bias else None,
        )
        out = Linear.from_tensors(t, p + "self_attn.out_proj")
        norm = LayerNorm.from_tensors(t, p + "self_attn_layer_norm", LN_EPS)
        return AttentionBlock(i, norm, pre, qkv, out, cfg.num_attention_heads)
    fc1, fc2 = Linear.from_tensors(t, p + "fc1"), Linear.from_tensors(t, p + "fc2")
    norm = LayerNorm.from_tensors(t, p + "final_layer_norm", LN_EPS)
    return FFNBlock(i, norm, pre, fc1, fc2, cfg.activation_function)


class OPT:
    """An OPT causal language model as a list of residual blocks. Built from tensors `t` (consumed)."""

    def __init__(self, cfg: OPTConfig, t: dict):
        self.config = cfg
        self.n_layer = cfg.num_hidden_layers
        self.embed_tokens = t["decoder.embed_tokens.weight"]  # [V, P]; also the LM head (tied)
        self.embed_positions = t["decoder.embed_positions.weight"]  # [max_pos + 2, E]
        self.project_in = Linear(t["decoder.project_in.weight"]) if "decoder.project_in.weight" in t else None
        self.project_out = Linear(t["decoder.project_out.weight"]) if "decoder.project_out.weight" in t else None
        final = cfg.has_final_layer_norm
        self.final_norm = LayerNorm.from_tensors(t, "decoder.final_layer_norm", LN_EPS) if final else None
        self.lm_head = self.embed_tokens if cfg.tie_word_embeddings else t["lm_head.weight"]
        self.blocks = [make_block(cfg, t, i, kind) for i in range(self.n_layer) for kind in ("att", "ffn")]

    # --------------------------------------------------------------------------------------------- pieces

    def embed(self, input_ids, pos):
        """Token rows plus position rows. Every path into the blocks (forward, the oracle, routing) starts here,
        so ids and positions are checked here."""
        input_ids = _check_ids(input_ids, self.config.vocab_size)
        if np.max(pos) >= self.config.max_position_embeddings or np.min(pos) < 0:
            raise ValueError(
                f"positions up to {np.max(pos)} exceed max_position_embeddings {self.config.max_position_embeddings}"
            )
        x = kernels.to_float32(self.embed_tokens[input_ids])  # [T] -> [T, P] (weights may be stored in half)
        if self.project_in is not None:
            x = self.project_in(x)  # [T, P] -> [T, E]
        return x + self.embed_positions[pos + POSITION_OFFSET]  # [T, E]

    def final(self, x):
        """What the LM head multiplies: the last states normalised (and projected back to the embedding width)."""
        if self.final_norm is not None:
            x = self.final_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)  # [T, E] -> [T, P]
        return x

    def head(self, x):
        return kernels.linear(self.final(x), self.lm_head)  # [T, E] -> [T, V]

    @property
    def kv_shape(self) -> tuple[int, int]:
        """(width, heads) of the keys and values a cache stores."""
        return self.config.hidden_size, self.config.num_attention_heads

    def new_cache(self) -> KVCache:
        return KVCache(self.n_layer, self.config.hidden_size, self.config.num_attention_heads)

    # -------------------------------------------------------------------------------------------- forward

    def forward(self, input_ids, cache: KVCache | None = None, last_only: bool = False, observe=None):
        """Logits for each of `input_ids` ([T] ints) -> [T, V] float32, or [1, V] with `last_only`.

        With a cache the tokens continue the cached ones (prefill, then one token at a time); without, they are
        a whole sequence starting at position 0. `observe(i, block, x, f, y)` sees every block's input, branch
        and output; it is only called when given, so profiling costs nothing otherwise.
        """
        start = cache.n_tokens if cache is not None else 0
        pos = np.arange(start, start + len(np.atleast_1d(input_ids)))
        x = self.embed(input_ids, pos)  # [T] -> [T, E]
        x = run_blocks(self.blocks, x, Step(pos, cache), observe)
        if cache is not None:
            cache.n_tokens += len(pos)
        return self.head(x[-1:] if last_only else x)

    __call__ = forward


def _check_ids(input_ids, vocab_size):
    ids = np.asarray(input_ids)
    if ids.ndim != 1 or ids.size == 0 or ids.dtype.kind not in "iu":
        raise ValueError(f"input_ids must be a non-empty 1-D integer array, got shape {ids.shape} dtype {ids.dtype}")
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise ValueError(f"input_ids must lie in [0, {vocab_size}), got min {ids.min()} max {ids.max()}")
    return ids.astype(np.int64)
