"""Records from a user's files: UTF-8 text, JSON Lines, CSV and parquet, read by one set of rules.

Text hygiene, the same for every text format:

- The bytes must be valid UTF-8; a byte-order mark (``EF BB BF``) at the start is dropped.
  Invalid bytes are a :class:`~sft_actors.errors.DatasetCorrupt` naming the file, the line and
  the byte offset (``data.jsonl:12: invalid UTF-8 at byte 4711 …``).
- Lines end at ``\\n`` (a ``\\r`` before it is dropped) and nowhere else: U+2028, U+2029, NEL
  (U+0085), form feeds and every other character are text, so JSON written with
  ``ensure_ascii=False`` loads (``str.splitlines`` would split inside its strings).
- Blank lines (only spaces, tabs, ``\\r``: JSON's whitespace) are skipped; line numbers count
  them, so they match an editor.
- JSON may escape lone surrogates (``"\\ud800"``), which are not text. They are replaced with
  U+FFFD, deterministically, and counted (:attr:`Record.replaced`); loaders warn once per file.

Each record is a :class:`Record`: a ``dict`` of fields, the file and the line (the data row for
CSV, counting the header as line 1 — the first line of a row whose quoted cells span several;
the row number from 1 for parquet). A field the configured
key names must exist and be a string, or :func:`require_str` raises ``DatasetCorrupt`` naming
file:line and the fields found (or that the value is null). A JSON object that gives a key
twice is refused (``json`` would keep the last one silently); a parquet file read as text gets
a hint to name it ``parquet:``.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sft_actors.errors import DatasetCorrupt

#: File suffix → format name, for ``file:<path>`` datasets (the format follows the suffix).
SUFFIX_FORMATS = {".txt": "text", ".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet"}
_BOM = b"\xef\xbb\xbf"
_BLANK = " \t\r"
_SURROGATE = re.compile("[\ud800-\udfff]")
_PARQUET_MAGIC = b"PAR1"


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's pairs as a dict, refusing a key given twice (``json`` keeps the last)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


@dataclass(frozen=True, slots=True)
class Record:
    """One record: its fields, where it came from, and how many lone surrogates were replaced."""

    fields: dict[str, Any]
    file: Path
    line: int
    replaced: int = 0

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def decode_utf8(data: bytes, file: Path) -> str:
    """``data`` as text (BOM dropped); invalid UTF-8 → ``DatasetCorrupt`` with line and byte offset."""
    start = len(_BOM) if data.startswith(_BOM) else 0
    try:
        return data[start:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = start + exc.start
        line = data.count(b"\n", 0, offset) + 1
        bad = data[offset : offset + 4].hex(" ")
        if data.startswith(_PARQUET_MAGIC) or file.suffix.lower() == ".parquet":
            fix = (
                "it is a parquet file, not text: name it parquet:<path> (or file:<path>, which "
                "reads each file by its suffix)"
            )
        else:
            fix = "the file is not UTF-8 text: convert it (iconv -f <encoding> -t UTF-8) or fix those bytes"
        raise DatasetCorrupt(
            f"{file}:{line}: invalid UTF-8 at byte {offset} ({bad}: {exc.reason}); {fix}"
        ) from exc


def read_text(file: Path) -> str:
    """The whole file as text by the rules above (``\\r\\n`` → ``\\n``)."""
    return decode_utf8(file.read_bytes(), file).replace("\r\n", "\n")


def text_lines(file: Path) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` for every non-blank line, split on ``\\n`` only."""
    for number, line in enumerate(read_text(file).split("\n"), start=1):
        if line.strip(_BLANK):
            yield number, line.removesuffix("\r")


def replace_surrogates(value: Any) -> tuple[Any, int]:
    """``value`` with every lone surrogate (U+D800–U+DFFF) in its strings and keys replaced by
    U+FFFD, and how many were replaced."""
    if isinstance(value, str):
        if value.isascii():
            return value, 0
        return _SURROGATE.subn("\ufffd", value)
    if isinstance(value, list):
        items = [replace_surrogates(v) for v in value]
        return [v for v, _ in items], sum(n for _, n in items)
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        total = 0
        for key, item in value.items():
            new_key, n_key = replace_surrogates(key)
            out[new_key], n_item = replace_surrogates(item)
            total += n_key + n_item
        return out, total
    return value, 0


