"""What the reference tests share: random-init torch models made to matter, layout changes."""

from __future__ import annotations

import numpy as np
import torch


def jitter(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random-init models zero some layers (e.g. conv_out); perturb so every weight matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


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
