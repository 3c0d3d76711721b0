"""Reading a run back from its workdir: `core-jax sample` and `core-jax export`."""

from __future__ import annotations

import copy
import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from core_jax import export, tto, weights
from core_jax.config import migrate
from core_jax.data import save_image_grid
from core_jax.errors import InputError
from core_jax.methods import group_of
from core_jax.sample import generate
from core_jax.text import add_placeholder_tokens
from core_jax.train import setup as run_setup
from core_jax.train.checkpoints import checkpoint_items, newest_intact
from core_jax.train.passes import (
    TimestepVectors,
    cross_attention_layers,
    merged_text,
    merged_unet,
    run_vectors,
    unet_groups,
)
from core_jax.train.stages import stage_methods, stage_names


def load_run_config(workdir: Path) -> ml_collections.ConfigDict:
    path = workdir / "config.json"
    if not path.is_file():
        raise InputError(f"{workdir} is not a core-jax run (no config.json)")
    try:
        return ml_collections.ConfigDict(migrate(json.loads(path.read_text())))
    except ValueError as err:
        raise InputError(f"cannot read {path}: {err}") from err


def latest_checkpoint(workdir: Path) -> tuple[int, dict[str, Any]]:
    """The newest intact checkpoint's arrays, as plain nested dicts (no target needed). Its
    files are verified against their checksums first; a damaged newer step is skipped with a
    warning line and left where it is (sample and export only read the workdir)."""
    directory = (workdir / "checkpoints").absolute()
    if not directory.is_dir():
        raise InputError(f"{workdir} has no checkpoints yet")
    # Finalized steps are the folders named by their number alone (see checkpoints.py). A
    # plain Checkpointer reads them without a manager's warnings about read-only folders.
    steps = [int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir()]
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:

        def read(step: int) -> dict[str, Any]:
            names = checkpoint_items(directory, step)
            restored = checkpointer.restore(
                directory / str(step),
                args=ocp.args.Composite(**{n: ocp.args.StandardRestore() for n in names}),
            )
            return {name: restored[name] for name in names}

        found = newest_intact(directory, steps, read, set_aside=False, verb="using")
    if found is None:
        raise InputError(f"{workdir} has no complete checkpoint yet")
    return found


def expand_placeholder(prompt: str, placeholder: str) -> str:
    """Users may write `S*` or `{}` for the learned word, or the placeholder itself; the
    pipeline expands the placeholder into all of its vectors' tokens."""
    return re.sub(r"(?<![<\w])S\*(?![\w>])", placeholder, prompt).replace("{}", placeholder)


def sample_run(
    workdir: Path,
    prompts: list[str],
    *,
    num_images: int,
    steps: int | None,
    sampler: str | None,
    guidance_scale: float | None,
    seed: int,
    use_stage2_unet: bool = True,
    out: Path | None = None,
    tto_steps: int = 0,
    tto_learning_rate: float = tto.DEFAULT_LEARNING_RATE,
    neti_truncation: int | None = None,
    say: Callable[[str], None] = print,
) -> Path:
    """Images of the run's concept for `prompts`, as one PNG grid (a row per prompt).

    With `tto_steps` > 0, CoRe's test-time optimization (`core_jax.tto`) adapts the vectors to
    each prompt first and saves them as WORKDIR/tto/<prompt>.safetensors; each prompt then has
    two rows drawn from the same noise: with the trained vectors, then with the adapted ones.
    `neti_truncation` k (a NeTI run): the mapper keeps its first k hidden units (the code's
    `truncation_idx`)."""
    config = load_run_config(workdir)
    if neti_truncation is not None and not (workdir / export.NETI_NAME).is_file():
        raise InputError("--neti_truncation is for a NeTI run (a mapper in "
                         f"{export.NETI_NAME}); {workdir} has none")
    models = run_setup.load_models(config)
    embeds_path = workdir / "learned_embeds.safetensors"
    if (workdir / export.NETI_NAME).is_file():  # a mapper of the timestep (NeTI)
        _, mapper = export.load_neti_mapper(workdir / export.NETI_NAME,
                                            list(cross_attention_layers(models.unet)))
        learned = export.neti_vectors(mapper, neti_truncation)
    elif (workdir / export.XTI_NAME).is_file():  # vectors per cross-attention layer
        _, learned = export.load_xti_embeds(workdir / export.XTI_NAME,
                                            list(cross_attention_layers(models.unet)))
    elif embeds_path.is_file():
        _, learned = export.load_learned_embeds(embeds_path)
    else:  # a run still in stage 1 (or stopped): its newest checkpoint
        _, items = latest_checkpoint(workdir)
        learned = run_vectors(checkpoint_params(items))
    if tto_steps and isinstance(learned, TimestepVectors):
        raise InputError("test-time optimization adapts one vector per token; this run's "
                         "vectors come from a mapper of the timestep (NeTI)")
    if tto_steps and np.ndim(learned) == 3:
        raise InputError("test-time optimization adapts one vector per token; this run's "
                         "vectors are per cross-attention layer (XTI)")
    unet_params = models.params["unet"]
    if use_stage2_unet and (workdir / "unet" / "config.json").is_file():
        _, unet_params = weights.load_unet(workdir / "unet")
    elif (use_stage2_unet and _trains_groups(config, "unet_call")
          and (workdir / "checkpoints").is_dir()):
        # Adapters (LoRA, Custom Diffusion's K/V) live in the checkpoint, not in a unet/ folder.
        params = checkpoint_params(latest_checkpoint(workdir)[1], config)
        if unet_groups(params):
            unet_params = jax.device_get(merged_unet(params, unet_params))
    tokenizer = copy.deepcopy(models.tokenizer)  # the models' stays plain (TTO adds its own)
    placeholder_ids = add_placeholder_tokens(
        tokenizer, config.concept.placeholder, config.concept.num_vectors
    )
    pipeline = run_setup.sampling_pipeline(models, tokenizer, placeholder_ids,
                                           config.concept.placeholder, unet_params)
    if _trains_groups(config, "text_call") and (workdir / "checkpoints").is_dir():
        # Text-encoder adapters (TextBoost) live in the checkpoint too.
        params = checkpoint_params(latest_checkpoint(workdir)[1], config)
        pipeline.text_params = jax.device_get(merged_text(params, models.params["text"]))
        # Guidance's unconditional branch stays the frozen encoder's (TextBoost's null
        # embedding).
        pipeline.null_text_params = models.params["text"]
    expanded = [expand_placeholder(p, config.concept.placeholder) for p in prompts]

    def draw(prompts: list[str], vectors: np.ndarray) -> np.ndarray:
        return generate(
            pipeline, prompts, vectors, num_images_per_prompt=num_images,
            steps=steps or config.sample.steps, sampler=sampler or config.sample.sampler,
            guidance_scale=(config.sample.guidance_scale if guidance_scale is None
                            else guidance_scale),
            seed=seed,
        )

    if tto_steps:
        optimizer = tto.CoreTTO(config, models, learned, unet_params, steps=tto_steps,
                                          learning_rate=tto_learning_rate)
        rows = []
        for prompt, text in zip(prompts, expanded, strict=True):
            adapted = optimizer.adapt(prompt)
            path = export.save_learned_embeds(
                workdir / "tto" / f"{export.file_stem(prompt)}.safetensors",
                config.concept.placeholder, adapted.vectors)
            say(f"test-time optimization of {prompt!r}: " + ", ".join(
                f"{k} {adapted.first[k]:.4g} -> {adapted.last[k]:.4g}"
                for k in adapted.first if k != "loss") + f"; vectors in {path}")
            rows += [draw([text], learned), draw([text], adapted.vectors)]
        images = np.concatenate(rows)
    else:
        images = draw(expanded, learned)
    out = out or workdir / "samples" / f"sample_{time.strftime('%Y%m%d-%H%M%S')}.png"
    return save_image_grid(images, out, nrow=num_images)


