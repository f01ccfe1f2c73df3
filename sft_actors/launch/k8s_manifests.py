"""Kubernetes objects for one run, as plain dicts (what ``kubectl apply`` reads): pure.

Per node (one per (host, role), see :mod:`.k8s_topology`): a **Job** whose pod runs
``python -m sft_actors.node_process --role R --topology /etc/sft/topology.toml --host H
--transport tcp --log-format json`` in ``/work``; a **Service** for a node of addressed actors;
with ``mode = "curve"`` a **Secret** holding only that node's actors' secret keys. Per run: the
**ConfigMap** of the topology, the ConfigMap of every actor's public key, a **NetworkPolicy**
letting only the run's own pods in, and (applied on its own, so that deleting the run keeps
it) the **PersistentVolumeClaim** of ``[run.output] dir``, mounted in the coordinator's pod.

Lifecycle choices, each a consequence of what the actors do:

- Every pod has ``restartPolicy: Never``; the Job decides about a new pod. The coordinator's
  Job never retries (``backoffLimit: 0``): a new coordinator would start a new run, not continue
  this one — continue with ``--resume RUN_DIR`` instead. A server's or a device's Job retries
  (``backoffLimit``, default 3): a new server is restored from the coordinator's checkpoint, a
  new device rejoins. Its ``podFailurePolicy`` fails the Job at once on exit code 2 (a
  configuration error does not fix itself) and 130 (the run was interrupted), and does not
  count a pod lost to a disruption (eviction, preemption).
- Probes: the node has no HTTP endpoint. An addressed actor's ROUTER accepts TCP connections
  once it is bound, which happens before it dials anyone, so a ``tcpSocket`` probe on its port
  is its readiness (a startup probe gives the interpreter and the topology checks five minutes
  before). A bare TCP connect never reaches CURVE's handshake, so it is harmless and unlogged.
  Liveness is the same port, slowly: it catches a node that closed its socket and did not
  exit (a shutdown that hangs), never a stuck event loop — zmq's I/O thread accepts
  connections on its own; the actors' heartbeats catch that. Devices listen on nothing and
  get no probe: a device whose peers fall silent gives up after ``rejoin_timeout_s`` and exits.
- Keys: the Secret and the public keys are projected into a staging directory; an init
  container copies them, under ``umask 077``, into a memory-backed directory at the
  topology's ``[run.security] keys`` path, owned by the node's user with mode 0400 — Kubernetes
  would otherwise leave them group-readable (fsGroup), which the node refuses for secret keys.
"""

from __future__ import annotations

import base64
import math
import shlex

from sft_actors.launch.k8s_options import (
    CONTAINER,
    GPU_RESOURCE,
    KEY_STAGING,
    TOPOLOGY_DIR,
    TOPOLOGY_KEY,
    UID,
    WORKDIR,
    Doc,
    K8sOptions,
    KeyFiles,
    Names,
    in_workdir,
)
from sft_actors.launch.k8s_topology import ClusterNode, data_key
from sft_actors.launch.placement import node_argv
from sft_actors.launch.procs import LaunchConfigError
from sft_actors.security import PUBLIC_SUFFIX, SECRET_SUFFIX
from sft_actors.topology import Topology

#: Seconds the interpreter, torch and the topology checks get before the port must be open.
STARTUP_BUDGET_S = 300
_STARTUP_PERIOD_S = 5
_LIVENESS_PERIOD_S = 20
#: Past ``2 × drain_timeout_s``: what a polite stop (SIGTERM) may take before SIGKILL.
STOP_MARGIN_S = 30


# --- per run -------------------------------------------------------------------------------


def namespace(names: Names) -> Doc:
    assert names.namespace is not None
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": names.namespace}}


def topology_config_map(names: Names, text: str) -> Doc:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": names.meta(names.topology),
        "data": {TOPOLOGY_KEY: text},
    }


def public_keys_config_map(names: Names, keys: KeyFiles) -> Doc:
    """Every actor's public key: not secret, so a ConfigMap (the secret ones never are)."""
    data = {data_key(a + PUBLIC_SUFFIX): key.decode("ascii") for a, key in keys.publics.items()}
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": names.meta(names.public_keys), "data": data}


def node_secret(names: Names, node: ClusterNode, keys: KeyFiles) -> Doc:
    """The secret keys of ``node``'s own actors, and no other actor's."""
    data = {
        data_key(a + SECRET_SUFFIX): base64.b64encode(keys.secrets[a]).decode("ascii") for a in node.actors
    }
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": names.meta(names.secret(node), role=node.role, node=node.name),
        "type": "Opaque",
        "data": data,
    }


