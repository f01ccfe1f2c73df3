"""Topology files: where each actor runs and what the run trains (TOML → frozen dataclasses)."""

from sft_actors.topology.loader import KNOWN_NUM_BLOCKS, default_num_blocks, load_topology, parse_topology
from sft_actors.topology.schema import (
    ADDRESSED_ROLES,
    ROLES,
    ActorSpec,
    CodecConfig,
    DataConfig,
    DeviceProfile,
    HostSpec,
    LinkProfile,
    LoraConfig,
    OutputConfig,
    Role,
    RunConfig,
    RuntimeConfig,
    Topology,
    TrainConfig,
)

__all__ = [
    "ADDRESSED_ROLES",
    "KNOWN_NUM_BLOCKS",
    "ROLES",
    "ActorSpec",
    "CodecConfig",
    "DataConfig",
    "DeviceProfile",
    "HostSpec",
    "LinkProfile",
    "LoraConfig",
    "OutputConfig",
    "Role",
    "RunConfig",
    "RuntimeConfig",
    "Topology",
    "TrainConfig",
    "default_num_blocks",
    "load_topology",
    "parse_topology",
]
