"""LoRA invariants: trainable set, identity at init, save/load, merge, PEFT layout, shared base."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from sft_actors.errors import ConfigError
from sft_actors.model import (
    Llama,
    LoraConfig,
    SplitLM,
    export_hf_llama,
    export_peft,
    load_lora,
    load_lora_state_dict,
    load_model,
    lora_param_count,
    lora_state_dict,
    make_device_part,
    make_full_part,
    merge_lora,
    randomize_lora_B,
    resolve_spec,
    sample_batch,
    save_lora,
    split_model,
)

torch.set_num_threads(2)
LORA = LoraConfig(rank=4, alpha=8, targets=("q", "k", "v", "o"), mlp=True)


@pytest.fixture(scope="module")
def llama() -> SplitLM:
    return load_model("llama-tiny")


@pytest.fixture(scope="module")
def vit() -> SplitLM:
    return load_model("vit-tiny")


def _trained(model: SplitLM, seed: int = 3) -> torch.nn.Module:
    """A whole-model part whose adapters are non-trivial (B random)."""
    part = make_full_part(model, LORA, seed=seed)
    randomize_lora_B(part.adapters, seed=seed, std=0.05)
    return part


def test_trainable_parameters_are_exactly_the_adapters(llama: SplitLM) -> None:
    device, server = split_model(llama, 2, server_start=1, lora=LORA)
    for part, blocks in ((device, range(0, 2)), (server, range(1, 4))):
        trainable = part.trainable_parameters()
        expected = [
            a
            for i in blocks
            for p in LORA.projections("llama")
            for a in (part.adapters[str(i)][p].lora_A, part.adapters[str(i)][p].lora_B)
        ]
        assert [id(p) for p in trainable] == [id(p) for p in expected]
        assert all(p.requires_grad for p in trainable)
        assert set(map(id, part.parameters())) == set(map(id, trainable))  # the base is not a submodule
    assert not any(p.requires_grad for p in llama.parameters())


def test_fresh_adapter_is_identity(llama: SplitLM, vit: SplitLM) -> None:
    for model in (llama, vit):
        device, server = split_model(model, 2, lora=LORA, train_head=False if model.family == "vit" else None)
        inputs, _ = sample_batch(model, 2, 16, seed=0)
        with torch.no_grad():
            assert torch.equal(server(device(inputs), 2), model(inputs))
        assert all(float(a.lora_A.detach().abs().sum()) > 0 for a in device.adapter_modules().values())


def test_adapters_seeded_per_block_independent_of_cut(llama: SplitLM) -> None:
    d1, _ = split_model(llama, 1, lora=LORA, seed=7)
    d3, _ = split_model(llama, 3, lora=LORA, seed=7)
    d3b, _ = split_model(llama, 3, lora=LORA, seed=8)
    a, b, c = lora_state_dict(d1), lora_state_dict(d3), lora_state_dict(d3b)
    assert set(a) < set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(b["blocks.0.q.lora_A"], c["blocks.0.q.lora_A"])


def test_save_load_reproduces_outputs_exactly(tmp_path: Path, llama: SplitLM) -> None:
    part = _trained(llama)
    ids, _ = sample_batch(llama, 2, 16, seed=0)
    with torch.no_grad():
        before = part(ids)
    path = tmp_path / "lora.safetensors"
    save_lora(path, lora_state_dict(part), LORA)
    state, cfg = load_lora(path)
    assert cfg == LORA
    assert all(k.startswith("blocks.") and k.endswith(("lora_A", "lora_B")) for k in state)
    fresh = make_full_part(llama, cfg, seed=99)
    with torch.no_grad():
        assert not torch.equal(fresh(ids), before)
    load_lora_state_dict(fresh, state)
    with torch.no_grad():
        assert torch.equal(fresh(ids), before)


def test_load_strictness_and_shape_checks(llama: SplitLM) -> None:
    whole = _trained(llama)
    device = make_device_part(llama, 2, LORA)
    with pytest.raises(ConfigError, match="unexpected"):
        load_lora_state_dict(device, lora_state_dict(whole))
    missing, unexpected = load_lora_state_dict(device, lora_state_dict(whole), strict=False)
    assert not missing and all(k.startswith(("blocks.2.", "blocks.3.")) for k in unexpected)
    assert torch.equal(device.adapters["1"]["v"].lora_B, whole.adapters["1"]["v"].lora_B)
    wrong_rank = make_device_part(llama, 2, LoraConfig(rank=2, mlp=True))
    with pytest.raises(ConfigError, match="different rank"):
        load_lora_state_dict(wrong_rank, lora_state_dict(device))


def test_merge_equals_unmerged_and_leaves_base_untouched(llama: SplitLM, vit: SplitLM) -> None:
    for model in (llama, vit):
        base_q = (model.blocks[0].q if model.family == "llama" else model.blocks[0].attn.qkv).weight.clone()
        part = _trained(model)
        if model.family == "vit":
            part.trainable_head = None  # compare the backbone; the head is exported separately
        inputs, _ = sample_batch(model, 2, 16, seed=1)
        merged = merge_lora(model, lora_state_dict(part), LORA)
        with torch.no_grad():
            unmerged, fused = part(inputs), merged(inputs)
        assert (unmerged - fused).abs().max() < 1e-5
        assert not torch.allclose(unmerged, model(inputs), atol=1e-4)  # the adapters do something
        now = (model.blocks[0].q if model.family == "llama" else model.blocks[0].attn.qkv).weight
        assert torch.equal(now, base_q)


def test_peft_export_layout_applies_to_hf_llama(tmp_path: Path, llama: SplitLM) -> None:
    """Export PEFT, then apply it by hand to the HF-format base in transformers: same logits as ours."""
    part = _trained(llama)
    out = export_peft(
        tmp_path / "peft", lora_state_dict(part), LORA, family="llama", base_model_name_or_path="base"
    )
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert cfg["target_modules"] == [
        "down_proj",
        "gate_proj",
        "k_proj",
        "o_proj",
        "q_proj",
        "up_proj",
        "v_proj",
    ]
    tensors = load_file(str(out / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"
    assert key in tensors and tensors[key].shape == (4, 64)
    assert len(tensors) == llama.num_blocks * 7 * 2

    base_dir = export_hf_llama(llama, tmp_path / "base")
    ref = transformers.LlamaForCausalLM.from_pretrained(base_dir).eval()
    state = ref.state_dict()
    with torch.no_grad():
        for name, a in tensors.items():
            if ".lora_A." not in name:
                continue
            b = tensors[name.replace(".lora_A.", ".lora_B.")]
            target = name.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
            state[target].add_(b @ a * (cfg["lora_alpha"] / cfg["r"]))
    ids, _ = sample_batch(llama, 2, 16, seed=2)
    with torch.no_grad():
        assert (ref(ids).logits - part(ids)).abs().max() < 1e-4


def test_device_parts_share_frozen_base(llama: SplitLM) -> None:
    a, b = make_device_part(llama, 3, LORA, seed=0), make_device_part(llama, 3, LORA, seed=1)
    assert isinstance(llama, Llama)
    for name in ("embed_tokens.weight", "blocks.0.q.weight", "blocks.2.down.weight"):
        pa, pb = a.model.get_parameter(name), b.model.get_parameter(name)
        assert pa.data_ptr() == pb.data_ptr() == llama.get_parameter(name).data_ptr()
    assert a.adapters["0"]["q"].lora_A.data_ptr() != b.adapters["0"]["q"].lora_A.data_ptr()


def test_private_copy_holds_only_its_blocks(llama: SplitLM) -> None:
    device, server = split_model(llama, 2, lora=LORA, share_base=False)
    assert device.model is not llama and server.model is not llama
    assert device.model.blocks[0].q.weight.data_ptr() != llama.blocks[0].q.weight.data_ptr()
    assert torch.equal(device.model.blocks[0].q.weight, llama.blocks[0].q.weight)
    with pytest.raises(ConfigError, match="not held"):
        device.model.blocks[3](torch.zeros(1, 2, 64), None, None)
    ids, _ = sample_batch(llama, 2, 16, seed=0)
    with torch.no_grad():
        assert torch.equal(server(device(ids), 2), llama(ids))  # tied head: server keeps the embedding


def test_256_device_parts_cost_little(llama: SplitLM) -> None:
    """256 in-process devices over one base: each owns only its adapters (≤ 20 MB is the budget)."""
    gc.collect()
    parts = [make_device_part(llama, 4, LORA, seed=i) for i in range(256)]
    base_ptrs = {p.data_ptr() for p in llama.parameters()}
    owned = []
    for part in parts:
        tensors = list(part.parameters())
        assert not {t.data_ptr() for t in tensors} & base_ptrs
        owned.append(sum(t.numel() * t.element_size() for t in tensors))
    assert max(owned) < 20 * 2**20
    # q, o: 4·(64+64); k, v: 4·(64+32); gate, up, down: 4·(64+192) — per block, fp32, 4 blocks.
    assert (
        max(owned) == 4 * 4 * (2 * 512 + 2 * 384 + 3 * 1024) == 4 * 4 * lora_param_count(llama.config, LORA)
    )


def test_lora_config_validation() -> None:
    with pytest.raises(ConfigError, match="rank"):
        LoraConfig(rank=0)
    with pytest.raises(ConfigError, match="targets"):
        LoraConfig(targets=("w_in",))
    assert LoraConfig(targets=("q", "v")).projections("vit") == ("qkv",)
    assert LoraConfig(targets=("o",), mlp=True).projections("llama") == ("o", "gate", "up", "down")
    model = load_model(resolve_spec("llama-tiny"))
    with pytest.raises(ConfigError, match="select no Llama projection"):
        make_device_part(model, 1, LoraConfig(targets=("qkv",)))
