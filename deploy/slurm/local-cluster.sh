#!/usr/bin/env bash
# A single-node Slurm cluster on this machine, for tests and for trying `sft launch --backend slurm`:
#
#     deploy/slurm/local-cluster.sh start    # munged, slurmctld, slurmd; waits until the node is idle
#     export SLURM_CONF=/run/sft-slurm/slurm.conf   # the line `start` prints
#     deploy/slurm/local-cluster.sh status
#     deploy/slurm/local-cluster.sh stop
#
# Everything lives in one private directory, SFT_SLURM_DIR (default /run/sft-slurm): its own
# slurm.conf, munge key and socket, state, spool, logs and pid files. Nothing under /etc/slurm or
# /etc/munge is read or written, so a real cluster's configuration is never touched; clients find
# this cluster through SLURM_CONF. Needs root (slurmd runs jobs as their users) and Debian's
# slurm-wlm and munge (bin/_setup.sh installs them). munged runs as the munge user.
#
# The cluster: slurmctld and slurmd on loopback, this machine's CPUs and memory (`slurmd -C`), one
# partition (SFT_SLURM_PARTITION, default "debug", Default=YES, OverSubscribe=FORCE), no cgroups
# (proctrack/linuxproc, task/none), no accounting daemon, KillWait=30 (seconds between the
# SIGTERM of a cancel and its SIGKILL: time for a polite stop with a checkpoint).
# Ports: SFT_SLURM_CTLD_PORT (default 6817) and SFT_SLURM_SLURMD_PORT (default 6818).
#
# start is idempotent (a running cluster is left alone); stop kills only the processes whose PIDs
# start recorded, and only if they are still the daemons it started.
set -euo pipefail

DIR="${SFT_SLURM_DIR:-/run/sft-slurm}"
PARTITION="${SFT_SLURM_PARTITION:-debug}"
CTLD_PORT="${SFT_SLURM_CTLD_PORT:-6817}"
SLURMD_PORT="${SFT_SLURM_SLURMD_PORT:-6818}"
WAIT_S="${SFT_SLURM_WAIT_S:-60}"
CONF="$DIR/slurm.conf"
SOCKET="$DIR/munge/munge.socket"
DAEMONS=(munged slurmctld slurmd)

die() { echo "local-cluster: $*" >&2; exit 1; }
say() { echo "local-cluster: $*" >&2; }

