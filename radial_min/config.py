"""Model configs: the fields of a Hugging Face `config.json` that change the computation, as dataclasses.

Unknown fields are ignored (Hub configs carry many training-only ones); fields we do not support with the value
given (an activation we have no kernel for, say) are refused by name rather than silently computed wrong.
"""

import dataclasses
import math
from dataclasses import dataclass, field

from .errors import CheckpointError


@dataclass
class OPTConfig:
    vocab_size: int = 50272
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    ffn_dim: int = 3072
    max_position_embeddings: int = 2048
    word_embed_proj_dim: int | None = None  # OPT-350m: 512 with hidden_size 1024 (project_in / project_out)
    do_layer_norm_before: bool = True  # False: post-LN, as in OPT-350m
    remove_final_layer_norm: bool = False  # `_remove_final_layer_norm` in old fine-tuned checkpoints
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    activation_function: str = "relu"
    tie_word_embeddings: bool = True
    pad_token_id: int = 1
    bos_token_id: int = 2
    eos_token_id: int = 2
    dtype: str = "float32"  # as declared (`torch_dtype` or `dtype`); the tensors' own dtypes are what we read
    model_type: str = "opt"

    def __post_init__(self):
        if self.word_embed_proj_dim is None:
            self.word_embed_proj_dim = self.hidden_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def has_final_layer_norm(self) -> bool:
        return self.do_layer_norm_before and not self.remove_final_layer_norm


@dataclass
class ViTConfig:
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    qkv_bias: bool = True
    pooler_act: str = "tanh"
    pooler_output_size: int | None = None  # defaults to hidden_size
    id2label: dict = field(default_factory=dict)
    architectures: list = field(default_factory=list)
    dtype: str = "float32"
    model_type: str = "vit"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def __post_init__(self):
        if self.pooler_output_size is None:
            self.pooler_output_size = self.hidden_size

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def is_classifier(self) -> bool:
        return "ViTForImageClassification" in self.architectures

    @property
    def num_labels(self) -> int:
        return len(self.id2label)


@dataclass
class LlamaConfig:
    """Llama (SmolLM2, TinyLlama, Llama 3.2) and Qwen2, which is Llama with biases on the q, k and v projections."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # grouped-query attention; None: as many as the query heads
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0  # transformers 5 writes it inside `rope_parameters`
    attention_bias: bool = False  # qwen2: always True (q, k, v; never o)
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    dtype: str = "float32"
    model_type: str = "llama"

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and isinstance(self.hidden_size, int) and isinstance(self.num_attention_heads, int):
            self.head_dim = self.hidden_size // max(self.num_attention_heads, 1)

    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias or self.model_type == "qwen2"


_LLAMA_INTS = {
    "vocab_size": 1 << 22,
    "hidden_size": 1 << 16,
    "intermediate_size": 1 << 18,
    "num_hidden_layers": 1024,
    "num_attention_heads": 1024,
    "num_key_value_heads": 1024,
    "head_dim": 1 << 12,
    "max_position_embeddings": 1 << 24,
}  # upper bounds, as in FIELDS below


def _llama_fields(d: dict, source: str) -> dict:
    """Flatten transformers 5's `rope_parameters` and refuse what changes the computation and is not implemented."""
    d = dict(d)
    for key in ("rope_parameters", "rope_scaling"):
        rope = d.pop(key, None)
        if rope is None:
            continue
        if not isinstance(rope, dict):
            raise CheckpointError(f"{source}: {key} must be an object, got {_shown(rope)}")
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind != "default":
            raise CheckpointError(
                f"{source}: {key} of type {_shown(kind)} is not supported (only plain rotary, rope_type 'default')"
            )
        if "rope_theta" in rope:
            d["rope_theta"] = rope["rope_theta"]
    if d.get("use_sliding_window"):
        raise CheckpointError(f"{source}: use_sliding_window true is not supported (full attention only)")
    if d.get("pretraining_tp", 1) != 1:
        raise CheckpointError(f"{source}: pretraining_tp {d['pretraining_tp']} is not supported (expected 1)")
    if isinstance(d.get("eos_token_id"), list):  # several stop tokens: we stop at the first listed
        d["eos_token_id"] = d["eos_token_id"][0] if d["eos_token_id"] else None
    return d


