#!/usr/bin/env bash
# Start every actor of a topology on its host over SSH and collect the logs.
#
#   deploy/launch.sh topologies/lab.toml [--dry-run] [--logs DIR] [--python PY]
#
# Reads the placement with `sft topology hosts F --format tsv` (host, ssh target, workdir,
# role, name), copies nothing: each host must already have a checkout of sft_actors at
# `workdir` with its .venv (bin/test or bin/_setup.sh creates it) and the same topology file
# at the same relative path. Addressed actors (coordinator, server) start first. Hosts with
# an empty ssh target ("-") run locally. Ctrl-C stops every node (sft-node shuts down in
# stages on SIGTERM/SIGINT; a second Ctrl-C kills them).
set -euo pipefail

usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
[[ $# -ge 1 ]] || usage 1
TOPOLOGY="$1"; shift
DRY_RUN=0
LOG_DIR="runs/launch-$(date +%Y%m%d-%H%M%S)"
REMOTE_PY=".venv/bin/python"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --logs) LOG_DIR="$2"; shift ;;
        --python) REMOTE_PY="$2"; shift ;;
        -h|--help) usage 0 ;;
        *) echo "launch.sh: unknown option $1" >&2; usage 1 ;;
    esac
    shift
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SFT="${SFT:-$ROOT/.venv/bin/sft}"
[[ -x "$SFT" ]] || SFT="sft"
PLACEMENT="$("$SFT" topology hosts "$TOPOLOGY" --format tsv)"  # fails loudly on a bad topology
[[ $DRY_RUN -eq 1 ]] || mkdir -p "$LOG_DIR"

PIDS=()
cleanup() {
    trap - INT TERM
    echo "[launch] stopping ${#PIDS[@]} node(s)" >&2
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    wait || true
}
trap cleanup INT TERM

start() {  # host ssh workdir role name
    local host="$1" ssh="$2" workdir="$3" role="$4" name="$5"
    local cmd="cd $workdir && exec $REMOTE_PY -m sft_actors.cli.node --role $role --name $name"
    cmd+=" --topology $TOPOLOGY --transport tcp --host $host --log-format json"
    local log="$LOG_DIR/$name.log"
    if [[ "$ssh" == "-" ]]; then
        echo "[launch] $name ($role) locally: $cmd  > $log" >&2
        [[ $DRY_RUN -eq 1 ]] || { bash -c "$cmd" >"$log" 2>&1 & PIDS+=("$!"); }
    else
        # -tt: the remote node gets SIGHUP (and shuts down) when this launcher stops.
        echo "[launch] $name ($role) on $ssh: $cmd  > $log" >&2
        [[ $DRY_RUN -eq 1 ]] || { ssh -tt -o BatchMode=yes "$ssh" "$cmd" >"$log" 2>&1 & PIDS+=("$!"); }
    fi
}

for pass in addressed devices; do
    while IFS=$'\t' read -r host ssh workdir role name; do
        [[ -n "$host" ]] || continue
        if [[ "$pass" == addressed && "$role" != device ]] || [[ "$pass" == devices && "$role" == device ]]; then
            start "$host" "$ssh" "$workdir" "$role" "$name"
        fi
    done <<< "$PLACEMENT"
done

[[ $DRY_RUN -eq 1 ]] && exit 0
STATUS=0
for pid in "${PIDS[@]}"; do
    wait "$pid" || STATUS=1
done
echo "[launch] done (status $STATUS); logs in $LOG_DIR" >&2
exit "$STATUS"
