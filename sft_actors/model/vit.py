"""A Vision Transformer written for splitting, with timm's module names (so timm weights load as-is).

Patch embedding (a strided conv), a CLS token, learned position embeddings, pre-LN blocks with
a fused qkv projection and a GELU MLP, a final LayerNorm and a linear head on the CLS token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sft_actors.model.base import SplitLM, project
from sft_actors.model.config import ViTConfig
from sft_actors.model.lora import BlockAdapters


class PatchEmbed(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(config.in_chans, config.dim, config.patch_size, stride=config.patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        patches: torch.Tensor = self.proj(images)  # (B, C, H/p, W/p)
        return patches.flatten(2).transpose(1, 2)  # (B, N, C)


class Attention(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.qkv = nn.Linear(config.dim, 3 * config.dim)
        self.proj = nn.Linear(config.dim, config.dim)

    def forward(self, x: torch.Tensor, adapters: BlockAdapters | None) -> torch.Tensor:
        B, T, C = x.shape
        qkv = project(self.qkv, "qkv", x, adapters).view(B, T, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, hd)
        att = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, hd)
        return project(self.proj, "proj", att.transpose(1, 2).reshape(B, T, C), adapters)


class Mlp(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.dim, config.mlp_dim)
        self.fc2 = nn.Linear(config.mlp_dim, config.dim)

    def forward(self, x: torch.Tensor, adapters: BlockAdapters | None) -> torch.Tensor:
        return project(self.fc2, "fc2", F.gelu(project(self.fc1, "fc1", x, adapters)), adapters)


class ViTBlock(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.dim, eps=config.norm_eps)
        self.attn = Attention(config)
        self.norm2 = nn.LayerNorm(config.dim, eps=config.norm_eps)
        self.mlp = Mlp(config)

    def forward(
        self, x: torch.Tensor, ctx: None = None, adapters: BlockAdapters | None = None
    ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), adapters)
        out: torch.Tensor = x + self.mlp(self.norm2(x), adapters)
        return out


class ViT(SplitLM):
    """Hidden states are (B, 1 + N, C): the CLS token first, then one token per patch."""

    config: ViTConfig

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.family = "vit"
        self.config = config
        self.tokenizer = None
        self.patch_embed = PatchEmbed(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_tokens, config.dim))
        self.blocks = nn.ModuleList(ViTBlock(config) for _ in range(config.num_blocks))
        self.norm = nn.LayerNorm(config.dim, eps=config.norm_eps)
        self.head_fc = nn.Linear(config.dim, config.num_classes)

    def init_weights(self, generator: torch.Generator) -> None:
        """Seeded random init (truncated-normal-like std 0.02, zero biases, unit norms)."""
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("bias"):
                    p.zero_()
                elif "norm" in name:
                    p.fill_(1.0)
                else:
                    p.copy_((torch.randn(p.shape, generator=generator) * 0.02).clamp_(-0.04, 0.04))

    def new_head(self, num_classes: int, generator: torch.Generator) -> nn.Linear:
        """A freshly initialised head for a new task (zero weights: starts at uniform predictions)."""
        head = nn.Linear(self.config.dim, num_classes)
        with torch.no_grad():
            head.weight.zero_()
            head.bias.zero_()
        return head.to(self.head_fc.weight.dtype)

    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        if inputs.ndim != 4:
            raise TypeError(f"ViT expects images (B, C, H, W), got shape {tuple(inputs.shape)}")
        x = self.patch_embed(inputs.to(self.pos_embed.dtype))  # (B, N, C)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        return torch.cat((cls, x), dim=1) + self.pos_embed  # (B, 1+N, C)

    def block_context(self, hidden: torch.Tensor) -> None:
        return None

    def head(self, hidden: torch.Tensor, head: nn.Module | None = None) -> torch.Tensor:
        cls = self.norm(hidden)[:, 0]  # (B, C)
        out: torch.Tensor = (head if head is not None else self.head_fc)(cls)
        return out  # (B, classes)

    def loss(self, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs.float(), labels)
