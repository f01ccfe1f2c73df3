"""One entry point for every dataset: ``load_dataset(name, root, split, **options)``.

==================  ==========================================  =====================================
name                root                                        options
==================  ==========================================  =====================================
``stdlib-docs``     stdlib folder (default: this Python's)      packages, min_chars, max_documents,
                                                                max_chars_per_document,
                                                                max_total_chars, heldout_fraction, seed
``text:<path>``     unused (the path is in the name)            split_on_blank_lines, min_chars, caps,
                                                                heldout_fraction, seed
``jsonl:<path>``    unused                                      kind ("text" | "instruction"),
``csv:<path>``                                                  text_key, group_key, prompt_key,
``parquet:<path>``                                              response_key, messages_key,
``file:<path>``                                                 chat_template, min_chars, caps,
                                                                heldout_fraction, seed
``cifar100``        folder holding ``cifar-100-python/``        label_mode ("fine" | "coarse")
``tiny-imagenet``   folder holding ``tiny-imagenet-200/``       max_per_class, workers
``fashion-mnist``   default /usr/share/datasets/fashion-mnist   —
``digits``          unused (ships with scikit-learn)            heldout_fraction, seed
==================  ==========================================  =====================================

Text names return a :class:`~sft_actors.data.text.TextCorpus` (documents; call ``.pack(...)``
with the model's tokenizer) or, with ``kind = "instruction"``, an
:class:`~sft_actors.data.instruct.InstructionCorpus` (conversations; ``.encode(...)``); image
names an :class:`~sft_actors.data.images.ImageDataset`. Record formats and options:
:mod:`sft_actors.data.tabular`. Unknown names and options are
:class:`~sft_actors.errors.ConfigError`\\ s with a suggestion. :func:`check_dataset` raises the
same errors, and for the user's text files every error loading would (a topology is checked
with it at load), and :func:`dataset_kind` says whether a name is text or images.
"""

from __future__ import annotations

import difflib
import importlib.util
import inspect
import sysconfig
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from sft_actors.data import cifar, idx, tabular, text, tiny_imagenet
from sft_actors.data.cifar import load_cifar100
from sft_actors.data.common import TEST, TRAIN, require_dir, require_file
from sft_actors.data.digits import load_digits
from sft_actors.data.idx import load_fashion_mnist
from sft_actors.data.images import ImageDataset
from sft_actors.data.instruct import InstructionCorpus, make_instruction_corpus
from sft_actors.data.records import SUFFIX_FORMATS
from sft_actors.data.tabular import RECORD_PREFIXES
from sft_actors.data.text import (
    TextCorpus,
    make_corpus,
    stdlib_documents,
    text_file_documents,
)
from sft_actors.data.tiny_imagenet import load_tiny_imagenet
from sft_actors.errors import ConfigError, DatasetNotFound

DATASET_NAMES = (
    "stdlib-docs",
    "text:<path>",
    "jsonl:<path>",
    "csv:<path>",
    "parquet:<path>",
    "file:<path>",
    "cifar100",
    "tiny-imagenet",
    "fashion-mnist",
    "digits",
)
_CORPUS_OPTIONS = ("heldout_fraction", "seed")
_IMAGE_NAMES = frozenset({"cifar100", "tiny-imagenet", "fashion-mnist", "digits"})

Dataset = TextCorpus | InstructionCorpus | ImageDataset
_TEXT_PREFIXES = ("text:", *RECORD_PREFIXES)


def _records_corpus(
    name: str, root: str | Path | None, split: str, options: dict[str, Any]
) -> TextCorpus | InstructionCorpus:
    """A ``jsonl:``/``csv:``/``parquet:``/``file:`` dataset (``file:`` of .txt files included)."""
    prefix = name.split(":", 1)[0] + ":"
    path = _text_path(name, prefix, root)
    fmt = tabular.record_format(name, path)
    if fmt == "text":  # file:<.txt files>
        _check_options(name, options, text_file_documents, extra=_CORPUS_OPTIONS)
        source, corpus = _split_options(options)
        return make_corpus(f"{prefix}{path}", text_file_documents(path, **source), split, **corpus)
    _check_options(name, options, tabular.record_options, extra=_CORPUS_OPTIONS)
    source, corpus = _split_options(options)
    opts = tabular.validate_options(name, source)
    if opts["kind"] == "text":
        docs = tabular.text_documents(path, fmt, opts)
        return make_corpus(f"{prefix}{path}", docs, split, **corpus)
    convs = tabular.conversation_documents(path, fmt, opts)
    return make_instruction_corpus(
        f"{prefix}{path}", convs, split, chat_template=opts["chat_template"], **corpus
    )


