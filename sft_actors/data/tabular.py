"""Corpora from record files: JSON Lines, CSV and parquet, as text or as instruction data.

====================  ==================================================================
dataset name          files
====================  ==================================================================
``jsonl:<path>``      a ``.jsonl`` file or a folder of them (one JSON object per line)
``csv:<path>``        a ``.csv`` file or folder (stdlib :mod:`csv`; header row required)
``parquet:<path>``    a ``.parquet`` file or folder (read with ``pyarrow``)
``file:<path>``       the format follows the suffix: ``.txt``, ``.jsonl``, ``.csv``, ``.parquet``
                      (a folder must hold files of exactly one of those)
====================  ==================================================================

Options (:func:`record_options` lists them; unknown ones are a ``ConfigError``):

- ``kind = "text"`` (default): one document per record, ``text_key`` (default ``"text"``, the
  JSON key or the column), loss on every token. ``kind = "instruction"``: one
  :class:`~sft_actors.data.instruct.Conversation` per record (``prompt_key`` /
  ``response_key`` or ``messages_key``), loss on responses only; ``chat_template`` = ``"auto"``
  (the model's), ``"none"`` (plain format) or a file path.
- ``group_key``: the partitioning label (non-IID ``dirichlet``), else the file's group (a
  file's stem, or the first sub-folder).
- caps: ``max_documents`` (and for text ``min_chars``, ``max_chars_per_document``,
  ``max_total_chars``).

Every record is checked as it is read; the first bad one is a
:class:`~sft_actors.errors.DatasetCorrupt` naming file:line (see :mod:`sft_actors.data.records`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from sft_actors.data.instruct import Conversation, conversation_from_record
from sft_actors.data.records import SUFFIX_FORMATS, read_records, record_group, warn_replaced
from sft_actors.data.text import Document, _input_files, _walk_sorted, record_documents
from sft_actors.errors import ConfigError, DatasetNotFound

RECORD_PREFIXES = ("jsonl:", "csv:", "parquet:", "file:")
Kind = Literal["text", "instruction"]
KINDS = ("text", "instruction")


def record_options(
    *,
    kind: Kind = "text",
    text_key: str = "text",
    group_key: str | None = None,
    prompt_key: str = "prompt",
    response_key: str = "response",
    messages_key: str = "messages",
    chat_template: str = "auto",
    min_chars: int = 1,
    max_chars_per_document: int | None = None,
    max_documents: int | None = None,
    max_total_chars: int | None = None,
) -> dict[str, Any]:
    """The options of a record dataset with their defaults (its signature is the option list)."""
    return dict(locals())


def validate_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` merged over the defaults, with their values checked (``ConfigError``)."""
    opts = record_options(**options)
    if opts["kind"] not in KINDS:
        raise ConfigError(f"dataset {name!r}: kind must be one of {list(KINDS)}, got {opts['kind']!r}")
    for key in ("text_key", "prompt_key", "response_key", "messages_key", "chat_template"):
        if not isinstance(opts[key], str) or not opts[key]:
            raise ConfigError(f"dataset {name!r}: {key} must be a non-empty string, got {opts[key]!r}")
    if opts["group_key"] is not None and not isinstance(opts["group_key"], str):
        raise ConfigError(f"dataset {name!r}: group_key must be a string, got {opts['group_key']!r}")
    if opts["kind"] == "text" and "chat_template" in options:
        raise ConfigError(f"dataset {name!r}: chat_template applies to kind = 'instruction' only; remove it")
    if opts["chat_template"] not in ("auto", "none"):
        from sft_actors.data.chat_template import load_template_file

        load_template_file(opts["chat_template"])
    return opts


def record_format(name: str, path: Path) -> str:
    """The format of a ``<prefix>:<path>`` dataset: the prefix's, or for ``file:`` the suffix's."""
    prefix = name.split(":", 1)[0]
    if prefix != "file":
        return prefix
    if path.is_file():
        fmt = SUFFIX_FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise ConfigError(
                f"{path}: unknown suffix {path.suffix!r}; use one of {', '.join(SUFFIX_FORMATS)}"
            )
        return fmt
    if not path.is_dir():
        raise DatasetNotFound(
            f"file: {path} does not exist; pass a {'/'.join(SUFFIX_FORMATS)} file or a folder"
        )
    found = {SUFFIX_FORMATS[p.suffix] for p in _walk_sorted(path, tuple(SUFFIX_FORMATS))}
    if len(found) != 1:
        raise DatasetNotFound(
            f"file: {path} holds {sorted(found) or 'no'} data files; it must hold files of exactly one of "
            f"{', '.join(SUFFIX_FORMATS)} (or name the format: jsonl:, csv:, parquet:, text:)"
        )
    return found.pop()


def _files(path: Path, fmt: str) -> list[tuple[Path, str]]:
    suffix = next(s for s, f in SUFFIX_FORMATS.items() if f == fmt)
    return _input_files(path, (suffix,), fmt)


def text_documents(path: Path, fmt: str, opts: dict[str, Any]) -> list[Document]:
    """Text documents (``kind = "text"``): ``record[text_key]`` per record."""
    keys = (
        "text_key",
        "group_key",
        "min_chars",
        "max_chars_per_document",
        "max_documents",
        "max_total_chars",
    )
    return record_documents(path, fmt, **{k: opts[k] for k in keys})


def _columns(opts: dict[str, Any]) -> list[str]:
    if opts["kind"] == "text":
        keys = [opts["text_key"]]
    else:
        keys = [opts["prompt_key"], opts["response_key"], opts["messages_key"]]
    return keys + ([opts["group_key"]] if opts["group_key"] else [])


def conversation_documents(path: Path, fmt: str, opts: dict[str, Any]) -> list[Conversation]:
    """Conversations (``kind = "instruction"``), one per record."""
    out: list[Conversation] = []
    cap = opts["max_documents"]
    if cap is not None and cap < 1:
        raise ConfigError(f"max_documents must be >= 1 or None, got {cap}")
    for file, file_group in _files(path, fmt):
        name = file.name if file == path else file.relative_to(path).as_posix()
        replaced = 0
        for record in read_records(file, fmt, _columns(opts)):
            replaced += record.replaced
            out.append(
                conversation_from_record(
                    record,
                    prompt_key=opts["prompt_key"],
                    response_key=opts["response_key"],
                    messages_key=opts["messages_key"],
                    group=record_group(record, opts["group_key"], file_group),
                    name=name,
                )
            )
            if cap is not None and len(out) >= cap:
                break
        warn_replaced(file, replaced)
        if cap is not None and len(out) >= cap:
            break
    return out
