"""Benchmarks of the compiled programs: compile time, step time, memory and FLOPs per variant.

Variants (stage 1 unless said otherwise): `ti` (diffusion loss only), `emb` (+ L_emb), `attn`
(+ L_attn), `core` (both), `core_all` (+ pairwise and hinge), `unet` (the stage-2 step: the whole
U-Net trains) and `sample` (a 50-step DDIM chain with classifier-free guidance).

Each JAX variant is measured the same way: trace + lower (`jit(...).lower`), XLA compile
(`.compile()`) and the first call of the compiled program, each timed on its own; then steady
steps, each blocked on its result (as the PyTorch loop's `.item()`), carrying the donated state
from step to step. FLOPs come from XLA's cost analysis of the same step traced with explicit
attention (the analysis counts a loop body once, so the chunked attention's loops would hide
most of the attention FLOPs); for `sample`, one guided U-Net call times the number of steps.

`run_components` times the single pieces the optimizations of BENCHMARKS.md are about, against
PyTorch where it has the same piece.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import json
import os
import platform
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from core_jax import _runtime
from core_jax.diffusion import guided, sample
from core_jax.models import attention
from core_jax.models.layers import GroupNorm
from core_jax.train import stage2
from core_jax.train.step import make_mesh, shard_stage1_step
from core_jax.train.synthetic import Stage1Setup, random_stage1_setup

STAGE1_TERMS: dict[str, dict[str, bool]] = {
    "ti": dict(use_emb=False, use_attn=False),
    "emb": dict(use_emb=True, use_attn=False),
    "attn": dict(use_emb=False, use_attn=True),
    "core": dict(use_emb=True, use_attn=True),
    "core_all": dict(use_emb=True, use_attn=True, use_pairwise=True, use_hinge=True),
}
VARIANTS = (*STAGE1_TERMS, "unet", "sample")
TORCH_VARIANTS = ("ti", "emb", "attn", "core", "core_all", "unet")  # torch_reference.VARIANTS
COMPONENTS = ("attention", "group_norm", "unet")
# XLA:CPU's default library fusions minus INDIVIDUAL_CONVOLUTION: convolutions go back to Eigen
# (what XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-individual_convolution does).
NO_YNN_CONVOLUTIONS = {
    "xla_cpu_experimental_ynn_fusion_type":
        "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE",
}
# The weights benchmarks/torch_reference.py uses (the official code's and the thesis code's),
# so both frameworks run the same terms with the same loss variants.
TORCH_MATCHED_WEIGHTS = dict(
    lambda_emb=1.5e-4, lambda_attn=0.05, lambda_pairwise=0.015, lambda_hinge=1.0,
    hinge_margin=0.7,
)
_TORCH_REFERENCE = Path(__file__).resolve().parent.parent / "benchmarks" / "torch_reference.py"


@dataclasses.dataclass
class Result:
    """One variant's measurement; times in seconds, memory in MB, FLOPs per step."""

    variant: str
    framework: str
    preset: str
    batch: int  # examples per step, all concepts together
    steps: int  # timed steps
    median_s: float
    min_s: float
    max_s: float
    examples_per_s: float
    concepts: int = 1
    lower_s: float | None = None
    compile_s: float | None = None
    first_call_s: float | None = None
    peak_rss_mb: float | None = None  # process RSS, sampled during the first call and steps
    xla_temp_mb: float | None = None  # XLA's scratch buffer for one call (memory analysis)
    device_peak_mb: float | None = None  # accelerators only
    flops: float | None = None
    flops_per_s: float | None = None
    ratio_to_ti: float | None = None  # median_s / the same framework's TI median_s
    dtype: str = "float32"  # compute dtype
    note: str = ""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))


# --- measuring --------------------------------------------------------------------------------


