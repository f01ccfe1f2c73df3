"""Seeded random planning problems, for the benchmark and the tests.

Devices are drawn from ranges typical of phones and edge boards sharing one cell: memory
``memory_mb`` (MB), sustained ``flops`` (FLOP/s), ``distance_m`` from the access point and
transmit power (dBm). The same seed gives the same problem.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from sft_actors.plan.channel import ChannelConfig, DeviceProfile, ServerProfile
from sft_actors.plan.compression import build_menu
from sft_actors.plan.costs import ModelCosts, TrainingShape
from sft_actors.plan.model import PlanProblem


def random_devices(
    n: int,
    seed: int,
    *,
    memory_mb: tuple[float, float] = (400.0, 2000.0),
    flops: tuple[float, float] = (5e9, 5e10),
    distance_m: tuple[float, float] = (20.0, 300.0),
    tx_power_dbm: tuple[float, float] = (15.0, 23.0),
) -> tuple[DeviceProfile, ...]:
    """``n`` devices with log-uniform memory and FLOP/s, uniform distance and power."""
    rng = np.random.default_rng(seed)

    def log_uniform(lo: float, hi: float) -> float:
        return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))

    return tuple(
        DeviceProfile(
            name=f"dev{i}",
            memory_mb=log_uniform(*memory_mb),
            flops=log_uniform(*flops),
            distance_m=float(rng.uniform(*distance_m)),
            tx_power_dbm=float(rng.uniform(*tx_power_dbm)),
            data_weight=float(rng.uniform(0.5, 1.5)),
        )
        for i in range(n)
    )


def random_problem(
    n: int,
    seed: int,
    *,
    model: str | ModelCosts = "smollm2-135m",
    codecs: Sequence[str] | None = None,
    max_device_blocks: int | None = None,
    training: TrainingShape | None = None,
    server_flops: float = 2e12,
    bandwidth_hz: float = 20e6,
    memory_mb: tuple[float, float] = (400.0, 2000.0),
    device_flops: tuple[float, float] = (5e9, 5e10),
) -> PlanProblem:
    """A random problem; ``max_device_blocks`` bounds the cut range (keeps exhaustive search small)."""
    costs = model if isinstance(model, ModelCosts) else ModelCosts.known(model)
    shape = training or TrainingShape(batch=8, seq=min(costs.default_seq, 256), rounds_base=100.0)
    if max_device_blocks is not None:
        shape = dataclasses.replace(shape, min_server_blocks=costs.num_blocks - max_device_blocks)
    return PlanProblem(
        model=costs,
        training=shape,
        devices=random_devices(n, seed, memory_mb=memory_mb, flops=device_flops),
        server=ServerProfile(flops=server_flops, tx_power_dbm=30.0),
        channel=ChannelConfig(bandwidth_hz=bandwidth_hz),
        menu=build_menu(names=codecs, basis=shape.accuracy_basis),
    )
