"""Named model shapes (DESIGN.md "Reference shapes") for tests, benchmarks and the default run.

Every preset but `micro` keeps SD 1.x's topology (3 cross-attention down blocks + 1 plain,
mirrored up; 16 cross-attention layers); only widths and depths shrink.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from core_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
from core_jax.models.unet import UNet2DConditionModel, UNetConfig
from core_jax.models.vae import AutoencoderKL, VAEConfig


@dataclasses.dataclass(frozen=True)
class ModelPreset:
    unet: UNetConfig
    text: CLIPTextConfig
    vae: VAEConfig


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
}


def get_preset(name: str) -> ModelPreset:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


@dataclasses.dataclass
class RandomModels:
    """Modules of a preset and random parameters for them: {"text", "unet", "vae"}."""

    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    params: dict[str, Any]


def random_models(
    preset: str | ModelPreset, seed: int = 0, dtype: jnp.dtype = jnp.float32
) -> RandomModels:
    """Random-weight models of a preset (the embedded default, tests, benchmarks).

    Inits run jitted on the smallest inputs that create every parameter and return only the
    parameters, so XLA drops the forward pass; values depend only on the seed and the shapes.
    """
    shapes = get_preset(preset) if isinstance(preset, str) else preset
    text_encoder = CLIPTextModel(shapes.text, dtype)
    unet = UNet2DConditionModel(shapes.unet, dtype)
    vae = AutoencoderKL(shapes.vae, dtype)
    k_text, k_unet, k_vae = jax.random.split(jax.random.key(seed), 3)
    factor = 2 ** (len(shapes.vae.block_out_channels) - 1)
    unet_size = 2 ** (len(shapes.unet.block_out_channels) - 1)
    f32 = jnp.float32

    def init(module: nn.Module, key: jax.Array, *shapes_and_dtypes: tuple) -> Any:
        args = [jnp.zeros(shape, dt) for shape, dt in shapes_and_dtypes]
        return jax.jit(lambda k: module.init(k, *args)["params"])(key)

    params = {
        "text": init(text_encoder, k_text, ((1, shapes.text.max_position_embeddings), jnp.int32)),
        "unet": init(
            unet, k_unet, ((1, unet_size, unet_size, shapes.unet.in_channels), f32), ((1,), f32),
            ((1, 1, shapes.unet.cross_attention_dim), f32),
        ),
        "vae": init(vae, k_vae, ((1, factor, factor, shapes.vae.in_channels), f32)),
    }
    return RandomModels(text_encoder, unet, vae, params)
