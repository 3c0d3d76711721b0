"""Building blocks shared by the U-Net and the VAE, named like diffusers' so weights map 1:1.

Everything is channels-last (NHWC). Submodule names follow diffusers with list indices joined by
an underscore (`resnets.0` -> `resnets_0`); `core_jax.weights` owns that mapping.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from core_jax.models.attention import attention_with_stats, dot_product_attention


def conv3x3(features: int, name: str, dtype: jnp.dtype, strides: int = 1) -> nn.Conv:
    return nn.Conv(
        features, (3, 3), strides=(strides, strides), padding=((1, 1), (1, 1)), dtype=dtype,
        name=name,
    )


def conv1x1(features: int, name: str, dtype: jnp.dtype) -> nn.Conv:
    return nn.Conv(features, (1, 1), padding="VALID", dtype=dtype, name=name)


class GroupNorm(nn.Module):
    """torch.nn.GroupNorm over the last (channel) axis, statistics in fp32.

    Computed as per-channel sums followed by a small reduction over each group: the same
    numbers as a reshape-to-groups norm, but XLA:CPU fuses the per-channel pass better.
    """

    num_groups: int = 32
    epsilon: float = 1e-5
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
        x32 = x.astype(jnp.float32)
        spatial = tuple(range(1, x.ndim - 1))
        group_size = channels // self.num_groups

        def group_mean(per_channel_mean: jax.Array) -> jax.Array:
            """[B, C] per-channel means -> [B, 1.., C] means of each channel's group."""
            groups = per_channel_mean.reshape(-1, self.num_groups, group_size).mean(-1)
            return jnp.repeat(groups, group_size, axis=-1).reshape(
                (x.shape[0],) + (1,) * len(spatial) + (channels,)
            )

        centered = x32 - group_mean(jnp.mean(x32, axis=spatial))
        inv = jax.lax.rsqrt(group_mean(jnp.mean(jnp.square(centered), axis=spatial)) + self.epsilon)
        return (centered * inv * scale + bias).astype(self.dtype)


class ResnetBlock2D(nn.Module):
    """diffusers ResnetBlock2D (time_embedding_norm="default", no up/down inside)."""

    out_channels: int
    groups: int = 32
    eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        h = GroupNorm(self.groups, self.eps, self.dtype, name="norm1")(x)
        h = nn.silu(h)
        h = conv3x3(self.out_channels, "conv1", self.dtype)(h)
        if temb is not None:
            t = nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))
            h = h + t[:, None, None, :]
        h = GroupNorm(self.groups, self.eps, self.dtype, name="norm2")(h)
        h = nn.silu(h)
        h = conv3x3(self.out_channels, "conv2", self.dtype)(h)
        if x.shape[-1] != self.out_channels:
            x = conv1x1(self.out_channels, "conv_shortcut", self.dtype)(x)
        return x + h


class Downsample2D(nn.Module):
    """Strided 3x3 conv. `asymmetric_padding` is the VAE encoder's pad (0, 1, 0, 1) + VALID."""

    out_channels: int
    asymmetric_padding: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.asymmetric_padding:
            conv = nn.Conv(
                self.out_channels, (3, 3), strides=(2, 2), padding=((0, 1), (0, 1)),
                dtype=self.dtype, name="conv",
            )
            return conv(x)
        return conv3x3(self.out_channels, "conv", self.dtype, strides=2)(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

    out_channels: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return conv3x3(self.out_channels, "conv", self.dtype)(x)


class Attention(nn.Module):
    """diffusers `Attention` (to_q/to_k/to_v/to_out.0) on token sequences [B, N, C].

    As cross-attention it records, through `sow` into the `attn_stats` collection, the mean and
    variance of each key token's softmax probability over heads and query positions ([B, T]).
    The CoRe and AttnDreamBooth regularizers read these; full maps are never kept.
    `implementation` is the attention's (`core_jax.models.attention.IMPLEMENTATIONS`).
    With `group_norm_groups` it is the VAE's spatial self-attention: [B, H, W, C] in, group norm
    first and a residual connection, as diffusers' `Attention(norm_num_groups=...,
    residual_connection=True)`.
    """

    heads: int
    head_dim: int
    out_dim: int
    qkv_bias: bool = False
    upcast_attention: bool = False
    record_stats: bool = False
    group_norm_groups: int | None = None
    implementation: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        if self.group_norm_groups is not None:
            batch, height, width, channels = x.shape
            h = GroupNorm(self.group_norm_groups, 1e-6, self.dtype, name="group_norm")(x)
            h = self._attend(h.reshape(batch, height * width, channels), None)
            return x + h.reshape(x.shape)
        return self._attend(x, context)

    def _attend(self, x: jax.Array, context: jax.Array | None) -> jax.Array:
        inner = self.heads * self.head_dim
        kv_input = x if context is None else context
        q = nn.Dense(inner, use_bias=self.qkv_bias, dtype=self.dtype, name="to_q")(x)
        k = nn.Dense(inner, use_bias=self.qkv_bias, dtype=self.dtype, name="to_k")(kv_input)
        v = nn.Dense(inner, use_bias=self.qkv_bias, dtype=self.dtype, name="to_v")(kv_input)
        batch, n_q, _ = q.shape
        q = q.reshape(batch, n_q, self.heads, self.head_dim)
        k = k.reshape(batch, k.shape[1], self.heads, self.head_dim)
        v = v.reshape(batch, v.shape[1], self.heads, self.head_dim)
        scale = self.head_dim**-0.5
        if self.record_stats:
            out, mean, var = attention_with_stats(
                q, k, v, scale, self.upcast_attention, self.implementation
            )
            self.sow("attn_stats", "mean", mean)
            self.sow("attn_stats", "var", var)
        else:
            out = dot_product_attention(
                q, k, v, scale, self.upcast_attention, self.implementation
            )
        out = out.reshape(batch, n_q, inner)
        return nn.Dense(self.out_dim, dtype=self.dtype, name="to_out_0")(out)
