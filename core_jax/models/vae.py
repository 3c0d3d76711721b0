"""diffusers `AutoencoderKL` (the SD VAE) as Flax linen modules, channels-last."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from core_jax.models._config import from_json_dict, to_json_dict
from core_jax.models.layers import (
    Attention,
    Downsample2D,
    GroupNorm,
    ResnetBlock2D,
    Upsample2D,
    conv1x1,
    conv3x3,
)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    sample_size: int = 512
    scaling_factor: float = 0.18215
    mid_block_add_attention: bool = True

    @classmethod
    def from_diffusers(cls, config: dict[str, Any]) -> VAEConfig:
        for key, supported in (("act_fn", "silu"), ("use_quant_conv", True),
                               ("use_post_quant_conv", True), ("shift_factor", None)):
            if config.get(key, supported) != supported:
                raise ValueError(f"VAE config has {key}={config[key]!r}; only {supported!r} works")
        return from_json_dict(cls, config)

    def to_diffusers(self) -> dict[str, Any]:
        n = len(self.block_out_channels)
        return {
            "_class_name": "AutoencoderKL",
            "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n,
            "act_fn": "silu",
            **to_json_dict(self),
        }


class VAEMidBlock(nn.Module):
    channels: int
    groups: int
    add_attention: bool = True
    dtype: jnp.dtype = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        h = ResnetBlock2D(self.channels, self.groups, 1e-6, self.dtype, name="resnets_0")(h)
        if self.add_attention:
            channels = h.shape[-1]
            h = Attention(
                1, channels, channels, qkv_bias=True, group_norm_groups=self.groups,
                implementation=self.attention, dtype=self.dtype, name="attentions_0",
            )(h)
        return ResnetBlock2D(self.channels, self.groups, 1e-6, self.dtype, name="resnets_1")(h)


class EncoderBlock(nn.Module):
    """DownEncoderBlock2D."""

    channels: int
    num_layers: int
    groups: int
    add_downsample: bool
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        for j in range(self.num_layers):
            h = ResnetBlock2D(self.channels, self.groups, 1e-6, self.dtype, name=f"resnets_{j}")(h)
        if self.add_downsample:
            h = Downsample2D(self.channels, True, self.dtype, name="downsamplers_0")(h)
        return h


class DecoderBlock(nn.Module):
    """UpDecoderBlock2D."""

    channels: int
    num_layers: int
    groups: int
    add_upsample: bool
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        for j in range(self.num_layers):
            h = ResnetBlock2D(self.channels, self.groups, 1e-6, self.dtype, name=f"resnets_{j}")(h)
        if self.add_upsample:
            h = Upsample2D(self.channels, self.dtype, name="upsamplers_0")(h)
        return h


class Encoder(nn.Module):
    config: VAEConfig
    dtype: jnp.dtype = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        channels = c.block_out_channels
        h = conv3x3(channels[0], "conv_in", self.dtype)(x)
        for i, ch in enumerate(channels):
            h = EncoderBlock(
                ch, c.layers_per_block, c.norm_num_groups, i < len(channels) - 1, self.dtype,
                name=f"down_blocks_{i}",
            )(h)
        h = VAEMidBlock(
            channels[-1], c.norm_num_groups, c.mid_block_add_attention, self.dtype, self.attention,
            name="mid_block",
        )(h)
        h = GroupNorm(c.norm_num_groups, 1e-6, self.dtype, name="conv_norm_out")(h)
        return conv3x3(2 * c.latent_channels, "conv_out", self.dtype)(nn.silu(h))


class Decoder(nn.Module):
    config: VAEConfig
    dtype: jnp.dtype = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        c = self.config
        channels = c.block_out_channels[::-1]
        h = conv3x3(channels[0], "conv_in", self.dtype)(z)
        h = VAEMidBlock(
            channels[0], c.norm_num_groups, c.mid_block_add_attention, self.dtype, self.attention,
            name="mid_block",
        )(h)
        for i, ch in enumerate(channels):
            h = DecoderBlock(
                ch, c.layers_per_block + 1, c.norm_num_groups, i < len(channels) - 1, self.dtype,
                name=f"up_blocks_{i}",
            )(h)
        h = GroupNorm(c.norm_num_groups, 1e-6, self.dtype, name="conv_norm_out")(h)
        return conv3x3(c.out_channels, "conv_out", self.dtype)(nn.silu(h))


class AutoencoderKL(nn.Module):
    """`encode(images [B, H, W, 3] in [-1, 1]) -> (mean, logvar)`; `decode(latents) -> images`.

    Latents here are unscaled; multiply by `config.scaling_factor` before the U-Net.
    `attention`: the mid-block attention's implementation (`attention.IMPLEMENTATIONS`).
    """

    config: VAEConfig
    dtype: jnp.dtype = jnp.float32
    attention: str = "auto"

    def setup(self) -> None:
        c = self.config
        self.encoder = Encoder(c, self.dtype, self.attention)
        self.decoder = Decoder(c, self.dtype, self.attention)
        self.quant_conv = conv1x1(2 * c.latent_channels, "quant_conv", self.dtype)
        self.post_quant_conv = conv1x1(c.latent_channels, "post_quant_conv", self.dtype)

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        moments = self.quant_conv(self.encoder(images.astype(self.dtype)))
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, latents: jax.Array) -> jax.Array:
        h = self.post_quant_conv(latents.astype(self.dtype))
        return self.decoder(h).astype(jnp.float32)

    def __call__(self, images: jax.Array) -> jax.Array:
        mean, _ = self.encode(images)
        return self.decode(mean)
