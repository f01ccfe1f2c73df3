"""GGUF loader on a tiny file written here: Q/K un-permutation, tokenizer metadata, the cache."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from sft_actors.errors import ModelSpecError
from sft_actors.model import Llama, load_model, resolve_spec
from sft_actors.model.gguf_loader import cache_root, file_key, load_gguf

torch.set_num_threads(2)
_GGUF_NAMES = {
    "attn_norm": "attn_norm",
    "q": "attn_q",
    "k": "attn_k",
    "v": "attn_v",
    "o": "attn_output",
    "mlp_norm": "ffn_norm",
    "gate": "ffn_gate",
    "up": "ffn_up",
    "down": "ffn_down",
}


def _byte_tokens() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes (what byte-level BPE vocabularies store)."""
    keep = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    )
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp convert_hf_to_gguf.py's permute of Q/K rows (rotate-half → interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(model: Llama, path: Path) -> None:
    c = model.config
    tokens = [*_byte_tokens(), "Ġt", "he", "<|end|>"]  # 259 entries; the last one a control token
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_blocks)
    w.add_context_length(c.max_seq_len)
    w.add_embedding_length(c.dim)
    w.add_feed_forward_length(c.ffn_dim)
    w.add_head_count(c.num_heads)
    w.add_head_count_kv(c.num_kv_heads)
    w.add_rope_freq_base(c.rope_theta)
    w.add_rope_dimension_count(c.head_dim)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * 258 + [3])
    w.add_token_merges(["Ġ t", "h e"])
    w.add_eos_token_id(258)
    w.add_pad_token_id(258)
    w.add_tensor("token_embd.weight", model.embed_tokens.weight.numpy())
    w.add_tensor("output_norm.weight", model.norm.weight.numpy())
    for i, block in enumerate(model.blocks):
        for ours, theirs in _GGUF_NAMES.items():
            weight = block.get_parameter(f"{ours}.weight").detach()
            if ours == "q":
                weight = _permute(weight, c.num_heads)
            elif ours == "k":
                weight = _permute(weight, c.num_kv_heads)
            w.add_tensor(f"blk.{i}.{theirs}.weight", np.ascontiguousarray(weight.numpy()))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture
def tiny_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Llama, Path]:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model = load_model(resolve_spec("llama-tiny", seed=4, vocab_size=259))
    assert isinstance(model, Llama)
    path = tmp_path / "tiny.gguf"
    _write_gguf(model, path)
    return model, path


def test_gguf_round_trip_and_cache(tiny_gguf: tuple[Llama, Path]) -> None:
    source, path = tiny_gguf
    first = load_gguf(path)
    assert not first.from_cache
    assert (cache_root() / "gguf" / file_key(path) / "weights.safetensors").is_file()
    second = load_gguf(path)
    assert second.from_cache
    assert first.config == second.config
    assert all(torch.equal(first.state_dict[k], second.state_dict[k]) for k in first.state_dict)
    assert torch.equal(first.state_dict["blocks.1.q.weight"], source.blocks[1].q.weight)  # un-permuted

    loaded = load_model(str(path))
    ids = torch.randint(0, 259, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids), source(ids))
    tok = loaded.tokenizer
    assert tok is not None and tok.eos_id == 258 and tok.vocab_size == 259
    assert tok.encode(" the<|end|>") == [256, 257, 258]  # merges "Ġ t", "h e"; then the control token
    assert tok.decode(tok.encode("héllo wörld")) == "héllo wörld"


def test_cache_key_follows_content(tiny_gguf: tuple[Llama, Path]) -> None:
    _, path = tiny_gguf
    key = file_key(path)
    with path.open("r+b") as f:  # flip one byte of tensor data: a new key, never a stale hit
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    assert file_key(path) != key


def test_unsupported_gguf_architecture_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(
        ModelSpecError, match=r"'gpt2' is not supported; supported: \['llama', 'qwen2', 'qwen3'\]"
    ):
        load_model(str(path), use_cache=False)
