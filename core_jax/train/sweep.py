"""`core-jax sweep`: every (concept, setting) pair of a sweep config as one stage-1 run, packed
C runs at a time into the step's concept axis. Settings are the product of `sweep.grid`, crossed
with `sweep.settings` (named sets of overrides, such as methods) when the config has them.

Runs whose settings differ only in numbers the step takes per concept (learning rate, loss
weights, hinge margin, seed) share one compiled program; settings that change shapes or the
graph (loss variants, steps, batch size, number of vectors, ...) form separate groups, each
compiled once. Each run writes `runs/<name>/` exactly as `core-jax train` would for its stage 1;
the sweep writes `sweep_summary.json` and `results.csv`. Rerunning skips finished runs and
resumes a pack from its checkpoint.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import functools
import itertools
import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from core_jax import export
from core_jax.errors import InputError
from core_jax.text import add_placeholder_tokens, caption_ids, placeholder_string
from core_jax.train import setup as run_setup
from core_jax.train.checkpoints import RunCheckpoints
from core_jax.train.concepts import ConceptSpec, build_concept_data
from core_jax.train.loop import stage1_config
from core_jax.train.stage2 import (
    UNetState,
    caption_context,
    init_unet_state,
    make_unet_optimizer,
    shard_stage2_packed_step,
    stack_unet_states,
)
from core_jax.train.state import ConceptHypers, init_embedding_state
from core_jax.train.step import CONCEPT_AXIS, make_mesh, make_optimizer, shard_stage1_step

# Stage-1 numbers that ride along as per-concept arrays ([C]) instead of compiling anew.
PER_RUN_NUMBERS = tuple(f.name for f in dataclasses.fields(ConceptHypers))
# Flags derived from whether a weight is zero: a group turns a term on if any run needs it.
_WEIGHT_FLAGS = {"lambda_emb": "use_emb", "lambda_attn": "use_attn",
                 "lambda_pairwise": "use_pairwise", "lambda_hinge": "use_hinge"}


@dataclasses.dataclass
class Run:
    name: str
    config: ml_collections.ConfigDict  # the full config `core-jax train` would run

    def folder(self, workdir: Path) -> Path:
        return workdir / "runs" / self.name


def _set(config: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = config
    for part in parents:
        node = node[part]
    if leaf not in node:
        raise InputError(f"sweep grid names an unknown config key {dotted!r}")
    node[leaf] = value


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=,_-]+", "-", text).strip("-")


def _check_varied_key(key: str, where: str) -> None:
    if key.startswith(("model.", "sweep.", "concept.", "data.")) and key != "data.num_views":
        raise InputError(f"{where} key {key!r}: the model, data and concepts are fixed")


def _named_settings(config: ml_collections.ConfigDict) -> list[tuple[str, dict[str, Any]]]:
    """`sweep.settings`: named sets of overrides (methods, say), each crossed with the grid;
    without it, one unnamed empty setting."""
    settings = list(config.sweep.get("settings", ()))
    names = [s["name"] for s in settings]
    if not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
        raise InputError(f"sweep.settings need unique, non-empty names; got {names}")
    for setting in settings:
        for key in setting["overrides"]:
            _check_varied_key(key, f"sweep setting {setting['name']!r}")
    return [(s["name"], dict(s["overrides"])) for s in settings] or [("", {})]


def expand_runs(config: ml_collections.ConfigDict) -> list[Run]:
    """Concepts x named settings x the grid's product (in that order, the last varying
    fastest), each as a complete train config."""
    grid = [(key, tuple(values)) for key, values in config.sweep.grid]
    for key, _ in grid:
        _check_varied_key(key, "sweep grid")
    settings = _named_settings(config)
    runs = []
    for concept in config.sweep.concepts:
        for (setting_name, overrides), values in itertools.product(
            settings, itertools.product(*(v for _, v in grid))
        ):
            fields = config.to_dict()
            del fields["sweep"]
            run_config = ml_collections.ConfigDict(fields)
            for field in ("name", "images", "super_category", "templates"):
                run_config.concept[field] = concept[field]
            for key, value in [*overrides.items(), *zip((k for k, _ in grid), values, strict=True)]:
                _set(run_config, key, value)
            parts = [setting_name] if setting_name else []
            parts += [f"{k.split('.')[-1]}={v}" for (k, _), v in zip(grid, values, strict=True)]
            setting = ",".join(parts)
            runs.append(Run(_slug(f"{concept['name']}__{setting or 'base'}"), run_config))
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise InputError("sweep runs are not distinguishable by name: give concepts unique names")
    return runs


def group_key(run: Run) -> str:
    """What must be equal for runs to share one compiled step: the config without the numbers
    the step takes per concept and without the concept itself."""
    c = json.loads(run.config.to_json())
    for name in PER_RUN_NUMBERS:
        c["stage1"].pop(name)
    c.pop("seed")
    for field in ("name", "images", "super_category", "templates"):
        c["concept"].pop(field)
    return json.dumps(c, sort_keys=True)


def _group_stage1_config(runs: list[Run], caption: np.ndarray, placeholder_ids: list[int]):
    config = stage1_config(runs[0].config, caption, placeholder_ids)
    flags = {
        flag: any(r.config.stage1[weight] > 0 for r in runs)
        for weight, flag in _WEIGHT_FLAGS.items()
    }
    return dataclasses.replace(config, **flags)


def _done(run: Run, workdir: Path) -> bool:
    return (run.folder(workdir) / "result.json").is_file()


def _everywhere(flag: bool) -> bool:
    """True only if it is true on every process (all hosts must run the same programs)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.all(multihost_utils.process_allgather(np.array(flag))))


