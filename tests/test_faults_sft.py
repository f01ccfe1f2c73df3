"""A device process dies mid-run: the run stops promptly with an error naming it.

Real processes (one ``sft-node`` per actor, tcp on loopback). The device is killed with
SIGKILL once the coordinator has logged its first ``round_done`` — so it cannot say BYE; only
missing heartbeats reveal it. The coordinator must notice within ``heartbeat_timeout_s``
instead of waiting for the round timeout, and every other node must stop on its own.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Long enough that a node starved by a loaded 2-core machine is not taken for dead; the killed
# device is still found by the watchdog (the error says "silent"), not by the round timeout.
HEARTBEAT_TIMEOUT_S = 10.0


def _topology(tmp_path: Path) -> Path:
    text = (ROOT / "topologies" / "tiny.toml").read_text()
    text = text.replace("rounds = 2\n", "rounds = 500\n", 1)
    text = text.replace('dir = "runs/tiny"', f'dir = "{tmp_path / "runs"}"')
    text = text.replace("port = 47310", "port = 47720").replace("port = 47311", "port = 47721")
    start = text.index("[run.runtime]")
    end = text.index("[", start + 1)
    text = (
        text[:start]
        + f"[run.runtime]\nheartbeat_interval_s = 0.25\nheartbeat_timeout_s = {HEARTBEAT_TIMEOUT_S}\n"
        + "request_timeout_s = 120.0\n\n"
        + text[end:]
    )
    path = tmp_path / "faulty.toml"
    path.write_text(text)
    return path


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_killed_device_stops_the_run_with_a_clear_error(tmp_path: Path) -> None:
    topo = _topology(tmp_path)
    node = str(Path(sys.executable).parent / "sft-node")
    common = ["--topology", str(topo), "--transport", "tcp", "--log-format", "json", "--timeout-s", "150"]

    def start(*args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [node, *args, *common], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    coordinator = start("--role", "coordinator")
    others = {
        "server": start("--role", "server"),
        "dev0": start("--role", "device", "--name", "dev0"),
        "dev1": start("--role", "device", "--name", "dev1"),
    }
    lines: list[str] = []
    first_round = threading.Event()

    def read_coordinator_log() -> None:
        assert coordinator.stderr is not None
        for line in coordinator.stderr:
            lines.append(line)
            if '"round_done"' in line:
                first_round.set()

    reader = threading.Thread(target=read_coordinator_log, daemon=True)
    reader.start()
    try:
        assert first_round.wait(120), "the run never finished a round:\n" + "".join(lines[-20:])
        others["dev1"].send_signal(signal.SIGKILL)
        code = coordinator.wait(timeout=60)
        for name in ("server", "dev0"):
            others[name].wait(timeout=60)  # they lose the coordinator and stop on their own
    finally:
        for p in (coordinator, *others.values()):
            if p.poll() is None:
                p.kill()
                p.wait()
    reader.join(timeout=5)
    assert code != 0
    errors = [json.loads(line) for line in lines if line.startswith("{") and '"error"' in line]
    assert any("dev1" in str(e.get("error", "")) and "silent" in str(e.get("error", "")) for e in errors), (
        lines[-10:]
    )
