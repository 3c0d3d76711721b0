#!/usr/bin/env bash
# Installs tcmalloc (Debian/Ubuntu: libtcmalloc-minimal4) when it is missing, this runs as root
# and apt-get exists; otherwise says in one line how to get it. Never fails: without tcmalloc
# the CLI falls back to glibc tunables (core_jax/_runtime.py), 20-30 % slower CPU steps
# (BENCHMARKS.md). Called by launch/setup.sh; PYTHON (default python3) runs the check.
PYTHON=${PYTHON:-python3}
cd "$(dirname "$0")/.." || exit 0
[ "$(uname -s)" = Linux ] || exit 0

found() {
  "$PYTHON" -c "import sys; from core_jax._runtime import find_library; \
sys.exit(find_library('tcmalloc') is None)" 2>/dev/null
}

found && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  # The package lists may be stale or unreachable: try the install either way. Ubuntu 24.04
  # renamed the package (the 64-bit time_t transition).
  {
    timeout 300 apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      libtcmalloc-minimal4 ||
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        libtcmalloc-minimal4t64
  } >/dev/null 2>&1
  if found; then
    echo "installed tcmalloc (libtcmalloc-minimal4): core-jax preloads it for CPU runs"
    exit 0
  fi
  echo "core-jax: apt-get could not install libtcmalloc-minimal4; CPU runs use glibc's" \
    "allocator with tunables (20-30 % slower steps)"
  exit 0
fi
echo "core-jax: no tcmalloc; for 20-30 % faster CPU steps install it (Debian/Ubuntu, as root:" \
  "apt-get install libtcmalloc-minimal4; elsewhere gperftools); until then glibc tunables"
exit 0
