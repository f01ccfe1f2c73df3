"""Instruction data: conversations, trained with the loss on the assistant's responses only.

Records (JSON Lines, CSV or parquet; see :mod:`sft_actors.data.records`) are either a pair
``{"prompt": …, "response": …}`` (keys ``prompt_key`` / ``response_key``; one user turn and
one assistant turn) or a chat ``{"messages": [{"role": "system"|"user"|"assistant",
"content": …}, …]}`` (key ``messages_key``) with at least one assistant message. Anything else
is a :class:`~sft_actors.errors.DatasetCorrupt` naming file:line.

Each conversation becomes one row of ``seq_len`` tokens (never packed with another): the
rendering of :class:`~sft_actors.data.chat_template.ChatRenderer` (the model's chat template,
or the plain format), tokenized segment by segment. ``labels`` equal ``input_ids`` on response
tokens (the assistant's content and what the template renders to close its turn; in the plain
format the content and an appended EOS) and are ``IGNORE_INDEX`` (-100) everywhere else: system
and user turns, role headers, right padding. A longer conversation is truncated on the right; one
whose response tokens are all cut away (nothing left to learn from) is dropped and counted in
:attr:`EncodedInstructions.dropped`, and a warning names how many.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from sft_actors.data.chat_template import ROLES, ChatRenderer, Message
from sft_actors.data.common import split_members
from sft_actors.data.packing import IGNORE_INDEX, PackedSequences
from sft_actors.data.records import Record, require_str
from sft_actors.errors import ConfigError, DatasetCorrupt
from sft_actors.log import get_logger


class ChatTokenizer(Protocol):
    """What instruction encoding needs of a tokenizer (``sft_actors.model.Tokenizer`` fits)."""

    bos_id: int | None
    eos_id: int | None
    pad_id: int

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass(frozen=True, kw_only=True, slots=True)
class Conversation:
    """One instruction sample: never split across train/held-out or across devices."""

    messages: tuple[Message, ...]  # (role, content), at least one assistant message
    source: str  # "data.jsonl:12"
    group: str  # partitioning label: the group field, or the file's group


def conversation_from_record(
    record: Record,
    *,
    prompt_key: str,
    response_key: str,
    messages_key: str,
    group: str,
    name: str | None = None,
) -> Conversation:
    """A :class:`Conversation` from one record; ``DatasetCorrupt`` naming file:line otherwise.

    ``name`` is the file as the source names it (default: its file name), e.g. ``sub/a.jsonl``
    for a file in a folder."""
    fields = record.fields
    source = f"{name or record.file.name}:{record.line}"
    if messages_key in fields and fields[messages_key] is not None:
        raw = fields[messages_key]
        if not isinstance(raw, list) or not raw:
            raise DatasetCorrupt(f"{record.where}: {messages_key!r} must be a non-empty list of messages")
        messages: list[Message] = []
        for i, m in enumerate(raw):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise DatasetCorrupt(
                    f"{record.where}: {messages_key}[{i}] must be an object with role "
                    f'"system", "user" or "assistant" and a string content, found {m!r:.80}'
                )
            messages.append((m["role"], m["content"]))
        if not any(role == "assistant" for role, _ in messages):
            raise DatasetCorrupt(f"{record.where}: no assistant message, so nothing to learn; add a response")
        return Conversation(messages=tuple(messages), source=source, group=group)
    if prompt_key not in fields and response_key not in fields:
        found = ", ".join(repr(k) for k in fields) or "none"
        raise DatasetCorrupt(
            f"{record.where}: neither {messages_key!r} nor {prompt_key!r}/{response_key!r} "
            f"(fields: {found}); set messages_key, or prompt_key and response_key"
        )
    prompt = require_str(record, prompt_key, "prompt_key")
    response = require_str(record, response_key, "response_key")
    return Conversation(
        messages=(("user", prompt), ("assistant", response)),
        source=source,
        group=group,
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class EncodedInstructions:
    """Rows ready for the model (``sequences``) and how many conversations were dropped."""

    sequences: PackedSequences
    dropped: int  # conversations whose response was truncated away entirely
    truncated: int  # conversations cut at seq_len (their response partly kept)


def encode_conversation(
    conv: Conversation, tokenizer: ChatTokenizer, renderer: ChatRenderer, eos_id: int
) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one conversation, untruncated (labels -100 off the responses)."""
    ids: list[int] = []
    labels: list[int] = []
    for text, is_response in renderer.segments(conv.messages, conv.source):
        piece = tokenizer.encode(text)
        ids.extend(piece)
        labels.extend(piece if is_response else [IGNORE_INDEX] * len(piece))
        if is_response and renderer.plain:
            ids.append(eos_id)
            labels.append(eos_id)
    return ids, labels


