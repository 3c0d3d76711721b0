"""What the reference tests share: random-init torch models made to matter, layout changes."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    import diffusers


def jitter(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random-init models zero some layers (e.g. conv_out); perturb so every weight matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def tiny_pipeline(seed: int) -> diffusers.StableDiffusionPipeline:
    """A StableDiffusionPipeline of the tiny preset's shapes, random weights, the U-Net jittered
    (`jitter`) so every one of its weights matters."""
    import diffusers
    import transformers

    from core_jax.models.presets import get_preset
    from core_jax.text import clip_tokenizer_dir

    preset = get_preset("tiny")
    torch.manual_seed(seed)
    text_config = transformers.CLIPTextConfig.from_dict(preset.text.to_diffusers())
    unet = diffusers.UNet2DConditionModel.from_config(preset.unet.to_diffusers())
    return diffusers.StableDiffusionPipeline(
        vae=diffusers.AutoencoderKL.from_config(preset.vae.to_diffusers()),
        text_encoder=transformers.CLIPTextModel(text_config).eval(),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(clip_tokenizer_dir()),
        unet=jitter(unet, seed),
        scheduler=diffusers.DDIMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)


def nhwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(0, 2, 3, 1).detach().numpy()


class ProbabilityRecorder:
    """diffusers attention processor that records per-token mean/var of cross-attention probs."""

    def __init__(self, log: list):
        self.log = log

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        batch = hidden_states.shape[0]
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(query, key, None)  # [B*H, N, T]
        per_head = probs.reshape(batch, attn.heads, *probs.shape[1:])
        self.log.append((per_head.mean(dim=(1, 2)), per_head.var(dim=(1, 2), unbiased=False)))
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        return attn.to_out[1](attn.to_out[0](out))
