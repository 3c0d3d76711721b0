"""diffusers `UNet2DConditionModel` (Stable Diffusion 1.x / 2.x / XL) as a Flax linen module.

Same topology and parameter names as diffusers (list indices joined with `_`), channels-last.
Cross-attention layers sow per-token attention statistics into the `attn_stats` collection; see
`cross_attention_stats` for their order. SDXL's added conditioning (`addition_embed_type=
"text_time"`: the pooled text embedding and the six add-time ids) enters the time embedding.
"""

from __future__ import annotations

import dataclasses
import math
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
from core_jax.models.pixel import with_coordinates
from core_jax.models.remat import remat

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")

# diffusers options this module does not implement, with the value that is supported.
_UNSUPPORTED_IF_NOT = {
    "class_embed_type": None,
    "encoder_hid_dim": None,
    "time_cond_proj_dim": None,
    "num_class_embeds": None,
    "resnet_time_scale_shift": "default",
    "dual_cross_attention": False,
    "only_cross_attention": False,
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "act_fn": "silu",
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "mid_block_scale_factor": 1,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "timestep_post_act": None,
    "class_embeddings_concat": False,
    "reverse_transformer_layers_per_block": None,
    "attention_type": "default",
    "cross_attention_norm": None,
}
ADDITION_EMBED_TYPES = (None, "text_time")
# SDXL's add-time ids per image: original (h, w), crop top-left (y, x), target (h, w).
NUM_TIME_IDS = 6
# Rematerialization (`config.model.remat`): which modules' activations the backward pass
# recomputes instead of storing, and the `jax.checkpoint` policy of what they may still keep.
# "dots_saveable" remats the U-Net blocks but keeps their matrix products (not convolutions).
REMAT_POLICIES = ("none", "transformer_block", "unet_block", "dots_saveable")


