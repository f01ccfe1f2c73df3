"""CLI surfaces: ``sft topology check|hosts``, ``sft run`` in one process, ``sft-node`` errors and help."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sft_actors.actors.testing import TEST_ROLE_REFS
from sft_actors.cli.main import app
from sft_actors.cli.node import app as node_app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
pytestmark = pytest.mark.timeout(60)


def test_topology_check_prints_placement() -> None:
    out = runner.invoke(app, ["topology", "check", str(ROOT / "topologies/local.toml")])
    assert out.exit_code == 0, out.output
    assert "ok — run 'local'" in out.output
    assert (
        "dev3" in out.output and "blocks [0,8)" in out.output and "up 100.0 / down 200.0 Mb/s" in out.output
    )


def test_topology_check_reports_the_fix(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text((ROOT / "topologies/tiny.toml").read_text().replace("cut = 2", "cutt = 2"))
    out = runner.invoke(app, ["topology", "check", str(bad)])
    assert out.exit_code == 2
    assert "did you mean 'cut'?" in out.output and str(bad) in out.output


def test_topology_hosts_tsv_feeds_the_launcher() -> None:
    out = runner.invoke(app, ["topology", "hosts", str(ROOT / "topologies/lab.toml"), "--format", "tsv"])
    assert out.exit_code == 0
    rows = [line.split("\t") for line in out.output.strip().splitlines()]
    assert rows[0] == ["edge", "sft@192.168.1.10", "~/sft_actors", "coordinator", "coordinator"]
    assert {r[3] for r in rows} == {"coordinator", "server", "device"}


def test_sft_run_in_one_process() -> None:
    args = ["run", str(ROOT / "topologies/tiny.toml"), "--log-level", "warning", "--timeout-s", "30"]
    for role, ref in TEST_ROLE_REFS.items():
        args += ["--role-factory", f"{role}={ref}"]
    out = runner.invoke(app, args)
    assert out.exit_code == 0, out.output
    line = json.loads(out.stdout.strip().splitlines()[-1])
    assert line["ok"] is True and line["status"] == "completed", line
    assert line["result"] == {"rounds": 2, "devices": ["dev0", "dev1"]}


def test_sft_node_errors_are_clear() -> None:
    tiny = str(ROOT / "topologies/tiny.toml")
    out = runner.invoke(node_app, ["--role", "server", "--topology", tiny, "--name", "dev0"])
    assert out.exit_code == 2 and "'dev0' is a device" in out.output
    out = runner.invoke(
        node_app,
        ["--role", "server", "--topology", tiny, "--name", "server", "--role-factory", "server=nope"],
    )
    assert out.exit_code == 2 and "package.module:Attribute" in out.output
    out = runner.invoke(node_app, ["--role", "server", "--topology", tiny, "--transport", "inproc"])
    assert out.exit_code == 2


def test_sft_node_help_shows_the_toml_tables() -> None:
    """Rich markup would read ``[[hosts]]`` as a style tag and print ``[]``."""
    out = runner.invoke(node_app, ["--help"], env={"COLUMNS": "200"})
    assert out.exit_code == 0, out.output
    assert "which [[hosts]] entry this machine is" in out.output
    assert "run only this [[actors]] entry" in out.output


def test_the_process_entry_point_takes_the_flags_of_sft_node() -> None:
    """``run_processes`` starts ``python -m sft_actors.node_process``, not the CLI; its argparse
    flags must stay those of ``sft-node`` (plus the internal ``--outcome-file``)."""
    import typer.main

    from sft_actors.node_process import build_parser

    typer_flags = {o for p in typer.main.get_command(node_app).params for o in p.opts}
    argparse_flags = {o for a in build_parser()._actions for o in a.option_strings}
    assert argparse_flags - {"-h", "--help", "--outcome-file"} == typer_flags


def test_sft_run_reports_a_bad_topology_as_one_json_line(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    for extra in ([], ["--processes"]):
        out = runner.invoke(app, ["run", str(missing), "--log-level", "warning", *extra])
        assert out.exit_code == 2, out.output
        lines = out.stdout.strip().splitlines()
        assert len(lines) == 1, lines
        line = json.loads(lines[0])
        assert line["ok"] is False and line["type"] == "TopologyError" and str(missing) in line["error"]
