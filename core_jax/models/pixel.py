"""Pixel space in the place of a VAE, for diffusion models that denoise images directly.

A model folder without `vae/` whose U-Net takes 3 channels is a pixel-space model (the toy
world's is one): its "latents" are the images themselves, in [-1, 1], so the latent pool holds
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
