"""``sft launch --backend k8s``: manifests checked against the Kubernetes API's own models.

Every generated document is read back from disk and deserialized into the official client's
model of its kind (``kubernetes.client``, pydantic models with strict types: a missing
required field or a wrong type fails), then serialized again and compared with what was read:
the deserializer drops unknown keys, so a misspelt field shows up as a difference. Names,
labels and ports are checked against the API server's own rules, which the models only
describe. Nothing here talks to a cluster; neither do the container files checked at the end
(``deploy/docker``), which are parsed, not built.
"""

from __future__ import annotations

import base64
import dataclasses
import re
import stat
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client import ApiClient

from sft_actors.actors.env import topology_schema_hash
from sft_actors.errors import KeyFileError
from sft_actors.launch import k8s
from sft_actors.launch.k8s_options import K8sOptions, Resources, Volume
from sft_actors.launch.k8s_topology import dns_label, dumps_toml
from sft_actors.launch.procs import LaunchConfigError
from sft_actors.security import generate_keys
from sft_actors.topology import load_topology

ROOT = Path(__file__).resolve().parent.parent
LAB = ROOT / "topologies" / "lab.toml"
TINY = ROOT / "topologies" / "tiny.toml"
DOCKER = ROOT / "deploy" / "docker"

MODELS = {
    ("v1", "Namespace"): "V1Namespace",
    ("v1", "ConfigMap"): "V1ConfigMap",
    ("v1", "Secret"): "V1Secret",
    ("v1", "Service"): "V1Service",
    ("v1", "PersistentVolumeClaim"): "V1PersistentVolumeClaim",
    ("v1", "Pod"): "V1Pod",
    ("batch/v1", "Job"): "V1Job",
    ("networking.k8s.io/v1", "NetworkPolicy"): "V1NetworkPolicy",
}
DNS_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")  # DNS-1035: Services, and all our names
LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
PORT_NAME = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?")


def validate(doc: dict[str, Any]) -> Any:
    """``doc`` as the model of its kind; fails on a missing, mistyped or unknown field."""
    model = MODELS[(doc["apiVersion"], doc["kind"])]
    client = ApiClient()
    obj = client._ApiClient__deserialize(doc, model)  # type: ignore[attr-defined]
    assert client.sanitize_for_serialization(obj) == doc, (
        f"{doc['kind']} {doc['metadata']['name']}: unknown fields"
    )
    meta = doc["metadata"]
    assert DNS_LABEL.fullmatch(meta["name"]) and len(meta["name"]) <= 63, meta["name"]
    for key, value in meta.get("labels", {}).items():
        assert LABEL_VALUE.fullmatch(value) and len(value) <= 63, (key, value)
    for container in _containers(doc):
        for port in container.get("ports", []):
            assert 1 <= port["containerPort"] <= 65535
            assert PORT_NAME.fullmatch(port["name"]) and len(port["name"]) <= 15
    if doc["kind"] == "Job":
        spec = doc["spec"]
        assert spec["template"]["spec"]["restartPolicy"] == "Never"  # podFailurePolicy needs it
    return obj


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    pod = {"Job": lambda d: d["spec"]["template"]["spec"], "Pod": lambda d: d["spec"]}.get(doc["kind"])
    if pod is None:
        return []
    spec = pod(doc)
    return [*spec.get("initContainers", []), *spec["containers"]]


def read_out(out: Path) -> dict[str, list[dict[str, Any]]]:
    """Every YAML file under ``out`` (relative path → documents), as written."""
    return {
        str(p.relative_to(out)): list(yaml.safe_load_all(p.read_text(encoding="utf-8")))
        for p in sorted(out.rglob("*.yaml"))
    }


def docs_of(files: dict[str, list[dict[str, Any]]], kind: str) -> list[dict[str, Any]]:
    return [d for docs in files.values() for d in docs if d["kind"] == kind]


