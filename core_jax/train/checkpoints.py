"""Orbax checkpoints of a run: the last K plus the end of each stage, written asynchronously.

A checkpoint holds named items: `embedding` (stage-1 state) always, `unet` (stage-2 state) once
stage 2 has begun. Steps are global: stage-2 step s is saved as stage1.steps + s.

A run may be killed at any moment, also while a checkpoint is written. Orbax writes a step into
`<step>.orbax-checkpoint-tmp-<time>` and renames it to `<step>` only once every file is in place;
steps are found by the name `<step>` alone, so a killed write is never read back, and the
manager deletes such leftovers when it opens the folder (`tests/test_robustness.py` checks both).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies


def checkpoint_items(directory: Path, step: int) -> list[str]:
    """Names of the items saved at `step` (their sub-folders; Orbax's own files start with _)."""
    step_dir = Path(directory) / str(step)
    return sorted(p.name for p in step_dir.iterdir() if p.is_dir() and not p.name.startswith("_"))


class RunCheckpoints:
    def __init__(self, directory: Path, keep: int, stage_ends: list[int]):
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policies.AnyPreservationPolicy(
                [policies.LatestN(keep), policies.CustomSteps(stage_ends)]
            ),
            enable_async_checkpointing=True,
            create=True,
            cleanup_tmp_directories=True,  # half-written steps of a killed run
        )
        self.manager = ocp.CheckpointManager(directory.absolute(), options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def items(self, step: int) -> list[str]:
        return checkpoint_items(self.manager.directory, step)

    def save(self, step: int, items: dict[str, Any]) -> None:
        """Save `items` at `step` (once: a step saved already is left as it is)."""
        if step in self.manager.all_steps():
            return
        args = {name: ocp.args.StandardSave(tree) for name, tree in items.items()}
        self.manager.save(step, args=ocp.args.Composite(**args), force=True)

    def restore(self, step: int, like: dict[str, Any]) -> dict[str, Any]:
        """Restore the named items shaped (and sharded) like the given trees."""
        abstract = {
            name: jax.tree.map(ocp.utils.to_shape_dtype_struct, tree) for name, tree in like.items()
        }
        args = {name: ocp.args.StandardRestore(tree) for name, tree in abstract.items()}
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        return {name: restored[name] for name in like}

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
