"""A Llama-family decoder written for splitting: RMSNorm, RoPE, SwiGLU, grouped-query attention.

One block covers Llama 1-3.x, Mistral, Qwen2/2.5 and Qwen3 (see :class:`LlamaConfig`); RoPE and
its rescalings live in :mod:`sft_actors.model.rope`. Numerics follow Hugging Face's
``LlamaForCausalLM`` (RoPE in the rotate-half layout, norms computed in fp32), so HF checkpoints
load unchanged and llama-architecture GGUF checkpoints load after their Q/K rows are un-permuted
(``gguf_loader``). Batches are right-padded: with causal attention, pads never influence real
tokens, so no padding mask is needed; positions are ``0..T-1``. A sliding window (Mistral,
Qwen) is the one mask: causal and at most ``sliding_window`` positions back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sft_actors.model.base import SplitLM, project
from sft_actors.model.config import LlamaConfig
from sft_actors.model.lora import BlockAdapters
from sft_actors.model.rope import Rope, apply_rope, rope_tables
from sft_actors.model.tokenizer import Tokenizer

IGNORE_INDEX = -100

__all__ = ["IGNORE_INDEX", "Llama", "LlamaBlock", "LlamaContext", "RMSNorm", "Rope", "rope_tables"]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 then cast back before the weight, as HF does (matters in bf16).
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return normed * self.weight


@dataclass(frozen=True, slots=True)
class LlamaContext:
    """What every block of one forward shares: RoPE tables and the sliding-window mask (if any)."""

    rope: Rope
    window_mask: torch.Tensor | None  # (T, T) bool, True = may attend; None: plain causal


def window_mask(seq_len: int, window: int | None, device: torch.device) -> torch.Tensor | None:
    """Causal attention limited to the last ``window`` positions (``q − kv < window``, as
    transformers' ``sliding_window_overlay``); None when the window covers the whole sequence."""
    if window is None or window >= seq_len:
        return None
    pos = torch.arange(seq_len, device=device)
    offset = pos[:, None] - pos[None, :]  # (T, T): q − kv
    return (offset >= 0) & (offset < window)


class LlamaBlock(nn.Module):
    """One decoder block. Optional parts by config: q/k/v (and o) biases, an MLP bias, Qwen3's
    per-head q/k RMSNorm (before RoPE), a head width other than dim / num_heads, a sliding window."""

    def __init__(self, config: LlamaConfig, index: int = 0) -> None:
        super().__init__()
        c = config
        self.num_heads = c.num_heads
        self.num_kv_heads = c.num_kv_heads
        self.head_dim = c.head_dim
        self.windowed = c.window(index) is not None
        self.attn_norm = RMSNorm(c.dim, c.norm_eps)
        self.q = nn.Linear(c.dim, c.q_dim, bias=c.qkv_bias)
        self.k = nn.Linear(c.dim, c.kv_dim, bias=c.qkv_bias)
        self.v = nn.Linear(c.dim, c.kv_dim, bias=c.qkv_bias)
        self.o = nn.Linear(c.q_dim, c.dim, bias=c.o_bias)
        self.q_norm = RMSNorm(c.head_dim, c.norm_eps) if c.qk_norm else None
        self.k_norm = RMSNorm(c.head_dim, c.norm_eps) if c.qk_norm else None
        self.mlp_norm = RMSNorm(c.dim, c.norm_eps)
        self.gate = nn.Linear(c.dim, c.ffn_dim, bias=c.mlp_bias)
        self.up = nn.Linear(c.dim, c.ffn_dim, bias=c.mlp_bias)
        self.down = nn.Linear(c.ffn_dim, c.dim, bias=c.mlp_bias)

    def forward(
        self, x: torch.Tensor, ctx: LlamaContext, adapters: BlockAdapters | None = None
    ) -> torch.Tensor:
        B, T, _ = x.shape
        h = self.attn_norm(x)
        q = project(self.q, "q", h, adapters).view(B, T, self.num_heads, self.head_dim)
        k = project(self.k, "k", h, adapters).view(B, T, self.num_kv_heads, self.head_dim)
        v = project(self.v, "v", h, adapters).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)  # per head, before RoPE (Qwen3)
        q = apply_rope(q.transpose(1, 2), ctx.rope)  # (B, H, T, hd)
        k = apply_rope(k.transpose(1, 2), ctx.rope)  # (B, KV, T, hd)
        if self.num_kv_heads != self.num_heads:
            # Expanding K/V ourselves keeps SDPA on its fused CPU kernel (enable_gqa falls back to math).
            rep = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        mask = ctx.window_mask if self.windowed else None
        if mask is None:
            att = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, hd)
        else:
            att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + project(self.o, "o", att.transpose(1, 2).reshape(B, T, -1), adapters)
        h = self.mlp_norm(x)
        act = F.silu(project(self.gate, "gate", h, adapters)) * project(self.up, "up", h, adapters)
        return x + project(self.down, "down", act, adapters)


class Llama(SplitLM):
    """Embedding, ``num_blocks`` :class:`LlamaBlock` s, final RMSNorm, LM head (tied or not)."""

    config: LlamaConfig

    def __init__(self, config: LlamaConfig, tokenizer: Tokenizer | None = None) -> None:
        super().__init__()
        self.family = "llama"
        self.config = config
        self.tokenizer = tokenizer
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.blocks = nn.ModuleList(LlamaBlock(config, i) for i in range(config.num_blocks))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.dim, config.vocab_size, bias=False)

    def init_weights(self, generator: torch.Generator) -> None:
        """Seeded random init (std 0.02 like HF Llama); norms stay at one."""
        with torch.no_grad():
            for name, p in self.named_parameters():
                if p.ndim == 2:
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
                elif "norm" not in name:
                    p.zero_()

    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        if inputs.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"Llama expects integer token ids (B, T), got {inputs.dtype}")
        hidden: torch.Tensor = self.embed_tokens(inputs)  # (B, T, C)
        return hidden

    def block_context(self, hidden: torch.Tensor) -> LlamaContext:
        T = hidden.shape[1]
        return LlamaContext(
            rope=rope_tables(self.config, T, hidden.dtype, hidden.device),
            window_mask=window_mask(T, self.config.sliding_window, hidden.device),
        )

    def head(self, hidden: torch.Tensor, head: nn.Module | None = None) -> torch.Tensor:
        h = self.norm(hidden)
        if head is not None:
            out: torch.Tensor = head(h)
            return out
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(h, weight)  # (B, T, V)

    def loss(self, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Next-token cross-entropy: position t predicts label t+1; -100 labels (padding) are ignored."""
        logits = outputs[:, :-1].reshape(-1, outputs.shape[-1]).float()
        return F.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)

    @torch.no_grad()
    def generate(self, ids: list[int], max_new_tokens: int, *, eos_id: int | None = None) -> list[int]:
        """Greedy continuation (recomputes the prefix each step; for checks, not serving)."""
        out = list(ids)
        for _ in range(max_new_tokens):
            logits = self(torch.tensor([out], dtype=torch.long))
            nxt = int(logits[0, -1].argmax())
            out.append(nxt)
            if eos_id is not None and nxt == eos_id:
                break
        return out[len(ids) :]