@pytest.fixture
def lab_keys(tmp_path: Path) -> Path:
    keys = tmp_path / "keys"
    generate_keys(load_topology(LAB, roles=(), log_warnings=False), keys)
    return keys


def write_lab(tmp_path: Path, keys: Path, **kwargs: Any) -> dict[str, list[dict[str, Any]]]:
    out = tmp_path / "out"
    k8s.write_manifests(LAB, out, keys=keys, **kwargs)
    return read_out(out)


# --- the API schema -------------------------------------------------------------------------


@pytest.mark.parametrize("namespace", [None, "sft-lab"])
def test_lab_manifests_validate(tmp_path: Path, lab_keys: Path, namespace: str | None) -> None:
    files = write_lab(tmp_path, lab_keys, namespace=namespace, server_gpu=True)
    kinds = sorted(d["kind"] for docs in files.values() for d in docs)
    assert kinds.count("Job") == 4 and kinds.count("Service") == 2 and kinds.count("Secret") == 4
    assert ("Namespace" in kinds) == (namespace is not None)
    for docs in files.values():
        for doc in docs:
            if doc["kind"] == "Kustomization":
                continue
            validate(doc)
            assert doc["metadata"].get("namespace") == (None if doc["kind"] == "Namespace" else namespace)
    kustomization = files["kustomization.yaml"][0]
    listed = set(kustomization["resources"])
    assert listed == set(files) - {"kustomization.yaml", "output-claim.yaml", "results-pod.yaml"}


def test_tiny_manifests_validate(tmp_path: Path) -> None:
    out = tmp_path / "out"
    k8s.write_manifests(TINY, out, allow_insecure=True)
    files = read_out(out)
    for docs in files.values():
        for doc in docs:
            if doc["kind"] != "Kustomization":
                validate(doc)
    jobs = {j["metadata"]["name"] for j in docs_of(files, "Job")}
    assert jobs == {"tiny-localhost-coordinator", "tiny-localhost-server", "tiny-localhost-device"}
    assert not docs_of(files, "Secret") and "configmap-public-keys.yaml" not in files


