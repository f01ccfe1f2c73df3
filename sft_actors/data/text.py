"""Text corpora for the LLM: the standard library's docstrings, or a user's .txt / .jsonl files.

A corpus is a tuple of :class:`Document`\\ s in a deterministic order. Each document has a
*group* — the top-level package of a stdlib module, the first folder of a text file — which is
the "label" used for non-IID partitioning (devices see different parts of the library) and in
the per-device histogram. Train and held-out splits are drawn **by document**, seeded, so no
held-out text was ever seen in training, not even a neighbouring paragraph of the same module.

The stdlib corpus needs nothing but the Python installation: every module under
``sysconfig.get_paths()["stdlib"]`` is parsed with :mod:`ast` (never imported, so nothing runs)
and its module, class and function docstrings, in source order, form one document.
"""

from __future__ import annotations

import ast
import functools
import os
import sysconfig
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from sft_actors.data.common import split_members
from sft_actors.data.packing import PackedSequences, Tokenizer, pack_token_streams
from sft_actors.errors import ConfigError, DatasetNotFound
from sft_actors.log import get_logger

# Folders of the stdlib that hold tests, test data or third-party code, not library docs.
_STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


@dataclass(frozen=True, kw_only=True, slots=True)
class Document:
    """One unit of text: never split across train/held-out or across devices."""

    text: str
    source: str  # where it came from: "email/mime/text.py", "notes/a.txt#3", "data.jsonl:12"
    group: str  # partitioning label: top-level package, first folder, or a JSONL field


@dataclass(frozen=True, kw_only=True, slots=True)
class TextCorpus:
    """A split of a document corpus. ``class_names`` are the groups of the *whole* corpus, so
    train and test share label numbers."""

    name: str
    split: str
    documents: tuple[Document, ...]
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.documents)

    def label_array(self) -> np.ndarray:
        index = {g: i for i, g in enumerate(self.class_names)}
        return np.fromiter(
            (index[d.group] for d in self.documents), dtype=np.int64, count=len(self.documents)
        )

    def subset(self, indices: Sequence[int] | np.ndarray) -> TextCorpus:
        return replace(self, documents=tuple(self.documents[int(i)] for i in indices))

    def pack(
        self,
        tokenize: Tokenizer,
        *,
        eos_id: int,
        seq_len: int,
        pad_id: int | None = None,
        drop_remainder: bool = False,
    ) -> PackedSequences:
        """Tokenize every document, join them with ``eos_id``, cut into ``seq_len`` sequences."""
        streams = (tokenize(d.text) for d in self.documents)
        return pack_token_streams(
            streams, eos_id=eos_id, seq_len=seq_len, pad_id=pad_id, drop_remainder=drop_remainder
        )

    def describe(self) -> dict[str, object]:
        chars = [len(d.text) for d in self.documents]
        return {
            "name": self.name,
            "split": self.split,
            "documents": len(self.documents),
            "chars": int(sum(chars)),
            "median_doc_chars": int(np.median(chars)) if chars else 0,
            "groups": len({d.group for d in self.documents}),
            "classes": len(self.class_names),
        }


def make_corpus(
    name: str, documents: Sequence[Document], split: str, *, heldout_fraction: float = 0.1, seed: int = 0
) -> TextCorpus:
    """The ``split`` of ``documents`` (drawn by document, seeded); an error if there is none."""
    split, chosen = split_members(
        name, len(documents), split, heldout_fraction=heldout_fraction, seed=seed, unit="documents"
    )
    return TextCorpus(
        name=name,
        split=split,
        documents=tuple(documents[int(i)] for i in chosen),
        class_names=tuple(sorted({d.group for d in documents})),
    )


class _DocCollector:
    """Applies the size caps shared by every source: per-document chars, total count and chars."""

    def __init__(
        self,
        *,
        min_chars: int,
        max_chars_per_document: int | None,
        max_documents: int | None,
        max_total_chars: int | None,
    ) -> None:
        for label, value in (
            ("max_chars_per_document", max_chars_per_document),
            ("max_documents", max_documents),
            ("max_total_chars", max_total_chars),
        ):
            if value is not None and value < 1:
                raise ConfigError(f"{label} must be >= 1 or None, got {value}")
        self.min_chars, self.max_chars = min_chars, max_chars_per_document
        self.max_documents, self.max_total_chars = max_documents, max_total_chars
        self.documents: list[Document] = []
        self.total_chars = 0

    @property
    def full(self) -> bool:
        return (self.max_documents is not None and len(self.documents) >= self.max_documents) or (
            self.max_total_chars is not None and self.total_chars >= self.max_total_chars
        )

    def add(self, text: str, *, source: str, group: str) -> None:
        text = text.strip()
        if self.max_chars is not None:
            text = text[: self.max_chars]
        if len(text) < self.min_chars or self.full:
            return
        self.documents.append(Document(text=text, source=source, group=group))
        self.total_chars += len(text)


