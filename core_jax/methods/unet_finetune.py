"""Fine-tuning the whole U-Net on the caption with S* frozen: CoRe's stage 2.

Each run trains its own copy of the U-Net (packed runs carry one copy each).
"""

from core_jax.methods.base import Method
from core_jax.methods.diffusion_term import DEFAULTS, diffusion_only

METHOD = Method(
    name="unet_finetune",
    summary="fine-tune the whole U-Net on 'a photo of a S*' with S* frozen (CoRe's stage 2)",
    defaults=DEFAULTS,
    source="arXiv 2408.15914 (stage 2: 1000 steps, batch 4, AdamW lr 2e-6)",
    trains={"unet": "learning_rate"},
    terms=diffusion_only,
)

METHODS = (METHOD,)
