"""``dmuserd install-units``: put the systemd units and an example config in place.

The units ship inside the package (``dmuserd/systemd/``, package data):

* ``dmuserd@.service``: one instance per ``/etc/dmuserd/<instance>.toml``,
  any export kind (FUSE needs the host's mount namespace);
* ``dmuserd-nbd@.service``: NBD-only configs, locked down hard;
* ``dmuserd@.socket`` / ``dmuserd-nbd@.socket``: optional socket activation.

Their ``ExecStart=`` names ``/usr/local/bin/dmuserd``; the installed copies
name the ``dmuserd`` this command runs from (a virtualenv's, say), or
``--exec``. Example configs are copied to the config directory unless a file
of that name is there already: a user's config is never overwritten.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from dmuserd.errors import DmuserdError

#: The ExecStart= path in the shipped unit files.
SHIPPED_EXEC = "/usr/local/bin/dmuserd"
UNIT_SUFFIXES = (".service", ".socket")
EXAMPLE_CONFIGS = ("demo.toml", "nbd-example.toml")
#: What the locked-down unit hides, and the setting that shows it again: a
#: dmuserd installed there (a virtualenv in /root, a pyenv Python, a clone in
#: /tmp) could not even be started. ProtectSystem=strict keeps it read-only.
HIDDEN_DIRS = (
    (("/home", "/root", "/run/user"), "ProtectHome=read-only", "a home directory"),  # ProtectHome=yes
    (("/tmp", "/var/tmp"), "PrivateTmp=no", "a temporary directory"),  # PrivateTmp=yes
)
DROPIN_DIR = "dmuserd-nbd@.service.d"
DROPIN_NAME = "50-install-units-paths.conf"
#: Earlier names of that drop-in, removed on reinstall.
OLD_DROPIN_NAMES = ("50-install-units-home.conf",)


class UnitInstallError(DmuserdError):
    """The units or configs could not be installed."""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "install-units",
        help="install the systemd units and an example config (root)",
        description="Copy dmuserd's systemd units to /etc/systemd/system (ExecStart= set to this "
        "dmuserd) and the example configs to /etc/dmuserd (never overwriting one), then "
        "reload systemd. Afterwards: systemctl enable --now dmuserd@demo",
    )
    parser.add_argument("--root", default="/", metavar="DIR",
                        help="install below DIR instead of / (packaging; no systemd reload)")
    parser.add_argument("--unit-dir", default="/etc/systemd/system", metavar="DIR",
                        help="where units go (default /etc/systemd/system)")
    parser.add_argument("--config-dir", default="/etc/dmuserd", metavar="DIR",
                        help="where example configs go (default /etc/dmuserd)")
    parser.add_argument("--exec", dest="executable", metavar="PATH",
                        help="the dmuserd command the units run (default: this installation's)")
    parser.add_argument("--no-reload", action="store_true", help="do not run systemctl daemon-reload")
    parser.set_defaults(func=_install_units)


def shipped_unit_dir() -> Path:
    """The folder of unit files and example configs inside the installed package."""
    from importlib.resources import files

    return Path(str(files("dmuserd").joinpath("systemd")))


def default_executable() -> str:
    """This installation's ``dmuserd`` script, else ``python -m dmuserd``."""
    beside = Path(sys.executable).parent / "dmuserd"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("dmuserd")
    if found:
        return os.path.abspath(found)
    return f"{sys.executable} -m dmuserd"


def render_unit(text: str, executable: str) -> str:
    """A shipped unit's text with ``ExecStart=`` running ``executable``."""
    if " " in executable.split(" -m ")[0]:
        raise UnitInstallError(f"--exec {executable!r}: the path must not contain spaces")
    return text.replace(SHIPPED_EXEC, executable)


