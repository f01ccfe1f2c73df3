"""Codec chains checked against the file: `sft topology check` refuses what cannot work (exit 2)
and warns of what is legal but wasted or biased; the runtime logs rate control's misses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from sft_actors.actors.rate_log import RateWarnings
from sft_actors.cli.main import app
from sft_actors.codec import ChainSpec, Codec
from sft_actors.errors import ConfigError
from sft_actors.topology import load_topology, topology_warnings
from tests.test_topology import CHECK_BASE, _edit

UP = '[run.codec.up]\nsparsify = { keep = 0.2, scope = "tensor" }'
DOWN = '[run.codec.down]\nquantize = { bits = 8, scale = "token" }'


def check(tmp_path: Path, up: str = UP, down: str = DOWN, extra: str = "") -> Any:
    path = tmp_path / "t.toml"
    path.write_text(_edit(UP, up, DOWN, down + extra)(CHECK_BASE))
    return CliRunner().invoke(app, ["topology", "check", str(path)]), path


def warnings_of(path: Path) -> tuple[str, ...]:
    return topology_warnings(load_topology(path, log_warnings=False))


@pytest.mark.parametrize(
    ("up", "fragment"),
    [
        ('[run.codec.up]\nquantize = { scale = "common", ratio = 12.0 }', "needs lossless = { entropy"),
        (
            '[run.codec.up]\nquantize = { scale = "common", ratio = 1.5 }\nlossless = { entropy = "ans" }',
            "[2, 1000]",
        ),
        ('[run.codec.up]\nproject = { basis = "b", transform = "klt", rank = 65 }', "up.project.rank"),
    ],
)
def test_check_refuses_a_chain_that_cannot_work(tmp_path: Path, up: str, fragment: str) -> None:
    result, _ = check(tmp_path, up=up)
    assert result.exit_code == 2, result.output
    assert fragment in result.output


def test_a_klt_rank_up_to_the_hidden_size_is_fine(tmp_path: Path) -> None:
    up = (
        '[run.codec.up]\nproject = { basis = "b", transform = "klt", rank = 64 }\n'
        'quantize = { bits = 4, scale = "channel" }'
    )
    result, _ = check(tmp_path, up=up)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    ("up", "down", "extra", "key"),
    [
        ('[run.codec.up]\nlossless = { entropy = "ans" }', DOWN, "", "up.lossless.entropy"),
        ('[run.codec.up]\nproject = { basis = "b" }', DOWN, "", "up.project"),
        (
            UP,
            '[run.codec.down]\nquantize = { scale = "common", step = 0.5, rounding = "nearest" }',
            "",
            "down.quantize.rounding",
        ),
        (UP, DOWN, "\n[run.codec.refit]\nthreshold = 2.0\n", "[run.codec.refit]"),
    ],
)
def test_warns_of_a_chain_that_runs_but_wastes_or_biases(
    tmp_path: Path, up: str, down: str, extra: str, key: str
) -> None:
    result, path = check(tmp_path, up=up, down=down, extra=extra)
    assert result.exit_code == 0, result.output
    assert any(key in w for w in warnings_of(path)), warnings_of(path)


def test_the_shipped_default_chain_draws_no_codec_warning() -> None:
    root = Path(__file__).resolve().parents[1]
    assert not [w for w in warnings_of(root / "topologies" / "local.toml") if "codec" in w]


class _Log:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def warning(self, event: str, **fields: Any) -> None:
        self.events.append((event, fields))


def test_rate_misses_are_logged_once_per_round_and_direction() -> None:
    # The dense first token alone is larger than a 1000x frame: the frame misses its target.
    spec = ChainSpec.parse(
        {
            "outliers": {"first_tokens": 1},
            "quantize": {"scale": "common", "ratio": 1000.0},
            "lossless": {"entropy": "ans"},
        }
    )
    report = Codec(spec).encode(torch.randn(2, 64, 576), seed=0).report
    assert report.rate_warning() is not None
    log, warnings = _Log(), RateWarnings()
    for _ in range(3):
        warnings.check(log, report, 1, direction="up")
    warnings.check(log, report, 2, direction="up")
    warnings.check(log, report, 2, direction="down", device="dev0")
    assert [(e, f["round"], f["direction"]) for e, f in log.events] == [
        ("rate_target_missed", 1, "up"),
        ("rate_target_missed", 2, "up"),
        ("rate_target_missed", 2, "down"),
    ]
    assert log.events[0][1]["target_ratio"] == pytest.approx(1000.0, rel=0.01)


def test_a_frame_on_target_draws_no_warning() -> None:
    spec = ChainSpec.parse({"quantize": {"scale": "common", "ratio": 8.0}, "lossless": {"entropy": "ans"}})
    report = Codec(spec).encode(torch.randn(4, 32, 64), seed=0).report
    assert report.target_bytes is not None and report.rate_warning() is None
    log = _Log()
    RateWarnings().check(log, report, 1, direction="up")
    assert log.events == []


def test_an_all_zero_frame_is_named() -> None:
    # 1000x of 32 KiB is 32 bytes: round-to-nearest at any step that fits leaves every code zero.
    spec = ChainSpec.parse(
        {
            "quantize": {"scale": "common", "ratio": 1000.0, "rounding": "nearest"},
            "lossless": {"entropy": "ans"},
        }
    )
    report = Codec(spec).encode(torch.randn(4, 32, 64), seed=0).report
    assert report.all_zero
    assert "every code is zero" in (report.rate_warning() or "")


def test_rate_control_needs_an_entropy_coder() -> None:
    with pytest.raises(ConfigError, match="entropy"):
        ChainSpec.parse({"quantize": {"scale": "common", "ratio": 8.0}, "lossless": {"zstd_level": 3}})
