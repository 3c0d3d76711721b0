"""transformers `CLIPTextModel` as a Flax linen module, with learned-vector injection.

Parameter names mirror transformers (`text_model/encoder/layers_0/self_attn/q_proj/kernel` for
`text_model.encoder.layers.0.self_attn.q_proj.weight`). Learned vectors never enter the
vocabulary table: the caller passes `inject_embeds` and `inject_mask`, and those positions take the
given vectors instead of the table lookup (ids beyond the table are allowed there).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
from flax import linen as nn

from core_jax.models._config import from_json_dict, to_json_dict

POOLINGS = ("end_of_text", "argmax_ids")
_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """transformers CLIPTextConfig fields the SD text encoders use. Defaults: SD 1.x (ViT-L/14)."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407
    projection_dim: int = 768
    # Where pooler_output is read: "end_of_text" (the first end-of-text token), or "argmax_ids"
    # (the position of the largest id: transformers' pooling for legacy configs that say
    # eos_token_id 2, as SD 1.x's and SDXL base's encoders do; an added token's id then wins).
    pooling: str = "end_of_text"

    def __post_init__(self) -> None:
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} not in {sorted(_ACTIVATIONS)}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling {self.pooling!r} not in {POOLINGS}")

    @classmethod
    def from_diffusers(cls, config: dict[str, Any], pooling: str = "end_of_text") -> CLIPTextConfig:
        """`pooling`: "end_of_text", or "as_config": where transformers pools for this config
        (argmax of the ids for a legacy `eos_token_id: 2`, else the first end-of-text)."""
        if pooling not in POOLINGS + ("as_config",):
            raise ValueError(f"pooling {pooling!r} not in {POOLINGS + ('as_config',)}")
        config = dict(config)
        legacy = config.get("eos_token_id") == 2
        if legacy:
            # The tokenizer's end-of-text is 49407 whatever a legacy config says.
            config["eos_token_id"] = 49407
        if pooling == "as_config":
            pooling = "argmax_ids" if legacy else "end_of_text"
        return from_json_dict(cls, {**config, "pooling": pooling})

    def to_diffusers(self, architecture: str = "CLIPTextModel") -> dict[str, Any]:
        fields = to_json_dict(self)
        if fields.pop("pooling") == "argmax_ids":
            fields["eos_token_id"] = 2  # what makes transformers pool at argmax(ids)
        return {
            "architectures": [architecture],
            "model_type": "clip_text_model",
            "bos_token_id": 49406,
            "pad_token_id": 1,
            **fields,
        }


@flax.struct.dataclass
class TextEncoderOutput:
    last_hidden_state: jax.Array  # [B, T, D], after the final layer norm
    pooler_output: jax.Array  # [B, D], where config.pooling says
    hidden_states: tuple[jax.Array, ...] | None = None  # embeddings + each layer, before norm


def first_eos_index(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """Position [B] of the first end-of-text token (argmax of ids breaks once tokens are added)."""
    return jnp.argmax(input_ids == eos_token_id, axis=-1)


class CLIPAttention(nn.Module):
    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        c = self.config
        head_dim = c.hidden_size // c.num_attention_heads
        batch, length, _ = x.shape

        def project(name: str) -> jax.Array:
            y = nn.Dense(c.hidden_size, dtype=self.dtype, name=name)(x)
            return y.reshape(batch, length, c.num_attention_heads, head_dim)

        q, k, v = project("q_proj"), project("k_proj"), project("v_proj")
        scores = jnp.einsum("bqhd,bkhd->bhqk", q * head_dim**-0.5, k).astype(jnp.float32)
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(batch, length, c.hidden_size)
        return nn.Dense(c.hidden_size, dtype=self.dtype, name="out_proj")(out)


class CLIPMLP(nn.Module):
    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        x = nn.Dense(c.intermediate_size, dtype=self.dtype, name="fc1")(x)
        return nn.Dense(c.hidden_size, dtype=self.dtype, name="fc2")(_ACTIVATIONS[c.hidden_act](x))


class CLIPEncoderLayer(nn.Module):
    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        eps = self.config.layer_norm_eps
        h = nn.LayerNorm(epsilon=eps, dtype=self.dtype, name="layer_norm1")(x)
        x = x + CLIPAttention(self.config, self.dtype, name="self_attn")(h, mask)
        h = nn.LayerNorm(epsilon=eps, dtype=self.dtype, name="layer_norm2")(x)
        return x + CLIPMLP(self.config, self.dtype, name="mlp")(h)


class CLIPEncoder(nn.Module):
    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        states = [x]
        for i in range(self.config.num_hidden_layers):
            x = CLIPEncoderLayer(self.config, self.dtype, name=f"layers_{i}")(x, mask)
            states.append(x)
        return x, tuple(states)


class EmbeddingTable(nn.Module):
    """An `nn.Embed`-named table (`.../embedding`) returned whole, so lookups can be customised."""

    num_embeddings: int
    features: int
    stddev: float = 0.02

    @nn.compact
    def __call__(self) -> jax.Array:
        init = nn.initializers.normal(self.stddev)
        return self.param("embedding", init, (self.num_embeddings, self.features))


class CLIPTextEmbeddings(nn.Module):
    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        inject_embeds: jax.Array | None,
        inject_mask: jax.Array | None,
    ) -> jax.Array:
        c = self.config
        token_table = EmbeddingTable(c.vocab_size, c.hidden_size, name="token_embedding")()
        position_table = EmbeddingTable(
            c.max_position_embeddings, c.hidden_size, 0.01, name="position_embedding"
        )()
        # Placeholder ids lie beyond the table; their rows are replaced below, so clip to stay
        # in bounds rather than read fill values.
        tokens = jnp.take(token_table, jnp.clip(input_ids, 0, c.vocab_size - 1), axis=0)
        if inject_embeds is not None:
            tokens = jnp.where(inject_mask[..., None], inject_embeds.astype(tokens.dtype), tokens)
        positions = position_table[: input_ids.shape[-1]]
        return (tokens + positions[None]).astype(self.dtype)


