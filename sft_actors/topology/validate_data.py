"""``[run.data]`` record keys: checks that need nothing but the file (see ``validate``)."""

from __future__ import annotations

from sft_actors.topology.report import Reporter
from sft_actors.topology.schema import DATA_FIELD_KEYS, RECORD_DATASETS, DataConfig


def validate_data_keys(r: Reporter, d: DataConfig) -> None:
    """Record keys are set once (as ``[run.data]`` keys, not also in ``options``) and only for
    datasets that have records; ``chat_template`` only for instruction data."""
    for key in DATA_FIELD_KEYS:
        if key in d.options and getattr(d, key) is not None:
            r.fail("[run.data]", "options", f"{key!r} is set twice, here and as [run.data] {key}; keep one")
    for key in ("kind", "chat_template"):
        if key in d.options:
            r.fail("[run.data]", "options", f"{key!r} is a [run.data] key; write {key} = ... there instead")
    records = d.dataset.startswith(RECORD_DATASETS)
    for key in DATA_FIELD_KEYS:
        if getattr(d, key) is not None and not records:
            r.fail(
                "[run.data]",
                key,
                f"dataset {d.dataset!r} has no records to name fields of; remove it or use a "
                "jsonl:, csv:, parquet: or file: dataset",
            )
        if getattr(d, key) == "":
            r.fail("[run.data]", key, "is empty; name a JSON key or a column")
    if d.kind != "text" and not records:
        r.fail(
            "[run.data]",
            "kind",
            f"{d.kind!r} needs records (jsonl:, csv:, parquet: or file:), not {d.dataset!r}; "
            'use kind = "text"',
        )
    if d.chat_template != "auto" and d.kind != "instruction":
        r.fail("[run.data]", "chat_template", 'applies to kind = "instruction" only; remove it')
