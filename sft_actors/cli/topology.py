"""``sft topology``: validate a topology file and show where everything runs.

``check`` promises that the file will not fail on configuration: it loads it (every check of
:func:`~sft_actors.topology.load_topology`, model and dataset included) and also resolves
every host address and, with ``[run.security] mode = "curve"``, the key directory as seen from
the cwd (every public key, and the secret keys that are here), and the CUDA device of every
actor placed on this machine. A broken file is one ``error:`` line on stderr and exit code 2
(a configuration error, as for ``sft run``); what the file sets but the run ignores, and
instruction conversations dropped at ``seq_len``, are one ``warning:`` line each on stderr.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sft_actors.cli.keys import key_summary
from sft_actors.errors import SftError
from sft_actors.topology import Topology, check_hosts, check_placement, load_topology, topology_warnings

app = typer.Typer(help="Validate and inspect topology files.", no_args_is_help=True, add_completion=False)


def _load(path: Path, *, full: bool = False) -> tuple[Topology, str | None]:
    """The loaded topology and, with ``full`` in curve mode, its key summary line; or exit 2
    after one ``error:`` line on stderr. ``full`` also resolves every host address."""
    keys = None
    try:
        topo = load_topology(path, log_warnings=False)  # check prints them; hosts keeps stdout clean
        if full:
            check_hosts(topo)
            check_placement(topo)  # CUDA devices of the actors placed on this machine
            if topo.run.security.mode == "curve":
                keys = key_summary(topo)
    except SftError as exc:  # TopologyError, KeyFileError; anything else it lets through is one line too
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    return topo, keys


@app.command()
def check(path: Annotated[Path, typer.Argument(help="topology TOML file")]) -> None:
    """Validate PATH (model, dataset, hosts included) and print the resolved placement."""
    topo, keys = _load(path, full=True)
    for warning in topology_warnings(topo):
        typer.echo(f"warning: {warning}", err=True)
    run = topo.run
    t = run.train
    typer.echo(f"{topo.source}: ok — run {run.name!r}, model {run.model}, {run.dtype}, mode {t.mode}")
    typer.echo(
        f"  train: {t.rounds} rounds × {t.steps_per_round} steps, batch {t.batch_size}, "
        f"seq {t.seq_len}, lr {t.lr}, max_inflight {t.max_inflight}, server_update {t.server_update}"
    )
    n = len(topo.devices)
    typer.echo(
        f"  elastic: quorum {t.quorum(n)} of {n} devices, round deadline "
        f"{'adaptive' if t.round_deadline_s is None else f'{t.round_deadline_s:g}s'}, "
        f"rejoin within {run.runtime.rejoin_timeout_s:g}s, checkpoint every {run.checkpoint.every} "
        f"round(s), keep {run.checkpoint.keep}"
    )
    typer.echo(f"  {keys}" if keys else f"  security: mode {run.security.mode}")
    typer.echo(f"  {'actor':<16} {'role':<12} {'host':<12} {'endpoint':<24} {'split':<28} link")
    split_of = _splits(topo)
    for a in topo.actors:
        host = topo.host(a.host)
        endpoint = f"{host.address}:{a.port}" if a.port is not None else "-"
        split = split_of.get(a.name, "-") + (f" on {a.device}" if a.device != "cpu" else "")
        ln = a.link
        link = (
            f"up {ln.uplink_mbps or '∞'} / down {ln.downlink_mbps or '∞'} Mb/s, rtt {ln.rtt_ms} ms"
            if a.role == "device" and ln.is_paced
            else "-"
        )
        typer.echo(f"  {a.name:<16} {a.role:<12} {a.host:<12} {endpoint:<24} {split:<28} {link}")


def _splits(topo: Topology) -> dict[str, str]:
    """What each actor runs, as the coordinator's plans will say it."""
    from sft_actors.plan.assign import device_plans, server_plans

    blocks = "L" if topo.run.train.mode == "fedlora" else None
    out = {
        p.device: f"blocks [0,{blocks or p.cut}) shard {p.shard}" + (f" → {p.server}" if p.server else "")
        for p in device_plans(topo)
    }
    if blocks is None:  # fedlora: servers sit idle
        for p in server_plans(topo):
            end = "L" if p.end_block is None else p.end_block
            out[p.server] = f"blocks [{p.start_block},{end})" + (f" → {p.next_stage}" if p.next_stage else "")
    return out


@app.command()
def hosts(
    path: Annotated[Path, typer.Argument(help="topology TOML file")],
    format: Annotated[str, typer.Option("--format", help="tsv (for scripts) or text")] = "text",
) -> None:
    """One line per actor: host, ssh target, workdir, role, name (the placement ``sft launch`` uses)."""
    topo, _ = _load(path)
    for a in topo.actors:
        h = topo.host(a.host)
        fields = [h.name, h.ssh or "-", h.workdir, a.role, a.name]
        typer.echo("\t".join(fields) if format == "tsv" else "  ".join(fields))
