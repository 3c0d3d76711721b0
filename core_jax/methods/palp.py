"""PALP (Arar, Voynov, Hertz, Avrahami, Fruchter, Pritch, Cohen-Or, Shamir, "PALP: Prompt
Aligned Personalization of Text-to-Image Models", arXiv 2401.06105, SIGGRAPH Asia 2024):
personalize for ONE target prompt. LoRA adapters on the U-Net's attention layers and S* learn
the photos (the personalization loss), while a score-distillation term keeps what the
personalized model predicts aligned with the frozen model's idea of the target prompt.

Read from the paper's text (arXiv v1, sections 4.2-4.4 and appendix C); no official code is
public (diffusers issue #6546 asks for one; none is linked):

- Personalization (4.2): LoRA on "the self- and cross-attention layers' projection matrices"
  and a new word embedding [V], trained together on the diffusion loss (Eq. 1) with the
  personalization prompt y_P = "A photo of [V]" (here: the run's caption, `concept.caption`).
- Prompt-aligned score sampling (4.3, 4.4). x^_0 = (x_t - sqrt(1 - a_t) G_theta(x_t, y_P)) /
  sqrt(a_t) (Eq. 2) is the personalized model's estimate of the clean image from the SAME noisy
  training sample x_t (and prediction) as the personalization loss: Eq. 7 reuses
  "G_theta(x_t, y_P) ... calculated as part of the derivative of Eq. (1)". x^_0 is noised again,
  x^_t = sqrt(a_t) x^_0 + sqrt(1 - a_t) eps, with the same noise eps as the personalization
  branch (the paper's better variant: "Using the same noise achieves better text alignment")
  and, here, the same timestep t [UNVERIFIED: the paper does not name x^_t's timestep]. The
  gradient (Eq. 6, Delta Denoising Score style) is

      grad_theta L_PALP = w(t) (G^alpha_frozen(x^_t, y_c) - G^beta_theta(x^_t, y_P)) dx^_0/dtheta

  with G^s(x, y) = (1 - s) G(x, empty) + s G(x, y) (Eq. 5, classifier-free guidance). The
  teacher is the FROZEN pre-trained model on the clean target prompt y_c, which names the class
  instead of [V] ("A sketch of a cat"), at guidance alpha; the student is the personalized
  model itself (LoRA and S*) on y_P at guidance beta. Both are scores, constants of the
  gradient (stop_gradient), and so is x^_t: the gradient reaches theta only through x^_0.
  alpha > beta works better; appendix C: "alpha = 15.0 and alpha = 7.5" (read as alpha 15,
  beta 7.5 [UNVERIFIED: a typo in the text]), composition alpha 7.5, beta 1.
- Rescaling (4.4 and the ablation "Ours w/ rescale"): dx^_0/dtheta = -sqrt(1 - a_t)/sqrt(a_t)
  dG/dtheta is huge at large t; the gradient is multiplied by sqrt(a_t)/sqrt(1 - a_t) =
  sqrt(SNR_t), "uniform gradient update across all timesteps", which the ablation finds best
  (`palp_rescale`, default on [UNVERIFIED that the paper's final numbers use it]). Beyond it,
  w(t) = 1 [UNVERIFIED: the paper names a weighting function w~(t) and gives none].
- Appendix C: learning rate 5e-5, LoRA rank 32, global batch 32 (TPU-v3), 500 steps, SD v1.4.
  LoRA alpha: not given; alpha = rank here (scale 1) [UNVERIFIED]. The term's weight: not given
  (Eq. 6's gradient is added to the personalization gradient), so `lambda_palp` = 1
  [UNVERIFIED]. Timesteps: uniform over the schedule, as the diffusion loss [UNVERIFIED].

The term as a loss (`prompt_aligned_score_loss`, on arrays): its value is 0.5 mean(d^2),
d = teacher - student (how far the guided scores are apart, bounded at every t), and its
gradient in x^_0 is w(t) d / N, N = the rows' elements (the diffusion loss's mean): Eq. 6 over N.
Both are zero where teacher and student agree. For v-prediction models x^_0 and the noise
come from `core_jax.diffusion.denoised`; the residual is taken in noise space.

Keys (stage config): `palp_prompt` the clean target prompt y_c, "{cls}" filled with the
concept's super-category ("a sketch of a {cls} in Paris"); it must not hold "{}" (y_c has no
placeholder). Each run's y_c and the empty prompt are encoded once by the frozen encoder
(`ConceptData.target_hidden`, `null_hidden`: constants, as y_cat's encodings are), so runs
with different target prompts pack into one program (a sweep groups them together:
`Method.run_texts`). `palp_teacher_guidance` alpha,
`palp_student_guidance` beta and `lambda_palp` are per-run numbers; `palp_rescale` is static.
The teacher is the frozen U-Net every packed run shares (`Passes.unet(personalized=False)`),
never a copy. Each step adds four forward-only U-Net passes on x^_t (teacher and student, each
unconditional and conditional); nothing is back-propagated through them.

Use with `textual_inversion` (S*): `stage1.methods = ("textual_inversion", "palp")`
(`configs/palp_tiny.py`). The group is LoRA's ("lora", `core_jax/methods/lora.py`), so the
exports are LoRA's. Not built: the multi-subject variant (appendix E), SDXL. The student's
unconditional branch reads the frozen encoder's empty prompt (with TextBoost's text adapters
in the same stage it would not be the run's own encoder's).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from core_jax.diffusion import cfg_combine
from core_jax.errors import InputError
from core_jax.methods.base import Method, Settings, Term
from core_jax.methods.diffusion_term import diffusion_term
from core_jax.methods.lora import ATTENTION
from core_jax.methods.lora import DEFAULTS as LORA_DEFAULTS
from core_jax.text import CLASS_FIELD

DEFAULTS = {
    **LORA_DEFAULTS,
    "lora_rank": 32, "lora_alpha": 32.0, "lora_targets": ATTENTION,
    "lambda_palp": 1.0,
    "palp_prompt": "a sketch of a {cls}",  # the paper's running example; set the one you want
    "palp_teacher_guidance": 15.0,
    "palp_student_guidance": 7.5,
    "palp_rescale": True,
}
# What a stage's step reads when PALP's term is present.
PASSES = frozenset({"palp_teacher", "palp_student"})


def target_prompt(prompt: str, super_category: str) -> str:
    """The clean target prompt y_c of a run: `prompt` with "{cls}" as the super-category. It
    names no placeholder (the frozen teacher knows no S*)."""
    filled = prompt.replace(CLASS_FIELD, super_category)
    if "{" in filled or "}" in filled:
        raise InputError(f"palp_prompt {prompt!r} is the clean target prompt: it names the class "
                         f"(write it, or '{CLASS_FIELD}'), never S* ('{{}}'), and has no other "
                         "brace")
    if not filled.strip():
        raise InputError("palp_prompt is empty; give the prompt to align with, e.g. "
                         "'a sketch of a {cls} in Paris'")
    return filled


def prompt_aligned_score_loss(
    x0_hat: ArrayLike, teacher: ArrayLike, student: ArrayLike, weight: ArrayLike
) -> jax.Array:
    """PALP's score-sampling term (Eq. 6) as a loss of x^_0.

    Args:
      x0_hat: [B, ...] the personalized model's clean-image estimate (the gradient flows here).
      teacher, student: [B, ...] the guided noise predictions at x^_t (constants: their
        gradient is stopped here).
      weight: [B] w(t) per row (sqrt(SNR_t) with PALP's rescaling).

    Returns:
      Scalar 0.5 mean((teacher - student)^2), how far apart the two scores are; its gradient
      in x0_hat is weight (teacher - student) / N, N = x0_hat.size (Eq. 6 over the mean's N).
    """
    x0 = jnp.asarray(x0_hat)
    x0 = x0.astype(jnp.promote_types(x0.dtype, jnp.float32))
    residual = jax.lax.stop_gradient(jnp.asarray(teacher, x0.dtype)
                                     - jnp.asarray(student, x0.dtype))
    weight = jnp.asarray(weight, x0.dtype).reshape((-1,) + (1,) * (x0.ndim - 1))
    # x0 - sg(x0) is 0 with gradient 1: the value is the residual's, the gradient Eq. 6's.
    pull = jnp.mean(jax.lax.stop_gradient(weight * residual) * (x0 - jax.lax.stop_gradient(x0)))
    return 0.5 * jnp.mean(jnp.square(residual)) + pull


def _terms(settings: Settings) -> tuple[Term, ...]:
    rescale = bool(settings.stage["palp_rescale"])

    def palp(x0_hat, teacher, student, snr, numbers) -> jax.Array:
        # teacher, student [2, b, ...]: (unconditional, conditional)
        guided_teacher = cfg_combine(teacher[0], teacher[1], numbers["palp_teacher_guidance"])
        guided_student = cfg_combine(student[0], student[1], numbers["palp_student_guidance"])
        weight = jnp.sqrt(snr) if rescale else jnp.ones_like(snr)
        return prompt_aligned_score_loss(x0_hat, guided_teacher, guided_student, weight)

    return (
        diffusion_term(settings),
        Term("palp", ("palp_x0", "palp_teacher", "palp_student", "snr"), palp,
             weight="lambda_palp"),
    )


METHOD = Method(
    name="palp",
    summary="LoRA with the prompt-aligned score-sampling term toward a target prompt, the "
            "frozen U-Net the teacher (PALP; with textual_inversion)",
    defaults=DEFAULTS,
    source="arXiv 2401.06105 (sections 4.2-4.4, appendix C: rank 32, lr 5e-5, 500 steps, "
           "guidance 15 / 7.5); no official code",
    numbers=("lambda_palp", "palp_teacher_guidance", "palp_student_guidance"),
    run_texts=("palp_prompt",),
    trains={"lora": "learning_rate"},
    terms=_terms,
)

METHODS = (METHOD,)
