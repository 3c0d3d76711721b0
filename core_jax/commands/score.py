"""core-jax score --images DIR --prompts FILE.jsonl --references DIR --clip PATH --dino PATH"""

from __future__ import annotations

from absl import flags

_IMAGES = flags.DEFINE_string("images", None, "folder of generated images")
_PROMPTS = flags.DEFINE_string(
    "prompts", None, 'JSONL, one row per image: {"image": "<path in --images>", "prompt": '
    '"a S* dog in the snow"} (optional "class" per row)')
_REFERENCES = flags.DEFINE_string("references", None, "folder of the subject's real photos")
_CLIP = flags.DEFINE_string("clip", None, "transformers CLIPModel folder "
                            "(e.g. openai/clip-vit-large-patch14), with its tokenizer")
_DINO = flags.DEFINE_string("dino", None, "transformers ViT (facebook/dino-vits16) or DINOv2 "
                            "folder")
_CLASS_WORD = flags.DEFINE_string(
    "class_word", "", "replaces the placeholder in CLIP-T's prompt (dropped where the class "
    "word already follows it); empty: the placeholder is removed")
_PLACEHOLDER = flags.DEFINE_string("placeholder", "S*", "the learned word as the prompts write it")
_OUT = flags.DEFINE_string("out", None, "where scores.jsonl and results.json go "
                           "(default: --images)")
_BATCH = flags.DEFINE_integer("batch_size", 32, "images per forward pass (one compile per "
                              "model)", lower_bound=1)
_PICKLE = flags.DEFINE_bool("allow_pickle", False, "read pickled .bin weights of a model folder "
                            "without safetensors (pickles can run code: only for files you trust)")
flags.mark_flags_as_required(["images", "prompts", "references", "clip", "dino"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments: {' '.join(argv[1:])}")
    from core_jax.commands import run_reporting_input_errors
    from core_jax.eval.score_folder import score_folder

    run_reporting_input_errors(
        score_folder, _IMAGES.value, _PROMPTS.value, _REFERENCES.value, _CLIP.value,
        _DINO.value, class_word=_CLASS_WORD.value, placeholder=_PLACEHOLDER.value,
        out=_OUT.value, batch_size=_BATCH.value, allow_pickle=_PICKLE.value,
    )
