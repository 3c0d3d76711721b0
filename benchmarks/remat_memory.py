"""XLA's temporary memory of the U-Net's stage-1 gradient (w.r.t. the context, the attention
statistics read, as CoRe's y* pass) at batch 1, per rematerialization policy, compiled for this
machine from abstract parameters: nothing is allocated and nothing runs, so SDXL base's real
shapes fit a CPU.

    python benchmarks/remat_memory.py sdxl --dtype bfloat16 --remat none,unet_block

About 2 minutes per policy for SDXL base here (6 with remat), 1 for `tiny_sdxl`.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from core_jax.models.presets import get_preset
from core_jax.models.unet import NUM_TIME_IDS, UNet2DConditionModel, cross_attention_stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--remat", default="none,unet_block")
    parser.add_argument("--size", type=int, default=0, help="latent side (default: native)")
    args = parser.parse_args()
    shapes = get_preset(args.preset).unet
    size = args.size or shapes.sample_size
    for policy in args.remat.split(","):
        unet = UNet2DConditionModel(shapes, jnp.dtype(args.dtype), remat=policy)
        params = jax.eval_shape(
            lambda unet=unet: unet.init(jax.random.key(0), **shapes.example_inputs())["params"]
        )
        extra = {}
        if shapes.pooled_text_dim:
            extra = dict(text_embeds=jnp.zeros((1, shapes.pooled_text_dim)),
                         time_ids=jnp.full((1, NUM_TIME_IDS), 8.0 * size))

        def loss(context, params, sample, unet=unet, extra=extra):
            out, state = unet.apply({"params": params}, sample, 500, context, **extra,
                                    mutable=["attn_stats"])
            return jnp.sum(out**2) + jnp.sum(cross_attention_stats(state, "var"))

        start = time.perf_counter()
        compiled = jax.jit(jax.grad(loss)).lower(
            jax.ShapeDtypeStruct((1, 77, shapes.cross_attention_dim), jnp.float32), params,
            jax.ShapeDtypeStruct((1, size, size, shapes.in_channels), jnp.float32),
        ).compile()
        memory = compiled.memory_analysis()
        print(f"{args.preset} {args.dtype} {size}x{size} remat={policy}: XLA temp "
              f"{memory.temp_size_in_bytes / 2**20:.0f} MB, arguments "
              f"{memory.argument_size_in_bytes / 2**20:.0f} MB, compile "
              f"{time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
