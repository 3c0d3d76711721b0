"""core-jax: context-regularized personalization of text-to-image diffusion models in JAX/Flax."""

__version__ = "0.1.0"
