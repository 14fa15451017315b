"""A fake /sys/bus/dsa/devices tree (and /dev/dsa) for discovery tests."""

from __future__ import annotations

from pathlib import Path

# MEMMOVE .. DUALCAST, CRCGEN, COPY_CRC, CACHE_FLUSH as the %*pb format prints it
OP_CAP = "00000000,00000000,00000000,00000000,00000000,00000000,00000001,000303ff"

DEVICE = {"version": "0x100", "max_transfer_size": "2147483648", "max_batch_size": "1024", "op_cap": OP_CAP,
          "gen_cap": "0x40915f0107", "pasid_enabled": "1", "numa_node": "0"}
QUEUE = {"mode": "dedicated", "state": "enabled", "type": "user", "size": "16", "threshold": "0",
         "max_transfer_size": "2097152", "max_batch_size": "32", "block_on_fault": "0", "name": "app", "cdev_minor": "0"}


def write_attrs(path: Path, attrs: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    for key, value in attrs.items():
        (path / key).write_text(value + "\n")


def build(root: Path, queues: dict[str, dict], devices: dict[str, dict] | None = None,
          cdevs: tuple[str, ...] = ()) -> tuple[Path, Path]:
    sysfs, devdir = root / "sys", root / "dev"
    devdir.mkdir(parents=True)
    for name in {f"dsa{q[2:].split('.')[0]}" for q in queues}:
        write_attrs(sysfs / name, DEVICE | (devices or {}).get(name, {}))
    for name, overrides in queues.items():
        write_attrs(sysfs / name, QUEUE | overrides)
    for name in cdevs:
        (devdir / name).write_text("")
    return sysfs, devdir
