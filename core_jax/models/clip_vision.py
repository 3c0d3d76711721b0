"""transformers `CLIPVisionModelWithProjection` as a Flax linen module (the image side of CLIP-T
and CLIP-I).

Parameter names mirror transformers (`vision_model/encoder/layers_0/self_attn/q_proj/kernel`,
`vision_model/pre_layrnorm/scale` with transformers' own spelling, `visual_projection/kernel`).
The encoder is the text encoder's (`core_jax.models.clip_text.CLIPEncoder`): CLIP's two towers
share the layer topology and names, and differ only in the embeddings, the mask (none here) and
the norms around the encoder. It reads the encoder fields (`hidden_size`, `intermediate_size`,
`num_attention_heads`, `num_hidden_layers`, `hidden_act`, `layer_norm_eps`), which both
configs spell the same.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
from flax import linen as nn

from core_jax.models._config import from_json_dict
from core_jax.models.clip_text import _ACTIVATIONS, CLIPEncoder, EmbeddingTable


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """transformers CLIPVisionConfig fields. Defaults: ViT-L/14 at 224 px (SD 1.x's CLIP)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 14
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 768

    def __post_init__(self) -> None:
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} not in {sorted(_ACTIVATIONS)}")

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> CLIPVisionConfig:
        return from_json_dict(cls, config)


class CLIPVisionEmbeddings(nn.Module):
    config: CLIPVisionConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        c = self.config
        class_embedding = self.param(
            "class_embedding", nn.initializers.normal(1.0), (c.hidden_size,)
        )
        patches = nn.Conv(
            c.hidden_size, (c.patch_size, c.patch_size), strides=(c.patch_size, c.patch_size),
            padding="VALID", use_bias=False, dtype=self.dtype, name="patch_embedding",
        )(pixels.astype(self.dtype))
        batch = patches.shape[0]
        patches = patches.reshape(batch, -1, c.hidden_size)  # row-major (h, w): torch's flatten
        num_positions = (c.image_size // c.patch_size) ** 2 + 1
        positions = EmbeddingTable(num_positions, c.hidden_size, name="position_embedding")()
        cls = jnp.broadcast_to(class_embedding.astype(self.dtype), (batch, 1, c.hidden_size))
        return jnp.concatenate([cls, patches], axis=1) + positions[None].astype(self.dtype)


@flax.struct.dataclass
class VisionOutput:
    last_hidden_state: jax.Array  # [B, 1 + patches, D], before the post-layernorm
    image_embeds: jax.Array  # [B, projection_dim]: the class token, post-normed and projected


class CLIPVisionTransformer(nn.Module):
    config: CLIPVisionConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
        """pixels [B, H, W, 3] (normalised, channels last) -> (last hidden state, pooled)."""
        c = self.config
        if pixels.shape[1:3] != (c.image_size, c.image_size):
            raise ValueError(
                f"CLIP vision takes {c.image_size}x{c.image_size} images, got {pixels.shape[1:3]}"
            )
        x = CLIPVisionEmbeddings(c, self.dtype, name="embeddings")(pixels)
        x = nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name="pre_layrnorm")(x)
        everything = jnp.ones((1, 1, 1, 1), bool)  # bidirectional, no padding
        x, _ = CLIPEncoder(c, self.dtype, name="encoder")(x, everything)
        pooled = nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name="post_layernorm")(
            x[:, 0]
        )
        return x, pooled


class CLIPVisionModelWithProjection(nn.Module):
    """`apply({"params": p}, pixels [B, H, W, 3]) -> VisionOutput`; `image_embeds` is what
    transformers' `get_image_features` projects (not normalised)."""

    config: CLIPVisionConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels: jax.Array) -> VisionOutput:
        hidden, pooled = CLIPVisionTransformer(self.config, self.dtype, name="vision_model")(
            pixels
        )
        embeds = nn.Dense(
            self.config.projection_dim, use_bias=False, dtype=self.dtype, name="visual_projection"
        )(pooled)
        return VisionOutput(last_hidden_state=hidden, image_embeds=embeds)
