"""TextBoost (Park, Kim, Shim, arXiv 2409.08248): personalize through the text encoder. S*'s
vectors and rank-4 LoRA adapters on the text encoder's attention projections train; the U-Net
stays frozen. A knowledge-preservation loss keeps the adapted encoder's outputs on everyday
prompts where the frozen encoder puts them, so the rest of the vocabulary keeps its meaning.

    L = L_diffusion + lambda_kp mean_{rows, 77 tokens} (1 - cos(E_adapted(p), E_frozen(p)))

Combine with the method that trains S*: the stage `("textual_inversion", "textboost")` is the
paper's method (`configs/textboost_sd15.py`). The numbers are the official code's
(`train_textboost.py`, `run_textboost_db.py`; METHODS.md section 3):
- the group "text_lora": LoRA on every encoder layer's `q_proj`, `k_proj`, `v_proj` (the code's
  targets; the paper also names the feed-forward layers), rank 4, alpha 4, peft's "gaussian"
  initialisation (A ~ N(0, 1/r^2), B = 0: training starts at the frozen encoder exactly), at
  its own learning rate `text_lora_learning_rate` 1e-4; S* at the stage's `learning_rate` 1e-3;
  AdamW weight decay 1e-2; gradient clipping 1.0; 250 steps at batch 8.
- `lambda_kp` 0.1 (`--kpl_weight`); every row of a step draws one prior prompt: a general
  caption with probability 0.8, the class word in a regularization template 0.1, the empty
  prompt 0.1 (`core_jax.train.concepts.knowledge_prompts`). The code's general captions are
  InstructPix2Pix's human-written prompts, which are not shipped here: the project ships 64 of
  its own in their style (`core_jax/text/general_prompts.txt`).
The adapters are per run ([C, ...]); each run's prompts go through its own adapted encoder
(vmapped over packed runs), the frozen encoder stays one shared copy.

Timestep sampling (the stage's `timestep_sampling`, a key of every stage): "uniform" is the
default and what the released code runs (`train_textboost.py`'s `--disable_weighted_sample` is
`store_true` with default True, so its weighted branch is never reached from the command line);
"snr_weighted" is the paper's SNR-weighted sampling as the code writes it: with
lambda_t = log SNR(t), w_t = max_s lambda_s - lambda_t, p_t = w_t / sum_s w_t and
t ~ Categorical(p_t) (`core_jax.diffusion.snr_weighted_timestep_probabilities`; noisier steps
more often, the cleanest step never). [UNVERIFIED] that the paper's formula is this one: its
text was not reachable here (its abstract and reviews say only "SNR-weighted sampling", biased
towards low SNR); the formula is the code's.

Classifier-free guidance's unconditional branch: the code replaces the encoding of the empty
prompt by a precomputed null embedding, the frozen encoder's. Here every sampler path of a run
with text-encoder adapters (`core-jax sample`, the training grids) gives the pipeline the frozen
encoder as `null_text_params` (`core_jax.sample.guidance_contexts`), so the unconditional
branch is the base model's and only the prompts go through the adapted encoder.

Augmentation tokens, built in part: the paired augmentation (`core_jax.data.paired_view`,
object mode: geometric {scale 0.34-1.4 naming <zoom-out> below 0.6 and <zoom-in> above 1.2,
random resized crop <crop>, horizontal shift of 15-30 % <left>/<right>, flip <hflip>}, colour
{<grayscale>}, other {2x2 / 3x3 collage <collage>}, each group with probability p, 0.5 as
run_textboost_db.py's `--augment_p`), the tokens with their init words (`AUGMENTATION_TOKENS`,
`add_augmentation_tokens`: "zoom in", "far away" and "photo collage" give two vectors each) and
the caption that names a view's tokens (`augmented_caption`). NOT built: wiring them into
training. That needs `data.augmentation = "textboost"` to build the view pool with
`paired_views`, each view's caption ids in the concept data, the tokens' vectors as a trained
group (initialised from the init words), the caption pass encoding each row's own caption
(today one caption per concept, [C, T]) and the U-Net taking a context per row. Until then a
TextBoost run trains on CoRe's augmentation with the plain caption. [UNVERIFIED] details of the
code not read here: how one geometric transform is picked (here uniformly), where the scaled
photo sits on its canvas (here centred), the crop's ranges (here torchvision's defaults) and
where the tokens go in the caption (here after it). The code's quirk that the shift writes
"<left_0> <left_1> <left_2>" / "<right_0> <right_0> <right_0>" is not copied: each token is
written as all its own vectors.

With `core`, y_cat's encodings stay the frozen encoder's (CoRe's targets are computed once,
before training). SD 1.x/2.x only.

Exports: `pytorch_lora_weights.safetensors` with diffusers' text-encoder names
(`text_encoder.<module>.lora_A.weight`), which `load_lora_weights` reads into a pipeline's text
encoder, and the learned token as for every method.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from core_jax import losses
from core_jax.errors import InputError
from core_jax.methods.base import Method, ParamGroup, Settings, Term
from core_jax.methods.lora import (
    LoraAdapters,
    adapted_call,
    from_checkpoint,
    merge,
    target_paths,
)
from core_jax.text import add_placeholder_tokens, placeholder_string

ATTENTION = ("q_proj", "k_proj", "v_proj")
# The augmentation tokens (object mode) and the words their vectors start at (the code's
# `add_augmentation_tokens`): a word of several tokens gives the token as many vectors.
AUGMENTATION_TOKENS = {
    "<grayscale>": "grayscale", "<zoom-in>": "zoom in", "<zoom-out>": "far away",
    "<collage>": "photo collage", "<crop>": "crop", "<hflip>": "ktn", "<left>": "pll",
    "<right>": "ucd",
}


def add_augmentation_tokens(tokenizer: Any) -> dict[str, tuple[list[int], list[int]]]:
    """Adds each augmentation token to `tokenizer` (in place) with as many vectors as its init
    word has tokens: token -> (its ids, the init word's ids, one per vector)."""
    added = {}
    for token, word in AUGMENTATION_TOKENS.items():
        init_ids = tokenizer.encode(word, add_special_tokens=False)
        added[token] = (add_placeholder_tokens(tokenizer, token, len(init_ids)), init_ids)
    return added


def augmented_caption(caption: str, tokens: tuple[str, ...], vectors: Mapping[str, int]) -> str:
    """`caption` with a view's augmentation tokens after it, each written out as all its
    vectors' tokens ("<zoom-in> <zoom-in>_1"); `vectors`: token -> its number of vectors.
    [UNVERIFIED] where the code puts them in the caption."""
    return " ".join([caption] + [placeholder_string(t, vectors[t]) for t in tokens])

DEFAULTS = {
    "lambda_kp": 0.1,
    "text_lora_rank": 4,
    "text_lora_alpha": 4.0,
    "text_lora_targets": ATTENTION,
    "text_lora_learning_rate": 1e-4,
}


def init_text_adapters(
    text_params: Mapping[str, Any], rank: int, alpha: float, targets: Any, key: jax.Array
) -> LoraAdapters:
    """One run's first text-encoder adapters: peft's "gaussian" init, A ~ N(0, 1/r^2), B = 0."""
    if not (isinstance(rank, int) and rank >= 1):
        raise InputError(f"text_lora_rank is {rank!r}; give a whole number >= 1")
    if not alpha > 0:
        raise InputError(f"text_lora_alpha is {alpha!r}; give a positive number")
    paths = target_paths(text_params, targets, "text encoder", ATTENTION + ("out_proj",))
    kernels = traverse_util.flatten_dict(text_params)
    flat = {}
    for path, k in zip(paths, jax.random.split(key, len(paths)), strict=True):
        fan_in, fan_out = kernels[path + ("kernel",)].shape
        flat[path + ("A",)] = jax.random.normal(k, (fan_in, rank), jnp.float32) / rank
        flat[path + ("B",)] = jnp.zeros((rank, fan_out), jnp.float32)
    return LoraAdapters(traverse_util.unflatten_dict(flat), scale=float(alpha) / rank)


def _init_group(
    settings: Settings, data: Any, frozen: Mapping[str, Any], num_vectors: int, keys: jax.Array
) -> LoraAdapters:
    if "text_2" in frozen:
        raise InputError("textboost adapts one text encoder (SD 1.x/2.x); SDXL has two")
    stage = settings.stage

    def one(key: jax.Array) -> LoraAdapters:
        return init_text_adapters(frozen["text"], stage["text_lora_rank"],
                                  stage["text_lora_alpha"], stage["text_lora_targets"],
                                  jax.random.wrap_key_data(key))

    return jax.vmap(one)(keys)


def _terms(settings: Settings) -> tuple[Term, ...]:
    def kp(hidden: jax.Array, frozen: jax.Array, numbers) -> jax.Array:
        # [b, T, D] each: the concept's rows' prior prompts, every token position
        return losses.knowledge_preservation_loss(hidden, frozen, jnp.ones(hidden.shape[:2], bool))

    return (Term("kp", ("kp_hidden", "kp_frozen"), kp, weight="lambda_kp"),)


TEXT_LORA = ParamGroup(
    init=_init_group, text_call=adapted_call, text_merge=merge,
    from_checkpoint=lambda tree, stage: from_checkpoint(tree, stage["text_lora_rank"],
                                                        stage["text_lora_alpha"]),
)

METHOD = Method(
    name="textboost",
    summary="rank-4 LoRA on the text encoder's q/k/v with knowledge preservation (TextBoost; "
            "with textual_inversion)",
    defaults=DEFAULTS,
    source="arXiv 2409.08248; github.com/nahyeonkaty/textboost (train_textboost.py, "
           "run_textboost_db.py); METHODS.md 3",
    numbers=("lambda_kp",),
    trains={"text_lora": "text_lora_learning_rate"},
    groups={"text_lora": TEXT_LORA},
    needs_trained=("embeds",),
    terms=_terms,
)

METHODS = (METHOD,)
