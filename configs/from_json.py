"""Rerun any saved config: the `config.json` a train workdir or a sweep run folder holds.

Command:
    core-jax train --config configs/from_json.py:runs/sweep_tiny/runs/<run>/config.json \\
        --workdir runs/<run>-alone

Time: whatever the saved run took. What it should reach: the same result as the run it came
from (a sweep run trained alone gives the sweep's learned vectors).
"""

import json

import ml_collections


def get_config(path: str):
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))
