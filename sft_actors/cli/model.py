"""``sft model``: inspect a model spec (sizes, memory, FLOPs per block) and verify split == whole."""

from __future__ import annotations

import json
from typing import Annotated, Any, cast

import torch
import typer

from sft_actors.errors import ConfigError, SftError
from sft_actors.model.config import LlamaConfig, LoraConfig, ModelConfig
from sft_actors.model.memory import (
    MemoryEstimate,
    Optimizer,
    block_param_count,
    embedding_param_count,
    estimate_device_memory,
    head_param_count,
)
from sft_actors.model.spec import ModelSpec, load_config, load_model, resolve_spec
from sft_actors.model.verify import verify_split

app = typer.Typer(help="Inspect and verify models.", no_args_is_help=True, add_completion=False)

SpecArg = Annotated[
    str, typer.Argument(help="smollm2-135m, llama-tiny, vit-tiny, vit-small, vit-base, a path")
]
RankOpt = Annotated[int, typer.Option(help="LoRA rank")]
MlpOpt = Annotated[bool, typer.Option("--mlp/--no-mlp", help="LoRA on the MLP projections too")]


def _mib(n: float) -> str:
    return f"{n / 2**20:,.2f} MiB"


def _fail(exc: SftError) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(2)


def _describe(config: ModelConfig) -> str:
    if isinstance(config, LlamaConfig):
        return (
            f"llama  blocks {config.num_blocks}  dim {config.dim}  "
            f"heads {config.num_heads}/{config.num_kv_heads} (q/kv)  "
            f"ffn {config.ffn_dim}  vocab {config.vocab_size}  tied head {config.tie_embeddings}"
        )
    return (
        f"vit  blocks {config.num_blocks}  dim {config.dim}  heads {config.num_heads}  mlp {config.mlp_dim}  "
        f"image {config.image_size}px/{config.patch_size}  tokens {config.num_tokens}  "
        f"classes {config.num_classes}"
    )


