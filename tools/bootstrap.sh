#!/usr/bin/env bash
# Installs what a fresh Debian machine lacks, then returns: mosquitto and a C++ compiler from
# Debian's packages, and a virtual environment (.venv, or $EDGE_AGENT_VENV) holding the project
# with its dev extras. Safe to run again: each step is skipped when its result is already there.
# Sourced by tools/test and tools/demo.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${EDGE_AGENT_VENV:-$repo/.venv}

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    echo "bootstrap: need root to run: $*" >&2; return 1; fi
}

missing=()
command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
command -v c++ >/dev/null || missing+=(build-essential)
# tests/test_clock_jumps.py moves the agent's wall clock with libfaketime.
command -v faketime >/dev/null || missing+=(faketime)
python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
  echo "bootstrap: installing ${missing[*]} from Debian's packages"
  as_root apt-get update -q
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    "${missing[@]}"
fi

python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
  echo "bootstrap: edge-agent needs Python 3.11 or newer; python3 is $(python3 --version)" >&2
  exit 1
}

if [ ! -x "$venv/bin/python" ]; then
  echo "bootstrap: creating the virtual environment $venv"
  python3 -m venv "$venv"
fi

# Reinstall only when pyproject.toml changed since the last successful install.
stamp="$venv/.edge-agent-$(sha256sum "$repo/pyproject.toml" | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "bootstrap: installing edge-agent and its dependencies into $venv"
  echo "bootstrap: the first install compiles llama.cpp (3 to 5 minutes); pip caches the wheel"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q -e "$repo[dev]"
  rm -f "$venv"/.edge-agent-*
  touch "$stamp"
fi
export PATH="$venv/bin:$PATH"
