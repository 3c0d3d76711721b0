"""Noise schedules, training targets, samplers and classifier-free guidance.

Knows nothing of methods: everything here is a pure function of arrays and a ``NoiseSchedule``.
"""

from core_jax.diffusion.guidance import cfg_combine, guided
from core_jax.diffusion.samplers import (
    SAMPLERS,
    ModelFn,
    ddim_step,
    dpmpp_2m_step,
    inference_timesteps,
    sample,
)
from core_jax.diffusion.schedule import (
    TIMESTEP_SAMPLING,
    NoiseSchedule,
    add_noise,
    denoised,
    load_schedule,
    make_schedule,
    sample_timesteps,
    schedule_from_config,
    snr,
    snr_weighted_timestep_probabilities,
    training_target,
)

__all__ = [
    "SAMPLERS",
    "TIMESTEP_SAMPLING",
    "ModelFn",
    "NoiseSchedule",
    "add_noise",
    "cfg_combine",
    "ddim_step",
    "denoised",
    "dpmpp_2m_step",
    "guided",
    "inference_timesteps",
    "load_schedule",
    "make_schedule",
    "sample",
    "sample_timesteps",
    "schedule_from_config",
    "snr",
    "snr_weighted_timestep_probabilities",
    "training_target",
]
