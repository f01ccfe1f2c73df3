"""``sft keys``: the CURVE key pair of every actor of a topology (``[run.security] mode = "curve"``).

``generate`` writes ``<actor>.key`` (public) and ``<actor>.key_secret`` (secret, 0600) into a
0700 directory and says which secret files go to which host. :func:`key_summary` is the key
check of ``sft topology check``. A configuration error is one ``error:`` line on stderr and
exit code 2.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Annotated

import typer

from sft_actors.errors import SftError
from sft_actors.security.keys import generate_keys, key_paths, load_keyring
from sft_actors.topology import Topology, load_topology

app = typer.Typer(
    help="CURVE key pairs for the actors of a topology.", no_args_is_help=True, add_completion=False
)


@app.command()
def generate(
    path: Annotated[Path, typer.Argument(help="topology TOML file")],
    out: Annotated[
        Path | None, typer.Option("--out", help="key directory (default: [run.security] keys, from the cwd)")
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="replace existing keys (old ones stop working)")
    ] = False,
) -> None:
    """Write a fresh key pair for every actor of PATH and say which secret files go where."""
    try:
        # Only the actor names matter here: no dataset or codec package is needed (roles=()).
        topo = load_topology(path, roles=(), log_warnings=False)
        directory = out if out is not None else Path(topo.run.security.keys)
        generate_keys(topo, directory, force=force)
    except SftError as exc:  # TopologyError, KeyFileError
        _fail(str(exc), exc)
    except OSError as exc:  # the directory cannot be created or written
        _fail(f"cannot write keys to {exc.filename or out}: {exc.strerror or exc}; pick another --out", exc)
    files = {a.name: key_paths(directory, a.name) for a in topo.actors}
    name_w = max(map(len, files))
    public_w = max(len(str(public)) for public, _ in files.values())
    for name, (public, secret) in files.items():
        typer.echo(f"{name:<{name_w}}  {public!s:<{public_w}}  {secret}")
    typer.echo(_placement_hint(topo))


def _fail(message: str, exc: Exception) -> typing.NoReturn:
    """One ``error:`` line on stderr, exit code 2 (a configuration error)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2) from exc


def _placement_hint(topo: Topology) -> str:
    """One line: every host gets every public key and only the secret keys of its own actors."""
    keys = topo.run.security.keys.rstrip("/")
    per_host = []
    for h in topo.hosts:
        secrets = " ".join(f"{a.name}.key_secret" for a in topo.actors if a.host == h.name)
        if secrets:
            per_host.append(f"{h.name} ({h.ssh or 'local'}:{h.workdir.rstrip('/')}/{keys}/): {secrets}")
    return "copy every *.key to each host, and to each host only its own secrets: " + "; ".join(per_host)


def key_summary(topo: Topology) -> str:
    """Check the key directory of a curve topology as seen from the cwd; one summary line.

    Every actor's public key must be there and distinct; every secret file present here must
    be mode 0600 and match its public key. Raises :class:`~sft_actors.errors.KeyFileError`
    otherwise (a missing directory says to run ``sft keys generate``).
    """
    directory = Path(topo.run.security.keys)
    ring = load_keyring(topo, own=[], directory=directory)
    here = [a.name for a in topo.actors if key_paths(directory, a.name)[1].exists()]
    load_keyring(topo, own=here, directory=directory)
    return f"keys: {directory} ({len(ring.publics)} public, secret here for: {', '.join(here) or 'none'})"
