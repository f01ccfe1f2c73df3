"""``sft export`` / ``sft generate``: take one device's fine-tuned model out of a run directory.

The logic lives in ``sft_actors.train.export_job``; this module parses and prints.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Annotated, Any, cast

import typer

from sft_actors import log
from sft_actors.errors import SftError
from sft_actors.train.export_job import Format, export_run, generate_text

MODEL_HELP = (
    "The model device NAME ends with (cut c, L blocks): blocks [0, c) carry the devices' "
    "per-block average (adapters_devices.safetensors); blocks [c, L) carry the adapters of the "
    "server actor that holds each block (adapters_<server>.safetensors; several server stages "
    "give one file each), the path the device's micro-batches took; a ViT also takes that "
    "server's trained head. Under mode = \"fedlora\" (no server) every block carries the devices' "
    "average.\n\nA run stopped before its end has no final adapters: --round N (or latest) takes "
    "a checkpoint's instead."
)

RunDirArg = Annotated[Path, typer.Argument(help="a run directory (the run_dir `sft run` printed)")]
DeviceOpt = Annotated[str, typer.Option("--device", help="the device whose model to take")]
RoundOpt = Annotated[
    str | None,
    typer.Option("--round", help="a checkpoint round, or 'latest', instead of the run's final adapters"),
]
TopologyOpt = Annotated[
    Path | None,
    typer.Option("--topology", help="the run's topology file (only for runs without run.json)"),
]


def _round(value: str | None) -> int | str | None:
    if value is None or value == "latest":
        return value
    try:
        return int(value)
    except ValueError as exc:
        raise typer.BadParameter(f"--round takes a round number or 'latest', got {value!r}") from exc


def _fail(command: str, exc: SftError) -> typer.Exit:
    typer.echo(json.dumps({"ok": False, "error": type(exc).__name__, "message": str(exc)}))
    typer.echo(f"sft {command}: {exc}", err=True)
    return typer.Exit(2)


def export_command(
    run_dir: RunDirArg,
    device: DeviceOpt,
    out: Annotated[Path, typer.Option("--out", help="folder to write (must be empty unless --force)")],
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            help="peft: adapter_config.json + adapter_model.safetensors for peft.PeftModel; "
            "merged: a transformers folder (config.json, model.safetensors, tokenizer.json)",
        ),
    ] = "peft",
    force: Annotated[bool, typer.Option("--force", help="replace a non-empty --out")] = False,
    round_: RoundOpt = None,
    with_base: Annotated[
        bool,
        typer.Option(
            "--with-base",
            help="peft: also write the base model as a transformers folder in OUT/base and name it "
            "in adapter_config.json (for presets and GGUF; an HF-folder base is named as it is)",
        ),
    ] = False,
    topology: TopologyOpt = None,
    check: Annotated[
        bool, typer.Option("--check/--no-check", help="compare the written model's logits with the runtime's")
    ] = True,
) -> None:
    """Write one device's fine-tuned model for PEFT or transformers; print one JSON line.

    The line has what was written and max_abs_logit_diff_vs_runtime: the written model (loaded
    with transformers/peft when installed) against the runtime's split parts, on a few tokens.
    """
    log.configure("console", "warning")  # logs to stderr: stdout is the JSON line
    try:
        line = export_run(
            run_dir,
            device,
            cast(Format, fmt),
            out,
            force=force,
            round_=_round(round_),
            topology=topology,
            with_base=with_base,
            check=check,
        )
    except SftError as exc:
        raise _fail("export", exc) from exc
    typer.echo(json.dumps(line))
    diff = line.get("max_abs_logit_diff_vs_runtime")
    typer.echo(
        f"sft export: {device} ({line['source']}) → {line['out']} [{fmt}]"
        + ("" if diff is None else f"; max |logit diff| vs runtime {diff:.3g} ({line['self_check']})")
        + (f"\nnote: {line['note']}" if "note" in line else ""),
        err=True,
    )


def generate_command(
    run_dir: RunDirArg,
    device: DeviceOpt,
    prompt: Annotated[str, typer.Option("--prompt", help="text to continue")],
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="tokens to generate")] = 32,
    temperature: Annotated[float, typer.Option(help="0: greedy; > 0: sample at this temperature")] = 0.0,
    seed: Annotated[int, typer.Option(help="seeds sampling (same seed, same text)")] = 0,
    round_: RoundOpt = None,
    topology: TopologyOpt = None,
    chat: Annotated[
        bool,
        typer.Option(
            "--chat",
            help='render --prompt as a user turn with the run\'s chat template (kind = "instruction")',
        ),
    ] = False,
) -> None:
    """Continue --prompt with one device's fine-tuned model (base + its adapters, merged in
    memory); prints the continuation on stdout."""
    log.configure("console", "warning")  # logs to stderr: stdout is the text
    try:
        text, info = generate_text(
            run_dir,
            device,
            prompt,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            seed=seed,
            round_=_round(round_),
            topology=topology,
            chat=chat,
        )
    except SftError as exc:
        raise _fail("generate", exc) from exc
    typer.echo(text)
    typer.echo(f"sft generate: {json.dumps(info)}", err=True)


def register(app: Any) -> None:
    """Add ``export`` and ``generate`` to the ``sft`` app."""
    for name, command in (("export", export_command), ("generate", generate_command)):
        app.command(name=name, help=inspect.cleandoc(command.__doc__ or "") + "\n\n" + MODEL_HELP)(command)
