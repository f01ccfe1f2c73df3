"""A plain single-process LoRA fine-tune of the unsplit model: the yardstick for split runs.

With one device, no codec and ``max_inflight = 1``, split learning must reproduce this run's
losses and final adapters (to float tolerance): same batches, same initial adapters, AdamW over
all adapters (Adam is per-parameter, so one optimizer over the union equals the device's and
the server's optimizers side by side).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from sft_actors.model import Part


def reference_finetune(
    full: Part,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    lr: float,
    initial: Mapping[str, torch.Tensor] | None = None,
) -> list[float]:
    """Train ``full`` (a FullPart with LoRA) on ``batches``; returns the loss of every step."""
    from sft_actors.model import load_lora_state_dict

    if initial is not None:
        load_lora_state_dict(full, dict(initial), strict=False)
    params = [p for p in full.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    for inputs, labels in batches:
        loss = full.loss(full(inputs), labels)  # type: ignore[operator]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses
