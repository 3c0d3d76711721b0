#!/usr/bin/env bash
# Creates ./.venv with core-jax and everything its tests need. Safe to rerun (fast when done).
#   bash launch/setup.sh          # runtime + test/interop extras (torch CPU, diffusers, pytest)
#   CORE_JAX_NO_TEST_DEPS=1 bash launch/setup.sh   # runtime only (JAX side)
# Run as root where apt-get exists, it also installs tcmalloc (launch/install_tcmalloc.sh), which
# the CLI preloads for CPU runs; elsewhere it says in one line how to get it.
# torch is pinned to the 2.13.0 CPU wheel and installed *first*: a bare torch requirement
# (pulled by diffusers' extras) would otherwise resolve to a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
$PIP install --upgrade pip >/dev/null
if [ -z "${CORE_JAX_NO_TEST_DEPS:-}" ]; then
  $PIP install "torch==2.13.0"
  $PIP install -e ".[test]"
else
  $PIP install -e .
fi
PYTHON=.venv/bin/python bash launch/install_tcmalloc.sh
echo "core-jax environment ready: $(.venv/bin/python -c 'import jax, flax; print("jax", jax.__version__, "flax", flax.__version__)')"