def _check_options(
    name: str, options: dict[str, Any], *targets: Callable[..., Any], extra: tuple[str, ...] = ()
) -> None:
    allowed = set(extra)
    for target in targets:
        allowed |= {p.name for p in inspect.signature(target).parameters.values() if p.kind is p.KEYWORD_ONLY}
    for key in options:
        if key not in allowed:
            close = difflib.get_close_matches(key, sorted(allowed), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"dataset {name!r} has no option {key!r}{hint} (options: {', '.join(sorted(allowed))})"
            )


def _split_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    corpus = {k: options[k] for k in _CORPUS_OPTIONS if k in options}
    source = {k: v for k, v in options.items() if k not in corpus}
    return source, corpus


def _text_path(name: str, prefix: str, root: str | Path | None) -> Path:
    path = name[len(prefix) :] or (str(root) if root is not None else "")
    if not path:
        raise ConfigError(f"dataset {name!r} needs a path: write '{prefix}/path/to/files'")
    return Path(path).expanduser()


_WHERE = {
    "cifar100": "extract cifar-100-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html) into a folder "
    "so that <folder>/cifar-100-python/train, test and meta exist",
    "tiny-imagenet": "unzip tiny-imagenet-200.zip (http://cs231n.stanford.edu/tiny-imagenet-200.zip) into a "
    "folder so that <folder>/tiny-imagenet-200/wnids.txt, words.txt, train/ and val/ exist",
}


def _require_root(name: str, root: str | Path | None) -> Path:
    if root is None:
        raise DatasetNotFound(
            f"{name}: no root folder given. {_WHERE[name]}, then pass root=<folder> (CLI: --root <folder>)"
        )
    return Path(root)


def load_dataset(name: str, root: str | Path | None = None, split: str = "train", **options: Any) -> Dataset:
    """Load ``split`` of dataset ``name`` from its native on-disk format (never downloads)."""
    if name == "stdlib-docs":
        if "stdlib_dir" in options:
            raise ConfigError("stdlib-docs takes its folder as root, not as the stdlib_dir option")
        _check_options(name, options, stdlib_documents, extra=_CORPUS_OPTIONS)
        source, corpus = _split_options(options)
        docs = stdlib_documents(stdlib_dir=root, **source)
        return make_corpus(name, docs, split, **corpus)
    if name.startswith("text:"):
        _check_options(name, options, text_file_documents, extra=_CORPUS_OPTIONS)
        source, corpus = _split_options(options)
        path = _text_path(name, "text:", root)
        return make_corpus(f"text:{path}", text_file_documents(path, **source), split, **corpus)
    if name.startswith(RECORD_PREFIXES):
        return _records_corpus(name, root, split, options)
    if name == "cifar100":
        _check_options(name, options, load_cifar100)
        return load_cifar100(_require_root(name, root), split, **options)
    if name == "tiny-imagenet":
        _check_options(name, options, load_tiny_imagenet)
        return load_tiny_imagenet(_require_root(name, root), split, **options)
    if name == "fashion-mnist":
        _check_options(name, options, load_fashion_mnist)
        return load_fashion_mnist(root, split)
    if name == "digits":
        _check_options(name, options, load_digits)
        return load_digits(split, **options)
    raise _unknown(name)


