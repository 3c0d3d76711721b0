"""Prior preservation (DreamBooth, Ruiz et al. 2022, arXiv 2208.12242 §3.3): alongside the
photos, each step denoises images of the concept's class that the frozen model itself generated
from "a photo of a <cls>", so fine-tuning on a few photos of one dog does not turn every dog into
it (language drift) or narrow what "dog" can look like.

    L = E[ ||eps_hat(x_t, c) - eps||^2 ] + lambda_prior E[ ||eps_hat(x'_t', c_pr) - eps'||^2 ]

The class rows (as many per concept as photo rows, as diffusers' `train_dreambooth.py`) are drawn
from the concept's pool of generated latents with the step's own randomness, noised at their own
timesteps and predicted in the same U-Net call as the caption rows, through whichever groups the
run's U-Net reads (its own copy, adapters, spectral shifts): combine it in a stage with the method
that trains them, e.g. `("unet_finetune", "prior_preservation")` is DreamBooth.

The pool is generated once per (model, class prompt, count, seed, resolution, sampler settings)
and cached (`core_jax.train.class_pool`); these keys set it:
- `class_prompt`: filled with the concept's super-category ("a photo of a dog").
- `num_class_images`: 200, the count diffusers' DreamBooth README trains SD with (the paper
  generates ~1000 for Imagen).
- `class_seed`, `class_sampler`, `class_steps`, `class_guidance_scale`: how it is sampled
  (diffusers' pipeline defaults: 50 steps, guidance 7.5).
- `class_pool_dir`: where the pool is cached; "" = `<workdir>/class_pools` (a sweep's own
  workdir, shared by its runs). Point runs at one folder to share pools between them.
"""

from __future__ import annotations

import jax

from core_jax import losses
from core_jax.diffusion.samplers import SAMPLERS
from core_jax.methods.base import Method, Settings, Term

DEFAULTS = {
    "lambda_prior": 1.0,  # the paper's lambda = 1; diffusers' --prior_loss_weight 1.0
    "class_prompt": "a photo of a {}",
    "num_class_images": 200,
    "class_seed": 0,
    "class_sampler": "ddim",
    "class_steps": 50,
    "class_guidance_scale": 7.5,
    "class_pool_dir": "",
}
# The keys that decide the pool's contents (with the model and the resolution).
POOL_KEYS = ("class_prompt", "num_class_images", "class_seed", "class_sampler", "class_steps",
             "class_guidance_scale", "class_pool_dir")


def _terms(settings: Settings) -> tuple[Term, ...]:
    prediction_type = settings.prediction_type

    def prior(pred: jax.Array, target: jax.Array, numbers) -> jax.Array:
        # [b, h, w, c] the concept's class rows; plain MSE even where the caption's diffusion
        # loss is min-SNR weighted, as diffusers' script does.
        return losses.diffusion_loss(pred, target, None, None, prediction_type)

    return (Term("prior", ("prior_pred", "prior_target"), prior, weight="lambda_prior"),)


METHOD = Method(
    name="prior_preservation",
    summary="DreamBooth's prior-preservation loss on class images the frozen model generated",
    defaults=DEFAULTS,
    source="arXiv 2208.12242 §3.3 (lambda = 1); diffusers examples/dreambooth (200 class images)",
    numbers=("lambda_prior",),
    choices={"class_sampler": SAMPLERS},
    terms=_terms,
)

METHODS = (METHOD,)
