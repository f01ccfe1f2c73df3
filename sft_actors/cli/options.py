"""Options shared by the commands that run actors (``sft run``, ``sft-node``)."""

from __future__ import annotations

from typing import Annotated, cast

import typer

from sft_actors import log

RoleFactoryOption = Annotated[
    list[str] | None, typer.Option(help="ROLE=package.module:Class, replaces a role's implementation")
]
LogFormatOption = Annotated[str, typer.Option(help="console or json")]
LogLevelOption = Annotated[str, typer.Option(help="debug, info, warning or error")]


def setup_logging(log_format: str, log_level: str) -> log.LogFormat:
    """Configure logging from the CLI options; a bad value is a usage error, not a silent default."""
    try:
        log.configure(cast(log.LogFormat, log_format), log_level)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    return cast(log.LogFormat, log_format)
