"""CoRe stage-1 training step in PyTorch, structured as the official CoRe code runs it.

Two uses:

* ``core_step_reference``: one CoRe loss evaluation and its gradient w.r.t. the learned vectors,
  written independently of core_jax's JAX step (the "second writing" tests check it against).
  Learned vectors go into the rows of the placeholder ids of the text encoder's token-embedding
  table; the U-Net sees the text encoder's last hidden state (after the final layer norm).
* ``run_benchmark`` and the CLI: full training steps with the official code's structure, i.e. a
  diffusers textual-inversion script extended with CoRe's two regularizers:

  - the placeholder is a row of the text encoder's *resized* input-embedding table; AdamW
    (lr 5e-3, betas (0.9, 0.999), wd 1e-2) updates the WHOLE table (dense [N, D] gradient and
    Adam state); the rest of the text encoder and the U-Net have requires_grad False; after each
    update every row but the placeholders' is copied back from a saved table;
  - per step, for a batch of B examples each with its own template (as the official dataset
    draws one per example): text encoder on the caption "a photo of a S*", on y* and on y_cat
    (no_grad) at [B, 77] each; L_emb; U-Net on y_cat (no_grad) and on y* with a processor on
    every cross-attention layer recording mean attention per token; U-Net on the caption; MSE;
    backward; optimizer step; row restore.  Losses use the official code's variants and weights
    (lambda_emb 1.5e-4, lambda_attn 0.05 with the batch sum).
  - variants: ti (caption pass only), emb (+ L_emb), attn (+ L_attn), core (both), core_all
    (core + the thesis' pairwise and hinge terms), unet (stage 2: the whole U-Net trains with
    AdamW lr 2e-6, caption pass only, text encoder frozen).

Timed: everything from drawing templates, noise and timesteps to the restored table, once per
step, after ``warmup`` untimed steps; ``.item()`` on the loss each step (the official loop logs
it) keeps asynchronous devices honest. Weights are random (core_jax presets, no downloads) and
latents are given ([B, 4, s, s], random): the VAE is not in the step. Two simplifications, both
in torch's favour: attention statistics come from the processor that computes the attention
(the official code re-computes q·k from forward hooks and interpolates full maps), and the norm
hold of steps 120-180 is left out (O(D) work, outside any short timed window).

Usage: python benchmarks/torch_reference.py --preset bench_small --variant core --steps 12
--batch 6 [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from core_jax import text as ctext
from core_jax.models.presets import get_preset

VARIANTS = ("ti", "emb", "attn", "core", "core_all", "unet")
# Regularizers each variant adds to the diffusion loss ("unet" is stage 2: none).
VARIANT_TERMS: dict[str, tuple[str, ...]] = {
    "ti": (),
    "emb": ("emb",),
    "attn": ("attn",),
    "core": ("emb", "attn"),
    "core_all": ("emb", "attn", "pairwise", "hinge"),
    "unet": (),
}
# The official CoRe weights (tuned with the "code" loss variants) and the thesis code's weights
# for its two terms; the hinge margin is the thesis code's lower cosine bound.
LAMBDAS = {"emb": 1.5e-4, "attn": 0.05, "pairwise": 0.015, "hinge": 1.0}
HINGE_MARGIN = 0.7
STAGE1_LR, STAGE2_LR, WEIGHT_DECAY = 5e-3, 2e-6, 1e-2
PLACEHOLDER, SUPER_CATEGORY, CAPTION = "<s*>", "cat", "a photo of a {}"
NUM_TRAIN_TIMESTEPS = 1000

Encode = Callable[[torch.Tensor], torch.Tensor]


# --- cross-attention statistics ---------------------------------------------------------------


class CrossAttentionRecorder:
    """diffusers attention processor for cross-attention (attn2) layers of SD U-Nets.

    Computes the attention explicitly and appends, per call, the softmax probabilities averaged
    over heads and query (spatial) positions: [B, T], one value per text token. Calls arrive in
    execution order, so after one U-Net pass ``means`` holds its 16 layers in order.
    """

    def __init__(self) -> None:
        self.means: list[torch.Tensor] = []

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # SD's cross-attention path only: 3-D hidden states, no mask, no group/spatial norm,
        # no residual inside the processor. Anything else would be silently wrong here.
        if encoder_hidden_states is None or attention_mask is not None or hidden_states.ndim != 3:
            raise NotImplementedError("CrossAttentionRecorder supports SD cross-attention only")
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        b, n, _ = hidden_states.shape

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(b, x.shape[1], attn.heads, -1).transpose(1, 2)

        q = heads(attn.to_q(hidden_states))
        k = heads(attn.to_k(encoder_hidden_states))
        v = heads(attn.to_v(encoder_hidden_states))
        probs = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1)  # [B, H, N, T]
        self.means.append(probs.mean(dim=(1, 2)))
        out = (probs @ v).transpose(1, 2).reshape(b, n, -1)
        return attn.to_out[1](attn.to_out[0](out))


@contextlib.contextmanager
def record_cross_attention(unet: UNet2DConditionModel) -> Iterator[CrossAttentionRecorder]:
    """Install a recorder on every attn2 layer for the duration of the block, then restore."""
    saved = unet.attn_processors
    recorder = CrossAttentionRecorder()
    unet.set_attn_processor(
        {name: recorder if name.endswith("attn2.processor") else p for name, p in saved.items()}
    )
    try:
        yield recorder
    finally:
        unet.set_attn_processor(saved)


# --- losses (torch, written from DESIGN.md "CoRe, exactly") ------------------------------------


def _masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | tuple[int, ...]) -> torch.Tensor:
    """Mean over ``dim`` where ``mask``; 0 when nothing is selected."""
    mask = mask.expand_as(x)
    total = torch.where(mask, x, torch.zeros_like(x)).sum(dim)
    return total / mask.sum(dim).clamp(min=1).to(x.dtype)


def _zero_outside(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask[..., None], h, torch.zeros_like(h))


def embedding_loss(
    ctx_obj: torch.Tensor, ctx_cat: torch.Tensor, mask: torch.Tensor, variant: str
) -> torch.Tensor:
    """L_emb on aligned context hidden states [B, S, D] (mask [B, S]); mean over the batch."""
    if variant == "paper":
        cos = F.cosine_similarity(ctx_obj, ctx_cat, dim=-1)  # over features
        return _masked_mean(1.0 - cos, mask, -1).mean()
    if variant == "code":
        # Per feature channel, cosine between the two columns of context tokens.
        cos = F.cosine_similarity(_zero_outside(ctx_obj, mask), _zero_outside(ctx_cat, mask), dim=1)
        per_example = (1.0 - cos).mean(-1)
        return torch.where(mask.any(-1), per_example, torch.zeros_like(per_example)).mean()
    raise ValueError(f"unknown L_emb variant {variant!r}")


def attention_loss(
    attn_obj: torch.Tensor, attn_cat: torch.Tensor, mask: torch.Tensor, variant: str
) -> torch.Tensor:
    """L_attn on aligned per-layer token means [L, B, S] (mask [B, S])."""
    if variant == "paper":
        diff = attn_obj.mean(0) - attn_cat.mean(0)
        return _masked_mean(diff.square(), mask, -1).mean()
    if variant == "code":
        per_layer = _masked_mean((attn_obj - attn_cat).square(), mask, -1)  # [L, B]
        return per_layer.mean(0).sum()  # the official code sums over the batch
    raise ValueError(f"unknown L_attn variant {variant!r}")


def pairwise_loss(ctx_obj: torch.Tensor, ctx_cat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Thesis pairwise term: L1 mean between token-cosine matrices over context pairs."""

    def gram(h: torch.Tensor) -> torch.Tensor:
        u = F.normalize(_zero_outside(h, mask), dim=-1)
        return u @ u.transpose(-1, -2)

    pairs = mask[:, :, None] & mask[:, None, :]
    return _masked_mean((gram(ctx_obj) - gram(ctx_cat)).abs(), pairs, (-2, -1)).mean()