def _module_docstrings(source: bytes, path: Path) -> str:
    """Module, class and function docstrings of one source file, in source order."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SyntaxWarning)  # invalid escapes in old modules
        tree = ast.parse(source, filename=str(path))
    nodes = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    found = [
        (getattr(node, "lineno", 0), doc)
        for node in ast.walk(tree)
        if isinstance(node, nodes) and (doc := ast.get_docstring(node, clean=True))
    ]
    found.sort(key=lambda item: item[0])  # ast.walk is breadth-first; keep reading order
    return "\n\n".join(doc for _, doc in found)


@functools.lru_cache(maxsize=4096)
def _cached_module_docstrings(path: str, mtime_ns: int, size: int) -> str:
    """Parsing is the slow part (seconds for the whole library); a train and a test load, or
    several caps, in one process parse each file once. The key includes mtime and size so an
    edited file is parsed again."""
    return _module_docstrings(Path(path).read_bytes(), Path(path))


def _walk_sorted(
    root: Path, suffixes: tuple[str, ...], skip_dirs: frozenset[str] = frozenset()
) -> Iterator[Path]:
    """Files under ``root`` ending in ``suffixes``, in a platform-independent sorted order."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs)
        for filename in sorted(filenames):
            if filename.endswith(suffixes):
                yield Path(dirpath) / filename


def stdlib_documents(
    *,
    stdlib_dir: str | Path | None = None,
    packages: str | Sequence[str] | None = None,
    min_chars: int = 200,
    max_chars_per_document: int | None = None,
    max_documents: int | None = None,
    max_total_chars: int | None = None,
) -> list[Document]:
    """One document per stdlib module (its docstrings), ordered by relative path.

    ``packages`` keeps only those top-level names (e.g. ``["email", "json"]``). Modules with
    fewer than ``min_chars`` characters of docstrings are skipped. The ``max_*`` caps keep the
    first documents in walk order (top-level modules, then each package, alphabetically).
    The whole library (Python 3.11: ~730 modules, ~460 with docstrings, ~1.8 M characters)
    takes 5–7 s to parse on one core; parsed files are cached in-process.
    """
    root = Path(stdlib_dir) if stdlib_dir is not None else Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise DatasetNotFound(
            f"stdlib-docs: the standard library folder {root} does not exist; "
            "pass stdlib_dir pointing at a folder of .py files"
        )
    if isinstance(packages, str):  # one name, e.g. from the CLI's --set packages=json
        packages = [packages]
    wanted = frozenset(packages) if packages is not None else None
    collector = _DocCollector(
        min_chars=min_chars,
        max_chars_per_document=max_chars_per_document,
        max_documents=max_documents,
        max_total_chars=max_total_chars,
    )
    skipped = 0
    for path in _walk_sorted(root, (".py",), _STDLIB_SKIP_DIRS):
        relative = path.relative_to(root)
        group = relative.parts[0].removesuffix(".py")
        if wanted is not None and group not in wanted:
            continue
        try:
            stat = path.stat()
            text = _cached_module_docstrings(str(path), stat.st_mtime_ns, stat.st_size)
        except (SyntaxError, ValueError, OSError):  # e.g. deliberately broken test data
            skipped += 1
            continue
        collector.add(text, source=relative.as_posix(), group=group)
        if collector.full:
            break
    # bound per call: a module-level logger would keep the config from import time
    get_logger(component="data.text").debug(
        "stdlib_docs_collected",
        documents=len(collector.documents),
        chars=collector.total_chars,
        skipped=skipped,
        root=str(root),
    )
    return collector.documents


def _read_utf8(path: Path) -> str:
    """The file's text by the rules of :mod:`sft_actors.data.records` (BOM dropped, ``\\r\\n`` →
    ``\\n``); invalid UTF-8 is a :class:`DatasetCorrupt` naming the line and byte offset."""
    from sft_actors.data.records import read_text

    return read_text(path)


