"""What a server part accepts at the cut: checked before any compute, so nothing is half-applied.

A device's activations and labels arrive from the network. Anything a part cannot train on
(an integer tensor, a wrong hidden size, NaN, labels out of range or of the wrong shape) is a
:class:`ProtocolViolation` *before* the forward pass: otherwise torch raises mid-step, or, worse,
a NaN reaches the optimizer and corrupts the shared server part for every device.
"""

from __future__ import annotations

import torch

from sft_actors.errors import ProtocolViolation
from sft_actors.model import SplitLM
from sft_actors.model.config import LlamaConfig

IGNORE_INDEX = -100  # label of a position that has no target (padding, the last token)


def activation_bound(model: SplitLM, batch_size: int, seq_len: int) -> tuple[int, int, int]:
    """The largest activations (B, T, C) a device may send under a plan of ``batch_size``
    samples of ``seq_len`` tokens (a ViT: its token count; a Llama: capped by its context)."""
    cfg = model.config
    tokens = min(seq_len, cfg.max_seq_len) if isinstance(cfg, LlamaConfig) else cfg.num_tokens
    return (batch_size, tokens, cfg.dim)


def check_activations(model: SplitLM, hidden: torch.Tensor) -> None:
    """``hidden`` is (B, T, C) floating point and finite (its squared norm too), with C the
    model's width (and, for a ViT, T its token count; for a Llama, T within its context)."""
    cfg = model.config
    if not hidden.is_floating_point():
        raise ProtocolViolation(f"activations must be floating point, got {hidden.dtype}")
    if hidden.dim() != 3 or hidden.shape[-1] != cfg.dim or hidden.shape[0] < 1:
        raise ProtocolViolation(f"activations must be (B, T, {cfg.dim}), got {tuple(hidden.shape)}")
    tokens = hidden.shape[1]
    if isinstance(cfg, LlamaConfig):
        if not 1 <= tokens <= cfg.max_seq_len:
            raise ProtocolViolation(f"{tokens} tokens exceed the model's context of {cfg.max_seq_len}")
    elif tokens != cfg.num_tokens:
        raise ProtocolViolation(f"a ViT takes {cfg.num_tokens} tokens per image, got {tokens}")
    if not bool(torch.isfinite(hidden).all()):
        raise ProtocolViolation("activations contain NaN or inf")
    # Finite but so large that a norm over them overflows: no part can train on them (the
    # backward would overflow), and it is the sender's doing, not the run diverging.
    if not bool(torch.isfinite(hidden.double().square().sum(dim=-1).float()).all()):
        raise ProtocolViolation("activations are too large: their squared norm overflows float32")


def check_labels(model: SplitLM, hidden: torch.Tensor, labels: torch.Tensor) -> None:
    """Labels match the batch: token ids (B, T) in [0, vocab) or ``IGNORE_INDEX`` for a Llama,
    class ids (B,) in [0, num_classes) for a ViT."""
    cfg = model.config
    if labels.dtype != torch.int64:  # what the losses take (cross-entropy wants int64 targets)
        raise ProtocolViolation(f"labels must be int64, got {labels.dtype}")
    if isinstance(cfg, LlamaConfig):
        want, high, ignore = tuple(hidden.shape[:2]), cfg.vocab_size, IGNORE_INDEX
    else:
        want, high, ignore = (hidden.shape[0],), cfg.num_classes, None
    if tuple(labels.shape) != want:
        raise ProtocolViolation(f"labels must be {want} for these activations, got {tuple(labels.shape)}")
    valid = (labels >= 0) & (labels < high)
    if ignore is not None:
        valid |= labels == ignore
    if not bool(valid.all()):
        raise ProtocolViolation(
            f"labels outside [0, {high})" + (f" (and {ignore})" if ignore is not None else "")
        )
