"""``sft export`` / ``sft generate`` on run directories made by real in-process runs.

Two runs are made once per module through ``run_topology`` (as ``sft run`` does):

* ``staged``: an HF-folder base (llama-tiny saved with ``export_hf_llama``, byte-level BPE
  tokenizer.json), mode ``sfl``, devices cutting at 1 and 3, two server stages ``s1`` [1, 3)
  and ``s2`` [3, 4) (head) — every block of dev0's model comes from another file than dev1's;
* ``fed``: the ``llama-tiny`` preset (byte tokenizer) under ``fedlora`` (no server);
* ``vit``: ``vit-tiny`` on scikit-learn's digits, devices cutting at 1 and 2, one server with
  the trainable head.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer as HfTokenizer
from tokenizers import decoders, models, pre_tokenizers
from typer.testing import CliRunner

from sft_actors.cli.main import app
from sft_actors.model import BpeTokenizer, export_hf_llama, load_model
from sft_actors.runtime import run_topology
from sft_actors.topology import load_topology
from sft_actors.train.export_job import load_device
from sft_actors.train.run_adapters import ExportError, load_run
from sft_actors.train.run_export import runtime_logits
from sft_actors.train.run_info import read_run_info

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
runner = CliRunner()
TOL = 1e-5


def _byte_bpe() -> BpeTokenizer:
    """A byte-level BPE with no merges: token id = UTF-8 byte (GPT-2's byte → unicode map)."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars, n = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    vocab = {chr(c): b for b, c in zip(keep, chars, strict=True)}
    hf = HfTokenizer(models.BPE(vocab=vocab, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.decoder = decoders.ByteLevel()
    return BpeTokenizer(hf, bos_id=None, eos_id=None, pad_id=0)


def _topology(root: Path, *, model: str, mode: str, servers: str, devices: dict[str, int]) -> Path:
    devs = "\n".join(
        f'[[actors]]\nname = "{d}"\nrole = "device"\ncut = {c}\nshard = {i}\n'
        for i, (d, c) in enumerate(devices.items())
    )
    text = f"""
[run]
name = "t"
model = "{model}"
seed = 3

[run.train]
mode = "{mode}"
rounds = 2
steps_per_round = 2
batch_size = 2
seq_len = 16
lr = 0.05
eval_batches = 1

[run.lora]
rank = 4
alpha = 8.0

[run.data]
dataset = "stdlib-docs"
options = {{ max_documents = 40 }}

[run.runtime]
heartbeat_interval_s = 0.5
heartbeat_timeout_s = 20.0
request_timeout_s = 60.0

[run.output]
dir = "{root / "runs"}"

[[actors]]
name = "coordinator"
role = "coordinator"
port = 0
{servers}
{devs}
"""
    path = root / "topology.toml"
    path.write_text(text)
    return path


def _run(path: Path) -> Path:
    result = asyncio.run(run_topology(load_topology(path), transport="inproc", timeout_s=240))
    assert result.ok, result.failures
    (run_dir,) = (path.parent / "runs").glob("t-*")
    return run_dir


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = load_model("llama-tiny")
    model.tokenizer = _byte_bpe()
    return export_hf_llama(model, tmp_path_factory.mktemp("base") / "llama-tiny-hf")


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory, hf_base: Path) -> Path:
    servers = (
        '[[actors]]\nname = "s1"\nrole = "server"\nport = 0\nstart_block = 1\n'
        '[[actors]]\nname = "s2"\nrole = "server"\nport = 0\nstart_block = 3\n'
    )
    root = tmp_path_factory.mktemp("staged")
    return _run(
        _topology(root, model=str(hf_base), mode="sfl", servers=servers, devices={"dev0": 1, "dev1": 3})
    )


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fed")
    return _run(
        _topology(root, model="llama-tiny", mode="fedlora", servers="", devices={"dev0": 1, "dev1": 2})
    )


def _export(run_dir: Path, out: Path, *args: str) -> dict:
    result = runner.invoke(app, ["export", str(run_dir), "--out", str(out), *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


def _fail(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 2, result.output
    line = json.loads(result.stdout.strip().splitlines()[-1])
    assert line["ok"] is False
    return str(line["message"])


def _reference(run_dir: Path, device: str, ids: torch.Tensor) -> torch.Tensor:
    loaded = load_device(run_dir, device, round_=None, topology=None)
    return runtime_logits(loaded.model, loaded.run, loaded.dm, ids)


IDS = torch.tensor([[5, 17, 99, 3, 200, 42, 7, 11], [1, 2, 3, 4, 5, 6, 7, 8]])


def test_the_run_records_what_export_needs(staged: Path, hf_base: Path) -> None:
    info = read_run_info(staged)
    assert info is not None and info.model_path == str(hf_base.resolve())
    assert info.cuts == {"dev0": 1, "dev1": 3} and info.entry_server == {"dev0": "s1", "dev1": "s2"}
    assert {n: (r.start_block, r.end_block, r.head) for n, r in info.servers.items()} == {
        "s1": (1, 3, False),
        "s2": (3, None, True),
    }
    assert (info.lora.rank, info.lora.alpha, info.dtype) == (4, 8.0, "float32")
    with safe_open(str(staged / "adapters_s1.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["block_range"]) == [1, 3] and json.loads(meta["head"]) is False
    assert json.loads(meta["lora_config"])["rank"] == 4
    with safe_open(str(staged / "adapters_devices.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["cuts"]) == {"dev0": 1, "dev1": 3}
    assert "status" in json.loads((staged / "summary.json").read_text())  # sft status still reads it


@pytest.mark.parametrize("device", ["dev0", "dev1"])
def test_peft_export_loads_in_peft_and_matches_the_runtime(
    staged: Path, hf_base: Path, tmp_path: Path, device: str
) -> None:
    line = _export(staged, tmp_path / "peft", "--device", device, "--format", "peft")
    assert line["base_model_name_or_path"] == str(hf_base.resolve())
    assert line["max_abs_logit_diff_vs_runtime"] <= TOL and line["self_check"] == "transformers+peft"
    base = transformers.AutoModelForCausalLM.from_pretrained(line["base_model_name_or_path"]).eval()
    model = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    with torch.no_grad():
        got = model(input_ids=IDS).logits
    assert float((got - _reference(staged, device, IDS)).abs().max()) <= TOL


def test_merged_export_loads_in_transformers_and_matches_the_runtime(staged: Path, tmp_path: Path) -> None:
    line = _export(staged, tmp_path / "merged", "--device", "dev0", "--format", "merged")
    assert set(line["files"]) == {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    assert line["max_abs_logit_diff_vs_runtime"] <= TOL and line["self_check"] == "transformers"
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    with torch.no_grad():
        got = model(IDS).logits
    assert float((got - _reference(staged, "dev0", IDS)).abs().max()) <= TOL


def test_device_blocks_come_from_the_average_and_server_blocks_from_their_stage(staged: Path) -> None:
    run = load_run(staged)
    dev0 = load_device(staged, "dev0", round_=None, topology=None).dm
    dev1 = load_device(staged, "dev1", round_=None, topology=None).dm
    assert dev0.provenance == {0: "devices", 1: "s1", 2: "s1", 3: "s2"}
    assert dev1.provenance == {0: "devices", 1: "devices", 2: "devices", 3: "s2"}
    key = "blocks.1.q.lora_B"
    assert torch.equal(dev0.lora[key], run.servers["s1"][key])
    assert torch.equal(dev1.lora[key], run.devices[key])
    assert not torch.equal(run.servers["s1"][key], run.devices[key])  # both sides trained block 1
    assert float((_reference(staged, "dev0", IDS) - _reference(staged, "dev1", IDS)).abs().max()) > 1e-3


def test_unknown_device_lists_the_runs_devices(staged: Path, tmp_path: Path) -> None:
    msg = _fail("export", str(staged), "--device", "dev9", "--out", str(tmp_path / "x"))
    assert "dev9" in msg and "['dev0', 'dev1']" in msg


def test_a_non_empty_out_is_refused_unless_forced(staged: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert "--force" in _fail("export", str(staged), "--device", "dev0", "--out", str(out))
    assert (out / "mine.txt").read_text() == "keep"
    line = _export(staged, out, "--device", "dev0", "--force", "--no-check")
    assert sorted(line["files"]) == ["adapter_config.json", "adapter_model.safetensors"]
    assert not (out / "mine.txt").exists()


def test_an_unknown_format_or_a_file_as_out_is_refused(staged: Path, tmp_path: Path) -> None:
    args = ["export", str(staged), "--device", "dev0"]
    assert "--format" in _fail(*args, "--out", str(tmp_path / "x"), "--format", "onnx")
    (tmp_path / "file").write_text("x")
    assert "not a directory" in _fail(*args, "--out", str(tmp_path / "file"))
    usage = runner.invoke(app, [*args, "--out", str(tmp_path / "x"), "--round", "soon"])
    assert usage.exit_code == 2 and "round number or 'latest'" in usage.output


def test_a_run_without_final_adapters_exports_from_a_checkpoint(staged: Path, tmp_path: Path) -> None:
    broken = tmp_path / "interrupted"
    shutil.copytree(staged, broken)
    for f in broken.glob("adapters_*.safetensors"):
        f.unlink()  # as a run stopped by Ctrl-C leaves it: checkpoints, no final adapters
    summary = json.loads((broken / "summary.json").read_text())
    (broken / "summary.json").write_text(json.dumps({**summary, "status": "interrupted", "reason": "SIGINT"}))
    msg = _fail("export", str(broken), "--device", "dev0", "--out", str(tmp_path / "x"))
    assert "no final adapters" in msg and "interrupted (SIGINT)" in msg and "--round 2" in msg
    assert "rounds [1, 2]" in _fail(
        "export", str(broken), "--device", "dev0", "--out", str(tmp_path / "x"), "--round", "7"
    )
    line = _export(broken, tmp_path / "ckpt", "--device", "dev0", "--round", "latest", "--format", "merged")
    assert line["source"] == "checkpoint round 2" and line["max_abs_logit_diff_vs_runtime"] <= TOL
    final = load_device(staged, "dev0", round_=None, topology=None).dm.lora
    ckpt = load_device(broken, "dev0", round_="latest", topology=None).dm.lora
    assert final.keys() == ckpt.keys() and all(torch.equal(final[k], ckpt[k]) for k in final)


def test_a_run_without_run_json_is_read_from_its_topology_file(staged: Path, tmp_path: Path) -> None:
    old = tmp_path / "old"
    shutil.copytree(staged, old)
    (old / "run.json").unlink()  # as a run of an older build left it
    line = _export(old, tmp_path / "o", "--device", "dev0", "--no-check")
    assert line["blocks"] == {"devices": [0], "s1": [1, 2], "s2": [3]}


def test_a_directory_with_nothing_to_export_says_so(tmp_path: Path) -> None:
    msg = _fail("export", str(tmp_path), "--device", "dev0", "--out", str(tmp_path / "x"))
    assert "run.json" in msg and "--topology" in msg


def test_fedlora_exports_the_devices_average_on_every_block(fed: Path, tmp_path: Path) -> None:
    info = read_run_info(fed)
    assert info is not None and info.servers == {} and info.cuts == {"dev0": None, "dev1": None}
    line = _export(fed, tmp_path / "peft", "--device", "dev1", "--with-base")
    assert line["blocks"] == {"devices": [0, 1, 2, 3]} and line["max_abs_logit_diff_vs_runtime"] <= TOL
    assert line["base_model_name_or_path"] == str(tmp_path / "peft" / "base")
    base = transformers.AutoModelForCausalLM.from_pretrained(line["base_model_name_or_path"]).eval()
    model = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    with torch.no_grad():
        got = model(input_ids=IDS).logits
    assert float((got - _reference(fed, "dev1", IDS)).abs().max()) <= TOL


def test_a_preset_base_is_named_nowhere_without_with_base(fed: Path, tmp_path: Path) -> None:
    line = _export(fed, tmp_path / "p", "--device", "dev0", "--no-check")
    assert line["base_model_name_or_path"] == "" and "--with-base" in line["note"]


def test_generate_is_deterministic_for_a_seed(fed: Path) -> None:
    args = ["generate", str(fed), "--device", "dev0", "--prompt", "def ", "--max-new-tokens", "8"]
    greedy = runner.invoke(app, args)
    assert greedy.exit_code == 0, greedy.output
    sampled = [runner.invoke(app, [*args, "--temperature", "1.0", "--seed", "5"]) for _ in range(2)]
    assert sampled[0].exit_code == 0 and sampled[0].stdout == sampled[1].stdout
    assert greedy.stdout == runner.invoke(app, args).stdout and greedy.stdout.strip()


def test_generate_refuses_to_run_past_the_context_naming_the_maximum(fed: Path) -> None:
    args = ["generate", str(fed), "--device", "dev0", "--prompt", "def ", "--max-new-tokens"]
    msg = _fail(*args, "5000")
    assert "context of 512 tokens" in msg and "--max-new-tokens 508 or less" in msg, msg
    assert "--max-new-tokens 508 or less" in _fail(*args, "509")


def test_generate_chat_needs_an_instruction_run(fed: Path) -> None:
    msg = _fail("generate", str(fed), "--device", "dev0", "--prompt", "hi", "--chat")
    assert "--chat" in msg and "kind = 'text'" in msg, msg


def test_generate_encodes_the_prompt_as_training_encoded_text() -> None:
    """No BOS: documents are packed as their tokens, each followed by EOS (no BOS)."""
    from sft_actors.data.text import Document, TextCorpus
    from sft_actors.train.export_job import prompt_ids

    tok = _byte_bpe()
    tok.bos_id, tok.eos_id = 1, 2  # a tokenizer with a BOS, which training never adds
    doc = Document(text="def f(x):", source="a.py", group="a")
    corpus = TextCorpus(name="t", split="train", documents=(doc,), class_names=("a",))
    row = corpus.pack(tok.encode, eos_id=2, seq_len=16, pad_id=0).input_ids[0].tolist()
    ids = prompt_ids(tok, "def f(x):")
    assert row[: len(ids) + 1] == [*ids, 2] and ids[0] != 1


def test_generate_needs_a_tokenizer(staged: Path, tmp_path: Path, hf_base: Path) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(hf_base, bare)
    (bare / "tokenizer.json").unlink()
    run = tmp_path / "run"
    shutil.copytree(staged, run)
    info = json.loads((run / "run.json").read_text())
    info["model_path"] = str(bare)
    (run / "run.json").write_text(json.dumps(info))
    msg = _fail("generate", str(run), "--device", "dev0", "--prompt", "x")
    assert "no tokenizer" in msg


def test_load_run_refuses_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="not a directory"):
        load_run(tmp_path / "nope")


@pytest.fixture(scope="module")
def vit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("vit")
    server = '[[actors]]\nname = "server"\nrole = "server"\nport = 0\n'
    path = _topology(root, model="vit-tiny", mode="sfl", servers=server, devices={"dev0": 1, "dev1": 2})
    path.write_text(
        path.read_text().replace(
            'dataset = "stdlib-docs"\noptions = { max_documents = 40 }', 'dataset = "digits"'
        )
    )
    return _run(path)


def test_a_vit_exports_in_timm_names_with_the_trained_head(vit: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    merged = _export(vit, tmp_path / "merged", "--device", "dev0", "--format", "merged")
    assert merged["max_abs_logit_diff_vs_runtime"] <= TOL and merged["self_check"] == "sft_actors"
    assert merged["blocks"] == {"devices": [0], "server": [1, 2, 3]}
    state = load_file(str(tmp_path / "merged" / "model.safetensors"))
    server = load_file(str(vit / "adapters_server.safetensors"))
    assert "blocks.3.attn.qkv.weight" in state and torch.equal(state["head.weight"], server["head.weight"])
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["architecture"].startswith("vit_")
    line = _export(vit, tmp_path / "peft", "--device", "dev1", "--format", "peft")
    assert line["max_abs_logit_diff_vs_runtime"] <= TOL
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["head"] and config["target_modules"] == ["proj", "qkv"]
    saved = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert torch.equal(saved["base_model.model.head.weight"], server["head.weight"])
    assert "base_model.model.blocks.1.attn.qkv.lora_A.weight" in saved


def test_the_vit_lora_loads_in_peft_on_a_timm_named_model(vit: Path, tmp_path: Path) -> None:
    """Our ViT has timm's module names (``blocks.{i}.attn.qkv``), so PEFT itself can load the
    LoRA part of the export onto it (the head, ``head_fc`` here, is left out)."""
    from safetensors.torch import load_file, save_file

    from sft_actors.train.run_adapters import DeviceModel
    from sft_actors.train.run_export import merged_model

    out = tmp_path / "peft"
    _export(vit, out, "--device", "dev1", "--no-check")
    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": None}))
    tensors = load_file(str(out / "adapter_model.safetensors"))
    save_file({k: v for k, v in tensors.items() if ".head." not in k}, str(out / "adapter_model.safetensors"))
    loaded = load_device(vit, "dev1", round_=None, topology=None)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    lora_only = DeviceModel(device="dev1", cut=2, lora=loaded.dm.lora)
    with torch.no_grad():
        want = merged_model(loaded.model, lora_only, loaded.run.info.lora)(images)
        base = loaded.model(images)
        model = peft.PeftModel.from_pretrained(loaded.model, str(out)).eval()
        got = model(images)
    assert float((got - want).abs().max()) <= TOL < float((base - want).abs().max())
