"""Whole split fine-tuning runs (coordinator + server + devices) through ``run_topology``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sft_actors.codec import CodecPolicy
from sft_actors.errors import ConfigError
from sft_actors.model import load_lora_state_dict, lora_state_dict, make_full_part, split_model
from sft_actors.plan.assign import device_plans
from sft_actors.runtime import run_topology
from sft_actors.sharing import SHARED
from sft_actors.topology import load_topology
from sft_actors.train.data_setup import BatchIterator, build_device_data
from sft_actors.train.device_trainer import DeviceTrainer
from sft_actors.train.loading import load_shared_model
from sft_actors.train.reference import reference_finetune
from sft_actors.train.server_trainer import ServerTrainer

CODEC_UP = """
[run.codec.up]
sparsify = { keep = 0.25, scope = "token" }
quantize = { bits = 8, scale = "token" }
lossless = { positions = "bitmap", zstd_level = 1 }
[run.codec.down]
sparsify = { keep = 0.5, scope = "tensor" }
quantize = { bits = 8, scale = "token" }
lossless = { positions = "bitmap", zstd_level = 1 }
"""


def write_topology(
    tmp_path: Path,
    *,
    cuts: list[int],
    mode: str = "sft",
    rounds: int = 2,
    steps: int = 3,
    max_inflight: int = 1,
    server_update: str = "per_batch",
    codec: str = CODEC_UP,
    lr: float = 5e-3,
) -> Path:
    devices = "\n".join(
        f'[[actors]]\nname = "dev{i}"\nrole = "device"\ncut = {c}\nshard = {i}\n' for i, c in enumerate(cuts)
    )
    text = f"""
[run]
name = "t"
model = "llama-tiny"
seed = 7

[run.train]
mode = "{mode}"
rounds = {rounds}
steps_per_round = {steps}
batch_size = 2
seq_len = 16
lr = {lr}
aggregate_every = 1
max_inflight = {max_inflight}
server_update = "{server_update}"
eval_batches = 2

[run.lora]
rank = 4
alpha = 8.0

[run.data]
dataset = "stdlib-docs"
options = {{ max_documents = 40 }}

{codec}

[run.runtime]
heartbeat_interval_s = 0.5
heartbeat_timeout_s = 10.0
request_timeout_s = 60.0

[run.output]
dir = "{tmp_path / "runs"}"

[[actors]]
name = "coordinator"
role = "coordinator"
port = 0

[[actors]]
name = "server"
role = "server"
port = 0

