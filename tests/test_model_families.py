"""Llama-family checkpoints (Llama 1-3.x RoPE scalings, Mistral, Qwen2, Qwen3) against transformers.

Each family is a tiny random model made here with transformers' own config class and saved with
``save_pretrained`` (nothing is downloaded). For each: our logits vs ``AutoModelForCausalLM`` in
fp32 at a length that exercises the scaling / window, LoRA gradients vs PEFT, split == whole,
and export → transformers. Then: sharded and bf16 checkpoints, every refusal naming its field,
and GGUF files (written here with ``gguf.GGUFWriter``) against our HF loader of the same weights.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
import transformers
from typer.testing import CliRunner

from sft_actors.cli.model import app
from sft_actors.errors import ConfigError, ModelSpecError
from sft_actors.model import Llama, LoraConfig, export_hf_llama, load_model, resolve_spec, verify_split
from sft_actors.model.config import RopeScaling, config_from_dict, config_to_dict
from sft_actors.model.memory import block_param_count, lora_shapes
from sft_actors.model.reference import verify_against_transformers
from tests.test_model_gguf import _byte_tokens, _permute

torch.set_num_threads(1)
VOCAB = 128
SEQ = 48  # longer than original_max_position_embeddings (16) and the windows (8) below
_BASE: dict[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "initializer_range": 0.1,  # larger weights: RoPE/window mistakes show well above tolerance
    "max_position_embeddings": 64,
}
_LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
    "rope_theta": 500000.0,
}
FAMILIES: dict[str, tuple[Any, dict[str, Any]]] = {
    "llama": (transformers.LlamaConfig, {"tie_word_embeddings": True}),
    "llama_linear": (transformers.LlamaConfig, {"rope_parameters": {"rope_type": "linear", "factor": 4.0}}),
    "llama_dynamic": (
        transformers.LlamaConfig,
        {"max_position_embeddings": 16, "rope_parameters": {"rope_type": "dynamic", "factor": 2.0}},
    ),
    "llama3": (
        transformers.LlamaConfig,
        {"rope_parameters": _LLAMA3, "attention_bias": True, "mlp_bias": True},
    ),
    "yarn": (
        transformers.LlamaConfig,
        {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}},
    ),
    "mistral": (transformers.MistralConfig, {"sliding_window": 8, "head_dim": 24}),
    "qwen2": (
        transformers.Qwen2Config,
        {
            "use_sliding_window": True,
            "sliding_window": 8,
            "max_window_layers": 1,
            "tie_word_embeddings": True,
        },
    ),
    "qwen3": (transformers.Qwen3Config, {"head_dim": 32}),
}


def _save(tmp: Path, cls: Any, seed: int = 0, **kwargs: Any) -> torch.nn.Module:
    torch.manual_seed(seed)
    ref = transformers.AutoModelForCausalLM.from_config(cls(**{**_BASE, **kwargs})).eval()
    with torch.no_grad():  # biases and norms start at 0 / 1: make them matter
        for p in ref.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    ref.save_pretrained(tmp)
    return ref


def _ids(seed: int = 1, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab, (2, SEQ), generator=torch.Generator().manual_seed(seed))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_matches_transformers(tmp_path: Path, family: str) -> None:
    cls, kwargs = FAMILIES[family]
    ref = _save(tmp_path / "hf", cls, **kwargs)
    model = load_model(str(tmp_path / "hf"))
    assert isinstance(model, Llama)
    ids = _ids()
    with torch.no_grad():
        ours, theirs = model(ids), ref(ids).logits
        # The feature under test is exercised: dropping it moves the logits far beyond tolerance.
        plain = Llama(dataclasses.replace(model.config, rope_scaling=None, sliding_window=None))
        plain.load_state_dict(model.state_dict())
        ablated = _max_diff(plain(ids), theirs)
    diff = _max_diff(ours, theirs)
    assert diff <= 1e-4, diff
    if family not in ("llama", "qwen3"):
        assert ablated > 1e-3, ablated

    lora = LoraConfig(rank=4, mlp=True)
    result = verify_against_transformers(model, tmp_path / "hf", seq=SEQ, lora=lora)
    assert result.max_abs_logit_diff_vs_reference <= 1e-4
    assert result.max_rel_lora_grad_diff_vs_reference <= 1e-4
    assert result.lora_grads_compared_vs_reference == 2 * 2 * 7
    split = verify_split(model, 1, seq=SEQ, lora=lora)
    assert split.max_abs_logit_diff <= 1e-5 and split.max_rel_grad_diff <= 1e-5

    export_hf_llama(model, tmp_path / "export")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32).eval()
    assert type(back) is type(ref)
    with torch.no_grad():
        assert _max_diff(back(ids).logits, ours) <= 1e-5
    assert load_model(str(tmp_path / "export")).config == model.config


def test_both_rope_spellings_follow_transformers_5(tmp_path: Path) -> None:
    """rope_parameters says default, rope_scaling says llama3: transformers 5 applies llama3."""
    ref_dir = tmp_path / "hf"
    _save(ref_dir, transformers.LlamaConfig)
    cfg = json.loads((ref_dir / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    cfg["rope_scaling"] = {k: v for k, v in _LLAMA3.items() if k != "rope_theta"}
    (ref_dir / "config.json").write_text(json.dumps(cfg))
    model = load_model(str(ref_dir))
    assert model.config.rope_scaling is not None and model.config.rope_scaling.kind == "llama3"  # type: ignore[union-attr]
    ref = transformers.AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        assert _max_diff(model(_ids()), ref(_ids()).logits) <= 1e-4


def test_sharded_bf16_checkpoint_loads(tmp_path: Path) -> None:
    ref = _save(tmp_path / "full", transformers.Qwen2Config)
    ref.to(torch.bfloat16).save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    (tmp_path / "hf" / "stray.safetensors").write_bytes(b"not read: the index does not name it")
    model = load_model(str(tmp_path / "hf"))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        assert _max_diff(model(_ids()), theirs(_ids()).logits) <= 1e-4
    (tmp_path / "hf" / shards[-1]).unlink()
    with pytest.raises(ModelSpecError, match=shards[-1]):
        load_model(str(tmp_path / "hf"))


def _hf_dir(tmp: Path, model_type: str = "llama", **fields: Any) -> Path:
    cfg = {
        "model_type": model_type,
        "vocab_size": 16,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        **fields,
    }
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "config.json").write_text(json.dumps(cfg))
    return tmp


@pytest.mark.parametrize(
    ("model_type", "fields", "named"),
    [
        ("llama", {"hidden_act": "gelu"}, "hidden_act"),
        ("llama", {"rope_scaling": {"rope_type": "longrope", "factor": 2.0}}, "rope_type"),
        (
            "llama",
            {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "low_freq_factor": 1}},
            "low_freq_factor",
        ),
        ("llama", {"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
        ("llama", {"final_logit_softcapping": 30.0}, "final_logit_softcapping"),
        ("llama", {"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
        ("llama", {"sliding_window": 4096}, "sliding_window"),
        ("llama", {"attention_dropout": 0.1}, "attention_dropout"),
        ("llama", {"num_attention_heads": None}, "num_attention_heads"),
        ("mistral", {"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
        ("mistral", {"attention_bias": True}, "attention_bias"),
        (
            "qwen2",
            {"use_sliding_window": True, "sliding_window": 4, "layer_types": ["x", "y"]},
            "layer_types",
        ),
        ("qwen2", {"attention_bias": False}, "attention_bias"),
        ("qwen3", {"use_mrope": True}, "use_mrope"),
    ],
)
def test_refusals_name_the_field(tmp_path: Path, model_type: str, fields: dict[str, Any], named: str) -> None:
    path = _hf_dir(tmp_path, model_type, **fields)
    with pytest.raises(ModelSpecError, match=named) as info:
        load_model(str(path))
    assert "config.json" in str(info.value)


def test_unsupported_model_type_lists_the_supported_ones(tmp_path: Path) -> None:
    path = _hf_dir(tmp_path, "gemma2")
    with pytest.raises(ModelSpecError, match=r"model_type 'gemma2'.*llama.*mistral.*qwen2.*qwen3"):
        resolve_spec(str(path))


def test_config_dict_round_trip_and_memory_counts() -> None:
    config = load_model_config_qwen3()
    assert config_from_dict(json.loads(json.dumps(config_to_dict(config)))) == config
    model = Llama(config)
    assert block_param_count(config) == sum(p.numel() for p in model.blocks[0].parameters())
    shapes = lora_shapes(config, LoraConfig(mlp=True))
    assert shapes["q"] == (64, 4 * 32) and shapes["o"] == (4 * 32, 64)
    for name, (fan_in, fan_out) in shapes.items():
        layer = getattr(model.blocks[0], name)
        assert (layer.in_features, layer.out_features) == (fan_in, fan_out)


def load_model_config_qwen3() -> Any:
    from sft_actors.model.config import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB,
        dim=64,
        num_blocks=2,
        num_heads=4,
        num_kv_heads=2,
        ffn_dim=96,
        arch="qwen3",
        explicit_head_dim=32,
        qkv_bias=True,
        o_bias=True,
        qk_norm=True,
        rope_scaling=RopeScaling(kind="yarn", factor=4.0, original_max_position_embeddings=16),
        sliding_window=8,
        full_attention_blocks=(0,),
    )


# --- GGUF ----------------------------------------------------------------------------------------
_GGUF_NAMES = {
    "attn_norm": "attn_norm",
    "q": "attn_q",
    "k": "attn_k",
    "v": "attn_v",
    "o": "attn_output",
    "q_norm": "attn_q_norm",
    "k_norm": "attn_k_norm",
    "mlp_norm": "ffn_norm",
    "gate": "ffn_gate",
    "up": "ffn_up",
    "down": "ffn_down",
}


def _llama3_rope_freqs(theta: float, head_dim: int, p: dict[str, Any]) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's ``rope_freqs`` for Llama 3 (divisors per frequency)."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    old, low, high, factor = (
        p["original_max_position_embeddings"],
        p["low_freq_factor"],
        p["high_freq_factor"],
        p["factor"],
    )
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _write_gguf(model: Llama, path: Path, arch: str, extra: dict[str, Any] | None = None) -> None:
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_blocks)
    w.add_context_length(c.max_seq_len)
    w.add_embedding_length(c.dim)
    w.add_feed_forward_length(c.ffn_dim)
    w.add_head_count(c.num_heads)
    w.add_head_count_kv(c.num_kv_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_freq_base(c.rope_theta)
    w.add_rope_dimension_count(c.head_dim)
    w.add_layer_norm_rms_eps(c.norm_eps)
    for key, value in (extra or {}).items():
        if key == "rope_freqs.weight":
            w.add_tensor(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_float32(key, value)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([*_byte_tokens(), "Ġt", "he", "<|end|>"])
    w.add_token_types([1] * 258 + [3])
    w.add_token_merges(["Ġ t", "h e"])
    w.add_tensor("token_embd.weight", model.embed_tokens.weight.numpy())
    w.add_tensor("output_norm.weight", model.norm.weight.numpy())
    if model.lm_head is not None:
        w.add_tensor("output.weight", model.lm_head.weight.numpy())
    for i, block in enumerate(model.blocks):
        for key, tensor in block.state_dict().items():
            ours, kind = key.split(".")
            t = tensor.detach()
            if arch == "llama" and ours in ("q", "k"):  # only the llama converter permutes
                t = _permute(t, c.num_heads if ours == "q" else c.num_kv_heads)
            w.add_tensor(f"blk.{i}.{_GGUF_NAMES[ours]}.{kind}", np.ascontiguousarray(t.numpy()))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


_LINEAR = {"rope_parameters": {"rope_type": "linear", "factor": 4.0}}
_YARN = {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}}
GGUF_CASES: dict[str, tuple[Any, dict[str, Any], str, dict[str, Any]]] = {
    "llama3_rope_freqs": (transformers.LlamaConfig, {"rope_parameters": _LLAMA3}, "llama", {}),
    "linear": (
        transformers.LlamaConfig,
        _LINEAR,
        "llama",
        {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0},
    ),
    "yarn": (
        transformers.LlamaConfig,
        _YARN,
        "llama",
        {
            "llama.rope.scaling.type": "yarn",
            "llama.rope.scaling.factor": 4.0,
            "llama.rope.scaling.original_context_length": 16,
        },
    ),
    "qwen2_bias": (transformers.Qwen2Config, {}, "qwen2", {}),
    "qwen3_norms": (transformers.Qwen3Config, {"head_dim": 32}, "qwen3", {}),
}


@pytest.mark.parametrize("case", list(GGUF_CASES))
def test_gguf_matches_our_hf_loader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cls, kwargs, arch, extra = GGUF_CASES[case]
    _save(tmp_path / "hf", cls, vocab_size=259, **kwargs)
    hf = load_model(str(tmp_path / "hf"))
    assert isinstance(hf, Llama)
    if case == "llama3_rope_freqs":
        extra = {"rope_freqs.weight": _llama3_rope_freqs(500000.0, hf.config.head_dim, _LLAMA3)}
    _write_gguf(hf, tmp_path / "m.gguf", arch, extra)
    for _ in range(2):  # the second load comes from the cache
        ours = load_model(str(tmp_path / "m.gguf"))
        with torch.no_grad():
            assert _max_diff(ours(_ids(vocab=259)), hf(_ids(vocab=259))) <= 1e-4
    assert ours.config.qk_norm is (arch == "qwen3") and ours.config.qkv_bias is (arch == "qwen2")  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"llama.rope.scaling.type": "longrope"}, "rope.scaling.type"),
        ({"llama.attn_logit_softcapping": 30.0}, "llama.attn_logit_softcapping"),
        ({"llama.rope.scaling.attn_factor": 2.0}, "attn_factor"),
    ],
)
def test_gguf_refusals_name_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extra: dict[str, Any], named: str
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model = load_model(resolve_spec("llama-tiny", vocab_size=259))
    assert isinstance(model, Llama)
    _write_gguf(model, tmp_path / "m.gguf", "llama", extra)
    with pytest.raises(ModelSpecError, match=named):
        load_model(str(tmp_path / "m.gguf"))


def test_export_refuses_what_transformers_cannot_express(tmp_path: Path) -> None:
    model = load_model(resolve_spec("llama-tiny"))
    freqs = RopeScaling(kind="default", freq_factors=(1.0,) * 8)
    model.config = dataclasses.replace(model.config, rope_scaling=freqs)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="rope_freqs"):
        export_hf_llama(model, tmp_path)
    model.config = dataclasses.replace(model.config, rope_scaling=None, qk_norm=True)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="q/k norms"):
        export_hf_llama(model, tmp_path)


# --- CLI -------------------------------------------------------------------------------------
runner = CliRunner()


def test_cli_verify_reference_transformers_json(tmp_path: Path) -> None:
    """``sft model verify DIR --reference transformers --json`` (cut defaults to half the blocks)."""
    _save(tmp_path / "hf", transformers.Qwen3Config, head_dim=32)
    args = ["verify", str(tmp_path / "hf"), "--seq", "24", "--reference", "transformers", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output.strip().splitlines()[-1])
    assert data["ok"] and data["cut"] == 1 and data["max_abs_logit_diff"] <= 1e-5
    assert data["max_abs_logit_diff_vs_reference"] <= 1e-4
    assert data["max_rel_lora_grad_diff_vs_reference"] <= 1e-4
    assert data["reference"].startswith("transformers")


def test_cli_reference_refusals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result = runner.invoke(app, ["verify", "llama-tiny", "--cut", "1", "--reference", "transformers"])
    assert result.exit_code == 2 and "Hugging Face" in result.output
    result = runner.invoke(app, ["verify", "llama-tiny", "--cut", "1", "--reference", "vllm"])
    assert result.exit_code == 2 and "--reference 'vllm'" in result.output
    _save(tmp_path / "hf", transformers.LlamaConfig)
    import importlib

    real = importlib.import_module

    def no_transformers(name: str, *args: Any) -> Any:
        if name in ("transformers", "peft"):
            raise ImportError(name)
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", no_transformers)
    result = runner.invoke(app, ["verify", str(tmp_path / "hf"), "--cut", "1", "--reference", "transformers"])
    assert result.exit_code == 2 and "pip install transformers peft" in result.output
