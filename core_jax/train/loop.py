"""`core-jax train`: photos in, a learned concept out. Reads top to bottom:

set up (models, prompts, latent pool) -> restore -> stage 1 loop -> stage 2 loop -> export,
logging and checkpointing along the way. One concept; `core-jax sweep` packs many.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import signal
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from core_jax import export
from core_jax.data import save_image_grid
from core_jax.errors import InputError, NonFiniteError
from core_jax.sample import Pipeline, generate
from core_jax.text import fill_template
from core_jax.train import setup as run_setup
from core_jax.train.checkpoints import RunCheckpoints
from core_jax.train.concepts import ConceptSpec, build_concept_data
from core_jax.train.runlog import RunLog, plot_loss_curves
from core_jax.train.stage2 import (
    UNetState,
    caption_context,
    init_unet_state,
    make_unet_optimizer,
    shard_stage2_step,
)
from core_jax.train.state import ConceptHypers, init_embedding_state
from core_jax.train.step import Stage1Config, make_mesh, make_optimizer, shard_stage1_step

# Config keys a resumed run may change: they do not alter what is computed.
RESUMABLE_CHANGES = ("stage2.steps", "log_every", "checkpoint_every", "keep_checkpoints", "sample.")


@dataclasses.dataclass
class RunOutputs:
    workdir: Path
    learned_embeds: Path
    a1111_embedding: Path
    unet: Path | None
    samples: list[Path]
    loss_curves: Path | None
    checkpoints: Path
    metrics: Path


def flatten_config(config: dict, prefix: str = "") -> dict[str, Any]:
    """{"stage1": {"steps": 3}} -> {"stage1.steps": 3}: configs compared key by key."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flatten_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_workdir(workdir: Path, config: ml_collections.ConfigDict, overwrite: bool) -> None:
    """Refuse, before anything is written: a workdir that is a file, one that holds a run of a
    different config (unless told to overwrite), and an overwrite that would delete a folder
    that is not a core-jax run or that holds the run's own photos or model."""
    if workdir.exists() and not workdir.is_dir():
        raise InputError(f"--workdir {workdir} is a file, not a folder")
    saved = workdir / "config.json"
    if overwrite:
        if workdir.is_dir() and any(workdir.iterdir()) and not saved.is_file():
            raise InputError(
                f"--overwrite would delete {workdir}, which is not a core-jax run (no "
                "config.json); choose another --workdir"
            )
        # Only what exists on disk can be deleted ("builtin:chelsea" names no file).
        inputs = [Path(p).resolve() for p in (config.model.path, config.concept.images) if p]
        for path in (p for p in inputs if p.exists()):
            if path.is_relative_to(workdir.resolve()):
                raise InputError(
                    f"--overwrite would delete {path}, an input of this run inside {workdir}"
                )
        return
    if not saved.is_file():
        return
    try:
        before = flatten_config(json.loads(saved.read_text()))
    except ValueError as err:
        raise InputError(f"cannot read {saved} ({err}); --overwrite starts afresh") from err
    now = flatten_config(json.loads(config.to_json()))
    changed = sorted(
        k for k in before.keys() | now.keys()
        if before.get(k) != now.get(k) and not k.startswith(RESUMABLE_CHANGES)
    )
    if changed:
        raise InputError(
            f"{workdir} holds a run with a different config (differs in {', '.join(changed)});"
            " use a new --workdir, or --overwrite to start this one afresh"
        )


def prepare_workdir(workdir: Path, config: ml_collections.ConfigDict, overwrite: bool) -> None:
    """Create the workdir (emptied first under `overwrite`) and write config.json atomically.
    Call `check_workdir` first."""
    if overwrite and workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    saved = workdir / "config.json"
    tmp = saved.with_suffix(".json.tmp")
    tmp.write_text(config.to_json(indent=2))
    tmp.replace(saved)


def stage1_config(
    config: ml_collections.ConfigDict, caption: np.ndarray, placeholder_ids: list[int]
) -> Stage1Config:
    """The static step settings a run config implies (a zero weight drops its term)."""
    s1 = config.stage1
    return Stage1Config(
        batch_size=s1.batch_size,
        caption_ids=tuple(int(i) for i in caption),
        placeholder_ids=tuple(placeholder_ids),
        use_emb=s1.lambda_emb > 0,
        use_attn=s1.lambda_attn > 0,
        use_pairwise=s1.lambda_pairwise > 0,
        use_hinge=s1.lambda_hinge > 0,
        emb_variant=s1.emb_variant,
        attn_variant=s1.attn_variant,
        rescale_start=s1.rescale_start,
        rescale_end=s1.rescale_end,
        min_snr_gamma=s1.min_snr_gamma or None,
    )


def _nonfinite_message(stage: int, step: int, streak: int, metrics: dict[str, Any]) -> str:
    bad = [k for k, v in metrics.items() if not np.all(np.isfinite(np.asarray(v, np.float64)))]
    what = ", ".join(bad) if bad else "the gradient"
    return (
        f"stage {stage} step {step}: {streak} steps in a row skipped because {what} went "
        "non-finite; the state is the last finite one (lower the learning rate, check the "
        "photos, or try fp32)"
    )