def _unknown(name: str) -> ConfigError:
    close = difflib.get_close_matches(name, [n.split(":")[0] for n in DATASET_NAMES], n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown dataset {name!r}{hint} (known: {', '.join(DATASET_NAMES)})")


def dataset_kind(name: str) -> Literal["text", "image"]:
    """Whether ``name`` loads a text corpus or an image dataset; :class:`ConfigError` if unknown."""
    if name == "stdlib-docs" or name.startswith(_TEXT_PREFIXES):
        return "text"
    if name in _IMAGE_NAMES:
        return "image"
    raise _unknown(name)


def check_dataset(
    name: str, root: str | Path | None = None, *, contents: bool = True, **options: Any
) -> Dataset | None:
    """Fail as :func:`load_dataset` would for an unknown name or option or a missing file.

    Image datasets and the stdlib are only ``stat``\\ ed (milliseconds). A user's text files
    (``text:``, ``jsonl:``, ``csv:``, ``parquet:``, ``file:``) are read and every record checked
    when ``contents`` is true (what loading costs, once), so a corrupt file is refused here,
    not minutes into a run; with ``contents=False`` they are only listed.

    Raises :class:`ConfigError` (unknown name, option or value), :class:`DatasetNotFound` (files
    missing; the message says which files to put where) or :class:`DatasetCorrupt` (naming
    file:line: invalid UTF-8 with its byte offset, invalid JSON or CSV, a missing or non-string
    field). Returns the whole of a user's text dataset when it was read (``heldout_fraction``
    0, so every record is in it), else None.
    """
    if name == "stdlib-docs":
        if "stdlib_dir" in options:
            raise ConfigError("stdlib-docs takes its folder as root, not as the stdlib_dir option")
        _check_options(name, options, stdlib_documents, extra=_CORPUS_OPTIONS)
        folder = Path(root) if root is not None else Path(sysconfig.get_paths()["stdlib"])
        if not folder.is_dir():
            raise DatasetNotFound(
                f"stdlib-docs: the standard library folder {folder} does not exist; "
                "give root a folder of .py files (or leave root out for this Python's own)"
            )
    elif name.startswith(_TEXT_PREFIXES):
        prefix = name.split(":", 1)[0] + ":"
        path = _text_path(name, prefix, root)
        fmt = "text" if prefix == "text:" else tabular.record_format(name, path)
        suffix = next(s for s, f in SUFFIX_FORMATS.items() if f == fmt)
        text._input_files(path, (suffix,), prefix[:-1])  # DatasetNotFound before options
        if fmt == "text":
            _check_options(name, options, text_file_documents, extra=_CORPUS_OPTIONS)
        else:
            _check_options(name, options, tabular.record_options, extra=_CORPUS_OPTIONS)
            tabular.validate_options(name, _split_options(options)[0])
        if contents:
            return load_dataset(name, root, TRAIN, **{**options, "heldout_fraction": 0.0})
    elif name == "cifar100":
        _check_options(name, options, load_cifar100)
        folder = cifar._folder(_require_root(name, root).expanduser())
        for part in ("meta", TRAIN, TEST):
            require_file(folder / part, "CIFAR-100", cifar._HOW.format(dir=folder))
    elif name == "tiny-imagenet":
        _check_options(name, options, load_tiny_imagenet)
        _check_tiny_imagenet(_require_root(name, root).expanduser())
    elif name == "fashion-mnist":
        _check_options(name, options, load_fashion_mnist)
        folder = Path(root).expanduser() if root is not None else idx.FASHION_MNIST_ROOT
        require_dir(folder, "Fashion-MNIST", idx._HOW)
        for stems in idx._FILES.values():
            for stem in stems:
                idx._find(folder, stem)
    elif name == "digits":
        _check_options(name, options, load_digits)
        if importlib.util.find_spec("sklearn") is None:
            raise DatasetNotFound("digits ships with scikit-learn: `pip install scikit-learn`")
    else:
        raise _unknown(name)
    return None


def _check_tiny_imagenet(root: Path) -> None:
    if importlib.util.find_spec("PIL") is None:
        raise ConfigError("Tiny-ImageNet needs Pillow to decode JPEGs: `pip install pillow`")
    folder = root if root.name == tiny_imagenet.FOLDER else root / tiny_imagenet.FOLDER
    how = tiny_imagenet._HOW.format(dir=folder)
    require_dir(folder, "Tiny-ImageNet", how)
    for name in ("wnids.txt", "words.txt", "val/val_annotations.txt"):
        require_file(folder / name, "Tiny-ImageNet", how)
    for name in ("train", "val/images"):
        require_dir(folder / name, "Tiny-ImageNet", how)


def load_text_corpus(
    name: str, root: str | Path | None = None, split: str = "train", **options: Any
) -> TextCorpus:
    """:func:`load_dataset` for text names, typed: an error if ``name`` is an image dataset."""
    if name in _IMAGE_NAMES:  # refuse before loading tens of thousands of images
        raise ConfigError(f"dataset {name!r} holds images, not text; use load_image_dataset")
    dataset = load_dataset(name, root, split, **options)
    if isinstance(dataset, InstructionCorpus):
        raise ConfigError(f"dataset {name!r} holds instruction data (kind = 'instruction'), not documents")
    if not isinstance(dataset, TextCorpus):
        raise ConfigError(f"dataset {name!r} holds images, not text; use load_image_dataset")
    return dataset


def load_image_dataset(
    name: str, root: str | Path | None = None, split: str = "train", **options: Any
) -> ImageDataset:
    """:func:`load_dataset` for image names, typed: an error if ``name`` is a text corpus."""
    if name == "stdlib-docs" or name.startswith(_TEXT_PREFIXES):  # refuse before reading text
        raise ConfigError(f"dataset {name!r} holds text, not images; use load_text_corpus")
    dataset = load_dataset(name, root, split, **options)
    if not isinstance(dataset, ImageDataset):
        raise ConfigError(f"dataset {name!r} holds text, not images; use load_text_corpus")
    return dataset
