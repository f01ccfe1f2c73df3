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

from sft_actors.cli.data import app as data_app  # noqa: E402

app.add_typer(data_app, name="data")

from sft_actors.cli.run import run_command  # noqa: E402
from sft_actors.cli.topology import app as topology_app  # noqa: E402

app.add_typer(topology_app, name="topology")
app.command(name="run")(run_command)

from sft_actors.cli.model import app as model_app  # noqa: E402

app.add_typer(model_app, name="model")

from sft_actors.cli.plan import plan_command  # noqa: E402

app.command(name="plan")(plan_command)