{devices}
"""
    path = tmp_path / "topology.toml"
    path.write_text(text)
    return path


async def _run(path: Path, transport: str = "inproc") -> dict:
    result = await run_topology(load_topology(path), transport=transport, timeout_s=240)  # type: ignore[arg-type]
    assert result.ok, result.failures
    summaries = list((path.parent / "runs").glob("t-*/summary.json"))
    assert len(summaries) == 1
    return json.loads(summaries[0].read_text())


@pytest.mark.asyncio
@pytest.mark.parametrize("transport", ["inproc", "tcp"])
async def test_sft_run_compresses_trains_and_writes_results(tmp_path: Path, transport: str) -> None:
    s = await _run(write_topology(tmp_path, cuts=[1, 2]), transport)
    assert s["mode"] == "sft" and len(s["rounds"]) == 2
    assert s["totals"]["ratio_up"] > 2.0 and s["totals"]["ratio_down"] > 1.5  # the codec is on
    for r in s["rounds"]:
        assert set(r["per_device_loss"]) == {"dev0", "dev1"}
        assert 0 < r["bytes_up"] < r["raw_up"]
    assert s["before"]["perplexity"] > 1 and s["after"]["targets"] == s["before"]["targets"] > 0
    # The model alone (no codec on the eval path) is measured too, on the same batches.
    assert s["before_raw"]["targets"] == s["before"]["targets"]
    assert s["before_raw"]["loss"] != pytest.approx(s["before"]["loss"], rel=1e-6)
    # The planner's delay model sits beside the measured round time; this chain (Top-K per
    # token) is not in the planner's codec table, and the summary says so instead of guessing.
    assert s["planner"]["measured_round_s"] == pytest.approx(
        sorted(r["seconds"] for r in s["rounds"])[len(s["rounds"]) // 2], rel=0.5
    )
    assert s["planner"]["predicted_round_s"] is None and "codec_ratios.json" in s["planner"]["why_not"]
    devices = load_file(s["adapters"]["devices"])
    server = load_file(s["adapters"]["server"])
    # Per-block average over devices: dev0 holds block 0, dev1 blocks 0-1; the server holds 1-3.
    assert {k.split(".")[1] for k in devices} == {"0", "1"}
    assert {k.split(".")[1] for k in server} == {"1", "2", "3"}
    assert any(v.abs().sum() > 0 for k, v in devices.items() if k.endswith("lora_B"))


@pytest.mark.asyncio
async def test_one_device_without_codec_equals_plain_lora_finetune(tmp_path: Path) -> None:
    """1 device, codec off, max_inflight = 1: the split run is a plain LoRA fine-tune."""
    rounds, steps, cut = 2, 3, 2
    path = write_topology(tmp_path, cuts=[cut], mode="sfl", rounds=rounds, steps=steps, codec="")
    s = await _run(path)

    topo = load_topology(path)
    run = topo.run
    (plan,) = device_plans(topo)
    model = load_shared_model(plan.model)
    device, server = split_model(model, cut, lora=run.lora, seed=run.seed)
    initial = {**lora_state_dict(device), **lora_state_dict(server)}
    data = build_device_data(plan.data, model=model, num_devices=1, shard=0, cache=SHARED.get)
    it = BatchIterator(data.train)
    batches = [next(it) for _ in range(rounds * steps)]
    full = make_full_part(model, lora=run.lora, seed=12345)
    load_lora_state_dict(full, initial)
    losses = reference_finetune(full, batches, lr=run.train.lr)

    ref_rounds = [sum(losses[i * steps : (i + 1) * steps]) / steps for i in range(rounds)]
    assert [r["loss"] for r in s["rounds"]] == pytest.approx(ref_rounds, rel=1e-5)
    got = {**load_file(s["adapters"]["devices"]), **load_file(s["adapters"]["server"])}
    want = lora_state_dict(full)
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=1e-4, atol=1e-6)


@pytest.mark.asyncio
async def test_lossy_codec_changes_the_run_but_it_still_learns(tmp_path: Path) -> None:
    lossy = CODEC_UP.replace("keep = 0.25", "keep = 0.1").replace("bits = 8", "bits = 4", 1)
    a = tmp_path / "a"
    b = tmp_path / "b"
    a.mkdir()
    b.mkdir()
    exact = await _run(write_topology(a, cuts=[2], mode="sfl", rounds=3, steps=4, codec="", lr=1e-2))
    coded = await _run(write_topology(b, cuts=[2], mode="sft", rounds=3, steps=4, codec=lossy, lr=1e-2))
    assert [r["loss"] for r in coded["rounds"]] != pytest.approx(
        [r["loss"] for r in exact["rounds"]], rel=1e-4
    )
    assert coded["after"]["loss"] < coded["before"]["loss"]
    assert exact["after"]["loss"] < exact["before"]["loss"]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("mode", "max_inflight", "update"),
    [("sft", 2, "per_batch"), ("fedlora", 1, "per_batch")],
)
async def test_modes_run_end_to_end(tmp_path: Path, mode: str, max_inflight: int, update: str) -> None:
    s = await _run(
        write_topology(
            tmp_path,
            cuts=[1, 3],
            mode=mode,
            max_inflight=max_inflight,
            server_update=update,
            rounds=2,
            steps=2,
        )
    )
    assert len(s["rounds"]) == 2 and s["mode"] == mode
    if mode == "fedlora":
        assert s["totals"]["bytes_up"] == 0  # the whole model trains on the device
        assert {k.split(".")[1] for k in load_file(s["adapters"]["devices"])} == {"0", "1", "2", "3"}
    else:
        assert s["totals"]["bytes_up"] > 0


@pytest.mark.asyncio
async def test_sl_relays_adapters_from_device_to_device(tmp_path: Path) -> None:
    """Vanilla split learning: one device at a time, each starting from the previous device's
    adapters (its own optimizer state), one shared server. Replayed here in one process from
    the same pure state machines, in the coordinator's order; the run must match it exactly."""
    rounds, steps, cut = 2, 2, 2
    path = write_topology(tmp_path, cuts=[cut, cut], mode="sl", rounds=rounds, steps=steps)
    s = await _run(path)
    topo = load_topology(path)
    plans = device_plans(topo)
    assert all(p.codec.is_identity for p in plans)  # sl never codes, whatever [run.codec] says
    model = load_shared_model(plans[0].model)
    run = topo.run
    parts = [split_model(model, cut, lora=run.lora, seed=run.seed) for _ in plans]
    devices = [DeviceTrainer(dev, lr=run.train.lr) for dev, _ in parts]
    server = ServerTrainer(parts[0][1], lr=run.train.lr, update=run.train.server_update)
    data = [
        BatchIterator(build_device_data(p.data, model=model, num_devices=2, shard=p.shard).train)
        for p in plans
    ]
    losses: list[list[float]] = []
    previous = None
    for _ in range(rounds):
        round_losses = []
        for i, trainer in enumerate(devices):
            if previous is not None:
                load_lora_state_dict(trainer.part, lora_state_dict(previous.part))
            for step in range(steps):
                inputs, labels = next(data[i])
                hidden = trainer.forward(step, inputs)
                res = server.train_step(hidden, labels, cut)
                assert res.grad is not None
                trainer.backward(step, res.grad)
                round_losses.append(res.loss)
            previous = trainer
        losses.append(round_losses)
    assert [r["loss"] for r in s["rounds"]] == pytest.approx([sum(x) / len(x) for x in losses], rel=1e-5)
    assert s["rounds"][0]["per_device_loss"]["dev1"] == pytest.approx(
        sum(losses[0][steps:]) / steps, rel=1e-5
    )
    # The adapters the run ends with are the last device's.
    got = load_file(s["adapters"]["devices"])
    want = lora_state_dict(devices[-1].part)
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=1e-4, atol=1e-6)


