"""Tokenizers: raw bytes for the tiny model, byte-level BPE rebuilt from a GGUF's metadata.

GGUF files carry the vocabulary (``tokenizer.ggml.tokens``), the merges and the token types
(3 = control/special) of a GPT-2 style byte-level BPE; :func:`bpe_from_vocab` rebuilds a
``tokenizers.Tokenizer`` from them, so no tokenizer.json download is needed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HfTokenizer

from sft_actors.errors import ModelSpecError

CONTROL_TOKEN_TYPE = 3


class Tokenizer(ABC):
    """Text ↔ token ids. ``pad_id`` fills right-padding (its labels are -100, so its value is moot).

    ``chat_template`` is the model's Jinja2 chat template (Hugging Face ``tokenizer_config.json``
    or ``chat_template.jinja``, GGUF ``tokenizer.chat_template``), None when it has none."""

    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int
    chat_template: str | None = None

    @abstractmethod
    def encode(self, text: str, *, add_bos: bool = False) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer(Tokenizer):
    """One token per UTF-8 byte (vocab 256); no special tokens. For tiny test models."""

    def __init__(self) -> None:
        self.vocab_size = 256
        self.bos_id = None
        self.eos_id = None
        self.pad_id = 0

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class BpeTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers`` byte-level BPE with the ids of its special tokens."""

    def __init__(
        self,
        tokenizer: HfTokenizer,
        *,
        bos_id: int | None,
        eos_id: int | None,
        pad_id: int,
        chat_template: str | None = None,
    ) -> None:
        self.hf = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.chat_template = chat_template

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        ids: list[int] = self.hf.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        text: str = self.hf.decode([int(i) for i in ids], skip_special_tokens=False)
        return text

    def to_json(self) -> str:
        return str(self.hf.to_str())

    @classmethod
    def from_json(
        cls,
        data: str,
        *,
        bos_id: int | None,
        eos_id: int | None,
        pad_id: int,
        chat_template: str | None = None,
    ) -> BpeTokenizer:
        return cls(
            HfTokenizer.from_str(data),
            bos_id=bos_id,
            eos_id=eos_id,
            pad_id=pad_id,
            chat_template=chat_template,
        )


def bpe_from_vocab(
    tokens: Sequence[str],
    merges: Sequence[str],
    token_types: Sequence[int],
    *,
    bos_id: int | None,
    eos_id: int | None,
    pad_id: int,
    split_digits: bool = True,
) -> BpeTokenizer:
    """A GPT-2 style byte-level BPE from GGUF vocabulary, merges and token types.

    ``split_digits`` reproduces the "smollm" pre-tokenizer (each digit is its own pre-token
    before the GPT-2 regex), which SmolLM2's tokenizer.json declares.
    """
    vocab = {tok: i for i, tok in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    try:
        bpe = models.BPE(vocab=vocab, merges=pairs, fuse_unk=False)  # type: ignore[arg-type]
    except Exception as exc:  # tokenizers raises a bare Exception on inconsistent vocab/merges
        raise ModelSpecError(f"tokenizer vocabulary and merges are inconsistent: {exc}") from exc
    tok = HfTokenizer(bpe)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if split_digits:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    specials = [tokens[i] for i, t in enumerate(token_types) if t == CONTROL_TOKEN_TYPE]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return BpeTokenizer(tok, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)
