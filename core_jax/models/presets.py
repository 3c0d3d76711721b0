"""Named model shapes (DESIGN.md "Reference shapes") for tests, benchmarks and the default run.

The SD presets but `micro` keep SD 1.x's topology (3 cross-attention down blocks + 1 plain,
mirrored up; 16 cross-attention layers); only widths and depths shrink. The SDXL presets keep
SDXL's (a plain down block, then 2 cross-attention blocks with per-block transformer depth,
the added "text_time" conditioning, two text encoders whose states are concatenated).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from core_jax.models.clip_text import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from core_jax.models.unet import NUM_TIME_IDS, UNet2DConditionModel, UNetConfig
from core_jax.models.vae import AutoencoderKL, VAEConfig


@dataclasses.dataclass(frozen=True)
class ModelPreset:
    unet: UNetConfig
    text: CLIPTextConfig
    vae: VAEConfig
    # SDXL's second text encoder (`CLIPTextModelWithProjection`); None for SD 1.x / 2.x.
    text_2: CLIPTextConfig | None = None


def _sdxl_unet(
    block_out_channels: tuple[int, ...], heads: tuple[int, ...], depth: tuple[int, ...],
    text: CLIPTextConfig, text_2: CLIPTextConfig, time_dim: int, **rest: Any,
) -> UNetConfig:
    """SDXL's U-Net topology for two text encoders: the context concatenates both encoders'
    states, the pooled embedding is the second one's projection."""
    return UNetConfig(
        block_out_channels=block_out_channels,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(depth) - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (len(depth) - 1) + ("UpBlock2D",),
        attention_head_dim=heads, transformer_layers_per_block=depth,
        cross_attention_dim=text.hidden_size + text_2.hidden_size, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=text_2.projection_dim + NUM_TIME_IDS * time_dim,
        **rest,
    )


_SDXL_TEXT_2 = CLIPTextConfig(  # OpenCLIP ViT-bigG/14
    hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    hidden_act="gelu", projection_dim=1280,
)
_TINY_SDXL_TEXT = CLIPTextConfig(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    projection_dim=32,
)
# Wider than the first encoder, as bigG is than ViT-L, so a swapped pair fails on shapes.
_TINY_SDXL_TEXT_2 = CLIPTextConfig(
    hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    hidden_act="gelu", projection_dim=40,
)


PRESETS: dict[str, ModelPreset] = {
    # The smallest shapes that keep every code path; 64 px images, 8x8 latents.
    "tiny": ModelPreset(
        unet=UNetConfig(
            sample_size=8, block_out_channels=(32, 32, 64, 64), attention_head_dim=2,
            cross_attention_dim=32, norm_num_groups=16,
        ),
        text=CLIPTextConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            projection_dim=32,
        ),
        vae=VAEConfig(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=16,
                      sample_size=64),
    ),
    # Fewer blocks for end-to-end tests of the CLI (4 cross-attention layers, 16 px images):
    # every code path of the step, a fraction of the compile time.
    "micro": ModelPreset(
        unet=UNetConfig(
            sample_size=8, block_out_channels=(32, 32), attention_head_dim=2,
            cross_attention_dim=32, norm_num_groups=16, layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        ),
        text=CLIPTextConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
            projection_dim=32,
        ),
        vae=VAEConfig(block_out_channels=(16, 16), layers_per_block=1, norm_num_groups=16,
                      sample_size=16),
    ),
    # DESIGN.md bench-small: the benchmark shape; 256 px images, 32x32 latents.
    "bench_small": ModelPreset(
        unet=UNetConfig(
            sample_size=32, block_out_channels=(64, 128, 256, 256), attention_head_dim=8,
            cross_attention_dim=256,
        ),
        text=CLIPTextConfig(
            hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
            projection_dim=256,
        ),
        vae=VAEConfig(block_out_channels=(32, 64, 64, 64), layers_per_block=1, sample_size=256),
    ),
    # SD 1.5's real shapes (random weights unless loaded).
    "sd15": ModelPreset(unet=UNetConfig(), text=CLIPTextConfig(), vae=VAEConfig()),
    # SD 2.1-base's shapes: linear projections, per-block heads, OpenCLIP-H text encoder.
    "sd21": ModelPreset(
        unet=UNetConfig(
            attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
            use_linear_projection=True,
        ),
        text=CLIPTextConfig(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
            num_attention_heads=16, hidden_act="gelu", projection_dim=512,
        ),
        vae=VAEConfig(),
    ),
    # SDXL base 1.0's shapes (2.6 G U-Net parameters, 70 cross-attention layers; random weights
    # unless loaded): for accelerators and `core-jax bench`.
    "sdxl": ModelPreset(
        unet=_sdxl_unet(
            (320, 640, 1280), (5, 10, 20), (1, 2, 10), CLIPTextConfig(), _SDXL_TEXT_2, 256,
            sample_size=128,
        ),
        text=CLIPTextConfig(),
        text_2=_SDXL_TEXT_2,
        vae=VAEConfig(sample_size=1024, scaling_factor=0.13025),
    ),
    # SDXL's topology at the smallest widths (17 cross-attention layers: depths 1, 1, 2 per
    # block); 64 px images, 8x8 latents. For tests and CPU runs.
    "tiny_sdxl": ModelPreset(
        unet=_sdxl_unet(
            (32, 64, 64), (2, 4, 4), (1, 1, 2), _TINY_SDXL_TEXT, _TINY_SDXL_TEXT_2, 8,
            sample_size=8, norm_num_groups=16,
        ),
        text=_TINY_SDXL_TEXT,
        text_2=_TINY_SDXL_TEXT_2,
        vae=VAEConfig(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=16,
                      sample_size=64, scaling_factor=0.13025),
    ),
}


