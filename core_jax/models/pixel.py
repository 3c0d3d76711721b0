"""Pixel space in the place of a VAE, for diffusion models that denoise images directly.

A model folder without `vae/` whose U-Net denoises 3 channels is a pixel-space model (the toy
world's are): its "latents" are the images themselves, in [-1, 1], so the latent pool holds
the augmented views and sampling returns what the U-Net denoised. `PixelSpace` answers the calls a
VAE answers (`encode`, `decode`, `config.scaling_factor`, the downsampling factor) with the
identity, so the train step and the sampler need no second code path.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn


@dataclasses.dataclass(frozen=True)
class PixelSpaceConfig:
    latent_channels: int = 3
    scaling_factor: float = 1.0
    # One level: callers compute a VAE's factor as 2 ** (len(block_out_channels) - 1) = 1.
    block_out_channels: tuple[int, ...] = (3,)


class PixelSpace(nn.Module):
    """The identity autoencoder: no parameters (apply it with `{"params": {}}`)."""

    config: PixelSpaceConfig = PixelSpaceConfig()
    dtype: jnp.dtype = jnp.float32

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(mean, logvar) = (images, -inf): a pool of exact images, std exp(-inf / 2) = 0."""
        mean = images.astype(jnp.float32)
        return mean, jnp.full_like(mean, -jnp.inf)

    def decode(self, latents: jax.Array) -> jax.Array:
        return latents.astype(jnp.float32)

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.decode(self.encode(images)[0])


# --- Coordinate channels -----------------------------------------------------------------------
#
# A U-Net is translation equivariant: "on the left" can only be drawn from what zero padding
# leaks about the border. A pixel-space U-Net may instead take two extra input channels holding
# each pixel's x and y in [-1, 1] (CoordConv): its config then says in_channels = out_channels + 2
# (the toy model v2: 5 in, 3 out). Its parameters are a plain diffusers UNet2DConditionModel's
# (diffusers loads such a U-Net as it loads SD's inpainting U-Net, 9 in and 4 out). Our
# UNet2DConditionModel appends the channels itself when it is given out_channels-channel
# samples, so the train step and the sampler call it as any U-Net; noise is drawn with
# out_channels.

COORDINATE_CHANNELS = 2


def coordinate_channels(batch: int, height: int, width: int) -> jax.Array:
    """[batch, height, width, 2]: x (left -1 to right +1) and y (top -1 to bottom +1) of each
    pixel centre, the toy world's image frame."""
    ys = (jnp.arange(height, dtype=jnp.float32) + 0.5) / height * 2.0 - 1.0
    xs = (jnp.arange(width, dtype=jnp.float32) + 0.5) / width * 2.0 - 1.0
    grid = jnp.stack(jnp.broadcast_arrays(xs[None, :], ys[:, None]), axis=-1)
    return jnp.broadcast_to(grid[None], (batch, height, width, 2))


def with_coordinates(sample: jax.Array, in_channels: int) -> jax.Array:
    """The U-Net's input for `sample` [B, H, W, C]: `sample` itself when the U-Net takes C
    channels, `sample` with the coordinate channels appended when it takes C + 2."""
    channels = sample.shape[-1]
    if in_channels == channels:
        return sample
    if in_channels != channels + COORDINATE_CHANNELS:
        raise ValueError(
            f"a U-Net with {in_channels} input channels cannot take {channels}-channel samples "
            f"(with or without {COORDINATE_CHANNELS} coordinate channels)"
        )
    b, h, w, _ = sample.shape
    coords = coordinate_channels(b, h, w).astype(sample.dtype)
    return jnp.concatenate([sample, coords], axis=-1)


def is_pixel_space_unet(in_channels: int, out_channels: int) -> bool:
    """An RGB-denoising U-Net, with or without coordinate channels (for folders without vae/)."""
    return out_channels == 3 and in_channels in (3, 3 + COORDINATE_CHANNELS)
