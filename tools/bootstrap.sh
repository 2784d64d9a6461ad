#!/usr/bin/env bash
# Installs what a fresh Debian machine lacks, then returns: mosquitto and a C++ compiler from
# Debian's packages, and a virtual environment (.venv, or $EDGE_AGENT_VENV) holding the project
# with its dev extras. Safe to run again: each step is skipped when its result is already there.
# Sourced by tools/test and tools/demo.
#
# Each step prints one line; what apt-get and pip say goes to $venv/bootstrap.log (rewritten by
# each run that has something to do), whose path and last lines are printed if a step fails.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${EDGE_AGENT_VENV:-$repo/.venv}
log=$venv/bootstrap.log
log_started=

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    echo "bootstrap: need root to run: $*" >&2; return 1; fi
}

# step "what" command...: one progress line; the command's output goes to the log.
step() {
  local what=$1 started=$SECONDS rc=0
  shift
  if [ -z "$log_started" ]; then
    mkdir -p "$venv"
    echo "bootstrap log, $(date -u +%FT%TZ)" >"$log"
    log_started=1
  fi
  printf '%s\n' "== $what" >>"$log"
  printf 'bootstrap: %s... ' "$what"
  if "$@" </dev/null >>"$log" 2>&1; then
    echo "done ($((SECONDS - started)) s)"
    return 0
  else
    rc=$?
  fi
  echo "failed"
  echo "bootstrap: that step failed (exit $rc); full output in $log; its last 40 lines:" >&2
  tail -n 40 "$log" | sed 's/^/  | /' >&2
  return "$rc"
}

# Steps run inside `if`, where set -e does not apply: each command is chained with &&.
apt_install() {
  as_root apt-get update -q &&
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"
}

# dev: the tests' tools; train: PyTorch (the CPU build) and gguf, for `edge-agent model
# specialize`, which the demo runs to train its model and tests/test_specialize.py exercises.
# A gateway installs neither: `pip install edge-agent` pulls only the runtime dependencies.
extras=dev,train

pip_install() {
  "$venv/bin/python" -m pip install --upgrade pip &&
    "$venv/bin/python" -m pip install -e "$repo[$extras]"
}

# tests/test_interop.py runs aedes as one of its brokers: npm installs it from the lock file in
# tests/node into $venv/node (where tests/brokers.py looks), once per version of that file.
npm_install() {
  mkdir -p "$venv/node" &&
    cp "$repo/tests/node/package.json" "$repo/tests/node/package-lock.json" "$venv/node/" &&
    npm ci --prefix "$venv/node" --no-audit --no-fund
}

missing=()
command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
command -v c++ >/dev/null || missing+=(build-essential)
# tests/test_clock_jumps.py moves the agent's wall clock with libfaketime.
command -v faketime >/dev/null || missing+=(faketime)
# tests/test_netem.py puts the cloud broker in a network namespace (ip netns, tc).
command -v tc >/dev/null || [ -x /usr/sbin/tc ] || missing+=(iproute2)
python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
  # sudo may ask for a password: ask now, on the terminal, not inside the logged step.
  if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null; then sudo -v; fi
  step "installing ${missing[*]} from Debian's packages" apt_install "${missing[@]}"
fi

python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
  echo "bootstrap: edge-agent needs Python 3.11 or newer; python3 is $(python3 --version)" >&2
  exit 1
}

if [ ! -x "$venv/bin/python" ]; then
  step "creating the virtual environment $venv" python3 -m venv "$venv"
fi

# Reinstall only when pyproject.toml or the extras changed since the last successful install.
stamp="$venv/.edge-agent-$( (cat "$repo/pyproject.toml"; echo "$extras") | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  # Measured on 2 cores: 6 min 20 s and 10.5 min cold (llama.cpp compiled) on two machines,
  # 23 to 37 s into a fresh venv once pip has cached the llama-cpp-python wheel.
  what="installing Python packages; the first install compiles llama.cpp"
  step "$what (6-11 min on 2 cores; later installs reuse it, under 1 min)" pip_install
  rm -f "$venv"/.edge-agent-*
  touch "$stamp"
fi
node_stamp="$venv/node/.installed-$(sha256sum "$repo/tests/node/package-lock.json" | cut -c1-16)"
if [ ! -f "$node_stamp" ]; then
  # aedes 1.2 needs node 20 or newer (Debian 12's nodejs is 18). RabbitMQ is not installed here:
  # its Debian package starts a system-wide service; the test starts a node of its own where one
  # is installed, and skips RabbitMQ where it is not.
  if command -v npm >/dev/null &&
    node -e 'process.exit(Number(process.versions.node.split(".")[0]) < 20 ? 1 : 0)' 2>/dev/null; then
    step "installing aedes (npm) for the interop test" npm_install
    rm -f "$venv/node"/.installed-*
    touch "$node_stamp"
  else
    echo "bootstrap: no node 20+ with npm, so tests/test_interop.py will skip aedes"
  fi
fi
export PATH="$venv/bin:$PATH"
