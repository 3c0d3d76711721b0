"""core_jax.diffusion against diffusers' schedulers (torch, CPU, fp32).

Tolerance: 1e-5 relative (to the reference's largest magnitude) everywhere. Both sides compute in
float32 but not by the same arithmetic: our alpha_bar is a float64 cumulative product rounded
once (diffusers multiplies in float32; measured gap <= 1.3e-6 relative), DPM-Solver coefficients
come from sqrt(alpha_bar) directly rather than diffusers' sigma -> alpha round trip, and XLA and
torch order reductions and transcendental approximations differently. Each of those is a few
ulp (~1e-7); over a 50-step chain they add up to ~1e-6, so 1e-5 leaves headroom while a wrong
coefficient, timestep or order switch shows up as 1e-3 or worse.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from core_jax import diffusion as dfn

torch = pytest.importorskip("torch")
schedulers = pytest.importorskip("diffusers.schedulers")

RTOL = 1e-5
SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SHAPE = (2, 4, 8, 8)


def assert_close(actual, expected, rtol=RTOL):
    expected = np.asarray(expected, dtype=np.float64)
    scale = max(float(np.abs(expected).max()), 1e-30)
    np.testing.assert_allclose(
        np.asarray(actual, dtype=np.float64), expected, rtol=0, atol=rtol * scale
    )


def ddim_reference(prediction_type):
    # Stable Diffusion 1.x/2.x's DDIM configuration.
    return schedulers.DDIMScheduler(
        num_train_timesteps=1000,
        **SD_BETAS,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type=prediction_type,
    )


def dpm_reference(prediction_type):
    # What DPMSolverMultistepScheduler.from_config(<SD scheduler config>) resolves to.
    return schedulers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        **SD_BETAS,
        algorithm_type="dpmsolver++",
        solver_order=2,
        solver_type="midpoint",
        lower_order_final=True,
        final_sigmas_type="zero",
        timestep_spacing="linspace",
        prediction_type=prediction_type,
    )


REFERENCES = {"ddim": ddim_reference, "dpmpp_2m": dpm_reference}


def sd_schedule(prediction_type="epsilon"):
    return dfn.make_schedule(prediction_type=prediction_type)


@pytest.mark.parametrize(
    "kwargs,cumprod_rtol",
    [
        pytest.param(SD_BETAS, RTOL, id="scaled_linear"),
        pytest.param(
            dict(beta_start=0.0001, beta_end=0.02, beta_schedule="linear"), RTOL, id="linear"
        ),
        # The cosine schedule ends on beta = 0.999; diffusers forms 1 - 0.999 in float32, which
        # leaves ~5e-5 relative error in its last alpha_bar (ours comes from float64).
        pytest.param(dict(beta_schedule="squaredcos_cap_v2"), 1e-4, id="squaredcos_cap_v2"),
    ],
)
def test_schedule_matches_ddpm_scheduler(kwargs, cumprod_rtol):
    ref = schedulers.DDPMScheduler(num_train_timesteps=1000, **kwargs)
    ours = dfn.make_schedule(num_train_timesteps=1000, **kwargs)
    assert ours.num_train_timesteps == 1000
    np.testing.assert_allclose(ours.betas, ref.betas.numpy(), rtol=RTOL)
    np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=cumprod_rtol)


def test_load_schedule_reads_sd_scheduler_config(tmp_path):
    # SD 2.1's scheduler config, with keys that only concern samplers.
    config = {
        "_class_name": "DDIMScheduler",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": False,
        "num_train_timesteps": 1000,
        "prediction_type": "v_prediction",
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "trained_betas": None,
    }
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    schedule = dfn.load_schedule(tmp_path)
    assert schedule.prediction_type == "v_prediction"
    np.testing.assert_array_equal(schedule.alphas_cumprod, sd_schedule().alphas_cumprod)
    with pytest.raises(ValueError, match="rescale_betas_zero_snr"):
        dfn.schedule_from_config({**config, "rescale_betas_zero_snr": True})


def test_add_noise_and_targets_match_diffusers():
    rng = np.random.default_rng(0)
    x0, noise = rng.standard_normal((2, 5, 4, 8, 8), dtype=np.float32)
    t = np.array([0, 1, 500, 998, 999])
    ref = schedulers.DDPMScheduler(num_train_timesteps=1000, **SD_BETAS)
    tx0, tnoise, tt = torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)

    eps_schedule, v_schedule = sd_schedule("epsilon"), sd_schedule("v_prediction")
    assert_close(dfn.add_noise(eps_schedule, x0, noise, t), ref.add_noise(tx0, tnoise, tt))
    assert_close(dfn.training_target(eps_schedule, x0, noise, t), noise)
    assert_close(dfn.training_target(v_schedule, x0, noise, t), ref.get_velocity(tx0, tnoise, tt))


def test_snr_and_sample_timesteps():
    schedule = sd_schedule()
    t = jnp.array([0, 10, 999])
    alpha_bar = np.asarray(schedule.alphas_cumprod)[np.asarray(t)]
    # The same two fp32 operations on the same alpha_bar: 1 - a is exact for a in [0.5, 1] and
    # one correctly rounded division follows. Equal up to the 1 ulp a reciprocal-based
    # division could differ by (~1.2e-7 relative).
    np.testing.assert_allclose(dfn.snr(schedule, t), alpha_bar / (1 - alpha_bar), rtol=2.5e-7)

    drawn = dfn.sample_timesteps(jax.random.key(0), 4096, schedule)
    assert drawn.shape == (4096,) and drawn.dtype == jnp.int32
    assert int(drawn.min()) == 0 and int(drawn.max()) == 999


@pytest.mark.parametrize("sampler", dfn.SAMPLERS)
@pytest.mark.parametrize("steps", [1, 7, 10, 25, 50])
def test_inference_timesteps_match_diffusers(sampler, steps):
    ref = REFERENCES[sampler]("epsilon")
    ref.set_timesteps(steps)
    ours = dfn.inference_timesteps(sd_schedule(), steps, sampler)
    np.testing.assert_array_equal(ours, ref.timesteps.numpy())


@pytest.mark.parametrize(
    "prediction_type,eta", [("epsilon", 0.0), ("v_prediction", 0.0), ("epsilon", 1.0)]
)
def test_ddim_steps_match_diffusers(prediction_type, eta):
    steps = 20
    ref = ddim_reference(prediction_type)
    ref.set_timesteps(steps)
    schedule = sd_schedule(prediction_type)
    timesteps = dfn.inference_timesteps(schedule, steps, "ddim")
    step = jax.jit(dfn.ddim_step, static_argnames="eta")
    rng = np.random.default_rng(1)
    x = rng.standard_normal(SHAPE, dtype=np.float32)
    for i, t in enumerate(timesteps):
        out, noise = rng.standard_normal((2, *SHAPE), dtype=np.float32)
        t_prev = timesteps[i + 1] if i + 1 < steps else -1
        ours = step(schedule, out, x, t, t_prev, eta=eta, noise=noise)
        expected = ref.step(
            torch.from_numpy(out),
            int(t),
            torch.from_numpy(x),
            eta=eta,
            variance_noise=torch.from_numpy(noise),
        ).prev_sample.numpy()
        assert_close(ours, expected)
        x = expected


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_dpmpp_2m_steps_match_diffusers(prediction_type):
    steps = 20
    ref = dpm_reference(prediction_type)
    ref.set_timesteps(steps)
    schedule = sd_schedule(prediction_type)
    timesteps = dfn.inference_timesteps(schedule, steps, "dpmpp_2m")
    step = jax.jit(dfn.dpmpp_2m_step)
    rng = np.random.default_rng(2)
    x = rng.standard_normal(SHAPE, dtype=np.float32)
    prev_x0 = np.zeros(SHAPE, np.float32)
    for i, t in enumerate(timesteps):
        out = rng.standard_normal(SHAPE, dtype=np.float32)
        t_next = timesteps[i + 1] if i + 1 < steps else -1
        t_last = timesteps[max(i - 1, 0)]
        ours, prev_x0 = step(
            schedule, out, x, t, t_next, prev_x0, t_last, second_order=0 < i < steps - 1
        )
        expected = ref.step(torch.from_numpy(out), int(t), torch.from_numpy(x)).prev_sample.numpy()
        assert_close(ours, expected)
        x = expected


def toy_model_numpy(w):
    """A fixed function of (x, t), mirrored in torch and jax, so both chains see the same model."""

    def torch_fn(x, t):
        return 0.8 * x + 0.3 * torch.cos(t.float() / 150) * torch.from_numpy(w)

    def jax_fn(x, t):
        return 0.8 * x + 0.3 * jnp.cos(t.astype(jnp.float32) / 150)[:, None, None, None] * w

    return torch_fn, jax_fn


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("sampler", dfn.SAMPLERS)
def test_sample_trajectory_matches_diffusers(sampler, prediction_type):
    steps = 30
    rng = np.random.default_rng(3)
    x_T, w = rng.standard_normal((2, *SHAPE), dtype=np.float32)
    torch_fn, jax_fn = toy_model_numpy(w)

    ref = REFERENCES[sampler](prediction_type)
    ref.set_timesteps(steps)
    x = torch.from_numpy(x_T)
    for t in ref.timesteps:
        x = ref.step(torch_fn(x, t), t, x).prev_sample

    ours = dfn.sample(jax_fn, x_T, sd_schedule(prediction_type), steps, sampler)
    assert_close(ours, x.numpy())


def test_ddim_eta_zero_is_deterministic_and_eta_uses_key():
    schedule = sd_schedule()
    _, model = toy_model_numpy(np.ones(SHAPE, np.float32))
    x_T = np.random.default_rng(5).standard_normal(SHAPE, dtype=np.float32)
    a = dfn.sample(model, x_T, schedule, 10, key=jax.random.key(1))
    b = dfn.sample(model, x_T, schedule, 10, key=jax.random.key(2))
    np.testing.assert_array_equal(a, b)

    noisy = [
        dfn.sample(model, x_T, schedule, 10, eta=1.0, key=jax.random.key(k)) for k in (1, 1, 2)
    ]
    np.testing.assert_array_equal(noisy[0], noisy[1])
    assert not np.allclose(noisy[0], noisy[2])
    with pytest.raises(ValueError, match="key"):
        dfn.sample(model, x_T, schedule, 10, eta=1.0)


@pytest.mark.parametrize("sampler", dfn.SAMPLERS)
def test_sampling_loop_is_one_compiled_program(sampler):
    traces = []

    def model(x, t):
        traces.append(t.shape)
        return 0.5 * x

    schedule = sd_schedule()
    x_T = jnp.ones(SHAPE)
    jaxpr = jax.make_jaxpr(lambda x: dfn.sample(model, x, schedule, 25, sampler))(x_T)
    # The loop is a scan whose body holds the one model call, not 25 unrolled calls.
    assert traces == [(SHAPE[0],)]
    assert "scan" in str(jaxpr) and len(jaxpr.eqns) == 1 and "jit" in str(jaxpr.eqns[0].primitive)

    dfn.sample(model, x_T, schedule, 25, sampler)
    dfn.sample(model, x_T + 1, schedule, 25, sampler)
    assert len(traces) == 1  # jit reuses the trace for compiling, and the compile for new inputs


def test_sample_inside_outer_jit_takes_params_as_arguments():
    schedule = sd_schedule()

    @jax.jit
    def run(params, x_T, schedule):
        return dfn.sample(lambda x, t: params["scale"] * x, x_T, schedule, 5, "dpmpp_2m")

    x_T = jnp.ones(SHAPE)
    a = run({"scale": jnp.float32(0.5)}, x_T, schedule)
    b = run({"scale": jnp.float32(0.7)}, x_T, schedule)
    assert np.all(np.isfinite(a)) and not np.allclose(a, b)


def test_classifier_free_guidance():
    calls = []
    rng = np.random.default_rng(4)
    uncond_out, cond_out = rng.standard_normal((2, *SHAPE), dtype=np.float32)

    def uncond_cond(x, t):
        calls.append(x.shape[0])
        return jnp.concatenate([uncond_out, cond_out]) + 0 * x

    x, t = jnp.zeros(SHAPE), jnp.zeros(SHAPE[0], jnp.int32)
    u, c = uncond_out.astype(np.float64), cond_out.astype(np.float64)
    for scale in (1.0, 7.5):
        got = np.asarray(dfn.guided(uncond_cond, scale)(x, t), np.float64)
        want = u + scale * (c - u)  # exact (float64) from the same fp32 inputs
        # fp32 rounds d = c - u (by U|d|, carried x scale), scale * d and the sum (by U of each
        # result), U = 2^-24; an FMA skips one of them. The per-element bound, with 2x margin.
        # (Scale 1 is not exactly cond: an atol of 1e-6 was ~1.2x the bound at |values| ~ 3.)
        bound = 2.0**-24 * (2 * scale * np.abs(c - u) + np.abs(want))
        assert np.all(np.abs(got - want) <= 2 * bound), scale
    assert calls == [2 * SHAPE[0], 2 * SHAPE[0]]  # one doubled-batch call per guided evaluation
    np.testing.assert_array_equal(dfn.cfg_combine(uncond_out, cond_out, 0.0), uncond_out)
