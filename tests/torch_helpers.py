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
