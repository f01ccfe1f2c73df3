"""``sft plan TOPOLOGY``: plan cuts, codecs and bandwidth for a topology's devices.

Prints one line per device (cut, codec, bandwidth, rates, predicted per-round delay, memory),
the totals, and for each codec the plan chose the exact ``[run.codec.up]``/``[run.codec.down]``
tables to paste into a topology (for a rate-controlled transform codec: the preset of
``sft_actors.codec.presets`` at the chosen ratio), checked to parse with ``CodecPolicy.parse``.
``--json`` prints the plan as one JSON object instead (the tables under ``codec_toml``, by
codec name); ``--write OUT.toml`` writes the topology with the plan filled in (cuts, and each
device's codec), only after checking that it loads as a topology.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from sft_actors import log
from sft_actors.errors import ConfigError, SftError, TopologyError

if TYPE_CHECKING:
    from sft_actors.plan.compression import CompressionOption
    from sft_actors.plan.from_topology import LinkPrediction
    from sft_actors.plan.planner import PlanSolution


def _table(plan_dict: dict[str, object]) -> str:
    rows = [
        f"{'device':<12} {'cut':>3} {'codec':<14} {'ratio':>6} {'MHz':>7} {'up Mb/s':>8} {'down Mb/s':>9} "
        f"{'round s':>8} {'memory MB':>13}"
    ]
    devices = plan_dict["devices"]
    assert isinstance(devices, list)
    for d in devices:
        rows.append(
            f"{d['name']:<12} {d['cut']:>3} {d['codec']['name']:<14} {d['codec']['ratio']:>6.1f} "
            f"{d['bandwidth_hz'] / 1e6:>7.2f} {d['uplink_bps'] / 1e6:>8.1f} {d['downlink_bps'] / 1e6:>9.1f} "
            f"{d['round_delay_s']:>8.2f} {d['memory_mb']:>6.0f}/{d['memory_limit_mb']:<6.0f}"
        )
    return "\n".join(rows)


def codec_toml(option: CompressionOption) -> str:
    """The ``[run.codec.up]``/``[run.codec.down]`` TOML of a menu option, checked to parse back
    (``CodecPolicy.parse``) to the option's chains: what ``sft plan`` prints to paste."""
    from sft_actors.codec.presets import codec_toml as tables_toml
    from sft_actors.codec.spec import CodecPolicy

    tables = option.tables()
    text = tables_toml(tables)
    try:
        parsed = CodecPolicy.parse(tomllib.loads(text)["run"]["codec"])
    except (tomllib.TOMLDecodeError, KeyError, ConfigError) as e:
        raise ConfigError(f"codec {option.name}: its tables do not parse back ({e}); a planner bug") from e
    if parsed != CodecPolicy.parse(tables):
        raise ConfigError(f"codec {option.name}: its TOML does not round-trip; a planner bug")
    return text


