"""Where a program runs: the (`concept`, `data`) mesh, fitting it to the machine, and jitting a
per-device function over it.

Concepts (whole runs of a sweep) split over `concept`; each concept's batch rows split over
`data`, with `pmean` over `data` inside the step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from core_jax.errors import InputError

DATA_AXIS = "data"
CONCEPT_AXIS = "concept"


def make_mesh(num_concept_shards: int = 1, devices: list | None = None) -> Mesh:
    """A (`concept`, `data`) mesh over `devices` (default: all), concepts split `num_concept_shards`
    ways and rows over the rest."""
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) % num_concept_shards:
        raise ValueError(f"{len(devices)} devices do not split into {num_concept_shards} groups")
    grid = np.array(devices).reshape(num_concept_shards, -1)
    return Mesh(grid, (CONCEPT_AXIS, DATA_AXIS))


def valid_concept_shards(devices: int, pack: int, batch_sizes: Sequence[int]) -> list[int]:
    """Every concept split that works: it divides the devices and the pack, and the rest of the
    devices divide every stage's batch."""
    return [
        shards for shards in range(1, devices + 1)
        if devices % shards == 0 and pack % shards == 0
        and all(b % (devices // shards) == 0 for b in batch_sizes)
    ]


def fit_mesh(pack: int, batch_sizes: Sequence[int], concept_shards: int = 0) -> tuple[Mesh, str]:
    """The mesh for packs of `pack` runs whose stages take `batch_sizes` rows per run, and a line
    saying what was chosen.

    `concept_shards` > 0 asks for that split of every device (one line naming a working value
    when it does not fit). 0 chooses: the most devices that some split fits (all of them when
    possible; on one host, fewer rather than none), and among the splits of those the most
    concept shards, so the fewest rows cross devices."""
    devices = jax.devices()
    batches = " and ".join(str(b) for b in sorted(set(batch_sizes)))
    if concept_shards:
        valid = valid_concept_shards(len(devices), pack, batch_sizes)
        if concept_shards not in valid:
            hint = (f"--config.sweep.concept_shards={max(valid)} works" if valid else
                    "no split of every device works; leave it 0 to choose")
            raise InputError(
                f"sweep.concept_shards {concept_shards} does not fit {len(devices)} devices with "
                f"pack {pack} and batch {batches}: {hint}"
            )
        counts = [len(devices)]
    else:
        counts = range(len(devices), 0, -1) if jax.process_count() == 1 else [len(devices)]
    for count in counts:
        valid = valid_concept_shards(count, pack, batch_sizes)
        if valid:
            shards = concept_shards or max(valid)
            mesh = make_mesh(shards, devices[:count])
            line = f"mesh: {dict(mesh.shape)} (concept x data)"
            if count < len(devices):
                line += (f", {count} of {len(devices)} devices: batch {batches} with pack {pack}"
                         " splits over no more")
            return mesh, line
    raise InputError(
        f"pack {pack} with batch {batches} does not split over the {len(devices)} devices of "
        f"{jax.process_count()} processes: make the batch sizes multiples of the devices per "
        "concept shard"
    )


def jit_on_mesh(
    per_device: Callable, mesh: Mesh, in_specs: tuple, out_specs: tuple
) -> Callable:
    """`per_device` as one jitted program over `mesh` (`shard_map`), first argument donated.

    Inputs are placed on their shardings before the call (a no-op once they live there), so the
    first call's cache key equals later ones, whose state comes back sharded: one compilation
    per configuration. The jitted function is `.jitted`, for lowering and cost analysis."""
    sharded = jax.shard_map(
        per_device, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False
    )
    jitted = jax.jit(sharded, donate_argnums=0)
    shardings = [NamedSharding(mesh, spec) for spec in in_specs]

    def call(*args: Any) -> Any:
        return jitted(*(place(a, s) for a, s in zip(args, shardings, strict=True)))

    call.jitted = jitted
    return call


def place(tree: Any, sharding: NamedSharding) -> Any:
    """Put every leaf of `tree` on `sharding`; arrays already there are left alone.

    With several processes (multi-host), a host value becomes a global array from this
    process's shards only, so a host may hold placeholders where other hosts own the data."""
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def one(leaf: Any) -> jax.Array:
        if isinstance(leaf, jax.Array) and leaf.sharding == sharding:
            return leaf
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(one, tree)