def _per_block(value: Any, n: int) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,) * n


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The subset of diffusers' UNet2DConditionModel config that SD 1.x / 2.x / XL use."""

    sample_size: int = 64
    in_channels: int = 4
    out_channels: int = 4
    down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D",
    )
    up_block_types: tuple[str, ...] = (
        "UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
    )
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 768
    # diffusers' `attention_head_dim` is the number of heads (a historic misnomer) unless
    # `num_attention_heads` is given; SD 2.x gives it per block.
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    transformer_layers_per_block: int | tuple[int, ...] = 1
    use_linear_projection: bool = False
    upcast_attention: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    # SDXL: "text_time" adds add_embedding(concat(pooled text [P], sinusoids of the 6 time ids
    # [6 * addition_time_embed_dim])) to the time embedding; the input width is the sum.
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None

    def __post_init__(self) -> None:
        for name, allowed in (("down", DOWN_BLOCK_TYPES), ("up", UP_BLOCK_TYPES)):
            for block in getattr(self, f"{name}_block_types"):
                if block not in allowed:
                    raise ValueError(f"unsupported {name} block {block!r}; supported: {allowed}")
        if len(self.down_block_types) != len(self.block_out_channels):
            raise ValueError("down_block_types and block_out_channels differ in length")
        if isinstance(self.layers_per_block, (list, tuple)):
            raise ValueError("per-block layers_per_block is not supported")
        if self.addition_embed_type not in ADDITION_EMBED_TYPES:
            raise ValueError(
                f"unsupported addition_embed_type {self.addition_embed_type!r}; supported: "
                f"{ADDITION_EMBED_TYPES}"
            )
        if self.addition_embed_type == "text_time" and not (
            self.addition_time_embed_dim and self.projection_class_embeddings_input_dim
        ):
            raise ValueError(
                'addition_embed_type="text_time" needs addition_time_embed_dim and '
                "projection_class_embeddings_input_dim"
            )
        if any(isinstance(t, (list, tuple)) for t in self.transformer_layers):
            raise ValueError("per-layer (nested) transformer_layers_per_block is not supported")

    @property
    def pooled_text_dim(self) -> int | None:
        """Width of `text_embeds` next to SDXL base's six time ids (1280 for SDXL base)."""
        if self.addition_embed_type != "text_time":
            return None
        return self.projection_class_embeddings_input_dim - (
            NUM_TIME_IDS * self.addition_time_embed_dim
        )

    def example_inputs(self, batch: int = 1) -> dict[str, jax.Array]:
        """The smallest zero inputs that create every parameter (init, `eval_shape`)."""
        size = 2 ** (len(self.block_out_channels) - 1)
        inputs = {
            "sample": jnp.zeros((batch, size, size, self.in_channels)),
            "timesteps": jnp.zeros((batch,)),
            "encoder_hidden_states": jnp.zeros((batch, 1, self.cross_attention_dim)),
        }
        if self.addition_embed_type == "text_time":
            inputs["text_embeds"] = jnp.zeros((batch, self.pooled_text_dim))
            inputs["time_ids"] = jnp.zeros((batch, NUM_TIME_IDS))
        return inputs

    @property
    def heads_per_block(self) -> tuple[int, ...]:
        heads = self.num_attention_heads or self.attention_head_dim
        return _per_block(heads, len(self.down_block_types))

    @property
    def transformer_layers(self) -> tuple[int, ...]:
        return _per_block(self.transformer_layers_per_block, len(self.down_block_types))

    @property
    def num_cross_attention_layers(self) -> int:
        n_down = sum(
            self.layers_per_block * t
            for b, t in zip(self.down_block_types, self.transformer_layers, strict=True)
            if b.startswith("CrossAttn")
        )
        n_up = sum(
            (self.layers_per_block + 1) * t
            for b, t in zip(self.up_block_types, self.transformer_layers[::-1], strict=True)
            if b.startswith("CrossAttn")
        )
        return n_down + self.transformer_layers[-1] + n_up

    @classmethod
    def from_diffusers(cls, config: dict[str, Any]) -> UNetConfig:
        for key, supported in _UNSUPPORTED_IF_NOT.items():
            if key in config and config[key] != supported and config[key] != [supported] * len(
                config.get("down_block_types", [])
            ):
                raise ValueError(
                    f"U-Net config has {key}={config[key]!r}; core-jax supports only {supported!r}"
                )
        if isinstance(config.get("cross_attention_dim"), (list, tuple)):
            dims = set(config["cross_attention_dim"])
            if len(dims) != 1:
                raise ValueError("per-block cross_attention_dim is not supported")
            config = {**config, "cross_attention_dim": dims.pop()}
        if config.get("upcast_attention") is None:  # SDXL's config says null
            config = {**config, "upcast_attention": False}
        return from_json_dict(cls, config)

    def to_diffusers(self) -> dict[str, Any]:
        return {"_class_name": "UNet2DConditionModel", **to_json_dict(self)}


def timestep_embedding(
    timesteps: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float
) -> jax.Array:
    """Sinusoidal embedding [B, dim] of (possibly fractional) timesteps [B]."""
    half = dim // 2
    exponent = -math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    angles = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class FeedForward(nn.Module):
    """GEGLU feed-forward: `net.0.proj` (dim -> 2 * 4 dim), exact GELU gate, `net.2`."""

    dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        inner = 4 * self.dim
        h = GEGLU(inner, self.dtype, name="net_0")(x)
        return nn.Dense(self.dim, dtype=self.dtype, name="net_2")(h)


class GEGLU(nn.Module):
    inner: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h, gate = jnp.split(nn.Dense(2 * self.inner, dtype=self.dtype, name="proj")(x), 2, axis=-1)
        return h * nn.gelu(gate, approximate=False)


