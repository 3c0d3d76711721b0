"""The run loop: every run, of `core-jax train` (a sweep of one) or of `core-jax sweep`, trains
here. Runs that may share a compiled program form a group; a group's runs train C at a time as
one pack, packed on the step's concept axis. Per pack the story reads top to bottom:

set up (concept data, numbers) -> restore (the newest intact checkpoint) -> for each stage:
loop (step, guard, log, checkpoint, sample, stop on request) -> the runs' exports and results
(only a finished run has them). Whatever happens to one run (a stop, a non-finite streak, a
resume) happens the same way to every run, alone or packed.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import signal
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from core_jax import export
from core_jax.data import save_image_grid
from core_jax.errors import InputError, NonFiniteError
from core_jax.files import atomic_write_bytes
from core_jax.methods import palp
from core_jax.methods.prior import POOL_KEYS
from core_jax.sample import Pipeline, generate
from core_jax.text import (
    CLASS_FIELD,
    add_placeholder_tokens,
    caption_ids,
    fill_prompt,
    placeholder_string,
)
from core_jax.train import setup as run_setup
from core_jax.train.checkpoints import RunCheckpoints
from core_jax.train.class_pool import ClassPools, pool_spec
from core_jax.train.concepts import ConceptSpec, LatentPool, knowledge_prompts
from core_jax.train.parallel import CONCEPT_AXIS, fit_mesh
from core_jax.train.passes import (
    TimestepVectors,
    cross_attention_layers,
    merged_text,
    merged_unet,
    run_vectors,
    text_groups,
    with_shared,
)
from core_jax.train.profile import StepProfiler
from core_jax.train.runlog import MetricsLog, Progress, plot_loss_curves
from core_jax.train.stages import (
    build_program,
    stage_ends,
    stage_names,
    stage_numbers,
    stage_params,
)
from core_jax.train.state import ConceptData, TrainState, stage_keys
from core_jax.train.step import StageProgram, init_state, shard_step, unsplit
from core_jax.train.workdir import check_workdir, prepare_workdir


@dataclasses.dataclass
class Run:
    """One run: its full config (what `core-jax train` would run) and where its outputs go."""

    name: str
    config: ml_collections.ConfigDict
    folder: Path


@dataclasses.dataclass
class Pack:
    """Runs of one group trained together; slots past the members repeat the first run (their
    results are dropped) so every pack of a group has the group's shapes."""

    runs: list[Run]
    size: int
    checkpoints: Path
    label: str = ""  # "group 1/2, pack 3/4", for progress lines

    @property
    def slots(self) -> list[Run]:
        return self.runs + [self.runs[0]] * (self.size - len(self.runs))


class StopRequests:
    """SIGTERM / SIGINT (preemption, Ctrl-C) or a requested step end training cleanly: the loop
    finishes the step in flight, checkpoints it and returns."""

    def __init__(self, stop_at_step: int | None = None):
        self.stop_at_step = stop_at_step
        self.signal: str | None = None
        self._previous = {
            sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)
        }

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signal.Signals(signum).name

    def __call__(self, step: int) -> bool:
        return self.signal is not None or step == self.stop_at_step

    def message(self, step: int, total: int) -> str:
        why = f"{self.signal} received" if self.signal else f"stop requested at step {step}"
        return (f"{why}: checkpoint saved at step {step} of {total}; run the same command again "
                "to resume")

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclasses.dataclass
class Env:
    """What every pack of a job shares."""

    models: run_setup.Models
    mesh: Mesh
    stop: StopRequests
    progress: Callable[[str], None] | None = None  # hears of packs starting, saving, ending
    alone: bool = False  # `core-jax train`: a run that fails raises instead of being reported
    class_pools: ClassPools | None = None  # prior preservation's class images, made once
    profiler: StepProfiler | None = None  # --profile N: traces N steps

    @property
    def frozen(self) -> dict[str, Any]:
        return {**self.models.frozen_text, "unet": self.models.params["unet"]}

    def say(self, line: str) -> None:
        if self.progress:
            self.progress(line)


