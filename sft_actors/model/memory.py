"""Analytic parameter, memory and FLOP counts per block: the inputs of the planner.

Everything here is computed from the config alone (no weights). The activation model counts
what autograd actually saves in our blocks when the base is frozen and LoRA trains (checked
against ``saved_tensors_hooks`` and against measured peak memory in the tests):

- frozen linears save nothing for their weights; a LoRA ``A`` saves its input and ``B`` the
  rank-``r`` intermediate;
- Llama block, per token: block input (not in block 0, whose input — the frozen embedding —
  needs no grad), normed input, q, k, v (K/V after GQA expansion), attention output (which the
  o-projection reads as a view), residual after attention, and SwiGLU's gate, silu(gate), up;
  plus fp32 norm statistics and the attention log-sum-exp;
- ViT block: input, normed input, the fused qkv, attention output, residual, GELU input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sft_actors.errors import ConfigError
from sft_actors.model.config import LlamaConfig, LoraConfig, ModelConfig, ViTConfig

Optimizer = Literal["adam", "adamw", "sgd", "sgd_momentum"]
_OPTIMIZER_STATES = {"adam": 2, "adamw": 2, "sgd": 0, "sgd_momentum": 1}
FP32 = 4


@dataclass(kw_only=True, slots=True, frozen=True)
class MemoryEstimate:
    """Device-side memory (bytes) for embedding + blocks ``[0, cut)`` and the FLOPs to run them."""

    cut: int
    batch: int
    seq: int
    frozen_bytes: int  # embedding/stem + blocks [0, cut) base weights
    lora_bytes: int
    grad_bytes: int  # gradients of the adapters
    optimizer_bytes: int
    activation_bytes: int  # tensors autograd saves for backward, plus the cut activations themselves
    workspace_bytes: int  # transient peak on top of the saved tensors (largest backward temporaries)
    block_params: int
    embedding_params: int
    head_params: int  # final norm + head (server side)
    block_forward_flops: int  # one block, the whole batch
    block_backward_flops: int  # grads w.r.t. inputs (frozen base) + LoRA weight grads
    head_forward_flops: int

    @property
    def total_bytes(self) -> int:
        return (
            self.frozen_bytes
            + self.lora_bytes
            + self.grad_bytes
            + self.optimizer_bytes
            + self.activation_bytes
            + self.workspace_bytes
        )

    @property
    def device_flops(self) -> int:
        """Forward + backward FLOPs of the device's blocks for one batch."""
        return self.cut * (self.block_forward_flops + self.block_backward_flops)


def _llama_linear_params(config: LlamaConfig) -> int:
    """Weights of one block's projections (q, k, v, o, gate, up, down), without biases."""
    c, q, kv = config.dim, config.q_dim, config.kv_dim
    return 2 * c * q + 2 * c * kv + 3 * c * config.ffn_dim


def _llama_small_params(config: LlamaConfig) -> int:
    """One block's vectors: the two RMSNorms, q/k norms (Qwen3), projection biases."""
    n = 2 * config.dim
    if config.qk_norm:
        n += 2 * config.head_dim
    if config.qkv_bias:
        n += config.q_dim + 2 * config.kv_dim
    if config.o_bias:
        n += config.dim
    if config.mlp_bias:
        n += 2 * config.ffn_dim + config.dim
    return n


def block_param_count(config: ModelConfig) -> int:
    c = config.dim
    if isinstance(config, LlamaConfig):
        return _llama_linear_params(config) + _llama_small_params(config)
    m = config.mlp_dim
    return 3 * c * c + 3 * c + c * c + c + 2 * c * m + m + c + 4 * c


def embedding_param_count(config: ModelConfig) -> int:
    if isinstance(config, LlamaConfig):
        return config.vocab_size * config.dim
    c = config.dim
    return config.in_chans * config.patch_size**2 * c + c + c + config.num_tokens * c


