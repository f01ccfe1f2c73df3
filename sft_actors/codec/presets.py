"""Named codec chains, spelled once: the planner, ``sft plan``'s output and the benchmarks use these.

Each preset comes as the sparse ``[run.codec]`` table a topology holds (``*_tables``: only the
keys that differ from the stage defaults, so it pastes into a TOML file and parses back with
:meth:`CodecPolicy.parse`) and as the parsed :class:`CodecPolicy`.

- **transform** (rate-controlled transform coding, the default family): activations (``up``,
  (tokens, hidden) per micro-batch) keep the first token of each sequence densely (the
  attention sink: 8 bit per value, its massive values in float16), are centred on the
  calibration mean (``project.transform = "center"``, basis key ``"pca"``: C·12 one-time
  bytes) and quantized with one common step that **rate control**
  picks per frame so the frame is ``ratio_up`` times smaller than its raw bytes (±3 %,
  ``codec/rate.py``), nearest rounding, rANS with per-column contexts. Gradients (``down``):
  one common step at ``ratio_down`` (±3 %), unbiased stochastic rounding, rANS. Ratios are raw
  bytes ÷ coded bytes of a frame (dimensionless), in rate control's range [1, 1000]. Measured
  on SmolLM2-135M cut at block 4 (``bench/compression.py``, chain ``transform-11/32``).
- **paper_topk** (the SFT paper's chain, arXiv 2501.09237; the main job's chain until
  transform coding replaced it): Top-K 20 % by magnitude over the tensor, unbiased 8-bit
  stochastic rounding with one scale per token, positions as a bitmap, zstd level 3; the same
  chain both ways (≈ 16–17× on SmolLM2).
"""

from __future__ import annotations

from typing import Any

from sft_actors.codec.spec import MAX_RATIO, CodecPolicy, Transform

#: (up, down) ratios of the default chain: the highest measured rates at which a 40-step
#: SmolLM2-135M fine-tune stays within 2 % held-out perplexity of the uncompressed one
#: (BENCHMARKS.md "Compression"); gradients tolerate far more compression than activations.
DEFAULT_RATIOS: tuple[float, float] = (11.0, 32.0)

#: Basis key the transform preset's ``project`` stage uses (the device fits it, the server gets it).
TRANSFORM_BASIS = "pca"

_PAPER_TOPK_CHAIN: dict[str, dict[str, Any]] = {
    "sparsify": {"keep": 0.2, "scope": "tensor"},
    "quantize": {"bits": 8, "scale": "token"},
    "lossless": {"positions": "bitmap", "zstd_level": 3},
}


def transform_down_ratio(ratio_up: float) -> float:
    """The gradient ratio that goes with activations at ``ratio_up``: the default's proportion
    (32 / 11), at least the default's 32, at most rate control's 1000 — gradients tolerate far
    more compression than activations (BENCHMARKS.md "Compression")."""
    up, down = DEFAULT_RATIOS
    return float(min(MAX_RATIO, max(down, round(ratio_up * down / up, 1))))


def transform_tables(
    ratio_up: float, ratio_down: float | None = None, *, transform: Transform = "center"
) -> dict[str, dict[str, Any]]:
    """The ``{up, down}`` tables of the rate-controlled transform chain (``ratio_down``
    defaults to :func:`transform_down_ratio`; ``transform="klt"`` rotates onto the PCA basis
    instead)."""
    down = transform_down_ratio(ratio_up) if ratio_down is None else ratio_down
    return {
        "up": {
            # The attention-sink token in 8 bit per value (massive values in float16); no dense
            # channels: per-column contexts code loud channels at their own scale.
            "outliers": {"first_tokens": 1, "bits": 8, "max_channels": 0},
            "project": {"basis": TRANSFORM_BASIS, "transform": transform},
            "quantize": {"scale": "common", "ratio": float(ratio_up), "rounding": "nearest"},
            "lossless": {"entropy": "ans", "contexts": "column_scale"},
        },
        "down": {
            "quantize": {"scale": "common", "ratio": float(down)},  # stochastic rounding: unbiased
            "lossless": {"entropy": "ans"},
        },
    }


def transform_policy(
    ratio_up: float, ratio_down: float | None = None, *, transform: Transform = "center"
) -> CodecPolicy:
    """:func:`transform_tables`, parsed (raises ``ConfigError`` for a ratio outside [1, 1000])."""
    return CodecPolicy.parse(transform_tables(ratio_up, ratio_down, transform=transform))


def paper_topk_tables() -> dict[str, dict[str, Any]]:
    """The ``{up, down}`` tables of the paper's Top-K 20 % + 8-bit chain (same chain both ways)."""
    return {
        "up": {k: dict(v) for k, v in _PAPER_TOPK_CHAIN.items()},
        "down": {k: dict(v) for k, v in _PAPER_TOPK_CHAIN.items()},
    }


def paper_topk_policy() -> CodecPolicy:
    """:func:`paper_topk_tables`, parsed."""
    return CodecPolicy.parse(paper_topk_tables())


def codec_toml(tables: dict[str, dict[str, Any]], prefix: str = "run.codec") -> str:
    """The ``[prefix.up]``/``[prefix.down]`` TOML of ``{up, down}`` tables, one inline table per
    stage (as topology files write chains); an empty role is an empty table (identity)."""
    lines: list[str] = []
    for role in ("up", "down"):
        lines.extend([""] if lines else [])
        lines.append(f"[{prefix}.{role}]")
        for stage, params in tables.get(role, {}).items():
            inner = ", ".join(f"{k} = {_toml_value(v)}" for k, v in params.items())
            lines.append(f"{stage} = {{ {inner} }}" if inner else f"{stage} = {{}}")
    return "\n".join(lines) + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'
