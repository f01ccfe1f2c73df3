"""What ``sft launch --backend k8s`` may be asked (image, namespace, resources, volumes…), the
layout of the image the pods run, and the names and labels of a run's objects."""

from __future__ import annotations

import math
import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from sft_actors.launch.k8s_topology import ClusterNode, dns_label
from sft_actors.launch.procs import LaunchConfigError
from sft_actors.topology import Topology

Doc = dict[str, Any]

DEFAULT_IMAGE = "sft-actors:0.1.0"
#: The image's WORKDIR: relative paths of the topology (keys, output) are under it.
WORKDIR = "/work"
#: The image's user (``deploy/docker/Dockerfile``): numeric, so ``runAsNonRoot`` can check it.
UID = 10001
TOPOLOGY_DIR = "/etc/sft"
TOPOLOGY_KEY = "topology.toml"
KEY_STAGING = "/var/run/sft-keys"
CONTAINER = "node"
GPU_RESOURCE = "nvidia.com/gpu"

APP = "app.kubernetes.io/name"
INSTANCE = "app.kubernetes.io/instance"
COMPONENT = "app.kubernetes.io/component"
NODE = "sft-actors/node"

_QUANTITY = re.compile(r"(\d+(\.\d+)?|\.\d+)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


@dataclass(frozen=True, kw_only=True, slots=True)
class Resources:
    """A node container's CPU request (no limit: a throttled node misses heartbeats) and memory
    request and limit (equal: the run never depends on memory it may lose)."""

    cpu: str
    memory: str

    def __post_init__(self) -> None:
        for what, value in (("cpu", self.cpu), ("memory", self.memory)):
            if not _QUANTITY.fullmatch(value):
                raise LaunchConfigError(f"{what} {value!r} is not a Kubernetes quantity (e.g. 500m, 2, 4Gi)")

    @property
    def threads(self) -> int:
        """Torch threads for the node: its CPU request, rounded up (the machine's core count
        would oversubscribe a shared node)."""
        cores = float(self.cpu[:-1]) / 1000 if self.cpu.endswith("m") else float(self.cpu)
        return max(1, math.ceil(cores))


DEFAULT_RESOURCES: Mapping[str, Resources] = MappingProxyType(
    {
        "coordinator": Resources(cpu="500m", memory="1Gi"),
        "server": Resources(cpu="2", memory="4Gi"),
        "device": Resources(cpu="1", memory="2Gi"),
    }
)


@dataclass(frozen=True, kw_only=True, slots=True)
class Volume:
    """An existing PersistentVolumeClaim mounted read-only in every pod (weights, datasets)."""

    claim: str
    path: str


@dataclass(frozen=True, kw_only=True, slots=True)
class K8sOptions:
    image: str = DEFAULT_IMAGE
    #: The servers' image (e.g. the CUDA build); None: ``image``.
    server_image: str | None = None
    namespace: str | None = None
    #: ``nvidia.com/gpu: 1`` for every server pod.
    server_gpu: bool = False
    resources: Mapping[str, Resources] = field(default_factory=lambda: dict(DEFAULT_RESOURCES))
    #: Accept ``mode = "none"`` (writes ``allow_insecure = true`` into the cluster topology).
    allow_insecure: bool = False
    #: New pods a server's or a device's Job may start after failures.
    retries: int = 3
    output_size: str = "10Gi"
    storage_class: str | None = None
    #: ``--resume RUN_DIR`` for the coordinator (relative to /work: under the output dir).
    resume: str | None = None
    volumes: tuple[Volume, ...] = ()
    image_pull_policy: str = "IfNotPresent"

    def __post_init__(self) -> None:
        for what, image in (("image", self.image), ("server image", self.server_image or self.image)):
            if not image or any(c.isspace() for c in image):
                raise LaunchConfigError(f"{what} {image!r} is not an image reference")
        if self.namespace is not None and not dns_label(self.namespace) == self.namespace:
            raise LaunchConfigError(
                f"namespace {self.namespace!r} is not a DNS label (lowercase letters, digits, '-')"
            )
        if self.retries < 0:
            raise LaunchConfigError(f"retries must be 0 or more, got {self.retries}")
        if not _QUANTITY.fullmatch(self.output_size):
            raise LaunchConfigError(f"output size {self.output_size!r} is not a quantity (e.g. 10Gi)")
        if self.image_pull_policy not in ("Always", "IfNotPresent", "Never"):
            raise LaunchConfigError(
                f"image pull policy {self.image_pull_policy!r}: use Always, IfNotPresent or Never"
            )
        for v in self.volumes:
            if not _DNS_SUBDOMAIN.fullmatch(v.claim):
                raise LaunchConfigError(f"volume claim {v.claim!r} is not a Kubernetes object name")


@dataclass(frozen=True, kw_only=True, slots=True)
class KeyFiles:
    """The bytes of every ``<actor>.key`` and ``<actor>.key_secret`` (read and checked elsewhere)."""

    publics: Mapping[str, bytes]
    secrets: Mapping[str, bytes]


def in_workdir(path: str) -> str:
    """A topology path as the pod sees it: relative ones under :data:`WORKDIR`."""
    return posixpath.normpath(posixpath.join(WORKDIR, path))


class Names:
    """The names of a run's objects, and how to label and place them."""

    def __init__(self, topo: Topology, opts: K8sOptions) -> None:
        self.run = dns_label(topo.run.name)
        self.namespace = opts.namespace
        self.topology = dns_label(topo.run.name, "topology")
        self.public_keys = dns_label(topo.run.name, "public-keys")
        self.output = dns_label(topo.run.name, "output")
        self.results = dns_label(topo.run.name, "results")

    def secret(self, node: ClusterNode) -> str:
        return dns_label(node.name, "keys")

    def labels(self, role: str | None = None, node: str | None = None) -> dict[str, str]:
        out = {APP: "sft-actors", INSTANCE: self.run}
        if role is not None:
            out[COMPONENT] = role
        if node is not None:
            out[NODE] = node
        return out

    def meta(self, name: str, **labels: str | None) -> Doc:
        out: Doc = {"name": name}
        if self.namespace is not None:
            out["namespace"] = self.namespace
        out["labels"] = self.labels(**labels)
        return out


__all__ = [
    "APP",
    "COMPONENT",
    "CONTAINER",
    "DEFAULT_IMAGE",
    "DEFAULT_RESOURCES",
    "GPU_RESOURCE",
    "INSTANCE",
    "KEY_STAGING",
    "NODE",
    "TOPOLOGY_DIR",
    "TOPOLOGY_KEY",
    "UID",
    "WORKDIR",
    "Doc",
    "K8sOptions",
    "KeyFiles",
    "Names",
    "Resources",
    "Volume",
    "in_workdir",
]