class _PeakRss:
    """Samples this process's resident memory every few milliseconds while active."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s, self.peak_bytes = interval_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def _rss(self) -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self._page
        except OSError:  # not Linux: the process's lifetime peak is the best there is
            scale = 1 if sys.platform == "darwin" else 1024
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self._rss())
            time.sleep(self.interval_s)

    def __enter__(self) -> _PeakRss:
        self.peak_bytes = self._rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, self._rss())

    @property
    def peak_mb(self) -> float:
        return round(self.peak_bytes / 2**20, 1)


def _device_peak_mb() -> float | None:
    stats = jax.devices()[0].memory_stats()
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return round(stats["peak_bytes_in_use"] / 2**20, 1)


def _flops(lowered: jax.stages.Lowered) -> float | None:
    analysis = lowered.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older JAX: one dict per program
        analysis = analysis[0] if analysis else None
    return float(analysis["flops"]) if analysis and "flops" in analysis else None


@dataclasses.dataclass
class Program:
    """A jitted function with its first arguments; `carry(output, args)` gives the next call's
    arguments (the donated state moves forward), or None to reuse `args`."""

    jitted: Any
    args: tuple
    carry: Callable[[Any, tuple], tuple] | None = None


def time_program(
    program: Program, *, steps: int, warmup: int, flops: float | None
) -> dict[str, Any]:
    """Lower, compile and run `program`: the timing fields of a `Result`."""
    start = time.perf_counter()
    lowered = program.jitted.lower(*program.args)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    compiled_at = time.perf_counter()
    memory = compiled.memory_analysis()
    args = jax.device_put(program.args, compiled.input_shardings[0])
    times = []
    with _PeakRss() as rss:
        for _ in range(1 + warmup + steps):
            begin = time.perf_counter()
            out = jax.block_until_ready(compiled(*args))
            times.append(time.perf_counter() - begin)
            if program.carry is not None:
                args = program.carry(out, args)
    steady = times[1 + warmup:]
    median = statistics.median(steady)
    return dict(
        steps=steps, median_s=median, min_s=min(steady), max_s=max(steady),
        lower_s=lowered_at - start, compile_s=compiled_at - lowered_at, first_call_s=times[0],
        peak_rss_mb=rss.peak_mb, device_peak_mb=_device_peak_mb(),
        xla_temp_mb=round(memory.temp_size_in_bytes / 2**20, 1) if memory else None,
        flops=flops, flops_per_s=flops / median if flops else None,
    )


# --- the programs -----------------------------------------------------------------------------


def build_setup(
    preset: str, batch: int, concepts: int = 1, dtype: str = "float32"
) -> Stage1Setup:
    """Random-weight models and concept data shared by every variant of one run; `dtype` is
    the compute dtype (parameters stay float32, as in training)."""
    return random_stage1_setup(
        preset, num_concepts=concepts, batch_size=batch, dtype=dtype,
        weights=TORCH_MATCHED_WEIGHTS, emb_variant="code", attn_variant="code",
    )


def _fresh(tree: Any) -> Any:
    """A copy the program may donate without invalidating the shared setup."""
    return jax.tree.map(jnp.copy, tree)


def _single_device_mesh() -> jax.sharding.Mesh:
    return make_mesh(1, jax.devices()[:1])


def stage1_program(setup: Stage1Setup, variant: str) -> Program:
    """The stage-1 step with `variant`'s terms, on one device."""
    config = dataclasses.replace(setup.config, **{
        "use_pairwise": False, "use_hinge": False, **STAGE1_TERMS[variant],
    })
    kwargs = {**setup.step_kwargs(), "config": config}
    step = shard_stage1_step(_single_device_mesh(), **kwargs)
    args = (_fresh(setup.state), *setup.args()[1:])
    return Program(step.jitted, args, lambda out, args: (out[0], *args[1:]))


def unet_program(setup: Stage1Setup) -> Program:
    """The stage-2 step (`core_jax.train.stage2`): U-Net forward, backward and AdamW."""
    optimizer = stage2.make_unet_optimizer()
    step = stage2.shard_stage2_step(
        _single_device_mesh(), unet=setup.unet, optimizer=optimizer,
        batch_size=setup.config.batch_size,
    )
    state = stage2.init_unet_state(setup.frozen["unet"], 0, optimizer)
    # Any frozen [T, D] encoding serves as the caption's: the cost does not depend on it.
    context = setup.data.cat_hidden[0, 0]
    return Program(
        step.jitted, (state, setup.data, context, setup.schedule),
        lambda out, args: (out[0], *args[1:]),
    )