def plan_command(
    topology: Annotated[Path, typer.Argument(help="topology TOML file")],
    channel_seed: Annotated[int, typer.Option(help="seed of the Rayleigh fading draw")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="print the plan as one JSON object")] = False,
    write: Annotated[
        Path | None, typer.Option(help="write the topology with the plan filled in here")
    ] = None,
    bandwidth_hz: Annotated[float | None, typer.Option(help="total uplink band to split (Hz)")] = None,
    server_flops: Annotated[float | None, typer.Option(help="the server's sustained FLOP/s")] = None,
    max_accuracy_loss: Annotated[
        float | None, typer.Option(help="accuracy limit: relative perplexity increase (0.1 = +10 %)")
    ] = None,
    current: Annotated[
        bool, typer.Option("--current", help="also predict the topology's own cuts and codec over its links")
    ] = False,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error")] = "warning",
) -> None:
    """Plan per-device cut, codec and bandwidth for TOPOLOGY and print the predicted delays."""
    from sft_actors.plan.from_topology import predict_topology, problem_from_topology
    from sft_actors.plan.planner import plan
    from sft_actors.topology import load_topology

    log.configure("console", log_level)
    try:
        topo = load_topology(topology)
        problem, assumed = problem_from_topology(
            topo, bandwidth_hz=bandwidth_hz, server_flops=server_flops, max_accuracy_loss=max_accuracy_loss
        )
        best = plan(problem, channel_seed=channel_seed)
        prediction = predict_topology(topo, problem) if current else None
        if write is not None:
            _write(topology, best, write, channel_seed)
    except SftError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(code=2) from e
    result = best.to_dict()
    result["assumed"] = assumed
    try:
        chosen = {d.codec.name: d.codec for d in best.devices}
        result["codec_toml"] = {name: codec_toml(o) for name, o in chosen.items()}
    except SftError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(code=2) from e
    if prediction is not None:
        result["current"] = {
            "codec": prediction.codec,
            "round_delay_s": prediction.round_delay_s,
            "device_round_s": prediction.device_round_s,
        }
    if write is not None:
        result["written"] = {
            "path": str(write),
            "codecs": best.codecs,
            "cuts": best.cuts,
            "total_delay_s": best.total_delay_s,
            "round_delay_s": best.round_delay_s,
        }
    if as_json:
        typer.echo(json.dumps(result))
        return
    _print_text(result, best, prediction, write)


def _write(source: Path, best: PlanSolution, write: Path, channel_seed: int) -> None:
    """Write the planned topology, after checking it loads: a written plan always runs."""
    from sft_actors.plan.from_topology import topology_with_plan
    from sft_actors.plan.toml_out import dumps
    from sft_actors.topology import parse_topology

    text = dumps(
        topology_with_plan(source, best),
        header=f"Written by sft plan from {source} (channel seed {channel_seed}).",
    )
    try:
        parse_topology(tomllib.loads(text), source=str(write))
    except TopologyError as e:  # a planner bug: say so instead of leaving a file that fails later
        raise TopologyError(f"the planned topology would not load, nothing written: {e}") from e
    write.write_text(text)


def _print_text(
    result: dict[str, object], best: PlanSolution, prediction: LinkPrediction | None, write: Path | None
) -> None:
    typer.echo(_table(result))
    typer.echo(
        f"round {best.round_delay_s:.2f} s (server floor {best.server_floor_s:.2f} s, "
        f"bottleneck {best.bottleneck}), "
        f"{best.rounds:.1f} rounds, accuracy loss {best.accuracy_loss * 100:.1f} %, "
        f"total {best.total_delay_s:.1f} s; solved in {best.solve_s * 1e3:.0f} ms"
    )
    if prediction is not None:
        per_device = ", ".join(f"{k} {v:.2f} s" for k, v in prediction.device_round_s.items())
        typer.echo(
            f"as written ({prediction.codec}, emulated links): round {prediction.round_delay_s:.2f} s "
            f"({per_device})"
        )
    tomls = result["codec_toml"]
    assert isinstance(tomls, dict)
    many = len(tomls) > 1
    for name, text in tomls.items():
        option = next(d.codec for d in best.devices if d.codec.name == name)
        users = ", ".join(d.name for d in best.devices if d.codec.name == name)
        how = (
            f"rate control holds every frame to {option.ratio:g}x (±3 %)"
            if option.rate_controlled
            else f"ratio {option.ratio:.1f}"
        )
        where = " (or, per device, as its actor's codec = {up, down}; --write does that)" if many else ""
        typer.echo(f"codec {name} for {users}: {how}; paste into the topology{where}:")
        typer.echo(text.rstrip("\n"))
    assumed = result["assumed"]
    assert isinstance(assumed, list)
    for line in assumed:
        typer.echo(f"assumed: {line}")
    if write is not None:
        typer.echo(f"wrote {write}: codecs {best.codecs}, cuts {best.cuts}, total {best.total_delay_s:.1f} s")