class CLIPTextTransformer(nn.Module):
    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        inject_embeds: jax.Array | None = None,
        inject_mask: jax.Array | None = None,
        output_hidden_states: bool = False,
    ) -> TextEncoderOutput:
        c = self.config
        length = input_ids.shape[-1]
        x = CLIPTextEmbeddings(c, self.dtype, name="embeddings")(
            input_ids, inject_embeds, inject_mask
        )
        mask = jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]  # causal
        if attention_mask is not None:
            mask = mask & attention_mask.astype(bool)[:, None, None, :]
        x, states = CLIPEncoder(c, self.dtype, name="encoder")(x, mask)
        x = nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name="final_layer_norm")(x)
        if c.pooling == "argmax_ids":
            at = jnp.argmax(input_ids, axis=-1)
        else:
            at = first_eos_index(input_ids, c.eos_token_id)
        pooled = jnp.take_along_axis(x, at[:, None, None], axis=1)[:, 0]
        return TextEncoderOutput(
            last_hidden_state=x,
            pooler_output=pooled,
            hidden_states=states if output_hidden_states else None,
        )


class CLIPTextModel(nn.Module):
    """`apply({"params": p}, input_ids [B, T], ...) -> TextEncoderOutput`.

    `inject_embeds` [B, T, D] with `inject_mask` [B, T] replaces the token embeddings where the
    mask is set (learned vectors); gradients reach `inject_embeds` only through those positions.
    """

    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        inject_embeds: jax.Array | None = None,
        inject_mask: jax.Array | None = None,
        output_hidden_states: bool = False,
    ) -> TextEncoderOutput:
        return CLIPTextTransformer(self.config, self.dtype, name="text_model")(
            input_ids, attention_mask, inject_embeds, inject_mask, output_hidden_states
        )


class CLIPTextModelWithProjection(nn.Module):
    """transformers `CLIPTextModelWithProjection`: the pooled output through `text_projection`
    (no bias), the text side of CLIP-T and SDXL's second text encoder (OpenCLIP bigG).
    `apply(...) -> (TextEncoderOutput, text_embeds [B, P])`, the embeddings not normalised, as
    `get_text_features` gives them. Learned vectors are injected as in `CLIPTextModel`; SDXL
    reads the penultimate state, `hidden_states[-2]` with `output_hidden_states`."""

    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        inject_embeds: jax.Array | None = None,
        inject_mask: jax.Array | None = None,
        output_hidden_states: bool = False,
    ) -> tuple[TextEncoderOutput, jax.Array]:
        out = CLIPTextTransformer(self.config, self.dtype, name="text_model")(
            input_ids, attention_mask, inject_embeds, inject_mask, output_hidden_states
        )
        projection = nn.Dense(
            self.config.projection_dim, use_bias=False, dtype=self.dtype, name="text_projection"
        )
        return out, projection(out.pooler_output)
