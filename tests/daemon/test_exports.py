"""The export registry (``dmuserd.exports`` entry points, :mod:`dmuserd.daemon.export`):
kinds by name, classes by ``module:Class``, and typed errors naming the export."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dmuserd.daemon.config import ConfigError, DaemonSpec, ExportSpec, parse_export
from dmuserd.daemon.dmuser import DmUserExport
from dmuserd.daemon.export import Export, available, build, export_class
from dmuserd.daemon.fuse import FuseExport
from dmuserd.daemon.nbd import NbdError, NbdExport
from dmuserd.daemon.runtime import Daemon

KNOWN = ("dm-user", "fuse", "nbd")


def _host() -> Daemon:
    return Daemon(DaemonSpec([]))  # the daemon is what exports get as their Host


def test_the_built_in_kinds_are_registered_classes():
    registered = available()
    assert set(KNOWN) <= set(registered)
    assert export_class("fuse") is FuseExport
    assert export_class("nbd") is NbdExport
    assert export_class("dm-user") is DmUserExport
    for kind in KNOWN:
        assert issubclass(export_class(kind), Export) and export_class(kind).kind == kind


def test_an_unknown_kind_is_refused_with_the_known_ones():
    with pytest.raises(ConfigError) as info:
        parse_export("bogus:/x")
    assert "'bogus:/x'" in str(info.value) and all(kind in str(info.value) for kind in KNOWN)
    with pytest.raises(ConfigError, match=r"unknown export kind 'bogus' \(known: .*dm-user, fuse, nbd"):
        export_class("bogus")
    for text in ("fuse", "fuse:", ":x"):
        with pytest.raises(ConfigError, match="use KIND:WHERE"):
            parse_export(text)


def test_the_command_line_says_it_in_one_line():
    result = subprocess.run([sys.executable, "-m", "dmuserd", "serve", "--backend", "memory:size=1M",
                             "--export", "bogus:/x"], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "export 'bogus:/x'" in result.stderr and "fuse" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("text, error, words", [
    ("fuse:/run/x,channels=3", ConfigError, "export 'fuse:/run/x,channels=3': channels= is for emulate=dm-user"),
    ("fuse:/run/x,emulate=dm-user,channels=x", ConfigError,
     "export 'fuse:/run/x,emulate=dm-user,channels=x' option channels: 'x' is not an integer"),
    ("fuse:/run/x,speed=9", ConfigError, "export 'fuse:/run/x,speed=9': unknown option(s) speed"),
    ("dm-user:d,channels=65", ConfigError, "export 'dm-user:d,channels=65' option channels: '65' is out of range"),
    ("dm-user:d,create=perhaps", ConfigError, "export 'dm-user:d,create=perhaps' option create: 'perhaps' is not a"),
    ("nbd:/tmp/d.sock,on-stop=later", NbdError, "export 'nbd:/tmp/d.sock,on-stop=later' option on-stop: 'later'"),
    ("nbd:tcp:host", NbdError, "nbd:"),
])
def test_bad_options_are_refused_at_build_naming_the_export(text, error, words):
    with pytest.raises(error) as info:
        build(parse_export(text), _host())
    assert isinstance(info.value, ConfigError)
    assert words in str(info.value)


def test_one_process_has_one_fuse_mount():
    host = _host()
    first = build(parse_export("fuse:/run/dmuserd/fuse"), host)
    assert isinstance(first, FuseExport) and host.shared["fuse"].mountpoint == "/run/dmuserd/fuse"
    build(parse_export("fuse:/run/dmuserd/fuse,emulate=dm-user"), host)  # another target, same mount
    with pytest.raises(ConfigError, match="several mount points"):
        build(parse_export("fuse:/run/elsewhere"), host)


def test_a_class_named_by_module_path():
    spec = parse_export("dmuserd.daemon.fuse:FuseExport:/run/x,emulate=dm-user,channels=2")
    assert (spec.kind, spec.where, spec.options) == ("dmuserd.daemon.fuse:FuseExport", "/run/x",
                                                      {"emulate": "dm-user", "channels": "2"})
    export = build(spec, _host())
    assert type(export) is FuseExport and (export.emulate, export.channels) == (True, 2)


@pytest.mark.parametrize("kind, words", [
    ("dmuserd.daemon.runtime:Target", "not a dmuserd Export subclass"),
    ("dmuserd.daemon.fuse:NoSuchClass", "could not be loaded"),
    ("dmuserd.no_such_module:Export", "could not be loaded"),
])
def test_a_class_by_path_that_is_no_export_is_refused(kind, words):
    with pytest.raises(ConfigError, match=words):
        build(ExportSpec(kind, "/x"), _host())


async def test_a_stop_takes_every_export_through_the_same_steps(monkeypatch, tmp_path):
    """start → prepare_stop (requests still admitted) → stop_admitting (refused by then) → its tasks cancelled."""
    import trio

    from dmuserd.backends.memory import MemoryBackend
    from dmuserd.daemon import export as registry
    from dmuserd.daemon.config import TargetSpec

    steps: list[tuple] = []

    class Recording(Export):
        kind = "recording"

        async def start(self, target, nursery) -> str:
            self.dispatcher = target.dispatcher
            nursery.start_soon(self._serve)
            steps.append(("start", self.spec.where))
            return f"rec://{self.spec.where}"

        async def _serve(self) -> None:
            try:
                await trio.sleep_forever()
            finally:
                steps.append(("cancelled", self.spec.where))

        async def prepare_stop(self) -> None:
            steps.append(("prepare_stop", self.spec.where, self.dispatcher.admitting))

        def stop_admitting(self) -> None:
            steps.append(("stop_admitting", self.spec.where, self.dispatcher.admitting))

        def status(self) -> dict:
            return {"where": self.spec.where}

    monkeypatch.setattr(registry, "export_class", lambda kind: Recording)
    daemon = Daemon(DaemonSpec([]), control_socket=str(tmp_path / "control.sock"))
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        for name in ("a", "b"):
            await daemon.add_target(TargetSpec(name, "memory", {}, [ExportSpec("recording", name)]),
                                    backend=MemoryBackend(1 << 20))
        status = daemon.status()["targets"]["a"]
        assert status["exports"] == {"recording": "rec://a"}
        assert status["export_status"] == {"recording": {"where": "a"}}
        await daemon.remove_target("a")  # one target alone, the same way
        assert steps == [("start", "a"), ("start", "b"), ("prepare_stop", "a", True), ("stop_admitting", "a", False),
                         ("cancelled", "a")]
        steps.clear()
        await daemon.stop()
    assert steps == [("prepare_stop", "b", True), ("stop_admitting", "b", False), ("cancelled", "b")]
