"""The package's foundation: errors form one hierarchy, logging renders grep-able lines."""

from __future__ import annotations

import io
import json

import pytest

from sft_actors import errors, log


def test_every_error_is_an_sft_error() -> None:
    classes = [v for v in vars(errors).values() if isinstance(v, type) and issubclass(v, Exception)]
    assert len(classes) > 10
    for cls in classes:
        assert issubclass(cls, errors.SftError), cls


def test_remote_error_carries_type_and_peer() -> None:
    e = errors.RemoteError("CodecError", "NaN in activations", peer="dev0")
    assert e.remote_type == "CodecError" and e.peer == "dev0"
    assert "CodecError from dev0: NaN in activations" in str(e)


def test_json_log_lines_carry_bound_context() -> None:
    buf = io.StringIO()
    log.configure("json", stream=buf)
    try:
        log.get_logger(actor="dev0", role="device").info("activations_sent", nbytes=123, ratio=25.0)
        line = json.loads(buf.getvalue().strip().splitlines()[-1])
        assert line["event"] == "activations_sent"
        assert line["actor"] == "dev0" and line["nbytes"] == 123 and line["level"] == "info"
    finally:
        log.configure("console", level="warning")


def test_bad_log_settings_are_clear() -> None:
    with pytest.raises(ValueError, match="log format"):
        log.configure("xml")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="log level"):
        log.configure("json", level="loud")


def test_a_logger_made_before_configure_follows_it() -> None:
    early = log.get_logger(component="early")
    buf = io.StringIO()
    log.configure("json", stream=buf)
    try:
        early.info("late_event", n=1)
        assert json.loads(buf.getvalue().strip())["component"] == "early"
    finally:
        log.configure("console", level="warning")


def test_console_logging_follows_a_replaced_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    """A closed, replaced stderr (test capture, CLI runners) must not break later logging."""
    first = io.StringIO()
    monkeypatch.setattr("sys.stderr", first)
    log.configure("console", level="info")
    first.close()
    second = io.StringIO()
    monkeypatch.setattr("sys.stderr", second)
    try:
        log.get_logger().info("still_logging")
        assert "still_logging" in second.getvalue()
    finally:
        log.configure("console", level="warning")