def service(names: Names, node: ClusterNode) -> Doc:
    """The node's stable address: its ports, routed to its pod once the ROUTER is bound."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": names.meta(node.name, role=node.role, node=node.name),
        "spec": {
            "type": "ClusterIP",
            "selector": names.labels(node=node.name),
            "ports": [
                {"name": _port_name(p), "port": p, "targetPort": p, "protocol": "TCP"} for p in node.ports
            ],
        },
    }


def network_policy(names: Names) -> Doc:
    """Only the run's own pods may connect to its pods (where the network plugin enforces
    NetworkPolicy; the kubelet's probes come from the node, which is always let in)."""
    pods = {"matchLabels": names.labels()}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": names.meta(names.run),
        "spec": {
            "podSelector": pods,
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": pods}]}],
        },
    }


def output_claim(names: Names, opts: K8sOptions) -> Doc:
    spec: Doc = {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": opts.output_size}}}
    if opts.storage_class is not None:
        spec["storageClassName"] = opts.storage_class
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": names.meta(names.output),
        "spec": spec,
    }


def results_pod(names: Names, topo: Topology, opts: K8sOptions) -> Doc:
    """A pod that only holds the output claim, read-only, for ``kubectl cp`` (an hour at most)."""
    output = in_workdir(topo.run.output.dir)
    container = {
        "name": "results",
        "image": opts.image,
        "imagePullPolicy": opts.image_pull_policy,
        "command": ["sleep", "infinity"],
        "workingDir": WORKDIR,
        "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "64Mi"}},
        "securityContext": _container_security(),
        "volumeMounts": [{"name": "output", "mountPath": output, "readOnly": True}],
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": names.meta(names.results, role="results"),
        "spec": {
            **_pod_basics(),
            "activeDeadlineSeconds": 3600,
            "terminationGracePeriodSeconds": 1,
            "containers": [container],
            "volumes": [
                {"name": "output", "persistentVolumeClaim": {"claimName": names.output, "readOnly": True}}
            ],
        },
    }


# --- per node ------------------------------------------------------------------------------


def job(names: Names, topo: Topology, node: ClusterNode, opts: K8sOptions, *, curve: bool) -> Doc:
    """The Job of one node: its pod, probes, mounts and restart rules (see the module doc)."""
    res = opts.resources[node.role]
    image = (opts.server_image or opts.image) if node.role == "server" else opts.image
    gpu = opts.server_gpu and node.role == "server"
    argv = node_argv(
        "python", f"{TOPOLOGY_DIR}/{TOPOLOGY_KEY}", node.role, node.cluster_host, threads=res.threads
    )
    if opts.resume is not None and node.role == "coordinator":
        argv += ["--resume", opts.resume]
    limits = {"memory": res.memory, **({GPU_RESOURCE: "1"} if gpu else {})}
    volumes, mounts, init = _storage(names, topo, node, opts, curve=curve, image=image)
    container: Doc = {
        "name": CONTAINER,
        "image": image,
        "imagePullPolicy": opts.image_pull_policy,
        "command": argv[:3],
        "args": argv[3:],
        "workingDir": WORKDIR,
        "resources": {"requests": {"cpu": res.cpu, "memory": res.memory}, "limits": limits},
        "securityContext": _container_security(),
        "volumeMounts": mounts,
    }
    if node.ports:
        container["ports"] = [
            {"name": _port_name(p), "containerPort": p, "protocol": "TCP"} for p in node.ports
        ]
        container.update(_probes(topo, node.ports[0]))
    pod: Doc = {
        **_pod_basics(),
        "terminationGracePeriodSeconds": grace_s(topo),
        **({"initContainers": init} if init else {}),
        "containers": [container],
        "volumes": volumes,
    }
    if gpu:  # GPU nodes are often tainted so that only pods asking for a GPU land there
        pod["tolerations"] = [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]
    spec: Doc = {"backoffLimit": 0 if node.role == "coordinator" else opts.retries}
    if node.role != "coordinator":
        spec["podReplacementPolicy"] = "Failed"  # never two pods of one node at once
        spec["podFailurePolicy"] = {
            "rules": [
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
                {
                    "action": "FailJob",
                    "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": [2, 130]},
                },
            ]
        }
    spec["template"] = {"metadata": {"labels": names.labels(role=node.role, node=node.name)}, "spec": pod}
    meta = names.meta(node.name, role=node.role, node=node.name)
    meta["annotations"] = {"sft-actors/host": node.host, "sft-actors/actors": ",".join(node.actors)}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": spec}


