"""Check-time refusals found by review: instruction data that does not fit ``seq_len``, the exit
code of ``sft topology check``, and data files that say what is wrong with them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sft_actors.errors import TopologyError
from sft_actors.topology.checks import topology_warnings
from sft_actors.topology.loader import parse_topology

LONG = "a prompt far longer than forty-eight byte tokens, so that its response never fits in"


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def topology(path: Path, seq_len: int) -> dict[str, object]:
    data = {"dataset": f"jsonl:{path}", "kind": "instruction", "chat_template": "none"}
    return {
        "run": {"name": "t", "model": "llama-tiny", "train": {"rounds": 1, "seq_len": seq_len}, "data": data},
        "actors": [
            {"name": "coordinator", "role": "coordinator", "port": 5000},
            {"name": "server", "role": "server", "port": 5001},
            {"name": "dev0", "role": "device", "cut": 1},
        ],
    }


def test_no_conversation_within_seq_len_is_a_topology_error(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "i.jsonl", [{"prompt": LONG, "response": "r"}] * 9)
    with pytest.raises(TopologyError) as info:
        parse_topology(topology(path, 16), source="t.toml")
    msg = str(info.value)
    assert "[run.train], key 'seq_len'" in msg and "no conversation" in msg, msg
    assert "all 9 would be dropped" in msg and "i.jsonl:1" in msg and "raise seq_len" in msg, msg


def test_some_conversations_dropped_is_a_warning_with_the_count(tmp_path: Path) -> None:
    rows = [{"prompt": LONG, "response": "r"}] * 3 + [{"prompt": "p", "response": "r"}] * 7
    path = write_jsonl(tmp_path / "i.jsonl", rows)
    topo = parse_topology(topology(path, 48), source="t.toml")
    (warning,) = [w for w in topology_warnings(topo) if "seq_len" in w]
    assert "3 of 10 conversations" in warning and "will be dropped" in warning and "i.jsonl:1" in warning
    fits = parse_topology(topology(path, 256), source="t.toml")
    assert not [w for w in topology_warnings(fits) if "seq_len" in w]


def test_topology_check_exits_2_on_a_config_error_and_prints_the_drop_warning(tmp_path: Path) -> None:
    from sft_actors.cli.main import app

    path = write_jsonl(tmp_path / "i.jsonl", [{"prompt": LONG, "response": "r"}] * 2)
    toml = tmp_path / "t.toml"
    toml.write_text(
        f'[run]\nname = "t"\nmodel = "llama-tiny"\n[run.train]\nrounds = 1\nseq_len = 48\n'
        f'[run.data]\ndataset = "jsonl:{path}"\nkind = "instruction"\nchat_template = "none"\n'
        '[[actors]]\nname = "coordinator"\nrole = "coordinator"\nport = 5000\n'
        '[[actors]]\nname = "server"\nrole = "server"\nport = 5001\n'
        '[[actors]]\nname = "dev0"\nrole = "device"\ncut = 1\n'
    )
    out = CliRunner().invoke(app, ["topology", "check", str(toml)])
    assert out.exit_code == 2 and out.stdout == "", out.output
    assert out.stderr.startswith("error: ") and "key 'seq_len'" in out.stderr
    write_jsonl(path, [{"prompt": LONG, "response": "r"}, {"prompt": "p", "response": "r"}])
    out = CliRunner().invoke(app, ["topology", "check", str(toml)])
    assert out.exit_code == 0, out.output
    assert "warning: " in out.stderr and "1 of 2 conversations" in out.stderr


def test_a_null_parquet_cell_is_called_null(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    from sft_actors.data.registry import check_dataset
    from sft_actors.errors import DatasetCorrupt

    path = tmp_path / "null.parquet"
    pq.write_table(pa.table({"body": ["a", "b", "c", None]}), path)
    with pytest.raises(DatasetCorrupt) as info:
        check_dataset(f"parquet:{path}", text_key="body")
    msg = str(info.value)
    assert "null.parquet:4: field 'body' is null" in msg and "no 'body' field" not in msg, msg


@pytest.mark.parametrize("name", ["d.parquet", "d.jsonl"])  # by suffix, and by the magic bytes PAR1
def test_a_parquet_file_read_as_jsonl_names_parquet(tmp_path: Path, name: str) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    from sft_actors.data.registry import check_dataset
    from sft_actors.errors import DatasetCorrupt

    path = tmp_path / name
    pq.write_table(pa.table({"text": ["x"] * 3}), path)
    with pytest.raises(DatasetCorrupt) as info:
        check_dataset(f"jsonl:{path}")
    msg = str(info.value)
    assert "invalid UTF-8" in msg and "parquet:<path>" in msg and "file:<path>" in msg, msg
    assert "iconv" not in msg


def test_duplicate_jsonl_keys_are_refused_at_check_time(tmp_path: Path) -> None:
    path = tmp_path / "i.jsonl"
    path.write_text(
        '{"prompt": "p", "response": "r"}\n'
        '{"messages": [{"role": "user", "content": "u", "content": "v"}, '
        '{"role": "assistant", "content": "a"}]}\n'
    )
    with pytest.raises(TopologyError) as info:
        parse_topology(topology(path, 64), source="t.toml")
    assert "i.jsonl:2: key 'content' appears twice in one object" in str(info.value), info.value
