"""Architecture configs (frozen dataclasses) and the named presets users can ask for.

A config fully determines the shapes of a model; weights come from a loader (or a seeded random
init). Presets are small, fixed and documented so tests and planners agree on them.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from sft_actors.errors import ConfigError, ModelSpecError

Family = Literal["llama", "vit"]


Arch = Literal["llama", "mistral", "qwen2", "qwen3"]
ARCHS: tuple[Arch, ...] = ("llama", "mistral", "qwen2", "qwen3")
RopeKind = Literal["default", "linear", "dynamic", "llama3", "yarn"]
ROPE_KINDS: tuple[RopeKind, ...] = ("default", "linear", "dynamic", "llama3", "yarn")


@dataclass(kw_only=True, slots=True, frozen=True)
class RopeScaling:
    """How RoPE frequencies are rescaled (the math lives in :mod:`sft_actors.model.rope`).

    ``kind`` follows transformers' ``rope_type``: ``linear`` (position interpolation),
    ``dynamic`` (NTK-aware, grows the base past ``original_max_position_embeddings``),
    ``llama3`` (Llama 3.1's per-band division) and ``yarn`` (Peng et al. 2023, with its attention
    factor). ``default`` only carries ``freq_factors``: per-frequency divisors from a GGUF
    ``rope_freqs`` tensor (llama.cpp divides each frequency by its factor), which also apply on
    top of ``linear`` and ``yarn``.
    """

    kind: RopeKind
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    attention_factor: float | None = None  # yarn; None: derived from factor / mscale
    mscale: float | None = None  # yarn
    mscale_all_dim: float | None = None  # yarn
    truncate: bool = True  # yarn
    freq_factors: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ROPE_KINDS:
            raise ModelSpecError(f"RoPE scaling kind {self.kind!r} is not supported; use one of {ROPE_KINDS}")
        if not (math.isfinite(self.factor) and self.factor > 0):
            raise ModelSpecError(f"RoPE scaling factor must be a positive number, got {self.factor}")
        if self.kind in ("dynamic", "llama3", "yarn") and not self.original_max_position_embeddings:
            raise ModelSpecError(f"RoPE scaling {self.kind!r} needs original_max_position_embeddings")
        if self.kind == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ModelSpecError("llama3 RoPE scaling needs high_freq_factor > low_freq_factor")
        if self.freq_factors and self.kind in ("dynamic", "llama3"):
            raise ModelSpecError(f"RoPE frequency factors do not combine with {self.kind!r} scaling")


@dataclass(kw_only=True, slots=True, frozen=True)
class LlamaConfig:
    """A Llama-family decoder: RMSNorm, RoPE, SwiGLU MLP, grouped-query attention.

    The same block serves Llama 1-3.x, Mistral, Qwen2/2.5 and Qwen3 (``arch`` names which, so an
    export writes the right ``model_type`` back): ``head_dim`` may differ from ``dim /
    num_heads`` (``explicit_head_dim``), q/k/v and o may carry biases, Qwen3 normalises q and k
    per head (``qk_norm``), RoPE may be rescaled (``rope_scaling``), and attention may be limited
    to the last ``sliding_window`` positions (every block except ``full_attention_blocks``).
    """

    vocab_size: int
    dim: int
    num_blocks: int
    num_heads: int
    num_kv_heads: int
    ffn_dim: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    max_seq_len: int = 2048
    arch: Arch = "llama"
    explicit_head_dim: int | None = None  # None: dim // num_heads
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    rope_scaling: RopeScaling | None = None
    sliding_window: int | None = None
    full_attention_blocks: tuple[int, ...] = ()  # blocks exempt from the sliding window

    family: Family = dataclasses.field(default="llama", init=False)

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ModelSpecError(f"unknown Llama-family arch {self.arch!r}; use one of {ARCHS}")
        if self.explicit_head_dim is None and self.dim % self.num_heads:
            raise ModelSpecError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ModelSpecError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
            )
        if self.head_dim % 2 or self.head_dim <= 0:
            raise ModelSpecError(f"head_dim {self.head_dim} must be positive and even for RoPE")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ModelSpecError(f"sliding_window must be ≥ 1, got {self.sliding_window}")
        freq_factors = self.rope_scaling.freq_factors if self.rope_scaling else ()
        if freq_factors and len(freq_factors) != self.head_dim // 2:
            raise ModelSpecError(
                f"{len(freq_factors)} RoPE frequency factors for head_dim {self.head_dim} "
                f"(expected {self.head_dim // 2})"
            )

    @property
    def head_dim(self) -> int:
        return self.explicit_head_dim if self.explicit_head_dim is not None else self.dim // self.num_heads

    @property
    def q_dim(self) -> int:
        """Width of the query projection's output (and the o projection's input)."""
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def window(self, block: int) -> int | None:
        """The sliding attention window of ``block`` (None: full causal attention)."""
        if self.sliding_window is None or block in self.full_attention_blocks:
            return None
        return self.sliding_window


@dataclass(kw_only=True, slots=True, frozen=True)
class ViTConfig:
    """A pre-LN Vision Transformer with a CLS token and learned position embeddings (timm layout)."""

    image_size: int
    patch_size: int
    in_chans: int
    num_classes: int
    dim: int
    num_blocks: int
    num_heads: int
    mlp_dim: int
    norm_eps: float = 1e-6

    family: Family = dataclasses.field(default="vit", init=False)

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ModelSpecError(
                f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}"
            )
        if self.dim % self.num_heads:
            raise ModelSpecError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_tokens(self) -> int:
        """Sequence length inside the blocks: the CLS token plus one token per patch."""
        return 1 + self.num_patches


ModelConfig = LlamaConfig | ViTConfig

# Tiny configs run a step in milliseconds; the llama one pairs with the byte tokenizer (vocab 256).
PRESETS: dict[str, ModelConfig] = {
    "llama-tiny": LlamaConfig(
        vocab_size=256, dim=64, num_blocks=4, num_heads=4, num_kv_heads=2, ffn_dim=192, max_seq_len=512
    ),
    "vit-tiny": ViTConfig(
        image_size=32,
        patch_size=4,
        in_chans=3,
        num_classes=10,
        dim=64,
        num_blocks=4,
        num_heads=4,
        mlp_dim=128,
    ),
    # ViT-S/16 and ViT-B/16 at 224 px (Dosovitskiy et al.; timm's vit_small/base_patch16_224).
    "vit-small": ViTConfig(
        image_size=224,
        patch_size=16,
        in_chans=3,
        num_classes=1000,
        dim=384,
        num_blocks=12,
        num_heads=6,
        mlp_dim=1536,
    ),
    "vit-base": ViTConfig(
        image_size=224,
        patch_size=16,
        in_chans=3,
        num_classes=1000,
        dim=768,
        num_blocks=12,
        num_heads=12,
        mlp_dim=3072,
    ),
}


ConfigT = TypeVar("ConfigT", LlamaConfig, ViTConfig)


def with_overrides(config: ConfigT, overrides: dict[str, Any]) -> ConfigT:
    """``config`` with some fields replaced; unknown field names are a :class:`ModelSpecError`."""
    if not overrides:
        return config
    known = {f.name for f in dataclasses.fields(config) if f.init}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ModelSpecError(
            f"unknown {config.family} config field(s) {unknown}; known fields: {sorted(known)}"
        )
    return dataclasses.replace(config, **overrides)


def config_to_dict(config: ModelConfig) -> dict[str, Any]:
    """Plain JSON-able fields (tuples become lists; ``rope_scaling`` a nested dict or None)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, RopeScaling):
            value = {g.name: getattr(value, g.name) for g in dataclasses.fields(value)}
            value["freq_factors"] = list(value["freq_factors"])
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def config_from_dict(data: dict[str, Any]) -> ModelConfig:
    """The inverse of :func:`config_to_dict`."""
    fields = dict(data)
    family = fields.pop("family", "llama")
    if family != "llama":
        return ViTConfig(**fields)
    rope = fields.get("rope_scaling")
    if isinstance(rope, dict):
        fields["rope_scaling"] = RopeScaling(
            **{**rope, "freq_factors": tuple(float(x) for x in rope.get("freq_factors", ()))}
        )
    if "full_attention_blocks" in fields:
        fields["full_attention_blocks"] = tuple(int(i) for i in fields["full_attention_blocks"])
    return LlamaConfig(**fields)


