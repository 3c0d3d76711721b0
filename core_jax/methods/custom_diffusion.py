"""Custom Diffusion (Kumari et al., CVPR 2023, arXiv 2212.04488): the key and value projections
of every cross-attention layer and the S* token train together, everything else frozen.

What trains (METHODS.md section 5; ClassDiffusion's `--freeze_model crossattn_kv`, section 2):
the `to_k` and `to_v` kernels of every `attn2` (cross-attention) layer, 16 in SD 1.x/2.x, as the
group "custom_diffusion" (per run, [C, ...], initialised from the frozen U-Net), and the learned
vectors "embeds" (textual_inversion's group: they start from the super-category's embedding).
One learning rate for both, as the code's single AdamW over the token embedding and the K/V
weights. The frozen U-Net stays one shared copy: a U-Net call uses a tree that is the frozen
params with those kernels replaced (the rest of the tree is the frozen arrays themselves, so
packed runs never copy it): 19.2 M numbers (77 MB in fp32; the paper's "75 MB") for SD 1.5's
shapes, 25.6 M for SD 2.1's, 45k for the tiny preset.

Quirk kept from the code (diffusers' `CustomDiffusionAttnProcessor`): the keys and values of
the first token (start-of-text) pass no gradient back (`detach` at position 0); the forward is
unchanged, so it only keeps that always-identical token from pulling the trained K/V.

Keys (stage config):
- `learning_rate`: both groups'. The code trains at 1e-5 with `--scale_lr`, i.e. 1e-5 times
  the images per optimizer step (gradient accumulation x batch x GPUs), times 2 with prior
  preservation, whose class images double the batch (diffusers' train_custom_diffusion.py
  and ClassDiffusion's code): `scaled_learning_rate` computes it. The diffusers recipe
  (METHODS.md: 2 photos per GPU on 2 GPUs, prior preservation) is 1e-5 x 4 x 2 = 8e-5, the
  "8e-5 at batch 8" (4 photos + 4 regularization images) quoted from the paper.
- `masked_loss` (default True): the diffusion loss only on each view's object region, which
  Custom Diffusion's zoom augmentation marks (`data.augmentation = "custom_diffusion"`,
  `core_jax.data.zoom_view`; the run refuses to start without it).
- `min_snr_gamma` as every diffusion loss (0: uniform timesteps, the code's).

Loss scale (a decision): per row, the mean of the squared error over the masked latent
elements (every channel of each masked cell; 0 for an empty mask), then the mean over rows.
It is the quantity every other method's diffusion term logs, so runs of different methods
compare, and with a full mask it is exactly the unmasked loss. The official code sums the error
over the channels and divides by the mask's cell count, 4x ours with SD's 4 latent channels on
every row (full masks too): a by-product of its one-channel mask, not a weighting anyone
chose. Scaling the whole loss leaves AdamW's steps unchanged (up to its eps), so alone the two
train the same; only the ratio to another term shows the factor: the code's
`--prior_loss_weight` w is `lambda_prior` = w / 4 here, its 1.0 is 0.25 (what
configs/custom_diffusion_*.py set). `prior_preservation`'s own default stays DreamBooth's 1,
which next to this method weights the prior 4x the code's.

Regularization: the stage `("custom_diffusion", "prior_preservation")` adds the paper's 200
regularization images (`num_class_images`), as many class rows per step as photo rows, in the
same U-Net call through the run's K/V, unmasked (the code masks only the photo rows); the
learning rate doubles (`scaled_learning_rate(..., prior_preservation=True)`). The class images
come from DreamBooth's class pool, generated once by the frozen model from "a photo of a <cls>"
(`core_jax.train.class_pool`), where the paper retrieves real LAION images with similar captions
(`--real_prior`; with generated images, "w/ Gen", its project page reports similar samples of
the concept but some overfitting on related concepts).

Defaults of the code not built here: the rare-token initialisation of the modifier token
(`--initializer_token ktn`; here the super-category's embedding, as every method of the
project), the zoom prompts ("a far away" / "very small" on zoomed-out views, "zoomed in" /
"close up" on zoomed-in ones: the step has one caption for every row), and retrieved real
regularization images (above). The caption "photo of a S* cls" with the class word is the
config's `concept.caption` ("a photo of a {} {cls}").

Exports (`core_jax.export.save_custom_diffusion`): `pytorch_custom_diffusion_weights.bin` (when
torch is installed) and `.safetensors`, diffusers' names
`<attention module>.processor.to_k_custom_diffusion.weight` (torch layout [out, in]), for
`UNet2DConditionModel.load_attn_procs`; the learned token is `learned_embeds.safetensors`
(`load_textual_inversion`), written for every run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from core_jax.methods import unet_subset
from core_jax.methods.base import Method, UNetCall
from core_jax.methods.diffusion_term import DEFAULTS as DIFFUSION_DEFAULTS
from core_jax.methods.diffusion_term import MASKED_LOSS, diffusion_only
from core_jax.weights import path_to_torch_key

BASE_LEARNING_RATE = 1e-5  # per image of a step: the code's lr with --scale_lr
PROJECTIONS = ("to_k", "to_v")
DEFAULTS = {**DIFFUSION_DEFAULTS, MASKED_LOSS: True}


def scaled_learning_rate(images_per_step: int, prior_preservation: bool = False) -> float:
    """The code's `--scale_lr`: 1e-5 times the images of one optimizer step (accumulation x
    batch x devices), x2 with prior preservation."""
    return BASE_LEARNING_RATE * images_per_step * (2.0 if prior_preservation else 1.0)


def kv_paths(unet_params: Mapping[str, Any]) -> list[tuple[str, ...]]:
    """Module paths of the cross-attention key and value projections, in path order."""
    return unet_subset.attention_projection_paths(unet_params, PROJECTIONS)


def init_kv(unet_params: Mapping[str, Any]) -> dict[str, Any]:
    """One run's first K/V: the frozen kernels, as a tree mirroring the U-Net's params down to
    each projection ({..., "attn2": {"to_k": {"kernel": [in, out]}, "to_v": ...}})."""
    return unet_subset.subset(unet_params, kv_paths(unet_params))


merge = unet_subset.merge  # the U-Net params with one run's K/V in place


def kv_call(call: UNetCall, unet_params: Any, kv: Mapping[str, Any]) -> Any:
    """`call` with the run's K/V, the start-of-text token's keys and values detached (the
    code's quirk, see the module docstring)."""
    trained = {path[:-1] for path in traverse_util.flatten_dict(kv)}

    def detach_start(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if (context.method_name != "__call__" or not isinstance(context.module, nn.Dense)
                or tuple(context.module.path) not in trained):
            return out
        # out [B, T, D]: token 0 keeps its value and passes no gradient.
        return jnp.concatenate([jax.lax.stop_gradient(out[:, :1]), out[:, 1:]], axis=1)

    with nn.intercept_methods(detach_start):
        return call(merge(unet_params, kv))


def processor_name(path: tuple[str, ...]) -> str:
    """The diffusers attention-processor key of a K/V projection's attention layer:
    (..., "transformer_blocks_0", "attn2", "to_k") -> "....transformer_blocks.0.attn2.processor"."""
    return path_to_torch_key((*path[:-1], "processor"))


def state_dict(kv: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """One run's K/V (no concept axis) by diffusers' Custom Diffusion names:
    `<attn2>.processor.to_{k,v}_custom_diffusion.weight` -> [out, in] float32 (torch's layout)."""
    out = {}
    for path, kernel in traverse_util.flatten_dict(kv).items():
        module = path[:-1]
        name = f"{processor_name(module)}.{module[-1]}_custom_diffusion.weight"
        out[name] = np.ascontiguousarray(np.asarray(kernel, np.float32).T)
    return out


def from_state_dict(state: Mapping[str, np.ndarray], unet_params: Any) -> dict[str, Any]:
    """K/V read back from `state_dict`'s names for `unet_params`' layers (its inverse); a
    layer missing from the file, or a name or shape the U-Net lacks, is an error."""
    want = {}
    for path in kv_paths(unet_params):
        want[f"{processor_name(path)}.{path[-1]}_custom_diffusion.weight"] = path
    extra = sorted(k for k in state if k.endswith(".weight") and k not in want)
    missing = sorted(set(want) - set(state))
    if extra or missing:
        raise ValueError(f"Custom Diffusion weights do not fit this U-Net: missing "
                         f"{missing[:3]}, unknown {extra[:3]}")
    flat, frozen = {}, traverse_util.flatten_dict(unet_params)
    for name, path in want.items():
        kernel = np.asarray(state[name], np.float32).T
        if kernel.shape != frozen[path + ("kernel",)].shape:
            raise ValueError(f"{name} is {kernel.shape[::-1]}; this U-Net's is "
                             f"{frozen[path + ('kernel',)].shape[::-1]}")
        flat[path + ("kernel",)] = jnp.asarray(kernel)
    return traverse_util.unflatten_dict(flat)


CUSTOM_DIFFUSION = unet_subset.subset_group(init_kv, unet_call=kv_call)

METHOD = Method(
    name="custom_diffusion",
    summary="train the cross-attention keys/values and S* together, masked loss "
            "(Custom Diffusion)",
    defaults=DEFAULTS,
    source="arXiv 2212.04488; diffusers' train_custom_diffusion.py and ClassDiffusion's code "
           "(lr 1e-5 x images per step, masked loss, zoom augmentation); METHODS.md 2 and 5",
    trains={"custom_diffusion": "learning_rate", "embeds": "learning_rate"},
    groups={"custom_diffusion": CUSTOM_DIFFUSION},
    terms=diffusion_only,
)

METHODS = (METHOD,)
