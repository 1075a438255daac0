"""The architectures radial_min runs, by config.json's `model_type`: the one registry that config parsing, loading
(io/loading.py), streaming (analysis/stream.py), training (train.py) and the CLI read.

Each architecture's module says which tensors a checkpoint must hold (`expected_tensors`), how its names are
spelled (`normalize_name`), how one block is built from them (`make_block`) and, for the trainable ones, how a fresh
model's tensors are drawn (`init_tensors`); its class is the model (models/base.py has the protocol).
"""

from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from ..config import LlamaConfig, OPTConfig, ViTConfig, config_from_dict
from ..errors import CheckpointError, count
from ..io.gguf_file import is_gguf
from ..io.outputs import present, read_json
from . import llama, opt, vit


@dataclass(frozen=True)
class Architecture:
    name: str  # config.json's model_type
    config: type  # its config dataclass (config.py)
    module: ModuleType  # expected_tensors, normalize_name, make_block (and init_tensors if trainable)
    model: type  # the model class
    language_model: bool  # a causal LM (generate, train, profile text) or an image encoder (classify)
    hf_class: str  # the transformers class a saved checkpoint names in config.json's "architectures"
    layer_prefix: str = ""  # tensor names of layer i start with layer_prefix.format(i) (streaming reads by block)
    block_parts: dict | None = None  # {"att": name starts, "ffn": ...} after the layer prefix: each block's tensors


_OPT_PARTS = {"att": ("self_attn.", "self_attn_layer_norm."), "ffn": ("fc1.", "fc2.", "final_layer_norm.")}
_LLAMA_PARTS = {"att": ("self_attn.", "input_layernorm."), "ffn": ("mlp.", "post_attention_layernorm.")}
ARCHITECTURES = {
    "opt": Architecture("opt", OPTConfig, opt, opt.OPT, True, "OPTForCausalLM", "decoder.layers.{}.", _OPT_PARTS),
    "llama": Architecture(
        "llama", LlamaConfig, llama, llama.Llama, True, "LlamaForCausalLM", "layers.{}.", _LLAMA_PARTS
    ),
    "qwen2": Architecture(
        "qwen2", LlamaConfig, llama, llama.Llama, True, "Qwen2ForCausalLM", "layers.{}.", _LLAMA_PARTS
    ),
    "vit": Architecture("vit", ViTConfig, vit, vit.ViT, False, "ViTModel"),
}


def architecture(model_type, source: str = "config.json") -> Architecture:
    if not isinstance(model_type, str) or model_type not in ARCHITECTURES:
        shown = repr(model_type) if len(repr(model_type)) <= 40 else repr(model_type)[:37] + "..."
        raise CheckpointError(
            f"{source}: model_type {shown} is not supported (expected one of {sorted(ARCHITECTURES)})"
        )
    return ARCHITECTURES[model_type]


def parse_config(d: dict, source: str = "config.json"):
    """The config dataclass of a parsed config.json, for the architecture its model_type names."""
    return config_from_dict(d, architecture(d.get("model_type"), source).config, source)


def read_config(folder):
    path = Path(folder) / "config.json"
    if not present(path, CheckpointError):  # a FIFO or folder of that name is refused by name
        raise CheckpointError(f"{path}: not found (a checkpoint folder needs config.json beside its weights)")
    return parse_config(read_json(path, CheckpointError), str(path))


def describe(model) -> str:
    """What `cli.py info` prints: where a model comes from, its size, its shape, and a Radial Network's routing."""
    cfg, base = model.config, getattr(model, "model", model)  # a Radial Network: its model's files and layers
    on_disk = ", ".join(count(n, "tensor") + " " + d for d, n in sorted(base.dtypes_on_disk.items()))
    lines = [
        f"model       {model.path}",
        f"type        {cfg.model_type}  ({type(model).__name__})",
        f"parameters  {model.n_params:,}",
        f"on disk     {on_disk}",
        *_gguf_file_line(base),
        f"in memory   {model.n_params * 4 / 2**20:.1f} MiB float32",
        f"blocks      {len(model.blocks)} ({count(base.n_layer, 'layer')} x attention + FFN)",
    ]
    if cfg.model_type == "opt":
        lines += [
            f"width       hidden {cfg.hidden_size}, ffn {cfg.ffn_dim}, heads {cfg.num_attention_heads}, "
            f"vocab {cfg.vocab_size}",
            f"layout      {'pre' if cfg.do_layer_norm_before else 'post'}-LN, {cfg.activation_function}, "
            f"context {cfg.max_position_embeddings}",
        ]
    elif cfg.model_type in ("llama", "qwen2"):
        lines += [
            f"width       hidden {cfg.hidden_size}, ffn {cfg.intermediate_size} (SwiGLU), "
            f"heads {cfg.num_attention_heads} ({cfg.num_key_value_heads} key/value), vocab {cfg.vocab_size}",
            f"layout      RMSNorm, rotary theta {cfg.rope_theta:g}, "
            f"{'tied' if cfg.tie_word_embeddings else 'untied'} head, context {cfg.max_position_embeddings}"
            f"{', qkv biases' if cfg.qkv_bias else ''}",
        ]
    else:
        lines += [
            f"width       hidden {cfg.hidden_size}, mlp {cfg.intermediate_size}, heads {cfg.num_attention_heads}",
            f"image       {cfg.image_size}px, patch {cfg.patch_size}, {count(cfg.num_patches, 'patch', 'patches')}, "
            f"labels {cfg.num_labels}",
        ]
    if model is not base:  # trained with its router: the router and the routing settings
        rc = model.router.config
        order = "forward only" if rc.forward_only else "any order, blocks reusable"
        steps = f", step encodings x{model.step_encoding_scale:g}" if model.cache_policy == "global" else ""
        lines += [
            f"routing     co-trained router ({rc.hidden} hidden units), {order}, max depth {model.max_depth}",
            f"KV cache    unified, {model.cache_policy} policy{steps}",
        ]
    return "\n".join(lines)


def _gguf_file_line(model):
    """A .gguf file's size and llama.cpp's name for its quantization mix (general.file_type), as one line."""
    if not is_gguf(model.path):
        return []
    kind = model.file_type
    try:
        import gguf

        name = f" ({gguf.LlamaFileType(kind).name})"
    except (ImportError, ValueError, TypeError):
        name = ""
    described = "not given" if kind is None else f"{kind}{name}"
    return [f"file        GGUF, {model.path.stat().st_size / 2**20:.1f} MiB, general.file_type {described}"]
