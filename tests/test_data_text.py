"""Text corpora (stdlib docstrings, .txt, .jsonl, .csv, .parquet), text hygiene, the split by document,
and LM packing."""

from __future__ import annotations

import csv
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sft_actors.data import (
    IGNORE_INDEX,
    InstructionCorpus,
    TextCorpus,
    load_dataset,
    load_text_corpus,
    pack_token_streams,
)
from sft_actors.data.records import jsonl_records
from sft_actors.data.registry import check_dataset
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
    with pytest.raises(
        DatasetCorrupt, match=r"data\.jsonl:1: no 'text' field \(fields: 'body', 'src'\); set text_key"
    ):
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


# ---------------------------------------------------------------- text hygiene


@settings(max_examples=60, deadline=None)
@given(texts=st.lists(st.text(), min_size=1, max_size=5), ensure_ascii=st.booleans())
def test_any_unicode_round_trips_through_jsonl(texts: list[str], ensure_ascii: bool) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "d.jsonl"
        body = "".join(json.dumps({"text": t}, ensure_ascii=ensure_ascii) + "\n" for t in texts)
        path.write_bytes(body.encode("utf-8"))
        records = list(jsonl_records(path))
        assert [r.fields["text"] for r in records] == texts
        assert [r.line for r in records] == list(range(1, len(texts) + 1))


def test_line_separators_inside_strings_bom_crlf_and_blank_lines(tmp_path: Path) -> None:
    texts = ["a\u2028b", "c\u2029d", "e\x85f", "g\x0ch\x1ci", "tab\tend"]
    body = "\r\n\r\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in texts) + "\r\n  \r\n"
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))
    docs = jsonl_documents(path)
    assert [d.text for d in docs] == [t.strip() for t in texts]
    assert [d.source for d in docs] == ["d.jsonl:1", "d.jsonl:3", "d.jsonl:5", "d.jsonl:7", "d.jsonl:9"]


def test_lone_surrogates_become_replacement_characters_and_are_counted(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    path.write_text('{"text": "a\\ud800b\\udfffc"}\n{"text": "\\ud83d\\ude00 pair"}\n')
    records = list(jsonl_records(path))
    assert records[0].fields["text"] == "a\ufffdb\ufffdc" and records[0].replaced == 2
    assert records[1].fields["text"] == "\U0001f600 pair" and records[1].replaced == 0  # a valid pair
    assert [d.text for d in jsonl_documents(path)] == ["a\ufffdb\ufffdc", "\U0001f600 pair"]


def test_invalid_utf8_names_file_line_and_byte_offset(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "ok"}\n{"text": "\xc3\x28"}\n')
    with pytest.raises(DatasetCorrupt, match=r"d\.jsonl:3: invalid UTF-8 at byte 40 \(c3 28"):
        jsonl_documents(path)
    path.write_bytes(b'\xef\xbb\xbf{"text": "\xff"}\n')
    with pytest.raises(DatasetCorrupt, match=r"d\.jsonl:1: invalid UTF-8 at byte 13"):
        jsonl_documents(path)


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ('{"text": broken', r"d\.jsonl:2: not valid JSON \(Expecting value at column 10\)"),
        ('["text"]', r"d\.jsonl:2: expected a JSON object, found list"),
        ('{"body": "x"}', r"d\.jsonl:2: no 'text' field \(fields: 'body'\)"),
        ('{"text": 5}', r"d\.jsonl:2: field 'text' is a int, not a string"),
        ('{"text": null}', r"d\.jsonl:2: field 'text' is null \(an empty cell or JSON null\)"),
        ('{"text": "a", "text": "b"}', r"d\.jsonl:2: key 'text' appears twice in one object"),
    ],
)
def test_bad_jsonl_lines_are_refused_at_check_time(tmp_path: Path, line: str, error: str) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(DatasetCorrupt, match=error):
        check_dataset(f"jsonl:{path}")
    check_dataset(f"jsonl:{path}", contents=False)  # listing alone does not read


# ---------------------------------------------------------------- CSV and parquet


