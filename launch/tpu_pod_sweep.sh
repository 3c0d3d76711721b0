#!/usr/bin/env bash
# A core-jax sweep on a Cloud TPU pod slice: the same command on every host of the slice.
# Needs: gcloud configured for the project; the pod's hosts each with this repo at ~/core-jax
# and its .venv (launch/setup.sh, then pip install "jax[tpu]"); a workdir every host can write
# (a GCS-fused path or NFS), since each host writes the runs it owns.
# Run:   bash launch/tpu_pod_sweep.sh TPU_NAME ZONE configs/sweep_tiny.py /mnt/shared/sweep
# The (concept, data) mesh is fitted to the slice's devices (--config.sweep.concept_shards=N
# forces a split).
# jax.distributed.initialize() finds the pod's topology by itself (--distributed).
set -euo pipefail
tpu=${1:?TPU name}; zone=${2:?zone}; config=${3:?sweep config}; workdir=${4:?workdir}; shift 4
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command \
  "cd ~/core-jax && .venv/bin/core-jax sweep --distributed --config $config --workdir $workdir $*"
