"""Refit the planner's data files from new measurements.

Codec ratios — add (or replace) the measured ratio of a setting from ``bench/codec.py --json``
output (a file whose last line is the bench's JSON object)::

    python bench/codec.py --keep 0.1 --bits 8 --scope tensor --json > k01b8.txt
    python -m sft_actors.plan.refit codec --keep 0.1 --bits 8 --scope tensor k01b8.txt

Accuracy curve — append measured points to ``points`` in a JSON file laid out like
``data/accuracy_curve.json`` (``family``, ``ratio``, ``loss``, ``basis``, ``note``), then refit::

    python -m sft_actors.plan.refit accuracy my_points.json            # writes the packaged file
    python -m sft_actors.plan.refit accuracy my_points.json --out x.json

Both write to the packaged file unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from sft_actors.errors import ConfigError
from sft_actors.plan.accuracy import ACCURACY_CURVE_PATH, AccuracyPoint, fit_accuracy_curve
from sft_actors.plan.compression import (
    CODEC_TABLE_PATH,
    codec_entry_from_bench,
    load_codec_table,
    refit_codec_table,
)


def last_json_line(path: Path) -> dict[str, object]:
    """The last non-empty line of ``path``, parsed as a JSON object."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise ConfigError(f"{path} is empty; expected bench/codec.py --json output")
    try:
        record = json.loads(lines[-1])
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: the last line is not JSON ({e}); run bench/codec.py with --json") from e
    if not isinstance(record, dict):
        raise ConfigError(f"{path}: the last line is not a JSON object")
    return record


def refit_codec(
    bench_outputs: Sequence[Path],
    *,
    keep: float | None,
    bits: int | None,
    scope: str | None,
    name: str | None,
    table_path: Path,
    out: Path,
) -> int:
    table = load_codec_table(table_path)
    entries = [
        codec_entry_from_bench(last_json_line(p), name=name, keep=keep, bits=bits, scope=scope)
        for p in bench_outputs
    ]
    refitted = refit_codec_table(table, entries)
    raw = json.loads(table_path.read_text())
    raw.update(refitted.to_json())
    out.write_text(json.dumps(raw, indent=2) + "\n")
    return len(entries)


def refit_accuracy(points_path: Path, out: Path) -> int:
    raw = json.loads(points_path.read_text())
    points = [AccuracyPoint(**p) for p in raw.get("points", [])]
    curve = fit_accuracy_curve(points)
    result = {"about": raw.get("about", ""), **curve.to_json()}
    out.write_text(json.dumps(result, indent=2) + "\n")
    return len(curve.fits)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m sft_actors.plan.refit",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="what", required=True)
    codec = sub.add_parser("codec", help="add measured codec ratios from bench/codec.py --json output")
    codec.add_argument("bench_outputs", nargs="+", type=Path)
    codec.add_argument("--keep", type=float)
    codec.add_argument("--bits", type=int)
    codec.add_argument("--scope")
    codec.add_argument("--name")
    codec.add_argument("--table", type=Path, default=CODEC_TABLE_PATH)
    codec.add_argument("--out", type=Path)
    acc = sub.add_parser("accuracy", help="refit the accuracy curve from a points file")
    acc.add_argument("points", type=Path)
    acc.add_argument("--out", type=Path, default=ACCURACY_CURVE_PATH)
    args = ap.parse_args(argv)
    if args.what == "codec":
        n = refit_codec(
            args.bench_outputs,
            keep=args.keep,
            bits=args.bits,
            scope=args.scope,
            name=args.name,
            table_path=args.table,
            out=args.out or args.table,
        )
        print(f"{n} codec ratio(s) written to {args.out or args.table}")
    else:
        n = refit_accuracy(args.points, args.out)
        print(f"{n} accuracy fit(s) written to {args.out}")


if __name__ == "__main__":
    main()