def _with_two_stages(path: Path, second_start: int) -> None:
    """Turn the topology's single server into stages [min cut, second_start) and [second_start, L)."""
    text = path.read_text().replace(
        '[[actors]]\nname = "server"\nrole = "server"\nport = 0\n',
        '[[actors]]\nname = "server"\nrole = "server"\nport = 0\n\n'
        f'[[actors]]\nname = "server1"\nrole = "server"\nport = 0\nstart_block = {second_start}\n',
    )
    path.write_text(text)


@pytest.mark.asyncio
async def test_two_server_stages_equal_one_server(tmp_path: Path) -> None:
    """Cutting the server into stage actors changes where blocks run, not the training."""
    a, b = tmp_path / "one", tmp_path / "two"
    a.mkdir()
    b.mkdir()
    one = await _run(write_topology(a, cuts=[1], mode="sfl", rounds=2, steps=3, codec=""))
    path = write_topology(b, cuts=[1], mode="sfl", rounds=2, steps=3, codec="")
    _with_two_stages(path, 3)
    two = await _run(path)
    assert [r["loss"] for r in two["rounds"]] == pytest.approx([r["loss"] for r in one["rounds"]], rel=1e-5)
    merged = {**load_file(two["adapters"]["server"]), **load_file(two["adapters"]["server1"])}
    single = load_file(one["adapters"]["server"])
    assert sorted(merged) == sorted(single)
    assert {k.split(".")[1] for k in load_file(two["adapters"]["server"])} == {"1", "2"}
    for k, v in single.items():
        torch.testing.assert_close(merged[k], v, rtol=1e-4, atol=1e-6)