def head_param_count(config: ModelConfig) -> int:
    """Final norm and head; a tied LM head reuses the embedding and adds only the norm."""
    if isinstance(config, LlamaConfig):
        return config.dim + (0 if config.tie_embeddings else config.vocab_size * config.dim)
    return 2 * config.dim + config.dim * config.num_classes + config.num_classes


def lora_shapes(config: ModelConfig, lora: LoraConfig) -> dict[str, tuple[int, int]]:
    """(in, out) features of each adapted projection in one block."""
    c = config.dim
    if isinstance(config, LlamaConfig):
        q, kv, f = config.q_dim, config.kv_dim, config.ffn_dim
        table = {
            "q": (c, q),
            "k": (c, kv),
            "v": (c, kv),
            "o": (q, c),
            "gate": (c, f),
            "up": (c, f),
            "down": (f, c),
        }
        return {p: table[p] for p in lora.projections("llama")}
    m = config.mlp_dim
    table = {"qkv": (c, 3 * c), "proj": (c, c), "fc1": (c, m), "fc2": (m, c)}
    return {p: table[p] for p in lora.projections("vit")}


def lora_param_count(config: ModelConfig, lora: LoraConfig) -> int:
    """Adapter parameters of one block."""
    return sum(lora.rank * (i + o) for i, o in lora_shapes(config, lora).values())


def saved_elements_per_token(config: ModelConfig, lora: LoraConfig, *, first_block: bool) -> tuple[int, int]:
    """(elements in the model dtype, fp32 elements) autograd saves per token in one block."""
    c, r = config.dim, lora.rank
    projections = lora.projections(config.family)
    n_adapters = len(projections)
    x = 0 if first_block else c
    if isinstance(config, LlamaConfig):
        f, q = config.ffn_dim, config.q_dim
        normed = c if {"q", "k", "v"} & set(projections) else 0
        mlp_lora = c + f if lora.mlp else 0  # normed MLP input (gate/up A) and SwiGLU output (down A)
        # q, k, v (K/V expanded to the query heads) and the attention output are q_dim wide.
        act = x + normed + 4 * q + c + 3 * f + mlp_lora + r * n_adapters
        fp32 = 2 + config.num_heads  # two RMSNorm rstd, attention log-sum-exp per head
        if config.qk_norm:  # Qwen3: q and k before their norms, and one rstd per head each
            act += q + config.kv_dim
            fp32 += config.num_heads + config.num_kv_heads
        return act, fp32
    m = config.mlp_dim
    normed = c if "qkv" in projections else 0
    mlp_lora = c + m if lora.mlp else 0
    act = x + normed + 3 * c + c + c + m + mlp_lora + r * n_adapters
    return act, 4 + config.num_heads  # two LayerNorms' mean and rstd, log-sum-exp


def flops_per_block(config: ModelConfig, lora: LoraConfig, batch: int, seq: int) -> tuple[int, int]:
    """(forward, backward) FLOPs of one block on a batch; a multiply-add counts 2."""
    tokens = batch * seq
    # Biases and norms are elementwise; only the weight matrices count as matmul FLOPs.
    linear = _llama_linear_params(config) if isinstance(config, LlamaConfig) else block_param_count(config)
    attn_pairs = seq * seq / 2 if isinstance(config, LlamaConfig) else seq * seq  # causal computes half
    # QKᵀ and AV (a sliding window is not discounted: this is the full-attention upper bound).
    attention = 2 * 2 * batch * config.num_heads * attn_pairs * config.head_dim
    lora_fwd = 2 * tokens * lora_param_count(config, lora)
    forward = 2 * tokens * linear + attention + lora_fwd
    # Frozen base: only input grads (≈ forward matmuls); attention backward ≈ 2× forward;
    # LoRA: input and weight grads.
    backward = 2 * tokens * linear + 2 * attention + 2 * lora_fwd
    return int(forward), int(backward)


