"""core-jax sample --workdir DIR --prompt "a S* in the jungle" [--prompt ...] [--num_images 4]
[--tto] [--neti_truncation K]"""

from __future__ import annotations

from pathlib import Path

from absl import flags

from core_jax.commands.compile_cache_flag import start_compile_cache

_WORKDIR = flags.DEFINE_string("workdir", None, "a core-jax train workdir")
_PROMPTS = flags.DEFINE_multi_string(
    "prompt", None, "prompt(s); write the learned word as S*, {} or the placeholder itself"
)
_NUM = flags.DEFINE_integer("num_images", 4, "images per prompt")
_STEPS = flags.DEFINE_integer("steps", None, "sampler steps (default: the run's config)")
_SAMPLER = flags.DEFINE_enum("sampler", None, ["ddim", "dpmpp_2m"], "default: the run's config")
_GUIDANCE = flags.DEFINE_float("guidance_scale", None, "default: the run's config")
_SEED = flags.DEFINE_integer("seed", 0, "sampling seed")
_BASE_UNET = flags.DEFINE_bool("base_unet", False, "use the base U-Net, not stage 2's")
_TTO = flags.DEFINE_bool(
    "tto", False, "CoRe's test-time optimization: adapt the vectors to each prompt first "
    "(saved in WORKDIR/tto/); each prompt gets a row with the trained and one with the adapted "
    "vectors, from the same noise")
_TTO_STEPS = flags.DEFINE_integer("tto_steps", 10, "test-time optimization steps (paper: 10)")
_TTO_LR = flags.DEFINE_float("tto_lr", 5e-4, "test-time optimization learning rate (paper: 5e-4)")
_NETI_TRUNCATION = flags.DEFINE_integer(
    "neti_truncation", None, "a NeTI run: keep only the mapper's first K hidden units (the "
    "official code's truncation_idx; nested dropout trained it for this); default: all")
_OUT = flags.DEFINE_string("out", None, "PNG path (default: WORKDIR/samples/sample_<time>.png)")
flags.mark_flags_as_required(["workdir", "prompt"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments: {' '.join(argv[1:])}")
    from core_jax.commands import run_reporting_input_errors
    from core_jax.train.outputs import sample_run

    start_compile_cache(_WORKDIR.value)
    path = run_reporting_input_errors(
        sample_run, Path(_WORKDIR.value), list(_PROMPTS.value), num_images=_NUM.value,
        steps=_STEPS.value, sampler=_SAMPLER.value, guidance_scale=_GUIDANCE.value,
        seed=_SEED.value, use_stage2_unet=not _BASE_UNET.value,
        out=Path(_OUT.value) if _OUT.value else None,
        tto_steps=_TTO_STEPS.value if _TTO.value else 0, tto_learning_rate=_TTO_LR.value,
        neti_truncation=_NETI_TRUNCATION.value,
    )
    print(f"wrote {path}")
