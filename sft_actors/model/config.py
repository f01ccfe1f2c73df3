"""Architecture configs (frozen dataclasses) and the named presets users can ask for.

A config fully determines the shapes of a model; weights come from a loader (or a seeded random
init). Presets are small, fixed and documented so tests and planners agree on them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from sft_actors.errors import ModelSpecError

Family = Literal["llama", "vit"]


@dataclass(kw_only=True, slots=True, frozen=True)
class LlamaConfig:
    """A Llama-family decoder: RMSNorm, RoPE, SwiGLU MLP, grouped-query attention."""

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

    family: Family = dataclasses.field(default="llama", init=False)

    def __post_init__(self) -> None:
        if self.dim % self.num_heads:
            raise ModelSpecError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ModelSpecError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ModelSpecError(f"head_dim {self.head_dim} must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim


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
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def config_from_dict(data: dict[str, Any]) -> ModelConfig:
    fields = dict(data)
    family = fields.pop("family", "llama")
    cls: type[LlamaConfig] | type[ViTConfig] = LlamaConfig if family == "llama" else ViTConfig
    return cls(**fields)