@pytest.mark.asyncio
async def test_server_stages_pipeline_two_devices_with_the_codec(tmp_path: Path) -> None:
    """Two devices with the codec, their micro-batches flowing through two server stages at
    once: the same training as one server. ``per_round`` server updates sum gradients in
    (device, step) order, so the result does not depend on which device's micro-batch reaches a
    stage first. (``max_inflight = 1``: with more, how stale a device's snapshot is depends on
    timing by design, so two runs differ in any topology.)"""
    a, b = tmp_path / "one", tmp_path / "two"
    a.mkdir()
    b.mkdir()
    kw = {
        "cuts": [1, 3],
        "mode": "sft",
        "rounds": 2,
        "steps": 3,
        "max_inflight": 1,
        "server_update": "per_round",
    }
    one = await _run(write_topology(a, **kw))  # type: ignore[arg-type]
    path = write_topology(b, **kw)  # type: ignore[arg-type]
    _with_two_stages(path, 2)
    two = await _run(path)
    assert two["totals"]["ratio_up"] > 2.0
    assert [r["loss"] for r in two["rounds"]] == pytest.approx([r["loss"] for r in one["rounds"]], rel=1e-6)
    assert two["after"]["loss"] == pytest.approx(one["after"]["loss"], rel=1e-6)
    first, second = load_file(two["adapters"]["server"]), load_file(two["adapters"]["server1"])
    assert {k.split(".")[1] for k in first} == {"1"}  # stage [1, 2); dev1 (cut 3) skips it
    assert {k.split(".")[1] for k in second} == {"2", "3"}
    single = load_file(one["adapters"]["server"])
    for k, v in {**first, **second}.items():
        torch.testing.assert_close(v, single[k], rtol=1e-3, atol=1e-5)
    assert all(v.abs().sum() > 0 for k, v in first.items() if k.endswith("lora_B"))  # stage 1 trained


@pytest.mark.timeout(240)
@pytest.mark.parametrize("transport", ["ipc", "tcp"])
def test_tiny_topology_as_real_processes(tmp_path: Path, transport: str) -> None:
    """`sft run --processes`: one OS process per actor (sft-node), the SFT protocol over ipc/tcp."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    sft = Path(sys.executable).parent / "sft"
    proc = subprocess.run(
        [
            str(sft),
            "run",
            str(root / "topologies" / "tiny.toml"),
            "--processes",
            "--transport",
            transport,
            "--log-level",
            "warning",
            "--timeout-s",
            "200",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=230,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])["result"]
    assert result["mode"] == "sft" and result["after"]["perplexity"] > 1
    assert result["totals"]["ratio_up"] > 2.0  # the codec is on across processes too
    summary = json.loads((tmp_path / result["run_dir"] / "summary.json").read_text())
    assert len(summary["rounds"]) == 2 and set(summary["devices"]) == {"dev0", "dev1"}


@pytest.mark.asyncio
async def test_a_missing_dataset_fails_the_run_with_a_clear_error(tmp_path: Path) -> None:
    path = write_topology(tmp_path, cuts=[1, 2])
    missing = tmp_path / "no-such-corpus.txt"
    path.write_text(
        path.read_text().replace(
            'dataset = "stdlib-docs"\noptions = { max_documents = 40 }', f'dataset = "text:{missing}"'
        )
    )
    with pytest.raises(ConfigError, match=rf"key 'dataset'.*{missing}"):  # refused at load...
        load_topology(path)
    # ...and should the files vanish after loading (here: loaded as an edge host that has no
    # devices), the run still ends with the data layer's own error, not a hang or a traceback.
    topo = load_topology(path, roles=("coordinator", "server"))
    result = await run_topology(topo, transport="inproc", timeout_s=120)
    assert not result.ok and result.status == "failed"
    assert "DatasetNotFound" in result.reason and str(missing) in result.reason
    summary = json.loads((Path(result.result["run_dir"]) / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["rounds"] == []


@pytest.mark.asyncio
async def test_each_device_can_carry_its_own_codec(tmp_path: Path) -> None:
    """dev0 overrides the run's chain with the identity (raw tensors); dev1 inherits Top-K."""
    path = write_topology(tmp_path, cuts=[1, 2], rounds=1, steps=2)
    text = path.read_text().replace(
        'name = "dev0"\nrole = "device"\ncut = 1\nshard = 0\n',
        'name = "dev0"\nrole = "device"\ncut = 1\nshard = 0\ncodec = { up = {}, down = {} }\n',
    )
    path.write_text(text)
    topo = load_topology(path)
    assert topo.codec_policy("dev0") == CodecPolicy.identity()
    up = topo.codec_policy("dev1").up
    assert up.sparsify is not None and up.sparsify.keep == 0.25
    s = await _run(path)
    raw = 2 * 2 * 16 * 64 * 4  # steps x batch x seq x dim x fp32
    per_device = s["rounds"][0]["per_device_bytes_up"]
    assert per_device["dev0"] == raw
    assert per_device["dev1"] < raw / 2