def _gather(tree: Any) -> Any:
    """Concept-sharded arrays, whole, on every host."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def _slot_hosts(mesh: Mesh, pack: int) -> list[tuple[set[int], int]]:
    """For each slot of a pack: the processes whose devices hold it, and the one that writes
    its outputs (the owner of the first device of its concept shard)."""
    per_shard = pack // mesh.shape[CONCEPT_AXIS]
    rows = mesh.devices.reshape(mesh.shape[CONCEPT_AXIS], -1)
    return [
        ({d.process_index for d in rows[c // per_shard]}, rows[c // per_shard][0].process_index)
        for c in range(pack)
    ]


def sweep(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run every group, C runs at a time; returns the summary written to sweep_summary.json.
    `progress` (e.g. print) hears of each pack as it starts, checkpoints and ends."""
    started = time.perf_counter()
    workdir = Path(workdir)
    runs = expand_runs(config)
    if jax.process_count() == 1:  # photos are checked before anything is compiled or written
        for run in runs:  # (multi-host: each host reads only its runs' photos, when it needs them)
            run_setup.concept_images(run.config)
    workdir.mkdir(parents=True, exist_ok=True)
    me = jax.process_index()
    if me == 0:
        (workdir / "sweep_config.json").write_text(config.to_json(indent=2))

    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(group_key(run), []).append(run)
    models = run_setup.load_models(runs[0].config)
    mesh = make_mesh(config.sweep.concept_shards)
    pack = config.sweep.pack
    if pack % config.sweep.concept_shards:
        raise InputError(f"sweep.pack {pack} does not split over {config.sweep.concept_shards} "
                         "concept shards")
    slot_hosts = _slot_hosts(mesh, pack)
    latent_size = first_config_latent_size(runs[0].config, models)
    group_reports = []
    for g, group_runs in enumerate(groups.values()):
        first = group_runs[0].config
        tokenizer = copy.deepcopy(models.tokenizer)
        placeholder_ids = add_placeholder_tokens(
            tokenizer, first.concept.placeholder, first.concept.num_vectors
        )
        concept_text = placeholder_string(first.concept.placeholder, first.concept.num_vectors)
        caption = caption_ids(tokenizer, concept_text, first.concept.caption)
        s1 = first.stage1
        if (s1.batch_size * pack) % mesh.size or s1.batch_size % mesh.shape["data"]:
            raise InputError(f"stage1.batch_size {s1.batch_size} x pack {pack} does not split "
                             f"over the {mesh.shape} mesh")
        optimizer = make_optimizer(s1.weight_decay, s1.b1, s1.b2, clip_norm=s1.clip_norm or None)
        step_fn = shard_stage1_step(
            mesh, text_encoder=models.text_encoder, unet=models.unet, optimizer=optimizer,
            config=_group_stage1_config(group_runs, caption, placeholder_ids),
        )
        frozen = {"text": models.params["text"], "unet": models.params["unet"]}
        unet_optimizer = make_unet_optimizer(
            first.stage2.learning_rate, first.stage2.weight_decay,
            clip_norm=first.stage2.clip_norm or None,
        )
        stage2_fn = shard_stage2_packed_step(
            mesh, unet=models.unet, optimizer=unet_optimizer,
            batch_size=first.stage2.batch_size, min_snr_gamma=s1.min_snr_gamma or None,
        )
        encode_caption = jax.jit(functools.partial(
            caption_context, models.text_encoder, tuple(placeholder_ids)
        ))
        packs = [group_runs[i : i + pack] for i in range(0, len(group_runs), pack)]
        for k, members in enumerate(packs):
            where = f"group {g + 1}/{len(groups)}, pack {k + 1}/{len(packs)}"
            if _everywhere(all(_done(r, workdir) for r in members)):
                if progress:
                    progress(f"{where}: done already ({len(members)} runs)")
                continue
            pack_started = time.perf_counter()
            # A short last pack is filled with copies of its first run (their results are
            # dropped) so every pack has the group's shapes: one compilation per group.
            slots = members + [members[0]] * (pack - len(members))
            specs = [
                ConceptSpec(r.config.concept.name, r.config.concept.super_category,
                            run_setup.concept_templates(r.config), seed=r.config.seed)
                for r in slots
            ]
            # A host encodes only the photos of the slots its devices hold; the rest are
            # placeholders it never sends (`place` takes this host's shards only).
            empty = np.zeros((first.data.num_views, *latent_size), np.float32)
            pools = [
                run_setup.latent_pool(r.config, models, run_setup.concept_images(r.config))
                if me in slot_hosts[c][0] else (empty, empty)
                for c, r in enumerate(slots)
            ]
            data = build_concept_data(
                tokenizer, models.text_encoder, models.params["text"], concept_text, specs, pools
            )
            init = jnp.repeat(data.super_embed[:, None], first.concept.num_vectors, axis=1)
            state = init_embedding_state(init, [r.config.seed for r in slots], optimizer)
            hypers = ConceptHypers(**{
                name: jnp.asarray([r.config.stage1[name] for r in slots], jnp.float32)
                for name in PER_RUN_NUMBERS
            })
            s2 = first.stage2
            total = s1.steps + s2.steps
            checkpoints = RunCheckpoints(
                workdir / "checkpoints" / f"group{g}_pack{k}", first.keep_checkpoints,
                [s1.steps, total],
            )
            start = checkpoints.latest_step() or 0
            unet_states = None
            if start:
                like = {"embedding": state}
                if start > s1.steps:
                    like["unet"] = _initial_unet_states(slots, frozen["unet"], unet_optimizer)
                restored = checkpoints.restore(start, like)
                state, unet_states = restored["embedding"], restored.get("unet")
            owned = [(c, r) for c, r in enumerate(members) if slot_hosts[c][1] == me]
            logs = {r.name: _run_log(r, workdir, start) for _, r in owned}
            if progress:
                resumed = f", resuming at step {start}" if start else ""
                progress(f"{where}: training {len(members)} runs for {total} steps{resumed} "
                         f"({', '.join(r.name for r in members)})")

            for step in range(start + 1, s1.steps + 1):
                state, metrics = step_fn(state, data, hypers, frozen, models.schedule)
                if step % first.log_every == 0 or step == s1.steps:
                    _log(logs, owned, 1, step, metrics)
                if step % first.checkpoint_every == 0 or step == s1.steps:
                    checkpoints.save(step, {"embedding": state})
                    _report_step(progress, where, step, total, pack_started)
            embeds = np.asarray(_gather(state.embeds))
            if s2.steps:
                if unet_states is None:
                    unet_states = _initial_unet_states(slots, frozen["unet"], unet_optimizer)
                contexts = jnp.stack([
                    encode_caption(models.params["text"], jnp.asarray(caption), embeds[c])
                    for c in range(pack)
                ])
                for step in range(max(start, s1.steps) + 1, total + 1):
                    unet_states, metrics = stage2_fn(unet_states, data, contexts, models.schedule)
                    if step % first.log_every == 0 or step == total:
                        _log(logs, owned, 2, step, metrics)
                    if step % first.checkpoint_every == 0 or step == total:
                        checkpoints.save(step, {"embedding": state, "unet": unet_states})
                        _report_step(progress, where, step, total, pack_started)
            checkpoints.close()
            for c, run in owned:
                logs[run.name].close()
                if _done(run, workdir):  # finished before a kill that cut the pack's writing
                    continue
                unet_params = _local_slice(unet_states.params, c) if s2.steps else None
                _finish_run(run, workdir, embeds[c], models.unet, unet_params)
            if progress:
                progress(f"{where}: done in {time.perf_counter() - pack_started:.0f} s")
        group_reports.append({
            "runs": [r.name for r in group_runs],
            "packs": len(packs),
            "compilations": step_fn.jitted._cache_size(),
            "stage2_compilations": stage2_fn.jitted._cache_size(),
        })
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("core-jax sweep: every run written")
    summary = {
        "runs": len(runs),
        "processes": jax.process_count(),
        "groups": group_reports,
        "compilations": sum(g["compilations"] for g in group_reports),
        "pack": pack,
        "mesh": dict(mesh.shape),
        "wall_s": time.perf_counter() - started,
        "results": [_read_result(r, workdir) for r in runs],
    }
    if me == 0:
        _write_summary(workdir, summary)
    return summary