pid_of() { # the recorded PID of daemon $1 when that process still runs it, else nothing
    local pidfile="$DIR/$1.pid" pid
    [[ -f "$pidfile" ]] || return 0
    pid="$(cat "$pidfile")"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 0
    if [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$1" ]]; then
        echo "$pid"
    fi
}

running() { # every daemon is up
    local d
    for d in "${DAEMONS[@]}"; do [[ -n "$(pid_of "$d")" ]] || return 1; done
}

wait_until() { # wait_until SECONDS COMMAND...: poll COMMAND until it succeeds, bounded
    local deadline=$((SECONDS + $1))
    shift
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

up_or_gone() { # up_or_gone PID COMMAND...: COMMAND succeeds, or process PID has exited
    local pid="$1"
    shift
    "$@" || ! kill -0 "$pid" 2>/dev/null
}

wait_up() { # wait_up NAME COMMAND...: until COMMAND succeeds while NAME's daemon runs, bounded
    local name="$1" pid
    shift
    pid="$(cat "$DIR/$name.pid")"
    wait_until "$WAIT_S" up_or_gone "$pid" "$@" && kill -0 "$pid" 2>/dev/null
}

gone() { ! kill -0 "$1" 2>/dev/null; }

munge_answers() { munge -n --socket="$SOCKET" | unmunge --socket="$SOCKET"; }

need() {
    [[ "$(id -u)" == 0 ]] || die "run as root (slurmd starts jobs as their users)"
    local exe
    for exe in munged mungekey slurmctld slurmd sinfo scontrol setpriv; do
        command -v "$exe" >/dev/null || die "$exe is missing: apt-get install slurm-wlm munge (bin/_setup.sh does)"
    done
    getent passwd munge >/dev/null || die "no munge user: apt-get install munge"
}

write_conf() {
    local host cpus mem node
    host="$(hostname -s)"
    # `slurmd -C` prints this machine's node line: CPUs, sockets, cores, threads, memory.
    node="$(slurmd -C | head -n 1)"
    [[ "$node" == NodeName=* ]] || die "slurmd -C printed no node line: $node"
    node="${node#NodeName=* }"
    mem="$(grep -o 'RealMemory=[0-9]*' <<<"$node" | cut -d= -f2)"
    cpus="$(grep -o 'CPUs=[0-9]*' <<<"$node" | cut -d= -f2)"
    cat >"$CONF" <<EOF
# Written by deploy/slurm/local-cluster.sh: a single-node cluster on $host.
ClusterName=sftlocal
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCKET
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.daemon.pid
SlurmdPidFile=$DIR/slurmd.daemon.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
PlugStackConfig=$DIR/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
KillWait=30
MinJobAge=300
SlurmdTimeout=300
InactiveLimit=0
NodeName=$host NodeAddr=127.0.0.1 $node State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
    : >"$DIR/plugstack.conf"
    say "wrote $CONF ($cpus CPUs, ${mem} MB on $host)"
}

start_munged() {
    local d="$DIR/munge"
    install -d -m 0755 -o munge -g munge "$d"
    setpriv --reuid=munge --regid=munge --init-groups -- test -x "$d" \
        || die "munged runs as the munge user, who cannot enter $d: choose a SFT_SLURM_DIR whose parents others may enter"
    if [[ ! -s "$d/munge.key" ]]; then
        mungekey --create --keyfile="$d/munge.key" >/dev/null
        chown munge:munge "$d/munge.key"
        chmod 0600 "$d/munge.key"
    fi
    setsid setpriv --reuid=munge --regid=munge --init-groups -- munged --foreground \
        --socket="$SOCKET" --key-file="$d/munge.key" --pid-file="$d/munged.pid" \
        --log-file="$d/munged.log" --seed-file="$d/munged.seed" </dev/null >>"$DIR/log/munged.out" 2>&1 &
    echo $! >"$DIR/munged.pid"
    wait_up munged munge_answers || die "munged did not start; see $DIR/log/munged.out and $d/munged.log"
}

start_daemon() { # start_daemon NAME ARGS...: run NAME in the foreground in its own session
    local name="$1"
    shift
    SLURM_CONF="$CONF" setsid "$name" -D -f "$CONF" "$@" </dev/null >>"$DIR/log/$name.out" 2>&1 &
    echo $! >"$DIR/$name.pid"
}

node_idle() {
    local state
    state="$(SLURM_CONF="$CONF" sinfo -h -N -n "$(hostname -s)" -o %T 2>/dev/null)"
    [[ "$state" == idle* || "$state" == mixed* || "$state" == allocated* ]]
}

start() {
    need
    if running; then
        say "already running ($CONF)"
        echo "export SLURM_CONF=$CONF"
        return 0
    fi
    stop_daemons # a half-started cluster: start it again from the beginning
    install -d -m 0755 "$DIR" "$DIR/log" "$DIR/spool"
    install -d -m 0700 "$DIR/state"
    write_conf
    start_munged
    # -i: ignore a saved state that does not match this configuration (a test cluster keeps
    # no jobs across restarts).
    start_daemon slurmctld -i
    wait_up slurmctld env SLURM_CONF="$CONF" scontrol ping \
        || die "slurmctld did not start; see $DIR/log/slurmctld.log"
    start_daemon slurmd
    wait_up slurmd node_idle || die "the node did not come up idle; see $DIR/log/slurmd.log"
    say "up: partition $PARTITION on $(hostname -s); logs in $DIR/log"
    echo "export SLURM_CONF=$CONF"
}

stop_one() {
    local name="$1" pid
    pid="$(pid_of "$name")"
    if [[ -n "$pid" ]]; then
        kill -TERM "$pid" 2>/dev/null || true
        if ! wait_until 30 gone "$pid"; then
            say "$name ($pid) did not stop on SIGTERM: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$DIR/$name.pid"
}

stop_daemons() {
    [[ -d "$DIR" ]] || return 0
    stop_one slurmd # first: it ends the steps of running jobs
    stop_one slurmctld
    stop_one munged
}

stop() {
    [[ "$(id -u)" == 0 ]] || die "run as root"
    stop_daemons
    say "stopped (state and logs stay in $DIR)"
}

status() {
    local d pid up=0
    for d in "${DAEMONS[@]}"; do
        pid="$(pid_of "$d")"
        if [[ -n "$pid" ]]; then echo "$d: running (pid $pid)"; else echo "$d: stopped"; up=1; fi
    done
    if [[ $up == 0 ]]; then
        SLURM_CONF="$CONF" sinfo
        echo "export SLURM_CONF=$CONF"
    fi
    return $up
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status   (state in SFT_SLURM_DIR, default /run/sft-slurm)" >&2; exit 2 ;;
esac
