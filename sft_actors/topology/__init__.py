"""Topology files: where each actor runs and what the run trains (TOML → frozen dataclasses)."""

from sft_actors.topology.loader import ModelConfigHint, load_topology, parse_topology
from sft_actors.topology.schema import (
    ADDRESSED_ROLES,
    ROLES,
    ActorSpec,
    DataConfig,
    DeviceHardware,
    HostSpec,
    LinkProfile,
    OutputConfig,
    Role,
    RunConfig,
    RuntimeConfig,
    Topology,
    TrainConfig,
)

__all__ = [
    "ADDRESSED_ROLES",
    "ROLES",
    "ActorSpec",
    "DataConfig",
    "DeviceHardware",
    "HostSpec",
    "LinkProfile",
    "ModelConfigHint",
    "OutputConfig",
    "Role",
    "RunConfig",
    "RuntimeConfig",
    "Topology",
    "TrainConfig",
    "load_topology",
    "parse_topology",
]
