"""transformers `ViTModel` (DINO v1, e.g. facebook/dino-vits16) and `Dinov2Model` as Flax linen
modules: the class token of the last hidden state after the final layernorm is the DINO score's
embedding.

Parameter names mirror the checkpoints on disk (`encoder/layer_0/attention/attention/query/kernel`
for `encoder.layer.0.attention.attention.query.weight`, `embeddings/cls_token`,
`encoder/layer_0/layer_scale1/lambda1`); transformers 5.x renames some modules in memory but
reads and writes these names. The pooler (ViT) and the mask token (masked pretraining) are not
used for embeddings and are not part of the tree (`core_jax.weights` skips them).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from core_jax.models._config import from_json_dict
from core_jax.models.attention import dot_product_attention
from core_jax.models.clip_text import _ACTIVATIONS, CLIPMLP

ARCHITECTURES = ("vit", "dinov2")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """transformers ViTConfig / Dinov2Config fields. Defaults: facebook/dino-vits16."""

    model_type: str = "vit"
    hidden_size: int = 384
    intermediate_size: int = 1536  # DINOv2 configs give mlp_ratio instead: see from_dict
    num_hidden_layers: int = 12
    num_attention_heads: int = 6
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    qkv_bias: bool = True
    use_swiglu_ffn: bool = False

    def __post_init__(self) -> None:
        if self.model_type not in ARCHITECTURES:
            raise ValueError(f"model_type {self.model_type!r} is not one of {ARCHITECTURES}")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} not in {sorted(_ACTIVATIONS)}")
        if self.use_swiglu_ffn:
            raise ValueError("SwiGLU feed-forward layers (DINOv2 giant) are not supported")

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> ViTConfig:
        config = dict(config)
        if config.get("model_type") == "dinov2":
            # Dinov2MLP's width is int(hidden_size * mlp_ratio); an intermediate_size key, if
            # present, is an unused leftover.
            config["intermediate_size"] = int(config["hidden_size"] * config.get("mlp_ratio", 4))
        return from_json_dict(cls, config)


def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] weights of torch's `interpolate(mode="bicubic", align_corners=False)` along
    one axis with `size=` given: source x = (i + 0.5) * in / out - 0.5, Keys' cubic with
    a = -0.75 on the four neighbours floor(x) - 1 .. floor(x) + 2, indices clamped to the
    edge (no antialiasing: that is what transformers asks for)."""
    a = -0.75

    def cubic(t: float) -> float:
        t = abs(t)
        if t <= 1:
            return ((a + 2) * t - (a + 3)) * t * t + 1
        if t < 2:
            return ((t - 5) * t + 8) * t * a - 4 * a
        return 0.0

    scale = in_size / out_size
    weights = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        x = (i + 0.5) * scale - 0.5
        base = math.floor(x)
        frac = x - base
        for k in range(-1, 3):
            weights[i, min(max(base + k, 0), in_size - 1)] += cubic(k - frac)
    return weights


class PatchEmbeddings(nn.Module):
    config: ViTConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        """[B, H, W, C] -> [B, patches, D], patches in row-major (h, w) order as torch's
        `flatten(2)` of the NCHW convolution gives them."""
        c = self.config
        x = nn.Conv(
            c.hidden_size, (c.patch_size, c.patch_size), strides=(c.patch_size, c.patch_size),
            padding="VALID", dtype=self.dtype, name="projection",
        )(pixels.astype(self.dtype))
        return x.reshape(x.shape[0], -1, c.hidden_size)


