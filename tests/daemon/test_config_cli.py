"""The command-line contract, TOML configs, logging set-up."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest

from dmuserd.daemon import logs
from dmuserd.daemon.config import ConfigError, load_toml, parse_export, parse_target

DMUSERD = [sys.executable, "-m", "dmuserd"]


def test_parse_target_and_exports():
    spec = parse_target("disk", "memory:size=1G", ["fuse:/run/x", "nbd:tcp:127.0.0.1:10809", "dm-user:d,channels=8"])
    assert (spec.backend, spec.backend_options) == ("memory", {"size": "1G"})
    assert [(e.kind, e.where, e.options) for e in spec.exports] == [
        ("fuse", "/run/x", {}),
        ("nbd", "tcp:127.0.0.1:10809", {}),
        ("dm-user", "d", {"channels": "8"}),
    ]
    with pytest.raises(ConfigError, match="KIND:WHERE"):
        parse_export("floppy:/dev/fd0")
    with pytest.raises(ConfigError, match="has no export"):
        parse_target("disk", "memory:size=1G", [])
    with pytest.raises(ConfigError, match="plain file name"):
        parse_target("../x", "memory:size=1G", ["fuse:/run/x"])


def test_toml_config(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(
        '[daemon]\ncontrol_socket = "/tmp/c.sock"\n'
        '[targets.a]\nbackend = "memory:size=1G"\nexports = ["fuse:/run/f"]\n'
        '[targets.b]\nbackend = { type = "file", path = "/srv/b.img", readonly = true }\nexports = "fuse:/run/f"\n'
    )
    spec = load_toml(str(path))
    assert spec.control_socket == "/tmp/c.sock"
    assert [(t.name, t.backend, t.backend_options) for t in spec.targets] == [
        ("a", "memory", {"size": "1G"}),
        ("b", "file", {"path": "/srv/b.img", "readonly": "True"}),
    ]
    path.write_text("[targets.a]\nbackend = 3\n")
    with pytest.raises(ConfigError, match="needs backend"):
        load_toml(str(path))
    path.write_text("not toml [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_toml(str(path))


def test_help_and_console_script():
    out = subprocess.run(DMUSERD + ["--help"], capture_output=True, text=True, check=True).stdout
    for command in ("serve", "demo", "status"):
        assert command in out
    script = os.path.join(os.path.dirname(sys.executable), "dmuserd")
    assert subprocess.run([script, "serve", "--help"], capture_output=True, text=True, check=True).stdout.count("--export")


def test_user_errors_are_one_line_without_traceback(tmp_path):
    result = subprocess.run(DMUSERD + ["serve", "--backend", "memory:size=lots", "--export", f"fuse:{tmp_path}/f"],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip().startswith("dmuserd: error:") and "'lots' is not a size" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    result = subprocess.run(DMUSERD + ["status", "--control-socket", str(tmp_path / "none.sock")],
                            capture_output=True, text=True)
    assert result.returncode == 1 and "is `dmuserd serve` running?" in result.stderr


@pytest.fixture
def restore_logging():
    """These tests point structlog at short-lived streams: put it back after."""
    import structlog

    yield
    structlog.reset_defaults()


def test_logs_json_when_not_a_terminal_and_level_from_env(monkeypatch, restore_logging):
    import structlog

    stream = io.StringIO()
    monkeypatch.setenv("DMUSERD_LOG_LEVEL", "warning")
    logs.configure(stream=stream)
    structlog.get_logger().info("hidden")
    structlog.get_logger().warning("shown", device="disk", seq=7)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["event"] == "shown" and record["level"] == "warning" and record["seq"] == 7
    with pytest.raises(ValueError, match="unknown log level"):
        logs.configure("chatty", stream=stream)


def test_journald_lines_carry_syslog_priority(tmp_path, monkeypatch, restore_logging):
    import structlog

    out = tmp_path / "journal"
    with open(out, "w") as stream:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        logs.configure("debug", stream=stream)
        structlog.get_logger().error("bad")
        structlog.get_logger().debug("detail")
    lines = out.read_text().splitlines()
    assert lines[0].startswith("<3>{") and json.loads(lines[0][3:])["event"] == "bad"
    assert lines[1].startswith("<7>{")


def test_busy_or_non_empty_mountpoint_is_refused(tmp_path):
    mnt = tmp_path / "fuse"
    mnt.mkdir()
    (mnt / "somebody-elses-file").write_text("keep me")
    result = subprocess.run(DMUSERD + ["serve", "--backend", "memory:size=1M", "--export", f"fuse:{mnt}",
                                       "--control-socket", str(tmp_path / "c.sock")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "is not empty" in result.stderr and "Traceback" not in result.stderr
    assert (mnt / "somebody-elses-file").read_text() == "keep me"
