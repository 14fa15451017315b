"""The built-in backends, the options parser and the plug-in registry."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from dmuserd.backends import Backend, BackendError, Op, from_spec, parse_size, parse_spec
from dmuserd.backends.file import FileBackend
from dmuserd.backends.memory import CHUNK, MemoryBackend


def test_parse_size_and_spec():
    assert parse_size("4096") == 4096
    assert parse_size("64K") == 64 * 1024
    assert parse_size("1G") == 1 << 30
    assert parse_size("2GiB") == 2 << 30
    with pytest.raises(BackendError, match="not a size"):
        parse_size("lots")
    assert parse_spec("memory:size=1G") == ("memory", {"size": "1G"})
    assert parse_spec("pkg.mod:Cls:a=1,b=2") == ("pkg.mod:Cls", {"a": "1", "b": "2"})
    with pytest.raises(BackendError, match="not key=value"):
        parse_spec("memory:size")


def test_unknown_backend_and_option_are_named():
    with pytest.raises(BackendError, match="unknown backend 'nope'"):
        from_spec("nope:size=1M")
    with pytest.raises(BackendError, match="unknown option"):
        from_spec("memory:size=1M,colour=blue")
    with pytest.raises(BackendError, match="needs the option size"):
        from_spec("memory")


async def test_memory_is_sparse_and_correct():
    backend = from_spec("memory:size=1T")
    assert isinstance(backend, MemoryBackend) and backend.size == 1 << 40
    assert backend.allocated_bytes == 0
    await backend.write(CHUNK - 512, b"a" * 1024)  # straddles two chunks
    assert backend.allocated_bytes == 2 * CHUNK
    assert bytes(await backend.read(CHUNK - 1024, 2048)) == bytes(512) + b"a" * 1024 + bytes(512)
    assert bytes(await backend.read(1 << 39, 4096)) == bytes(4096)
    await backend.discard(0, 2 * CHUNK)
    assert backend.allocated_bytes == 0
    await backend.write(0, b"b" * 4096)
    await backend.write_zeroes(512, 1024)
    assert bytes(await backend.read(0, 2048)) == b"b" * 512 + bytes(1024) + b"b" * 512
    assert backend.capabilities == frozenset(Op)


async def test_read_views_are_the_data_in_pieces():
    backend = from_spec("memory:size=1M")
    await backend.write(CHUNK - 512, b"a" * 1024)  # a hole, then data across two chunks
    views = await backend.read_views(0, 3 * CHUNK)
    assert len(views) == 3  # one per chunk, none joined
    assert b"".join(views) == bytes(await backend.read(0, 3 * CHUNK))
    assert b"".join(views) == bytes(CHUNK - 512) + b"a" * 1024 + bytes(2 * CHUNK - 512)

    class ReadOnly(Backend):
        async def read(self, offset, length):
            return bytes([offset % 251]) * length

    plain = ReadOnly(size=1 << 20)
    assert await plain.read_views(7 * 512, 1024) == [bytes([7 * 512 % 251]) * 1024]


async def test_zero_backend_is_read_only():
    backend = from_spec("zero:size=1M")
    assert backend.capabilities == {Op.READ, Op.FLUSH}
    assert bytes(await backend.read(4096, 512)) == bytes(512)


async def test_file_backend_holes_zeroes_and_fua(tmp_path):
    path = tmp_path / "img"
    backend = from_spec(f"file:path={path},size=8M,create=1")
    assert isinstance(backend, FileBackend) and os.path.getsize(path) == 8 << 20
    assert os.stat(path).st_blocks == 0  # created sparse
    await backend.write(0, b"x" * (1 << 20), fua=True)
    assert bytes(await backend.read(4096, 4)) == b"xxxx"
    allocated = os.stat(path).st_blocks
    await backend.discard(0, 1 << 20)
    assert os.stat(path).st_blocks < allocated  # a hole was punched
    assert bytes(await backend.read(0, 4096)) == bytes(4096)
    await backend.write(1 << 20, b"y" * 8192)
    await backend.write_zeroes((1 << 20) + 1024, 4096, may_unmap=False)
    data = bytes(await backend.read(1 << 20, 8192))
    assert data == b"y" * 1024 + bytes(4096) + b"y" * 3072
    await backend.flush()
    await backend.close()
    with open(path, "rb") as f:
        f.seek(1 << 20)
        assert f.read(8192) == data


async def test_file_backend_direct_and_readonly(tmp_path):
    path = tmp_path / "img"
    path.write_bytes(bytes(range(256)) * 4096)
    direct = from_spec(f"file:path={path},direct=1")
    assert bytes(await direct.read(4096, 4096)) == bytes(range(256)) * 16
    await direct.write(8192, b"z" * 4096)
    await direct.close()
    ro = from_spec(f"file:path={path},readonly=1")
    assert Op.WRITE not in ro.capabilities
    assert bytes(await ro.read(8192, 4)) == b"zzzz"
    await ro.close()
    with pytest.raises(BackendError, match="cannot open"):
        from_spec(f"file:path={tmp_path}/missing.img")


def test_plugin_found_through_entry_points(tmp_path):
    """A backend in another installed distribution works by name on the command line."""
    pkg = tmp_path / "site"
    (pkg / "my_backend").mkdir(parents=True)
    (pkg / "my_backend" / "__init__.py").write_text(textwrap.dedent('''
        from dmuserd.backends import Backend, Options

        class Ones(Backend):
            name = "ones"

            @classmethod
            def from_options(cls, options):
                opts = Options(cls.name, options)
                size = opts.size("size", required=True)
                opts.finish()
                return cls(size=size)

            async def read(self, offset, length):
                return b"\\x01" * length
    '''))
    dist = pkg / "my_backend-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-backend\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[dmuserd.backends]\nones = my_backend:Ones\n")
    code = (
        "import trio; from dmuserd.backends import from_spec\n"
        "b = from_spec('ones:size=1M')\n"
        "print(b.size, trio.run(b.read, 0, 3))"
    )
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(pkg)},
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "1048576 b'\\x01\\x01\\x01'"


async def test_memory_reads_match_a_flat_model_at_chunk_edges():
    """read, read_views and readinto agree with one bytearray for ranges that start, end or lie on chunk edges."""
    size = 6 * CHUNK
    backend = MemoryBackend(size, 512)
    model = bytearray(size)
    for offset, length, byte in ((CHUNK - 512, 1024, 1), (2 * CHUNK, CHUNK, 2), (4 * CHUNK + 4096, 512, 3)):
        await backend.write(offset, bytes([byte]) * length)
        model[offset:offset + length] = bytes([byte]) * length  # chunks 2, 3 and 5 never written
    edges = sorted({0, 512, CHUNK - 512, CHUNK, CHUNK + 512, 2 * CHUNK, 3 * CHUNK - 512, 4 * CHUNK, 5 * CHUNK, size})
    for start in edges:
        for end in edges:
            if end < start:
                continue
            want = bytes(model[start:end])
            assert bytes(await backend.read(start, end - start)) == want, (start, end)
            views = await backend.read_views(start, end - start)
            assert b"".join(views) == want and len(views) == len({o // CHUNK for o in range(start, end, 512)}), (start, end)
            into = bytearray(end - start)
            await backend.readinto(start, memoryview(into))
            assert into == want, (start, end)
