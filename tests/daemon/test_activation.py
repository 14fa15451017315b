"""bind_private_unix: the daemon's Unix sockets (control, NBD, channel) appear only once they listen."""

from __future__ import annotations

import os
import socket
import stat
import threading

from dmuserd.daemon.activation import bind_private_unix


def test_the_socket_file_appears_listening_private_and_alone(tmp_path):
    path = tmp_path / "s.sock"
    path.write_text("stale")  # replaced
    with bind_private_unix(str(path), 4) as sock:
        mode = os.stat(path).st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
        assert os.listdir(tmp_path) == ["s.sock"]  # no temporary name left beside it
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(path))
            conn, _ = sock.accept()
            conn.close()


def test_a_client_that_sees_the_file_is_never_refused(tmp_path):
    """A client polls for the file and connects the moment it exists, while the socket is bound again and again:
    no connect is refused (between bind() and listen() it would be, were the file there already)."""
    path = str(tmp_path / "race.sock")
    refused: list[OSError] = []
    stop = threading.Event()
    looking = threading.Semaphore(0)  # the client saw no file: it looks for the next one
    connected = 0

    def client() -> None:
        nonlocal connected
        looking.release()
        while not stop.is_set():
            if os.path.exists(path):  # connect the moment the file is there
                with socket.socket(socket.AF_UNIX) as sock:
                    try:
                        sock.connect(path)
                    except OSError as exc:
                        refused.append(exc)
                        continue
                connected += 1
                while os.path.exists(path) and not stop.is_set():  # once per socket
                    pass
                looking.release()

    thread = threading.Thread(target=client)
    thread.start()
    try:
        for _ in range(100):
            assert looking.acquire(timeout=10)
            with bind_private_unix(path, 4) as sock:
                sock.settimeout(10)
                sock.accept()[0].close()  # the client's connect
                os.unlink(path)  # gone before the socket closes: the file exists only while it listens
    finally:
        stop.set()
        thread.join(30)
    assert refused == [] and connected == 100


def test_a_path_too_long_for_a_temporary_name_is_bound_where_it_is(tmp_path):
    directory = tmp_path / ("d" * max(1, 100 - len(str(tmp_path))))
    directory.mkdir()
    path = str(directory / "s")
    assert 100 < len(path) <= 107 < len(f"{path}.{os.getpid()}")
    with bind_private_unix(path, 1):
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(path)