def _report_step(
    progress: Callable[[str], None] | None, where: str, step: int, total: int, started: float
) -> None:
    if progress:
        progress(f"{where}: step {step}/{total} ({time.perf_counter() - started:.0f} s)")


def first_config_latent_size(config: ml_collections.ConfigDict, models: Any) -> tuple[int, ...]:
    """Latent shape [h, w, C] of one encoded view at the run's resolution."""
    side = config.data.resolution // run_setup.vae_factor(models.vae)
    return (side, side, models.vae.config.latent_channels)


def _run_log(run: Run, workdir: Path, start: int):
    folder = run.folder(workdir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(run.config.to_json(indent=2))
    path = folder / "metrics.jsonl"
    if path.exists():  # drop lines after the restored step: they are redone
        kept = [ln for ln in path.read_text().splitlines() if json.loads(ln)["step"] <= start]
        path.write_text("".join(ln + "\n" for ln in kept))
    return path.open("a")


def _log(logs: dict, owned: list[tuple[int, Run]], stage: int, step: int, metrics: Any) -> None:
    """One metrics.jsonl record per run this host owns."""
    values = _gather(metrics)
    for c, run in owned:
        record = {"stage": stage, "step": step, **{m: float(v[c]) for m, v in values.items()}}
        logs[run.name].write(json.dumps(record) + "\n")
        logs[run.name].flush()


def _initial_unet_states(slots: list[Run], unet_params: Any, optimizer: Any) -> UNetState:
    return stack_unet_states([init_unet_state(unet_params, r.config.seed, optimizer)
                              for r in slots])


def _local_slice(tree: Any, c: int) -> Any:
    """Concept c of concept-sharded arrays, read from this host's shards (it owns run c)."""

    def one(leaf: jax.Array) -> np.ndarray:
        for shard in leaf.addressable_shards:
            rows = range(*shard.index[0].indices(leaf.shape[0]))
            if c in rows:
                return np.asarray(shard.data)[rows.index(c)]
        raise ValueError(f"concept {c} is not on this host")

    return jax.tree.map(one, tree)


def _finish_run(
    run: Run, workdir: Path, learned: np.ndarray, unet: Any, unet_params: Any | None
) -> None:
    folder = run.folder(workdir)
    export.save_learned_embeds(
        folder / "learned_embeds.safetensors", run.config.concept.placeholder, learned
    )
    if unet_params is not None:
        export.export_unet(folder, unet, unet_params)
    # The last step is always logged: its record holds the final loss terms.
    last = json.loads((folder / "metrics.jsonl").read_text().splitlines()[-1])
    result = {"run": run.name, **{k: v for k, v in last.items() if k != "stage"}}
    # Written last: the run counts as done once it exists.
    export.atomic_write_bytes(folder / "result.json", lambda: json.dumps(result, indent=2).encode())


def _read_result(run: Run, workdir: Path) -> dict[str, Any]:
    return json.loads((run.folder(workdir) / "result.json").read_text())


def _write_summary(workdir: Path, summary: dict[str, Any]) -> None:
    export.atomic_write_bytes(
        workdir / "sweep_summary.json", lambda: json.dumps(summary, indent=2).encode()
    )
    columns = sorted({k for r in summary["results"] for k in r} - {"run"})
    with (workdir / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["run", *columns])
        writer.writeheader()
        writer.writerows(summary["results"])
