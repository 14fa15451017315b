"""dm-verity hash tree and FEC (snapshot/_verity.py) against Debian's veritysetup.

``veritysetup format --format=1 --no-superblock`` with the data, the tree and
the FEC in one file lays them out as update_engine does (data, tree at the
end of the data, parity after the tree, no FEC header), so its file is the
oracle, byte for byte; its root hash is the unpadded one. Where update_engine
differs (a one-block partition gets a one-block tree) the test says so and
checks the rule directly. The C Reed-Solomon step is compared with the
pure-Python one, also in a Python that cannot load the extension. The
manifest side is fuzzed: only VerityError may come out.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from dmuserd.snapshot import _verity as V
from dmuserd.snapshot._payload_data import DataError

BS = 4096
VERITYSETUP = shutil.which("veritysetup") or next(
    (p for p in ("/usr/sbin/veritysetup", "/sbin/veritysetup") if os.path.exists(p)), None)
needs_veritysetup = pytest.mark.skipif(VERITYSETUP is None, reason="veritysetup not installed (Debian: cryptsetup-bin)")
ORACLE = settings(deadline=None, max_examples=30, suppress_health_check=[HealthCheck.too_slow])
FUZZ = settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])
HAVE_C = V._verity_rs is not None


def reader(image: bytes):
    """``read_blocks`` over bytes."""
    return lambda start, count: image[start * BS : (start + count) * BS]


def veritysetup_image(data: bytes, salt: bytes, algorithm: str, roots: int) -> tuple[bytes, str]:
    """veritysetup's file (data, tree, FEC) and its root hash (hex)."""
    n = len(data) // BS
    tree_blocks = V.hash_tree_blocks(n, BS, algorithm) if n > 1 else 0  # veritysetup: no tree for one block
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "img")
        with open(path, "wb") as f:
            f.write(data)
        proc = subprocess.run(
            [VERITYSETUP, "format", path, path, "--format=1", "--no-superblock", f"--hash-offset={n * BS}",
             f"--data-blocks={n}", f"--data-block-size={BS}", f"--hash-block-size={BS}",
             f"--salt={salt.hex() or '-'}", f"--hash={algorithm}",
             f"--fec-device={path}", f"--fec-offset={(n + tree_blocks) * BS}", f"--fec-roots={roots}"],
            capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        root = next(line.split()[-1] for line in proc.stdout.splitlines() if line.startswith("Root hash"))
        with open(path, "rb") as f:
            return f.read(), root


def fec_bytes(image: bytes, roots: int, native: bool) -> bytes:
    return b"".join(V.fec(reader(image), len(image) // BS, roots, native=native))


def data_of(seed: int, blocks: int) -> bytes:
    """Deterministic data with some all-zero and repeated blocks (the cases a tree shares hashes on)."""
    out = bytearray(hashlib.shake_256(seed.to_bytes(8, "little")).digest(blocks * BS))
    for b in range(0, blocks, 7):
        out[b * BS : (b + 1) * BS] = bytes(BS)
    return bytes(out)


# --- against veritysetup ---------------------------------------------------------


@needs_veritysetup
@ORACLE
@given(blocks=st.integers(2, 700), seed=st.integers(0, 2**32), salt=st.binary(max_size=256),
       algorithm=st.sampled_from(["sha1", "sha256", "sha384", "sha512"]), roots=st.integers(2, 24))
@example(blocks=2, seed=1, salt=b"", algorithm="sha256", roots=2)
@example(blocks=128, seed=2, salt=bytes(32), algorithm="sha256", roots=2)   # one full level-0 block
@example(blocks=129, seed=3, salt=b"\x01" * 32, algorithm="sha256", roots=2)  # two levels
@example(blocks=253, seed=4, salt=b"s", algorithm="sha1", roots=2)          # exactly one FEC round of data
@example(blocks=231, seed=5, salt=b"s", algorithm="sha1", roots=24)
def test_tree_and_fec_match_veritysetup(blocks, seed, salt, algorithm, roots):
    data = data_of(seed, blocks)
    image, root = veritysetup_image(data, salt, algorithm, roots)
    tree = V.hash_tree(reader(data), blocks, BS, algorithm, salt)
    tree_blocks = V.hash_tree_blocks(blocks, BS, algorithm)
    assert len(tree.tree) == tree_blocks * BS
    assert tree.tree == image[blocks * BS : (blocks + tree_blocks) * BS]
    # veritysetup prints the digest; HashTreeBuilder pads it like the tree's (sha1: 20 -> 32 bytes)
    digest = bytes.fromhex(root)
    assert tree.root_digest[: len(digest)] == digest
    assert tree.root_digest[len(digest):] == bytes(len(tree.root_digest) - len(digest))
    assert len(tree.root_digest) == (32 if algorithm in ("sha1", "sha256") else 64)
    covered = data + tree.tree
    fec_blocks = V.fec_blocks(blocks + tree_blocks, roots)
    assert len(image) == (blocks + tree_blocks + fec_blocks) * BS
    expected = image[len(covered):]
    assert fec_bytes(covered, roots, native=False) == expected
    if HAVE_C:
        assert fec_bytes(covered, roots, native=True) == expected


@needs_veritysetup
def test_three_levels_match_veritysetup():
    """sha512 packs 64 digests a block: 4097 blocks make levels of 65, 2 and 1 blocks."""
    data = data_of(9, 4097)
    image, root = veritysetup_image(data, b"\xaa" * 32, "sha512", 3)
    tree = V.hash_tree(reader(data), 4097, BS, "sha512", b"\xaa" * 32)
    assert V._level_blocks(4097, BS, 64) == [65, 2, 1]
    assert tree.tree == image[4097 * BS : (4097 + 68) * BS]
    assert tree.root_digest.hex() == root
    assert fec_bytes(data + tree.tree, 3, native=HAVE_C) == image[(4097 + 68) * BS :]


@needs_veritysetup
@settings(ORACLE, max_examples=15)
@given(blocks=st.integers(2, 400), seed=st.integers(0, 2**32), spare=st.integers(0, 5), roots=st.integers(2, 24),
       algorithm=st.sampled_from(["sha1", "sha256", "SHA256"]))
def test_verity_writes_render_veritysetup_layout(blocks, seed, spare, roots, algorithm):
    """The AVB layout (data, tree, FEC, then what follows) rendered from the manifest fields:
    the tree and FEC extents hold garbage before, and the FEC is computed over the new tree."""
    data = data_of(seed, blocks)
    salt = hashlib.sha256(data[:64]).digest()
    image, _ = veritysetup_image(data, salt, algorithm.lower(), roots)
    tree_blocks = V.hash_tree_blocks(blocks, BS, algorithm)
    fec_blocks = V.fec_blocks(blocks + tree_blocks, roots)
    total = blocks + tree_blocks + fec_blocks + spare
    params = V.VerityParams(
        "system", BS, total,
        V.HashTreeSpec(V.BlockRange(0, blocks), V.BlockRange(blocks, tree_blocks), algorithm, salt),
        V.FecSpec(V.BlockRange(0, blocks + tree_blocks), V.BlockRange(blocks + tree_blocks, fec_blocks), roots))
    partition = bytearray(data + b"\xee" * ((total - blocks) * BS))
    before = bytes(partition)
    for start, piece in V.verity_writes(params, reader(before)):
        assert len(piece) % BS == 0
        partition[start * BS : start * BS + len(piece)] = piece
    assert bytes(partition[: len(image)]) == image
    assert partition[len(image):] == b"\xee" * (spare * BS)


@needs_veritysetup
def test_one_block_partition_follows_update_engine():
    """veritysetup (and avbtool) make no tree for one block: the root is H(salt || block).
    update_engine's HashTreeBuilder makes a one-block level 0 holding that digest,
    and its root is the hash of that level."""
    data = data_of(11, 1)
    salt = b"\x42" * 32
    image, root = veritysetup_image(data, salt, "sha256", 2)
    tree = V.hash_tree(reader(data), 1, BS, "sha256", salt)
    leaf = hashlib.sha256(salt + data).digest()
    assert leaf.hex() == root                              # veritysetup's root is our level 0
    assert tree.tree == leaf + bytes(BS - 32)
    assert tree.root_digest == hashlib.sha256(salt + tree.tree).digest()
    assert V.hash_tree_blocks(1, BS, "sha256") == 1
    # veritysetup's FEC then covers one block (no tree): same code, one round
    assert fec_bytes(data, 2, native=HAVE_C) == image[BS:]


def test_sha1_tree_pads_every_digest():
    data = data_of(12, 3)
    tree = V.hash_tree(reader(data), 3, BS, "sha1", b"salt")
    for b in range(3):
        digest = hashlib.sha1(b"salt" + data[b * BS : (b + 1) * BS]).digest()
        assert tree.tree[b * 32 : b * 32 + 32] == digest + bytes(12)
    assert tree.tree[96:] == bytes(BS - 96)
    assert tree.root_digest == hashlib.sha1(b"salt" + tree.tree).digest() + bytes(12)


@pytest.mark.skipif(shutil.which("b2sum") is None, reason="b2sum (coreutils) not installed")
def test_blake2b_256_is_standard_blake2b_with_32_byte_digest():
    """HashTreeBuilder's blake2b-256 (BoringSSL) is BLAKE2b with a 32-byte digest; coreutils' b2sum -l 256
    is an independent implementation of it. veritysetup has no blake2b-256, so the tree layout is the
    one the sha256 cases check."""
    salt, block = b"\x07" * 16, data_of(13, 1)
    proc = subprocess.run(["b2sum", "-l", "256"], input=salt + block, capture_output=True, check=True)
    tree = V.hash_tree(reader(block), 1, BS, "blake2b-256", salt)
    assert tree.tree[:32].hex() == proc.stdout.split()[0].decode()


# --- the C step against the Python step ---------------------------------------------


@pytest.mark.skipif(not HAVE_C, reason="the C extension dmuserd.snapshot._verity_rs is not built")
@settings(deadline=None, max_examples=40)
@given(blocks=st.integers(1, 800), roots=st.integers(2, 24), seed=st.integers(0, 2**32))
def test_c_step_matches_python_step(blocks, roots, seed):
    data = hashlib.shake_256(seed.to_bytes(8, "little")).digest(blocks * BS)
    assert fec_bytes(data, roots, native=True) == fec_bytes(data, roots, native=False)


@pytest.mark.skipif(not HAVE_C, reason="the C extension is not built")
def test_tiles_do_not_change_the_result(monkeypatch):
    """Several tiles (a small state budget) give the bytes one tile gives."""
    data = data_of(14, 3000)
    whole = fec_bytes(data, 2, native=True)
    monkeypatch.setattr(V, "_TILE_STATE_BYTES", 3 * 2 * BS)      # 3 rounds a tile, the last one short
    monkeypatch.setattr(V, "_TILE_STATE_BYTES_PY", 5 * 2 * BS)
    assert len(list(V.fec(reader(data), 3000, 2, native=True))) == 4
    assert fec_bytes(data, 2, native=True) == whole
    assert fec_bytes(data, 2, native=False) == whole


def test_without_the_extension_python_step_runs():
    """A Python that cannot load _verity_rs falls back to the pure-Python step, same bytes."""
    script = textwrap.dedent("""
        import hashlib, sys
        sys.modules["dmuserd.snapshot._verity_rs"] = None  # as if it had never been built
        from dmuserd.snapshot import _verity as V
        assert V._verity_rs is None
        data = hashlib.shake_256(b"x").digest(300 * 4096)
        out = b"".join(V.fec(lambda s, c: data[s * 4096:(s + c) * 4096], 300, 5))
        try:
            V.fec(lambda s, c: b"", 300, 5, native=True)
        except RuntimeError as exc:
            print("refused:", exc)
        print(hashlib.sha256(out).hexdigest())
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    refused, digest = proc.stdout.strip().splitlines()
    assert refused.startswith("refused:") and "not built" in refused
    data = hashlib.shake_256(b"x").digest(300 * BS)
    assert digest == hashlib.sha256(fec_bytes(data, 5, native=HAVE_C)).hexdigest()


@pytest.mark.skipif(not HAVE_C, reason="the C extension is not built")
def test_c_step_refuses_bad_arguments():
    code = V._RsCode(2)
    with pytest.raises(ValueError, match="column"):
        V._verity_rs.feed(bytearray(8), b"12345", 2, code.table)
    with pytest.raises(ValueError, match="table"):
        V._verity_rs.feed(bytearray(8), b"", 2, code.table[:-1])
    with pytest.raises(ValueError, match="roots"):
        V._verity_rs.feed(bytearray(8), b"", 25, bytes(256 * 25))
    with pytest.raises(ValueError, match="whole codewords"):
        V._verity_rs.feed(bytearray(7), b"", 2, code.table)


def test_rs_parity_is_a_codeword():
    """The parity makes data·x^roots + parity divisible by the generator: it vanishes at α^0 .. α^(roots-1)."""
    for roots in (2, 7, 24):
        message = list(hashlib.sha256(bytes([roots])).digest() * 8)[: 255 - roots]
        column_state = V._PyTile(V._RsCode(roots), 1)
        for byte in message:
            column_state.feed(bytes([byte]))
        parity = column_state.parity()
        codeword = message + list(parity)  # highest degree first
        for i in range(roots):
            value = 0
            for c in codeword:  # Horner at α^i
                value = V._gf_mul(value, V._EXP[i]) ^ c
            assert value == 0, (roots, i)


# --- errors ----------------------------------------------------------------------------


def test_reader_returning_the_wrong_length_is_a_verity_error():
    with pytest.raises(V.VerityError, match=r"reading 3 blocks at block 0 returned 100 bytes"):
        V.hash_tree(lambda s, c: b"x" * 100, 3, BS, "sha256", b"")
    with pytest.raises(V.VerityError, match="FEC data"):
        list(V.fec(lambda s, c: b"", 3, 2))


@pytest.mark.parametrize("call, match", [
    (lambda: V.hash_tree(reader(b""), 0, BS, "sha256", b""), "needs data blocks"),
    (lambda: V.hash_tree(reader(b""), 1, BS, "md5", b""), "'md5' is not one of"),
    (lambda: V.hash_tree(reader(b""), 1, 48, "sha256", b""), "block size 48"),
    (lambda: V.hash_tree(reader(b""), 1, 64, "sha256", b""), "block size 64"),
    (lambda: V.fec(reader(b""), 0, 2), "needs data blocks"),        # checked at the call, not at next()
    (lambda: V.fec(reader(b""), 1, 1), "fec_roots 1 is outside 2..24"),
    (lambda: V.fec_blocks(10, 25), "fec_roots 25"),
])
def test_bad_arguments_raise_verity_error(call, match):
    with pytest.raises(V.VerityError, match=match) as info:
        call()
    assert isinstance(info.value, DataError)


# --- from the manifest -----------------------------------------------------------------


def _partition_update_class():
    """The project's PartitionUpdate when its schema declares the verity fields, else a stand-in
    with AOSP's field numbers (update_metadata.proto)."""
    from dmuserd.snapshot import _payload_proto as proto
    if "fec_roots" in proto.PartitionUpdate.DESCRIPTOR.fields_by_name:
        return proto.PartitionUpdate
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    F = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(name="test_verity.proto", package="t", syntax="proto2")
    extent = file.message_type.add(name="Extent")
    extent.field.add(name="start_block", number=1, type=F.TYPE_UINT64, label=F.LABEL_OPTIONAL)
    extent.field.add(name="num_blocks", number=2, type=F.TYPE_UINT64, label=F.LABEL_OPTIONAL)
    update = file.message_type.add(name="PartitionUpdate")
    update.field.add(name="partition_name", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    for name, number in [("hash_tree_data_extent", 10), ("hash_tree_extent", 11),
                         ("fec_data_extent", 14), ("fec_extent", 15)]:
        update.field.add(name=name, number=number, type=F.TYPE_MESSAGE, label=F.LABEL_OPTIONAL,
                         type_name=".t.Extent")
    update.field.add(name="hash_tree_algorithm", number=12, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    update.field.add(name="hash_tree_salt", number=13, type=F.TYPE_BYTES, label=F.LABEL_OPTIONAL)
    update.field.add(name="fec_roots", number=16, type=F.TYPE_UINT32, label=F.LABEL_OPTIONAL, default_value="2")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("t.PartitionUpdate"))


PartitionUpdate = _partition_update_class()


def make_update(*, data=(0, 100), tree=(100, 1), algorithm="sha256", salt=b"\x01" * 32,
                fec_data=(0, 101), fec=(101, 2), roots=None, name="vendor") -> bytes:
    """A PartitionUpdate on the wire; None leaves a field out."""
    update = PartitionUpdate(partition_name=name)
    for field, value in [("hash_tree_data_extent", data), ("hash_tree_extent", tree),
                         ("fec_data_extent", fec_data), ("fec_extent", fec)]:
        if value is not None:
            getattr(update, field).start_block, getattr(update, field).num_blocks = value
    if algorithm is not None:
        update.hash_tree_algorithm = algorithm
    if salt is not None:
        update.hash_tree_salt = salt
    if roots is not None:
        update.fec_roots = roots
    return update.SerializeToString()


def params_of(raw: bytes, partition_blocks: int = 200, block_size: int = BS):
    return V.VerityParams.from_partition(PartitionUpdate.FromString(raw), block_size=block_size,
                                         partition_size=partition_blocks * block_size)


def test_params_from_the_wire():
    params = params_of(make_update())
    assert params == V.VerityParams(
        "vendor", BS, 200,
        V.HashTreeSpec(V.BlockRange(0, 100), V.BlockRange(100, 1), "sha256", b"\x01" * 32),
        V.FecSpec(V.BlockRange(0, 101), V.BlockRange(101, 2), V.DEFAULT_ROOTS))
    assert params_of(make_update(tree=None, data=None, fec=None, fec_data=None)) is None
    assert params_of(make_update(tree=(0, 0), fec=(0, 0))) is None   # zero blocks: update_engine skips both
    only_fec = params_of(make_update(tree=None))
    assert only_fec.hash_tree is None and only_fec.fec.roots == 2
    only_tree = params_of(make_update(fec=None))
    assert only_tree.fec is None and only_tree.hash_tree.tree == V.BlockRange(100, 1)


@pytest.mark.parametrize("fields, match", [
    (dict(data=(150, 100)), r"hash_tree_data_extent \(blocks 150..249\) is outside the 200-block partition"),
    (dict(tree=(199, 2)), r"hash_tree_extent \(blocks 199..200\) is outside"),
    (dict(tree=(99, 1)), r"hash_tree_extent \(blocks 99..99\) starts before the end of hash_tree_data_extent"),
    (dict(tree=(100, 2)), r"hash_tree_extent \(blocks 100..101\) has 2 blocks; the sha256 tree .* takes 1"),
    (dict(data=(0, 129), tree=(129, 1)), r"has 1 blocks; the sha256 tree .* takes 3"),
    (dict(data=None), r"has 1 blocks; the sha256 tree of hash_tree_data_extent \(no blocks at 0\) takes 0"),
    (dict(algorithm="md5"), r"partition 'vendor': hash_tree_algorithm 'md5' is not one of"),
    (dict(algorithm=None), r"hash_tree_algorithm '' is not one of"),
    (dict(roots=1), r"fec_roots 1 is outside 2..24"),
    (dict(roots=25), r"fec_roots 25 is outside 2..24"),
    (dict(fec=(100, 2)), r"fec_extent \(blocks 100..101\) starts before the end of fec_data_extent"),
    (dict(fec=(101, 3)), r"fec_extent \(blocks 101..103\) has 3 blocks; the FEC .* with 2 roots takes 2"),
    (dict(fec_data=(0, 254), fec=(254, 4)), r"fec_data_extent \(blocks 0..253\) is outside"),
    (dict(fec=(199, 2)), r"fec_extent \(blocks 199..200\) is outside"),
    (dict(fec_data=None), r"fec_extent .* the FEC of fec_data_extent \(no blocks at 0\) with 2 roots takes 0"),
])
def test_params_refuse_what_update_engine_refuses(fields, match):
    with pytest.raises(V.VerityError, match=match):
        params_of(make_update(**fields))


def test_params_refuse_fec_on_other_block_sizes():
    with pytest.raises(V.VerityError, match="FEC needs 4096-byte blocks, the payload's are 1024"):
        params_of(make_update(tree=None), block_size=1024)
    assert params_of(make_update(fec=None, data=(0, 30), tree=(30, 1)), block_size=1024).hash_tree is not None


def test_verity_writes_at_extents_elsewhere():
    """Tree and FEC data need not start at block 0: the writes go where the extents say, from the
    blocks they say (the FEC covering the tree, read from the tree just built)."""
    total = 40
    partition = bytearray(data_of(15, total))
    tree_blocks = V.hash_tree_blocks(10, BS, "sha1")
    params = V.VerityParams(
        "odm", BS, total,
        V.HashTreeSpec(V.BlockRange(5, 10), V.BlockRange(20, tree_blocks), "sha1", b"pepper"),
        V.FecSpec(V.BlockRange(3, 20), V.BlockRange(30, V.fec_blocks(20, 4)), 4))
    writes = list(V.verity_writes(params, reader(bytes(partition))))
    expected_tree = V.hash_tree(reader(bytes(partition[5 * BS : 15 * BS])), 10, BS, "sha1", b"pepper").tree
    assert writes[0] == (20, expected_tree)
    partition[20 * BS : 21 * BS] = expected_tree
    fec = b"".join(piece for _, piece in writes[1:])
    assert writes[1][0] == 30
    assert fec == fec_bytes(bytes(partition[3 * BS : 23 * BS]), 4, native=HAVE_C)


# --- fuzz -----------------------------------------------------------------------------


def check_writes(params, block_size: int) -> None:
    """verity_writes over a zero partition: the whole tree at its extent, then FEC pieces filling its extent."""
    writes = list(V.verity_writes(params, lambda start, count: bytes(count * block_size)))
    if params.hash_tree:
        start, tree = writes.pop(0)
        assert (start, len(tree)) == (params.hash_tree.tree.start, params.hash_tree.tree.count * block_size)
    block = params.fec.fec.start if params.fec else None
    for start, piece in writes:
        assert start == block and len(piece) % block_size == 0
        block += len(piece) // block_size
    assert block == (params.fec.fec.end if params.fec else None)


_extent = st.one_of(st.none(), st.tuples(st.integers(0, 300), st.integers(0, 300)),
                    st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)))


@FUZZ
@given(data=_extent, tree=_extent, fec_data=_extent, fec=_extent,
       algorithm=st.one_of(st.none(), st.sampled_from(["sha1", "SHA256", "sha512", "blake2b-256", "md5"]), st.text()),
       salt=st.one_of(st.none(), st.binary(max_size=300)),
       roots=st.one_of(st.none(), st.integers(0, 2**32 - 1)),
       partition_blocks=st.integers(0, 400), block_size=st.sampled_from([512, 1024, 4096, 8192]))
def test_fuzz_manifest_fields(data, tree, fec_data, fec, algorithm, salt, roots, partition_blocks, block_size):
    """Any field values: None, a VerityError, or params whose writes fill exactly their extents."""
    raw = make_update(data=data, tree=tree, fec_data=fec_data, fec=fec, algorithm=algorithm, salt=salt, roots=roots)
    try:
        params = params_of(raw, partition_blocks, block_size)
    except V.VerityError:
        return
    if params is None:
        return
    check_writes(params, block_size)


@FUZZ
@given(raw=st.binary(max_size=200))
def test_fuzz_wire_bytes(raw):
    """Arbitrary bytes that parse as a PartitionUpdate: None, params or VerityError, never another exception."""
    from google.protobuf.message import DecodeError
    try:
        update = PartitionUpdate.FromString(raw)
    except DecodeError:
        return
    try:
        V.VerityParams.from_partition(update, block_size=BS, partition_size=300 * BS)
    except V.VerityError:
        pass


@st.composite
def _near_valid(draw):
    """Fields a generator would write (AVB layout at some offset), then maybe one of them nudged."""
    start = draw(st.integers(0, 5))
    blocks = draw(st.integers(1, 300))
    algorithm = draw(st.sampled_from(["sha1", "sha256", "sha512", "blake2b-256"]))
    roots = draw(st.integers(2, 24))
    tree_blocks = V.hash_tree_blocks(blocks, BS, algorithm)
    covered = blocks + tree_blocks
    fields = dict(data=(start, blocks), tree=(start + blocks, tree_blocks), algorithm=algorithm,
                  salt=draw(st.binary(max_size=64)), fec_data=(start, covered),
                  fec=(start + covered, V.fec_blocks(covered, roots)), roots=roots)
    nudge = draw(st.sampled_from([None, "data", "tree", "fec_data", "fec"]))
    if nudge:
        s, n = fields[nudge]
        fields[nudge] = (max(0, s + draw(st.integers(-1, 1))), max(0, n + draw(st.integers(-1, 1))))
    end = max(s + n for s, n in (fields["tree"], fields["fec"]))
    spare = draw(st.integers(-1, 3))
    return fields, end + spare, nudge is None and spare >= 0


@FUZZ
@given(case=_near_valid())
def test_fuzz_near_valid_fields(case):
    """Around the valid layout: the untouched layout is accepted, and accepted params' writes fill
    their extents; the rest raise VerityError."""
    fields, partition_blocks, untouched = case
    try:
        params = params_of(make_update(**fields), partition_blocks)
    except V.VerityError:
        assert not untouched
        return
    check_writes(params, BS)


def test_tree_larger_than_the_memory_bound_is_refused():
    """A manifest can claim a huge partition; its tree would be held in memory, so it is bounded."""
    blocks = (V.MAX_TREE_BYTES // 32) * 4096 // BS + 4096  # a little past the bound with sha256
    need = V.hash_tree_blocks(blocks, BS, "sha256")
    assert need * BS > V.MAX_TREE_BYTES
    with pytest.raises(V.VerityError, match="more than the 536870912 dmuserd builds in memory"):
        params_of(make_update(data=(0, blocks), tree=(blocks, need), fec=None), blocks + need)
    with pytest.raises(V.VerityError, match="more than the"):
        V.hash_tree(lambda s, c: pytest.fail("read before the bound was checked"), blocks, BS, "sha256", b"")
