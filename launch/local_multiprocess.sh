#!/usr/bin/env bash
# Runs a core-jax command as N cooperating processes on this machine, each with D virtual CPU
# devices, joined by jax.distributed over 127.0.0.1 (gloo collectives). This is the multi-host
# path of a TPU pod or a GPU cluster, testable on one CPU box.
#
# Needs: the .venv from launch/setup.sh. Usage:
#   bash launch/local_multiprocess.sh 2 4 sweep --config configs/sweep_tiny.py \
#       --workdir runs/sweep_mp
# Exits with the first non-zero exit code of any process; process i logs to WORKDIR-less
# stderr prefixed with [i].
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS <core-jax command and flags>" >&2
  exit 2
fi
num_processes=$1; devices=$2; shift 2
cd "$(dirname "$0")/.."
port=$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
pids=()
for ((i = 0; i < num_processes; i++)); do
  CORE_JAX_COORDINATOR="127.0.0.1:${port}" CORE_JAX_NUM_PROCESSES="$num_processes" \
  CORE_JAX_PROCESS_ID="$i" XLA_FLAGS="--xla_force_host_platform_device_count=${devices}" \
    .venv/bin/python -m core_jax "$@" 2> >(sed "s/^/[$i] /" >&2) &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || { code=$?; [ "$status" -eq 0 ] && status=$code; }
done
exit "$status"
