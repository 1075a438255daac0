"""Model configs: the fields of a Hugging Face `config.json` that change the computation, as dataclasses.

Unknown fields are ignored (Hub configs carry many training-only ones); fields we do not support with the value
given (an activation we have no kernel for, say) are refused by name rather than silently computed wrong.
"""
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

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


# Hub spellings that differ from our field names.
_RENAMES = {"_remove_final_layer_norm": "remove_final_layer_norm", "torch_dtype": "dtype"}
_ACTIVATIONS = {"relu", "gelu"}


def config_from_dict(d: dict, source: str = "config.json"):
    """Build an OPTConfig or ViTConfig from a parsed config.json, refusing what we cannot compute."""
    model_type = d.get("model_type")
    classes = {"opt": OPTConfig, "vit": ViTConfig}
    if model_type not in classes:
        raise CheckpointError(f"{source}: model_type {model_type!r} is not supported (expected 'opt' or 'vit')")
    cls = classes[model_type]
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in d.items():
        key = _RENAMES.get(key, key)
        if key in names and value is not None:
            kwargs[key] = value
    kwargs["dtype"] = str(kwargs.get("dtype", "float32")).replace("torch.", "")
    if "id2label" in kwargs:
        kwargs["id2label"] = {int(k): v for k, v in kwargs["id2label"].items()}
    try:
        cfg = cls(**kwargs)
    except TypeError as e:
        raise CheckpointError(f"{source}: {e}") from None
    _check(cfg, source)
    return cfg


def _check(cfg, source):
    act = cfg.activation_function if isinstance(cfg, OPTConfig) else cfg.hidden_act
    if act not in _ACTIVATIONS:
        raise CheckpointError(f"{source}: activation {act!r} is not supported (expected one of {sorted(_ACTIVATIONS)})")
    if cfg.hidden_size % cfg.num_attention_heads:
        raise CheckpointError(
            f"{source}: hidden_size {cfg.hidden_size} is not divisible by num_attention_heads {cfg.num_attention_heads}"
        )
    if isinstance(cfg, ViTConfig):
        if cfg.image_size % cfg.patch_size:
            raise CheckpointError(f"{source}: image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
        if cfg.pooler_act != "tanh":
            raise CheckpointError(f"{source}: pooler_act {cfg.pooler_act!r} is not supported (expected 'tanh')")


def read_config(folder: Path):
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: not found (a checkpoint folder needs config.json beside its weights)")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return config_from_dict(d, str(path))


def config_to_dict(cfg) -> dict:
    """A Hugging Face-compatible config.json for `cfg` (used when we save the models we train)."""
    d = dataclasses.asdict(cfg)
    if isinstance(cfg, OPTConfig):
        d["_remove_final_layer_norm"] = d.pop("remove_final_layer_norm")
        d["architectures"] = ["OPTForCausalLM"]
    d["torch_dtype"] = d["dtype"]
    return d
