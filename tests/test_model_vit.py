"""Tiny ViT: split == whole, HF reference, timm/HF safetensors loading, trainable heads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import save_file

from sft_actors.errors import ConfigError, ModelSpecError
from sft_actors.model import (
    LoraConfig,
    ViT,
    load_config,
    load_model,
    lora_state_dict,
    resolve_spec,
    sample_batch,
    split_model,
    verify_split,
)

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def tiny() -> ViT:
    model = load_model("vit-tiny")
    assert isinstance(model, ViT)
    return model


@pytest.mark.parametrize(("cut", "server_start"), [(0, 0), (1, 1), (2, 1), (3, 3), (4, 2)])
@pytest.mark.parametrize("mlp", [False, True])
def test_split_equals_whole(tiny: ViT, cut: int, server_start: int, mlp: bool) -> None:
    result = verify_split(tiny, cut, server_start=server_start, batch=3, lora=LoraConfig(mlp=mlp))
    assert result.grads_compared == tiny.num_blocks * (4 if mlp else 2) * 2
    assert result.seq == 65
    assert result.max_abs_logit_diff <= 1e-6
    assert result.max_rel_grad_diff <= 1e-6


def test_device_output_shape_and_targets(tiny: ViT) -> None:
    device, server = split_model(tiny, 2, lora=LoraConfig(targets=("q", "v", "o")))
    images, labels = sample_batch(tiny, 5, 0, seed=0)
    hidden = device(images)
    assert hidden.shape == (5, 65, 64)  # (B, 1+N, C)
    logits = server(hidden, 2)
    assert logits.shape == (5, 10)
    assert server.loss(logits, labels).ndim == 0
    assert {k.split(".")[2] for k in lora_state_dict(device)} == {"qkv", "proj"}


def test_head_is_trainable_and_new_task_head(tiny: ViT) -> None:
    _, server = split_model(tiny, 2)
    head_params = set(map(id, server.trainable_head.parameters()))  # type: ignore[union-attr]
    assert head_params <= set(map(id, server.trainable_parameters()))
    assert server.trainable_head is not tiny.head_fc  # a copy: the shared base stays frozen
    _, server100 = split_model(tiny, 2, num_classes=100)
    images, _ = sample_batch(tiny, 2, 0, seed=0)
    out = server100(split_model(tiny, 2)[0](images), 2)
    assert out.shape == (2, 100)
    assert torch.equal(out, torch.zeros_like(out))  # zero-initialised new head
    _, frozen_head = split_model(tiny, 2, train_head=False)
    assert frozen_head.trainable_head is None
    llama = load_model("llama-tiny")
    with pytest.raises(ConfigError, match="ViT models only"):
        split_model(llama, 2, num_classes=3)


def test_overrides_make_a_fashion_mnist_vit() -> None:
    spec = resolve_spec("vit-tiny", image_size=28, patch_size=7, in_chans=1, num_classes=10)
    model = load_model(spec)
    assert model.config.num_tokens == 17  # type: ignore[union-attr]
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def _hf_vit(tmp: Path) -> torch.nn.Module:
    cfg = transformers.ViTConfig(
        image_size=32,
        patch_size=8,
        num_channels=3,
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=3,
        intermediate_size=96,
        num_labels=7,
        hidden_act="gelu",
        qkv_bias=True,
    )
    torch.manual_seed(0)
    ref = transformers.ViTForImageClassification(cfg).eval()
    ref.save_pretrained(tmp, safe_serialization=True)
    return ref


def test_hf_vit_directory_matches_transformers(tmp_path: Path) -> None:
    ref = _hf_vit(tmp_path)
    spec = resolve_spec(str(tmp_path))
    assert spec.family == "vit"
    model = load_model(spec)
    cfg = model.config
    assert (cfg.num_heads, cfg.num_classes, cfg.norm_eps) == (3, 7, 1e-12)  # type: ignore[union-attr]
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(images), ref(pixel_values=images).logits
    assert (ours - theirs).abs().max() < 1e-4


def test_timm_layout_file_loads_into_named_preset(tmp_path: Path, tiny: ViT) -> None:
    """vit-tiny weights written in timm names (``head.*``) load back via ``weights=``."""
    state = {
        ("head." + k[8:] if k.startswith("head_fc.") else k): v.contiguous()
        for k, v in tiny.state_dict().items()
    }
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    loaded = load_model(resolve_spec("vit-tiny", weights=path))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(images), tiny(images))
    # A new task: the checkpoint's 10-class head is replaced by a zero 4-class head.
    four = load_model(resolve_spec("vit-tiny", weights=path, num_classes=4))
    assert four(images).shape == (2, 4)
    # The file holds a 4-block dim-64 ViT, not a ViT-S.
    with pytest.raises(ModelSpecError, match="not vit-small"):
        load_config(resolve_spec("vit-small", weights=path))


def test_unknown_vit_tensors_are_refused(tmp_path: Path, tiny: ViT) -> None:
    state = {k.replace("head_fc.", "head."): v.contiguous() for k, v in tiny.state_dict().items()}
    state["reg_token"] = torch.zeros(1, 4, 64)
    path = tmp_path / "x.safetensors"
    save_file(state, str(path))
    with pytest.raises(ModelSpecError, match="reg_token"):
        load_model(str(path))


def test_named_vits_build_random_init() -> None:
    cfg = load_config("vit-base")
    assert (cfg.dim, cfg.num_blocks, cfg.num_heads, cfg.num_tokens) == (768, 12, 12, 197)  # type: ignore[union-attr]
    small = load_config("vit-small")
    assert (small.dim, small.num_heads) == (384, 6)
    with pytest.raises(ModelSpecError, match="do not exist"):
        resolve_spec("vit-small", weights="/nonexistent/vit.safetensors")