def test_a_bad_device_codec_is_a_topology_error(tmp_path: Path) -> None:
    from sft_actors.errors import TopologyError

    path = write_topology(tmp_path, cuts=[1, 2])
    path.write_text(
        path.read_text().replace(
            "cut = 1\nshard = 0\n", "cut = 1\nshard = 0\ncodec = { up = { sparsfy = { keep = 0.1 } } }\n"
        )
    )
    with pytest.raises(TopologyError, match=r"dev0.*codec\.up.*did you mean 'sparsify'"):
        load_topology(path)


PCA_UP = """
[run.codec.up]
outliers = { first_tokens = 1 }
project = { basis = "pca" }
quantize = { bits = 4, scale = "channel" }
lossless = { zstd_level = 3 }
[run.codec.down]
sparsify = { keep = 0.5, scope = "tensor" }
quantize = { bits = 8, scale = "token" }
lossless = { positions = "bitmap", zstd_level = 1 }
"""


@pytest.mark.asyncio
async def test_transform_coding_fits_a_basis_per_device_and_sends_it_once(tmp_path: Path) -> None:
    """Devices fit a PCA basis on their own activations; the server decodes with each device's."""
    s = await _run(write_topology(tmp_path, cuts=[1, 2], rounds=2, steps=2, codec=PCA_UP))
    assert s["totals"]["ratio_up"] > 3.0
    assert s["after"]["targets"] > 0
    # 4 bits per PCA component costs little: the coded eval path stays close to the raw one.
    assert s["before"]["loss"] == pytest.approx(s["before_raw"]["loss"], rel=0.05)


def test_a_projected_gradient_chain_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="activations"):
        CodecPolicy.parse({"up": {}, "down": {"project": {"basis": "pca"}}})
    path = write_topology(
        tmp_path,
        cuts=[1],
        codec=PCA_UP.replace("[run.codec.down]", '[run.codec.down]\nproject = { basis = "pca" }'),
    )
    with pytest.raises(ConfigError, match=r"\[run\], key .codec\.down.*project.*activations"):
        load_topology(path)


@pytest.mark.asyncio
async def test_vit_classification_run_reports_accuracy(tmp_path: Path) -> None:
    """The image path: ViT on scikit-learn's digits, trainable head on the server."""
    path = write_topology(tmp_path, cuts=[1, 2], rounds=1, steps=2)
    path.write_text(
        path.read_text()
        .replace('model = "llama-tiny"', 'model = "vit-tiny"')
        .replace('dataset = "stdlib-docs"\noptions = { max_documents = 40 }', 'dataset = "digits"')
    )
    s = await _run(path)
    assert s["before"]["perplexity"] is None and 0.0 <= s["after"]["accuracy"] <= 1.0
    assert s["after"]["targets"] > 0 and s["totals"]["ratio_up"] > 2.0
    # The server trains the classification head too, and saves it with its adapters.
    assert any(k.startswith("head.") for k in load_file(s["adapters"]["server"]))


def test_a_bad_log_format_is_a_usage_error() -> None:
    from typer.testing import CliRunner

    from sft_actors.cli.main import app

    root = Path(__file__).resolve().parent.parent
    result = CliRunner().invoke(app, ["run", str(root / "topologies" / "tiny.toml"), "--log-format", "xml"])
    assert result.exit_code == 2
    assert "log format" in result.output
