"""What every language model here is: the protocol the walk, the generator, the analysis and the trainer rely on.

A `CausalLM` is a list of residual blocks (blocks.py) between an embedding and a head, its parameters held in
modules under the names Hugging Face gives them (`decoder.layers.0.fc1.weight`, `model.layers.0.mlp.up_proj.weight`),
so a trained model is saved as a genuine checkpoint and a checkpoint loads as a trainable model. Subclasses (OPT,
Llama) define `embed`, `final` and the tensors they are built from; everything else is here:

    embed(ids, pos, tape) -> x [n, E]        and embed_backward(dx, tape)
    blocks                                   the residual blocks, in order
    head(x, tape) -> logits [n, V]           and head_backward(dlogits, tape) -> dx
    forward(ids, cache, last_only, observe, tape)   the sequential model: the Radial Network with the in-order router
    backward(dlogits, tape)                  gradients into `grad` of every module (zero_grad first)
    new_cache(batch, train)                  a KV cache for it (cache.py)
    named_parameters() / gradients()         {Hugging Face name: array}, views into the modules' arrays

and what loading tells it: `path` (its folder or file), `weights_dtype` (in memory), `dtypes_on_disk`, `file_type`
(a GGUF's quantization mix), `generation_defaults` (generation_config.json's) and `load_seconds`.
"""

from collections import Counter
from pathlib import Path

import numpy as np

from ..blocks import Linear, Module
from ..dtypes import stack_rows
from ..radial import RadialNetwork


class Model:
    """What every model holds: its config, its blocks, where it was loaded from, its parameters."""

    def __init__(
        self,
        config,
        blocks,
        *,
        path=None,
        weights_dtype="float32",
        dtypes_on_disk=None,
        file_type=None,
        generation_defaults=None,
        load_seconds=0.0,
    ):
        self.config, self.blocks = config, blocks
        self.n_layer = config.num_hidden_layers
        self.path = None if path is None else Path(path)
        self.weights_dtype, self.file_type = weights_dtype, file_type
        self.dtypes_on_disk = Counter(dtypes_on_disk or {})
        self.generation_defaults = generation_defaults or {}  # generation_config.json's (generation.py)
        self.load_seconds = load_seconds  # how long `load` took to read it
        self.kv_dtype = "float32"  # the precision of an inference KV cache's keys and values (cache.KV_DTYPES)
        self.sequential = RadialNetwork(self, keep_routes=False)  # every block in order: the one walk, in order

    def modules(self) -> list:
        """Every module with parameters: the embedding side, each block's, the head side."""
        out = [m for m in vars(self).values() if isinstance(m, Module)]
        return out + [m for block in self.blocks for m in block.modules()]

    def _named(self, of_grad: bool) -> dict:
        named = {}
        for m in self.modules():
            source = m.grad if of_grad else m.params()
            for attr, places in m.names.items():
                for name, rows in places:
                    if name not in named and attr in source:
                        named[name] = source[attr] if rows is None else source[attr][rows]
        return named

    def named_parameters(self) -> dict:
        """{Hugging Face name: array}: views into the modules' arrays (q, k, v are rows of the stacked qkv), so an
        optimizer's in-place updates are the model's."""
        return self._named(False)

    def gradients(self) -> dict:
        """{Hugging Face name: gradient} after `backward` (views, as `named_parameters`)."""
        return self._named(True)

    def zero_grad(self):
        """A zero gradient array per parameter array, shared where modules share an array (a head tied to the
        embedding), so both add into one."""
        by_array = {}
        for m in self.modules():
            for attr, a in m.params().items():
                m.grad[attr] = by_array.setdefault(id(a), np.zeros(a.shape, a.dtype))

    def flush_grads(self):
        """Add the gradients the Linear modules deferred (one GEMM each for the whole step)."""
        for m in self.modules():
            m.flush()

    def arrays(self) -> list:
        """Every array holding the parameters, once each (a tied head is its embedding), an Int8Matrix as its values
        and scales: what the weights take in memory."""
        held = {}
        for m in self.modules():
            for a in m.params().values():
                for part in (a.q, a.scale) if hasattr(a, "scale") else (a,):
                    held[id(part)] = part
        return list(held.values())

    @property
    def n_params(self) -> int:
        """Parameters, each shared array counted once."""
        return sum({id(a): a.size for m in self.modules() for a in m.params().values()}.values())


class CausalLM(Model):
    """A causal language model as a list of residual blocks; see the module doc for the protocol."""

    def forward(self, input_ids, cache=None, last_only=False, observe=None, tape=None):
        """Logits for `input_ids` ([T] ints, or [B, T]) -> [T, V] float32 ([B * T, V]), or [1, V] with `last_only`.

        With a cache the tokens continue the cached ones (prefill, then one token at a time); without, they are
        a whole sequence starting at position 0. `observe(i, block, x, f, y)` sees every block's input, branch
        and output; it is only called when given, so profiling costs nothing otherwise. With a `tape` (a list)
        the forward keeps what `backward` needs."""
        return self.sequential.forward(input_ids, cache, last_only, observe, tape)

    __call__ = forward

    def backward(self, dlogits, tape):
        self.sequential.backward(dlogits, tape)

    def new_cache(self, batch: int = 1, train: bool = False):
        return self.sequential.new_cache(batch, train)

    def head(self, x, tape=None):
        return self.lm_head(self.final(x, tape), tape)  # [n, E] -> [n, V]

    def head_backward(self, dlogits, tape):
        return self.final_backward(self.lm_head.backward(dlogits, tape), tape)

    @property
    def kv_heads(self) -> tuple[int, int]:
        """(heads, head size) of the keys and values a cache stores."""
        return self.config.num_attention_heads, self.config.hidden_size // self.config.num_attention_heads


def check_ids(input_ids, vocab_size):
    """Token ids as a non-empty 1-D int64 array inside the vocabulary, or a ValueError saying what is wrong."""
    ids = np.asarray(input_ids)
    if ids.ndim != 1 or ids.size == 0 or ids.dtype.kind not in "iu":
        raise ValueError(f"input_ids must be a non-empty 1-D integer array, got shape {ids.shape} dtype {ids.dtype}")
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise ValueError(f"input_ids must lie in [0, {vocab_size}), got min {ids.min()} max {ids.max()}")
    return ids.astype(np.int64)


def stacked(t: dict, prefixes: list, bias: bool) -> Linear:
    """One Linear of several projections stacked by rows (q, k and v), popped from t so that the separate copies are
    freed as the stacked one is made (peak memory); each projection's name points at its rows."""
    weights = [t.pop(p + ".weight") for p in prefixes]
    ends = np.cumsum([w.shape[0] for w in weights])
    rows = [slice(int(e - w.shape[0]), int(e)) for e, w in zip(ends, weights)]
    names = {"weight": [(p + ".weight", r) for p, r in zip(prefixes, rows)]}
    b = None
    if bias:
        b = np.concatenate([t.pop(p + ".bias") for p in prefixes])
        names["bias"] = [(p + ".bias", r) for p, r in zip(prefixes, rows)]
    return Linear(stack_rows(weights), b, names=names)