def get_preset(name: str) -> ModelPreset:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


@dataclasses.dataclass
class RandomModels:
    """Modules of a preset and random parameters for them: {"text", "unet", "vae"}, and
    "text_2" for SDXL presets."""

    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    params: dict[str, Any]
    text_encoder_2: CLIPTextModelWithProjection | None = None


def random_models(
    preset: str | ModelPreset, seed: int = 0, dtype: jnp.dtype = jnp.float32,
    abstract_unet: bool = False,
) -> RandomModels:
    """Random-weight models of a preset (the embedded default, tests, benchmarks).

    Inits run jitted on the smallest inputs that create every parameter and return only the
    parameters, so XLA drops the forward pass; values depend only on the seed and the shapes.
    `abstract_unet`: the U-Net's parameters as shapes only (`jax.ShapeDtypeStruct`), for
    programs that are compiled and never run (memory analysis at SDXL's real size here).
    """
    shapes = get_preset(preset) if isinstance(preset, str) else preset
    text_encoder = CLIPTextModel(shapes.text, dtype)
    unet = UNet2DConditionModel(shapes.unet, dtype)
    vae = AutoencoderKL(shapes.vae, dtype)
    k_text, k_unet, k_vae = jax.random.split(jax.random.key(seed), 3)
    factor = 2 ** (len(shapes.vae.block_out_channels) - 1)
    f32 = jnp.float32

    def init(module: nn.Module, key: jax.Array, *shapes_and_dtypes: tuple) -> Any:
        args = [jnp.zeros(shape, dt) for shape, dt in shapes_and_dtypes]
        return jax.jit(lambda k: module.init(k, *args)["params"])(key)

    def init_unet(key: jax.Array) -> Any:
        return unet.init(key, **shapes.unet.example_inputs())["params"]

    params = {
        "text": init(text_encoder, k_text, ((1, shapes.text.max_position_embeddings), jnp.int32)),
        "unet": (jax.eval_shape(init_unet, k_unet) if abstract_unet
                 else jax.jit(init_unet)(k_unet)),
        "vae": init(vae, k_vae, ((1, factor, factor, shapes.vae.in_channels), f32)),
    }
    text_encoder_2 = None
    if shapes.text_2 is not None:
        # Its own key (folded from the seed) keeps the three SD draws as they were.
        text_encoder_2 = CLIPTextModelWithProjection(shapes.text_2, dtype)
        params["text_2"] = init(
            text_encoder_2, jax.random.fold_in(jax.random.key(seed), 2),
            ((1, shapes.text_2.max_position_embeddings), jnp.int32),
        )
    return RandomModels(text_encoder, unet, vae, params, text_encoder_2)
