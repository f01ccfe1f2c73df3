"""``sft launch``: run a topology on its hosts over ssh (see :mod:`sft_actors.launch`), or as
one Slurm job with ``--backend slurm`` (see :mod:`sft_actors.launch.slurm`).

Progress goes to stderr, one line per step; stdout gets one JSON line at the end (``ok``,
``status``, ``reason``, ``exit_code``, ``logs``, ``results``, ``nodes``, ``lost``), or the
commands with ``--dry-run``. Exit code: 0 the run completed, or the operator stopped it (one
Ctrl-C/SIGTERM) and every node stopped politely; 1 it failed; 2 a configuration error (a bad
topology, a missing key file, a node that refused its configuration); 130 a second Ctrl-C
forced the stop.

With ``--backend slurm`` the launch submits one job and (unless ``--no-wait``) follows it; the
JSON line adds ``backend``, ``job_id``, ``job_state``, ``submitted_at`` and ``first_round_s``.
A stop from Slurm (``scancel JOBID``, the time limit) is ``interrupted`` with exit code 130.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from sft_actors.errors import SftError

if TYPE_CHECKING:
    from sft_actors.launch.slurm import SlurmOptions


def launch_command(
    topology: Annotated[Path, typer.Argument(help="topology TOML file")],
    backend: Annotated[
        str, typer.Option(help="ssh (start every host's nodes), slurm (one job) or k8s (write manifests)")
    ] = "ssh",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print every command; run nothing")] = False,
    logs: Annotated[
        Path | None,
        typer.Option(help="log directory: <host>-<role>.log, results/ (default runs/launch-<time>)"),
    ] = None,
    ship: Annotated[
        str,
        typer.Option(
            help="none (a checkout is at every workdir) or checkout (copy this one's tracked files)"
        ),
    ] = "none",
    python: Annotated[
        str | None,
        typer.Option(
            help="nodes' interpreter, relative to the workdir (default .venv/bin/python; local: this one)"
        ),
    ] = None,
    collect: Annotated[
        bool, typer.Option("--collect/--no-collect", help="copy the run directory back into LOGS/results")
    ] = True,
    ssh_config: Annotated[
        Path | None, typer.Option("--ssh-config", help="ssh config file (ssh -F): aliases, ports, identities")
    ] = None,
    threads: Annotated[int | None, typer.Option(help="torch threads per node (sft-node --threads)")] = None,
    partition: Annotated[
        str | None, typer.Option(help="slurm: the job's partition (default: Slurm's)")
    ] = None,
    gpu_partition: Annotated[
        str | None,
        typer.Option(help="slurm: coordinator/server hosts here with a GPU each (a heterogeneous job)"),
    ] = None,
    time_limit: Annotated[str | None, typer.Option("--time", help="slurm: the job's time limit")] = None,
    nodes: Annotated[
        int | None, typer.Option(help="slurm: at most this many nodes (hosts share them)")
    ] = None,
    cpus_per_node: Annotated[
        int | None, typer.Option(help="slurm: CPUs per node (default: one per actor)")
    ] = None,
    resume: Annotated[
        Path | None, typer.Option(metavar="RUN_DIR", help="slurm: continue this run from its last checkpoint")
    ] = None,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="slurm: follow the job to its end")] = True,
    out: Annotated[Path | None, typer.Option(help="k8s: write the manifests into this directory")] = None,
    image: Annotated[
        str | None, typer.Option(help="k8s: the container image (deploy/docker/Dockerfile)")
    ] = None,
    namespace: Annotated[str | None, typer.Option(help="k8s: the namespace (default: kubectl's)")] = None,
    server_gpu: Annotated[
        bool, typer.Option("--server-gpu", help="k8s: request one GPU per server pod")
    ] = False,
    volume: Annotated[
        list[str] | None, typer.Option(help="k8s: CLAIM:PATH, a PersistentVolumeClaim mounted at PATH")
    ] = None,
    server_image: Annotated[
        str | None, typer.Option(help="k8s: the servers' image (e.g. the CUDA one)")
    ] = None,
    allow_insecure: Annotated[
        bool, typer.Option("--allow-insecure", help="k8s: accept mode none (any pod could join)")
    ] = False,
    output_size: Annotated[str, typer.Option(help="k8s: size of the run-output claim")] = "10Gi",
    storage_class: Annotated[str | None, typer.Option(help="k8s: storage class of the output claim")] = None,
) -> None:
    """Ship the topology (and the checkout, and each host's keys), start one sft-node per host
    and role, stop them on Ctrl-C, and collect the run directory. With --backend slurm: submit
    the run as one Slurm job and follow it (deploy/README.md)."""
    from sft_actors.launch import LaunchOptions, run_launch
    from sft_actors.launch import dry_run as plan_only

    slurm_only = {
        "--partition": partition, "--gpu-partition": gpu_partition, "--time": time_limit, "--nodes": nodes,
        "--cpus-per-node": cpus_per_node, "--resume": resume, "--no-wait": None if wait else True,
    }  # fmt: skip
    k8s_only: dict[str, object] = {"--out": out, "--image": image, "--namespace": namespace}
    k8s_only.update({"--volume": volume or None, "--server-gpu": server_gpu or None})
    k8s_only.update({"--server-image": server_image, "--allow-insecure": allow_insecure or None})
    k8s_only.update(
        {"--storage-class": storage_class, "--output-size": None if output_size == "10Gi" else output_size}
    )
    if backend == "k8s":
        from sft_actors.launch.k8s import DEFAULT_IMAGE

        if out is None:
            raise typer.BadParameter("--backend k8s writes manifests: give --out DIR", param_hint="--out")
        _exit_with(k8s_main_cli(
            topology, out, image=image or DEFAULT_IMAGE, namespace=namespace, server_gpu=server_gpu,
            server_image=server_image, allow_insecure=allow_insecure, volumes=volume or [],
            resume=None if resume is None else str(resume), output_size=output_size,
            storage_class=storage_class,
        ))  # fmt: skip
        return
    given_k8s = [name for name, value in k8s_only.items() if value is not None]
    if given_k8s:
        raise typer.BadParameter(f"{', '.join(given_k8s)}: only with --backend k8s")
    if backend == "slurm":
        from sft_actors.launch.slurm import SlurmOptions

        if ship != "none" or not collect or ssh_config is not None:
            raise typer.BadParameter("--ship, --no-collect and --ssh-config are for --backend ssh")
        slurm = SlurmOptions(
            topology=topology,
            logs=logs or Path("runs") / f"launch-{time.strftime('%Y%m%d-%H%M%S')}",
            partition=partition,
            gpu_partition=gpu_partition,
            time=time_limit,
            nodes=nodes,
            cpus_per_node=cpus_per_node,
            resume=resume,
            wait=wait,
            python=python,
            threads=threads,
        )
        _launch_slurm(slurm, dry_run=dry_run)
        return
    if backend != "ssh":
        raise typer.BadParameter(
            f"unknown backend {backend!r}; use ssh, slurm or k8s", param_hint="--backend"
        )
    given = [name for name, value in slurm_only.items() if value is not None]
    if given:
        raise typer.BadParameter(f"{', '.join(given)}: only with --backend slurm")
    if ship not in ("none", "checkout"):
        raise typer.BadParameter(f"use none or checkout, not {ship!r}", param_hint="--ship")
    options = LaunchOptions(
        topology=topology,
        logs=logs or Path("runs") / f"launch-{time.strftime('%Y%m%d-%H%M%S')}",
        ship="checkout" if ship == "checkout" else "none",
        python=python,
        collect=collect,
        ssh_config=None if ssh_config is None else str(ssh_config),
        threads=threads,
    )
    _carry_out(lambda: plan_only(options), lambda echo: run_launch(options, echo=echo), dry_run=dry_run)


def k8s_main_cli(topology: Path, out: Path, **options: Any) -> int:
    """``--backend k8s``: write the manifests (see :mod:`sft_actors.launch.k8s`); nothing runs.
    ``options`` are :func:`~sft_actors.launch.k8s.k8s_main`'s keywords."""
    from sft_actors.launch.k8s import k8s_main

    return k8s_main(topology, out, **options)


def _exit_with(code: int) -> None:
    if code:
        raise typer.Exit(code)


def _launch_slurm(options: SlurmOptions, *, dry_run: bool) -> None:
    """``--backend slurm``: submit one job, follow it (see :mod:`sft_actors.launch.slurm`)."""
    from sft_actors.launch.slurm import dry_run_slurm, run_slurm_launch

    _carry_out(
        lambda: dry_run_slurm(options), lambda echo: run_slurm_launch(options, echo=echo), dry_run=dry_run
    )


def _carry_out(
    plan_lines: Callable[[], Iterable[str]], run: Callable[[Callable[[str], None]], Any], *, dry_run: bool
) -> None:
    """Print the plan (``--dry-run``) or run the launch: progress on stderr, its JSON line on
    stdout, its exit code; an :class:`SftError` before anything started is one ``error:`` line
    and exit code 2."""
    from sft_actors.launch import EXIT_CONFIG

    try:
        if dry_run:
            for line in plan_lines():
                typer.echo(line)
            return
        report = run(lambda line: typer.echo(line, err=True))
    except SftError as exc:  # before anything was copied, started or submitted
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_CONFIG) from exc
    typer.echo(json.dumps(report.line()))
    if report.outcome.exit_code:
        raise typer.Exit(report.outcome.exit_code)