def _guided_unet(setup: Stage1Setup, guidance_scale: float) -> Callable[..., jax.Array]:
    def chain_model(params: Any, context: jax.Array) -> Callable[..., jax.Array]:
        def model_fn(x: jax.Array, t: jax.Array) -> jax.Array:
            return setup.unet.apply({"params": params}, x, t, context)

        return guided(model_fn, guidance_scale)

    return chain_model


def sample_program(
    setup: Stage1Setup, batch: int, num_inference_steps: int = 50, guidance_scale: float = 7.5
) -> Program:
    """A DDIM chain of `num_inference_steps` guided U-Net calls for `batch` images: the
    denoising loop `core_jax.sample` compiles, without its text encoding and VAE decode."""
    chain_model = _guided_unet(setup, guidance_scale)
    cat = setup.data.cat_hidden[0]  # [N, T, D] frozen encodings stand in for the prompts
    uncond = jnp.repeat(cat[:1], batch, axis=0)
    context = jnp.concatenate([uncond, jnp.resize(cat, (batch,) + cat.shape[1:])])
    size = setup.unet.config.sample_size
    x_T = jax.random.normal(jax.random.key(0), (batch, size, size, setup.unet.config.in_channels))

    def chain(params: Any, x_T: jax.Array, context: jax.Array) -> jax.Array:
        return sample(chain_model(params, context), x_T, setup.schedule, num_inference_steps)

    return Program(jax.jit(chain), (setup.frozen["unet"], x_T, context))


def _sample_flops(
    setup: Stage1Setup, program: Program, num_inference_steps: int, guidance_scale: float = 7.5
) -> float | None:
    """FLOPs of one chain: one guided U-Net call (explicit attention) x the number of steps."""
    params, x_T, context = program.args
    model = _guided_unet(setup, guidance_scale)

    def one_call(params: Any, x: jax.Array, context: jax.Array) -> jax.Array:
        return model(params, context)(x, jnp.full((x.shape[0],), 500, jnp.int32))

    with attention.explicit_attention_only():
        per_call = _flops(jax.jit(one_call).lower(params, x_T, context))
    return per_call * num_inference_steps if per_call else None


def _program(setup: Stage1Setup, variant: str, sample_batch: int, sample_steps: int) -> Program:
    if variant in STAGE1_TERMS:
        return stage1_program(setup, variant)
    if variant == "unet":
        return unet_program(setup)
    if variant == "sample":
        return sample_program(setup, sample_batch, sample_steps)
    raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")


def measure_jax(
    setup: Stage1Setup,
    preset: str,
    variant: str,
    *,
    steps: int,
    warmup: int = 1,
    sample_batch: int = 1,
    sample_steps: int = 50,
) -> Result:
    """Time one JAX variant on `setup` (see the module docstring for what is timed)."""
    build = functools.partial(_program, setup, variant, sample_batch, sample_steps)
    if variant == "sample":
        program = build()
        flops = _sample_flops(setup, program, sample_steps)
        batch = sample_batch
        note = f"one {sample_steps}-step DDIM chain per step; 2 x {sample_batch} U-Net rows (CFG)"
    else:
        with attention.explicit_attention_only():
            counted = build()  # a fresh trace: jit caches traces by function, not by context
            flops = _flops(counted.jitted.lower(*counted.args))
        program = build()
        batch, note = setup.config.batch_size * int(setup.state.embeds.shape[0]), ""
    timing = time_program(program, steps=steps, warmup=warmup, flops=flops)
    return Result(
        variant=variant, framework="jax", preset=preset, batch=batch,
        concepts=int(setup.state.embeds.shape[0]), examples_per_s=batch / timing["median_s"],
        dtype=jnp.dtype(setup.unet.dtype).name, note=note, **timing,
    )


