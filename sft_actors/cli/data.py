"""``sft data``: inspect datasets and how they would be partitioned across devices.

sft data info fashion-mnist --devices 8 --alpha 0.3
sft data info stdlib-docs --devices 4 --alpha 0.5 --set max_documents=200
sft data info cifar100 --root ~/datasets --split test
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from sft_actors import log
from sft_actors.data import format_histogram, label_entropy, label_histogram, load_dataset, partition
from sft_actors.data.registry import DATASET_NAMES
from sft_actors.errors import SftError

app = typer.Typer(help="Datasets: sizes and per-device partitions.", no_args_is_help=True)


def _parse_value(text: str) -> Any:
    """``"3"`` → 3, ``"0.5"`` → 0.5, ``"true"`` → True, ``"none"`` → None, ``"a,b"`` → ["a", "b"]."""
    if "," in text:
        return [_parse_value(part) for part in text.split(",") if part]
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def _parse_options(pairs: list[str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="--set")
        options[key.strip().replace("-", "_")] = _parse_value(value.strip())
    return options


@app.command()
def info(
    name: Annotated[str, typer.Argument(help=f"Dataset: {', '.join(DATASET_NAMES)}.")],
    root: Annotated[Path | None, typer.Option(help="Folder holding the dataset's files.")] = None,
    split: Annotated[str, typer.Option(help="train or test.")] = "train",
    devices: Annotated[int | None, typer.Option(help="Partition across this many devices.")] = None,
    alpha: Annotated[
        float | None, typer.Option(help="Dirichlet α for a non-IID partition (omit for IID).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Partition seed.")] = 0,
    option: Annotated[
        list[str] | None,
        typer.Option("--set", help="Loader option KEY=VALUE (repeatable), e.g. max_documents=100."),
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "warning",
) -> None:
    """Print a dataset's size and, with --devices, the per-device label histogram."""
    try:
        log.configure("console", log_level)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--log-level") from exc
    options = _parse_options(option or [])
    try:
        dataset = load_dataset(name, root, split, **options)
        for key, value in dataset.describe().items():
            typer.echo(f"{key:>16}: {value}")
        if devices is None:
            return
        labels = dataset.label_array()
        parts = partition(labels, devices, alpha=alpha, seed=seed)
    except SftError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from exc
    histogram = label_histogram(labels, parts, len(dataset.class_names))
    scheme = "IID" if alpha is None else f"Dirichlet(alpha={alpha})"
    typer.echo(
        f"\n{devices} devices, {scheme}, seed {seed}; mean label entropy "
        f"{label_entropy(histogram).mean():.3f} bits"
    )
    typer.echo(format_histogram(histogram, dataset.class_names))
