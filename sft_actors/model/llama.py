"""A Llama-family decoder written for splitting: RMSNorm, RoPE, SwiGLU, grouped-query attention.

Numerics follow Hugging Face's ``LlamaForCausalLM`` (RoPE in the rotate-half layout, norms
computed in fp32), so HF checkpoints load unchanged and GGUF checkpoints load after their Q/K
rows are un-permuted (``gguf_loader``). Batches are right-padded: with causal attention, pads
never influence real tokens, so no attention mask is needed; positions are ``0..T-1``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sft_actors.model.base import SplitLM, project
from sft_actors.model.config import LlamaConfig
from sft_actors.model.lora import BlockAdapters
from sft_actors.model.tokenizer import Tokenizer

IGNORE_INDEX = -100

Rope = tuple[torch.Tensor, torch.Tensor]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 then cast back before the weight, as HF does (matters in bf16).
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return normed * self.weight


def rope_tables(config: LlamaConfig, seq_len: int, dtype: torch.dtype, device: torch.device) -> Rope:
    """cos/sin tables (T, head_dim) in the rotate-half layout."""
    hd = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32, device=device) / hd))
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)  # (T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    cos, sin = rope  # (T, hd), broadcast over (B, H, T, hd)
    return x * cos + _rotate_half(x) * sin


class LlamaBlock(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        c = config
        self.num_heads = c.num_heads
        self.num_kv_heads = c.num_kv_heads
        self.head_dim = c.head_dim
        self.attn_norm = RMSNorm(c.dim, c.norm_eps)
        self.q = nn.Linear(c.dim, c.dim, bias=False)
        self.k = nn.Linear(c.dim, c.kv_dim, bias=False)
        self.v = nn.Linear(c.dim, c.kv_dim, bias=False)
        self.o = nn.Linear(c.dim, c.dim, bias=False)
        self.mlp_norm = RMSNorm(c.dim, c.norm_eps)
        self.gate = nn.Linear(c.dim, c.ffn_dim, bias=False)
        self.up = nn.Linear(c.dim, c.ffn_dim, bias=False)
        self.down = nn.Linear(c.ffn_dim, c.dim, bias=False)

    def forward(self, x: torch.Tensor, rope: Rope, adapters: BlockAdapters | None = None) -> torch.Tensor:
        B, T, C = x.shape
        h = self.attn_norm(x)
        q = project(self.q, "q", h, adapters).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = project(self.k, "k", h, adapters).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = project(self.v, "v", h, adapters).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, rope), apply_rope(k, rope)  # (B, H, T, hd), (B, KV, T, hd)
        if self.num_kv_heads != self.num_heads:
            # Expanding K/V ourselves keeps SDPA on its fused CPU kernel (enable_gqa falls back to math).
            rep = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, hd)
        x = x + project(self.o, "o", att.transpose(1, 2).reshape(B, T, C), adapters)
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
        self.blocks = nn.ModuleList(LlamaBlock(config) for _ in range(config.num_blocks))
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

    def block_context(self, hidden: torch.Tensor) -> Rope:
        return rope_tables(self.config, hidden.shape[1], hidden.dtype, hidden.device)

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
