"""What one device step costs: the model's per-block figures and the training shape.

Units (everywhere in ``plan``): bytes, FLOPs (one multiply-add = 2 FLOPs), seconds, hertz,
bits per second. A *token* is one position of one sequence (for a ViT, one patch or the class
token), so a micro-batch holds ``batch × seq`` tokens.

:class:`ModelCosts` holds what the planner needs from a model, per transformer block:

- ``bytes_per_block``: frozen weights of one block (parameters × bytes per weight);
- ``embed_bytes`` / ``head_bytes``: the embedding/stem every device holds and the head (final
  norm + LM head or classifier) the server holds;
- ``flops_per_block_per_token``: forward FLOPs of the block's linear layers per token;
  ``attn_flops_per_block_per_token_per_pos`` multiplies the sequence length (QKᵀ and AV; halved
  for causal attention); ``embed_flops_per_token`` / ``head_flops_per_token`` likewise;
- ``lora_params_per_block``: trainable adapter parameters of one block;
- ``saved_floats_per_token_per_block`` (+ ``..._per_pos`` × seq, the attention probabilities):
  activations autograd keeps for the backward pass, in floats per token — an estimate from the
  architecture that the model layer can replace with measured numbers.

Known architectures are built from their configs (:meth:`ModelCosts.known`); the model layer can
feed its own figures through :meth:`ModelCosts.from_model_info`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Final, Literal

from sft_actors.errors import ConfigError, ModelSpecError

AccuracyBasis = Literal["trained", "untrained"]

# ModelCosts.known: name → (constructor, its config arguments); names are lower case.
_KNOWN_ARCHITECTURES: Final[dict[str, tuple[Literal["llama", "vit"], dict[str, Any]]]] = {
    "smollm2-135m": (
        "llama",
        {
            "num_blocks": 30,
            "hidden": 576,
            "heads": 9,
            "kv_heads": 3,
            "mlp_hidden": 1536,
            "vocab": 49152,
            "tied_embeddings": True,
        },
    ),
    "llama-tiny": (
        "llama",
        {
            "num_blocks": 4,
            "hidden": 64,
            "heads": 4,
            "kv_heads": 2,
            "mlp_hidden": 128,
            "vocab": 256,
            "tied_embeddings": True,
            "default_seq": 64,
        },
    ),
    # The model layer's preset: 32 px, patch 4, 10 classes.
    "vit-tiny": (
        "vit",
        {
            "num_blocks": 4,
            "hidden": 64,
            "heads": 4,
            "mlp_hidden": 128,
            "image_size": 32,
            "patch": 4,
            "num_classes": 10,
        },
    ),
    "vit-small": ("vit", {"num_blocks": 12, "hidden": 384, "heads": 6, "mlp_hidden": 1536}),
    "vit-base": ("vit", {"num_blocks": 12, "hidden": 768, "heads": 12, "mlp_hidden": 3072}),
}
_KNOWN_ALIASES: Final[dict[str, str]] = {"smollm2": "smollm2-135m"}


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelCosts:
    """Per-block cost figures of a transformer split at block boundaries (units: module doc)."""

    name: str
    num_blocks: int
    hidden: int
    bytes_per_block: float
    embed_bytes: float
    head_bytes: float
    flops_per_block_per_token: float
    lora_params_per_block: int
    attn_flops_per_block_per_token_per_pos: float = 0.0
    embed_flops_per_token: float = 0.0
    head_flops_per_token: float = 0.0
    saved_floats_per_token_per_block: float = 0.0
    saved_floats_per_token_per_block_per_pos: float = 0.0
    default_seq: int = 256
    sequence_fixed: bool = False  # a ViT's sequence is set by the image, not by training.seq

    def __post_init__(self) -> None:
        if self.num_blocks < 1 or self.hidden < 1:
            raise ModelSpecError(f"model {self.name!r}: num_blocks and hidden must be ≥ 1")
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, int | float) and not isinstance(value, bool) and value < 0:
                raise ModelSpecError(f"model {self.name!r}: {f.name} = {value} must be ≥ 0")

    def block_flops_per_token(self, seq: int) -> float:
        """Forward FLOPs of one block per token at sequence length ``seq``."""
        return self.flops_per_block_per_token + self.attn_flops_per_block_per_token_per_pos * seq

    def saved_floats_per_token(self, seq: int) -> float:
        """Floats per token one block keeps for backward at sequence length ``seq``."""
        return self.saved_floats_per_token_per_block + self.saved_floats_per_token_per_block_per_pos * seq

    # --- constructors --------------------------------------------------------------------
    @classmethod
    def llama(
        cls,
        name: str,
        *,
        num_blocks: int,
        hidden: int,
        heads: int,
        kv_heads: int,
        mlp_hidden: int,
        vocab: int,
        head_dim: int | None = None,
        tied_embeddings: bool = True,
        weight_bytes: int = 4,
        lora_rank: int = 8,
        lora_mlp: bool = False,
        default_seq: int = 256,
    ) -> ModelCosts:
        """A Llama-family decoder (RMSNorm, GQA attention, SwiGLU MLP) from its config.

        ``head_dim`` defaults to ``hidden / heads``; Qwen3 and some Mistral checkpoints set it
        apart, which changes the q/k/v/o shapes (q and o are ``heads · head_dim`` wide)."""
        if head_dim is None:
            if hidden % heads:
                raise ModelSpecError(f"model {name!r}: hidden {hidden} is not divisible by heads {heads}")
            head_dim = hidden // heads
        q_dim, kv_dim = head_dim * heads, head_dim * kv_heads
        attn = [(hidden, q_dim), (hidden, kv_dim), (hidden, kv_dim), (q_dim, hidden)]
        mlp = [(hidden, mlp_hidden), (hidden, mlp_hidden), (mlp_hidden, hidden)]
        linear = sum(i * o for i, o in attn + mlp)
        lora_targets = attn + (mlp if lora_mlp else [])
        # Head: the final norm plus the LM head. Tied or not, the server holds its own copy (the
        # embedding lives on the devices), so ``tied_embeddings`` changes no byte count here.
        del tied_embeddings
        head_params = hidden + vocab * hidden
        return cls(
            name=name,
            num_blocks=num_blocks,
            hidden=hidden,
            bytes_per_block=float((linear + 2 * hidden) * weight_bytes),
            embed_bytes=float(vocab * hidden * weight_bytes),
            head_bytes=float(head_params * weight_bytes),
            flops_per_block_per_token=2.0 * linear,
            # QKᵀ and AV cost 2·d FLOPs per (token, position) each; causal masking halves it.
            attn_flops_per_block_per_token_per_pos=2.0 * q_dim,
            embed_flops_per_token=0.0,  # a table lookup
            head_flops_per_token=2.0 * hidden * vocab,
            lora_params_per_block=lora_rank * sum(i + o for i, o in lora_targets),
            # Norm inputs/outputs, q/k/v (+ rotated copies), attention output, gate/up/act.
            saved_floats_per_token_per_block=5.0 * hidden + q_dim + 3.0 * kv_dim + 3.0 * mlp_hidden,
            saved_floats_per_token_per_block_per_pos=float(heads),  # softmax probabilities
            default_seq=default_seq,
        )

    @classmethod
    def vit(
        cls,
        name: str,
        *,
        num_blocks: int,
        hidden: int,
        heads: int,
        mlp_hidden: int,
        image_size: int = 224,
        patch: int = 16,
        channels: int = 3,
        num_classes: int = 1000,
        weight_bytes: int = 4,
        lora_rank: int = 8,
        lora_mlp: bool = False,
    ) -> ModelCosts:
        """A ViT (pre-norm blocks, fused qkv with bias, GELU MLP) from its config."""
        if image_size % patch:
            raise ModelSpecError(
                f"model {name!r}: image_size {image_size} is not a multiple of patch {patch}"
            )
        tokens = (image_size // patch) ** 2 + 1  # patches + class token
        patch_dim = channels * patch * patch
        attn = [(hidden, 3 * hidden), (hidden, hidden)]
        mlp = [(hidden, mlp_hidden), (mlp_hidden, hidden)]
        linear = sum(i * o for i, o in attn + mlp)
        biases = 3 * hidden + hidden + mlp_hidden + hidden
        lora_targets = attn + (mlp if lora_mlp else [])
        embed_params = patch_dim * hidden + hidden + hidden + tokens * hidden  # conv, bias, cls, pos
        head_params = 2 * hidden + hidden * num_classes + num_classes
        return cls(
            name=name,
            num_blocks=num_blocks,
            hidden=hidden,
            bytes_per_block=float((linear + biases + 4 * hidden) * weight_bytes),
            embed_bytes=float(embed_params * weight_bytes),
            head_bytes=float(head_params * weight_bytes),
            flops_per_block_per_token=2.0 * linear,
            attn_flops_per_block_per_token_per_pos=4.0 * hidden,  # bidirectional: no causal half
            embed_flops_per_token=2.0 * patch_dim * hidden,
            # The classifier reads the class token only: amortised over the sequence.
            head_flops_per_token=2.0 * hidden * num_classes / tokens,
            lora_params_per_block=lora_rank * sum(i + o for i, o in lora_targets),
            saved_floats_per_token_per_block=8.0 * hidden + 2.0 * mlp_hidden,
            saved_floats_per_token_per_block_per_pos=float(heads),
            default_seq=tokens,
            sequence_fixed=True,
        )

    @classmethod
    def known(cls, name: str, **overrides: Any) -> ModelCosts:
        """Costs of a known architecture: ``smollm2-135m``, ``llama-tiny``, ``vit-tiny/small/base``.

        ``overrides`` go to the constructor (``weight_bytes``, ``lora_rank``, ``num_classes``…).
        """
        key = name.lower()
        key = _KNOWN_ALIASES.get(key, key)
        if key not in _KNOWN_ARCHITECTURES:
            raise ModelSpecError(
                f"no cost figures for model {name!r}; known: smollm2-135m, llama-tiny, vit-tiny, vit-small, "
                "vit-base "
                "(or build them with ModelCosts.from_model_info)"
            )
        family, config = _KNOWN_ARCHITECTURES[key]
        build = cls.llama if family == "llama" else cls.vit
        return build(key, **{**config, **overrides})

    @classmethod
    def from_config(cls, name: str, config: Any, **overrides: Any) -> ModelCosts:
        """From a model-layer config object (duck-typed: ``LlamaConfig`` or ``ViTConfig`` fields)."""
        if hasattr(config, "vocab_size"):
            return cls.llama(
                name,
                **{
                    "num_blocks": config.num_blocks,
                    "hidden": config.dim,
                    "heads": config.num_heads,
                    "kv_heads": config.num_kv_heads,
                    "mlp_hidden": config.ffn_dim,
                    "vocab": config.vocab_size,
                    "head_dim": config.head_dim,
                    "tied_embeddings": getattr(config, "tie_embeddings", True),
                    **overrides,
                },
            )
        if hasattr(config, "patch_size"):
            return cls.vit(
                name,
                **{
                    "num_blocks": config.num_blocks,
                    "hidden": config.dim,
                    "heads": config.num_heads,
                    "mlp_hidden": config.mlp_dim,
                    "image_size": config.image_size,
                    "patch": config.patch_size,
                    "channels": config.in_chans,
                    "num_classes": config.num_classes,
                    **overrides,
                },
            )
        raise ModelSpecError(
            f"model {name!r}: config {type(config).__name__} is neither a Llama nor a ViT config"
        )

    @classmethod
    def from_model_info(cls, info: Mapping[str, Any]) -> ModelCosts:
        """Build from the model layer's own figures (a dict with this class's field names).

        Required: ``num_blocks``, ``hidden``, ``bytes_per_block``, ``embed_bytes``, ``head_bytes``,
        ``flops_per_block_per_token``, ``lora_params_per_block``. Other fields are optional;
        keys this class does not know are ignored (the model layer may report more).
        """
        names = {f.name for f in fields(cls)}
        required = [
            "num_blocks",
            "hidden",
            "bytes_per_block",
            "embed_bytes",
            "head_bytes",
            "flops_per_block_per_token",
            "lora_params_per_block",
        ]
        missing = [k for k in required if k not in info]
        if missing:
            raise ModelSpecError(f"model info lacks {', '.join(missing)}; the planner needs them per block")
        kwargs = {k: v for k, v in info.items() if k in names}
        kwargs.setdefault("name", str(info.get("model_id", "model")))
        return cls(**kwargs)


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainingShape:
    """How training runs, and what it must reach.

    - ``batch``, ``seq``: one micro-batch holds ``batch × seq`` tokens;
    - ``steps_per_round``: micro-batches each device runs per round (one after the other);
    - ``aggregate_every``: rounds between LoRA averaging (each device sends and receives the
      adapters of its blocks, fp32);
    - ``rounds_base``: rounds needed with no compression; compression that costs accuracy needs
      more: ``rounds = rounds_base · (1 + rounds_per_loss · Δ)`` where ``Δ`` is the relative
      accuracy loss (0.25 = +25 % perplexity), see ``compression``;
    - ``max_accuracy_loss``: the accuracy constraint, ``Δ ≤ max_accuracy_loss``;
    - ``backward_factor``: backward FLOPs ÷ forward FLOPs (2 computes input and weight
      gradients; frozen weights with LoRA sit between 1 and 2);
    - ``activation_bytes``: bytes per element of the raw cut tensor and of saved activations;
    - ``optimizer_states_per_param``: 2 for Adam (two moments), 0 for SGD;
    - ``min_device_blocks`` / ``min_server_blocks``: the cut range ``[min_device_blocks,
      num_blocks − min_server_blocks]``.
    """

    batch: int = 8
    seq: int = 256
    steps_per_round: int = 1
    aggregate_every: int = 1
    rounds_base: float = 100.0
    max_accuracy_loss: float = 0.10
    rounds_per_loss: float = 1.0
    accuracy_basis: AccuracyBasis = "trained"
    backward_factor: float = 2.0
    activation_bytes: int = 4
    lora_bytes: int = 4
    optimizer_states_per_param: int = 2
    max_inflight: int = 1
    compress_gradients: bool = True
    min_device_blocks: int = 1
    min_server_blocks: int = 1
    device_overhead_mb: float = 0.0

    def __post_init__(self) -> None:
        positive = ("batch", "seq", "steps_per_round", "aggregate_every", "activation_bytes", "max_inflight")
        for key in positive:
            if getattr(self, key) < 1:
                raise ConfigError(f"training.{key} = {getattr(self, key)} must be ≥ 1")
        if self.rounds_base <= 0:
            raise ConfigError(f"training.rounds_base = {self.rounds_base} must be > 0")
        for key in ("max_accuracy_loss", "rounds_per_loss", "backward_factor", "device_overhead_mb"):
            if getattr(self, key) < 0:
                raise ConfigError(f"training.{key} = {getattr(self, key)} must be ≥ 0")
        if self.min_device_blocks < 0 or self.min_server_blocks < 0:
            raise ConfigError("training.min_device_blocks and min_server_blocks must be ≥ 0")
        if self.accuracy_basis not in ("trained", "untrained"):
            raise ConfigError(
                f"training.accuracy_basis = {self.accuracy_basis!r}; use 'trained' or 'untrained'"
            )

    @property
    def tokens(self) -> int:
        """Tokens per micro-batch."""
        return self.batch * self.seq

    def rounds(self, accuracy_loss: float) -> float:
        """Rounds needed at relative accuracy loss ``accuracy_loss`` (the model in the class doc)."""
        return self.rounds_base * (1.0 + self.rounds_per_loss * accuracy_loss)