@functools.cache
def load_torch_reference() -> ModuleType:
    """`benchmarks/torch_reference.py` of this source checkout (it is not part of the package)."""
    if not _TORCH_REFERENCE.exists():
        raise FileNotFoundError(
            f"--vs-torch needs {_TORCH_REFERENCE} (a source checkout with torch and diffusers)"
        )
    spec = importlib.util.spec_from_file_location("core_jax_torch_reference", _TORCH_REFERENCE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measure_torch(
    preset: str, variant: str, *, batch: int, steps: int, warmup: int, threads: int | None
) -> Result:
    """benchmarks/torch_reference.py's `run_benchmark` in this process, as a `Result`."""
    reference = load_torch_reference()
    with _PeakRss() as rss:
        r = reference.run_benchmark(
            preset, variant, steps=steps, batch=batch, warmup=warmup, threads=threads
        )
    return Result(
        variant=variant, framework="torch", preset=preset, batch=r["batch"], steps=r["steps"],
        median_s=r["median_s"], min_s=r["min_s"], max_s=r["max_s"],
        examples_per_s=r["examples_per_s"], peak_rss_mb=rss.peak_mb,
        note=f"torch {r['torch_version']}, {r['threads']} threads",
    )


# --- suites -----------------------------------------------------------------------------------


def with_concepts(setup: Stage1Setup, concepts: int, batch_per_concept: int) -> Stage1Setup:
    """The first `concepts` concepts of `setup`, `batch_per_concept` rows each."""
    first = functools.partial(jax.tree.map, lambda x: x[:concepts])
    return dataclasses.replace(
        setup, data=first(setup.data), hypers=first(setup.hypers), state=first(setup.state),
        config=dataclasses.replace(setup.config, batch_size=batch_per_concept),
    )


def _ordered(variants: Sequence[str]) -> list[str]:
    """TI first, so every later variant's ratio to it is known when it is reported."""
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise ValueError(f"unknown variants {unknown}; choose from {VARIANTS}")
    return sorted(dict.fromkeys(variants), key=lambda v: v != "ti")


def run_suite(
    preset: str,
    variants: Sequence[str],
    *,
    batch: int,
    steps: int,
    warmup: int = 1,
    vs_torch: bool = False,
    torch_threads: int | None = None,
    sample_batch: int = 1,
    sample_steps: int = 50,
    sample_chains: int | None = None,
    setup: Stage1Setup | None = None,
    emit: Callable[[Result], None] = lambda r: None,
) -> list[Result]:
    """Every variant in JAX, each followed by the same variant in PyTorch when `vs_torch`
    (interleaved, so slow drifts of the machine hit both alike). `emit` sees each result as it
    is made; ratios to TI are filled in when TI is among the variants. `sample` times
    `sample_chains` whole chains (default: `steps`)."""
    setup = setup or build_setup(preset, batch)
    if setup.state.embeds.shape[0] != 1 or setup.config.batch_size != batch:
        setup = with_concepts(setup, 1, batch)
    results: list[Result] = []
    ti: dict[str, float] = {}
    for variant in _ordered(variants):
        timed = (sample_chains or steps) if variant == "sample" else steps
        runs = [lambda v=variant, n=timed: measure_jax(
            setup, preset, v, steps=n, warmup=warmup, sample_batch=sample_batch,
            sample_steps=sample_steps,
        )]
        if vs_torch and variant in TORCH_VARIANTS:
            runs.append(lambda v=variant: measure_torch(
                preset, v, batch=batch, steps=steps, warmup=warmup, threads=torch_threads
            ))
        for run in runs:
            result = run()
            if result.variant == "ti":
                ti[result.framework] = result.median_s
            if result.framework in ti and result.variant != "sample":
                result.ratio_to_ti = result.median_s / ti[result.framework]
            results.append(result)
            emit(result)
    return results


def run_scaling(
    preset: str,
    concepts: Sequence[int],
    *,
    variant: str = "core",
    batch_per_concept: int,
    steps: int,
    warmup: int = 1,
    setup: Stage1Setup | None = None,
    emit: Callable[[Result], None] = lambda r: None,
) -> list[Result]:
    """The stage-1 `variant` with C concepts packed in one step, `batch_per_concept` rows each;
    `ratio_to_ti` here is the step time relative to C = 1 (ideal scaling: C)."""
    if variant not in STAGE1_TERMS:
        raise ValueError(f"scaling runs a stage-1 variant, one of {tuple(STAGE1_TERMS)}")
    setup = setup or build_setup(preset, batch_per_concept, max(concepts))
    results: list[Result] = []
    for count in sorted(concepts):
        result = measure_jax(
            with_concepts(setup, count, batch_per_concept), preset, variant, steps=steps,
            warmup=warmup,
        )
        result.note = (
            f"{count} concepts x {batch_per_concept} rows: "
            f"{result.median_s / count:.3f} s per concept-step"
        )
        if results:
            result.ratio_to_ti = result.median_s / results[0].median_s
        results.append(result)
        emit(result)
    return results


# --- components -------------------------------------------------------------------------------


def _interleaved(candidates: Sequence[Callable[[], Any]], repeats: int) -> list[list[float]]:
    """Seconds per call of each candidate, called round-robin `repeats` times after one
    untimed call each: on a shared machine, load changes hit every candidate alike."""
    for fn in candidates:
        fn()
    times: list[list[float]] = [[] for _ in candidates]
    for _ in range(repeats):
        for fn, record in zip(candidates, times, strict=True):
            begin = time.perf_counter()
            fn()
            record.append(time.perf_counter() - begin)
    return times


def _component(name: str, framework: str, times: list[float], note: str) -> Result:
    median = statistics.median(times)
    return Result(
        variant=name, framework=framework, preset="bench_small", batch=6, steps=len(times),
        median_s=median, min_s=min(times), max_s=max(times), examples_per_s=6 / median,
        note=note,
    )


def group_norm_by_reshape(x: jax.Array, scale: jax.Array, bias: jax.Array, groups: int,
                          eps: float) -> jax.Array:
    """GroupNorm written the textbook way (reshape to [..., groups, C / groups]): the baseline
    `layers.GroupNorm`'s per-channel formulation is measured against."""
    shape = x.shape
    g = x.reshape(shape[0], -1, groups, shape[-1] // groups)
    mean = jnp.mean(g, axis=(1, 3), keepdims=True)
    var = jnp.mean(jnp.square(g - mean), axis=(1, 3), keepdims=True)
    return ((g - mean) * jax.lax.rsqrt(var + eps)).reshape(shape) * scale + bias


def _jax_fwd_bwd(fn: Callable[..., jax.Array], *args: jax.Array) -> Callable[[], Any]:
    """A no-argument callable running fn's forward and backward (w.r.t. every argument) with a
    fixed random cotangent, blocked on the result."""
    out_shape = jax.eval_shape(fn, *args)
    cotangent = jax.random.normal(jax.random.key(1), out_shape.shape, out_shape.dtype)
    run = jax.jit(lambda *a: jax.vjp(fn, *a)[1](cotangent))
    return lambda: jax.block_until_ready(run(*args))


def run_components(
    components: Sequence[str],
    *,
    repeats: int = 10,
    vs_torch: bool = False,
    torch_threads: int | None = None,
    emit: Callable[[Result], None] = lambda r: None,
) -> list[Result]:
    """Forward + backward of single pieces at bench-small shapes (batch 6), JAX and PyTorch,
    the candidates of each piece called round-robin `repeats` times:

    - `attention`: self-attention at 32x32 latents (1024 tokens, 8 heads of 8): the chunked
      (flash-style) form, the explicit form, torch's `scaled_dot_product_attention`;
    - `group_norm`: [6, 32, 32, 64], 32 groups: `layers.GroupNorm` and the reshape form;
    - `unet`: the bench-small U-Net to the conditioning (what stage 1 differentiates), with
      the default (chunked) and the explicit self-attention, and with convolutions compiled
      without YNNPACK; diffusers' U-Net in torch.
    """
    unknown = sorted(set(components) - set(COMPONENTS))
    if unknown:
        raise ValueError(f"unknown components {unknown}; choose from {COMPONENTS}")
    torch = _import_torch(torch_threads) if vs_torch else None
    rng = np.random.default_rng(0)
    results: list[Result] = []
    for component in components:
        # (framework, note, no-argument callable running forward + backward once)
        candidates: list[tuple[str, str, Callable[[], Any]]] = []
        if component == "attention":
            q, k, v = (jnp.asarray(rng.standard_normal((6, 1024, 8, 8)), jnp.float32)
                       for _ in range(3))
            for form, fn in (("chunked", attention.chunked_attention),
                             ("explicit", attention.explicit_attention)):
                candidates.append(("jax", form, _jax_fwd_bwd(
                    lambda q, k, v, fn=fn: fn(q, k, v, 8**-0.5), q, k, v)))
            if torch:
                candidates.append(("torch", "sdpa", _torch_sdpa(torch, q, k, v)))
        elif component == "group_norm":
            x = jnp.asarray(rng.standard_normal((6, 32, 32, 64)), jnp.float32)
            norm = GroupNorm(32)
            params = norm.init(jax.random.key(0), x)["params"]
            candidates.append(("jax", "per-channel sums", _jax_fwd_bwd(
                lambda x, p, norm=norm: norm.apply({"params": p}, x), x, params)))
            candidates.append(("jax", "reshape", _jax_fwd_bwd(
                lambda x, p: group_norm_by_reshape(x, p["scale"], p["bias"], 32, 1e-5),
                x, params)))
            if torch:
                candidates.append(("torch", "F.group_norm", _torch_group_norm(torch, x)))
        elif component == "unet":
            setup = build_setup("bench_small", 6)
            candidates.append(("jax", "chunked self-attention", _unet_to_context(setup)))
            candidates.append(("jax", "explicit self-attention",
                               _unet_to_context(setup, explicit=True)))
            candidates.append(("jax", "chunked, convolutions not in YNNPACK", _unet_to_context(
                setup, compiler_options=NO_YNN_CONVOLUTIONS)))
            if torch:
                candidates.append(("torch", "diffusers", _torch_unet(torch, "bench_small", 6)))
        times = _interleaved([fn for _, _, fn in candidates], repeats)
        for (framework, note, _), record in zip(candidates, times, strict=True):
            result = _component(component, framework, record, note)
            results.append(result)
            emit(result)
    return results


def _unet_to_context(
    setup: Stage1Setup, explicit: bool = False, compiler_options: dict[str, str] | None = None
) -> Callable[[], Any]:
    """Forward + backward of the U-Net (with its attention statistics) to the conditioning, the
    part of the stage-1 step that dominates it; latents, timesteps and context fixed."""
    size, batch = setup.unet.config.sample_size, 6
    x = jax.random.normal(jax.random.key(0), (batch, size, size, 4))
    t = jnp.arange(batch) * 150
    context = setup.data.cat_hidden[0, :1].repeat(batch, 0)
    params = setup.frozen["unet"]

    def run(params: Any, context: jax.Array) -> tuple[jax.Array, jax.Array]:
        def loss(context: jax.Array) -> jax.Array:
            out, _ = setup.unet.apply({"params": params}, x, t, context, mutable=["attn_stats"])
            return jnp.mean(jnp.square(out))

        return jax.value_and_grad(loss)(context)

    form = attention.explicit_attention_only() if explicit else contextlib.nullcontext()
    with form:
        compiled = jax.jit(run).lower(params, context).compile(compiler_options)
    return lambda: jax.block_until_ready(compiled(params, context))


def _import_torch(threads: int | None) -> ModuleType:
    import torch

    torch.set_num_threads(threads or os.cpu_count() or 1)
    return torch


def _torch_fwd_bwd(torch: ModuleType, fn: Callable[..., Any], *arrays: np.ndarray
                   ) -> Callable[[], Any]:
    inputs = [torch.tensor(np.asarray(a)).requires_grad_(True) for a in arrays]
    cotangent = torch.randn_like(fn(*inputs))

    def run() -> Any:
        return torch.autograd.grad(fn(*inputs), inputs, cotangent)

    return run


def _torch_sdpa(torch: ModuleType, q: jax.Array, k: jax.Array, v: jax.Array
                ) -> Callable[[], Any]:
    heads_first = [np.ascontiguousarray(np.asarray(a).transpose(0, 2, 1, 3)) for a in (q, k, v)]
    return _torch_fwd_bwd(torch, torch.nn.functional.scaled_dot_product_attention, *heads_first)


def _torch_group_norm(torch: ModuleType, x: jax.Array) -> Callable[[], Any]:
    channels_first = np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2))
    scale, bias = np.ones(x.shape[-1], np.float32), np.zeros(x.shape[-1], np.float32)
    return _torch_fwd_bwd(
        torch, lambda x, w, b: torch.nn.functional.group_norm(x, 32, w, b, 1e-5),
        channels_first, scale, bias,
    )