LLAMA_ATTENTION = ("q", "k", "v", "o")
LLAMA_MLP = ("gate", "up", "down")
VIT_ATTENTION = ("qkv", "proj")
VIT_MLP = ("fc1", "fc2")


@dataclass(kw_only=True, slots=True, frozen=True)
class LoraConfig:
    """Rank, scaling and placement of LoRA adapters (Hu et al. 2021, ``scale = alpha / rank``).

    ``targets`` names attention projections. For a ViT, whose q/k/v projection is fused, any of
    ``q``, ``k``, ``v`` selects ``qkv`` and ``o`` selects ``proj``. ``mlp`` adds the MLP
    projections (Llama: gate/up/down, ViT: fc1/fc2). Torch-free, so a topology file parses into
    it without loading torch. Raises :class:`ConfigError` for a rank < 1, a dropout outside
    [0, 1), a non-positive alpha or an unknown target.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = LLAMA_ATTENTION
    mlp: bool = False

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"LoRA rank must be ≥ 1, got {self.rank}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ConfigError(f"LoRA alpha must be a positive number, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        allowed = set(LLAMA_ATTENTION) | set(VIT_ATTENTION)
        bad = [t for t in self.targets if t not in allowed]
        if bad or not self.targets:
            close = difflib.get_close_matches(bad[0], sorted(allowed), n=1) if bad else []
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"LoRA targets {list(self.targets)} invalid{hint}; choose from {sorted(allowed)}"
            )

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def projections(self, family: str) -> tuple[str, ...]:
        """The projection names that get an adapter in one block of ``family``."""
        if family == "llama":
            attn = tuple(t for t in LLAMA_ATTENTION if t in self.targets)
            if not attn:
                raise ConfigError(f"LoRA targets {list(self.targets)} select no Llama projection (q,k,v,o)")
            return attn + (LLAMA_MLP if self.mlp else ())
        if family == "vit":
            vit: list[str] = []
            if {"q", "k", "v", "qkv"} & set(self.targets):
                vit.append("qkv")
            if {"o", "proj"} & set(self.targets):
                vit.append("proj")
            return tuple(vit) + (VIT_MLP if self.mlp else ())
        raise ConfigError(f"unknown model family {family!r}")