class Group:
    """Runs that share compiled programs: their configs differ only in per-run numbers, seeds
    and concepts. Holds the tokenizer with the placeholder tokens, each stage's program and
    compiled step, and (when asked) the sampling pipeline."""

    def __init__(self, runs: Sequence[Run], env: Env):
        self.runs, self.env = list(runs), env
        first = self.runs[0].config
        models = env.models
        self.tokenizer = copy.deepcopy(models.tokenizer)
        c = first.concept
        self.placeholder_ids = add_placeholder_tokens(self.tokenizer, c.placeholder,
                                                      c.num_vectors)
        self.text = placeholder_string(c.placeholder, c.num_vectors)
        step_models = run_setup.step_models(
            models, self.tokenizer, self.placeholder_ids,
            caption_ids(self.tokenizer, self.text, c.caption, super_category=c.super_category),
        )
        self.stages = stage_names(first)
        self.ends = stage_ends(first)
        self.programs: list[StageProgram] = [
            build_program([r.config[name] for r in self.runs], step_models,
                          models.schedule.prediction_type)
            for name in self.stages
        ]
        self.prior_stage = _prior_stage(first, self.stages, self.programs)
        self.steps = [shard_step(env.mesh, program) for program in self.programs]
        self._pipeline: Pipeline | None = None
        self._frozen: dict[str, Any] | None = None

    @property
    def frozen(self) -> dict[str, Any]:
        """The frozen weights its steps read: the models', plus the shared values of the groups
        its stages train (SVDiff's singular vectors), made once."""
        if self._frozen is None:
            trained = [g for program in self.programs for g in program.trains]
            self._frozen = with_shared(self.env.frozen, trained)
        return self._frozen

    def stage_at(self, step: int) -> int:
        """The stage whose state a checkpoint at global `step` (>= 1) holds."""
        return next(k for k, end in enumerate(self.ends) if step <= end)

    def pipeline(self) -> Pipeline:
        if self._pipeline is None:
            self._pipeline = run_setup.sampling_pipeline(
                self.env.models, self.tokenizer, self.placeholder_ids,
                self.runs[0].config.concept.placeholder,
            )
        return self._pipeline

    def concept_data(self, slots: Sequence[Run], hosts: list[tuple[set[int], int]]) -> ConceptData:
        """The slots' latent pools and prompt tables. A host encodes only the photos of the
        slots its devices hold; the rest are placeholders it never sends."""
        m, me, first = self.env.models, jax.process_index(), slots[0].config
        empty = np.zeros((first.data.num_views, *latent_size(first, m)), np.float32)
        placeholder = LatentPool(empty, empty, time_ids=np.zeros((len(empty), 6), np.int32))
        if run_setup.augmentation_of(first) == "custom_diffusion":
            placeholder = placeholder._replace(mask=np.zeros(empty.shape[:-1] + (1,), bool))
        pools = [
            run_setup.view_pool(r.config, m, run_setup.concept_images(r.config))
            if me in hosts[c][0] else placeholder
            for c, r in enumerate(slots)
        ]
        specs = [
            ConceptSpec(r.config.concept.name, r.config.concept.super_category,
                        run_setup.concept_templates(r.config), seed=r.config.seed,
                        init_word=r.config.concept.init_word)
            for r in slots
        ]
        prior: dict[str, Any] = {}
        if self.prior_stage is not None:
            stage = self.prior_stage
            specs_of = [pool_spec(r.config, stage, m.identity) for r in slots]
            pools_of = self.env.class_pools
            if pools_of is None:
                raise ValueError("prior preservation needs Env.class_pools (where pools live)")
            class_empty = np.zeros((first[stage].num_class_images, *latent_size(first, m)),
                                   np.float32)
            prior["class_pools"] = [
                pools_of.get(spec, m, first[stage].class_pool_dir)
                if me in hosts[c][0] else (class_empty, class_empty)
                for c, spec in enumerate(specs_of)
            ]
            prior["class_prompts"] = [spec.prompt for spec in specs_of]
        if CLASS_FIELD in first.concept.caption:
            prior["captions"] = [
                fill_prompt(r.config.concept.caption, self.text, r.config.concept.super_category)
                for r in slots
            ]
        if any("phrase_hidden" in program.needs for program in self.programs):
            prior["with_phrases"] = True
        if any("kp_hidden" in program.needs for program in self.programs):
            prior["knowledge"] = [knowledge_prompts(s.super_category, s.templates) for s in specs]
        palp_stages = [name for name, program in zip(self.stages, self.programs, strict=True)
                       if program.needs & palp.PASSES]
        if palp_stages:  # one target prompt per run: the first such stage's
            prior["target_prompts"] = [
                palp.target_prompt(r.config[palp_stages[0]].palp_prompt,
                                   r.config.concept.super_category) for r in slots]
        return run_setup.concept_data(m, self.tokenizer, self.text, specs, pools, **prior)


