"""DDIM and DPM-Solver++ 2M samplers, each a single jitted ``lax.scan`` over the steps.

What is matched (and tested against diffusers step by step):

- ``"ddim"``: ``DDIMScheduler`` as Stable Diffusion 1.x/2.x configure it: ``timestep_spacing=
  "leading"``, ``steps_offset=1``, ``set_alpha_to_one=False`` (the last step lands on
  ``alpha_bar[0]``, not 1), ``clip_sample=False``, no thresholding; ``eta`` as in the DDIM paper.
- ``"dpmpp_2m"``: ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
  solver_type="midpoint", lower_order_final=True, final_sigmas_type="zero",
  timestep_spacing="linspace")``, no Karras/exponential sigmas, no thresholding. That is what
  ``DPMSolverMultistepScheduler.from_config(<SD scheduler config>)`` gives, since SD configs carry
  no ``timestep_spacing`` key. The first step is first order (no history yet) and so is the last
  one: its target sigma is zero, where diffusers always falls back to first order.

Both accept epsilon and v_prediction model outputs (``NoiseSchedule.prediction_type``). Step
arithmetic is float32 whatever the sample dtype.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from core_jax.diffusion.schedule import NoiseSchedule

SAMPLERS = ("ddim", "dpmpp_2m")

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]
"""``model_fn(x_t [B, ...], t [B] int32) -> model output [B, ...]`` (epsilon or v)."""


def inference_timesteps(
    schedule: NoiseSchedule, num_inference_steps: int, sampler: str = "ddim"
) -> np.ndarray:
    """The descending train timesteps a sampler visits, ``[num_inference_steps]`` int32.

    ``"ddim"``: leading spacing with offset 1, ``k * (T // n) + 1`` (SD 1.5, 50 steps:
    981, 961, ..., 1). ``"dpmpp_2m"``: linspace spacing, ``round(linspace(0, T - 1, n + 1))``
    reversed without its final 0 (50 steps: 999, 979, ..., 20).
    """
    num_train = schedule.num_train_timesteps
    n = num_inference_steps
    # n == T would make the leading spacing's offset point one past the last train timestep.
    if not 1 <= n < num_train:
        raise ValueError(f"num_inference_steps must be in [1, {num_train}), got {n}")
    if sampler == "ddim":
        steps = np.arange(n)[::-1] * (num_train // n) + 1
    elif sampler == "dpmpp_2m":
        steps = np.linspace(0, num_train - 1, n + 1).round()[::-1][:-1]
    else:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    return steps.astype(np.int32)


def _x0_and_eps(
    model_output: jax.Array, sample: jax.Array, alpha_bar: jax.Array, prediction_type: str
) -> tuple[jax.Array, jax.Array]:
    """Converts a model output at noise level ``alpha_bar`` into (predicted x0, predicted noise)."""
    alpha, sigma = jnp.sqrt(alpha_bar), jnp.sqrt(1.0 - alpha_bar)
    if prediction_type == "epsilon":
        return (sample - sigma * model_output) / alpha, model_output
    if prediction_type == "v_prediction":
        return alpha * sample - sigma * model_output, alpha * model_output + sigma * sample
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


def ddim_step(
    schedule: NoiseSchedule,
    model_output: jax.Array,
    sample: jax.Array,
    t: jax.Array | int,
    t_prev: jax.Array | int,
    eta: float = 0.0,
    noise: jax.Array | None = None,
) -> jax.Array:
    """One DDIM update from train timestep ``t`` to the less noisy ``t_prev``.

    Args:
        model_output: ``[B, ...]`` the model's epsilon or v at ``(sample, t)``.
        sample: ``[B, ...]`` the current ``x_t``.
        t: scalar int, current train timestep.
        t_prev: scalar int, the timestep the step lands on; negative for the end of the chain,
            which lands on ``alpha_bar[0]`` (diffusers' ``set_alpha_to_one=False``).
        eta: static float, 0 for deterministic DDIM, 1 for DDPM-like ancestral noise.
        noise: ``[B, ...]`` standard normal noise, required when ``eta > 0``.

    Returns:
        ``[B, ...]`` float32 ``x_{t_prev}``.
    """
    alpha_bar = schedule.alphas_cumprod[t]
    # Clamping the end-of-chain marker to index 0 is exactly set_alpha_to_one=False.
    alpha_bar_prev = schedule.alphas_cumprod[jnp.maximum(t_prev, 0)]
    x0, eps = _x0_and_eps(model_output, sample, alpha_bar, schedule.prediction_type)
    prev = jnp.sqrt(alpha_bar_prev) * x0
    if eta == 0.0:
        return prev + jnp.sqrt(1.0 - alpha_bar_prev) * eps
    if noise is None:
        raise ValueError("ddim_step with eta > 0 needs noise")
    # DDIM paper eq. 16: the posterior std scaled by eta, taken out of the direction term.
    variance = (1.0 - alpha_bar_prev) / (1.0 - alpha_bar) * (1.0 - alpha_bar / alpha_bar_prev)
    std = eta * jnp.sqrt(variance)
    return prev + jnp.sqrt(1.0 - alpha_bar_prev - std**2) * eps + std * noise


def dpmpp_2m_step(
    schedule: NoiseSchedule,
    model_output: jax.Array,
    sample: jax.Array,
    t: jax.Array | int,
    t_next: jax.Array | int,
    prev_x0: jax.Array,
    t_last: jax.Array | int,
    second_order: jax.Array | bool,
) -> tuple[jax.Array, jax.Array]:
    """One DPM-Solver++ 2M (multistep, midpoint) update from ``t`` to the less noisy ``t_next``.

    Args:
        model_output: ``[B, ...]`` the model's epsilon or v at ``(sample, t)``.
        sample: ``[B, ...]`` the current ``x_t``.
        t: scalar int, current train timestep.
        t_next: scalar int, the timestep the step lands on; negative for the end of the chain
            (sigma = 0, so the result is the predicted x0).
        prev_x0: ``[B, ...]`` the x0 predicted at the previous step (any values if
            ``second_order`` is false).
        t_last: scalar int, the timestep of the previous step (any value in ``[0, T)`` if
            ``second_order`` is false).
        second_order: scalar bool; false gives the first-order update (DDIM in data space).

    Returns:
        ``(x_{t_next}, x0)``: ``[B, ...]`` float32 new sample, and this step's predicted x0 which
        the next step needs as ``prev_x0``.
    """
    alphas_cumprod = schedule.alphas_cumprod
    alpha_bar = alphas_cumprod[t]
    alpha_bar_next = jnp.where(t_next >= 0, alphas_cumprod[jnp.maximum(t_next, 0)], 1.0)
    alpha_bar_last = alphas_cumprod[t_last]
    x0, _ = _x0_and_eps(model_output, sample, alpha_bar, schedule.prediction_type)

    def alpha_sigma_lambda(a_bar: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        alpha, sigma = jnp.sqrt(a_bar), jnp.sqrt(1.0 - a_bar)
        return alpha, sigma, jnp.log(alpha) - jnp.log(sigma)

    alpha_s, sigma_s, lambda_s = alpha_sigma_lambda(alpha_bar)
    alpha_n, sigma_n, lambda_n = alpha_sigma_lambda(alpha_bar_next)
    _, _, lambda_l = alpha_sigma_lambda(alpha_bar_last)
    h = lambda_n - lambda_s
    # exp(-h) written as a ratio of noise-to-signal ratios: exactly 0 at the end (sigma_n = 0)
    # where h itself is infinite.
    phi = (sigma_n / alpha_n) / (sigma_s / alpha_s) - 1.0
    x_next = (sigma_n / sigma_s) * sample - alpha_n * phi * x0
    # D1 = (x0 - prev_x0) / r0 with r0 = h_last / h. On first-order steps h may be infinite (end of
    # chain) and h_last zero (no history): substitute finite values so no NaN is ever formed.
    h_last = jnp.where(second_order, lambda_s - lambda_l, 1.0)
    inv_r0 = jnp.where(second_order, h, 0.0) / h_last
    x_next = x_next - 0.5 * alpha_n * phi * inv_r0 * (x0 - prev_x0)
    return x_next, x0


@functools.partial(jax.jit, static_argnames=("model_fn", "num_inference_steps", "sampler", "eta"))
def sample(
    model_fn: ModelFn,
    x_T: jax.Array,
    schedule: NoiseSchedule,
    num_inference_steps: int,
    sampler: str = "ddim",
    eta: float = 0.0,
    key: jax.Array | None = None,
) -> jax.Array:
    """Runs a whole sampling chain as one compiled program (a ``lax.scan`` over the steps).

    ``model_fn`` is static: jit caches on its identity, so build it once (a fresh lambda per
    call recompiles). To keep weights as runtime arguments rather than baked-in constants, call
    ``sample`` inside your own ``jax.jit`` whose arguments include the params and let ``model_fn``
    close over them there.

    Args:
        model_fn: ``(x_t [B, ...], t [B] int32) -> [B, ...]`` epsilon or v, per
            ``schedule.prediction_type``. Receives float32 ``x_t``.
        x_T: ``[B, ...]`` initial noise (unit variance; no scaling is applied).
        schedule: the training noise schedule.
        num_inference_steps: static number of model evaluations.
        sampler: ``"ddim"`` or ``"dpmpp_2m"``.
        eta: DDIM stochasticity (static); only ``"ddim"`` accepts a nonzero value.
        key: PRNG key, required when ``eta > 0``.

    Returns:
        ``[B, ...]`` the final sample, in ``x_T``'s dtype.
    """
    timesteps = inference_timesteps(schedule, num_inference_steps, sampler)
    # -1 marks "end of chain" for the step functions.
    t_next = np.append(timesteps[1:], -1).astype(np.int32)
    x = x_T.astype(jnp.promote_types(x_T.dtype, jnp.float32))
    t_batch = functools.partial(jnp.full, (x_T.shape[0],), dtype=jnp.int32)

    if sampler == "ddim":
        if eta > 0 and key is None:
            raise ValueError("sampling with eta > 0 needs a key")

        def ddim_body(x: jax.Array, step: tuple) -> tuple[jax.Array, None]:
            i, t, t_prev = step
            out = model_fn(x, t_batch(t))
            noise = None
            if eta > 0:
                noise = jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
            return ddim_step(schedule, out, x, t, t_prev, eta, noise).astype(x.dtype), None

        steps = (np.arange(num_inference_steps), timesteps, t_next)
        x, _ = jax.lax.scan(ddim_body, x, steps)
        return x.astype(x_T.dtype)

    if eta != 0.0:
        raise ValueError(f"eta is a DDIM parameter; {sampler} is deterministic")
    t_last = np.insert(timesteps[:-1], 0, timesteps[0])
    # First order at the first step (no history) and the last (target sigma is zero).
    step_index = np.arange(num_inference_steps)
    second_order = (step_index > 0) & (step_index < num_inference_steps - 1)

    def dpm_body(carry: tuple, step: tuple) -> tuple[tuple, None]:
        x, prev_x0 = carry
        t, t_nxt, t_lst, order2 = step
        out = model_fn(x, t_batch(t))
        x_new, x0 = dpmpp_2m_step(schedule, out, x, t, t_nxt, prev_x0, t_lst, order2)
        return (x_new.astype(x.dtype), x0.astype(x.dtype)), None

    steps = (timesteps, t_next, t_last, second_order)
    (x, _), _ = jax.lax.scan(dpm_body, (x, jnp.zeros_like(x)), steps)
    return x.astype(x_T.dtype)