def grace_s(topo: Topology) -> int:
    """SIGTERM to SIGKILL: a polite stop (checkpoint, SHUTDOWN, drain) with room to spare."""
    return max(STOP_MARGIN_S, math.ceil(2 * topo.run.runtime.drain_timeout_s + STOP_MARGIN_S))


def _probes(topo: Topology, port: int) -> Doc:
    tcp = {"tcpSocket": {"port": port}, "timeoutSeconds": 5}
    # Liveness never fires within a polite stop: its window outlasts the grace period.
    liveness_failures = max(3, math.ceil(grace_s(topo) / _LIVENESS_PERIOD_S))
    return {
        "startupProbe": {
            **tcp,
            "periodSeconds": _STARTUP_PERIOD_S,
            "failureThreshold": STARTUP_BUDGET_S // _STARTUP_PERIOD_S,
        },
        "readinessProbe": {**tcp, "periodSeconds": 5, "failureThreshold": 2},
        "livenessProbe": {**tcp, "periodSeconds": _LIVENESS_PERIOD_S, "failureThreshold": liveness_failures},
    }


def _storage(
    names: Names, topo: Topology, node: ClusterNode, opts: K8sOptions, *, curve: bool, image: str
) -> tuple[list[Doc], list[Doc], list[Doc]]:
    """The pod's volumes, the node container's mounts, and the key-copying init container."""
    volumes: list[Doc] = [
        {
            "name": "topology",
            "configMap": {"name": names.topology, "items": [{"key": TOPOLOGY_KEY, "path": TOPOLOGY_KEY}]},
        }
    ]
    mounts: list[Doc] = [{"name": "topology", "mountPath": TOPOLOGY_DIR, "readOnly": True}]
    init: list[Doc] = []
    if curve:
        keys = in_workdir(topo.run.security.keys)
        volumes.append(
            {
                "name": "key-staging",
                "projected": {
                    "defaultMode": 0o440,
                    "sources": [
                        {"configMap": {"name": names.public_keys}},
                        {"secret": {"name": names.secret(node)}},
                    ],
                },
            }
        )
        volumes.append({"name": "keys", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}})
        mounts.append({"name": "keys", "mountPath": keys, "readOnly": True})
        src, dest = shlex.quote(KEY_STAGING), shlex.quote(keys)
        init.append(
            {
                "name": "keys",
                "image": image,
                "imagePullPolicy": opts.image_pull_policy,
                "command": [
                    "sh",
                    "-c",
                    f"umask 077 && cp {src}/*{PUBLIC_SUFFIX} {src}/*{SECRET_SUFFIX} {dest}/",
                ],
                "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "64Mi"}},
                "securityContext": _container_security(),
                "volumeMounts": [
                    {"name": "key-staging", "mountPath": KEY_STAGING, "readOnly": True},
                    {"name": "keys", "mountPath": keys},
                ],
            }
        )
    if node.role == "coordinator":  # the run directory: summary, adapters, checkpoints
        volumes.append({"name": "output", "persistentVolumeClaim": {"claimName": names.output}})
        mounts.append({"name": "output", "mountPath": in_workdir(topo.run.output.dir)})
    for i, v in enumerate(opts.volumes):
        volumes.append(
            {"name": f"volume-{i}", "persistentVolumeClaim": {"claimName": v.claim, "readOnly": True}}
        )
        mounts.append({"name": f"volume-{i}", "mountPath": in_workdir(v.path), "readOnly": True})
    paths = [m["mountPath"] for m in mounts] + [KEY_STAGING]
    if len(set(paths)) != len(paths) or WORKDIR in paths:
        dup = next(p for p in paths if paths.count(p) > 1 or p == WORKDIR)
        raise LaunchConfigError(
            f"two volumes would be mounted at {dup} (the topology's topology, keys and output "
            "directories and every --volume need their own path, below /work)"
        )
    return volumes, mounts, init


def _pod_basics() -> Doc:
    return {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,  # the nodes never talk to the API server
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": UID,
            "runAsGroup": UID,
            "fsGroup": UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }


def _container_security() -> Doc:
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def _port_name(port: int) -> str:
    return f"zmq-{port}"


def kustomization(resources: list[str]) -> Doc:
    return {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": resources}


__all__ = [
    "grace_s",
    "job",
    "kustomization",
    "namespace",
    "network_policy",
    "node_secret",
    "output_claim",
    "public_keys_config_map",
    "results_pod",
    "service",
    "topology_config_map",
]