def _input_files(path: Path, suffixes: tuple[str, ...], what: str) -> list[tuple[Path, str]]:
    """``(file, group)`` pairs: a single file (group = its stem) or a folder walked recursively
    (group = first sub-folder, or the file's stem for files directly inside)."""
    if path.is_file():
        return [(path, path.stem)]
    if not path.is_dir():
        raise DatasetNotFound(
            f"{what}: {path} does not exist; pass a {'/'.join(suffixes)} file or a folder of them"
        )
    files = [
        (f, f.relative_to(path).parts[0] if len(f.relative_to(path).parts) > 1 else f.stem)
        for f in _walk_sorted(path, suffixes)
    ]
    if not files:
        raise DatasetNotFound(f"{what}: no {'/'.join(suffixes)} files under {path}")
    return files


def text_file_documents(
    path: str | Path,
    *,
    split_on_blank_lines: bool = False,
    min_chars: int = 1,
    max_chars_per_document: int | None = None,
    max_documents: int | None = None,
    max_total_chars: int | None = None,
) -> list[Document]:
    """Documents from a ``.txt`` file or a folder of them: one per file, or one per paragraph."""
    root = Path(path).expanduser()
    collector = _DocCollector(
        min_chars=min_chars,
        max_chars_per_document=max_chars_per_document,
        max_documents=max_documents,
        max_total_chars=max_total_chars,
    )
    for file, group in _input_files(root, (".txt",), "text"):
        text = _read_utf8(file)
        name = file.name if file == root else file.relative_to(root).as_posix()
        if split_on_blank_lines:
            paragraphs = [p for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]
            for i, paragraph in enumerate(paragraphs):
                collector.add(paragraph, source=f"{name}#{i}", group=group)
        else:
            collector.add(text, source=name, group=group)
        if collector.full:
            break
    return collector.documents


def record_documents(
    path: str | Path,
    fmt: str,
    *,
    text_key: str = "text",
    group_key: str | None = None,
    min_chars: int = 1,
    max_chars_per_document: int | None = None,
    max_documents: int | None = None,
    max_total_chars: int | None = None,
) -> list[Document]:
    """One document per record of a ``fmt`` ("jsonl", "csv", "parquet") file or folder of them:
    ``record[text_key]``; the group is ``record[group_key]`` when given, else the file's group.
    A bad record is a :class:`DatasetCorrupt` naming file:line (:mod:`sft_actors.data.records`).
    """
    from sft_actors.data.records import SUFFIX_FORMATS, read_records, record_group, require_str, warn_replaced

    root = Path(path).expanduser()
    collector = _DocCollector(
        min_chars=min_chars,
        max_chars_per_document=max_chars_per_document,
        max_documents=max_documents,
        max_total_chars=max_total_chars,
    )
    suffix = next(s for s, f in SUFFIX_FORMATS.items() if f == fmt)
    columns = [text_key] + ([group_key] if group_key else [])
    for file, file_group in _input_files(root, (suffix,), fmt):
        name = file.name if file == root else file.relative_to(root).as_posix()
        replaced = 0
        for record in read_records(file, fmt, columns):
            replaced += record.replaced
            text = require_str(record, text_key, "text_key")
            collector.add(
                text, source=f"{name}:{record.line}", group=record_group(record, group_key, file_group)
            )
            if collector.full:
                break
        warn_replaced(file, replaced)
        if collector.full:
            break
    return collector.documents


def jsonl_documents(
    path: str | Path,
    *,
    text_key: str = "text",
    group_key: str | None = None,
    min_chars: int = 1,
    max_chars_per_document: int | None = None,
    max_documents: int | None = None,
    max_total_chars: int | None = None,
) -> list[Document]:
    """One document per line of a ``.jsonl`` file (or a folder of them): ``obj[text_key]``.

    The group is ``obj[group_key]`` when ``group_key`` is given, else the file's group. Lines
    split on ``\\n`` only (see :mod:`sft_actors.data.records` for the text rules); a bad line is
    a :class:`DatasetCorrupt` naming file:line.
    """
    return record_documents(
        path,
        "jsonl",
        text_key=text_key,
        group_key=group_key,
        min_chars=min_chars,
        max_chars_per_document=max_chars_per_document,
        max_documents=max_documents,
        max_total_chars=max_total_chars,
    )
