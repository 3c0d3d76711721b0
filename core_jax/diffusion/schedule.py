"""Discrete DDPM noise schedules and the training-side quantities derived from them.

Notation: ``alpha_bar[t]`` is the cumulative product of ``1 - beta`` up to train timestep ``t``
(diffusers' ``alphas_cumprod``), so ``x_t = sqrt(alpha_bar) * x0 + sqrt(1 - alpha_bar) * noise``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

PREDICTION_TYPES = ("epsilon", "v_prediction")
BETA_SCHEDULES = ("scaled_linear", "linear", "squaredcos_cap_v2")


@struct.dataclass
class NoiseSchedule:
    """A DDPM noise schedule that can be passed into jitted functions as an argument.

    Attributes:
        betas: ``[T]`` float32 per-step noise variances.
        alphas_cumprod: ``[T]`` float32 cumulative products of ``1 - betas``.
        prediction_type: what the denoiser predicts, ``"epsilon"`` or ``"v_prediction"``. Static
            (part of the pytree structure): changing it recompiles, as it changes the program.
    """

    betas: jax.Array
    alphas_cumprod: jax.Array
    prediction_type: str = struct.field(pytree_node=False, default="epsilon")

    @property
    def num_train_timesteps(self) -> int:
        """T, the number of training timesteps (static: derived from the array shape)."""
        return self.betas.shape[0]


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    # Nichol & Dhariwal's cosine alpha_bar with s = 0.008, discretised as diffusers'
    # "squaredcos_cap_v2": beta_i = 1 - f((i+1)/T) / f(i/T), capped to keep alpha_bar > 0.
    def alpha_bar(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    n = num_train_timesteps
    return np.array(
        [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)],
        dtype=np.float64,
    )


def _schedule_from_betas(betas: np.ndarray, prediction_type: str) -> NoiseSchedule:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be in {PREDICTION_TYPES}, got {prediction_type!r}")
    betas = np.asarray(betas, dtype=np.float64)
    # Host-side float64 then one rounding to float32: the cumulative product over 1000 steps
    # stays within ~1e-6 relative of diffusers' float32 torch values, and is the more accurate.
    alphas_cumprod = np.cumprod(1.0 - betas)
    return NoiseSchedule(
        betas=jnp.asarray(betas, dtype=jnp.float32),
        alphas_cumprod=jnp.asarray(alphas_cumprod, dtype=jnp.float32),
        prediction_type=prediction_type,
    )


def make_schedule(
    beta_schedule: str = "scaled_linear",
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    num_train_timesteps: int = 1000,
    prediction_type: str = "epsilon",
) -> NoiseSchedule:
    """Builds a schedule with diffusers' definitions; the defaults are Stable Diffusion's.

    ``"scaled_linear"`` is linear in ``sqrt(beta)``, ``"linear"`` linear in ``beta``,
    ``"squaredcos_cap_v2"`` the cosine schedule (``beta_start`` / ``beta_end`` unused).
    """
    if beta_schedule == "scaled_linear":
        betas = np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps) ** 2
    elif beta_schedule == "linear":
        betas = np.linspace(beta_start, beta_end, num_train_timesteps)
    elif beta_schedule == "squaredcos_cap_v2":
        betas = _cosine_betas(num_train_timesteps)
    else:
        raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {beta_schedule!r}")
    return _schedule_from_betas(betas, prediction_type)


def schedule_from_config(config: Mapping[str, Any]) -> NoiseSchedule:
    """Builds a schedule from a diffusers scheduler config dict (``scheduler_config.json``).

    Reads ``beta_start``, ``beta_end``, ``beta_schedule``, ``num_train_timesteps``,
    ``prediction_type`` and ``trained_betas``; a missing key takes ``make_schedule``'s (Stable
    Diffusion's) default. Sampler settings (``steps_offset``, ``set_alpha_to_one``, ...) are
    ignored: the samplers here implement Stable Diffusion's fixed choices (see ``samplers``). A
    config asking for zero-terminal-SNR rescaling is refused rather than silently sampled wrongly.
    """
    if config.get("rescale_betas_zero_snr", False):
        raise ValueError("rescale_betas_zero_snr=True is not supported")
    prediction_type = config.get("prediction_type", "epsilon")
    trained_betas = config.get("trained_betas")
    if trained_betas is not None:
        return _schedule_from_betas(np.asarray(trained_betas), prediction_type)
    return make_schedule(
        beta_schedule=config.get("beta_schedule", "scaled_linear"),
        beta_start=config.get("beta_start", 0.00085),
        beta_end=config.get("beta_end", 0.012),
        num_train_timesteps=config.get("num_train_timesteps", 1000),
        prediction_type=prediction_type,
    )


def load_schedule(folder: str | Path) -> NoiseSchedule:
    """Reads ``<folder>/scheduler/scheduler_config.json`` of a diffusers model folder."""
    path = Path(folder) / "scheduler" / "scheduler_config.json"
    with path.open() as f:
        return schedule_from_config(json.load(f))


def _per_example(values: jax.Array, like: jax.Array) -> jax.Array:
    """``[B]`` -> ``[B, 1, ..., 1]`` so it broadcasts against ``like`` ``[B, ...]``."""
    return values.reshape(values.shape + (1,) * (like.ndim - values.ndim))


def _sqrt_alphas(
    schedule: NoiseSchedule, t: jax.Array, like: jax.Array
) -> tuple[jax.Array, jax.Array]:
    alpha_bar = _per_example(schedule.alphas_cumprod[t], like).astype(like.dtype)
    return jnp.sqrt(alpha_bar), jnp.sqrt(1.0 - alpha_bar)


def add_noise(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """Forward process ``q(x_t | x0)``.

    Args:
        x0: ``[B, ...]`` clean samples.
        noise: ``[B, ...]`` standard normal noise.
        t: ``[B]`` integer train timesteps in ``[0, T)``.

    Returns:
        ``[B, ...]`` ``sqrt(alpha_bar_t) * x0 + sqrt(1 - alpha_bar_t) * noise``.
    """
    a, s = _sqrt_alphas(schedule, t, x0)
    return a * x0 + s * noise


def training_target(
    schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array
) -> jax.Array:
    """What the denoiser should output for ``add_noise(schedule, x0, noise, t)``.

    Shapes as in ``add_noise``. ``noise`` for epsilon prediction; for v prediction
    ``v = sqrt(alpha_bar_t) * noise - sqrt(1 - alpha_bar_t) * x0``.
    """
    if schedule.prediction_type == "epsilon":
        return noise
    a, s = _sqrt_alphas(schedule, t, x0)
    return a * noise - s * x0


def denoised(
    schedule: NoiseSchedule, model_output: jax.Array, x_t: jax.Array, t: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """The clean sample and the noise a model output at ``x_t`` implies: (x0, epsilon), each
    ``[B, ...]``. With a = sqrt(alpha_bar_t), s = sqrt(1 - alpha_bar_t): epsilon prediction
    ``x0 = (x_t - s eps) / a``; v prediction ``x0 = a x_t - s v`` and ``eps = a v + s x_t``."""
    a, s = _sqrt_alphas(schedule, t, x_t)
    if schedule.prediction_type == "epsilon":
        return (x_t - s * model_output) / a, model_output
    if schedule.prediction_type == "v_prediction":
        return a * x_t - s * model_output, a * model_output + s * x_t
    raise ValueError(f"unsupported prediction_type {schedule.prediction_type!r}")


def snr(schedule: NoiseSchedule, t: jax.Array) -> jax.Array:
    """Signal-to-noise ratio ``alpha_bar_t / (1 - alpha_bar_t)``; ``t`` any int shape, same out."""
    alpha_bar = schedule.alphas_cumprod[t]
    return alpha_bar / (1.0 - alpha_bar)


def snr_weighted_timestep_probabilities(schedule: NoiseSchedule) -> jax.Array:
    """TextBoost's timestep distribution ``[T]`` float32: with ``lambda_t = log SNR(t)``,
    ``w_t = max_s lambda_s - lambda_t`` and ``p_t = w_t / sum_s w_t``. The weight grows as the
    SNR falls, so noisy steps (where the text matters most) are drawn more often; the cleanest
    step (the largest SNR) gets 0."""
    log_snr = jnp.log(snr(schedule, jnp.arange(schedule.num_train_timesteps)))
    weights = jnp.max(log_snr) - log_snr
    return weights / jnp.sum(weights)


TIMESTEP_SAMPLING = ("uniform", "snr_weighted")  # a stage's `timestep_sampling`


def sample_timesteps(key: jax.Array, batch: int, schedule: NoiseSchedule) -> jax.Array:
    """``[batch]`` int32 timesteps drawn uniformly from ``[0, T)``."""
    return jax.random.randint(key, (batch,), 0, schedule.num_train_timesteps, dtype=jnp.int32)
