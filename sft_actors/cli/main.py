"""The ``sft`` command: parse, load, hand over. No logic lives here.

Each command group lives in its own module and is registered below.
"""

from __future__ import annotations

import typer

from sft_actors.cli.data import app as data_app
from sft_actors.cli.export import register as register_export
from sft_actors.cli.keys import app as keys_app
from sft_actors.cli.launch import launch_command
from sft_actors.cli.model import app as model_app
from sft_actors.cli.plan import plan_command
from sft_actors.cli.run import run_command
from sft_actors.cli.status import status_command
from sft_actors.cli.topology import app as topology_app

app = typer.Typer(
    name="sft",
    help="Split fine-tuning of transformers across devices and an edge server.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(data_app, name="data")
app.add_typer(topology_app, name="topology")
app.add_typer(keys_app, name="keys")
app.command(name="run")(run_command)
app.command(name="status")(status_command)
app.add_typer(model_app, name="model")
app.command(name="plan")(plan_command)
app.command(name="launch")(launch_command)
register_export(app)

if __name__ == "__main__":
    app()