@app.command()
def info(
    spec: SpecArg,
    cut: Annotated[int | None, typer.Option(help="device holds blocks [0, cut)")] = None,
    batch: Annotated[int, typer.Option(help="micro-batch size for the estimate")] = 8,
    seq: Annotated[int, typer.Option(help="LM sequence length (a ViT uses its token count)")] = 256,
    rank: RankOpt = 8,
    mlp: MlpOpt = False,
    optimizer: Annotated[str, typer.Option(help="adam, adamw, sgd or sgd_momentum")] = "adam",
    bf16: Annotated[bool, typer.Option(help="estimate for bf16 weights and activations")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object instead")] = False,
) -> None:
    """Blocks, parameters and bytes per block, device memory for a cut, FLOPs per block."""
    try:
        config = load_config(resolve_spec(spec))
        lora = LoraConfig(rank=rank, mlp=mlp)
        bpp = 2 if bf16 else 4
        est_cut = config.num_blocks // 2 if cut is None else cut
        estimates, est = _estimates_by_cut(config, est_cut, batch, seq, lora, cast(Optimizer, optimizer), bpp)
    except SftError as exc:
        raise _fail(exc) from exc
    if as_json:
        typer.echo(json.dumps(_info_dict(spec, config, bpp, est, estimates)))
        return
    _echo_summary(spec, config, lora, bpp, est, est_cut, optimizer)
    _echo_block_table(config, bpp, est, estimates)
    _echo_device_memory(est, est_cut)


def _estimates_by_cut(
    config: ModelConfig, cut: int, batch: int, seq: int, lora: LoraConfig, optimizer: Optimizer, bpp: int
) -> tuple[list[MemoryEstimate], MemoryEstimate]:
    """Device memory estimates for cuts 0..L, and the one at ``cut`` (raises if out of range)."""
    estimates = [
        estimate_device_memory(config, k, batch, seq, lora, optimizer, bytes_per_param=bpp)
        for k in range(config.num_blocks + 1)
    ]
    if 0 <= cut <= config.num_blocks:
        return estimates, estimates[cut]
    return estimates, estimate_device_memory(config, cut, batch, seq, lora, optimizer, bytes_per_param=bpp)


def _param_counts(config: ModelConfig) -> tuple[int, int]:
    """(parameters per block, parameters of the whole model)."""
    per_block = block_param_count(config)
    return per_block, embedding_param_count(config) + config.num_blocks * per_block + head_param_count(config)


def _info_dict(
    spec: str, config: ModelConfig, bpp: int, est: MemoryEstimate, estimates: list[MemoryEstimate]
) -> dict[str, Any]:
    """``sft model info --json``: sizes, the estimate at the chosen cut, device bytes per cut."""
    per_block, total = _param_counts(config)
    return {
        "spec": spec,
        "family": config.family,
        "blocks": config.num_blocks,
        "parameters": total,
        "block_parameters": per_block,
        "block_bytes": per_block * bpp,
        "embedding_parameters": embedding_param_count(config),
        "head_parameters": head_param_count(config),
        "estimate": {**_estimate_dict(est), "total_bytes": est.total_bytes},
        "device_bytes_by_cut": [e.total_bytes for e in estimates],
    }


def _echo_summary(
    spec: str,
    config: ModelConfig,
    lora: LoraConfig,
    bpp: int,
    est: MemoryEstimate,
    est_cut: int,
    optimizer: str,
) -> None:
    """Print the architecture, the parameter counts and the LoRA/training setup."""
    per_block, total = _param_counts(config)
    typer.echo(f"{spec}: {_describe(config)}")
    typer.echo(
        f"parameters {total:,}: embedding {embedding_param_count(config):,}, "
        f"{per_block:,} per block ({_mib(per_block * bpp)}), head {head_param_count(config):,}"
    )
    typer.echo(
        f"LoRA r={lora.rank} on {', '.join(lora.projections(config.family))}: "
        f"{_mib(est.lora_bytes / max(est_cut, 1))} per block; batch {est.batch}, seq {est.seq}, {optimizer}"
    )


def _echo_block_table(
    config: ModelConfig, bpp: int, est: MemoryEstimate, estimates: list[MemoryEstimate]
) -> None:
    """Print one row per block: size, FLOPs and the device memory if the cut follows it."""
    per_block = block_param_count(config)
    typer.echo(
        f"{'block':>5} {'params':>11} {'bytes':>12} {'fwd GFLOP':>10} {'bwd GFLOP':>10} "
        f"{'device mem if cut after':>24}"
    )
    for i in range(config.num_blocks):
        typer.echo(
            f"{i:>5} {per_block:>11,} {_mib(per_block * bpp):>12} {est.block_forward_flops / 1e9:>10.3f} "
            f"{est.block_backward_flops / 1e9:>10.3f} {_mib(estimates[i + 1].total_bytes):>24}"
        )


def _echo_device_memory(est: MemoryEstimate, est_cut: int) -> None:
    """Print the memory breakdown (MiB) and FLOPs of the device at ``est_cut``."""
    typer.echo(f"device memory at cut {est_cut}:")
    for name, value in _estimate_dict(est).items():
        if name.endswith("_bytes"):
            typer.echo(f"  {name.removesuffix('_bytes'):<12} {_mib(value):>14}")
    typer.echo(f"  {'total':<12} {_mib(est.total_bytes):>14}")
    typer.echo(
        f"device FLOPs per step (fwd+bwd): {est.device_flops / 1e9:.3f} GFLOP; "
        f"head forward {est.head_forward_flops / 1e9:.3f} GFLOP"
    )


def _estimate_dict(est: MemoryEstimate) -> dict[str, int]:
    fields = (
        "cut",
        "batch",
        "seq",
        "frozen_bytes",
        "lora_bytes",
        "grad_bytes",
        "optimizer_bytes",
        "activation_bytes",
        "workspace_bytes",
        "block_forward_flops",
        "block_backward_flops",
    )
    return {f: getattr(est, f) for f in fields}


@app.command()
def verify(
    spec: SpecArg,
    cut: Annotated[int | None, typer.Option(help="device holds blocks [0, cut); default: half")] = None,
    server_start: Annotated[int | None, typer.Option(help="server part's first block (≤ cut)")] = None,
    batch: Annotated[int, typer.Option()] = 2,
    seq: Annotated[int, typer.Option()] = 16,
    rank: RankOpt = 8,
    mlp: MlpOpt = False,
    seed: Annotated[int, typer.Option()] = 0,
    tolerance: Annotated[
        float, typer.Option(help="fail (exit 1) above this logit / relative grad diff")
    ] = 1e-4,
    as_json: Annotated[bool, typer.Option("--json", help="last line: the result as JSON")] = False,
    reference: Annotated[
        str | None,
        typer.Option(
            help="also compare the whole model with this reference implementation on the same "
            "checkpoint: 'transformers' (a Hugging Face directory; needs transformers and peft)"
        ),
    ] = None,
    reference_tolerance: Annotated[
        float, typer.Option(help="fail (exit 1) above this logit / relative grad diff vs the reference")
    ] = 1e-3,
) -> None:
    """Split == whole: logits and LoRA gradients of device→server vs the unsplit model (and, with
    ``--reference transformers``, the whole model vs transformers + PEFT)."""
    torch.manual_seed(seed)
    lora = LoraConfig(rank=rank, mlp=mlp)
    try:
        resolved = resolve_spec(spec)
        _check_reference(reference, resolved)
        model = load_model(resolved)
        result = verify_split(
            model,
            model.num_blocks // 2 if cut is None else cut,
            server_start=server_start,
            batch=batch,
            seq=seq,
            lora=lora,
            seed=seed,
        )
        extra: dict[str, Any] = {}
        if reference is not None:
            from sft_actors.model.reference import verify_against_transformers  # transformers: lazily

            assert resolved.path is not None
            ref = verify_against_transformers(
                model, resolved.path, batch=batch, seq=seq, lora=lora, seed=seed
            )
            extra = ref.as_dict()
    except SftError as exc:
        raise _fail(exc) from exc
    ok = result.max_abs_logit_diff <= tolerance and result.max_rel_grad_diff <= tolerance
    ref_keys = ("max_abs_logit_diff_vs_reference", "max_rel_lora_grad_diff_vs_reference")
    ok = ok and all(extra[k] <= reference_tolerance for k in ref_keys if k in extra)
    typer.echo(
        f"{spec} cut {result.cut} (server from block {result.server_start}), "
        f"batch {result.batch}×{result.seq}: "
        f"max |Δlogit| {result.max_abs_logit_diff:.3e}, max rel Δgrad {result.max_rel_grad_diff:.3e} "
        f"over {result.grads_compared} LoRA tensors — {'OK' if ok else 'FAIL'} (tolerance {tolerance:g})"
    )
    if extra:
        typer.echo(
            f"vs {extra['reference']}: max |Δlogit| {extra['max_abs_logit_diff_vs_reference']:.3e}, "
            f"max rel ΔLoRA grad {extra['max_rel_lora_grad_diff_vs_reference']:.3e} "
            f"(tolerance {reference_tolerance:g})"
        )
    if as_json:
        typer.echo(json.dumps({"spec": spec, "ok": ok, **result.as_dict(), **extra}))
    if not ok:
        raise typer.Exit(1)


def _check_reference(reference: str | None, resolved: ModelSpec) -> None:
    """``--reference``: only ``transformers``, only for a Hugging Face directory."""
    if reference is None:
        return
    if reference != "transformers":
        raise ConfigError(f"--reference {reference!r} is not supported; use --reference transformers")
    if resolved.source != "hf_llama":
        raise ConfigError(
            f"--reference transformers needs a Hugging Face Llama-family directory; {resolved.name!r} is a "
            f"{resolved.source} spec (a GGUF has no transformers reference to load — compare its "
            "export_hf_llama folder instead, which checks our export, not the GGUF reading)"
        )
