"""ViT (Dosovitskiy et al., 2021), the encoder the paper also profiles: an image cut into patches, each patch a
token, a learned CLS token in front, then the same residual blocks as OPT (pre-LN, GELU, full attention).
"""

import numpy as np

from ..blocks import AttentionBlock, FFNBlock, LayerNorm, Linear
from ..config import ViTConfig
from .base import Model, stacked


def expected_tensors(cfg: ViTConfig) -> tuple[dict, dict, dict]:
    """Tensor shapes by name, (required, optional, accepted but not read), in the Hub's layout without `vit.`."""
    E, I, C, P = cfg.hidden_size, cfg.intermediate_size, cfg.num_channels, cfg.patch_size
    req = {
        "embeddings.cls_token": (1, 1, E),
        "embeddings.position_embeddings": (1, cfg.num_patches + 1, E),
        "embeddings.patch_embeddings.projection.weight": (E, C, P, P),
        "embeddings.patch_embeddings.projection.bias": (E,),
        "layernorm.weight": (E,),
        "layernorm.bias": (E,),
    }
    for i in range(cfg.num_hidden_layers):
        p = f"encoder.layer.{i}."
        for x in ("query", "key", "value"):
            req[p + f"attention.attention.{x}.weight"] = (E, E)
            if cfg.qkv_bias:
                req[p + f"attention.attention.{x}.bias"] = (E,)
        req.update({
            p + "attention.output.dense.weight": (E, E), p + "attention.output.dense.bias": (E,),
            p + "intermediate.dense.weight": (I, E), p + "intermediate.dense.bias": (I,),
            p + "output.dense.weight": (E, I), p + "output.dense.bias": (E,),
            p + "layernorm_before.weight": (E,), p + "layernorm_before.bias": (E,),
            p + "layernorm_after.weight": (E,), p + "layernorm_after.bias": (E,),
        })  # fmt: skip
    optional, unused = {}, {"embeddings.mask_token": (1, 1, E)}  # mask_token: masked-image pre-training only
    if cfg.is_classifier:
        req["classifier.weight"] = (cfg.num_labels, E)
        req["classifier.bias"] = (cfg.num_labels,)
    else:
        optional.update(
            {"pooler.dense.weight": (cfg.pooler_output_size, E), "pooler.dense.bias": (cfg.pooler_output_size,)}
        )
    return req, optional, unused


def normalize_name(name: str) -> str:
    """ViTForImageClassification keeps its backbone under `vit.`; a bare ViTModel has no prefix."""
    return name[len("vit.") :] if name.startswith("vit.") else name


class ViT(Model):
    """ViTForImageClassification (logits over id2label) or ViTModel (tanh pooler output, or the CLS state).
    Built from tensors `t` (consumed)."""

    def __init__(self, cfg: ViTConfig, t: dict, **origin):
        self.cls_token = t["embeddings.cls_token"].reshape(1, -1)  # [1, E]
        self.pos_embed = t["embeddings.position_embeddings"][0]  # [N + 1, E]
        w = t["embeddings.patch_embeddings.projection.weight"]  # [E, C, P, P]: a conv with stride = kernel
        self.patch = Linear(w.reshape(w.shape[0], -1), t["embeddings.patch_embeddings.projection.bias"])
        self.final_norm = LayerNorm.from_tensors(t, "layernorm", cfg.layer_norm_eps)
        blocks = []
        for i in range(cfg.num_hidden_layers):
            p = f"encoder.layer.{i}."
            names = [p + f"attention.attention.{x}" for x in ("query", "key", "value")]
            qkv = stacked(t, names, cfg.qkv_bias)
            out = Linear.from_tensors(t, p + "attention.output.dense")
            ln1 = LayerNorm.from_tensors(t, p + "layernorm_before", cfg.layer_norm_eps)
            ln2 = LayerNorm.from_tensors(t, p + "layernorm_after", cfg.layer_norm_eps)
            blocks.append(AttentionBlock(i, ln1, True, qkv, out, cfg.num_attention_heads))
            fc1, fc2 = Linear.from_tensors(t, p + "intermediate.dense"), Linear.from_tensors(t, p + "output.dense")
            blocks.append(FFNBlock(i, ln2, True, fc1, fc2, cfg.hidden_act))
        self.classifier = Linear.from_tensors(t, "classifier") if cfg.is_classifier else None
        self.pooler = Linear.from_tensors(t, "pooler.dense") if "pooler.dense.weight" in t else None
        super().__init__(cfg, blocks, **origin)

    def patches(self, image):
        """Cut one [C, H, W] image into flattened patches, row by row: [N, C*P*P] in the conv's (c, y, x) order."""
        C, H, W = image.shape
        P = self.config.patch_size
        x = image.reshape(C, H // P, P, W // P, P).transpose(1, 3, 0, 2, 4)  # [Hp, Wp, C, P, P]
        return x.reshape(-1, C * P * P)

    def embed(self, image):
        x = self.patch(np.ascontiguousarray(self.patches(image)))  # [N, C*P*P] -> [N, E]
        return np.concatenate([self.cls_token, x]) + self.pos_embed  # [N + 1, E]

    def head(self, x):
        cls = self.final_norm(x[:1])  # only the CLS token is read out: [N + 1, E] -> [1, E]
        if self.classifier is not None:
            return self.classifier(cls)  # [1, E] -> [1, labels]
        if self.pooler is not None:
            return np.tanh(self.pooler(cls))  # [1, E]
        return cls

    def forward(self, pixel_values, observe=None):
        """[B, C, H, W] float32 -> logits [B, num_labels] (classifier) or pooled output [B, E] (ViTModel).

        `observe(i, block, x, f, y)` is called per image and block when given, as in `OPT.forward`.
        """
        pixel_values = self._check(pixel_values)
        outs = []
        for image in pixel_values:  # images are independent sequences of patch tokens
            x = self.embed(image)  # [C, H, W] -> [N + 1, E]
            walk = self.sequential.walk(x, 0, None, None, observe)  # pos None: attention among all the patches
            outs.append(self.head(walk.X))
        return np.concatenate(outs)

    __call__ = forward

    def _check(self, pixel_values):
        x = np.asarray(pixel_values, dtype=np.float32)
        c, s = self.config.num_channels, self.config.image_size
        if x.ndim != 4 or x.shape[1:] != (c, s, s):
            raise ValueError(f"pixel_values must have shape [B, {c}, {s}, {s}], got {list(x.shape)}")
        return x
