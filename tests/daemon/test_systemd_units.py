"""The shipped systemd units: systemd-analyze verify/security, install-units.

``systemd-analyze`` needs no running systemd for these: ``verify`` loads the
instantiated unit files and checks them (ExecStart= must exist), and
``security --offline=yes`` scores their sandboxing. The scores recorded in
the README are compared with what is measured here.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import sys
from pathlib import Path

import pytest

from dmuserd.daemon.config import load_toml
from dmuserd.daemon.units_commands import shipped_unit_dir

REPO = Path(__file__).resolve().parents[2]
DMUSERD = [sys.executable, "-m", "dmuserd"]
VENV_DMUSERD = str(Path(sys.executable).parent / "dmuserd")
SERVICES = {"dmuserd@.service": "dmuserd@test.service", "dmuserd-nbd@.service": "dmuserd-nbd@test.service"}
SOCKETS = {"dmuserd@.socket": "dmuserd@test.socket", "dmuserd-nbd@.socket": "dmuserd-nbd@test.socket"}
#: Options that give a service a mount namespace of its own, hiding its FUSE mount.
MOUNT_NAMESPACE_OPTIONS = (
    "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "PrivateMounts", "ProtectKernelTunables",
    "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups", "ProtectProc", "ProcSubset",
    "ReadOnlyPaths", "ReadWritePaths", "InaccessiblePaths", "TemporaryFileSystem", "BindPaths",
    "BindReadOnlyPaths", "RootDirectory", "RootImage", "MountAPIVFS", "StateDirectory", "CacheDirectory",
    "LogsDirectory", "NetworkNamespacePath", "PrivateNetwork", "MountFlags",
)


def need_systemd_analyze() -> None:
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")


def settings(unit: Path) -> dict[str, list[str]]:
    """``Key=value`` settings of a unit file (comments and sections dropped)."""
    found: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


@pytest.fixture(scope="module")
def instantiated(tmp_path_factory) -> Path:
    """The units installed by ``dmuserd install-units``, instantiated as ``...@test``."""
    root = tmp_path_factory.mktemp("root")
    result = subprocess.run(DMUSERD + ["install-units", "--root", str(root), "--exec", VENV_DMUSERD],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    installed = root / "etc/systemd/system"
    out = tmp_path_factory.mktemp("units")
    for template, instance in {**SERVICES, **SOCKETS}.items():
        shutil.copyfile(installed / template, out / instance)
    return out


def test_verify_instantiated_units(instantiated):
    need_systemd_analyze()
    units = [str(instantiated / name) for name in [*SERVICES.values(), *SOCKETS.values()]]
    result = subprocess.run(["systemd-analyze", "verify", *units], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    # verify reports problems it can live with on stderr too: there must be none.
    assert result.stderr.strip() == "", result.stderr


def test_verify_catches_a_broken_unit(instantiated, tmp_path):
    """The verify test above can fail: a unit with a missing ExecStart binary does."""
    need_systemd_analyze()
    broken = tmp_path / "dmuserd@test.service"
    broken.write_text((instantiated / "dmuserd@test.service").read_text().replace(VENV_DMUSERD, "/nonexistent/dmuserd"))
    result = subprocess.run(["systemd-analyze", "verify", str(broken)], capture_output=True, text=True)
    assert result.returncode != 0 and "/nonexistent/dmuserd" in result.stderr


def exposure(unit: Path) -> float:
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager", str(unit)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d)", result.stdout)
    assert match, result.stdout
    return float(match.group(1))


def test_security_scores_are_measured_and_recorded_in_the_readme(instantiated):
    need_systemd_analyze()
    fuse = exposure(instantiated / "dmuserd@test.service")
    nbd = exposure(instantiated / "dmuserd-nbd@test.service")
    assert nbd < fuse, "the NBD-only unit must be locked down harder than the FUSE one"
    readme = (REPO / "README.md").read_text()
    recorded = dict(re.findall(r"^\| `(dmuserd(?:-nbd)?@\.service)` \|[^|]*\| (\d+\.\d) ", readme, re.M))
    assert recorded == {"dmuserd@.service": f"{fuse:.1f}", "dmuserd-nbd@.service": f"{nbd:.1f}"}, (
        f"README's exposure scores {recorded} differ from the measured {fuse:.1f} / {nbd:.1f}: update the README"
    )


def test_fuse_unit_keeps_the_host_mount_namespace_and_nbd_unit_is_locked_down():
    fuse = settings(shipped_unit_dir() / "dmuserd@.service")
    assert not [k for k in fuse if k in MOUNT_NAMESPACE_OPTIONS], "a mount namespace would hide the FUSE mount"
    assert fuse["Type"] == ["notify"] and fuse["Restart"] == ["on-failure"] and fuse["WatchdogSec"]
    assert "/dev/fuse rw" in fuse["DeviceAllow"] and fuse["DevicePolicy"] == ["closed"]
    assert "@mount" in " ".join(fuse["SystemCallFilter"])
    nbd = settings(shipped_unit_dir() / "dmuserd-nbd@.service")
    assert nbd["ProtectSystem"] == ["strict"] and nbd["PrivateDevices"] == ["yes"]
    assert nbd["CapabilityBoundingSet"] == [""] and nbd["RestrictAddressFamilies"] == ["AF_UNIX"]


def test_example_configs_load():
    demo = load_toml(str(shipped_unit_dir() / "demo.toml"))
    assert [(e.kind, e.where) for t in demo.targets for e in t.exports] == [("fuse", "/run/dmuserd/demo/fuse")]
    nbd = load_toml(str(shipped_unit_dir() / "nbd-example.toml"))
    assert {e.kind for t in nbd.targets for e in t.exports} == {"nbd"}


def test_install_units_never_overwrites_a_config(tmp_path):
    args = DMUSERD + ["install-units", "--root", str(tmp_path), "--exec", "/opt/dmuserd/bin/dmuserd"]
    first = subprocess.run(args, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    units = tmp_path / "etc/systemd/system"
    for name in [*SERVICES, *SOCKETS]:
        assert (units / name).exists(), first.stdout
    execs = settings(units / "dmuserd@.service")["ExecStart"]
    assert execs == ["/opt/dmuserd/bin/dmuserd serve --config /etc/dmuserd/%i.toml "
                     "--control-socket /run/dmuserd/%i/control.sock"]
    assert not (units / "dmuserd-nbd@.service.d").exists()  # /opt is no home directory
    demo = tmp_path / "etc/dmuserd/demo.toml"
    assert demo.read_text() == (shipped_unit_dir() / "demo.toml").read_text()
    demo.write_text("# mine\n")
    second = subprocess.run(args, capture_output=True, text=True)
    assert second.returncode == 0 and f"kept {demo}" in second.stdout
    assert demo.read_text() == "# mine\n"


def test_install_units_relaxes_protecthome_for_a_dmuserd_in_a_home(tmp_path):
    script = Path(VENV_DMUSERD)
    result = subprocess.run(DMUSERD + ["install-units", "--root", str(tmp_path), "--exec", str(script)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    dropin = tmp_path / "etc/systemd/system/dmuserd-nbd@.service.d/50-install-units-paths.conf"
    interpreter = os.path.realpath(script.read_text().splitlines()[0][2:].split()[0])
    paths = (os.path.realpath(script), interpreter)
    in_home = any(p.startswith(("/home/", "/root/", "/run/user/")) for p in paths)
    in_tmp = any(p.startswith(("/tmp/", "/var/tmp/")) for p in paths)
    assert dropin.exists() == (in_home or in_tmp)
    if in_home:
        assert settings(dropin)["ProtectHome"] == ["read-only"]


def test_install_units_shows_tmp_to_a_dmuserd_in_tmp(tmp_path):
    """A clone in /tmp (PrivateTmp=yes hides it) gets PrivateTmp=no; reinstalling elsewhere removes it."""
    staged = Path(tempfile.mkdtemp(prefix="dmuserd-units-", dir="/tmp"))
    try:
        script = staged / "dmuserd"
        script.write_text("#!/usr/bin/python3\n")
        script.chmod(0o755)
        root = tmp_path / "root"
        dropin_dir = root / "etc/systemd/system/dmuserd-nbd@.service.d"
        dropin_dir.mkdir(parents=True)
        (dropin_dir / "50-install-units-home.conf").write_text("[Service]\nProtectHome=read-only\n")
        result = subprocess.run(DMUSERD + ["install-units", "--root", str(root), "--exec", str(script)],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        dropin = dropin_dir / "50-install-units-paths.conf"
        assert settings(dropin)["PrivateTmp"] == ["no"]
        assert "ProtectHome" not in settings(dropin)  # /usr/bin/python3 is in no home
        assert not (dropin_dir / "50-install-units-home.conf").exists()  # the old name is gone
        assert f"installed {dropin}" in result.stdout

        result = subprocess.run(DMUSERD + ["install-units", "--root", str(root), "--exec", "/opt/dmuserd/bin/dmuserd"],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert not dropin.exists()
    finally:
        shutil.rmtree(staged)


def test_install_units_error_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = subprocess.run(DMUSERD + ["install-units", "--root", str(blocker)], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.startswith("dmuserd: error: ") and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