def _torch_unet(torch: ModuleType, preset: str, batch: int) -> Callable[[], Any]:
    from diffusers import UNet2DConditionModel

    from core_jax.models.presets import get_preset

    config = get_preset(preset).unet
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(config.to_diffusers()).requires_grad_(False)
    size = config.sample_size
    x, t = torch.randn(batch, 4, size, size), torch.arange(batch) * 150
    context = torch.randn(batch, 77, config.cross_attention_dim, requires_grad=True)

    def run() -> Any:
        loss = unet(x, t, context).sample.square().mean()
        return torch.autograd.grad(loss, context)[0]

    return run


# --- reporting --------------------------------------------------------------------------------


def environment(vs_torch: bool = False) -> dict[str, Any]:
    """Machine, versions and runtime settings, for the record next to the numbers."""
    import flax
    import jaxlib

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {
        "machine": f"{cpu}, {os.cpu_count()} logical cores, {platform.system()}",
        "device": str(jax.devices()[0].device_kind),
        "devices": jax.device_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "allocator": _runtime.allocator_in_use(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    if vs_torch:
        import torch

        info["torch"] = torch.__version__
    return info


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(results: Sequence[Result]) -> str:
    """A Markdown table of `results`, one row each."""
    header = (
        "| variant | framework | C | batch | median s | min s | max s | ex/s | lower s | compile s"
        " | first call s | peak RSS MB | XLA temp MB | GFLOP/step | GFLOP/s | / TI | note |"
    )
    rows = [header, "|" + "|".join(["---"] * (header.count("|") - 1)) + "|"]
    for r in results:
        gflops = None if r.flops is None else r.flops / 1e9
        rate = None if r.flops_per_s is None else r.flops_per_s / 1e9
        rows.append(
            f"| {r.variant} | {r.framework} | {r.concepts} | {r.batch} | {_fmt(r.median_s)}"
            f" | {_fmt(r.min_s)} | {_fmt(r.max_s)} | {_fmt(r.examples_per_s, 2)}"
            f" | {_fmt(r.lower_s, 1)} | {_fmt(r.compile_s, 1)} | {_fmt(r.first_call_s, 2)}"
            f" | {_fmt(r.peak_rss_mb, 0)} | {_fmt(r.xla_temp_mb, 0)} | {_fmt(gflops, 1)}"
            f" | {_fmt(rate, 1)} | {_fmt(r.ratio_to_ti, 2)} | {r.note} |"
        )
    return "\n".join(rows)


def format_comparison(results: Sequence[Result]) -> str:
    """JAX / torch median ratios for variants measured in both (below 1: JAX is faster)."""
    lines = []
    for r in results:
        if r.framework != "jax":
            continue
        torch_result = next(
            (t for t in results if t.framework == "torch" and t.variant == r.variant), None
        )
        if torch_result is None:
            continue
        label = f"{r.variant} ({r.note})" if r.note and r.batch == 0 else r.variant
        lines.append(
            f"{label}: JAX {r.median_s:.3f} s / torch {torch_result.median_s:.3f} s"
            f" = {r.median_s / torch_result.median_s:.2f}"
        )
    return "\n".join(lines)