def jsonl_records(file: Path) -> Iterator[Record]:
    """One record per non-blank line; each line must be a JSON object."""
    for number, line in text_lines(file):
        try:
            obj = json.loads(line, object_pairs_hook=_unique_keys)
        except _DuplicateKey as exc:
            raise DatasetCorrupt(
                f"{file}:{number}: key {exc.key!r} appears twice in one object (JSON readers keep only "
                "one of them, silently); remove the duplicate"
            ) from exc
        except json.JSONDecodeError as exc:
            raise DatasetCorrupt(
                f"{file}:{number}: not valid JSON ({exc.msg} at column {exc.colno}); "
                "each line must be one JSON object"
            ) from exc
        if not isinstance(obj, dict):
            raise DatasetCorrupt(
                f"{file}:{number}: expected a JSON object, found {type(obj).__name__}; "
                'write one object per line, e.g. {"text": "..."}'
            )
        fixed, replaced = replace_surrogates(obj)
        yield Record(fixed, file, number, replaced)


def csv_records(file: Path) -> Iterator[Record]:
    """One record per data row, keyed by the header row (required); a row with a different
    number of cells than the header is ``DatasetCorrupt`` naming file:line."""
    text = read_text(file)
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader, None)
        if header is None or not any(h.strip() for h in header):
            raise DatasetCorrupt(f"{file}:1: no header row; the first line must name the columns")
        if len(set(header)) != len(header):
            dupes = sorted({h for h in header if header.count(h) > 1})
            raise DatasetCorrupt(f"{file}:1: duplicate column names {dupes}; name each column once")
        end = reader.line_num
        for row in reader:
            line, end = end + 1, reader.line_num  # a quoted cell may span lines: name the first
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise DatasetCorrupt(
                    f"{file}:{line}: {len(row)} cells, but the header has {len(header)} columns "
                    f"({', '.join(header)}); quote cells that contain commas or newlines"
                )
            yield Record(dict(zip(header, row, strict=True)), file, line)
    except csv.Error as exc:
        raise DatasetCorrupt(f"{file}:{reader.line_num}: not valid CSV ({exc})") from exc


def parquet_records(file: Path, columns: list[str] | None = None) -> Iterator[Record]:
    """One record per row (line = row number from 1); only ``columns`` when given."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(file)
        names = pf.schema_arrow.names
        # only the columns asked for; none of them present: all, so the error can list them
        wanted = [c for c in columns or () if c in names] or None
        row = 0
        for batch in pf.iter_batches(columns=wanted):
            for fields in batch.to_pylist():
                row += 1
                yield Record(fields, file, row)
    except (pa.ArrowException, OSError) as exc:
        raise DatasetCorrupt(f"{file}: not a readable parquet file ({exc})") from exc


def read_records(file: Path, fmt: str, columns: list[str] | None = None) -> Iterator[Record]:
    """Records of ``file`` in format ``fmt`` ("jsonl", "csv" or "parquet")."""
    if fmt == "jsonl":
        return jsonl_records(file)
    if fmt == "csv":
        return csv_records(file)
    if fmt == "parquet":
        return parquet_records(file, columns)
    raise ValueError(f"no record reader for format {fmt!r}")


def record_group(record: Record, group_key: str | None, file_group: str) -> str:
    """The partitioning label: ``str(record[group_key])``, or the file's group without one."""
    if group_key is None:
        return file_group
    value = record.fields.get(group_key)
    return file_group if value is None else str(value)


def warn_replaced(file: Path, replaced: int) -> None:
    """Log, once per file, how many lone surrogates were replaced with U+FFFD."""
    if replaced:
        from sft_actors.log import get_logger

        get_logger(component="data.records").warning(
            "lone_surrogates_replaced", file=str(file), count=replaced, replacement="U+FFFD"
        )


def require_str(record: Record, key: str, what: str) -> str:
    """``record.fields[key]`` as a string, or ``DatasetCorrupt`` naming file:line, the key and
    the fields found (``what`` names the setting, e.g. ``"text_key"``)."""
    value = record.fields.get(key)
    if isinstance(value, str):
        return value
    if key in record.fields and value is None:
        raise DatasetCorrupt(
            f"{record.where}: field {key!r} is null (an empty cell or JSON null), not a string; "
            f"fill it or drop the record, or set {what} to another field"
        )
    if key not in record.fields:
        found = ", ".join(repr(k) for k in record.fields) or "none"
        raise DatasetCorrupt(
            f"{record.where}: no {key!r} field (fields: {found}); set {what} to the field that holds it"
        )
    raise DatasetCorrupt(
        f"{record.where}: field {key!r} is a {type(value).__name__}, not a string; "
        f"store text in {key!r} or set {what} to another field"
    )
