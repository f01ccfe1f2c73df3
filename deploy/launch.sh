#!/usr/bin/env bash
# Start every actor of a topology on its host over SSH: a thin wrapper of `sft launch`.
#
#   deploy/launch.sh topologies/lab.toml [--dry-run] [--logs DIR] [--ship none|checkout]
#       [--python PY] [--ssh-config FILE] [--threads N] [--no-collect]
#
# One sft-node per (host, role), coordinator and servers first; their output goes to
# LOGS/<host>-<role>.log (default LOGS: runs/launch-<time>) and the run directory comes back
# into LOGS/results/. Always ships the topology file (and, with [run.security] mode = "curve",
# each host its keys); --ship checkout also copies this checkout's tracked files. Ctrl-C
# stops every node politely, a second Ctrl-C forces them. Exit code: 0 completed or stopped
# by you, 1 failed, 2 configuration error, 130 forced stop. See deploy/README.md.
set -euo pipefail

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
[[ $# -ge 1 ]] || usage 1
[[ "$1" == "-h" || "$1" == "--help" ]] && usage 0

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SFT="${SFT:-$ROOT/.venv/bin/sft}"
[[ -x "$SFT" ]] || SFT="sft"
exec "$SFT" launch "$@" --backend ssh
