"""Text corpora (stdlib docstrings, .txt, .jsonl), the split by document, and LM packing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sft_actors.data import IGNORE_INDEX, TextCorpus, load_text_corpus, pack_token_streams
from sft_actors.data.text import jsonl_documents, stdlib_documents, text_file_documents
from sft_actors.errors import ConfigError, DatasetCorrupt, DatasetNotFound

EOS = 256


def byte_tokenizer(text: str) -> list[int]:
    return list(text.encode("utf-8"))


# ---------------------------------------------------------------- stdlib docstrings


def test_stdlib_corpus_is_deterministic_and_non_empty() -> None:
    first = stdlib_documents(max_documents=25)
    second = stdlib_documents(max_documents=25)
    assert first == second and len(first) == 25
    assert all(len(d.text) >= 200 for d in first)
    assert len({d.source for d in first}) == 25
    assert all(d.group == d.source.split("/")[0].removesuffix(".py") for d in first)
    some = stdlib_documents(packages=["json", "email"], max_chars_per_document=500)
    assert {d.group for d in some} == {"json", "email"} and all(len(d.text) <= 500 for d in some)
    json_init = next(d for d in some if d.source == "json/__init__.py")
    assert "JSON (JavaScript Object Notation)" in json_init.text  # the module docstring comes first


def test_stdlib_train_and_heldout_are_disjoint_by_document() -> None:
    kw = {"max_documents": 40, "seed": 7, "heldout_fraction": 0.25}
    train = load_text_corpus("stdlib-docs", None, "train", **kw)
    test = load_text_corpus("stdlib-docs", None, "heldout", **kw)
    assert isinstance(train, TextCorpus) and isinstance(test, TextCorpus)
    train_sources = {d.source for d in train.documents}
    test_sources = {d.source for d in test.documents}
    assert not train_sources & test_sources
    assert len(train_sources | test_sources) == 40 and len(test_sources) == 10
    assert train.class_names == test.class_names  # one label space for both splits
    other = load_text_corpus("stdlib-docs", None, "test", **{**kw, "seed": 8})
    assert {d.source for d in other.documents} != test_sources


def test_stdlib_walk_parses_without_importing_and_skips_tests(tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    (lib / "pkg").mkdir(parents=True)
    (lib / "test").mkdir()
    marker = tmp_path / "imported"
    (lib / "pkg" / "__init__.py").write_text(
        f'"""Package docs."""\nopen({str(marker)!r}, "w").close()\n'
        'class A:\n    """Class docs."""\n    def f(self):\n        """Method docs."""\n'
    )
    (lib / "broken.py").write_text('"""Docs."""\ndef (:\n')
    (lib / "test" / "test_x.py").write_text('"""Test docs that must not appear."""\n')
    docs = stdlib_documents(stdlib_dir=lib, min_chars=1)
    assert [(d.source, d.group, d.text) for d in docs] == [
        ("pkg/__init__.py", "pkg", "Package docs.\n\nClass docs.\n\nMethod docs.")
    ]
    assert not marker.exists()
    with pytest.raises(DatasetNotFound, match="standard library folder"):
        stdlib_documents(stdlib_dir=tmp_path / "missing")


# ---------------------------------------------------------------- user files


def test_text_files_one_document_per_file_or_paragraph(tmp_path: Path) -> None:
    (tmp_path / "news").mkdir()
    (tmp_path / "news" / "b.txt").write_text("second file\n")
    (tmp_path / "news" / "a.txt").write_text("para one\n\npara two\n\n\n")
    (tmp_path / "top.txt").write_text("top level")
    (tmp_path / "ignored.md").write_text("not text")
    docs = text_file_documents(tmp_path)
    assert [(d.source, d.group) for d in docs] == [
        ("top.txt", "top"),
        ("news/a.txt", "news"),
        ("news/b.txt", "news"),
    ]
    paragraphs = text_file_documents(tmp_path / "news" / "a.txt", split_on_blank_lines=True)
    assert [d.text for d in paragraphs] == ["para one", "para two"]
    assert [d.source for d in paragraphs] == ["a.txt#0", "a.txt#1"]
    corpus = load_text_corpus(f"text:{tmp_path}", split="train", heldout_fraction=0.0)
    assert len(corpus) == 3
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(DatasetCorrupt, match=r"bad\.txt:1: invalid UTF-8 at byte 0"):
        text_file_documents(tmp_path)
    with pytest.raises(DatasetNotFound, match="missing does not exist"):
        text_file_documents(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFound, match=r"no \.txt files"):
        text_file_documents(tmp_path / "empty")


def test_jsonl_documents_with_configurable_keys(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    rows = [
        {"body": "alpha text", "src": "x"},
        {"body": "beta text", "src": "y"},
        {"body": "gamma", "src": "x"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    docs = jsonl_documents(path, text_key="body", group_key="src")
    assert [(d.text, d.group, d.source) for d in docs] == [
        ("alpha text", "x", "data.jsonl:1"),
        ("beta text", "y", "data.jsonl:2"),
        ("gamma", "x", "data.jsonl:3"),
    ]
    corpus = load_text_corpus(f"jsonl:{path}", text_key="body", group_key="src", heldout_fraction=0.0)
    assert corpus.class_names == ("x", "y") and corpus.label_array().tolist() == [0, 1, 0]
    with pytest.raises(DatasetCorrupt, match=r"data\.jsonl:1: no 'text' field \(fields: 'body', 'src'\); set text_key"):
        jsonl_documents(path)
    path.write_text('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(DatasetCorrupt, match=r"data\.jsonl:2: not valid JSON"):
        jsonl_documents(path)


def test_caps_limit_documents_and_characters(tmp_path: Path) -> None:
    for i in range(5):
        (tmp_path / f"f{i}.txt").write_text("x" * 100)
    assert len(text_file_documents(tmp_path, max_documents=2)) == 2
    assert len(text_file_documents(tmp_path, max_total_chars=250)) == 3
    assert {len(d.text) for d in text_file_documents(tmp_path, max_chars_per_document=10)} == {10}
    with pytest.raises(ConfigError, match="max_documents"):
        text_file_documents(tmp_path, max_documents=0)


# ---------------------------------------------------------------- packing


def test_packing_joins_documents_with_eos_and_masks_only_padding() -> None:
    docs = ["abc", "defgh", "ij"]  # 3+1 + 5+1 + 2+1 = 13 tokens
    packed = pack_token_streams((byte_tokenizer(d) for d in docs), eos_id=EOS, seq_len=5)
    stream = [*b"abc", EOS, *b"defgh", EOS, *b"ij", EOS]
    assert packed.input_ids.shape == (3, 5) and packed.num_tokens == 13
    assert packed.input_ids.flatten()[:13].tolist() == stream
    assert torch.equal(packed.labels[:2], packed.input_ids[:2])
    assert packed.labels[2].tolist() == [*stream[10:], IGNORE_INDEX, IGNORE_INDEX]
    assert packed.input_ids[2, 3:].tolist() == [EOS, EOS]  # pad id defaults to EOS
    dropped = pack_token_streams(
        (byte_tokenizer(d) for d in docs), eos_id=EOS, seq_len=5, drop_remainder=True
    )
    assert dropped.input_ids.shape == (2, 5) and (dropped.labels != IGNORE_INDEX).all()
    batch = packed.collate(np.array([2, 0]))
    assert batch["input_ids"].dtype == torch.int64 and torch.equal(batch["labels"][1], packed.labels[0])


def test_packing_errors() -> None:
    with pytest.raises(ConfigError, match="seq_len"):
        pack_token_streams([[1]], eos_id=0, seq_len=1)
    with pytest.raises(ConfigError, match="do not fill one sequence"):
        pack_token_streams([[1, 2]], eos_id=0, seq_len=8, drop_remainder=True)
    with pytest.raises(ConfigError, match="negative"):
        pack_token_streams([[1, -2]], eos_id=0, seq_len=2)


def test_corpus_pack_with_a_real_tokenizer() -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "<eos>": 1}
    corpus = load_text_corpus("stdlib-docs", packages=["json"], heldout_fraction=0.0)
    for word in sorted({w for d in corpus.documents for w in d.text.split()}):
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    packed = corpus.pack(lambda s: tok.encode(s).ids, eos_id=1, seq_len=64)
    words = sum(len(d.text.split()) for d in corpus.documents)
    assert packed.num_tokens == words + len(corpus)
    assert int((packed.input_ids == 1).sum().item()) >= len(corpus)
    assert 0 not in packed.input_ids.tolist()[0]  # every word is in the vocabulary
