"""Topology files: where each actor runs and what the run trains (TOML → frozen dataclasses)."""

from sft_actors.topology.checks import ModelConfigHint, check_hosts, check_placement, topology_warnings
from sft_actors.topology.loader import load_topology, parse_topology
from sft_actors.topology.schema import (
    ADDRESSED_ROLES,
    CODED_MODES,
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
    "CODED_MODES",
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
    "check_hosts",
    "check_placement",
    "load_topology",
    "parse_topology",
    "topology_warnings",
]