def hinge_loss(learned: torch.Tensor, super_embed: torch.Tensor, margin: float) -> torch.Tensor:
    """Thesis hinge term: mean over vectors of max(0, margin - cos(v*, v_cat))."""
    cos = F.cosine_similarity(learned, super_embed.expand_as(learned), dim=-1)
    return F.relu(margin - cos).mean()


def core_losses(
    unet: UNet2DConditionModel,
    encode: Encode,
    batch: Mapping[str, torch.Tensor],
    *,
    terms: Sequence[str],
    emb_variant: str,
    attn_variant: str,
    learned: torch.Tensor | None = None,
    super_embed: torch.Tensor | None = None,
    hinge_margin: float = HINGE_MARGIN,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The losses of one step in the official order; returns (losses, recorded tensors).

    ``batch``: latents, noise [B, 4, h, w]; timesteps [B]; alphas_cumprod [1000]; caption_ids,
    obj_ids, cat_ids [B, T]; obj_index, cat_index, context_mask [B, S]. ``encode`` maps ids to
    the text encoder's last hidden state. ``terms`` picks among emb, attn, pairwise, hinge;
    the diffusion loss is always computed. ``learned`` / ``super_embed`` feed the hinge.
    """
    x0, eps, t = batch["latents"], batch["noise"], batch["timesteps"]
    abar = batch["alphas_cumprod"][t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1.0 - abar).sqrt() * eps
    mask = batch["context_mask"]
    rows = torch.arange(mask.shape[0], device=mask.device)[:, None]
    losses: dict[str, torch.Tensor] = {}
    recorded: dict[str, torch.Tensor] = {}

    h_caption = encode(batch["caption_ids"])
    if {"emb", "attn", "pairwise"} & set(terms):
        h_obj = encode(batch["obj_ids"])
        with torch.no_grad():  # y_cat is a constant target
            h_cat = encode(batch["cat_ids"])
        recorded.update(h_obj=h_obj.detach(), h_cat=h_cat)
        ctx_obj = h_obj[rows, batch["obj_index"]]
        ctx_cat = h_cat[rows, batch["cat_index"]]
        if "emb" in terms:
            losses["emb"] = embedding_loss(ctx_obj, ctx_cat, mask, emb_variant)
        if "pairwise" in terms:
            losses["pairwise"] = pairwise_loss(ctx_obj, ctx_cat, mask)
    if "attn" in terms:
        # Same x_t and timesteps as the diffusion loss; only the text differs.
        with torch.no_grad(), record_cross_attention(unet) as rec:
            unet(x_t, t, h_cat)
        attn_cat = torch.stack(rec.means)  # [L, B, T]
        with record_cross_attention(unet) as rec:
            unet(x_t, t, h_obj)
        attn_obj = torch.stack(rec.means)
        recorded.update(attn_obj=attn_obj.detach(), attn_cat=attn_cat)
        losses["attn"] = attention_loss(
            attn_obj[:, rows, batch["obj_index"]],
            attn_cat[:, rows, batch["cat_index"]],
            mask,
            attn_variant,
        )
    if "hinge" in terms:
        if learned is None or super_embed is None:
            raise ValueError("the hinge term needs learned and super_embed")
        losses["hinge"] = hinge_loss(learned, super_embed, hinge_margin)

    pred = unet(x_t, t, h_caption).sample
    losses["diffusion"] = F.mse_loss(pred, eps)
    return losses, recorded


def total_loss(losses: Mapping[str, torch.Tensor], lambdas: Mapping[str, float]) -> torch.Tensor:
    total = losses["diffusion"]
    for name, value in losses.items():
        if name != "diffusion":
            total = total + lambdas[name] * value
    return total


# --- functional reference ----------------------------------------------------------------------


def _token_table(text_encoder: CLIPTextModel) -> tuple[str, torch.Tensor]:
    """(qualified name, weight) of the text encoder's token-embedding table."""
    weight = text_encoder.get_input_embeddings().weight
    name = next(n for n, p in text_encoder.named_parameters() if p is weight)
    return name, weight


def core_step_reference(
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    inputs: Mapping[str, Any],
    *,
    lambda_emb: float,
    lambda_attn: float,
    emb_variant: str = "paper",
    attn_variant: str = "paper",
    placeholder_id: int | Sequence[int],
    learned: torch.Tensor | np.ndarray,
    lambda_pairwise: float = 0.0,
    lambda_hinge: float = 0.0,
    hinge_margin: float = HINGE_MARGIN,
) -> dict[str, Any]:
    """One CoRe stage-1 loss and its gradient w.r.t. the learned vectors, in PyTorch.

    Args:
      unet, text_encoder: diffusers / transformers models; they run in their own dtype and
        device (fp32 normally, fp64 for gradient checks) and are left unchanged.
      inputs: numpy arrays or tensors. latents (x0, scaled), noise [B, 4, h, w]; timesteps [B];
        alphas_cumprod [1000]; caption_ids, obj_ids (y*), cat_ids (y_cat) [T] (one prompt for
        the whole batch) or [B, T]; obj_index, cat_index, context_mask [S] or [B, S]
        (core_jax.text.regularization_prompts' alignment). Optional super_embed [D] or [V, D]
        (the super-category input embedding) enables the hinge term.
      lambda_emb, lambda_attn, lambda_pairwise, lambda_hinge: weights of the regularizers.
      emb_variant, attn_variant: "paper" or "code" (see DESIGN.md).
      placeholder_id: the first of V consecutive placeholder ids, or all V ids.
      learned: [V, D]; row v goes to table row placeholder_id[v] (the table is zero-padded if
        it is smaller than the largest id).

    Returns:
      dict with floats loss (the weighted total), diffusion, emb, attn, pairwise, and hinge
      (only with super_embed); tensors grad [V, D] (d loss / d learned), h_obj, h_cat [B, T, D]
      (last hidden states of y*, y_cat) and attn_obj, attn_cat [16, B, T] (per cross-attention
      layer in execution order, mean attention probability of each token over heads and
      positions).
    """
    param = next(unet.parameters())
    dtype, device = param.dtype, param.device

    def as_tensor(x: Any, kind: torch.dtype) -> torch.Tensor:
        return torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x).to(device, kind)

    learned = as_tensor(learned, dtype).detach().clone().requires_grad_(True)
    if learned.ndim != 2:
        raise ValueError(f"learned must be [V, D], got shape {tuple(learned.shape)}")
    n_vec = learned.shape[0]
    if isinstance(placeholder_id, (int, np.integer)):
        ids = list(range(int(placeholder_id), int(placeholder_id) + n_vec))
    else:
        ids = [int(i) for i in placeholder_id]
    if len(ids) != n_vec:
        raise ValueError(f"{len(ids)} placeholder ids for {n_vec} learned vectors")

    latents = as_tensor(inputs["latents"], dtype)
    n = latents.shape[0]

    def per_example(key: str, kind: torch.dtype) -> torch.Tensor:
        x = as_tensor(inputs[key], kind)
        return x.expand(n, -1) if x.ndim == 1 else x

    batch = {
        "latents": latents,
        "noise": as_tensor(inputs["noise"], dtype),
        "timesteps": as_tensor(inputs["timesteps"], torch.long),
        "alphas_cumprod": as_tensor(inputs["alphas_cumprod"], dtype),
        "context_mask": per_example("context_mask", torch.bool),
    }
    for key in ("caption_ids", "obj_ids", "cat_ids", "obj_index", "cat_index"):
        batch[key] = per_example(key, torch.long)

    # The table with the learned rows in place, as a differentiable function of `learned`.
    name, weight = _token_table(text_encoder)
    frozen = weight.detach()
    missing = max(ids) + 1 - frozen.shape[0]
    if missing > 0:
        frozen = torch.cat([frozen, frozen.new_zeros(missing, frozen.shape[1])])
    table = frozen.index_put((torch.tensor(ids, device=device),), learned)

    def encode(token_ids: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(text_encoder, {name: table}, (), {"input_ids": token_ids})
        return out.last_hidden_state

    super_embed = inputs.get("super_embed")
    if lambda_hinge and super_embed is None:
        raise ValueError("lambda_hinge needs inputs['super_embed']")
    terms = ("emb", "attn", "pairwise") + (("hinge",) if super_embed is not None else ())
    losses, recorded = core_losses(
        unet, encode, batch, terms=terms, emb_variant=emb_variant, attn_variant=attn_variant,
        learned=learned,
        super_embed=None if super_embed is None else as_tensor(super_embed, dtype),
        hinge_margin=hinge_margin,
    )
    lambdas = {"emb": lambda_emb, "attn": lambda_attn, "pairwise": lambda_pairwise,
               "hinge": lambda_hinge}
    total = total_loss(losses, lambdas)
    (grad,) = torch.autograd.grad(total, learned, materialize_grads=True)
    result: dict[str, Any] = {k: v.item() for k, v in losses.items()}
    result.update(loss=total.item(), grad=grad.detach(), **recorded)
    return result


# --- benchmark ---------------------------------------------------------------------------------


def build_models(
    preset: str, *, num_vectors: int = 1, seed: int = 0
) -> tuple[UNet2DConditionModel, CLIPTextModel, CLIPTokenizer, list[int], int]:
    """Random-weight U-Net and text encoder of a core_jax preset, set up as the official script.

    Placeholder tokens are added to the tokenizer, the text encoder's table is resized to the
    tokenizer and the placeholder rows start from the super-category's embedding.

    Returns:
      (unet, text_encoder, tokenizer, placeholder ids, super-category id).
    """
    shapes = get_preset(preset)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(shapes.unet.to_diffusers())
    text_encoder = CLIPTextModel(CLIPTextConfig(**dataclasses.asdict(shapes.text)))
    tokenizer = ctext.load_tokenizer()
    placeholder_ids = ctext.add_placeholder_tokens(tokenizer, PLACEHOLDER, num_vectors)
    super_ids = ctext.super_category_ids(tokenizer, SUPER_CATEGORY)
    if len(super_ids) != 1:
        raise ValueError("the official script initialises from a single-token super-category")
    # The new rows are overwritten just below, so transformers' mean/covariance init is moot.
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    table = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        table[placeholder_ids] = table[super_ids[0]].clone()
    return unet, text_encoder, tokenizer, placeholder_ids, super_ids[0]


def _peak_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes vs KiB


def run_benchmark(
    preset: str = "bench_small",
    variant: str = "core",
    *,
    steps: int = 12,
    batch: int = 6,
    warmup: int = 2,
    threads: int | None = None,
    seed: int = 0,
    device: str = "cpu",
    num_vectors: int = 1,
    templates: str = "animate",
) -> dict[str, Any]:
    """Time ``steps`` full training steps of ``variant`` after ``warmup`` untimed ones.

    Returns a JSON-ready dict: variant, preset, framework ("torch"), steps, batch, warmup,
    median_s / min_s / max_s (seconds per step), examples_per_s (batch / median), final_loss,
    rss_start_mb (peak RSS before the models were built), peak_rss_mb (process peak so far, so
    it also covers earlier variants in the same process), torch version, threads, device.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {VARIANTS}")
    torch.set_num_threads(threads or os.cpu_count() or 1)
    rss_start = _peak_rss_mb()
    unet, text_encoder, tokenizer, placeholder_ids, super_id = build_models(
        preset, num_vectors=num_vectors, seed=seed
    )
    unet.to(device)
    text_encoder.to(device)
    text_encoder.train()  # as the official script; CLIP has no dropout, so this changes nothing

    size = get_preset(preset).unet.sample_size
    latents = torch.randn(batch, 4, size, size, device=device)
    alphas_cumprod = DDPMScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_start=0.00085, beta_end=0.012,
        beta_schedule="scaled_linear",
    ).alphas_cumprod.to(device)
    concept = ctext.placeholder_string(PLACEHOLDER, num_vectors)
    caption = torch.as_tensor(ctext.caption_ids(tokenizer, concept, CAPTION), dtype=torch.long)
    prompts = ctext.regularization_prompts(
        tokenizer, ctext.load_templates(templates), concept, SUPER_CATEGORY
    )
    pool = {
        key: torch.as_tensor(getattr(prompts, key)).to(device, kind)
        for key, kind in (("obj_ids", torch.long), ("cat_ids", torch.long),
                          ("obj_index", torch.long), ("cat_index", torch.long),
                          ("context_mask", torch.bool))
    }
    fixed = {
        "latents": latents,
        "alphas_cumprod": alphas_cumprod,
        "caption_ids": caption.to(device).expand(batch, -1),
    }

    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)
    table = text_encoder.get_input_embeddings().weight
    if variant == "unet":
        unet.requires_grad_(True)
        optimizer = torch.optim.AdamW(unet.parameters(), lr=STAGE2_LR, weight_decay=WEIGHT_DECAY)

        def encode(ids: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return text_encoder(input_ids=ids).last_hidden_state

    else:
        table.requires_grad_(True)
        optimizer = torch.optim.AdamW([table], lr=STAGE1_LR, weight_decay=WEIGHT_DECAY)

        def encode(ids: torch.Tensor) -> torch.Tensor:
            return text_encoder(input_ids=ids).last_hidden_state

    saved_table = table.detach().clone()
    keep_rows = torch.ones(table.shape[0], dtype=torch.bool, device=device)
    keep_rows[placeholder_ids] = False
    placeholder_rows = torch.tensor(placeholder_ids, device=device)
    terms = VARIANT_TERMS[variant]

    def step() -> float:
        pick = torch.randint(len(prompts), (batch,), device=device)
        step_batch = {key: value[pick] for key, value in pool.items()}
        step_batch.update(
            fixed,
            noise=torch.randn_like(latents),
            timesteps=torch.randint(0, NUM_TRAIN_TIMESTEPS, (batch,), device=device),
        )
        losses, _ = core_losses(
            unet, encode, step_batch, terms=terms, emb_variant="code", attn_variant="code",
            learned=table[placeholder_rows], super_embed=saved_table[super_id],
        )
        loss = total_loss(losses, LAMBDAS)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if variant != "unet":
            with torch.no_grad():
                table[keep_rows] = saved_table[keep_rows]
        return loss.item()

    times: list[float] = []
    loss = float("nan")
    for i in range(warmup + steps):
        start = time.perf_counter()
        loss = step()
        if i >= warmup:
            times.append(time.perf_counter() - start)

    median = statistics.median(times) if times else float("nan")
    return {
        "variant": variant,
        "preset": preset,
        "framework": "torch",
        "steps": steps,
        "batch": batch,
        "warmup": warmup,
        "median_s": median,
        "min_s": min(times, default=float("nan")),
        "max_s": max(times, default=float("nan")),
        "examples_per_s": batch / median,
        "final_loss": loss,
        "rss_start_mb": round(rss_start, 1),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": device,
        "machine": platform.machine(),
    }


def _describe(r: Mapping[str, Any]) -> str:
    return (
        f"torch {r['variant']:>8} | {r['preset']} B={r['batch']} | step median {r['median_s']:.3f}s"
        f" (min {r['min_s']:.3f}, max {r['max_s']:.3f}) over {r['steps']} after {r['warmup']}"
        f" warm-up | {r['examples_per_s']:.2f} ex/s | peak RSS {r['peak_rss_mb']:.0f} MB"
        f" (start {r['rss_start_mb']:.0f}) | torch {r['torch_version']}, {r['threads']} threads,"
        f" {r['device']} | loss {r['final_loss']:.4f}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="bench_small")
    parser.add_argument("--variant", nargs="+", choices=VARIANTS, default=["core"])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="default: os.cpu_count()")
    parser.add_argument("--num-vectors", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true", help="one JSON line per variant")
    args = parser.parse_args(argv)
    for variant in args.variant:
        result = run_benchmark(
            args.preset, variant, steps=args.steps, batch=args.batch, warmup=args.warmup,
            threads=args.threads, seed=args.seed, device=args.device,
            num_vectors=args.num_vectors,
        )
        print(json.dumps(result) if args.json else _describe(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