def test_validator_catches_a_misspelt_field(tmp_path: Path) -> None:
    out = tmp_path / "out"
    k8s.write_manifests(TINY, out, allow_insecure=True)
    job = read_out(out)["jobs/localhost-server.yaml"][0]
    job["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {"periodSeconds": 5}
    with pytest.raises(AssertionError, match="unknown fields"):
        validate(job)
    job = read_out(out)["jobs/localhost-server.yaml"][0]
    job["spec"]["backoffLimit"] = "3"
    with pytest.raises(ValueError):
        validate(job)


# --- the topology the pods read --------------------------------------------------------------


def test_cluster_topology_loads_and_names_the_services(tmp_path: Path, lab_keys: Path) -> None:
    files = write_lab(tmp_path, lab_keys, namespace="sft")
    text = files["configmap-topology.yaml"][0]["data"]["topology.toml"]
    path = tmp_path / "cluster.toml"
    path.write_text(text, encoding="utf-8")
    cluster = load_topology(path, log_warnings=False)  # every check a pod makes, model included
    original = load_topology(LAB, log_warnings=False)
    services = {s["metadata"]["name"]: s for s in docs_of(files, "Service")}
    addresses = {h.name: h.address for h in cluster.hosts}
    assert addresses == {
        "edge-coordinator": "lab-edge-coordinator.sft.svc",
        "edge-server": "lab-edge-server.sft.svc",
        "board-a-device": "auto",
        "board-b-device": "auto",
    }
    for actor in cluster.actors:
        if actor.addressed:
            svc = services[addresses[actor.host].split(".")[0]]
            assert [p["port"] for p in svc["spec"]["ports"]] == [actor.port]
            assert svc["spec"]["selector"]["sft-actors/node"] == svc["metadata"]["name"]
    # Each actor on its node's host; everything else is the user's file, value for value.
    assert {a.name: a.host for a in cluster.actors} == {
        "coordinator": "edge-coordinator",
        "server": "edge-server",
        "board-a-dev": "board-a-device",
        "board-b-dev": "board-b-device",
    }
    strip = [dataclasses.replace(a, host="-") for a in original.actors]
    assert [dataclasses.replace(a, host="-") for a in cluster.actors] == strip
    assert cluster.run == original.run
    assert topology_schema_hash(cluster) == topology_schema_hash(original)  # HELLO and --resume agree
    raw, raw_cluster = tomllib.loads(LAB.read_text()), tomllib.loads(text)
    for doc in (raw, raw_cluster):
        doc.pop("hosts")
        for a in doc["actors"]:
            a.pop("host")
    assert raw_cluster == raw


def test_jobs_run_each_node_with_its_cluster_host(tmp_path: Path, lab_keys: Path) -> None:
    files = write_lab(tmp_path, lab_keys, resume="runs/lab/lab-1")
    jobs = {j["metadata"]["name"]: j for j in docs_of(files, "Job")}
    coordinator = jobs["lab-edge-coordinator"]["spec"]
    container = coordinator["template"]["spec"]["containers"][0]
    assert container["command"] == ["python", "-m", "sft_actors.node_process"]
    assert container["args"][:10] == [
        "--role", "coordinator", "--topology", "/etc/sft/topology.toml", "--host", "edge-coordinator",
        "--transport", "tcp", "--log-format", "json",
    ]  # fmt: skip
    assert container["args"][-2:] == ["--resume", "runs/lab/lab-1"]
    assert container["workingDir"] == "/work"
    for name, job in jobs.items():
        if name != "lab-edge-coordinator":
            assert "--resume" not in job["spec"]["template"]["spec"]["containers"][0]["args"]


def test_restart_rules_and_probes_follow_the_roles(tmp_path: Path, lab_keys: Path) -> None:
    files = write_lab(tmp_path, lab_keys)
    jobs = {
        j["metadata"]["labels"]["app.kubernetes.io/component"] + ":" + j["metadata"]["name"]: j
        for j in docs_of(files, "Job")
    }
    for key, job in jobs.items():
        role = key.split(":")[0]
        spec = job["spec"]
        node = spec["template"]["spec"]["containers"][0]
        if role == "coordinator":  # a new coordinator would start a new run
            assert spec["backoffLimit"] == 0 and "podFailurePolicy" not in spec
        else:
            assert spec["backoffLimit"] == 3 and spec["podReplacementPolicy"] == "Failed"
            rules = spec["podFailurePolicy"]["rules"]
            assert rules[0] == {
                "action": "Ignore",
                "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
            }
            assert rules[1]["action"] == "FailJob" and rules[1]["onExitCodes"]["values"] == [2, 130]
        if role == "device":
            assert not {"startupProbe", "readinessProbe", "livenessProbe", "ports"} & set(node)
        else:
            port = node["ports"][0]["containerPort"]
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert node[probe]["tcpSocket"] == {"port": port}
            grace = spec["template"]["spec"]["terminationGracePeriodSeconds"]
            live = node["livenessProbe"]
            assert live["periodSeconds"] * live["failureThreshold"] >= grace  # never during a polite stop


def test_gpu_only_for_servers_and_only_when_asked(tmp_path: Path, lab_keys: Path) -> None:
    def gpus(files: dict[str, list[dict[str, Any]]]) -> dict[str, str | None]:
        return {
            j["metadata"]["name"]: j["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"].get(
                "nvidia.com/gpu"
            )
            for j in docs_of(files, "Job")
        }

    assert set(gpus(write_lab(tmp_path / "a", lab_keys)).values()) == {None}
    asked = write_lab(tmp_path / "b", lab_keys, server_gpu=True, server_image="sft-actors:0.1.0-cuda")
    assert gpus(asked) == {
        "lab-edge-coordinator": None,
        "lab-edge-server": "1",
        "lab-board-a-device": None,
        "lab-board-b-device": None,
    }
    images = {
        j["metadata"]["name"]: j["spec"]["template"]["spec"]["containers"][0]["image"]
        for j in docs_of(asked, "Job")
    }
    assert (
        images["lab-edge-server"] == "sft-actors:0.1.0-cuda"
        and images["lab-edge-coordinator"] == "sft-actors:0.1.0"
    )


def test_resources_and_volumes(tmp_path: Path, lab_keys: Path) -> None:
    files = write_lab(
        tmp_path,
        lab_keys,
        resources={"device": Resources(cpu="1500m", memory="3Gi")},
        volumes=[Volume(claim="models", path="models")],
    )
    jobs = {j["metadata"]["name"]: j["spec"]["template"]["spec"] for j in docs_of(files, "Job")}
    device = jobs["lab-board-a-device"]["containers"][0]
    assert device["resources"] == {"requests": {"cpu": "1500m", "memory": "3Gi"}, "limits": {"memory": "3Gi"}}
    assert device["args"][-2:] == ["--threads", "2"]
    for pod in jobs.values():
        mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
        assert mounts["/work/models"]["readOnly"] is True
    coordinator_mounts = {
        m["mountPath"] for m in jobs["lab-edge-coordinator"]["containers"][0]["volumeMounts"]
    }
    assert "/work/runs/lab" in coordinator_mounts  # the output claim, on the coordinator only
    assert "/work/runs/lab" not in {
        m["mountPath"] for m in jobs["lab-edge-server"]["containers"][0]["volumeMounts"]
    }
    with pytest.raises(LaunchConfigError, match="two volumes"):
        write_lab(tmp_path / "c", lab_keys, volumes=[Volume(claim="x", path="keys/lab")])
    with pytest.raises(LaunchConfigError, match="quantity"):
        Resources(cpu="lots", memory="1Gi")


# --- keys -------------------------------------------------------------------------------------


def test_secret_keys_only_in_their_nodes_secrets(tmp_path: Path, lab_keys: Path) -> None:
    out = tmp_path / "out"
    written = k8s.write_manifests(LAB, out, keys=lab_keys)
    files = read_out(out)
    topo = load_topology(LAB, roles=(), log_warnings=False)
    secrets = {a.name: (lab_keys / f"{a.name}.key_secret").read_bytes() for a in topo.actors}
    for rel, docs in files.items():
        text = (out / rel).read_text()
        holds = {
            name
            for name, raw in secrets.items()
            if base64.b64encode(raw).decode() in text or _secret_line(raw) in text
        }
        if rel.startswith("secrets/"):
            (secret,) = docs
            assert secret["kind"] == "Secret"
            node = rel.removeprefix("secrets/").removesuffix(".yaml")
            mine = {a.name for a in topo.actors if f"{a.host}-{a.role}" == node}
            assert holds == mine and set(secret["data"]) == {f"{a}.key_secret" for a in mine}
            assert stat.S_IMODE((out / rel).stat().st_mode) == 0o600
        else:
            assert not holds, f"{rel} holds a secret key"
            assert all(d["kind"] != "Secret" for d in docs)
    assert stat.S_IMODE((out / "secrets").stat().st_mode) == 0o700
    assert (out / "secrets" / ".gitignore") in written
    public = files["configmap-public-keys.yaml"][0]["data"]
    assert set(public) == {f"{a.name}.key" for a in topo.actors}


def _secret_line(raw: bytes) -> str:
    return next(line for line in raw.decode().splitlines() if "secret-key" in line).strip()


def test_keys_reach_the_node_private_and_only_its_own(tmp_path: Path, lab_keys: Path) -> None:
    files = write_lab(tmp_path, lab_keys)
    for job in docs_of(files, "Job"):
        pod = job["spec"]["template"]["spec"]
        (init,) = pod["initContainers"]
        assert init["command"][:2] == ["sh", "-c"] and init["command"][2].startswith("umask 077 && cp ")
        volumes = {v["name"]: v for v in pod["volumes"]}
        sources = volumes["key-staging"]["projected"]["sources"]
        assert sources == [
            {"configMap": {"name": "lab-public-keys"}},
            {"secret": {"name": f"{job['metadata']['name']}-keys"}},
        ]
        assert volumes["keys"]["emptyDir"]["medium"] == "Memory"
        node_mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
        assert "key-staging" not in node_mounts
        assert node_mounts["keys"] == {"name": "keys", "mountPath": "/work/keys/lab", "readOnly": True}
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["automountServiceAccountToken"] is False


def test_curve_without_keys_is_refused_before_writing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    with pytest.raises(KeyFileError, match="sft keys generate"):
        k8s.write_manifests(LAB, out, keys=tmp_path / "no-keys")
    lines: list[str] = []
    assert k8s.k8s_main(LAB, out, keys=tmp_path / "no-keys", echo=lines.append) == k8s.EXIT_CONFIG
    assert len(lines) == 1 and lines[0].startswith("error: key directory") and "sft keys generate" in lines[0]
    assert not out.exists()
    assert capsys.readouterr().out == ""


def test_mode_none_needs_allow_insecure(tmp_path: Path) -> None:
    with pytest.raises(LaunchConfigError, match=r'mode = "none".*--allow-insecure'):
        k8s.write_manifests(TINY, tmp_path / "out")
    k8s.write_manifests(TINY, tmp_path / "out", allow_insecure=True)
    text = read_out(tmp_path / "out")["configmap-topology.yaml"][0]["data"]["topology.toml"]
    assert tomllib.loads(text)["run"]["security"] == {"allow_insecure": True}


def test_k8s_main_reports(tmp_path: Path, lab_keys: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    lines: list[str] = []
    out = tmp_path / "out"
    assert k8s.k8s_main(LAB, out, keys=lab_keys, namespace="sft", echo=lines.append) == k8s.EXIT_OK
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True and report["backend"] == "k8s"
    # the claim's namespace first: the claim is applied before the kustomization that also holds it
    first = f"kubectl apply -f {out}/namespace.yaml -f {out}/output-claim.yaml"
    assert report["apply"] == [first, f"kubectl apply -k {out}"]
    assert any(line.startswith("warning:") and "secret keys" in line for line in lines)
    assert (
        k8s.k8s_main(LAB, out, keys=lab_keys, namespace="Not_A_Label", echo=lines.append) == k8s.EXIT_CONFIG
    )
    assert lines[-1].startswith("error: namespace")


# --- pure pieces ------------------------------------------------------------------------------


def test_dns_labels() -> None:
    assert dns_label("lab", "edge", "coordinator") == "lab-edge-coordinator"
    assert dns_label("Lab_1", "board.A", "device") == "lab-1-board-a-device"
    assert dns_label("9x") == "sft-9x"
    long_a, long_b = dns_label("a" * 80, "x"), dns_label("a" * 80, "y")
    assert len(long_a) <= 63 and long_a != long_b and DNS_LABEL.fullmatch(long_a)


def test_toml_writer_round_trips() -> None:
    doc = {
        "top": 1,
        "run": {
            "name": 'quote " back \\ slash \t tab \x7f del é',
            "lr": 1e-05,
            "flag": False,
            "empty": {},
            "list": [1, 2.5, "x"],
            "data": {"options": {"max_documents": 40, "weird key": [1]}},
            "codec": {"up": {"sparsify": {"keep": 0.2}}, "down": {}},
        },
        "actors": [{"name": "a", "link": {"rtt_ms": 5.0}, "codec": {"up": {}, "down": {}}}, {"name": "b"}],
    }
    text = dumps_toml(doc, header="two\nlines")
    assert text.startswith("# two\n# lines\n")
    assert tomllib.loads(text) == doc
    with pytest.raises(ValueError):
        dumps_toml({"x": float("nan")})


def test_options_refuse_bad_values() -> None:
    with pytest.raises(LaunchConfigError, match="namespace"):
        K8sOptions(namespace="-bad")
    with pytest.raises(LaunchConfigError, match="image"):
        K8sOptions(image="has space")
    with pytest.raises(LaunchConfigError, match="CLAIM:PATH"):
        k8s.parse_volume("no-path")


# --- containers -------------------------------------------------------------------------------


def test_compose_lab_topology_loads() -> None:
    topo = load_topology(DOCKER / "compose-lab.toml", log_warnings=False)
    assert topo.run.security.mode == "curve" and topo.run.model == "llama-tiny"  # no weights needed
    addressed = {topo.host(a.host).address for a in topo.actors if a.addressed}
    assert addressed == {"coordinator", "server"}
    assert {topo.host(a.host).address for a in topo.devices} == {"auto"}


def test_compose_file_matches_its_topology() -> None:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    topo = load_topology(DOCKER / "compose-lab.toml", roles=(), log_warnings=False)
    keys_dir = "/work/" + topo.run.security.keys
    configs, secrets = compose["configs"], compose["secrets"]
    assert (DOCKER / configs["topology"]["file"]).is_file()
    services = compose["services"]
    assert set(services) == {h.name for h in topo.hosts}
    for name, svc in services.items():
        build = svc["build"]
        assert (DOCKER / build["context"] / build["dockerfile"]).resolve() == (
            DOCKER / "Dockerfile"
        ).resolve()
        argv = svc["command"]
        host = argv[argv.index("--host") + 1]
        role = argv[argv.index("--role") + 1]
        assert host == name and argv[argv.index("--topology") + 1] == "/etc/sft/topology.toml"
        mine = {a.name for a in topo.actors if a.host == host and a.role == role}
        assert mine, f"{name} runs no actor"
        # Every public key and the topology as configs; only its own secret keys as secrets.
        targets = {c["target"]: configs[c["source"]]["file"] for c in svc["configs"]}
        assert targets.pop("/etc/sft/topology.toml") == "./compose-lab.toml"
        assert targets == {
            f"{keys_dir}/{a.name}.key": f"../../keys/compose-lab/{a.name}.key" for a in topo.actors
        }
        own = {s["target"]: secrets[s["source"]]["file"] for s in svc["secrets"]}
        assert own == {f"{keys_dir}/{a}.key_secret": f"../../keys/compose-lab/{a}.key_secret" for a in mine}
        assert svc["networks"] == ["lab"] and svc["user"].startswith("${SFT_UID:?")
        spec = topo.actor(next(iter(mine)))
        if spec.addressed:
            assert f"('127.0.0.1', {spec.port})" in svc["healthcheck"]["test"][-1]
    assert compose["networks"]["lab"]["internal"] is True
    assert services["coordinator"]["restart"] == "no"
    assert services["coordinator"]["volumes"] == ["../../runs:/work/runs"]
    assert topo.run.output.dir.startswith("runs/")


def test_images_hold_no_keys_or_runs() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", "runs", "keys", "**/*.key_secret"} <= set(ignored)
    for name in ("Dockerfile", "Dockerfile.cuda"):
        text = (DOCKER / name).read_text()
        copies = [line for line in text.splitlines() if line.startswith("COPY")]
        assert copies == ["COPY pyproject.toml README.md /src/", "COPY sft_actors /src/sft_actors"]
        assert "WORKDIR /work" in text and "USER 10001:10001" in text
        assert 'ENTRYPOINT ["python", "-m", "sft_actors.node_process"]' in text
    assert "FROM python:3.11-slim" in (DOCKER / "Dockerfile").read_text()
    assert "download.pytorch.org/whl/cpu" in (DOCKER / "Dockerfile").read_text()