def estimate_device_memory(
    config: ModelConfig,
    cut: int,
    batch: int,
    seq: int | None = None,
    lora: LoraConfig | None = None,
    optimizer: Optimizer = "adam",
    *,
    bytes_per_param: int = FP32,
) -> MemoryEstimate:
    """Memory of a device holding the embedding and blocks ``[0, cut)``, training LoRA on them.

    ``seq`` is the LM sequence length; a ViT always sees ``1 + num_patches`` tokens.
    ``bytes_per_param`` is the model dtype's size (4 for fp32, 2 for bf16).
    """
    lora = lora or LoraConfig()
    seq = _checked_seq(config, cut, seq, optimizer)
    tokens = batch * seq
    lora_params = cut * lora_param_count(config, lora)
    fwd, bwd = flops_per_block(config, lora, batch, seq)
    return MemoryEstimate(
        cut=cut,
        batch=batch,
        seq=seq,
        frozen_bytes=(embedding_param_count(config) + cut * block_param_count(config)) * bytes_per_param,
        lora_bytes=lora_params * bytes_per_param,
        grad_bytes=lora_params * bytes_per_param,
        optimizer_bytes=lora_params * bytes_per_param * _OPTIMIZER_STATES[optimizer],
        activation_bytes=_activation_bytes(config, lora, cut, tokens, bytes_per_param),
        workspace_bytes=_workspace_bytes(config, cut, tokens, bytes_per_param),
        block_params=block_param_count(config),
        embedding_params=embedding_param_count(config),
        head_params=head_param_count(config),
        block_forward_flops=fwd,
        block_backward_flops=bwd,
        head_forward_flops=_head_forward_flops(config, batch, tokens),
    )


def _checked_seq(config: ModelConfig, cut: int, seq: int | None, optimizer: str) -> int:
    """Tokens per sample (a ViT's own); ConfigError on a bad cut or optimizer, or an LM without seq."""
    if not 0 <= cut <= config.num_blocks:
        raise ConfigError(f"cut {cut} is outside [0, {config.num_blocks}]")
    if optimizer not in _OPTIMIZER_STATES:
        raise ConfigError(f"unknown optimizer {optimizer!r}; use one of {sorted(_OPTIMIZER_STATES)}")
    if isinstance(config, ViTConfig):
        return config.num_tokens
    if seq is None:
        raise ConfigError("an LM memory estimate needs seq (the sequence length)")
    return seq


def _activation_bytes(
    config: ModelConfig, lora: LoraConfig, cut: int, tokens: int, bytes_per_param: int
) -> int:
    """Bytes saved for backward by blocks [0, cut) on ``tokens`` tokens, plus the cut activation."""
    # The hidden state at the cut is held until its gradient returns.
    act_elems, fp32_elems = 0, 0
    for i in range(cut):
        a, f = saved_elements_per_token(config, lora, first_block=i == 0)
        act_elems += a
        fp32_elems += f
    boundary = config.dim if cut > 0 else 0
    return tokens * ((act_elems + boundary) * bytes_per_param + fp32_elems * FP32)


def _workspace_bytes(config: ModelConfig, cut: int, tokens: int, bytes_per_param: int) -> int:
    """Bytes of the largest live temporaries on top of the saved tensors (0 without blocks)."""
    # Measured: flat in the number of blocks; MLP-width gradients in backward and a few
    # residual-width ones.
    if isinstance(config, LlamaConfig):
        transient = 2 * config.ffn_dim + 4 * config.dim
    else:
        transient = 2 * config.mlp_dim + config.dim
    return tokens * transient * bytes_per_param if cut > 0 else 0


def _head_forward_flops(config: ModelConfig, batch: int, tokens: int) -> int:
    """Head forward FLOPs on a batch: an LM head on every token, a ViT's on the class token."""
    if isinstance(config, ViTConfig):
        return 2 * batch * config.dim * config.num_classes
    return 2 * tokens * config.dim * config.vocab_size