def _check_llama(cfg: LlamaConfig, source: str):
    for name, high in _LLAMA_INTS.items():
        v = getattr(cfg, name)
        if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= high:
            raise CheckpointError(f"{source}: {name} must be a positive integer up to {high}, got {_shown(v)}")
    for name in ("rms_norm_eps", "rope_theta"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf"):
            raise CheckpointError(f"{source}: {name} must be a positive number, got {_shown(v)}")
    for name in ("attention_bias", "mlp_bias", "tie_word_embeddings"):
        if not isinstance(getattr(cfg, name), bool):
            raise CheckpointError(f"{source}: {name} must be true or false, got {_shown(getattr(cfg, name))}")
    for name in ("bos_token_id", "eos_token_id"):
        v = getattr(cfg, name)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < cfg.vocab_size):
            raise CheckpointError(f"{source}: {name} must be a token id in [0, {cfg.vocab_size}), got {_shown(v)}")
    if cfg.hidden_act != "silu":
        raise CheckpointError(f"{source}: hidden_act {_shown(cfg.hidden_act)} is not supported (expected 'silu')")
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise CheckpointError(
            f"{source}: num_attention_heads {cfg.num_attention_heads} is not a multiple of "
            f"num_key_value_heads {cfg.num_key_value_heads}"
        )
    if cfg.head_dim % 2:
        raise CheckpointError(f"{source}: head_dim {cfg.head_dim} must be even (rotary embeddings rotate pairs)")


# Hub spellings that differ from our field names.
_RENAMES = {"_remove_final_layer_norm": "remove_final_layer_norm", "torch_dtype": "dtype"}
_ACTIVATIONS = {"relu", "gelu"}

# Every field we read, with its type and range: (kind, low, high) for numbers, (kind,) otherwise. The upper bounds
# are generous (several times the largest public model of each family) but finite, so a hostile config.json cannot
# make us allocate or loop without end before its tensors are even looked at.
_SIZE, _VOCAB, _TOKEN_ID = (int, 1, 1 << 16), (int, 1, 1 << 22), (int, -1, 1 << 22)
FIELDS = {
    OPTConfig: {
        "vocab_size": _VOCAB,
        "hidden_size": _SIZE,
        "num_hidden_layers": (int, 1, 1024),
        "num_attention_heads": (int, 1, 1024),
        "ffn_dim": (int, 1, 1 << 18),
        "max_position_embeddings": (int, 1, 1 << 20),
        "word_embed_proj_dim": _SIZE,
        "do_layer_norm_before": (bool,),
        "remove_final_layer_norm": (bool,),
        "enable_bias": (bool,),
        "layer_norm_elementwise_affine": (bool,),
        "activation_function": (str,),
        "tie_word_embeddings": (bool,),
        "pad_token_id": _TOKEN_ID,
        "bos_token_id": _TOKEN_ID,
        "eos_token_id": _TOKEN_ID,
        "dtype": (str,),
        "model_type": (str,),
    },
    ViTConfig: {
        "hidden_size": _SIZE,
        "num_hidden_layers": (int, 1, 1024),
        "num_attention_heads": (int, 1, 1024),
        "intermediate_size": (int, 1, 1 << 18),
        "hidden_act": (str,),
        "layer_norm_eps": (float, 1e-30, 1.0),
        "image_size": (int, 1, 4096),
        "patch_size": (int, 1, 4096),
        "num_channels": (int, 1, 16),
        "qkv_bias": (bool,),
        "pooler_act": (str,),
        "pooler_output_size": _SIZE,
        "id2label": (dict,),
        "architectures": (list,),
        "dtype": (str,),
        "model_type": (str,),
    },
}
_KIND_NAMES = {
    int: "an integer",
    float: "a number",
    bool: "true or false",
    str: "a string",
    dict: "an object",
    list: "a list",
}


def check_field(source: str, name: str, value, kind, low=None, high=None):
    """One config.json field, checked for type (JSON's: true is not 1, "1" is not 1) and range; returns it as
    `kind`. Shared by every config class (OPT, ViT, Llama): `FIELDS` lists each class's (kind, low, high)."""
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    else:
        ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    if not ok:
        raise CheckpointError(f"{source}: field {name!r} is {_shown(value)}, expected {_KIND_NAMES[kind]}")
    if low is not None and not low <= value <= high:
        raise CheckpointError(f"{source}: field {name!r} is {value}, expected {low} to {high}")
    return float(value) if kind is float else value


