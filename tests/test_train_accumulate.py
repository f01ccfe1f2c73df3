"""per_round accumulation: the same micro-batches give the same update in any arrival order."""

from __future__ import annotations

import pytest
import torch

from sft_actors.errors import ProtocolViolation
from sft_actors.train.accumulate import OrderedGradients, order_key


def test_sum_is_bitwise_independent_of_arrival_order() -> None:
    gen = torch.Generator().manual_seed(0)
    # Values of very different magnitude: float addition is not associative on these.
    grads = {
        order_key(d, s): torch.randn(64, generator=gen) * 10.0 ** (3 * (s % 3) - 3)
        for d in range(3)
        for s in range(4)
    }
    params = {"w": torch.nn.Parameter(torch.zeros(64))}
    results = []
    for keys in (sorted(grads), sorted(grads, reverse=True), sorted(grads, key=lambda k: (k * 7919) % 13)):
        acc = OrderedGradients()
        for k in keys:
            acc.add(k, {"w": grads[k], "unused": None})
        assert acc.apply_mean(params, divisor=24) == 12 and len(acc) == 0
        assert params["w"].grad is not None
        results.append(params["w"].grad.clone())
    naive = sum(grads[k] for k in sorted(grads, reverse=True)) / 24
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])
    torch.testing.assert_close(results[0], naive)  # the same mean, up to rounding


def test_parameters_no_micro_batch_reached_get_no_gradient() -> None:
    acc = OrderedGradients()
    acc.add(order_key(0, 0), {"a": torch.ones(2), "b": None})
    params = {"a": torch.nn.Parameter(torch.zeros(2)), "b": torch.nn.Parameter(torch.zeros(2))}
    assert acc.apply_mean(params, divisor=0) == 1  # divisor below the count: the count wins
    assert params["a"].grad is not None and params["a"].grad.tolist() == [1.0, 1.0]
    assert params["b"].grad is None


def test_keys_order_devices_then_steps_and_refuse_repeats() -> None:
    assert order_key(0, 5) < order_key(1, 0) < order_key(1, 1)
    with pytest.raises(ProtocolViolation, match="outside"):
        order_key(0, -1)
    acc = OrderedGradients()
    acc.add(3, {"a": torch.ones(1)})
    with pytest.raises(ProtocolViolation, match="already accumulated"):
        acc.add(3, {"a": torch.ones(1)})