class BasicTransformerBlock(nn.Module):
    dim: int
    heads: int
    head_dim: int
    upcast_attention: bool = False
    dtype: jnp.dtype = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        def norm(name: str) -> nn.LayerNorm:
            return nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name=name)

        def attention(name: str, record_stats: bool) -> Attention:
            return Attention(
                self.heads, self.head_dim, self.dim, upcast_attention=self.upcast_attention,
                record_stats=record_stats, implementation=self.attention, dtype=self.dtype,
                name=name,
            )

        x = x + attention("attn1", False)(norm("norm1")(x))
        x = x + attention("attn2", True)(norm("norm2")(x), context)
        return x + FeedForward(self.dim, self.dtype, name="ff")(norm("norm3")(x))


class Transformer2DModel(nn.Module):
    """Spatial transformer: group norm, proj_in (1x1 conv or linear), blocks, proj_out, residual."""

    heads: int
    head_dim: int
    num_layers: int = 1
    groups: int = 32
    use_linear_projection: bool = False
    upcast_attention: bool = False
    dtype: jnp.dtype = jnp.float32
    attention: str = "auto"
    remat: str = "none"

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        batch, height, width, channels = x.shape
        inner = self.heads * self.head_dim
        h = GroupNorm(self.groups, 1e-6, self.dtype, name="norm")(x)
        if self.use_linear_projection:
            h = nn.Dense(inner, dtype=self.dtype, name="proj_in")(h.reshape(batch, -1, channels))
        else:
            h = conv1x1(inner, "proj_in", self.dtype)(h).reshape(batch, -1, inner)
        block = _rematted(BasicTransformerBlock, self.remat == "transformer_block")
        for i in range(self.num_layers):
            h = block(
                inner, self.heads, self.head_dim, self.upcast_attention, self.dtype,
                self.attention, name=f"transformer_blocks_{i}",
            )(h, context)
        if self.use_linear_projection:
            h = nn.Dense(channels, dtype=self.dtype, name="proj_out")(h)
            h = h.reshape(batch, height, width, channels)
        else:
            h = conv1x1(channels, "proj_out", self.dtype)(h.reshape(batch, height, width, inner))
        return h + x


class TimestepEmbedding(nn.Module):
    dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, t_emb: jax.Array) -> jax.Array:
        t_emb = nn.Dense(self.dim, dtype=self.dtype, name="linear_1")(t_emb.astype(self.dtype))
        return nn.Dense(self.dim, dtype=self.dtype, name="linear_2")(nn.silu(t_emb))


class _BlockSettings(nn.Module):
    """Fields shared by the down, mid and up blocks."""

    channels: int
    num_layers: int
    has_attention: bool
    heads: int = 8
    transformer_layers: int = 1
    groups: int = 32
    eps: float = 1e-5
    use_linear_projection: bool = False
    upcast_attention: bool = False
    dtype: jnp.dtype = jnp.float32
    attention: str = "auto"
    remat: str = "none"

    def resnet(self, name: str) -> ResnetBlock2D:
        return ResnetBlock2D(self.channels, self.groups, self.eps, self.dtype, name=name)

    def transformer(self, name: str) -> Transformer2DModel:
        return Transformer2DModel(
            self.heads, self.channels // self.heads, self.transformer_layers, self.groups,
            self.use_linear_projection, self.upcast_attention, self.dtype, self.attention,
            self.remat, name=name,
        )


class DownBlock(_BlockSettings):
    """CrossAttnDownBlock2D (has_attention) or DownBlock2D; returns output and skip features."""

    add_downsample: bool = True

    @nn.compact
    def __call__(
        self, h: jax.Array, temb: jax.Array, context: jax.Array
    ) -> tuple[jax.Array, list[jax.Array]]:
        skips = []
        for j in range(self.num_layers):
            h = self.resnet(f"resnets_{j}")(h, temb)
            if self.has_attention:
                h = self.transformer(f"attentions_{j}")(h, context)
            skips.append(h)
        if self.add_downsample:
            h = Downsample2D(self.channels, dtype=self.dtype, name="downsamplers_0")(h)
            skips.append(h)
        return h, skips


class MidBlock(_BlockSettings):
    """UNetMidBlock2DCrossAttn: resnet, transformer, resnet."""

    @nn.compact
    def __call__(self, h: jax.Array, temb: jax.Array, context: jax.Array) -> jax.Array:
        h = self.resnet("resnets_0")(h, temb)
        h = self.transformer("attentions_0")(h, context)
        return self.resnet("resnets_1")(h, temb)


class UpBlock(_BlockSettings):
    """CrossAttnUpBlock2D (has_attention) or UpBlock2D; `skips` in the order they are consumed."""

    add_upsample: bool = True

    @nn.compact
    def __call__(
        self, h: jax.Array, skips: tuple[jax.Array, ...], temb: jax.Array, context: jax.Array
    ) -> jax.Array:
        for j in range(self.num_layers):
            h = jnp.concatenate([h, skips[j]], axis=-1)
            h = self.resnet(f"resnets_{j}")(h, temb)
            if self.has_attention:
                h = self.transformer(f"attentions_{j}")(h, context)
        if self.add_upsample:
            h = Upsample2D(self.channels, self.dtype, name="upsamplers_0")(h)
        return h


class UNet2DConditionModel(nn.Module):
    """eps (or v) = unet(latents [B, H, W, C], timesteps [B] or scalar, context [B, T, D]).

    SDXL (`addition_embed_type="text_time"`) also takes `text_embeds` [B, P] (the second text
    encoder's projected pooled output) and `time_ids` [B, 6] (original size, crop top-left,
    target size), diffusers' `added_cond_kwargs`.
    """

    config: UNetConfig
    dtype: jnp.dtype = jnp.float32
    # `core_jax.models.attention.IMPLEMENTATIONS` and `REMAT_POLICIES`: how it computes, not
    # what; the parameters and the function are the same for every value.
    attention: str = "auto"
    remat: str = "none"

    @nn.compact
    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array,
        encoder_hidden_states: jax.Array,
        text_embeds: jax.Array | None = None,
        time_ids: jax.Array | None = None,
    ) -> jax.Array:
        c = self.config
        if self.remat not in REMAT_POLICIES:
            raise ValueError(
                f"remat policy {self.remat!r} is unknown; choose one of {', '.join(REMAT_POLICIES)}"
            )
        channels = c.block_out_channels
        n_blocks = len(channels)
        common = dict(
            groups=c.norm_num_groups, eps=c.norm_eps, use_linear_projection=c.use_linear_projection,
            upcast_attention=c.upcast_attention, dtype=self.dtype, attention=self.attention,
            remat=self.remat,
        )
        policy = jax.checkpoint_policies.dots_saveable if self.remat == "dots_saveable" else None
        per_block = self.remat in ("unet_block", "dots_saveable")
        down_block, mid_block, up_block = (
            _rematted(block, per_block, policy) for block in (DownBlock, MidBlock, UpBlock)
        )
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (sample.shape[0],))
        context = encoder_hidden_states.astype(self.dtype)  # [B, T, D]

        t_emb = timestep_embedding(timesteps, channels[0], c.flip_sin_to_cos, c.freq_shift)
        t_emb = TimestepEmbedding(4 * channels[0], self.dtype, name="time_embedding")(t_emb)
        if c.addition_embed_type == "text_time":
            t_emb = t_emb + self._text_time_embedding(text_embeds, time_ids, 4 * channels[0])
        elif text_embeds is not None or time_ids is not None:
            raise ValueError("text_embeds/time_ids given to a U-Net without addition_embed_type")

        # A U-Net with coordinate channels (in_channels = out_channels + 2, the toy model v2) is
        # called with out_channels-channel samples like any other and appends them itself;
        # an input of in_channels passes as it is (`core_jax.models.pixel`).
        sample = with_coordinates(sample, c.in_channels)
        h = conv3x3(channels[0], "conv_in", self.dtype)(sample.astype(self.dtype))
        skips = [h]
        for i, block_type in enumerate(c.down_block_types):
            h, block_skips = down_block(
                channels[i], c.layers_per_block, block_type == "CrossAttnDownBlock2D",
                c.heads_per_block[i], c.transformer_layers[i], add_downsample=i < n_blocks - 1,
                name=f"down_blocks_{i}", **common,
            )(h, t_emb, context)
            skips.extend(block_skips)

        h = mid_block(
            channels[-1], 1, True, c.heads_per_block[-1], c.transformer_layers[-1],
            name="mid_block", **common,
        )(h, t_emb, context)

        for i, block_type in enumerate(c.up_block_types):
            r = n_blocks - 1 - i
            n_layers = c.layers_per_block + 1
            block_skips = tuple(reversed(skips[-n_layers:]))
            del skips[-n_layers:]
            h = up_block(
                channels[r], n_layers, block_type == "CrossAttnUpBlock2D",
                c.heads_per_block[r], c.transformer_layers[r], add_upsample=i < n_blocks - 1,
                name=f"up_blocks_{i}", **common,
            )(h, block_skips, t_emb, context)

        h = GroupNorm(c.norm_num_groups, c.norm_eps, self.dtype, name="conv_norm_out")(h)
        h = conv3x3(c.out_channels, "conv_out", self.dtype)(nn.silu(h))
        return h.astype(jnp.float32)

    def _text_time_embedding(
        self, text_embeds: jax.Array | None, time_ids: jax.Array | None, dim: int
    ) -> jax.Array:
        """add_embedding(concat(text_embeds, sinusoids of each time id)) [B, dim]."""
        c = self.config
        if text_embeds is None or time_ids is None:
            raise ValueError('addition_embed_type="text_time" needs text_embeds and time_ids')
        batch = text_embeds.shape[0]
        width = text_embeds.shape[-1] + time_ids.shape[-1] * c.addition_time_embed_dim
        if width != c.projection_class_embeddings_input_dim:
            raise ValueError(
                f"text_embeds {text_embeds.shape} and time_ids {time_ids.shape} make "
                f"{width} features; projection_class_embeddings_input_dim is "
                f"{c.projection_class_embeddings_input_dim}"
            )
        time_embeds = timestep_embedding(
            time_ids.reshape(-1), c.addition_time_embed_dim, c.flip_sin_to_cos, c.freq_shift
        ).reshape(batch, -1)  # [B, n_ids * addition_time_embed_dim]
        add_embeds = jnp.concatenate([text_embeds.astype(jnp.float32), time_embeds], axis=-1)
        return TimestepEmbedding(dim, self.dtype, name="add_embedding")(add_embeds)


def _rematted(
    module: type[nn.Module], rematerialize: bool, policy: Any = None
) -> type[nn.Module]:
    """`module`, or `remat(module, policy)`: the backward pass recomputes its activations
    instead of storing them. Same parameter names either way."""
    return remat(module, policy) if rematerialize else module


def cross_attention_stats(variables: dict, kind: str = "mean") -> jax.Array:
    """Stack the sown per-token statistics into [L, B, T], in execution order.

    The order is the U-Net's forward order: down blocks (block, layer, transformer block),
    the mid block, then up blocks; for SD 1.x / 2.x that is 6 down, 1 mid, 9 up = 16 layers.
    `variables` is the mutable state returned by `apply(..., mutable=["attn_stats"])`.
    """
    leaves: list[jax.Array] = []

    def visit(tree: dict) -> None:
        for name, child in tree.items():
            if name == "attn2":
                leaves.append(child[kind][0])
            elif isinstance(child, dict):
                visit(child)

    visit(variables["attn_stats"])
    return jnp.stack(leaves)