def interpreter_paths(executable: str) -> list[str]:
    """The real paths ``executable`` runs: the command, and a script's interpreter."""
    command = executable.split()[0]
    paths = [os.path.realpath(command)]
    try:
        with open(command, "rb") as f:
            first = f.readline(512)
    except OSError:
        return paths
    if first.startswith(b"#!") and first[2:].split():
        paths.append(os.path.realpath(first[2:].split()[0].decode(errors="replace")))
    return paths


def sandbox_dropin(paths: list[str]) -> str | None:
    """The drop-in that lets the locked-down unit run ``paths``, or None if it needs none."""
    lines = []
    for dirs, setting, what in HIDDEN_DIRS:
        hidden = [p for p in paths if any(p == d or p.startswith(d + "/") for d in dirs)]
        if hidden:
            lines.append(f"# {hidden[0]} lives in {what}, which the unit hides otherwise.\n{setting}\n")
    if not lines:
        return None
    return "# Written by dmuserd install-units.\n[Service]\n" + "".join(lines)


def install(root: str = "/", unit_dir: str = "/etc/systemd/system", config_dir: str = "/etc/dmuserd",
            executable: str | None = None) -> tuple[list[Path], list[Path], list[Path]]:
    """Install units and example configs; returns (units, configs written, configs kept)."""
    source = shipped_unit_dir()
    units = sorted(p for p in source.iterdir() if p.suffix in UNIT_SUFFIXES) if source.is_dir() else []
    if not units:
        raise UnitInstallError(f"no unit files in {source}: this dmuserd installation is incomplete; reinstall it")
    executable = executable or default_executable()
    unit_target = Path(root) / unit_dir.lstrip("/")
    config_target = Path(root) / config_dir.lstrip("/")
    written_units, written_configs, kept_configs = [], [], []
    try:
        unit_target.mkdir(parents=True, exist_ok=True)
        for unit in units:
            dest = unit_target / unit.name
            dest.write_text(render_unit(unit.read_text(), executable))
            dest.chmod(0o644)
            written_units.append(dest)
        config_target.mkdir(parents=True, exist_ok=True, mode=0o755)
        for name in EXAMPLE_CONFIGS:
            dest = config_target / name
            if dest.exists():
                kept_configs.append(dest)
                continue
            shutil.copyfile(source / name, dest)
            dest.chmod(0o644)
            written_configs.append(dest)
        dropin_text = sandbox_dropin(interpreter_paths(executable))
        dropin_dir = unit_target / DROPIN_DIR
        for name in (DROPIN_NAME, *OLD_DROPIN_NAMES):
            (dropin_dir / name).unlink(missing_ok=True)
        if dropin_text:
            dropin_dir.mkdir(exist_ok=True)
            dropin = dropin_dir / DROPIN_NAME
            dropin.write_text(dropin_text)
            dropin.chmod(0o644)
            written_units.append(dropin)
    except PermissionError as exc:
        raise UnitInstallError(f"cannot write {exc.filename}: run as root (or use --root DIR to stage the files)") from None
    except OSError as exc:
        raise UnitInstallError(f"installing into {exc.filename or root} failed: {exc.strerror}") from None
    return written_units, written_configs, kept_configs


def _install_units(args) -> int:
    units, written, kept = install(args.root, args.unit_dir, args.config_dir, args.executable)
    for path in units:
        print(f"installed {path}")
    for path in written:
        print(f"installed {path}")
    for path in kept:
        print(f"kept {path} (already there)")
    if args.root == "/" and not args.no_reload and os.path.isdir("/run/systemd/system"):
        result = subprocess.run(["systemctl", "daemon-reload"], capture_output=True, text=True)
        if result.returncode != 0:
            raise UnitInstallError(f"systemctl daemon-reload failed: {result.stderr.strip()}")
        print("systemd reloaded; start the demo with: systemctl enable --now dmuserd@demo")
    elif args.root == "/":
        print("systemd is not running here; later: systemctl daemon-reload && systemctl enable --now dmuserd@demo")
    return 0