def test_csv_text_and_instruction_columns(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    rows = [
        ["body", "topic", "q", "a"],
        ["first, with comma", "x", "Q1", "A1"],
        ["multi\nline", "y", "Q2", "A2"],
    ]
    with path.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    docs = load_text_corpus(f"csv:{path}", text_key="body", group_key="topic", heldout_fraction=0.0)
    assert [d.text for d in docs.documents] == ["first, with comma", "multi\nline"]
    assert docs.class_names == ("x", "y") and [d.source for d in docs.documents] == ["d.csv:2", "d.csv:3"]
    inst = load_dataset(
        f"file:{path}", kind="instruction", prompt_key="q", response_key="a", heldout_fraction=0.0
    )
    assert isinstance(inst, InstructionCorpus)
    assert [c.messages for c in inst.documents] == [
        (("user", "Q1"), ("assistant", "A1")),
        (("user", "Q2"), ("assistant", "A2")),
    ]


def test_csv_errors_name_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("text,group\nfine,a\nshort\n")
    with pytest.raises(DatasetCorrupt, match=r"d\.csv:3: 1 cells, but the header has 2 columns"):
        check_dataset(f"csv:{path}")
    path.write_text("")
    with pytest.raises(DatasetCorrupt, match=r"d\.csv:1: no header row"):
        check_dataset(f"csv:{path}")
    path.write_text("body\nx\n")
    with pytest.raises(DatasetCorrupt, match=r"d\.csv:2: no 'text' field \(fields: 'body'\); set text_key"):
        check_dataset(f"csv:{path}")
    path.write_bytes(b"text\nok\n\xe9t\xe9\n")
    with pytest.raises(DatasetCorrupt, match=r"d\.csv:3: invalid UTF-8 at byte 8"):
        check_dataset(f"csv:{path}")


def test_parquet_text_instruction_and_errors(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "d.parquet"
    table = pa.table(
        {"text": ["one", "two", "three"], "prompt": ["p1", "p2", "p3"], "response": ["r1", "r2", "r3"]}
    )
    pq.write_table(table, path)
    assert [d.text for d in load_text_corpus(f"parquet:{path}", heldout_fraction=0.0).documents] == [
        "one",
        "two",
        "three",
    ]
    inst = load_dataset(f"file:{path}", kind="instruction", heldout_fraction=0.0)
    assert isinstance(inst, InstructionCorpus) and len(inst) == 3
    pq.write_table(pa.table({"text": ["ok", None, "x"]}), path)
    with pytest.raises(DatasetCorrupt, match=r"d\.parquet:2: field 'text' is null"):
        check_dataset(f"parquet:{path}")
    pq.write_table(pa.table({"text": [1, 2]}), path)
    with pytest.raises(DatasetCorrupt, match=r"d\.parquet:1: field 'text' is a int, not a string"):
        check_dataset(f"parquet:{path}")
    path.write_bytes(b"not parquet at all")
    with pytest.raises(DatasetCorrupt, match=r"d\.parquet: not a readable parquet file"):
        check_dataset(f"parquet:{path}")


def test_file_prefix_picks_the_format_by_suffix(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("plain text file")
    assert [
        d.text for d in load_text_corpus(f"file:{tmp_path / 'a.txt'}", heldout_fraction=0.0).documents
    ] == ["plain text file"]
    (tmp_path / "b.jsonl").write_text('{"text": "json"}\n')
    with pytest.raises(DatasetNotFound, match=r"holds \['jsonl', 'text'\] data files"):
        check_dataset(f"file:{tmp_path}")
    (tmp_path / "c.tsv").write_text("x")
    with pytest.raises(ConfigError, match=r"unknown suffix '\.tsv'"):
        check_dataset(f"file:{tmp_path / 'c.tsv'}")


def test_parquet_missing_column_lists_the_columns_there(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"body": ["x"], "topic": ["t"]}), path)
    with pytest.raises(DatasetCorrupt, match=r"d\.parquet:1: no 'text' field \(fields: 'body', 'topic'\)"):
        check_dataset(f"parquet:{path}")
    docs = load_text_corpus(f"parquet:{path}", text_key="body", group_key="topic", heldout_fraction=0.0)
    assert docs.class_names == ("t",) and docs.documents[0].source == "d.parquet:1"


def test_a_line_of_unicode_space_is_not_blank(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n \t \n\u2028\n', encoding="utf-8")
    with pytest.raises(DatasetCorrupt, match=r"d\.jsonl:3: not valid JSON"):
        check_dataset(f"jsonl:{path}")
