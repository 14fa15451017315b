"""Logs under journald: every level at its syslog priority, no payload bytes."""

from __future__ import annotations

import json
import os

import pytest
import structlog

from dmuserd.daemon import logs


@pytest.fixture
def journal_stream(tmp_path, monkeypatch):
    """A file that $JOURNAL_STREAM names, as systemd's stdout stream would be."""
    path = tmp_path / "journal"
    with open(path, "w") as stream:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        logs.configure("debug", stream=stream)
        yield stream, path
    structlog.reset_defaults()


def test_every_level_gets_its_syslog_priority(journal_stream):
    stream, path = journal_stream
    log = structlog.get_logger("dmuserd.test")
    log.debug("d")
    log.info("i")
    log.warning("w")
    log.warn("w2")
    log.error("e")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("x")
    log.critical("c")
    stream.flush()
    lines = path.read_text().splitlines()
    prefixes = [line[: line.index("{")] for line in lines]
    assert prefixes == ["<7>", "<6>", "<4>", "<4>", "<3>", "<3>", "<2>"]
    events = [json.loads(line[3:]) for line in lines]
    assert [e["event"] for e in events] == ["d", "i", "w", "w2", "e", "x", "c"]
    assert "RuntimeError: boom" in events[5]["exception"]


def test_no_payload_bytes_reach_the_log(journal_stream):
    stream, path = journal_stream
    secret = b"\x00SECRET-PAYLOAD\xff" * 4
    log = structlog.get_logger("dmuserd.test").bind(device="disk", seq=3, op="WRITE")
    log.warning("request failed", payload=secret, buffers=[memoryview(secret), bytearray(secret)],
                detail={"data": secret})
    stream.flush()
    line = path.read_text()
    assert "SECRET" not in line and "\\x00" not in line
    event = json.loads(line[3:])
    assert event["payload"] == f"<{len(secret)} bytes>"
    assert event["buffers"] == [f"<{len(secret)} bytes>"] * 2 and event["detail"] == {"data": f"<{len(secret)} bytes>"}
    assert (event["device"], event["seq"], event["op"]) == ("disk", 3, "WRITE")


def test_not_journald_means_plain_json(tmp_path, monkeypatch):
    monkeypatch.setenv("JOURNAL_STREAM", "1:1")  # some other stream
    path = tmp_path / "out"
    with open(path, "w") as stream:
        logs.configure("info", stream=stream)
        structlog.get_logger().info("plain", data=b"xy")
    structlog.reset_defaults()
    assert json.loads(path.read_text()) | {"timestamp": None} == {"event": "plain", "level": "info",
                                                                  "data": "<2 bytes>", "timestamp": None}
