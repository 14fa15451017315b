"""A throw-away local Ceph cluster for the rbd backend's tests.

A uniquely named helper module (not conftest). ``scripts/ceph-dev`` starts
the cluster once per session (one mon, one mgr, one OSD on a bluestore
file, all on 127.0.0.1) and stops it at the end. A test skips only where Ceph cannot be
installed here (not root), and says why; with root and the packages merely
missing it fails and names the command that installs them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CEPH_DEV = ROOT / "scripts" / "ceph-dev"
TOOLS = ("ceph-mon", "ceph-osd", "ceph-mgr", "ceph", "rbd", "monmaptool")


def ceph_unavailable() -> str | None:
    """Why the Ceph parts cannot be used here, or None."""
    from dmuserd.backends._librbd import libs

    missing = [t for t in TOOLS if not shutil.which(t)]
    try:
        libs()
    except OSError as exc:
        missing.append(str(exc))
    if not missing:
        return None
    if os.geteuid() != 0:
        return f"Ceph is not installed ({', '.join(missing)}) and only root can install it (make test as root does)"
    pytest.fail(f"Ceph parts missing: {', '.join(missing)}; install them with scripts/setup-system (make test does)")


@dataclass
class CephCluster:
    dir: Path
    conf: str
    pool: str = "rbd"

    def spec(self, image: str, **options: str) -> str:
        """An ``rbd:`` backend spec for ``image`` on this cluster."""
        extra = "".join(f",{k}={v}" for k, v in options.items())
        return f"rbd:pool={self.pool},image={image},conf={self.conf}{extra}"

    def rbd(self, *args, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(["rbd", "--conf", self.conf, *map(str, args)], check=check,
                              capture_output=True, text=True, timeout=timeout)

    def new_image(self, size: str = "64M") -> str:
        name = f"t-{uuid.uuid4().hex[:10]}"
        self.rbd("create", "--size", size, f"{self.pool}/{name}")
        return name

    def import_image(self, path: Path) -> str:
        name = f"t-{uuid.uuid4().hex[:10]}"
        self.rbd("import", "--no-progress", path, f"{self.pool}/{name}")
        return name

    def export(self, image: str, dest: Path) -> Path:
        self.rbd("export", f"{self.pool}/{image}", dest)
        return dest

    def ceph_dev(self, command: str) -> None:
        subprocess.run([str(CEPH_DEV), command, str(self.dir)], check=True, capture_output=True, text=True, timeout=180)

    @contextlib.contextmanager
    def osd_paused(self):
        """The OSD frozen (SIGSTOP): the cluster stops answering; resumed after."""
        self.ceph_dev("osd-pause")
        try:
            yield
        finally:
            self.ceph_dev("osd-resume")


    @contextlib.contextmanager
    def osd_killed(self):
        """The OSD killed (SIGKILL): the cluster stops answering; started again after."""
        self.ceph_dev("osd-kill")
        try:
            yield
        finally:
            self.ceph_dev("osd-start")


_RUNNING: list[Path] = []


def stop_clusters() -> None:
    """Stop every cluster this session started (idempotent)."""
    while _RUNNING:
        workdir = _RUNNING.pop()
        subprocess.run([str(CEPH_DEV), "stop", str(workdir)], capture_output=True, timeout=120)
        shutil.rmtree(workdir, ignore_errors=True)


def stop_after_last_user(items) -> None:
    """Stop the cluster right after the last test using it, not at the session's end.

    A session fixture lives until the whole run ends; the cluster's daemons
    would idle through the rest of ``make test``, taking CPU and RAM.
    """
    users = [item for item in items if "ceph_cluster" in getattr(item, "fixturenames", ())]
    if users:
        last = users[-1]
        last.stash[_LAST_USER] = True


_LAST_USER = pytest.StashKey[bool]()


def is_last_user(item) -> bool:
    return item.stash.get(_LAST_USER, False)


@pytest.fixture(scope="session")
def ceph_cluster():
    why = ceph_unavailable()
    if why:
        pytest.skip(why)
    workdir = Path(tempfile.mkdtemp(prefix="dmuserd-ceph-"))
    _RUNNING.append(workdir)
    # bluestore on a sparse file: the OSD can be killed and started again (memstore would come back empty).
    env = {**os.environ, "CEPH_DEV_STORE": "bluestore"}
    started = subprocess.run([str(CEPH_DEV), "start", str(workdir)], capture_output=True, text=True, timeout=300, env=env)
    try:
        if started.returncode != 0:
            pytest.fail(f"scripts/ceph-dev start failed ({started.returncode}):\n{started.stdout}\n{started.stderr}")
        yield CephCluster(workdir, started.stdout.strip().splitlines()[-1])
    finally:
        stop_clusters()
