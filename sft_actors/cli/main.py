"""The ``sft`` command: parse, load, hand over. No logic lives here.

Each command group lives in its own module and is registered below.
"""

from __future__ import annotations

import typer

app = typer.Typer(
    name="sft",
    help="Split fine-tuning of transformers across devices and an edge server.",
    no_args_is_help=True,
    add_completion=False,
)

# Command groups are registered here as they land, e.g.:
#   from sft_actors.cli.model import app as model_app
#   app.add_typer(model_app, name="model")
