"""An export in a package of its own, installed with pip, served for real.

The package is ``docs/examples/http-export`` (``docs/writing-an-export.md``):
pip builds and installs it (into a folder on ``PYTHONPATH``, so the project's
virtualenv stays as it is), and ``dmuserd serve --export http:HOST:PORT``
finds it through the ``dmuserd.exports`` entry point. Clients are curl and
Python's urllib; the bytes are checked against the backing file.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from daemon_harness import DMUSERD, daemon_status, pip_install, terminate

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "http-export"
SIZE = 3 << 20  # three of the export's 1 MiB pieces


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    return pip_install(EXAMPLE, tmp_path_factory.mktemp("site"), "dmuserd_http_export.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served(installed, tmp_path):
    image = tmp_path / "disk.img"
    data = os.urandom(SIZE)
    image.write_bytes(data)
    port = _free_port()
    control = tmp_path / "control.sock"
    log = open(tmp_path / "daemon.log", "w+")
    proc = subprocess.Popen(
        DMUSERD + ["serve", "--name", "disk", "--backend", f"file:path={image}", "--export", f"http:127.0.0.1:{port}",
                   "--control-socket", str(control)],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(installed)},
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 30
    while not (control.exists() and daemon_status(control)["targets"]["disk"]["exports"].get("http") == url):
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "daemon.log").read_text()
        time.sleep(0.05)
    yield proc, url, data, control, port
    terminate(proc)
    log.close()


def _get(url: str, byte_range: str | None = None, method: str = "GET"):
    request = urllib.request.Request(url, method=method, headers={"Range": byte_range} if byte_range else {})
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.status, dict(response.headers), response.read()


def _raw(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    return answer


def test_the_installed_export_serves_ranges(served):
    proc, url, data, control, port = served
    status, headers, body = _get(url)
    assert status == 200 and body == data and headers["Content-Length"] == str(SIZE)
    for byte_range, start, end in (("bytes=0-4095", 0, 4096), ("bytes=12345-1100000", 12345, 1100001),
                                   ("bytes=-1000", SIZE - 1000, SIZE), (f"bytes={SIZE - 7}-", SIZE - 7, SIZE),
                                   (f"bytes=100-{SIZE * 2}", 100, SIZE)):
        status, headers, body = _get(url, byte_range)
        assert status == 206 and body == data[start:end], byte_range
        assert headers["Content-Range"] == f"bytes {start}-{end - 1}/{SIZE}"
    status, headers, body = _get(url, method="HEAD")
    assert status == 200 and body == b"" and headers["Content-Length"] == str(SIZE)
    if shutil.which("curl"):
        out = subprocess.run(["curl", "-sf", "-r", "5000-9999", url], capture_output=True, timeout=30, check=True)
        assert out.stdout == data[5000:10000]
    target = daemon_status(control)["targets"]["disk"]
    assert target["export_status"]["http"]["responses"] >= 7
    assert target["bytes_read"] >= SIZE and target["errors"] == 0


def test_what_it_cannot_answer_fails_that_connection_alone(served):
    proc, url, data, control, port = served
    with pytest.raises(urllib.error.HTTPError) as info:
        _get(url, f"bytes={SIZE}-")
    assert info.value.code == 416
    assert _raw(port, b"PUT / HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 405 ")
    assert _raw(port, b"\x00\xff garbage\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert _raw(port, b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 3000).startswith(b"HTTP/1.1 431 ")
    assert _raw(port, b"GET / HTTP/1.1\r\nno colon here\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert _get(url, "bytes=0-99")[2] == data[:100]  # the daemon and its export go on
    assert proc.poll() is None
    rejected = daemon_status(control)["rejected_inputs"]["http"]
    assert rejected == {"http-416": 1, "http-405": 1, "http-400": 2, "http-431": 1}, rejected


def test_a_stop_ends_the_export(served):
    proc, url, data, control, port = served
    assert _get(url, "bytes=0-0")[2] == data[:1]
    assert terminate(proc) == 0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_its_options_are_checked_by_name(installed, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(installed)}
    for export, words in (("http:127.0.0.1:8080,colour=red", "unknown option(s) colour (known: clients=N)"),
                          ("http:127.0.0.1:8080,clients=0", "option clients: '0' is out of range"),
                          ("http:nowhere", "use http:HOST:PORT")):
        result = subprocess.run(DMUSERD + ["serve", "--backend", "memory:size=1M", "--export", export,
                                           "--control-socket", str(tmp_path / "c.sock")],
                                env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode != 0 and words in result.stderr, result.stderr
        assert f"export '{export}'" in result.stderr and "Traceback" not in result.stderr
    listed = subprocess.run([sys.executable, "-c", "from dmuserd.daemon.export import available; "
                             "import json; print(json.dumps(available()))"],
                            env=env, capture_output=True, text=True, check=True).stdout
    assert json.loads(listed)["http"] == "dmuserd_http_export:HttpExport"