def _trains_groups(config: ml_collections.ConfigDict, reader: str) -> bool:
    """Whether a stage of the run trains a group the U-Net (`reader` "unet_call") or the text
    encoder ("text_call") reads, so that sampling needs its checkpoint; a TI or CoRe stage-1
    run samples without reading one."""
    return any(getattr(group_of(group), reader) is not None
               for name in stage_names(config) for method in stage_methods(config[name])
               for group in method.trains)


def checkpoint_params(
    items: dict[str, Any], config: ml_collections.ConfigDict | None = None
) -> dict[str, Any]:
    """The run's parameter groups (its one concept) from a checkpoint's items, each rebuilt as
    its group defines (`ParamGroup.from_checkpoint`, from the `config` of the stage that trains
    it); checkpoints of core-jax before config version 2 held "embedding" and "unet" states
    instead."""
    if "state" in items:
        params = {group: jax.tree.map(lambda x: np.asarray(x[0]), tree)
                  for group, tree in items["state"]["params"].items()}
        if config is not None:
            for name in stage_names(config):
                for method in stage_methods(config[name]):
                    for group in set(method.trains) & set(params):
                        rebuild = group_of(group).from_checkpoint
                        if rebuild is not None and not hasattr(params[group], "replace"):
                            params[group] = rebuild(params[group], config[name])
        return params
    params = {"embeds": np.asarray(items["embedding"]["embeds"][0])}
    if "unet" in items:
        params["unet"] = items["unet"]["params"]
    return params


def export_run(workdir: Path, out: Path | None = None) -> list[Path]:
    """Exports from the newest checkpoint: learned embeds, the A1111 file, the U-Net if any
    (a trained copy, or the frozen one with SVDiff's shifts, written with the shifts, or
    AttnDreamBooth's stage-2 cross-attention projections merged), LoRA adapters (U-Net and text
    encoder), Custom Diffusion's K/V."""
    config = load_run_config(workdir)
    out = out or workdir / "export"
    out.mkdir(parents=True, exist_ok=True)
    step, items = latest_checkpoint(workdir)
    params = checkpoint_params(items, config)
    unet = None
    if "unet" in params:
        unet = (run_setup.load_models(config).unet, params["unet"])
    elif "svdiff" in params or "cross_attention" in params:
        models = run_setup.load_models(config)
        unet = (models.unet, jax.device_get(merged_unet(params, models.params["unet"])))
    vectors, per_layer, mapper = run_vectors(params), None, None
    if isinstance(vectors, TimestepVectors):  # NeTI: the mapper
        module = run_setup.load_models(config).unet
        mapper = (list(cross_attention_layers(module)), vectors.value)
    elif np.ndim(vectors) == 3:  # XTI: per cross-attention layer
        module = run_setup.load_models(config).unet
        per_layer = (list(cross_attention_layers(module)), vectors)
    written = export.export_concept(
        out, name=config.concept.name, placeholder=config.concept.placeholder,
        vectors=params["embeds"], unet=unet, lora=params.get("lora"),
        svdiff=params.get("svdiff"), custom_diffusion=params.get("custom_diffusion"),
        text_lora=params.get("text_lora"), step=step,
        sdxl_width_1=run_setup.sdxl_width_1(config), xti=per_layer, neti=mapper,
    )
    return list(written.values())