class ViTEmbeddings(nn.Module):
    config: ViTConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        c = self.config
        init = nn.initializers.normal(0.02)
        cls_token = self.param("cls_token", init, (1, 1, c.hidden_size))
        grid = c.image_size // c.patch_size
        positions = self.param("position_embeddings", init, (1, grid * grid + 1, c.hidden_size))
        height, width = pixels.shape[1] // c.patch_size, pixels.shape[2] // c.patch_size
        if (height, width) != (grid, grid):
            if c.model_type != "dinov2":
                raise ValueError(
                    f"ViT takes {c.image_size}x{c.image_size} images, got {pixels.shape[1:3]}"
                )
            # DINOv2 checkpoints store 518 px positions (37 x 37 patches) and are run on 224 px
            # crops: transformers resizes the patch positions bicubically (in fp32).
            table = positions[0, 1:].reshape(grid, grid, c.hidden_size)
            rows = jnp.asarray(bicubic_matrix(grid, height), jnp.float32)
            cols = jnp.asarray(bicubic_matrix(grid, width), jnp.float32)
            resized = jnp.einsum("ih,jw,hwd->ijd", rows, cols, table.astype(jnp.float32))
            positions = jnp.concatenate(
                [positions[:, :1], resized.reshape(1, height * width, c.hidden_size)], axis=1
            )
        patches = PatchEmbeddings(c, self.dtype, name="patch_embeddings")(pixels)
        cls = jnp.broadcast_to(cls_token.astype(self.dtype), (patches.shape[0], 1, c.hidden_size))
        return jnp.concatenate([cls, patches], axis=1) + positions.astype(self.dtype)


class SelfAttention(nn.Module):
    """`attention.attention.{query,key,value}`: bidirectional multi-head attention."""

    config: ViTConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        head_dim = c.hidden_size // c.num_attention_heads

        def project(name: str) -> jax.Array:
            y = nn.Dense(c.hidden_size, use_bias=c.qkv_bias, dtype=self.dtype, name=name)(x)
            return y.reshape(*x.shape[:2], c.num_attention_heads, head_dim)

        out = dot_product_attention(project("query"), project("key"), project("value"),
                                    head_dim**-0.5)
        return out.reshape(x.shape)


class Attention(nn.Module):
    config: ViTConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = SelfAttention(self.config, self.dtype, name="attention")(x)
        return Dense(self.config.hidden_size, self.dtype, name="output")(x)


class Dense(nn.Module):
    """transformers' `<name>.dense` wrapper (ViT's `intermediate`, `output`)."""

    features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(self.features, dtype=self.dtype, name="dense")(x)


class LayerScale(nn.Module):
    hidden_size: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return x * self.param("lambda1", nn.initializers.ones, (self.hidden_size,)).astype(x.dtype)


class ViTLayer(nn.Module):
    """Pre-norm block; ViT names (`layernorm_before`, `intermediate`, `output`) or DINOv2 names
    (`norm1`, `mlp.fc1`, `layer_scale1`, ...) as the checkpoints have them."""

    config: ViTConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        act = _ACTIVATIONS[c.hidden_act]
        dinov2 = c.model_type == "dinov2"

        def norm(name: str) -> nn.LayerNorm:
            return nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name=name)

        h = Attention(c, self.dtype, name="attention")(norm("norm1" if dinov2 else
                                                           "layernorm_before")(x))
        if dinov2:
            h = LayerScale(c.hidden_size, name="layer_scale1")(h)
        x = x + h
        h = norm("norm2" if dinov2 else "layernorm_after")(x)
        if dinov2:  # CLIP's MLP has DINOv2's topology and names (fc1, act, fc2)
            return x + LayerScale(c.hidden_size, name="layer_scale2")(
                CLIPMLP(c, self.dtype, name="mlp")(h)
            )
        h = Dense(c.intermediate_size, self.dtype, name="intermediate")(h)
        return x + Dense(c.hidden_size, self.dtype, name="output")(act(h))


class ViTEncoder(nn.Module):
    config: ViTConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.config.num_hidden_layers):
            x = ViTLayer(self.config, self.dtype, name=f"layer_{i}")(x)
        return x


class ViTModel(nn.Module):
    """`apply({"params": p}, pixels [B, H, W, 3]) -> last hidden state [B, 1 + patches, D]`
    after the final layernorm (transformers' `last_hidden_state`); `[:, 0]` is the class
    token the DINO score compares."""

    config: ViTConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        c = self.config
        x = ViTEmbeddings(c, self.dtype, name="embeddings")(pixels)
        x = ViTEncoder(c, self.dtype, name="encoder")(x)
        return nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name="layernorm")(x)
