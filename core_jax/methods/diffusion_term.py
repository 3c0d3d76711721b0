"""The denoising loss on the caption pass, shared by every method that learns from the photos."""

from __future__ import annotations

from core_jax import losses
from core_jax.methods.base import Settings, Term

# Read from the stage of every method that uses the term.
DEFAULTS = {"min_snr_gamma": 0.0}  # 0 = uniform weighting over timesteps (the papers')


def diffusion_term(settings: Settings) -> Term:
    """MSE between the U-Net's prediction for "a photo of a S*" and the target (epsilon or v),
    with min-SNR-gamma weighting when the stage sets it."""
    gamma = settings.stage["min_snr_gamma"] or None
    prediction_type = settings.prediction_type
    if gamma is None:
        return Term(
            "diffusion", ("caption_pred", "target"),
            lambda pred, target, numbers: losses.diffusion_loss(
                pred, target, None, None, prediction_type
            ),
        )
    return Term(
        "diffusion", ("caption_pred", "target", "snr"),
        lambda pred, target, snr, numbers: losses.diffusion_loss(
            pred, target, snr, gamma, prediction_type
        ),
    )


def diffusion_only(settings: Settings) -> tuple[Term, ...]:
    """The terms of a method whose only loss is the diffusion loss."""
    return (diffusion_term(settings),)