def _prior_stage(
    config: ml_collections.ConfigDict, stages: Sequence[str], programs: Sequence[StageProgram]
) -> str | None:
    """The first stage whose step reads the class pool (prior preservation with a weight), or
    None; later stages that read it must ask for the same pool."""
    reading = [name for name, program in zip(stages, programs, strict=True)
               if program.needs & {"prior_pred", "prior_target"}]
    if not reading:
        return None
    for name in reading[1:]:
        differ = [k for k in POOL_KEYS if config[name][k] != config[reading[0]][k]]
        if differ:
            raise InputError(f"{name} and {reading[0]} ask for different class pools (they "
                             f"differ in {', '.join(differ)}); one run has one pool")
    return reading[0]


def latent_size(config: ml_collections.ConfigDict, models: run_setup.Models) -> tuple[int, ...]:
    """Latent shape [h, w, c] of one encoded view at the run's resolution."""
    side = config.data.resolution // run_setup.vae_factor(models.vae)
    return (side, side, models.vae.config.latent_channels)


def slot_hosts(mesh: Mesh, pack: int) -> list[tuple[set[int], int]]:
    """For each slot of a pack: the processes whose devices hold it, and the one that writes
    its outputs (the owner of the first device of its concept shard)."""
    per_shard = pack // mesh.shape[CONCEPT_AXIS]
    rows = mesh.devices.reshape(mesh.shape[CONCEPT_AXIS], -1)
    return [
        ({d.process_index for d in rows[c // per_shard]}, rows[c // per_shard][0].process_index)
        for c in range(pack)
    ]


def gather(tree: Any) -> Any:
    """Concept-sharded arrays, whole, on every host."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def local_slice(tree: Any, c: int) -> Any:
    """Concept c of concept-sharded arrays, read from this host's shards (it owns run c)."""

    def one(leaf: jax.Array) -> np.ndarray:
        for shard in leaf.addressable_shards:
            rows = range(*shard.index[0].indices(leaf.shape[0]))
            if c in rows:
                return np.asarray(shard.data)[rows.index(c)]
        raise ValueError(f"concept {c} is not on this host")

    return jax.tree.map(one, tree)


def is_done(run: Run) -> bool:
    return (run.folder / "result.json").is_file()


def read_result(run: Run) -> dict[str, Any]:
    return json.loads((run.folder / "result.json").read_text())


def _failure(stage: int, step: int, metrics: dict[str, np.ndarray], c: int) -> dict[str, Any]:
    bad = [k for k, v in metrics.items() if not np.isfinite(np.asarray(v, np.float64)[c])]
    return {"stage": stage, "step": step, "terms": bad or ["the gradient"]}


def nonfinite_message(failure: dict[str, Any], streak: int) -> str:
    return (
        f"stage {failure['stage']} step {failure['step']}: {streak} steps in a row skipped "
        f"because {', '.join(failure['terms'])} went non-finite; the state is the last finite one"
        " (lower the learning rate, check the photos, or try fp32)"
    )


def train_pack(group: Group, pack: Pack, env: Env) -> bool:
    """Train one pack through every stage, or resume it; False when stopped by a request (the
    pack is checkpointed at the step reached)."""
    slots, first = pack.slots, pack.runs[0].config
    me, hosts = jax.process_index(), slot_hosts(env.mesh, pack.size)
    owned = [(c, run) for c, run in enumerate(pack.runs) if hosts[c][1] == me]
    frozen, schedule, total = group.frozen, env.models.schedule, group.ends[-1]

    # --- Set up: the concepts' data, each stage's per-run numbers --------------------------
    data = group.concept_data(slots, hosts)
    numbers = [stage_numbers([r.config[name] for r in slots]) for name in group.stages]
    seeds = [r.config.seed for r in slots]
    num_vectors = first.concept.num_vectors

    def whole(state: TrainState) -> TrainState:  # what the per-run readers slice
        return state.replace(params=unsplit(state.params, env.mesh))

    def first_state(k: int, params: dict[str, Any]) -> TrainState:
        params = stage_params(group.programs, k, params, data, frozen, num_vectors,
                              stage_keys(seeds, k))
        return init_state(group.programs[k], params, stage_keys(seeds, k))

    def fresh_state(k: int) -> TrainState:  # stage k's state shapes, for restoring into
        params: dict[str, Any] = {}
        for j in range(k + 1):
            params = stage_params(group.programs, j, params, data, frozen, num_vectors,
                                  stage_keys(seeds, j))
        return init_state(group.programs[k], params, stage_keys(seeds, k))

    # --- Restore ----------------------------------------------------------------------------
    checkpoints = RunCheckpoints(pack.checkpoints, first.keep_checkpoints, group.ends)
    found = checkpoints.restore_newest_intact(
        lambda step: {"state": fresh_state(group.stage_at(step))}
    )
    start, state = (found[0], found[1]["state"]) if found else (0, None)
    state_stage = group.stage_at(start) if start else None
    logs = {run.name: _run_log(run, start) for _, run in owned}
    bar = Progress(total, start, pack.label) if env.alone else None
    env.say(f"{pack.label}: training {len(pack.runs)} runs for {total} steps"
            + (f", resuming at step {start}" if start else "")
            + f" ({', '.join(r.name for r in pack.runs)})")
    if env.alone and start:
        print(f"resumed {pack.runs[0].folder} at step {start} of {total}")
    failed: dict[int, dict[str, Any]] = {}

    def close() -> None:
        checkpoints.close()
        for log in logs.values():
            log.close()
        if bar:
            bar.close()

    # --- The stages ---------------------------------------------------------------------------
    step = start
    for k, name in enumerate(group.stages):
        if start > group.ends[k]:
            continue  # finished before the checkpoint we resumed from
        if state is None:
            state = first_state(0, {})
        elif state_stage != k:
            state = first_state(k, state.params)
        state_stage = k
        step_fn = group.steps[k]
        while step < group.ends[k] and len(failed) < len(pack.runs):
            state, metrics = step_fn(state, data, numbers[k], frozen, schedule)
            step += 1
            metrics = gather(metrics)
            if env.profiler:
                env.profiler.step_done()
            for c, _ in enumerate(pack.runs):
                if c not in failed and metrics["nonfinite_streak"][c] >= first.max_nonfinite:
                    failed[c] = _failure(k + 1, step, metrics, c)
                    env.say(f"{pack.label}: {pack.runs[c].name} failed: "
                            + nonfinite_message(failed[c], first.max_nonfinite))
            if env.alone and failed:
                close()
                raise NonFiniteError(nonfinite_message(failed[0], first.max_nonfinite))
            if step % first.log_every == 0 or step == group.ends[k]:
                _log(logs, owned, k + 1, step, metrics, bar)
            if step % first.checkpoint_every == 0 or step == group.ends[k]:
                checkpoints.save(step, {"state": state})
                env.say(f"{pack.label}: step {step}/{total}")
            if (first.sample.every and step % first.sample.every == 0
                    and step < group.ends[k]):
                _sample_grids(group, owned, failed, whole(state), name, step, logs)
            if env.stop(step):
                checkpoints.save(step, {"state": state})
                close()
                print(env.stop.message(step, total))
                return False
        if len(failed) == len(pack.runs):
            break
        if first.sample.at_end:
            _sample_grids(group, owned, failed, whole(state), name, step, logs)

    # --- The runs' exports and results: only a finished run has them --------------------------
    if len(failed) < len(pack.runs):
        _export_runs(owned, failed, whole(state), env.models.unet, step, env.models.params["unet"],
                     run_setup.sdxl_width_1(first))
    close()
    for c, run in owned:
        if is_done(run):  # finished before a kill that cut the pack's writing
            continue
        _finish_run(run, failed.get(c))
    return True


def _run_log(run: Run, start: int) -> MetricsLog:
    run.folder.mkdir(parents=True, exist_ok=True)
    if not (run.folder / "config.json").is_file():
        atomic_write_bytes(run.folder / "config.json",
                                  lambda: run.config.to_json(indent=2).encode())
    return MetricsLog(run.folder, start)


def _log(
    logs: dict[str, MetricsLog], owned: list[tuple[int, Run]], stage: int, step: int,
    metrics: dict[str, np.ndarray], bar: Progress | None,
) -> None:
    """One metrics.jsonl record per run this host owns; the bar shows the first run."""
    for c, run in owned:
        values = {m: float(v[c]) for m, v in metrics.items() if m != "nonfinite_streak"}
        if bar is not None and c == 0:
            values["steps_per_s"] = bar.update(stage, step, values)
        logs[run.name].scalars(stage, step, values)


def _export_runs(
    owned: list[tuple[int, Run]], failed: dict[int, Any], state: TrainState, unet: Any,
    step: int, base_unet: Any, sdxl_width_1: int | None = None,
) -> None:
    """Hand what each run this host owns trained (its vectors, its U-Net if a stage trained
    one, its spectral shifts or cross-attention projections with the U-Net they make, its
    Custom Diffusion K/V) to other
    tools; SDXL vectors split at `sdxl_width_1` for the SDXL embedding file."""
    for c, run in owned:
        if c in failed:
            continue
        params = local_slice(state.params, c)
        c_config = run.config.concept
        unet_folder = (unet, params["unet"]) if "unet" in params else None
        if unet_folder is None and ("svdiff" in params or "cross_attention" in params):
            unet_folder = (unet, jax.device_get(merged_unet(params, base_unet)))
        vectors = run_vectors(params)  # [L, V, D] per cross-attention layer (XTI), or a mapper
        layers = list(cross_attention_layers(unet))
        timed = isinstance(vectors, TimestepVectors)  # NeTI: a mapper of the timestep
        per_layer = (layers, vectors) if not timed and vectors.ndim == 3 else None
        export.export_concept(
            run.folder, name=c_config.name, placeholder=c_config.placeholder,
            vectors=params["embeds"],
            unet=unet_folder,
            lora=params.get("lora"),
            svdiff=params.get("svdiff"),
            custom_diffusion=params.get("custom_diffusion"),
            text_lora=params.get("text_lora"),
            step=step,
            sdxl_width_1=sdxl_width_1,
            xti=per_layer,
            neti=(layers, vectors.value) if timed else None,
        )


def _sample_grids(
    group: Group, owned: list[tuple[int, Run]], failed: dict[int, Any], state: TrainState,
    stage: str, step: int, logs: dict[str, MetricsLog],
) -> None:
    """A validation grid per run this host owns: its learned vectors, its U-Net if it has one."""
    pipeline = group.pipeline()
    base_unet = group.env.models.params["unet"]
    base_text = group.env.models.params["text"]
    for c, run in owned:
        if c in failed:
            continue
        params = local_slice({g: state.params[g] for g in state.params}, c)
        pipeline.unet_params = merged_unet(params, base_unet)  # same shapes: compiled once
        pipeline.text_params = merged_text(params, base_text)
        # An adapted encoder (TextBoost) leaves guidance's unconditional branch to the frozen
        # one (the code's null embedding).
        pipeline.null_text_params = base_text if text_groups(params) else None
        s = run.config.sample
        prompts = [fill_prompt(p, group.text, run.config.concept.super_category)
                   for p in s.prompts]
        images = generate(
            pipeline, prompts, run_vectors(params), num_images_per_prompt=s.images_per_prompt,
            steps=s.steps, sampler=s.sampler, guidance_scale=s.guidance_scale,
            seed=run.config.seed,
        )
        path = save_image_grid(images, run.folder / "samples" / f"{stage}_step{step:06d}.png",
                               nrow=s.images_per_prompt * 2)
        logs[run.name].image(f"samples/{stage}", step, _read_png(path))
    pipeline.unet_params, pipeline.text_params = base_unet, base_text
    pipeline.null_text_params = None


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def _finish_run(run: Run, failure: dict[str, Any] | None) -> None:
    """The loss curves and result.json (written last: a run counts as done once it exists)."""
    metrics = run.folder / "metrics.jsonl"
    lines = [ln for ln in metrics.read_text().splitlines() if ln.strip()]
    last = json.loads(lines[-1]) if lines else {}
    plot_loss_curves(metrics, run.folder / "loss_curves.png")
    result = {"run": run.name, "status": "failed" if failure else "done",
              **{k: v for k, v in last.items() if k != "stage"}}
    if failure:
        result["failure"] = failure
    atomic_write_bytes(run.folder / "result.json",
                              lambda: json.dumps(result, indent=2).encode())


def train_groups(
    groups: Sequence[list[Run]], pack: int, env: Env, checkpoints: Callable[[int, int], Path],
) -> tuple[list[dict[str, Any]], bool]:
    """Every group, `pack` runs at a time; `checkpoints(g, k)` is pack k of group g's folder.
    Returns per group its runs, packs and compilations, and False when stopped by a request."""
    reports = []
    for g, runs in enumerate(groups):
        group = Group(runs, env)
        packs = [runs[i:i + pack] for i in range(0, len(runs), pack)]
        for k, members in enumerate(packs):
            label = (runs[0].name if env.alone
                     else f"group {g + 1}/{len(groups)}, pack {k + 1}/{len(packs)}")
            if everywhere(all(is_done(r) for r in members)):
                env.say(f"{label}: done already ({len(members)} runs)")
                continue
            if not train_pack(group, Pack(members, pack, checkpoints(g, k), label), env):
                return reports, False
            env.say(f"{label}: done")
        reports.append({
            "runs": [r.name for r in runs],
            "packs": len(packs),
            "compilations": [step.jitted._cache_size() for step in group.steps],
        })
    return reports, True


def everywhere(flag: bool) -> bool:
    """True only if it is true on every process (all hosts must run the same programs)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.all(multihost_utils.process_allgather(np.array(flag))))


# --- `core-jax train`: a sweep of one run ----------------------------------------------------

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
    # What the run's methods exported beside the token (LoRA, Custom Diffusion, SVDiff, XTI,
    # the A1111 LoRA): every weight file of the workdir and its a1111/ folder but those above.
    method_files: list[Path] = dataclasses.field(default_factory=list)


def train(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    overwrite: bool = False,
    stop_at_step: int | None = None,
    profile_steps: int = 0,
) -> RunOutputs | None:
    """Run (or resume) every stage of one run; None when stopped early (signal or
    `stop_at_step`), after checkpointing the step reached. `profile_steps` > 0 traces that
    many steps into `workdir/profile` (`core_jax.train.profile`)."""
    workdir = Path(workdir)

    # --- Check: bad input fails here in one line, before anything is written or compiled ----
    run_setup.check_config(config)
    if stop_at_step is not None and stop_at_step < 1:
        raise InputError(f"--stop_at_step is {stop_at_step}; it must be at least 1")
    profiler = StepProfiler(workdir / "profile", profile_steps)
    check_workdir(workdir, config, overwrite)
    run_setup.concept_images(config)
    tokenizer = run_setup.run_tokenizer(config)
    run_setup.concept_text(config, copy.deepcopy(tokenizer))  # before the weights: faster to fail
    models = run_setup.load_models(config, tokenizer)
    run_setup.check_resolution(config, models)
    run_setup.check_stages_on_model(config, models)
    mesh, mesh_line = fit_mesh(1, [config[s].batch_size for s in stage_names(config)])
    if len(mesh.devices.flat) < jax.device_count():
        print(mesh_line)

    # --- Train: one group, one pack, one run -------------------------------------------------
    prepare_workdir(workdir, config, overwrite)
    run = Run(config.concept.name, config, workdir)
    stop = StopRequests(stop_at_step)
    env = Env(models, mesh, stop, alone=True,
              class_pools=ClassPools(workdir / "class_pools", print), profiler=profiler)
    try:
        _, finished = train_groups([[run]], 1, env, lambda g, k: workdir / "checkpoints")
    finally:
        stop.close()
        profiler.close()
    if not finished:
        return None
    outputs = _run_outputs(workdir, config)
    print(summary(outputs))
    return outputs


def _run_outputs(workdir: Path, config: ml_collections.ConfigDict) -> RunOutputs:
    unet = workdir / "unet"
    return RunOutputs(
        workdir=workdir,
        learned_embeds=workdir / export.LEARNED_EMBEDS_NAME,
        a1111_embedding=workdir / "a1111" / f"{export.file_stem(config.concept.name)}.safetensors",
        unet=unet if unet.is_dir() else None,
        samples=sorted((workdir / "samples").glob("*.png")),
        loss_curves=(workdir / "loss_curves.png") if (workdir / "loss_curves.png").is_file()
        else None,
        checkpoints=workdir / "checkpoints",
        metrics=workdir / "metrics.jsonl",
        method_files=_method_files(workdir, config),
    )


def _method_files(workdir: Path, config: ml_collections.ConfigDict) -> list[Path]:
    token_files = {workdir / export.LEARNED_EMBEDS_NAME,
                   workdir / "a1111" / f"{export.file_stem(config.concept.name)}.safetensors"}
    found = [path for pattern in ("*.safetensors", "*.bin", "a1111/**/*.safetensors")
             for path in workdir.glob(pattern)]
    return sorted(set(found) - token_files)


def summary(outputs: RunOutputs) -> str:
    rows = [
        ("learned embedding (diffusers)", outputs.learned_embeds),
        ("A1111 / ComfyUI embedding", outputs.a1111_embedding),
        ("U-Net (diffusers)", outputs.unet or "not trained"),
        *(("method file", path) for path in outputs.method_files),
        ("sample grids", outputs.samples[-1] if outputs.samples else "none"),
        ("loss curves", outputs.loss_curves or "none"),
        ("metrics", outputs.metrics),
        ("checkpoints", outputs.checkpoints),
        ("TensorBoard", f"tensorboard --logdir {outputs.workdir / 'tensorboard'}"),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"done: {outputs.workdir}"] + [f"  {name:<{width}}  {value}" for name, value in rows]
    return "\n".join(lines)

