"""XLA's temporary memory at batch 1 per rematerialization policy, compiled for this machine
from abstract parameters: nothing is allocated and nothing runs, so SDXL base's real shapes fit
a CPU. Two programs (`--program`):

- `unet_pass`: the U-Net's gradient w.r.t. the context with the attention statistics read (one
  of CoRe's y* / caption passes);
- `ti_step`: Textual Inversion's whole gradient, learned vector -> both text encoders (SDXL)
  or the one (SD) with the vector injected -> the U-Net with the added conditioning -> the
  diffusion loss: what one training step of TI computes before the optimizer's update.
- `core_step`: CoRe's whole stage-1 training step as `core-jax train` compiles it (the bench's
  `core` variant: the caption pass, L_emb's text passes, L_attn's U-Net passes, the norm hold,
  AdamW), one caption row, built by `random_setup` with the U-Net's parameters abstract (the
  text encoders are real: CoRe's targets are encoded before training).

    python benchmarks/remat_memory.py sdxl --dtype bfloat16 --remat none,unet_block
    python benchmarks/remat_memory.py sdxl --dtype bfloat16 --remat none,unet_block \
        --program ti_step
    python benchmarks/remat_memory.py sdxl --dtype bfloat16 --remat none,unet_block \
        --program core_step

About 2 minutes per policy for SDXL base here (6 with remat), 1 for `tiny_sdxl`.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from core_jax.models.clip_text import CLIPTextModel, CLIPTextModelWithProjection
from core_jax.models.presets import get_preset
from core_jax.models.unet import NUM_TIME_IDS, UNet2DConditionModel, cross_attention_stats
from core_jax.text import encode_sdxl_with_learned, encode_with_learned

TOKENS = 77


def _abstract_params(module, *inputs) -> dict:
    return jax.eval_shape(lambda: module.init(jax.random.key(0), *inputs)["params"])


def _unet_params(unet: UNet2DConditionModel) -> dict:
    return jax.eval_shape(
        lambda: unet.init(jax.random.key(0), **unet.config.example_inputs())["params"])


def _unet_pass(unet: UNet2DConditionModel, shapes, size: int, extra: dict):
    params = _unet_params(unet)

    def loss(context, params, sample):
        out, state = unet.apply({"params": params}, sample, 500, context, **extra,
                                mutable=["attn_stats"])
        return jnp.sum(out**2) + jnp.sum(cross_attention_stats(state, "var"))

    return jax.jit(jax.grad(loss)).lower(
        jax.ShapeDtypeStruct((1, TOKENS, shapes.cross_attention_dim), jnp.float32), params,
        jax.ShapeDtypeStruct((1, size, size, shapes.in_channels), jnp.float32))


def _ti_step(preset, unet: UNet2DConditionModel, dtype: jnp.dtype, size: int):
    ids_spec = jax.ShapeDtypeStruct((1, TOKENS), jnp.int32)
    ids_zero = jnp.zeros((1, TOKENS), jnp.int32)
    text = CLIPTextModel(preset.text, dtype)
    params = {"text": _abstract_params(text, ids_zero), "unet": _unet_params(unet)}
    width = preset.text.hidden_size
    text_2 = None
    if preset.text_2 is not None:
        text_2 = CLIPTextModelWithProjection(preset.text_2, dtype)
        params["text_2"] = _abstract_params(text_2, ids_zero)
        width += preset.text_2.hidden_size
    slot = jnp.zeros((1, TOKENS), jnp.int32)
    mask = jnp.arange(TOKENS)[None] == 5  # S* at one position

    def loss(learned, params, ids, latents, noise):
        if text_2 is None:
            context, extra = encode_with_learned(text, params["text"], ids, learned,
                                                 (mask, slot)), {}
        else:
            context, pooled = encode_sdxl_with_learned(text, text_2, params, ids, ids, learned,
                                                       (mask, slot))
            extra = dict(text_embeds=pooled,
                         time_ids=jnp.full((1, NUM_TIME_IDS), 8.0 * size))
        out = unet.apply({"params": params["unet"]}, latents, 500, context, **extra)
        return jnp.mean((out.astype(jnp.float32) - noise) ** 2)

    latent = jax.ShapeDtypeStruct((1, size, size, preset.unet.in_channels), jnp.float32)
    return jax.jit(jax.grad(loss)).lower(
        jax.ShapeDtypeStruct((1, width), jnp.float32), params, ids_spec, latent, latent)


def _core_step(preset: str, dtype: str, policy: str):
    from core_jax.bench.programs import stage1_program
    from core_jax.train.synthetic import random_setup

    setup = random_setup(preset, dtype=dtype, remat=policy, abstract_unet=True, batch_size=1)
    program = stage1_program(setup, "core")
    return program.jitted.lower(*program.args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--remat", default="none,unet_block")
    parser.add_argument("--size", type=int, default=0, help="latent side (default: native)")
    parser.add_argument("--program", default="unet_pass",
                        choices=("unet_pass", "ti_step", "core_step"))
    args = parser.parse_args()
    preset = get_preset(args.preset)
    shapes = preset.unet
    size = args.size or shapes.sample_size
    for policy in args.remat.split(","):
        unet = UNet2DConditionModel(shapes, jnp.dtype(args.dtype), remat=policy)
        start = time.perf_counter()
        if args.program == "core_step":
            if args.size:
                parser.error("--size applies to unet_pass and ti_step; core_step is native size")
            lowered = _core_step(args.preset, args.dtype, policy)
        elif args.program == "ti_step":
            lowered = _ti_step(preset, unet, jnp.dtype(args.dtype), size)
        else:
            extra = {}
            if shapes.pooled_text_dim:
                extra = dict(text_embeds=jnp.zeros((1, shapes.pooled_text_dim)),
                             time_ids=jnp.full((1, NUM_TIME_IDS), 8.0 * size))
            lowered = _unet_pass(unet, shapes, size, extra)
        memory = lowered.compile().memory_analysis()
        print(f"{args.preset} {args.program} {args.dtype} {size}x{size} remat={policy}: XLA "
              f"temp {memory.temp_size_in_bytes / 2**20:.0f} MB, arguments "
              f"{memory.argument_size_in_bytes / 2**20:.0f} MB, compile "
              f"{time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
