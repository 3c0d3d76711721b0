"""Per-device memory of the stage-2 step (each run's whole U-Net copy trains) on 8 devices of
one concept, the copy whole on every device (`shard_state = "off"`) against split over them
(FSDP-style, the default): XLA's argument, output and temporary bytes of the compiled program,
which are per device for a sharded program. Compiled for CPU devices; nothing is timed.

    python benchmarks/split_memory.py                 # tiny U-Net, batch 8
    python benchmarks/split_memory.py --preset bench_small

Arguments hold the state (parameters, AdamW moments) and the frozen weights; the split program
holds 1/8 of the trainable state per device. Temporary memory holds what the step computes,
including the parameters and the gradient gathered whole for the passes (gathering layer by
layer is not built), so it is not expected to shrink.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

DEVICES = 8
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + f" --xla_force_host_platform_device_count={DEVICES}")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from core_jax.train.parallel import make_mesh  # noqa: E402
from core_jax.train.step import shard_step  # noqa: E402
from core_jax.train.synthetic import random_setup  # noqa: E402

MB = 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=DEVICES)
    args = parser.parse_args()
    setup = random_setup(args.preset, methods=("unet_finetune",), batch_size=args.batch,
                         learning_rate=1e-3)
    trainable = sum(x.nbytes for x in jax.tree.leaves(setup.state.params))
    print(f"{args.preset}: trainable state {trainable / MB:.1f} MB of parameters "
          f"(x3 with AdamW's moments), batch {args.batch} over {DEVICES} devices")
    mesh = make_mesh(1, jax.devices()[:DEVICES])
    layouts = (("whole", dataclasses.replace(setup.program, shard_groups=())),
               ("split", setup.program))
    for name, program in layouts:
        step = shard_step(mesh, program)
        state, _ = step(jax.tree.map(np.copy, setup.state), *setup.args()[1:])  # placed
        memory = step.jitted.lower(state, *setup.args()[1:]).compile().memory_analysis()
        print(f"{name}: per device arguments {memory.argument_size_in_bytes / MB:.1f} MB, "
              f"outputs {memory.output_size_in_bytes / MB:.1f} MB, temporary "
              f"{memory.temp_size_in_bytes / MB:.1f} MB", flush=True)


if __name__ == "__main__":
    main()
