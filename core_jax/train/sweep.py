"""`core-jax sweep`: every (concept, setting) pair of a sweep config as one run, packed C runs at
a time into the step's concept axis. Settings are the product of `sweep.grid`, crossed
with `sweep.settings` (named sets of overrides, such as methods) when the config has them.

Runs whose settings differ only in numbers the step takes per run (learning rates, loss
weights, margins, seed) share one compiled program per stage; settings that change shapes or the
graph (methods, loss variants, steps, batch size, number of vectors, ...) form separate groups,
each compiled once. Runs train in the one run loop (`core_jax.train.loop`) that `core-jax train`
uses: each writes `runs/<name>/` as `core-jax train` writes its workdir, a run that goes
non-finite is reported as failed while the rest of its pack finishes, SIGTERM/SIGINT checkpoint
the pack and stop. The sweep writes `sweep_summary.json` and `results.csv`. Rerunning skips
finished runs and resumes a pack from its checkpoint.
"""

from __future__ import annotations

import csv
import itertools
import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections
from jax.experimental import multihost_utils

from core_jax.compile_cache import CompileRecord
from core_jax.errors import InputError
from core_jax.files import atomic_write_bytes
from core_jax.train import setup as run_setup
from core_jax.train.class_pool import ClassPools
from core_jax.train.loop import Env, Run, StopRequests, read_result, train_groups
from core_jax.train.parallel import fit_mesh
from core_jax.train.profile import StepProfiler
from core_jax.train.stages import number_keys, run_text_keys, stage_names
from core_jax.train.workdir import flatten_config


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


def expand_runs(config: ml_collections.ConfigDict, workdir: Path) -> list[Run]:
    """Concepts x named settings x the grid's product (in that order, the last varying
    fastest), each as a complete train config. Either of settings and grid may be absent."""
    grid = [(key, tuple(values)) for key, values in config.sweep.get("grid", ())]
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
            name = _slug(f"{concept['name']}__{setting or 'base'}")
            runs.append(Run(name, run_config, workdir / "runs" / name))
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise InputError("sweep runs are not distinguishable by name: give concepts unique names")
    return runs


def check_same_training(run: Run, workdir: Path) -> None:
    """A finished run is skipped by the sweep: refuse one that was trained differently (a
    command that reuses a workdir with other settings would otherwise score stale runs)."""
    saved = run.folder / "config.json"
    if not saved.is_file():
        return
    old = flatten_config(json.loads(saved.read_text()))
    new = flatten_config(json.loads(run.config.to_json()))
    differing = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if differing:
        raise InputError(
            f"{workdir} holds run {run.name} trained with other settings ({', '.join(differing)}); "
            "use another workdir or delete that run"
        )


def group_key(run: Run) -> str:
    """What must be equal for runs to share compiled programs: the config without the numbers
    the step takes per run and the texts each run's concept data holds (`run_text_keys`),
    without the seed and without the concept itself."""
    c = json.loads(run.config.to_json())
    for stage in stage_names(run.config):
        for name in (*number_keys(run.config[stage]), *run_text_keys(run.config[stage])):
            c[stage].pop(name)
    c.pop("seed")
    for field in ("name", "images", "super_category", "templates"):
        c["concept"].pop(field)
    return json.dumps(c, sort_keys=True)


def sweep(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    progress: Callable[[str], None] | None = None,
    profile_steps: int = 0,
) -> dict[str, Any] | None:
    """Run every group, C runs at a time; returns the summary written to sweep_summary.json, or
    None when a signal stopped it (the pack in flight is checkpointed; rerun to resume).
    `progress` (e.g. print) hears of each pack as it starts, checkpoints and ends;
    `profile_steps` > 0 traces that many steps into `workdir/profile`."""
    started = time.perf_counter()
    compiling = CompileRecord()
    workdir = Path(workdir)
    profiler = StepProfiler(workdir / "profile", profile_steps)
    _check_version(workdir)
    runs = expand_runs(config, workdir)
    for run in runs:  # every run is checked before anything is compiled or written
        run_setup.check_config(run.config)
    if jax.process_count() == 1:  # (multi-host: each host reads only its runs' photos)
        for run in runs:
            run_setup.concept_images(run.config)
    pack = config.sweep.pack
    batch_sizes = {run.config[s].batch_size for run in runs for s in stage_names(run.config)}
    mesh, mesh_line = fit_mesh(pack, sorted(batch_sizes), config.sweep.concept_shards)
    if progress:
        progress(mesh_line)
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        atomic_write_bytes(workdir / "sweep_config.json",
                                  lambda: config.to_json(indent=2).encode())

    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(group_key(run), []).append(run)
    stop = StopRequests()
    env = Env(run_setup.load_models(runs[0].config), mesh, stop, progress,
              class_pools=ClassPools(workdir / "class_pools", progress or print),
              profiler=profiler)
    try:
        reports, finished = train_groups(
            list(groups.values()), pack, env,
            lambda g, k: workdir / "checkpoints" / f"group{g}_pack{k}",
        )
    finally:
        stop.close()
        profiler.close()
    if not finished:
        return None
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("core-jax sweep: every run written")
    summary = {
        "runs": len(runs),
        "processes": jax.process_count(),
        "groups": reports,
        "compilations": sum(sum(g["compilations"]) for g in reports),
        "pack": pack,
        "mesh": dict(mesh.shape),
        "wall_s": time.perf_counter() - started,
        "compile": compiling.summary(),
        "failed": [r.name for r in runs if read_result(r)["status"] == "failed"],
        "results": [read_result(r) for r in runs],
    }
    if jax.process_index() == 0:
        _write_summary(workdir, summary)
    return summary


def _check_version(workdir: Path) -> None:
    """Pack checkpoints of core-jax before config version 2 cannot be resumed: refuse them in
    one line (finished runs' outputs stay usable)."""
    saved = workdir / "sweep_config.json"
    if not saved.is_file() or not (workdir / "checkpoints").is_dir():
        return
    if "version" not in json.loads(saved.read_text()):
        raise InputError(
            f"{workdir} holds a sweep of an earlier core-jax (config version 1) whose pack "
            "checkpoints this one cannot resume; its finished runs' outputs still load. Use a "
            "new --workdir"
        )


def _write_summary(workdir: Path, summary: dict[str, Any]) -> None:
    atomic_write_bytes(
        workdir / "sweep_summary.json", lambda: json.dumps(summary, indent=2).encode()
    )
    rows = [{k: (json.dumps(v) if isinstance(v, dict | list) else v) for k, v in r.items()}
            for r in summary["results"]]
    columns = sorted({k for r in rows for k in r} - {"run"})

    def table() -> bytes:
        import io

        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=["run", *columns])
        writer.writeheader()
        writer.writerows(rows)
        return out.getvalue().encode()

    atomic_write_bytes(workdir / "results.csv", table)
