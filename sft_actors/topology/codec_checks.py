"""Codec chains checked against the rest of the file: what cannot work is an error, what is
legal but wasted (or biased) is a warning, each naming the table and the key to change."""

from __future__ import annotations

from sft_actors.codec.refit import RefitSpec
from sft_actors.codec.spec import ChainSpec, CodecPolicy
from sft_actors.model.config import LlamaConfig, ModelConfig
from sft_actors.topology.report import Reporter
from sft_actors.topology.schema import Topology


def _policies(topo: Topology) -> list[tuple[str, CodecPolicy]]:
    return [("[run.codec]", topo.run.codec)] + [
        (f"[[actors]] {d.name!r} codec", d.codec) for d in topo.devices if d.codec is not None
    ]


def check_codec_shapes(r: Reporter, topo: Topology, config: ModelConfig | None) -> None:
    """A KLT basis keeps at most the model's hidden size of components (``project.rank``)."""
    if not isinstance(config, LlamaConfig):
        return
    for where, policy in _policies(topo):
        p = policy.up.project
        if p is not None and p.rank is not None and p.rank > config.dim:
            r.fail(
                where,
                "up.project.rank",
                f"{p.rank} components, but the cut activations have {config.dim} channels "
                f"(model {topo.run.model!r}); use rank <= {config.dim} or unset it (all)",
            )


def codec_warnings(r: Reporter, topo: Topology) -> list[str]:
    """Chains that run but do nothing useful, a refit table nothing uses, biased gradients."""
    out: list[str] = []
    projecting = False
    for where, policy in _policies(topo):
        projecting = projecting or policy.up.project is not None
        for role, chain in (("up", policy.up), ("down", policy.down)):
            out.extend(r.message(where, f"{role}.{key}", why) for key, why in _chain_warnings(chain, role))
    if topo.run.codec.refit != RefitSpec() and not projecting:
        out.append(
            r.message(
                "[run.codec.refit]",
                None,
                "no activation chain has a project stage, so there is no basis to refit; remove the table",
            )
        )
    return out


def _chain_warnings(chain: ChainSpec, role: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    lo, q = chain.lossless, chain.quantize
    if lo is not None and lo.entropy == "ans" and q is None:
        out.append(
            ("lossless.entropy", "ANS codes the integer codes of a quantize stage; this chain has none")
        )
    if chain.project is not None and q is None and chain.sparsify is None and chain.cast is None:
        out.append(
            (
                "project",
                "projection alone sends float32 coefficients (no fewer bytes) plus the basis; add quantize",
            )
        )
    if role == "down" and q is not None and q.rounding == "nearest":
        out.append(
            (
                "quantize.rounding",
                "round-to-nearest biases the gradients (stochastic rounding keeps them unbiased); "
                "use the default unless you measured it",
            )
        )
    return out
