#!/usr/bin/env bash
# Installs edge-agent on a gateway from a clone of this repository, as root:
#   the package into /opt/edge-agent/venv (a virtual environment of its own),
#   the unit into /etc/systemd/system/edge-agent.service,
#   the example configuration into /etc/edge-agent/agent.toml (only if there is none yet),
#   /etc/credstore (mode 0700) for the secrets the unit loads as credentials,
# then `systemctl daemon-reload` and `systemctl enable edge-agent` (and start it with --now).
#
# Usage: tools/install.sh [--now] [--root DIR]
#   --root DIR  install under DIR instead of / and leave systemd alone (for images and tests)
#   --now       also start the service (after you have edited the configuration)
# EDGE_AGENT_PIP_OPTS adds options to `pip install` (e.g. --no-index --find-links WHEELS).
# EDGE_AGENT_PYTHON is the interpreter the venv is built from (default /usr/bin/python3, the
# system's): never whatever `python3` is first on root's PATH, e.g. a pyenv interpreter under
# /root, which the unit's ProtectHome=yes hides (203/EXEC and a restart loop).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
root=""
start=no
while [ $# -gt 0 ]; do
  case "$1" in
    --root) root=${2:?--root needs a directory}; shift 2 ;;
    --now) start=yes; shift ;;
    *) echo "install.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

prefix="$root/opt/edge-agent"
etc="$root/etc/edge-agent"
unit_dir="$root/etc/systemd/system"

python=${EDGE_AGENT_PYTHON:-/usr/bin/python3}
# Where a venv's interpreter really lives: under ProtectHome=yes (/home, /root, /run/user) the
# service cannot execute it.
hidden_home() {
  local real
  real=$(readlink -f "$1")
  case "$real" in /root/*|/home/*|/run/user/*) echo "$real"; return 0 ;; esac
  return 1
}
if hidden="$(hidden_home "$python")"; then
  echo "install.sh: $python is $hidden, which the unit's ProtectHome=yes hides;" \
       "set EDGE_AGENT_PYTHON to a system interpreter (apt install python3-venv)" >&2
  exit 1
fi
if [ -x "$prefix/venv/bin/python" ] && hidden="$(hidden_home "$prefix/venv/bin/python")"; then
  echo "install.sh: the existing $prefix/venv runs $hidden, hidden from the service: rebuilt"
  rm -rf "$prefix/venv"
fi
echo "install.sh: the package into $prefix/venv (from $python)"
[ -x "$prefix/venv/bin/python" ] || "$python" -m venv "$prefix/venv"
# shellcheck disable=SC2086  # EDGE_AGENT_PIP_OPTS is a list of options
"$prefix/venv/bin/python" -m pip install -q ${EDGE_AGENT_PIP_OPTS:-} "$repo"
install -D -m 0644 "$repo/README.md" "$prefix/README.md"
install -d "$prefix/docs" && install -m 0644 "$repo"/docs/*.md "$prefix/docs/"  # the README's links

if [ -e "$etc/agent.toml" ]; then
  echo "install.sh: keeping the existing $etc/agent.toml"
else
  echo "install.sh: the example configuration into $etc/agent.toml: edit it"
  install -D -m 0644 "$repo/configs/agent.toml" "$etc/agent.toml"
fi
install -d -m 0700 "$root/etc/credstore"
install -D -m 0644 "$repo/systemd/edge-agent.service" "$unit_dir/edge-agent.service"

if ! "$prefix/venv/bin/edge-agent" check-config "$etc/agent.toml"; then
  echo "install.sh: fix $etc/agent.toml (and place the model: docs/operations.md, 'The first model'), then:" \
       "edge-agent check-config $etc/agent.toml" >&2
fi

if [ -n "$root" ]; then
  echo "install.sh: installed under $root; systemd not touched"
elif [ -d /run/systemd/system ]; then
  # What was installed must start under the unit's sandbox, as the unit's dynamic user: the
  # interpreter, the package and llama.cpp's library (under MemoryDenyWriteExecute= too).
  sandbox=(-p DynamicUser=yes -p ProtectHome=yes -p ProtectSystem=strict -p PrivateTmp=yes
           -p PrivateDevices=yes -p MemoryDenyWriteExecute=yes -p ProcSubset=pid
           -p ProtectProc=invisible -p NoNewPrivileges=yes -p UMask=0077)
  if ! systemd-run --quiet --wait --pipe --collect "${sandbox[@]}" \
      "$prefix/venv/bin/python" -c "import agent.cli.main, agent.inference.worker, llama_cpp" </dev/null; then
    echo "install.sh: $prefix/venv does not start under the unit's sandbox (see above)" >&2
    exit 1
  fi
  echo "install.sh: $prefix/venv starts under the unit's sandbox"
  systemctl daemon-reload
  systemctl enable edge-agent.service
  if [ "$start" = yes ]; then systemctl restart edge-agent.service; fi
  echo "install.sh: enabled; secrets go to /etc/credstore/edge-agent.<name> (see the unit file)"
else
  echo "install.sh: systemd is not running here; enable edge-agent.service by hand" >&2
fi
