"""XLA's FLOP counts of one U-Net forward (one latent row) and one VAE decode (one image) at a
preset's native size, with every parameter abstract (nothing is allocated, nothing runs): the
unit of docs/evaluation.md's DreamBench runtime estimate.

    python benchmarks/model_flops.py sd15 sd21 bench_small

Attention is traced in its explicit form, as `core-jax bench` counts it (XLA's cost analysis
counts a loop body once, so the chunked form would hide most attention FLOPs). Next to XLA's
count: the hand count of the U-Net's convolutions, dense layers and attention products
(`core_jax.bench.flop_count`), which tests/test_flop_count.py holds XLA's to.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from core_jax.bench.flop_count import unet_forward_flops
from core_jax.bench.measure import flops
from core_jax.models import attention
from core_jax.models.presets import get_preset
from core_jax.models.unet import UNet2DConditionModel
from core_jax.models.vae import AutoencoderKL


def model_flops(preset_name: str) -> dict[str, float]:
    """{"unet_forward_per_row", "vae_decode_per_image"} in FLOPs (XLA's count),
    "unet_forward_per_row_by_hand" (convolutions, dense layers, attention products; 77 context
    tokens), and the U-Net's parameters."""
    preset = get_preset(preset_name)
    size = preset.unet.sample_size
    unet = UNet2DConditionModel(preset.unet)
    latents = jnp.zeros((1, size, size, preset.unet.in_channels))
    timesteps = jnp.zeros((1,), jnp.int32)
    context = jnp.zeros((1, 77, preset.unet.cross_attention_dim))
    unet_params = jax.eval_shape(lambda: unet.init(jax.random.key(0), latents, timesteps, context))
    vae = AutoencoderKL(preset.vae)
    factor = 2 ** (len(preset.vae.block_out_channels) - 1)
    vae_params = jax.eval_shape(
        lambda: vae.init(jax.random.key(0), jnp.zeros((1, factor * size, factor * size, 3))))
    vae_latents = jnp.zeros((1, size, size, preset.vae.latent_channels))
    with attention.explicit_attention_only():
        forward = flops(jax.jit(unet.apply).lower(unet_params, latents, timesteps, context))
        decode = flops(jax.jit(lambda p, z: vae.apply(p, z, method=vae.decode))
                       .lower(vae_params, vae_latents))
    return {"unet_params": float(sum(x.size for x in jax.tree.leaves(unet_params))),
            "unet_forward_per_row": forward, "vae_decode_per_image": decode,
            "unet_forward_per_row_by_hand": unet_forward_flops(preset.unet, 1, 77).total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("presets", nargs="+", help="model presets, e.g. sd15 sd21")
    for name in parser.parse_args().presets:
        counts = model_flops(name)
        size = get_preset(name).unet.sample_size
        print(f"{name}: {size}x{size} latents, U-Net {counts['unet_params'] / 1e6:.1f} M "
              f"parameters, forward {counts['unet_forward_per_row'] / 1e9:.1f} GFLOP per row "
              f"(by hand: {counts['unet_forward_per_row_by_hand'] / 1e9:.1f}), "
              f"VAE decode {counts['vae_decode_per_image'] / 1e9:.1f} GFLOP per image")


if __name__ == "__main__":
    main()
