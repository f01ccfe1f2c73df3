"""Refit the planner's data files from new measurements.

Codec ratios — add (or replace) the measured ratio of a setting from ``bench/codec.py --json``
output (a file whose last line is the bench's JSON object)::

    python bench/codec.py --keep 0.1 --bits 8 --scope tensor --json > k01b8.txt
    python -m sft_actors.plan.refit codec --keep 0.1 --bits 8 --scope tensor k01b8.txt

Accuracy curve — append measured points to ``points`` in a JSON file laid out like
``data/accuracy_curve.json`` (``family``, ``ratio``, ``loss``, ``basis``, ``note``), then refit::

    python -m sft_actors.plan.refit accuracy my_points.json            # writes the packaged file
    python -m sft_actors.plan.refit accuracy my_points.json --out x.json

Or take the points from ``bench/compression.py`` (its last line: one JSON object whose
``chains`` maps each chain's name to ``ratio_up``/``ratio_down``/``ratio_total``/``ppl_gap``/
``codec``): every compressed chain without an error becomes a ``trained`` point (a 40-step
fine-tune through the chain), its family read off its up chain (``project``: ``transform``,
``sparsify``/``quantize``/``cast``: ``topk``) and its ratio the measured *activation* ratio
``ratio_up`` (the planner's ρ; see ``accuracy``). ``--replace`` first drops the points file's
points of the families and basis the bench measured (e.g. the preliminary ones)::

    python bench/compression.py --chains raw,transform-11/32 > bench.txt
    python -m sft_actors.plan.refit accuracy --from-bench bench.txt --replace

Both write to the packaged file unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sft_actors.errors import ConfigError
from sft_actors.plan.accuracy import ACCURACY_CURVE_PATH, AccuracyPoint, fit_accuracy_curve
from sft_actors.plan.compression import (
    CODEC_TABLE_PATH,
    codec_entry_from_bench,
    load_codec_table,
    refit_codec_table,
)
from sft_actors.plan.costs import AccuracyBasis


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


def bench_family(codec: Mapping[str, Any]) -> str:
    """Accuracy family of a bench chain from its ``{up, down}`` tables."""
    up = codec.get("up", {}) or {}
    if "project" in up:
        return "transform"
    if any(stage in up for stage in ("sparsify", "quantize", "cast")):
        return "topk"
    return "identity"


def points_from_bench(record: Mapping[str, Any], *, basis: AccuracyBasis = "trained") -> list[AccuracyPoint]:
    """Accuracy points of a ``bench/compression.py`` JSON record (module doc)."""
    chains = record.get("chains")
    if not isinstance(chains, Mapping):
        raise ConfigError("bench record has no 'chains'; pass the last line of bench/compression.py")
    model, cut, steps = (record.get(k, "?") for k in ("model", "cut", "steps_per_device"))
    settings = f"{model} cut {cut}, {steps} steps"
    points = []
    for name, row in chains.items():
        if not isinstance(row, Mapping) or "error" in row or row.get("ppl_gap") is None:
            continue
        family = bench_family(row.get("codec", {}))
        if family == "identity":
            continue
        up, down, total = (float(row[k]) for k in ("ratio_up", "ratio_down", "ratio_total"))
        note = (
            f"{settings}, bench/compression.py chain {row.get('chain', name)}: up/down ratio "
            f"{up:.1f}/{down:.1f}, ratio_total {total:.1f}, ppl_gap {float(row['ppl_gap']):.3f}"
        )
        points.append(
            AccuracyPoint(
                family=family, ratio=up, loss=max(float(row["ppl_gap"]), 0.0), basis=basis, note=note
            )
        )
    return points


def refit_accuracy(
    points_path: Path, out: Path, *, from_bench: Path | None = None, replace: bool = False
) -> int:
    raw = json.loads(points_path.read_text())
    points = [AccuracyPoint(**p) for p in raw.get("points", [])]
    if from_bench is not None:
        new = points_from_bench(last_json_line(from_bench))
        if replace:
            measured = {(p.family, p.basis) for p in new}
            points = [p for p in points if (p.family, p.basis) not in measured]
        points.extend(new)
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
    acc.add_argument("points", type=Path, nargs="?", default=ACCURACY_CURVE_PATH)
    acc.add_argument("--out", type=Path, default=ACCURACY_CURVE_PATH)
    acc.add_argument("--from-bench", type=Path, help="bench/compression.py output: append its points")
    acc.add_argument(
        "--replace", action="store_true", help="with --from-bench: drop the old points it re-measures"
    )
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
        n = refit_accuracy(args.points, args.out, from_bench=args.from_bench, replace=args.replace)
        print(f"{n} accuracy fit(s) written to {args.out}")


if __name__ == "__main__":
    main()
