"""`--profile N`: a `jax.profiler` trace of N training steps, for TensorBoard's profile plugin.

The trace starts after the process's first step (which compiles, and would fill the trace with
the compiler) and stops once N more steps have finished, whichever stage or pack they belong
to. It lands in `<workdir>/profile/plugins/profile/<time>/<host>.xplane.pb` (with a
`.trace.json.gz` for Perfetto); view it with
`pip install tensorboard tensorboard-plugin-profile` and `tensorboard --logdir <workdir>/profile`.
Writing it needs nothing beyond jax.
"""

from __future__ import annotations

from pathlib import Path

import jax

from core_jax.errors import InputError


class StepProfiler:
    """Traces `steps` steps into `folder`; call `step_done()` after each step has finished
    (its results read back) and `close()` when training ends, however it ends."""

    def __init__(self, folder: Path, steps: int) -> None:
        if steps < 0:
            raise InputError(f"--profile is {steps}; give a number of steps (0: no trace)")
        self.folder, self.steps = Path(folder), steps
        self.finished = 0  # steps finished in this process
        self.tracing = False

    def step_done(self) -> None:
        self.finished += 1
        if self.steps == 0:
            return
        if self.finished == 1:
            self.folder.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.folder))
            self.tracing = True
        elif self.tracing and self.finished == 1 + self.steps:
            self.close()

    def close(self) -> None:
        if self.tracing:
            jax.profiler.stop_trace()
            self.tracing = False
