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

echo "install.sh: the package into $prefix/venv"
[ -x "$prefix/venv/bin/python" ] || python3 -m venv "$prefix/venv"
# shellcheck disable=SC2086  # EDGE_AGENT_PIP_OPTS is a list of options
"$prefix/venv/bin/python" -m pip install -q ${EDGE_AGENT_PIP_OPTS:-} "$repo"
install -D -m 0644 "$repo/README.md" "$prefix/README.md"

if [ -e "$etc/agent.toml" ]; then
  echo "install.sh: keeping the existing $etc/agent.toml"
else
  echo "install.sh: the example configuration into $etc/agent.toml: edit it"
  install -D -m 0644 "$repo/configs/agent.toml" "$etc/agent.toml"
fi
install -d -m 0700 "$root/etc/credstore"
install -D -m 0644 "$repo/systemd/edge-agent.service" "$unit_dir/edge-agent.service"

if ! "$prefix/venv/bin/edge-agent" check-config "$etc/agent.toml"; then
  echo "install.sh: fix $etc/agent.toml, then: edge-agent check-config $etc/agent.toml" >&2
fi

if [ -n "$root" ]; then
  echo "install.sh: installed under $root; systemd not touched"
elif [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  systemctl enable edge-agent.service
  if [ "$start" = yes ]; then systemctl restart edge-agent.service; fi
  echo "install.sh: enabled; secrets go to /etc/credstore/edge-agent.<name> (see the unit file)"
else
  echo "install.sh: systemd is not running here; enable edge-agent.service by hand" >&2
fi