def generation_prompt_ids(
    messages: Sequence[Message], tokenizer: ChatTokenizer, renderer: ChatRenderer, source: str = "prompt"
) -> list[int]:
    """Token ids of ``messages`` and the prompt for the assistant's turn, tokenized segment by
    segment as :func:`encode_conversation` tokenizes the part of a conversation before a
    response (what the model saw before it learned to answer)."""
    segments = renderer.segments((*messages, ("assistant", "")), source)
    responses = [i for i, (_, is_response) in enumerate(segments) if is_response]
    before = segments[: responses[-1]] if responses else segments
    return [t for text, _ in before for t in tokenizer.encode(text)]


def keeps_response(labels: Sequence[int], seq_len: int) -> bool:
    """Whether a conversation's ``labels`` keep a response token within ``seq_len`` (position 0
    is never predicted, since the model shifts labels by one: it alone is no target)."""
    return any(label != IGNORE_INDEX for label in labels[1:seq_len])


def encode_conversations(
    conversations: Iterable[Conversation],
    tokenizer: ChatTokenizer,
    renderer: ChatRenderer,
    *,
    seq_len: int,
    name: str = "instructions",
) -> EncodedInstructions:
    """One ``seq_len`` row per conversation: truncated on the right, padded with ``pad_id``
    (labels -100). Raises :class:`ConfigError` when no conversation keeps a response token."""
    if seq_len < 2:
        raise ConfigError(f"seq_len must be >= 2 for next-token prediction, got {seq_len}")
    eos = tokenizer.eos_id if tokenizer.eos_id is not None else tokenizer.pad_id
    rows_ids: list[np.ndarray] = []
    rows_labels: list[np.ndarray] = []
    dropped = truncated = real = 0
    for conv in conversations:
        ids, labels = encode_conversation(conv, tokenizer, renderer, eos)
        if len(ids) > seq_len:
            truncated += 1
            ids, labels = ids[:seq_len], labels[:seq_len]
        if not keeps_response(labels, seq_len):
            dropped += 1
            continue
        row_ids = np.full(seq_len, tokenizer.pad_id, dtype=np.int64)
        row_labels = np.full(seq_len, IGNORE_INDEX, dtype=np.int64)
        row_ids[: len(ids)] = ids
        row_labels[: len(labels)] = labels
        rows_ids.append(row_ids)
        rows_labels.append(row_labels)
        real += len(ids)
    if dropped:
        get_logger(component="data.instruct").warning(
            "instruction_samples_dropped",
            dataset=name,
            dropped=dropped,
            seq_len=seq_len,
            reason="the response starts after seq_len tokens; raise seq_len or shorten prompts",
        )
    if not rows_ids:
        raise ConfigError(
            f"{name}: no conversation keeps a response token within seq_len {seq_len} "
            f"({dropped} dropped); raise seq_len or shorten the prompts"
        )
    sequences = PackedSequences(
        input_ids=torch.from_numpy(np.stack(rows_ids)),
        labels=torch.from_numpy(np.stack(rows_labels)),
        num_tokens=real,
    )
    return EncodedInstructions(sequences=sequences, dropped=dropped, truncated=truncated)


