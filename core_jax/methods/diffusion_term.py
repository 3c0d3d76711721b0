"""The denoising loss on the caption pass, shared by every method that learns from the photos."""

from __future__ import annotations

from core_jax import losses
from core_jax.methods.base import Settings, Term

# Read from the stage of every method that uses the term.
DEFAULTS = {"min_snr_gamma": 0.0}  # 0 = uniform weighting over timesteps (the papers')
# A stage whose methods define this key true (Custom Diffusion) computes the loss only on each
# view's object region (`ConceptData.latent_mask`); every method's diffusion term of that stage
# is then the masked one, whatever order the stage lists them in.
MASKED_LOSS = "masked_loss"


def diffusion_term(settings: Settings) -> Term:
    """MSE between the U-Net's prediction for "a photo of a S*" and the target (epsilon or v),
    with min-SNR-gamma weighting when the stage sets it, on the views' object regions when the
    stage masks the loss."""
    gamma = settings.stage["min_snr_gamma"] or None
    prediction_type = settings.prediction_type
    inputs = ("caption_pred", "target") + (("snr",) if gamma is not None else ())
    masked = bool(settings.stage.get(MASKED_LOSS, False))
    inputs += ("loss_mask",) if masked else ()

    def fn(pred, target, *rest):
        snr = rest[0] if gamma is not None else None
        mask = rest[-2] if masked else None  # rest ends with the numbers
        return losses.diffusion_loss(pred, target, snr, gamma, prediction_type, mask)

    return Term("diffusion", inputs, fn)


def diffusion_only(settings: Settings) -> tuple[Term, ...]:
    """The terms of a method whose only loss is the diffusion loss."""
    return (diffusion_term(settings),)
