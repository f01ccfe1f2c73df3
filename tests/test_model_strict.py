"""The model layer honours or refuses every field that changes the math, early and by name.

Tied heads as transformers 5 ties them, checkpoints checked from the safetensors headers by
``load_config`` (what ``sft topology check`` calls), configs typed as strictly as transformers',
reference failures as one error line, dynamic NTK RoPE usable past ``max_position_embeddings``,
and GGUF keys read as llama.cpp reads them.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from structlog.testing import capture_logs
from typer.testing import CliRunner

from sft_actors.cli.model import app
from sft_actors.errors import ModelSpecError
from sft_actors.model import Llama, load_model, resolve_spec
from sft_actors.model.reference import verify_against_transformers
from sft_actors.model.spec import load_config
from sft_actors.train.inputs import check_activations
from tests.test_model_families import _hf_dir, _ids, _max_diff, _save, _write_gguf

torch.set_num_threads(1)


def _edit_config(directory: Path, **fields: Any) -> None:
    cfg = json.loads((directory / "config.json").read_text())
    cfg.update(fields)
    (directory / "config.json").write_text(json.dumps(cfg))


def _edit_weights(directory: Path, **tensors: torch.Tensor | None) -> None:
    path = directory / "model.safetensors"
    state = load_file(str(path))
    for name, tensor in tensors.items():
        name = name.replace("__", ".")
        if tensor is None:
            del state[name]
        else:
            state[name] = tensor
    save_file(state, str(path), metadata={"format": "pt"})


# --- 1. tied embeddings ---------------------------------------------------------------------------
def test_stored_head_that_differs_is_untied_like_transformers(tmp_path: Path) -> None:
    hf = tmp_path / "hf"
    _save(hf, transformers.LlamaConfig, tie_word_embeddings=False)
    _edit_config(hf, tie_word_embeddings=True)  # the config lies: the stored head is its own
    ref = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    with capture_logs() as logs:
        model = load_model(str(hf))
    assert model.config.tie_embeddings is False  # type: ignore[union-attr]
    assert load_config(str(hf)).tie_embeddings is False  # type: ignore[union-attr]
    with torch.no_grad():
        assert _max_diff(model(_ids()), ref(_ids()).logits) <= 1e-4
    warned = [e for e in logs if e["event"] == "tied_head_differs_untied"]
    assert warned and warned[0]["file"] == str(hf / "config.json")


def test_stored_head_equal_to_embedding_stays_tied(tmp_path: Path) -> None:
    hf = tmp_path / "hf"
    ref = _save(hf, transformers.LlamaConfig, tie_word_embeddings=True)
    _edit_weights(hf, lm_head__weight=ref.model.embed_tokens.weight.detach().clone())
    model = load_model(str(hf))
    assert model.config.tie_embeddings is True  # type: ignore[union-attr]
    assert load_config(str(hf)).tie_embeddings is True  # type: ignore[union-attr]
    with torch.no_grad():
        assert _max_diff(model(_ids()), ref(_ids()).logits) <= 1e-4


# --- 2. the checkpoint checked from its headers by load_config --------------------------------------
def test_load_config_finds_a_missing_shard(tmp_path: Path) -> None:
    ref = _save(tmp_path / "full", transformers.Qwen2Config)
    ref.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    last = sorted(set(index["weight_map"].values()))[-1]
    (tmp_path / "hf" / last).unlink()
    with pytest.raises(ModelSpecError, match=last):
        load_config(str(tmp_path / "hf"))


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (
            {"model__layers__1__mlp__up_proj__weight": None},
            r"lacks .*'model\.layers\.1\.mlp\.up_proj\.weight'",
        ),
        ({"model__layers__0__mlp__extra__weight": torch.zeros(2)}, "'model.layers.0.mlp.extra.weight'"),
        (
            {"model__layers__0__self_attn__k_norm__weight": torch.ones(16)},
            r"k_norm\.weight' has shape \(16,\)",
        ),
    ],
)
def test_load_config_checks_each_tensor_by_its_hf_name(
    tmp_path: Path, edit: dict[str, torch.Tensor | None], named: str
) -> None:
    hf = tmp_path / "hf"
    _save(hf, transformers.Qwen3Config, head_dim=32)
    _edit_weights(hf, **edit)
    with pytest.raises(ModelSpecError, match=named) as info:
        load_config(str(hf))
    assert str(hf / "model.safetensors") in str(info.value)
    with pytest.raises(ModelSpecError, match=named):
        load_model(str(hf))


def test_shape_error_names_file_and_hf_name(tmp_path: Path) -> None:
    hf = tmp_path / "hf"
    _save(hf, transformers.LlamaConfig)
    _edit_config(hf, intermediate_size=80)
    with pytest.raises(ModelSpecError) as info:
        load_config(str(hf))
    msg = str(info.value)
    assert str(hf / "model.safetensors") in msg and "'model.layers.0.mlp.down_proj.weight'" in msg


# --- 3. strict types and transformers' own refusals ---------------------------------------------------
@pytest.mark.parametrize(
    ("model_type", "fields", "named"),
    [
        ("llama", {"num_hidden_layers": 4.7}, "num_hidden_layers"),
        ("llama", {"vocab_size": "258"}, "vocab_size"),
        ("llama", {"num_attention_heads": True}, "num_attention_heads"),
        ("llama", {"tie_word_embeddings": 1}, "tie_word_embeddings"),
        ("llama", {"rms_norm_eps": "1e-5"}, "rms_norm_eps"),
        ("llama", {"rope_theta": "10000"}, "rope_theta"),
        ("llama", {"rope_parameters": {"rope_type": "linear", "factor": "2"}}, "factor"),
        (
            "llama",
            {"rope_parameters": {"rope_type": "yarn", "original_max_position_embeddings": 16}},
            "factor",
        ),
        (
            "qwen3",
            {"use_sliding_window": False, "layer_types": ["full_attention", "sliding_attention"]},
            "layer_types",
        ),
    ],
)
def test_config_types_are_as_strict_as_transformers(
    tmp_path: Path, model_type: str, fields: dict[str, Any], named: str
) -> None:
    path = _hf_dir(tmp_path, model_type, **fields)
    with pytest.raises(ModelSpecError, match=named) as info:
        load_config(str(path))
    assert "config.json" in str(info.value)


def test_reference_failure_is_one_error_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _save(tmp_path / "hf", transformers.LlamaConfig)
    model = load_model(str(tmp_path / "hf"))

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise KeyError("factor")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    with pytest.raises(ModelSpecError, match=r"transformers could not load .* as a reference: KeyError"):
        verify_against_transformers(model, tmp_path / "hf", seq=8)
    args = ["verify", str(tmp_path / "hf"), "--cut", "1", "--seq", "8", "--reference", "transformers"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "transformers could not load" in result.output


# --- 4. dynamic NTK RoPE reaches max_position_embeddings × factor ------------------------------------
def test_dynamic_rope_context_is_max_positions_times_factor(tmp_path: Path) -> None:
    rope = {"rope_type": "dynamic", "factor": 2.0}
    ref = _save(tmp_path / "hf", transformers.LlamaConfig, max_position_embeddings=16, rope_parameters=rope)
    config = load_config(str(tmp_path / "hf"))
    assert config.max_seq_len == 32  # type: ignore[union-attr]
    model = load_model(str(tmp_path / "hf"))
    assert isinstance(model, Llama)
    ids = _ids()[:, :32]
    check_activations(model, torch.zeros(1, 32, model.config.dim))  # the run's context check passes
    with torch.no_grad():
        ours, theirs = model(ids), ref(ids).logits
        plain = Llama(dataclasses.replace(model.config, rope_scaling=None))
        plain.load_state_dict(model.state_dict())
        assert _max_diff(plain(ids), theirs) > 1e-3  # the scaling acts at this length
    assert _max_diff(ours, theirs) <= 1e-4


# --- 5. GGUF keys as llama.cpp reads them ----------------------------------------------------------
def test_gguf_sliding_window_on_llama_is_ignored_with_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    _save(tmp_path / "hf", transformers.LlamaConfig, vocab_size=259)
    hf = load_model(str(tmp_path / "hf"))
    assert isinstance(hf, Llama)
    _write_gguf(hf, tmp_path / "m.gguf", "llama", {"llama.attention.sliding_window": 8})
    with capture_logs() as logs:
        ours = load_model(str(tmp_path / "m.gguf"))
    assert ours.config.sliding_window is None  # type: ignore[union-attr]
    with torch.no_grad():
        assert _max_diff(ours(_ids(vocab=259)), hf(_ids(vocab=259))) <= 1e-4
    warned = [e for e in logs if e["event"] == "gguf_key_ignored_like_llama_cpp"]
    assert warned and warned[0]["key"] == "llama.attention.sliding_window" and warned[0]["value"] == 8


def test_gguf_shape_error_names_file_and_gguf_tensor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model = load_model(resolve_spec("llama-tiny", vocab_size=259))
    assert isinstance(model, Llama)
    model.config = dataclasses.replace(model.config, ffn_dim=model.config.ffn_dim + 2)  # the key lies
    _write_gguf(model, tmp_path / "m.gguf", "llama")
    with pytest.raises(ModelSpecError) as info:
        load_model(str(tmp_path / "m.gguf"))
    assert str(tmp_path / "m.gguf") in str(info.value) and "'blk.0.ffn_gate.weight'" in str(info.value)


@pytest.mark.parametrize("tied", [True, False])
def test_expected_shapes_match_the_model(tied: bool) -> None:
    """The header check's arithmetic agrees with the module tree, for every optional tensor."""
    from sft_actors.model.config import LlamaConfig
    from sft_actors.model.hf_checkpoint import expected_shapes
    from sft_actors.model.hf_loader import hf_tensor_name

    config = LlamaConfig(
        vocab_size=40,
        dim=24,
        num_blocks=2,
        num_heads=4,
        num_kv_heads=2,
        ffn_dim=20,
        explicit_head_dim=10,
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        qk_norm=True,
        tie_embeddings=tied,
    )
    with torch.device("meta"):
        model = Llama(config)
    built = {hf_tensor_name(k): tuple(v.shape) for k, v in model.state_dict().items()}
    assert expected_shapes(config) == built


def test_topology_check_refuses_a_checkpoint_missing_a_tensor(tmp_path: Path) -> None:
    """``sft topology check`` (not minutes into the run) names the file and the HF tensor."""
    from tests.test_topology import CHECK_BASE, _check

    hf = tmp_path / "hf"
    _save(hf, transformers.LlamaConfig, num_hidden_layers=4)
    _edit_weights(hf, model__layers__2__mlp__up_proj__weight=None)
    path = tmp_path / "t.toml"
    path.write_text(CHECK_BASE.replace('"llama-tiny"', f'"{hf}"'))
    out = _check(path)
    assert out.exit_code == 2 and len(out.stderr.splitlines()) == 1, out.output
    assert "key 'model'" in out.stderr and "'model.layers.2.mlp.up_proj.weight'" in out.stderr
    assert str(hf / "model.safetensors") in out.stderr
