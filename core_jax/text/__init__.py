"""Text side: CLIP tokenizer, placeholder tokens, prompt ids, CoRe context alignment."""

from core_jax.text.context import RegularizationPrompts, regularization_prompts
from core_jax.text.inject import (
    encode_per_layer,
    encode_per_layer_with_bypass,
    encode_sdxl_with_learned,
    encode_with_learned,
    placeholder_slots,
    second_encoder_ids,
)
from core_jax.text.templates import (
    CLASS_FIELD,
    check_prompt,
    check_template,
    fill_prompt,
    fill_template,
    load_templates,
)
from core_jax.text.tokenizer import (
    add_placeholder_tokens,
    caption_ids,
    load_tokenizer,
    placeholder_string,
    placeholder_tokens,
    super_category_ids,
    tokenize,
)
from core_jax.text.vocab import MODEL_MAX_LENGTH, clip_tokenizer_dir

__all__ = [
    "CLASS_FIELD",
    "MODEL_MAX_LENGTH",
    "RegularizationPrompts",
    "add_placeholder_tokens",
    "caption_ids",
    "check_prompt",
    "check_template",
    "clip_tokenizer_dir",
    "encode_sdxl_with_learned",
    "encode_per_layer",
    "encode_per_layer_with_bypass",
    "encode_with_learned",
    "fill_prompt",
    "fill_template",
    "load_templates",
    "load_tokenizer",
    "placeholder_slots",
    "placeholder_string",
    "placeholder_tokens",
    "regularization_prompts",
    "second_encoder_ids",
    "super_category_ids",
    "tokenize",
]