class StopRequests:
    """SIGTERM / SIGINT (preemption, Ctrl-C) or a requested step end the run cleanly: the loop
    finishes the step in flight, checkpoints it and returns."""

    def __init__(self, stop_at_step: int | None):
        self.stop_at_step = stop_at_step
        self.signal: str | None = None
        self._previous = {
            sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)
        }

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signal.Signals(signum).name

    def __call__(self, step: int) -> bool:
        return self.signal is not None or step == self.stop_at_step

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    overwrite: bool = False,
    stop_at_step: int | None = None,
) -> RunOutputs | None:
    """Run (or resume) both stages; None when stopped early (signal or `stop_at_step`), after
    checkpointing the step reached."""
    workdir = Path(workdir)
    s1, s2 = config.stage1, config.stage2
    total_steps = s1.steps + s2.steps

    # --- Check: bad input fails here in one line, before anything is written or compiled ----
    run_setup.check_config(config)
    if stop_at_step is not None and stop_at_step < 1:
        raise InputError(f"--stop_at_step is {stop_at_step}; it must be at least 1")
    check_workdir(workdir, config, overwrite)
    images = run_setup.concept_images(config)
    tokenizer = run_setup.run_tokenizer(config)
    text = run_setup.concept_text(config, tokenizer)  # before the weights: faster to fail
    models = run_setup.load_models(config, tokenizer)
    run_setup.check_resolution(config, models)
    placeholder_ids, concept_text, caption = text.placeholder_ids, text.text, text.caption

    # --- Set up --------------------------------------------------------------------------------
    prepare_workdir(workdir, config, overwrite)
    spec = ConceptSpec(
        config.concept.placeholder, config.concept.super_category, text.templates,
        seed=config.seed,
    )
    mean, std = run_setup.latent_pool(config, models, images)
    data = build_concept_data(
        models.tokenizer, models.text_encoder, models.params["text"], concept_text, [spec],
        [(mean, std)],
    )
    frozen = {"text": models.params["text"], "unet": models.params["unet"]}
    mesh = make_mesh(1)
    optimizer = make_optimizer(s1.weight_decay, s1.b1, s1.b2, clip_norm=s1.clip_norm or None)
    init = jnp.repeat(data.super_embed[:, None], config.concept.num_vectors, axis=1)
    state = init_embedding_state(init, [config.seed], optimizer)
    hypers = ConceptHypers.broadcast(
        1, learning_rate=s1.learning_rate, lambda_emb=s1.lambda_emb, lambda_attn=s1.lambda_attn,
        lambda_pairwise=s1.lambda_pairwise, lambda_hinge=s1.lambda_hinge,
        hinge_margin=s1.hinge_margin,
    )
    stage1_step = shard_stage1_step(
        mesh, text_encoder=models.text_encoder, unet=models.unet, optimizer=optimizer,
        config=stage1_config(config, caption, placeholder_ids),
    )
    unet_optimizer = make_unet_optimizer(
        s2.learning_rate, s2.weight_decay, clip_norm=s2.clip_norm or None
    )

    pipeline = Pipeline(
        models.tokenizer, tuple(placeholder_ids), models.text_encoder, models.params["text"],
        models.unet, frozen["unet"], models.vae, models.params["vae"], models.schedule,
        placeholder=config.concept.placeholder,
    )

    def sample_grid(tag: str, step: int, learned: jax.Array, unet_params: Any) -> Path:
        pipeline.unet_params = unet_params  # same shapes: the compiled sampler is reused
        prompts = [fill_template(p, concept_text) for p in config.sample.prompts]
        images = generate(
            pipeline, prompts, np.asarray(learned),
            num_images_per_prompt=config.sample.images_per_prompt, steps=config.sample.steps,
            sampler=config.sample.sampler, guidance_scale=config.sample.guidance_scale,
            seed=config.seed,
        )
        path = save_image_grid(
            images, workdir / "samples" / f"{tag}_step{step:06d}.png",
            nrow=config.sample.images_per_prompt * 2,
        )
        log.image(f"samples/{tag}", step, np.asarray(_read_png(path)))
        return path

    # --- Restore ---------------------------------------------------------------------------
    checkpoints = RunCheckpoints(
        workdir / "checkpoints", config.keep_checkpoints, [s1.steps, total_steps]
    )
    start = checkpoints.latest_step() or 0
    unet_state: UNetState | None = None
    if start:
        names = checkpoints.items(start)
        like = {"embedding": state}
        if "unet" in names:
            like["unet"] = init_unet_state(frozen["unet"], config.seed, unet_optimizer)
        restored = checkpoints.restore(start, like)
        state, unet_state = restored["embedding"], restored.get("unet")
        print(f"resumed {workdir} at step {start} of {total_steps}")
    log = RunLog(workdir, total_steps, start)
    samples: list[Path] = []
    stop = StopRequests(stop_at_step)

    def guard(stage: int, step: int, metrics: dict[str, Any]) -> None:
        """Non-finite steps are skipped inside the step; too many in a row end the run."""
        streak.append(bool(np.asarray(metrics["nonfinite"]).any()))
        if len(streak) >= config.max_nonfinite and all(streak[-config.max_nonfinite:]):
            checkpoints.close()
            log.close()
            stop.close()
            raise NonFiniteError(_nonfinite_message(stage, step, len(streak), metrics))
        if not streak[-1]:
            streak.clear()

    streak: list[bool] = []

    def stopped(step: int, items: dict[str, Any]) -> bool:
        if not stop(step):
            return False
        checkpoints.save(step, items)
        checkpoints.close()
        log.close()
        stop.close()
        why = f"{stop.signal} received" if stop.signal else f"stop requested at step {step}"
        print(f"{why}: checkpoint saved at step {step} of {total_steps}; run the same command "
              "again to resume")
        return True

    # --- Stage 1: the embedding --------------------------------------------------------------
    step = start
    while step < s1.steps:
        state, metrics = stage1_step(state, data, hypers, frozen, models.schedule)
        step += 1
        metrics = jax.device_get(metrics)
        guard(1, step, metrics)
        if step % config.log_every == 0 or step == s1.steps:
            log.scalars(1, step, metrics)
        if step % config.checkpoint_every == 0 or step == s1.steps:
            checkpoints.save(step, {"embedding": state})
        if config.sample.every and step % config.sample.every == 0 and step < s1.steps:
            samples.append(sample_grid("stage1", step, state.embeds[0], frozen["unet"]))
        if stopped(step, {"embedding": state}):
            return None
    learned = state.embeds[0]  # [V, D]
    outputs_embeds = export.save_learned_embeds(
        workdir / "learned_embeds.safetensors", config.concept.placeholder, np.asarray(learned)
    )
    if start <= s1.steps:
        samples.append(sample_grid("stage1", s1.steps, learned, frozen["unet"]))

    # --- Stage 2: the U-Net, embedding frozen ------------------------------------------------
    unet_folder = None
    if s2.steps:
        if unet_state is None:
            unet_state = init_unet_state(frozen["unet"], config.seed, unet_optimizer)
        # The caption's encoding is constant in stage 2: computed once.
        encode = functools.partial(caption_context, models.text_encoder, tuple(placeholder_ids))
        context = jax.jit(encode)(models.params["text"], jnp.asarray(caption), learned)  # [T, D]
        stage2_step = shard_stage2_step(
            mesh, unet=models.unet, optimizer=unet_optimizer, batch_size=s2.batch_size,
            min_snr_gamma=s1.min_snr_gamma or None,
        )
        while step < total_steps:
            unet_state, metrics = stage2_step(unet_state, data, context, models.schedule)
            step += 1
            metrics = jax.device_get(metrics)
            guard(2, step, metrics)
            if step % config.log_every == 0 or step == total_steps:
                log.scalars(2, step, metrics)
            if step % config.checkpoint_every == 0 or step == total_steps:
                checkpoints.save(step, {"embedding": state, "unet": unet_state})
            if config.sample.every and step % config.sample.every == 0 and step < total_steps:
                samples.append(sample_grid("stage2", step, learned, unet_state.params))
            if stopped(step, {"embedding": state, "unet": unet_state}):
                return None
        samples.append(sample_grid("stage2", total_steps, learned, unet_state.params))
        unet_folder = export.export_unet(workdir, models.unet, unet_state.params)

    # --- Finish: wait for checkpoints, write the rest, say where everything is ---------------
    checkpoints.close()
    log.close()
    stop.close()
    # A1111 and ComfyUI take the prompt word from the file name.
    (workdir / "a1111").mkdir(exist_ok=True)
    a1111 = export.save_a1111_embedding(
        workdir / "a1111" / f"{_file_stem(config.concept.name)}.safetensors",
        config.concept.name, np.asarray(learned), step=s1.steps,
    )
    outputs = RunOutputs(
        workdir=workdir, learned_embeds=outputs_embeds, a1111_embedding=a1111, unet=unet_folder,
        samples=samples, loss_curves=plot_loss_curves(log.path, workdir / "loss_curves.png"),
        checkpoints=workdir / "checkpoints", metrics=log.path,
    )
    print(summary(outputs))
    return outputs


def _file_stem(placeholder: str) -> str:
    stem = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in placeholder).strip("_")
    return stem or "concept"


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def summary(outputs: RunOutputs) -> str:
    rows = [
        ("learned embedding (diffusers)", outputs.learned_embeds),
        ("A1111 / ComfyUI embedding", outputs.a1111_embedding),
        ("stage-2 U-Net (diffusers)", outputs.unet or "skipped (stage2.steps = 0)"),
        ("sample grids", outputs.samples[-1] if outputs.samples else "none"),
        ("loss curves", outputs.loss_curves or "none"),
        ("metrics", outputs.metrics),
        ("checkpoints", outputs.checkpoints),
        ("TensorBoard", f"tensorboard --logdir {outputs.workdir / 'tensorboard'}"),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"done: {outputs.workdir}"] + [f"  {name:<{width}}  {value}" for name, value in rows]
    return "\n".join(lines)
