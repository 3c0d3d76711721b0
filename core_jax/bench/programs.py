"""The programs the bench times, and how each is built from one random-weight setup.

Variants (stage 1 unless said otherwise): `ti` (diffusion loss only), `emb` (+ L_emb), `attn`
(+ L_attn), `core` (both), `core_all` (+ pairwise and hinge); the U-Net-side methods' steps
(`METHOD_STAGES`): `unet` (CoRe's stage 2: each run's copy of the whole U-Net trains), `lora`
(rank-4 adapters on the attention projections), `svdiff` (spectral shifts of every weight
matrix), `dreambooth` (the U-Net copy with the prior term), `custom_diffusion` (attn2's K/V
and S*, masked loss), `class_diffusion` (that plus ClassDiffusion's semantic loss),
`textboost` (S* and text-encoder LoRA with knowledge preservation), `xti` (S*'s vectors per
cross-attention layer: 16 text passes), `neti` (NeTI's mapper: 16 text passes per row),
`palp` (S* and rank-32 U-Net LoRA with PALP's score-sampling term: four forward-only U-Net
passes on x^_t besides the caption pass), `attn_dreambooth` (AttnDreamBooth's stage 2: every
attn2 projection, the attention mean/var regularizer on the caption pass), `tto` (CoRe's test-time
optimization: L_emb and L_attn, no diffusion loss); and `sample` (a 50-step DDIM chain with
classifier-free guidance).

A step variant is a stage config (`core_jax.config.stage_config`): the stage-1 variants list the
same methods (`STAGE1_METHODS`) and differ only in their weights (a weight of 0 drops its term
from the program); a method variant lists its methods with their defaults and the learning
rate its source trains at. Every variant is built on the models, concept
data and frozen weights of one `build_setup` (no model is made twice); the program comes from
the same `build_program` training uses.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from core_jax.bench.measure import Program, flops
from core_jax.config import STAGE1_METHODS, stage_config
from core_jax.diffusion import guided, sample
from core_jax.models import attention
from core_jax.train.parallel import make_mesh
from core_jax.train.passes import with_shared
from core_jax.train.stages import build_program, stage_numbers, stage_params
from core_jax.train.state import ConceptData
from core_jax.train.step import init_state, shard_step
from core_jax.train.synthetic import Setup, random_setup

# The weights benchmarks/torch_reference.py uses (the official code's and the thesis code's),
# so both frameworks run the same terms with the same loss variants.
TORCH_MATCHED_WEIGHTS = dict(
    lambda_emb=1.5e-4, lambda_attn=0.05, lambda_pairwise=0.015, lambda_hinge=1.0,
    hinge_margin=0.7,
)
# Stage-1 keys every variant shares: the official code's loss variants and learning rate.
STAGE1_KEYS = dict(learning_rate=5e-3, emb_variant="code", attn_variant="code")
# The weighted terms of each stage-1 variant; the other weights are 0 (their terms absent).
STAGE1_TERMS: dict[str, tuple[str, ...]] = {
    "ti": (),
    "emb": ("lambda_emb",),
    "attn": ("lambda_attn",),
    "core": ("lambda_emb", "lambda_attn"),
    "core_all": ("lambda_emb", "lambda_attn", "lambda_pairwise", "lambda_hinge"),
}
# The U-Net-side steps: (methods, stage keys besides batch_size), each method's defaults and
# its source's learning rate. `unet` is stage 2 as CoRe runs it: AdamW at lr 2e-6
# (torch_reference.STAGE2_LR).
METHOD_STAGES: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "unet": (("unet_finetune",), dict(learning_rate=2e-6)),
    "lora": (("lora",), dict(learning_rate=1e-4)),
    "svdiff": (("svdiff",), dict(learning_rate=1e-3)),
    # DreamBooth: the U-Net copy plus the prior term on class rows (the paper's lr 5e-6).
    "dreambooth": (("unet_finetune", "prior_preservation"), dict(learning_rate=5e-6)),
    # Custom Diffusion: attn2's K/V and S*, the masked loss (lr 1e-5 x images, here 6).
    "custom_diffusion": (("custom_diffusion",), dict(learning_rate=6e-5)),
    # ClassDiffusion: Custom Diffusion plus the semantic loss (the script's lr 1e-5 x 2 images).
    "class_diffusion": (("custom_diffusion", "class_diffusion"), dict(learning_rate=2e-5)),
    # TextBoost: S* at 1e-3, the text encoder's q/k/v adapters at 1e-4 (its code's).
    "textboost": (("textual_inversion", "textboost"), dict(
        learning_rate=1e-3, text_lora_learning_rate=1e-4)),
    # XTI / P+: S*'s vectors per cross-attention layer, the text encoder once per layer (lr:
    # core_jax.methods.xti's, [UNVERIFIED] for XTI).
    "xti": (("xti",), dict(learning_rate=5e-3)),
    # PALP: S* and the U-Net's attention LoRA (rank 32) at the paper's lr 5e-5 (appendix C),
    # the score-sampling term at guidance 15 / 7.5 (core_jax.methods.palp's defaults).
    "palp": (("textual_inversion", "palp"), dict(learning_rate=5e-5)),
    # NeTI: the mapper of (timestep, layer), each row's caption encoded per layer with the
    # vectors of its timestep (b x 16 text passes) and the bypass on the values (lr: the code's
    # 1e-3 x 8 images, core_jax.methods.neti).
    "neti": (("neti",), dict(learning_rate=8e-3)),
    # AttnDreamBooth's stage 2 (its code's lr and weights): to_q/k/v/out of attn2, the mean/var
    # regularizer read off the caption pass. The bench caption has no class word, so the token
    # after S* is the end of text: the same work as the real target.
    "attn_dreambooth": (("cross_attention_finetune", "attn_dreambooth"), dict(
        learning_rate=2e-5, lambda_attn_mean=2.0, lambda_attn_var=5.0)),
    # CoRe's test-time optimization (core_jax.tto): the regularizers with the code's variants
    # and weights, no diffusion loss, the paper's lr; the vectors train, nothing else.
    "tto": (("test_time", "core"), dict(
        learning_rate=5e-4, rescale_end=0, emb_variant="code", attn_variant="code",
        lambda_emb=TORCH_MATCHED_WEIGHTS["lambda_emb"],
        lambda_attn=TORCH_MATCHED_WEIGHTS["lambda_attn"])),
}
VARIANTS = (*STAGE1_TERMS, *METHOD_STAGES, "sample")
TORCH_VARIANTS = ("ti", "emb", "attn", "core", "core_all", "unet")  # torch_reference.VARIANTS


def stage1_keys(variant: str) -> dict[str, Any]:
    """The stage-1 config keys (besides batch_size) of a stage-1 variant."""
    weights = {
        key: value if key in STAGE1_TERMS[variant] else 0.0
        for key, value in TORCH_MATCHED_WEIGHTS.items() if key.startswith("lambda_")
    }
    return {**STAGE1_KEYS, **weights, "hinge_margin": TORCH_MATCHED_WEIGHTS["hinge_margin"]}


def variant_stage(variant: str) -> tuple[tuple[str, ...], dict[str, Any]]:
    """(methods, stage config keys besides batch_size) of a step variant."""
    if variant in STAGE1_TERMS:
        return STAGE1_METHODS, stage1_keys(variant)
    if variant in METHOD_STAGES:
        methods, keys = METHOD_STAGES[variant]
        return methods, dict(keys)
    raise ValueError(f"{variant!r} is not a step variant; choose from {VARIANTS[:-1]}")


def build_setup(
    preset: str, batch: int, concepts: int = 1, dtype: str = "float32",
    attention: str = "auto", remat: str = "none",
) -> Setup:
    """Random-weight models and concept data shared by every variant of one run, `batch` rows
    per concept; `dtype` is the compute dtype (parameters stay float32, as in training);
    `attention` and `remat` the U-Net's, as `config.model`'s keys of a run."""
    return random_setup(
        preset, num_concepts=concepts, dtype=dtype, methods=STAGE1_METHODS, batch_size=batch,
        attention=attention, remat=remat, **stage1_keys("core_all"),
    )


def num_concepts(setup: Setup) -> int:
    return int(setup.data.num_templates.shape[0])


def with_concepts(setup: Setup, concepts: int, batch_per_concept: int) -> Setup:
    """The first `concepts` concepts of `setup`, `batch_per_concept` rows each."""
    first = functools.partial(jax.tree.map, lambda x: x[:concepts])
    return dataclasses.replace(
        setup, data=first(setup.data), numbers=first(setup.numbers), state=first(setup.state),
        program=dataclasses.replace(setup.program, batch_size=batch_per_concept),
    )


def stage_setup(setup: Setup, methods: Sequence[str], **keys: Any) -> Setup:
    """`setup` with the program, per-run numbers and first state of a stage listing `methods`
    with config `keys` (batch size: `setup`'s); models, data and frozen weights are kept. The
    learned vectors carry over; groups the stage trains first (a U-Net copy) start as in a run.
    The state is new: the program may donate it."""
    stages = [stage_config(methods, batch_size=setup.program.batch_size, **keys)]
    stages *= num_concepts(setup)
    program = build_program(stages, setup.program.models, setup.schedule.prediction_type)
    data = method_data(setup.data, methods)
    embeds = setup.state.params["embeds"]
    frozen = with_shared({k: v for k, v in setup.frozen.items() if k in ("text", "text_2", "unet")},
                         program.trains)
    params = stage_params(
        [program], 0, {"embeds": embeds}, data, frozen, int(embeds.shape[1]), setup.state.rng,
    )
    return dataclasses.replace(
        setup, program=program, numbers=stage_numbers(stages), data=data,
        frozen=frozen,
        # A copy of the keys: the program donates its state, and `setup` serves every variant.
        state=init_state(program, params, jnp.array(setup.state.rng)),
    )


def method_data(data: ConceptData, methods: Sequence[str]) -> ConceptData:
    """`data` with what the methods read beyond the views and prompts, stood in for: a class
    pool (prior preservation: the view pool again, "a photo of a <class>" as y_cat's first
    template), view masks (Custom Diffusion's masked loss: the whole image) and ClassDiffusion's
    two phrases (y*'s first template twice), TextBoost's prior prompts (the y_cat prompts and
    their frozen encodings, drawn uniformly), PALP's target and empty prompts (y_cat's first
    template's frozen encoding for both). Same shapes and work as the real ones."""
    if "prior_preservation" in methods and data.class_mean is None:
        data = dataclasses.replace(data, class_mean=data.latent_mean, class_std=data.latent_std,
                                   class_hidden=data.cat_hidden[:, 0])
    if "custom_diffusion" in methods and data.latent_mask is None:
        data = dataclasses.replace(
            data, latent_mask=jnp.ones(data.latent_mean.shape[:-1] + (1,), bool))
    if "class_diffusion" in methods and data.phrase_ids is None:
        data = dataclasses.replace(
            data, phrase_ids=jnp.stack([data.obj_ids[:, 0], data.obj_ids[:, 0]], axis=1))
    if "textboost" in methods and data.kp_ids is None:
        size = data.obj_ids.shape[1]
        data = dataclasses.replace(
            data, kp_ids=data.obj_ids, kp_frozen=data.cat_hidden,
            kp_weights=jnp.full(data.obj_ids.shape[:2], 1.0 / size, jnp.float32))
    if "palp" in methods and data.target_hidden is None:
        data = dataclasses.replace(data, target_hidden=data.cat_hidden[:, 0],
                                   null_hidden=data.cat_hidden[:, 0])
    return data


def variant_setup(setup: Setup, variant: str) -> Setup:
    """`setup` running step variant `variant` (see `variant_stage`)."""
    methods, keys = variant_stage(variant)
    return stage_setup(setup, methods, **keys)


def step_program(setup: Setup) -> Program:
    """`setup`'s step on one device, its state carried (donated) from call to call. Each call
    traces anew (a new jitted function), so the attention form in force is the one used."""
    step = shard_step(make_mesh(1, jax.devices()[:1]), setup.program)
    return Program(step.jitted, setup.args(), lambda out, args: (out[0], *args[1:]))


def stage1_program(setup: Setup, variant: str) -> Program:
    """The stage-1 step with `variant`'s terms, on one device."""
    if variant not in STAGE1_TERMS:
        raise ValueError(f"{variant!r} is not a stage-1 variant; choose from {tuple(STAGE1_TERMS)}")
    return step_program(variant_setup(setup, variant))


def unet_program(setup: Setup) -> Program:
    """The stage-2 step (`unet_finetune`): caption encoding, U-Net forward, backward, AdamW."""
    return step_program(variant_setup(setup, "unet"))


def _guided_unet(setup: Setup, guidance_scale: float) -> Callable[..., Any]:
    def chain_model(params: Any, context: jax.Array) -> Callable[..., jax.Array]:
        def model_fn(x: jax.Array, t: jax.Array) -> jax.Array:
            return setup.unet.apply({"params": params}, x, t, context)

        return guided(model_fn, guidance_scale)

    return chain_model


def sample_program(
    setup: Setup, batch: int, num_inference_steps: int = 50, guidance_scale: float = 7.5
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


def sample_flops(
    setup: Setup, program: Program, num_inference_steps: int, guidance_scale: float = 7.5
) -> float | None:
    """FLOPs of one chain: one guided U-Net call (explicit attention) x the number of steps."""
    params, x_T, context = program.args
    model = _guided_unet(setup, guidance_scale)

    def one_call(params: Any, x: jax.Array, context: jax.Array) -> jax.Array:
        return model(params, context)(x, jnp.full((x.shape[0],), 500, jnp.int32))

    with attention.explicit_attention_only():
        per_call = flops(jax.jit(one_call).lower(params, x_T, context))
    return per_call * num_inference_steps if per_call else None


def step_flops(setup: Setup) -> float | None:
    """FLOPs of `setup`'s step, traced with explicit attention (the chunked attention's loops
    would count once: XLA's analysis counts a loop body once)."""
    with attention.explicit_attention_only():
        counted = step_program(setup)  # a fresh trace: jit caches traces by function
        return flops(counted.jitted.lower(*counted.args))