def renderer_for(tokenizer: ChatTokenizer, chat_template: str | None) -> ChatRenderer:
    """A renderer with ``chat_template`` (None: plain) and the tokenizer's BOS/EOS strings."""

    def text_of(token: int | None) -> str | None:
        return tokenizer.decode([token]) if token is not None else None

    return ChatRenderer(
        chat_template, bos_token=text_of(tokenizer.bos_id), eos_token=text_of(tokenizer.eos_id)
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class InstructionCorpus:
    """A split of conversations; the counterpart of :class:`~sft_actors.data.text.TextCorpus`.

    ``chat_template`` is the ``[run.data] chat_template`` setting ("auto", "none" or a path),
    resolved against the model's tokenizer when the corpus is encoded."""

    name: str
    split: str
    documents: tuple[Conversation, ...]
    class_names: tuple[str, ...]
    chat_template: str = "auto"

    def __len__(self) -> int:
        return len(self.documents)

    def label_array(self) -> np.ndarray:
        index = {g: i for i, g in enumerate(self.class_names)}
        return np.fromiter(
            (index[d.group] for d in self.documents), dtype=np.int64, count=len(self.documents)
        )

    def subset(self, indices: Sequence[int] | np.ndarray) -> InstructionCorpus:
        return replace(self, documents=tuple(self.documents[int(i)] for i in indices))

    def encode(self, tokenizer: ChatTokenizer, *, seq_len: int, template: str | None) -> EncodedInstructions:
        """Rows of ``seq_len`` tokens (see :func:`encode_conversations`)."""
        renderer = renderer_for(tokenizer, template)
        out = encode_conversations(self.documents, tokenizer, renderer, seq_len=seq_len, name=self.name)
        get_logger(component="data.instruct").info(
            "instructions_encoded",
            dataset=self.name,
            split=self.split,
            rows=len(out.sequences),
            dropped=out.dropped,
            truncated=out.truncated,
            response_tokens=int((out.sequences.labels != IGNORE_INDEX).sum()),
            format="plain" if template is None else "chat_template",
        )
        return out

    def describe(self) -> dict[str, object]:
        turns = [len(d.messages) for d in self.documents]
        chars = [sum(len(c) for _, c in d.messages) for d in self.documents]
        return {
            "name": self.name,
            "split": self.split,
            "kind": "instruction",
            "conversations": len(self.documents),
            "messages": int(sum(turns)),
            "chars": int(sum(chars)),
            "median_conversation_chars": int(np.median(chars)) if chars else 0,
            "groups": len({d.group for d in self.documents}),
            "classes": len(self.class_names),
            "chat_template": self.chat_template,
        }


def make_instruction_corpus(
    name: str,
    conversations: Sequence[Conversation],
    split: str,
    *,
    chat_template: str = "auto",
    heldout_fraction: float = 0.1,
    seed: int = 0,
) -> InstructionCorpus:
    """The ``split`` of ``conversations`` (drawn by conversation, seeded)."""
    split, chosen = split_members(
        name, len(conversations), split, heldout_fraction=heldout_fraction, seed=seed, unit="conversations"
    )
    return InstructionCorpus(
        name=name,
        split=split,
        documents=tuple(conversations[int(i)] for i in chosen),
        class_names=tuple(sorted({c.group for c in conversations})),
        chat_template=chat_template,
    )


def resolve_chat_template(setting: str, tokenizer: Any) -> str | None:
    """The template text for a ``chat_template`` setting: "none" → None (plain format), "auto" →
    the tokenizer's own (``tokenizer.chat_template``; None without one), else a file path."""
    from sft_actors.data.chat_template import load_template_file

    if setting == "none":
        return None
    if setting == "auto":
        template = getattr(tokenizer, "chat_template", None)
        return template if isinstance(template, str) else None
    return load_template_file(Path(setting))
