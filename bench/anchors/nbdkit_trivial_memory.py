"""The anchor for the NBD scenario: nbdkit's python plugin at its cheapest.

``nbdkit python bench/anchors/nbdkit_trivial_memory.py size=BYTES``: a
``bytearray`` disk, each callback one slice copy, thread model parallel (as
dmuserd's plugin). It is the floor cost of serving NBD from Python inside
nbdkit; dmuserd's export adds a hop to the daemon on top of that.
"""

import nbdkit

API_VERSION = 2

disk = bytearray()


def config(key, value):
    global disk
    if key != "size":
        raise ValueError(f"unknown parameter {key}")
    disk = bytearray(nbdkit.parse_size(value))


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def open(readonly):  # noqa: A001 - nbdkit's callback name
    return 1


def get_size(h):
    return len(disk)


def pread(h, buf, offset, flags):
    buf[:] = memoryview(disk)[offset:offset + len(buf)]


def pwrite(h, buf, offset, flags):
    disk[offset:offset + len(buf)] = buf


def flush(h, flags):
    pass