def _shown(value) -> str:
    """A file-supplied value in a message: repr (escapes newlines and terminal codes), cut to 40 characters."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def config_from_dict(d: dict, cls, source: str = "config.json"):
    """Build config class `cls` (the architecture registry, models.ARCHITECTURES, says which) from a parsed
    config.json, refusing what we cannot compute."""
    if cls is LlamaConfig:
        return _llama_from_dict(d, source)
    kwargs = {}
    for key, value in d.items():
        key = _RENAMES.get(key, key)
        if key not in FIELDS[cls] or _null(source, key, value, cls):
            continue
        if key == "dtype" and isinstance(value, str):
            value = value.replace("torch.", "")
        kwargs[key] = check_field(source, key, value, *FIELDS[cls][key])
    if "id2label" in kwargs:
        kwargs["id2label"] = _labels(kwargs["id2label"], source)
    if "architectures" in kwargs and not all(isinstance(a, str) for a in kwargs["architectures"]):
        raise CheckpointError(f"{source}: field 'architectures' must be a list of strings")
    if cls is OPTConfig:  # a null token id: none (transformers keeps None; our -1 matches no token)
        kwargs.update({k: _NO_TOKEN for k in ("pad_token_id", "bos_token_id", "eos_token_id") if d.get(k, 0) is None})
    cfg = cls(**kwargs)
    _check(cfg, source)
    return cfg


def _llama_from_dict(d: dict, source: str):
    """LlamaConfig's fields, checked by _llama_fields and _check_llama."""
    d = _llama_fields(d, source)
    names = {f.name for f in dataclasses.fields(LlamaConfig)}
    kwargs = {}
    for key, value in d.items():
        key = _RENAMES.get(key, key)
        if key in names and not _null(source, key, value, LlamaConfig):
            kwargs[key] = value
    kwargs["dtype"] = str(kwargs.get("dtype", "float32")).replace("torch.", "")
    try:
        cfg = LlamaConfig(**kwargs)
    except TypeError as e:
        raise CheckpointError(f"{source}: {e}") from None
    _check_llama(cfg, source)
    return cfg


# Fields a config.json may set to null: the ones whose null means something (a width that follows hidden_size, no
# BOS/EOS token) or that are informational. Any other null is refused by name: transformers would keep the None
# and fail (or compute something else) later, and taking our default instead would be a silent guess.
NULLABLE = {
    OPTConfig: {"word_embed_proj_dim", "dtype", "pad_token_id", "bos_token_id", "eos_token_id"},
    ViTConfig: {"pooler_output_size", "dtype", "architectures", "id2label"},
    LlamaConfig: {"num_key_value_heads", "head_dim", "bos_token_id", "eos_token_id", "dtype"},
}
_NO_TOKEN = -1  # an OPT token id given as null: no such token (EOS never stops generation, as in transformers)


def _null(source: str, key: str, value, cls) -> bool:
    """Whether a field is null and so skipped (its default applies, see NULLABLE); a null that may not be, refused."""
    if value is not None:
        return False
    if key not in NULLABLE[cls]:
        raise CheckpointError(f"{source}: field {key!r} is null, expected a value (a null would be a guess)")
    return True


def _labels(id2label: dict, source: str) -> dict:
    try:
        labels = {int(k): v for k, v in id2label.items()}
    except ValueError:
        raise CheckpointError(f"{source}: field 'id2label' must map integer strings to labels") from None
    if not all(isinstance(v, str) for v in labels.values()) or len(labels) > 1 << 20:
        raise CheckpointError(f"{source}: field 'id2label' must map class numbers to label strings")
    if sorted(labels) != list(range(len(labels))):
        raise CheckpointError(f"{source}: field 'id2label' must number its classes 0 to {len(labels) - 1}")
    return labels


def _check(cfg, source):
    act = cfg.activation_function if isinstance(cfg, OPTConfig) else cfg.hidden_act
    if act not in _ACTIVATIONS:
        raise CheckpointError(
            f"{source}: activation {_shown(act)} is not supported (expected one of {sorted(_ACTIVATIONS)})"
        )
    if cfg.hidden_size % cfg.num_attention_heads:
        raise CheckpointError(
            f"{source}: hidden_size {cfg.hidden_size} is not divisible by num_attention_heads {cfg.num_attention_heads}"
        )
    if isinstance(cfg, OPTConfig):
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            v = getattr(cfg, name)
            if not _NO_TOKEN <= v < cfg.vocab_size:
                raise CheckpointError(
                    f"{source}: field {name!r} is {v}, expected a token id below vocab_size {cfg.vocab_size} (or -1)"
                )
    if isinstance(cfg, ViTConfig):
        if cfg.image_size % cfg.patch_size:
            raise CheckpointError(
                f"{source}: image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}"
            )
        if cfg.pooler_act != "tanh":
            raise CheckpointError(f"{source}: pooler_act {_shown(cfg.pooler_act)} is not supported (expected 'tanh')")


def config_to_dict(cfg) -> dict:
    """A Hugging Face-compatible config.json for `cfg` (used when we save the models we train)."""
    d = dataclasses.asdict(cfg)
    if isinstance(cfg, OPTConfig):
        d["_remove_final_layer_norm"] = d.pop("remove_final_layer_norm")
        d["architectures"] = ["OPTForCausalLM"]
    d["torch_dtype"] = d["dtype"]
    return d
