"""Rerun any saved config: the `config.json` a train workdir or a sweep run folder holds.

Command:
    core-jax train --config configs/from_json.py:runs/sweep_tiny/runs/<run>/config.json \\
        --workdir runs/<run>-alone

Time: what the saved run took (a configs/tiny_cat.py run: about 3-4 minutes here).
What it should reach: the same result as the run it came from (a sweep run trained alone
gives the sweep's learned vectors). A config.json written by an earlier core-jax is migrated
to today's keys with the same meaning (`core_jax.config.migrate`); one from a newer core-jax
is refused.
"""

import json

import ml_collections

from core_jax.config import migrate


def get_config(path: str):
    with open(path) as f:
        return ml_collections.ConfigDict(migrate(json.load(f)))
