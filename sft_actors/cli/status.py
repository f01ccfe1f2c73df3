"""``sft status RUN_DIR``: how a run ended (or did not yet) and what it can resume from.

Reads ``RUN_DIR/summary.json`` when there is one and lists the complete checkpoints in
``RUN_DIR/checkpoints`` (a ``round-*`` directory holding ``checkpoint.json``; ``.tmp-*``
directories are checkpoints still being written and do not count). Prints one JSON line on
stdout:

    {"run_dir": "runs/tiny-…", "status": "completed", "reason": "…", "rounds_done": 2,
     "last_checkpoint_round": 1, "checkpoints": [{"round": 0, "path": "…"}, …],
     "resume": "sft run F --resume runs/tiny-…"}

``status`` and ``reason`` come from the summary; without one the run is still going or was
killed (``status`` says so, ``reason`` is null). A human-readable line goes to stderr. Exit
code 0, or 2 when RUN_DIR is not a directory. Reads files only (no torch, no sockets).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any

import typer

NO_SUMMARY = "running or killed (no summary.json yet)"
_ROUND_DIR = re.compile(r"^round-(\d+)$")


def status_command(
    run_dir: Annotated[Path, typer.Argument(help="a run directory (the run_dir `sft run` printed)")],
) -> None:
    """Show how a run ended and which checkpoints it can resume from, as one JSON line."""
    if not run_dir.is_dir():
        typer.echo(
            f"sft status: {run_dir} is not a directory; pass the run directory a previous "
            "`sft run` printed (its run_dir)",
            err=True,
        )
        raise typer.Exit(2)
    line = run_status(run_dir)
    typer.echo(json.dumps(line, default=str))
    typer.echo(_describe(line), err=True)


def run_status(run_dir: Path) -> dict[str, Any]:
    """The JSON line of ``sft status`` for ``run_dir`` (which must exist)."""
    summary = _read_summary(run_dir / "summary.json")
    checkpoints = complete_checkpoints(run_dir)
    # A run killed outright wrote no summary: its last checkpoint still knows its history.
    meta = _checkpoint_meta(Path(checkpoints[-1]["path"])) if checkpoints else {}
    history = summary if summary is not None else meta.get("summary")
    rounds = history.get("rounds") if isinstance(history, dict) else None
    topology = meta.get("topology") or "TOPOLOGY.toml"
    resume = (
        f"sft run {topology} --resume {run_dir}  (or, one node per actor: sft-node --role "
        f"coordinator --topology {topology} --resume {run_dir}, the other nodes as before)"
    )
    return {
        "run_dir": str(run_dir),
        "status": summary.get("status", "unknown") if summary is not None else NO_SUMMARY,
        "reason": summary.get("reason") if summary is not None else None,
        "rounds_done": len(rounds) if isinstance(rounds, list) else 0,
        "last_checkpoint_round": checkpoints[-1]["round"] if checkpoints else None,
        "checkpoints": checkpoints,
        "resume": resume if checkpoints else None,
    }


def _checkpoint_meta(path: Path) -> dict[str, Any]:
    doc = _read_summary(path / "checkpoint.json")
    meta = doc.get("meta") if doc is not None else None
    return meta if isinstance(meta, dict) else {}


def complete_checkpoints(run_dir: Path) -> list[dict[str, Any]]:
    """``[{"round": n, "path": "…"}]`` for each complete checkpoint, oldest round first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _ROUND_DIR.match(entry.name)
        if match and entry.is_dir() and (entry / "checkpoint.json").is_file():
            found.append({"round": int(match.group(1)), "path": str(entry)})
    return sorted(found, key=lambda c: c["round"])


def _read_summary(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # absent, or half-written by a run that was killed
        return None
    return data if isinstance(data, dict) else None


def _describe(line: dict[str, Any]) -> str:
    text = f"{line['run_dir']}: {line['status']}"
    if line["reason"]:
        text += f" ({line['reason']})"
    text += f", {line['rounds_done']} round(s) in the summary"
    if line["last_checkpoint_round"] is None:
        return text + "; no complete checkpoint, cannot resume"
    n = len(line["checkpoints"])
    return text + (
        f"; {n} checkpoint(s), the last after round {line['last_checkpoint_round']}; resume with: "
        f"{line['resume']}"
    )
