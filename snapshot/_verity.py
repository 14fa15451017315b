"""dm-verity hash tree and FEC of an OTA partition, as update_engine writes them.

A ``PartitionUpdate`` may carry verity fields (``hash_tree_data_extent``,
``hash_tree_extent``, ``hash_tree_algorithm``, ``hash_tree_salt``,
``fec_data_extent``, ``fec_extent``, ``fec_roots``). The payload then holds
no operations for the tree and FEC blocks: after all data operations,
update_engine's ``VerityWriterAndroid`` computes them from the new partition
and writes them. To be hash-exact with a device we must write the same bytes.

**Hash tree** (AOSP's ``HashTreeBuilder``, dm-verity format 1). Every block
of the data extent is hashed as ``H(salt || block)``; each digest is padded
with zeros to the next power of two (sha1: 20 → 32 bytes, sha384: 48 → 64);
the digests, end to end and zero-padded to whole blocks, are level 0. Each
next level hashes the blocks of the one below, until a level is a single
block; the root digest is the hash of that block, padded like every other
digest (so a sha1 root is 32 bytes, 12 of them zero). The tree is written
top level first. Unlike ``avbtool`` and ``veritysetup``, which make no tree
for a one-block image, ``HashTreeBuilder`` makes a one-block level 0 for it;
we follow update_engine.

**FEC** (libfec's layout, 4096-byte blocks). The FEC data extent (normally
the data and its hash tree) is cut into ``rounds = ceil(blocks / (255 -
roots))`` rounds. Codeword ``(i, k)`` is byte ``k`` of the blocks ``j *
rounds + i`` for ``j = 0 .. 254 - roots`` (blocks past the extent read as
zeros), encoded with Reed-Solomon RS(255, 255 - roots) over GF(2^8) with
polynomial 0x11d and generator roots α^0 .. α^(roots-1) (libfec's
``init_rs_char(8, 0x11d, 0, 1, roots, 0)``). Its ``roots`` parity bytes are
stored at ``(i * 4096 + k) * roots``. update_engine writes the parity only:
no fec header block (avbtool's ``fec`` tool appends one; update_engine's
``fec_extent`` does not cover it).

Because the codeword's bytes come from blocks ``rounds`` apart, we encode a
*tile* of consecutive rounds at a time, feeding the code one column ``j``
(a contiguous run of blocks) after the other into the parity state of all
the tile's codewords. Each data block is read once, in runs, and memory
stays at about a tile however large the partition.

The Reed-Solomon step runs in C when ``dmuserd.snapshot._verity_rs`` is
built (an optional extension); the pure-Python step, the reference in tests,
uses ``bytes.translate`` for the GF multiplications and big-int XOR.
Hashing is ``hashlib``'s (OpenSSL), fast enough from Python.

Use::

    params = VerityParams.from_partition(part, block_size=bs, partition_size=part.new_partition_info.size)
    if params is not None:          # after the partition's operations
        for start_block, data in verity_writes(params, read_blocks):
            ...                     # write data (whole blocks) at start_block, in this order

The caller reads the partition: ``read_blocks(start, count)`` returns
``count`` whole blocks from block ``start`` (of the partition for
:func:`verity_writes`, of the input for :func:`hash_tree` and :func:`fec`).
Everything that comes from a payload is checked up front by
:class:`VerityParams`; what is wrong raises :class:`VerityError` (a
:class:`DataError`) naming the partition and field.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from dmuserd.snapshot._payload_data import DataError

try:
    from dmuserd.snapshot import _verity_rs
except ImportError:  # not built: the pure-Python encoder
    _verity_rs = None

#: ``read_blocks(start_block, count) -> bytes-like`` of ``count`` whole blocks
ReadBlocks = Callable[[int, int], bytes]

#: libfec's block size; its interleave is defined in these units
FEC_BLOCK_SIZE = 4096
#: RS(255, 255 - roots): the codeword length over GF(2^8)
RS_SIZE = 255
#: the roots dm-verity accepts (the kernel's RS(255, 253) .. RS(255, 231))
MIN_ROOTS, MAX_ROOTS = 2, 24
#: ``fec_roots``' default in update_metadata.proto
DEFAULT_ROOTS = 2

#: HashTreeBuilder's algorithms (matched case-insensitively) -> hashlib constructor
_HASHES: dict[str, Callable] = {
    "sha1": hashlib.sha1,
    "sha256": hashlib.sha256,
    "sha384": hashlib.sha384,
    "sha512": hashlib.sha512,
    # BoringSSL's EVP_blake2b256: BLAKE2b with a 32-byte digest (RFC 7693 parameter block)
    "blake2b-256": lambda data=b"": hashlib.blake2b(data, digest_size=32),
}

#: the largest hash tree we build: it is held in memory (update_engine holds it too). 512 MiB is the
#: tree of a 64 GiB partition with sha256, 32 GiB with sha512; OTA partitions are far smaller.
MAX_TREE_BYTES = 512 << 20
#: blocks read per call while hashing (1 MiB of 4 KiB blocks)
_HASH_READ_BLOCKS = 256
#: parity state kept per FEC tile; the pure-Python step, paying per call, wants larger tiles
_TILE_STATE_BYTES = 1 << 20
_TILE_STATE_BYTES_PY = 16 << 20


class VerityError(DataError):
    """Verity fields that make no sense, or a reader that returned the wrong amount."""


# --- hash tree ---------------------------------------------------------------------


def _hash_function(algorithm: str) -> Callable:
    try:
        return _HASHES[algorithm.lower()]
    except KeyError:
        raise VerityError(f"hash_tree_algorithm {algorithm[:40]!r} is not one of "
                          f"{', '.join(sorted(_HASHES))}") from None


def _hash_size(algorithm: str) -> int:
    """Bytes per digest in the tree: the digest size rounded up to a power of two."""
    size = _hash_function(algorithm)().digest_size
    return 1 << (size - 1).bit_length()


def _check_block_size(block_size: int, hash_size: int) -> None:
    if block_size <= 0 or block_size & (block_size - 1) or block_size <= 2 * hash_size:
        raise VerityError(f"hash tree block size {block_size} is not a power of two above "
                          f"twice the {hash_size}-byte hash")


def _level_blocks(data_blocks: int, block_size: int, hash_size: int) -> list[int]:
    """Blocks of each tree level, level 0 (the data's hashes) first."""
    per_block = block_size // hash_size
    levels = []
    count = data_blocks
    while True:
        count = -(-count // per_block)
        levels.append(count)
        if count <= 1:
            return levels


def hash_tree_blocks(data_blocks: int, block_size: int, algorithm: str) -> int:
    """How many blocks the tree of ``data_blocks`` takes (``HashTreeBuilder::CalculateSize``)."""
    hash_size = _hash_size(algorithm)
    _check_block_size(block_size, hash_size)
    return sum(_level_blocks(data_blocks, block_size, hash_size))


@dataclass(frozen=True)
class HashTree:
    """A hash tree as written (top level first) and its root digest, padded like the tree's."""

    tree: bytes
    root_digest: bytes


def _read(read_blocks: ReadBlocks, start: int, count: int, block_size: int, what: str) -> memoryview:
    data = memoryview(read_blocks(start, count)).cast("B")
    if len(data) != count * block_size:
        raise VerityError(f"{what}: reading {count} blocks at block {start} returned {len(data)} bytes, "
                          f"not {count * block_size}")
    return data


class _Hasher:
    """Hashes whole blocks as ``H(salt || block)``, each padded to the tree's hash size."""

    def __init__(self, algorithm: str, salt: bytes, block_size: int) -> None:
        self.seeded = _hash_function(algorithm)(bytes(salt))
        self.hash_size = _hash_size(algorithm)
        self.pad = bytes(self.hash_size - self.seeded.digest_size)
        self.block_size = block_size

    def blocks(self, data: memoryview, out: bytearray) -> None:
        """Append the padded hash of every block of ``data`` to ``out``."""
        seeded, pad, bs = self.seeded, self.pad, self.block_size
        for offset in range(0, len(data), bs):
            h = seeded.copy()
            h.update(data[offset : offset + bs])
            out += h.digest()
            if pad:
                out += pad


def _pad_to_block(level: bytearray, block_size: int) -> bytearray:
    level += bytes(-len(level) % block_size)
    return level


def hash_tree(read_blocks: ReadBlocks, data_blocks: int, block_size: int, algorithm: str,
              salt: bytes) -> HashTree:
    """The dm-verity hash tree of blocks ``0 .. data_blocks - 1`` of ``read_blocks``.

    Memory: the tree (about ``data_blocks * hash size`` bytes, at most
    :data:`MAX_TREE_BYTES`) and 1 MiB of data.
    """
    hasher = _Hasher(algorithm, salt, block_size)
    _check_block_size(block_size, hasher.hash_size)
    if data_blocks <= 0:
        raise VerityError(f"a hash tree needs data blocks, not {data_blocks}")
    sizes = _level_blocks(data_blocks, block_size, hasher.hash_size)
    if sum(sizes) * block_size > MAX_TREE_BYTES:
        raise VerityError(f"the hash tree of {data_blocks} blocks takes {sum(sizes) * block_size} bytes, "
                          f"more than the {MAX_TREE_BYTES} dmuserd builds in memory")
    level = bytearray()
    for start in range(0, data_blocks, _HASH_READ_BLOCKS):
        count = min(_HASH_READ_BLOCKS, data_blocks - start)
        hasher.blocks(_read(read_blocks, start, count, block_size, "hash tree data"), level)
    levels = [_pad_to_block(level, block_size)]
    while len(levels[-1]) > block_size:
        above = bytearray()
        hasher.blocks(memoryview(levels[-1]), above)
        levels.append(_pad_to_block(above, block_size))
    assert [len(x) // block_size for x in levels] == sizes
    root = bytearray()
    hasher.blocks(memoryview(levels[-1]), root)
    return HashTree(b"".join(reversed(levels)), bytes(root))


# --- FEC -----------------------------------------------------------------------------


def _gf_tables() -> tuple[list[int], list[int]]:
    """exp and log tables of GF(2^8) with polynomial 0x11d, α = 2 (exp doubled: no modulo)."""
    exp, log = [0] * 510, [0] * 256
    x = 1
    for i in range(255):
        exp[i] = exp[i + 255] = x
        log[x] = i
        x <<= 1
        if x & 0x100:
            x ^= 0x11D
    return exp, log


_EXP, _LOG = _gf_tables()


def _gf_mul(a: int, b: int) -> int:
    return 0 if a == 0 or b == 0 else _EXP[_LOG[a] + _LOG[b]]


def _generator(roots: int) -> list[int]:
    """Coefficients of ∏ (x + α^i), i < roots, lowest degree first (the last is 1)."""
    g = [1]
    for i in range(roots):
        root = _EXP[i]
        # multiply g by (x + root)
        g = [_gf_mul(c, root) ^ (g[k - 1] if k else 0) for k, c in enumerate(g)] + [g[-1]]
    return g


class _RsCode:
    """RS(255, 255 - roots) parity of many codewords at once, fed one message byte per codeword.

    The encoder is the usual division by the generator ``g``: with parity
    state ``p[0 .. roots-1]`` and the next message byte ``d``, the feedback
    is ``f = d ^ p[0]`` and the new state ``p[r] = p[r + 1] ^ f·g[roots-1-r]``
    (``p[roots]`` = 0). After the last byte, ``p`` is the parity.
    """

    def __init__(self, roots: int) -> None:
        self.roots = roots
        g = _generator(roots)
        #: for each position r of the state, the byte map f -> f·g[roots-1-r]
        self.mul = [bytes(_gf_mul(f, g[roots - 1 - r]) for f in range(256)) for r in range(roots)]
        #: the same, as one table for the C step: row f holds the roots products
        self.table = bytes(self.mul[r][f] for f in range(256) for r in range(roots))


class _PyTile:
    """Parity of ``length`` codewords, pure Python: one big int per state position."""

    def __init__(self, code: _RsCode, length: int) -> None:
        self.code = code
        self.length = length
        self.state = [0] * code.roots  # state[r]: byte n is p[r] of codeword n (little-endian)

    def feed(self, column) -> None:
        length, roots, mul = self.length, self.code.roots, self.code.mul
        state = self.state
        data = int.from_bytes(column, "little") if len(column) else 0  # short: zeros past its end
        feedback = (data ^ state[0]).to_bytes(length, "little")
        new = []
        for r in range(roots):
            product = int.from_bytes(feedback.translate(mul[r]), "little")
            new.append(product ^ state[r + 1] if r + 1 < roots else product)
        self.state = new

    def parity(self) -> bytes:
        out = bytearray(self.length * self.code.roots)
        for r, value in enumerate(self.state):
            out[r :: self.code.roots] = value.to_bytes(self.length, "little")
        return bytes(out)


class _CTile:
    """The same with the C step: the state is the parity itself, codeword by codeword."""

    def __init__(self, code: _RsCode, length: int) -> None:
        self.code = code
        self.state = bytearray(length * code.roots)

    def feed(self, column) -> None:
        _verity_rs.feed(self.state, column, self.code.roots, self.code.table)

    def parity(self) -> bytes:
        return bytes(self.state)


def fec_blocks(data_blocks: int, roots: int) -> int:
    """How many blocks the FEC of ``data_blocks`` takes: ``rounds * roots``."""
    _check_roots(roots)
    return -(-data_blocks // (RS_SIZE - roots)) * roots


def _check_roots(roots: int) -> None:
    if not MIN_ROOTS <= roots <= MAX_ROOTS:
        raise VerityError(f"fec_roots {roots} is outside {MIN_ROOTS}..{MAX_ROOTS}")


def fec(read_blocks: ReadBlocks, data_blocks: int, roots: int, *, native: bool | None = None) -> Iterator[bytes]:
    """libfec's parity of 4096-byte blocks ``0 .. data_blocks - 1`` of ``read_blocks``, in order, in pieces.

    The pieces, end to end, are ``fec_blocks(data_blocks, roots)`` blocks;
    the arguments are checked now, the data read as the pieces are asked
    for. ``native`` picks the C step (True; RuntimeError when it is not
    built), the Python one (False) or the C step when built (None).
    """
    _check_roots(roots)
    if data_blocks <= 0:
        raise VerityError(f"FEC needs data blocks, not {data_blocks}")
    if native and _verity_rs is None:
        raise RuntimeError("the C extension dmuserd.snapshot._verity_rs is not built")
    use_c = _verity_rs is not None if native is None else native
    return _fec_tiles(read_blocks, data_blocks, _RsCode(roots), _CTile if use_c else _PyTile,
                      _TILE_STATE_BYTES if use_c else _TILE_STATE_BYTES_PY)


def _fec_tiles(read_blocks: ReadBlocks, data_blocks: int, code: _RsCode, tile_class, budget: int) -> Iterator[bytes]:
    """The parity, a tile of rounds at a time: each column of the tile is a run of blocks."""
    columns = RS_SIZE - code.roots
    rounds = -(-data_blocks // columns)
    tile_rounds = max(1, budget // (code.roots * FEC_BLOCK_SIZE))
    for first in range(0, rounds, tile_rounds):
        count = min(tile_rounds, rounds - first)
        tile = tile_class(code, count * FEC_BLOCK_SIZE)
        for j in range(columns):
            start = j * rounds + first
            have = max(0, min(count, data_blocks - start))  # blocks past the data read as zeros
            tile.feed(_read(read_blocks, start, have, FEC_BLOCK_SIZE, "FEC data") if have else b"")
        yield tile.parity()


# --- from the manifest ----------------------------------------------------------------


@dataclass(frozen=True)
class BlockRange:
    """``count`` blocks from block ``start`` of the partition (a manifest ``Extent``)."""

    start: int
    count: int

    @property
    def end(self) -> int:
        return self.start + self.count

    def __str__(self) -> str:
        return f"blocks {self.start}..{self.end - 1}" if self.count else f"no blocks at {self.start}"


@dataclass(frozen=True)
class HashTreeSpec:
    """Where the tree's data is, where the tree goes, and how it is hashed."""

    data: BlockRange
    tree: BlockRange
    algorithm: str
    salt: bytes


@dataclass(frozen=True)
class FecSpec:
    """Where the FEC's data is (normally data and hash tree), where the FEC goes, its roots."""

    data: BlockRange
    fec: BlockRange
    roots: int


@dataclass(frozen=True)
class VerityParams:
    """A partition's verity fields, checked: building one that update_engine would refuse raises.

    The rules are update_engine's (``InstallPlan::Partition::ParseVerityConfig``,
    ``VerityWriterAndroid``) plus "inside the partition": each extent lies in
    the partition; the tree starts at or after the end of its data, the FEC
    at or after the end of its data; the tree extent has exactly the blocks
    the tree needs, the FEC extent exactly the blocks the FEC needs; the
    algorithm is one HashTreeBuilder knows; roots are 2..24; FEC blocks are
    4096 bytes. One rule is ours: the tree is at most :data:`MAX_TREE_BYTES`.
    """

    partition: str
    block_size: int
    partition_blocks: int
    hash_tree: HashTreeSpec | None
    fec: FecSpec | None

    def __post_init__(self) -> None:
        where = f"partition {self.partition!r}"
        if self.hash_tree is not None:
            self._check_hash_tree(where, self.hash_tree)
        if self.fec is not None:
            self._check_fec(where, self.fec)

    def _inside(self, where: str, field: str, extent: BlockRange) -> None:
        if extent.start < 0 or extent.count < 0 or extent.end > self.partition_blocks:
            raise VerityError(f"{where}: {field} ({extent}) is outside the {self.partition_blocks}-block partition")

    def _check_hash_tree(self, where: str, spec: HashTreeSpec) -> None:
        self._inside(where, "hash_tree_data_extent", spec.data)
        self._inside(where, "hash_tree_extent", spec.tree)
        if spec.tree.start < spec.data.end:
            raise VerityError(f"{where}: hash_tree_extent ({spec.tree}) starts before the end of "
                              f"hash_tree_data_extent ({spec.data})")
        try:
            need = hash_tree_blocks(spec.data.count, self.block_size, spec.algorithm)
        except VerityError as exc:
            raise VerityError(f"{where}: {exc}") from None
        if spec.tree.count != need:
            raise VerityError(f"{where}: hash_tree_extent ({spec.tree}) has {spec.tree.count} blocks; the "
                              f"{spec.algorithm} tree of hash_tree_data_extent ({spec.data}) takes {need}")
        if need * self.block_size > MAX_TREE_BYTES:
            raise VerityError(f"{where}: the hash tree of hash_tree_data_extent ({spec.data}) takes "
                              f"{need * self.block_size} bytes, more than the {MAX_TREE_BYTES} dmuserd builds in memory")

    def _check_fec(self, where: str, spec: FecSpec) -> None:
        if self.block_size != FEC_BLOCK_SIZE:
            raise VerityError(f"{where}: FEC needs {FEC_BLOCK_SIZE}-byte blocks, the payload's are {self.block_size}")
        try:
            _check_roots(spec.roots)
        except VerityError as exc:
            raise VerityError(f"{where}: {exc}") from None
        self._inside(where, "fec_data_extent", spec.data)
        self._inside(where, "fec_extent", spec.fec)
        if spec.fec.start < spec.data.end:
            raise VerityError(f"{where}: fec_extent ({spec.fec}) starts before the end of fec_data_extent ({spec.data})")
        need = fec_blocks(spec.data.count, spec.roots)
        if spec.fec.count != need:
            raise VerityError(f"{where}: fec_extent ({spec.fec}) has {spec.fec.count} blocks; the FEC of "
                              f"fec_data_extent ({spec.data}) with {spec.roots} roots takes {need}")

    @classmethod
    def from_partition(cls, update, *, block_size: int, partition_size: int) -> VerityParams | None:
        """The verity fields of a ``PartitionUpdate`` message, or None when it has neither tree nor FEC.

        ``partition_size`` is the new partition's size in bytes
        (``new_partition_info.size``). A tree is there when ``hash_tree_extent``
        has blocks, FEC when ``fec_extent`` has blocks, as update_engine
        decides. The message class must declare the fields with AOSP's
        numbers: ``hash_tree_data_extent`` 10, ``hash_tree_extent`` 11
        (``Extent``), ``hash_tree_algorithm`` 12 (string), ``hash_tree_salt``
        13 (bytes), ``fec_data_extent`` 14, ``fec_extent`` 15 (``Extent``),
        ``fec_roots`` 16 (uint32, default 2).
        """
        if block_size <= 0:
            raise VerityError(f"block size {block_size} is not positive")

        def extent(message) -> BlockRange:
            return BlockRange(message.start_block, message.num_blocks)

        tree = fec_spec = None
        if update.hash_tree_extent.num_blocks:
            tree = HashTreeSpec(extent(update.hash_tree_data_extent), extent(update.hash_tree_extent),
                                update.hash_tree_algorithm, bytes(update.hash_tree_salt))
        if update.fec_extent.num_blocks:
            fec_spec = FecSpec(extent(update.fec_data_extent), extent(update.fec_extent), update.fec_roots)
        if tree is None and fec_spec is None:
            return None
        return cls(update.partition_name, block_size, partition_size // block_size, tree, fec_spec)


def verity_writes(params: VerityParams, read_blocks: ReadBlocks) -> Iterator[tuple[int, bytes]]:
    """What update_engine writes after the data operations: ``(start block, bytes)``, in order.

    ``read_blocks`` reads the new partition as the operations left it. The
    hash tree comes first, whole; then the FEC in pieces of whole blocks,
    computed over the partition with the tree in place (the reads of the tree
    extent are answered from the tree, so the caller need not have written it
    yet). Write them in this order: where extents overlap, the later write wins,
    as on a device.
    """
    bs = params.block_size
    tree: bytes = b""
    tree_range = BlockRange(0, 0)
    if params.hash_tree is not None:
        spec = params.hash_tree
        tree = hash_tree(lambda start, count: read_blocks(spec.data.start + start, count),
                         spec.data.count, bs, spec.algorithm, spec.salt).tree
        tree_range = spec.tree
        yield spec.tree.start, tree

    def read_with_tree(start: int, count: int):
        """Partition blocks ``start ..``, the tree extent's from the tree just built."""
        end = start + count
        lo, hi = max(start, tree_range.start), min(end, tree_range.end)
        if lo >= hi:
            return read_blocks(start, count)
        parts = []
        if start < lo:
            parts.append(_read(read_blocks, start, lo - start, bs, "FEC data"))
        parts.append(memoryview(tree)[(lo - tree_range.start) * bs : (hi - tree_range.start) * bs])
        if hi < end:
            parts.append(_read(read_blocks, hi, end - hi, bs, "FEC data"))
        return b"".join(parts)

    if params.fec is not None:
        spec_fec = params.fec
        block = spec_fec.fec.start
        for piece in fec(lambda start, count: read_with_tree(spec_fec.data.start + start, count),
                         spec_fec.data.count, spec_fec.roots):
            yield block, piece
            block += len(piece) // bs
