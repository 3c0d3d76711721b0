"""XLA's FLOP count of the U-Net forward (what GFLOP/s and MFU divide by time) against a hand
count of its convolutions, dense layers and attention products (`core_jax.bench.flop_count`)."""

import jax
import jax.numpy as jnp
import pytest
from jax import lax

from core_jax.bench.flop_count import conv_flops, unet_forward_flops
from core_jax.bench.measure import flops
from core_jax.models import attention
from core_jax.models.presets import get_preset
from core_jax.models.unet import NUM_TIME_IDS, UNet2DConditionModel


@pytest.mark.parametrize("size, stride", [(4, 1), (7, 1), (32, 1), (8, 2), (9, 2)])
def test_convolution_count_is_the_taps_on_the_image(size, stride):
    x, w = jnp.zeros((2, size, size, 16)), jnp.zeros((3, 3, 16, 24))

    def conv(x, w):
        return lax.conv_general_dilated(x, w, (stride, stride), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

    assert flops(jax.jit(conv).lower(x, w)) == conv_flops(2, size, 16, 24, 3, stride)


def _xla_forward_flops(preset: str, batch: int, tokens: int) -> float:
    config = get_preset(preset).unet
    unet = UNet2DConditionModel(config)
    size = config.sample_size
    inputs = dict(
        sample=jnp.zeros((batch, size, size, config.in_channels)),
        timesteps=jnp.zeros((batch,), jnp.int32),
        encoder_hidden_states=jnp.zeros((batch, tokens, config.cross_attention_dim)),
    )
    if config.addition_embed_type == "text_time":
        inputs["text_embeds"] = jnp.zeros((batch, config.pooled_text_dim))
        inputs["time_ids"] = jnp.zeros((batch, NUM_TIME_IDS))
    params = jax.eval_shape(lambda: unet.init(jax.random.key(0), **inputs))  # nothing allocated
    # Explicit attention: XLA counts a loop body once, so the chunked form would hide FLOPs.
    with attention.explicit_attention_only():
        return flops(jax.jit(lambda p, kw: unet.apply(p, **kw)).lower(params, inputs))


# XLA also counts the norms, activations, softmax and residual adds the hand count leaves out:
# a few FLOPs per element, a larger share of a narrow U-Net than of SD's (1280 channels).
@pytest.mark.parametrize("preset, batch, tolerance", [
    ("bench_small", 2, 0.06),
    ("sd15", 1, 0.02),
    pytest.param("sdxl", 1, 0.02, marks=pytest.mark.slow),
])
def test_xla_counts_the_unet_forward_as_the_hand_count(preset, batch, tolerance):
    hand = unet_forward_flops(get_preset(preset).unet, batch, context_tokens=77)
    xla = _xla_forward_flops(preset, batch, 77)
    print(f"{preset}: XLA {xla / 1e9:.2f} GFLOP, hand {hand.total / 1e9:.2f} GFLOP "
          f"(conv {hand.conv / 1e9:.2f}, dense {hand.dense / 1e9:.2f}, "
          f"attention {hand.attention / 1e9:.2f})")
    assert hand.total <= xla <= hand.total * (1 + tolerance)
