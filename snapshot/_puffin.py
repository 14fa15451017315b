"""PUFFDIFF: puffin's patches for deflate-compressed data, applied as update_engine does.

A PUFFDIFF operation (AOSP ``external/puffin``) patches data that contains
deflate streams (gzip, zip/APK members, PNG IDAT, raw deflate) without
diffing compressed bits. Both sides are first *puffed*: every deflate extent
named in the patch is rewritten as a byte-oriented stream of its blocks
(literals as bytes, matches as length/distance pairs, dynamic Huffman tables
as code lengths), the bytes between deflates are kept. The inner patch
(bsdiff, or brotli-compressed zucchini) turns the puffed source into the
puffed destination, which is then *huffed*: re-encoded to the exact original
deflate bits.

Patch layout::

    "PUF1" | u32 big-endian header size | PatchHeader (protobuf) | inner patch

``PatchHeader`` (puffin.proto, proto3): ``version`` (1), ``src`` and ``dst``
``StreamInfo`` (``deflates``: bit extents; ``puffs``: byte extents written in
bits; ``puff_length``), ``type`` (0 BSDIFF, 1 ZUCCHINI).

The puffed stream, per deflate extent (one or more deflate blocks)::

    block metadata  u16 BE (n - 1), then n bytes: header byte
                    (BFINAL << 7 | BTYPE << 5 | a stored block's padding bits);
                    a dynamic block adds HLIT, HDIST, HCLEN, the code-length
                    code lengths two per byte (high nibble first) and the code
                    lengths, one byte each: 0-15, 16+r (code 16), 20+r (17), 28+r (18)
    literals        0x00-0x7e: 1-127 bytes follow; 0x7f + u16 BE (n - 128):
                    n bytes follow (runs are cut at 65663)
    length/distance 0x80 | (len - 3) for len < 130, else 0xff, len - 130;
                    then u16 BE (distance - 1)
    end of block    0xff 0x81

Between two deflates the puffed stream holds the bytes from the one where the
previous deflate ends to the one where the next starts; a byte shared with a
deflate keeps only its non-deflate bits, shifted down (none when the two
deflates touch). This module reproduces puffin's bytes exactly, and rejects
(``PuffinError``) inputs on which puffin would misbehave: over-subscribed
Huffman codes, symbols with no code, puffs that do not sit where puffin puts
them, a huffed deflate longer than its extent.

The bit loops run in the C extension ``dmuserd.snapshot._puffin_native`` when
it is built; the pure-Python engine here is the fallback and the reference
the tests compare it with.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

from dmuserd.snapshot._payload_data import DataError, bspatch, decompress

MAGIC = b"PUF1"
VERSION = 1


class PuffinError(DataError):
    """A PUFFDIFF patch, deflate extent or puffed stream that does not decode."""


class PatchType(IntEnum):
    BSDIFF = 0
    ZUCCHINI = 1


@dataclass(frozen=True)
class BitExtent:
    """``length`` bits from bit ``offset`` (bit 0 is the low bit of byte 0)."""

    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True)
class ByteExtent:
    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True)
class StreamInfo:
    """One side of a patch: where its deflates are, where their puffs go, the puffed size."""

    deflates: tuple[BitExtent, ...]
    puffs: tuple[ByteExtent, ...]
    puff_length: int


@dataclass(frozen=True)
class PatchHeader:
    version: int
    src: StreamInfo
    dst: StreamInfo
    type: PatchType


# --------------------------------------------------------------------------
# The patch header (puffin.proto), built at import like _payload_proto.

def _header_class() -> type:
    f = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(name="dmuserd/puffin.proto", package="puffin.metadata",
                                              syntax="proto3")
    schema: dict[str, list[tuple[str, int, int, int, str | None]]] = {
        "BitExtent": [("offset", 1, f.TYPE_UINT64, f.LABEL_OPTIONAL, None),
                      ("length", 2, f.TYPE_UINT64, f.LABEL_OPTIONAL, None)],
        "StreamInfo": [("deflates", 1, f.TYPE_MESSAGE, f.LABEL_REPEATED, "BitExtent"),
                       ("puffs", 2, f.TYPE_MESSAGE, f.LABEL_REPEATED, "BitExtent"),
                       ("puff_length", 3, f.TYPE_UINT64, f.LABEL_OPTIONAL, None)],
        # type is enum PatchType in puffin.proto; a plain integer here so an
        # unknown value is seen (and refused) as the number it is
        "PatchHeader": [("version", 1, f.TYPE_INT32, f.LABEL_OPTIONAL, None),
                        ("src", 2, f.TYPE_MESSAGE, f.LABEL_OPTIONAL, "StreamInfo"),
                        ("dst", 3, f.TYPE_MESSAGE, f.LABEL_OPTIONAL, "StreamInfo"),
                        ("type", 4, f.TYPE_INT32, f.LABEL_OPTIONAL, None)],
    }
    for name, fields in schema.items():
        message = file.message_type.add(name=name)
        for field_name, number, ftype, label, type_name in fields:
            field = message.field.add(name=field_name, number=number, type=ftype, label=label)
            if type_name:
                field.type_name = f".puffin.metadata.{type_name}"
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("puffin.metadata.PatchHeader"))


_PatchHeaderProto = _header_class()


def _stream_info(msg, side: str) -> StreamInfo:
    deflates = tuple(BitExtent(e.offset, e.length) for e in msg.deflates)
    puffs = []
    for i, e in enumerate(msg.puffs):
        if e.offset % 8 or e.length % 8:
            raise PuffinError(f"PUFFDIFF header: {side} puff {i} ({e.offset}, {e.length}) is not whole bytes")
        puffs.append(ByteExtent(e.offset // 8, e.length // 8))
    if len(puffs) != len(deflates):
        raise PuffinError(f"PUFFDIFF header: {side} has {len(deflates)} deflates but {len(puffs)} puffs")
    return StreamInfo(deflates, tuple(puffs), msg.puff_length)


def parse_patch(patch: bytes) -> tuple[PatchHeader, memoryview]:
    """The header of a PUFFDIFF ``patch`` and its inner (bsdiff or zucchini) patch."""
    view = memoryview(patch)
    if len(view) < 8:
        raise PuffinError(f"PUFFDIFF patch of {len(view)} bytes is shorter than its 8-byte preamble")
    if bytes(view[:4]) != MAGIC:
        raise PuffinError(f"PUFFDIFF patch magic {bytes(view[:4])!r} is not {MAGIC!r}")
    size = int.from_bytes(view[4:8], "big")
    if size > len(view) - 8:
        raise PuffinError(f"PUFFDIFF header size {size} runs past the patch's {len(view)} bytes")
    msg = _PatchHeaderProto()
    try:
        msg.ParseFromString(bytes(view[8 : 8 + size]))
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise PuffinError(f"PUFFDIFF header (bytes 8-{8 + size}) does not parse: {exc}") from None
    if msg.version != VERSION:
        raise PuffinError(f"PUFFDIFF header version {msg.version}, only {VERSION} is known")
    if msg.type not in (PatchType.BSDIFF, PatchType.ZUCCHINI):
        raise PuffinError(f"PUFFDIFF patch type {msg.type} is neither 0 (bsdiff) nor 1 (zucchini)")
    header = PatchHeader(msg.version, _stream_info(msg.src, "src"), _stream_info(msg.dst, "dst"),
                         PatchType(msg.type))
    return header, view[8 + size :]


def _stream_info_proto(info: StreamInfo, into) -> None:
    for d in info.deflates:
        into.deflates.add(offset=d.offset, length=d.length)
    for p in info.puffs:
        into.puffs.add(offset=p.offset * 8, length=p.length * 8)
    into.puff_length = info.puff_length


def make_patch(header: PatchHeader, inner: bytes) -> bytes:
    """A PUFFDIFF patch from its parts, laid out as puffin writes it (for tests and tools)."""
    msg = _PatchHeaderProto(version=header.version, type=int(header.type))
    _stream_info_proto(header.src, msg.src)
    _stream_info_proto(header.dst, msg.dst)
    raw = msg.SerializeToString()
    return MAGIC + len(raw).to_bytes(4, "big") + raw + bytes(inner)


# --------------------------------------------------------------------------
# Deflate tables (RFC 1951).

_PERM = (16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15)
_LEN_BASE = (3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99, 115,
             131, 163, 195, 227, 258)
_LEN_EXTRA = (0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0)
_DIST_BASE = (1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385, 513, 769, 1025, 1537,
              2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577)
_DIST_EXTRA = (0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13)
_FIXED_LIT = (8,) * 144 + (9,) * 112 + (7,) * 24 + (8,) * 8
_FIXED_DIST = (5,) * 30
_MAX_METADATA = 1 + 3 + 286 + 30 + 19  # header, HLIT/HDIST/HCLEN, code lengths, code-length code
_MAX_RUN = (1 << 16) + 127  # longest literal run one puff header can say
_EOB = 256


def _canonical(lens: Sequence[int], what: str) -> list[int]:
    """Each symbol's code, bit-reversed (deflate sends codes MSB first into an LSB-first stream)."""
    count = [0] * 16
    for n in lens:
        count[n] += 1
    left = 1
    for n in range(1, 16):
        left = (left << 1) - count[n]
        if left < 0:
            raise ValueError(f"{what} Huffman code lengths are over-subscribed")
    count[0] = 0
    nxt = [0] * 16
    code = 0
    for n in range(1, 16):
        code = (code + count[n - 1]) << 1
        nxt[n] = code
    codes = [0] * len(lens)
    for sym, n in enumerate(lens):
        if n:
            c = nxt[n]
            nxt[n] += 1
            codes[sym] = int(format(c, f"0{n}b")[::-1], 2)
    return codes


class _Decoder:
    """A lookup table: the next ``bits`` input bits (LSB first) -> (symbol << 4 | length), or -1."""

    __slots__ = ("bits", "table", "lens")

    def __init__(self, lens: Sequence[int], what: str):
        codes = _canonical(lens, what)
        self.lens = lens
        self.bits = max(lens, default=0)
        size = 1 << self.bits
        table = [-1] * size
        for sym, n in enumerate(lens):
            if n:
                entry = sym << 4 | n
                for idx in range(codes[sym], size, 1 << n):
                    table[idx] = entry
        self.table = table


class _Encoder:
    __slots__ = ("codes", "lens")

    def __init__(self, lens: Sequence[int], what: str):
        self.codes = _canonical(lens, what)
        self.lens = lens


@functools.cache
def _fixed_decoders() -> tuple[_Decoder, _Decoder]:
    return _Decoder(_FIXED_LIT, "fixed literal/length"), _Decoder(_FIXED_DIST, "fixed distance")


@functools.cache
def _fixed_encoders() -> tuple[_Encoder, _Encoder]:
    return _Encoder(_FIXED_LIT, "fixed literal/length"), _Encoder(_FIXED_DIST, "fixed distance")


# --------------------------------------------------------------------------
# The pure-Python engine: one deflate extent at a time.

class _Bits:
    """Bits of ``data`` from ``pos`` to ``total`` (LSB first); past the end they read as zeros."""

    __slots__ = ("data", "pos", "total", "base")

    def __init__(self, data: bytes, pos: int, base: int):
        self.data = data
        self.pos = pos
        self.total = len(data) * 8
        self.base = base  # the absolute bit of data's bit 0, for messages

    def left(self) -> int:
        return self.total - self.pos

    def peek(self, n: int) -> int:
        i = self.pos >> 3
        return (int.from_bytes(self.data[i : i + 4], "little") >> (self.pos & 7)) & ((1 << n) - 1)

    def take(self, n: int, what: str) -> int:
        if n > self.total - self.pos:
            raise ValueError(f"deflate ends inside the {what} at bit {self.base + self.pos}")
        value = self.peek(n)
        self.pos += n
        return value

    def symbol(self, dec: _Decoder, n: int, what: str) -> int:
        entry = dec.table[self.peek(n)]
        if entry < 0:
            raise ValueError(f"invalid {what} code at bit {self.base + self.pos}")
        length = entry & 15
        if length > self.total - self.pos:
            raise ValueError(f"deflate ends inside a {what} code at bit {self.base + self.pos}")
        self.pos += length
        return entry >> 4


class _PuffWriter:
    """The puffed form of one deflate extent, as puffin's BufferPuffWriter lays it out."""

    __slots__ = ("out", "run")

    def __init__(self):
        self.out = bytearray()
        self.run = bytearray()

    def flush(self) -> None:
        n = len(self.run)
        if n:
            if n <= 127:
                self.out.append(n - 1)
            else:
                self.out += bytes((127, (n - 128) >> 8, (n - 128) & 0xFF))
            self.out += self.run
            self.run = bytearray()

    def literal(self, byte: int) -> None:
        self.run.append(byte)
        if len(self.run) == _MAX_RUN:
            self.flush()

    def literals(self, data: bytes) -> None:
        self.run += data  # only stored blocks: at most 65535, after a flush

    def lendist(self, length: int, distance: int) -> None:
        self.flush()
        if length < 130:
            self.out.append(0x80 | (length - 3))
        else:
            self.out += bytes((0xFF, length - 130))
        self.out += (distance - 1).to_bytes(2, "big")

    def metadata(self, md: bytes) -> None:
        self.flush()
        self.out += (len(md) - 1).to_bytes(2, "big")
        self.out += md

    def end_of_block(self) -> None:
        self.flush()
        self.out += b"\xff\x81"


def _dynamic_header(bits: _Bits, md: bytearray) -> tuple[_Decoder, _Decoder]:
    if bits.left() < 14:
        raise ValueError(f"deflate ends inside a dynamic block header at bit {bits.base + bits.pos}")
    hlit, hdist, hclen = bits.take(5, "HLIT"), bits.take(5, "HDIST"), bits.take(4, "HCLEN")
    nlit, ndist, ncode = hlit + 257, hdist + 1, hclen + 4
    if nlit > 286 or ndist > 30:
        raise ValueError(f"dynamic block at bit {bits.base + bits.pos - 14} declares {nlit} literal/length "
                         f"and {ndist} distance codes (at most 286 and 30)")
    md += bytes((hlit, hdist, hclen))
    code_lens = [0] * 19
    for i in range(ncode):
        v = bits.take(3, "code-length code lengths")
        code_lens[_PERM[i]] = v
        if i & 1:
            md[-1] |= v
        else:
            md.append(v << 4)
    code = _Decoder(code_lens, "code-length")
    lens: list[int] = []
    total = nlit + ndist
    while len(lens) < total:
        if bits.left() < code.bits:
            raise ValueError(f"deflate ends inside the code lengths at bit {bits.base + bits.pos}")
        sym = bits.symbol(code, code.bits, "code-length")
        if sym < 16:
            md.append(sym)
            lens.append(sym)
        elif sym == 16:
            if not lens:
                raise ValueError(f"code length repeat with no previous length at bit {bits.base + bits.pos}")
            r = bits.take(2, "repeat count")
            md.append(16 + r)
            lens += [lens[-1]] * (3 + r)
        elif sym == 17:
            r = bits.take(3, "repeat count")
            md.append(20 + r)
            lens += [0] * (3 + r)
        else:
            r = bits.take(7, "repeat count")
            md.append(28 + r)
            lens += [0] * (11 + r)
    if len(lens) != total:
        raise ValueError(f"code length repeat runs past the {total} lengths at bit {bits.base + bits.pos}")
    return _Decoder(lens[:nlit], "literal/length"), _Decoder(lens[nlit:], "distance")


def _py_inflate(data, start_bit: int, end_bit: int, writer: _PuffWriter | None,
                blocks: list[tuple[int, int]] | None) -> int:
    """Walk the deflate blocks of bits [start_bit, end_bit) as puffin's Puffer does; the bit where it stopped.

    With ``blocks`` (locating), stop after the final block and record each
    compressed block's extent; otherwise keep reading blocks while a byte's
    worth of bits is left, writing the puffed form to ``writer``.
    """
    b0 = start_bit >> 3
    bits = _Bits(bytes(data[b0 : (end_bit + 7) >> 3]), start_bit & 7, b0 * 8)
    w = writer if writer is not None else _PuffWriter()
    while bits.left() >= 8:
        block_start = bits.pos
        final = bits.take(1, "block header")
        btype = bits.take(2, "block header")
        header = final << 7 | btype << 5
        if btype == 0:
            pad = (8 - (bits.pos & 7)) & 7
            header |= bits.take(pad, "stored block padding")
            length = bits.take(16, "stored block length")
            nlength = bits.take(16, "stored block length")
            if length ^ nlength != 0xFFFF:
                raise ValueError(f"stored block at bit {bits.base + block_start}: LEN {length:#x} and "
                                 f"NLEN {nlength:#x} disagree")
            if length * 8 > bits.left():
                raise ValueError(f"stored block at bit {bits.base + block_start} of {length} bytes runs past "
                                 f"the deflate")
            i = bits.pos >> 3
            w.metadata(bytes((header,)))
            if length:
                w.literals(bits.data[i : i + length])
            bits.pos += length * 8
            w.end_of_block()
            if blocks is not None and final:
                return bits.base + bits.pos
            continue
        if btype == 1:
            w.metadata(bytes((header,)))
            lit, dist = _fixed_decoders()
        elif btype == 2:
            md = bytearray((header,))
            lit, dist = _dynamic_header(bits, md)
            w.metadata(bytes(md))
        else:
            raise ValueError(f"block at bit {bits.base + block_start} has the reserved type 3")
        eob_bits = lit.lens[_EOB] if len(lit.lens) > _EOB else 0
        while True:
            left = bits.left()
            if left >= lit.bits:
                n = lit.bits
            elif eob_bits <= left:
                n = eob_bits  # puffin's rule near the end: look for an end-of-block code only
            else:
                raise ValueError(f"deflate ends inside a block at bit {bits.base + bits.pos}")
            sym = bits.symbol(lit, n, "literal/length")
            if sym < 256:
                w.literal(sym)
            elif sym == _EOB:
                w.end_of_block()
                if blocks is not None:
                    blocks.append((bits.base + block_start, bits.pos - block_start))
                break
            elif sym <= 285:
                k = sym - 257
                length = _LEN_BASE[k] + bits.take(_LEN_EXTRA[k], "length extra bits")
                n = min(dist.bits, bits.left())
                dsym = bits.symbol(dist, n, "distance")
                distance = _DIST_BASE[dsym] + bits.take(_DIST_EXTRA[dsym], "distance extra bits")
                w.lendist(length, distance)
            else:
                raise ValueError(f"literal/length symbol {sym} at bit {bits.base + bits.pos} does not exist")
        if blocks is not None and final:
            return bits.base + bits.pos
    w.flush()
    return bits.base + bits.pos


def _py_puff_deflate(data, start_bit: int, end_bit: int, limit: int) -> bytes:
    writer = _PuffWriter()
    _py_inflate(data, start_bit, end_bit, writer, None)
    if len(writer.out) > limit:  # the C engine stops as soon as it passes the limit
        raise ValueError(f"puffs to more than the {limit} bytes expected")
    return bytes(writer.out)


def _py_locate(data, start_bit: int) -> tuple[list[tuple[int, int]], int]:
    blocks: list[tuple[int, int]] = []
    end = _py_inflate(data, start_bit, len(data) * 8, None, blocks)
    return blocks, end


class _BitWriter:
    """ORs bits into ``out`` from bit ``start``; never past bit ``end``."""

    __slots__ = ("out", "pos", "end")

    def __init__(self, out: bytearray, start: int, end: int):
        self.out, self.pos, self.end = out, start, end

    def put(self, n: int, value: int) -> None:
        if self.pos + n > self.end:
            raise ValueError(f"huffs to more than the {self.end} bits of its extent")
        pos = self.pos
        value <<= pos & 7
        i = pos >> 3
        for k in range(((pos & 7) + n + 7) >> 3):
            self.out[i + k] |= (value >> (8 * k)) & 0xFF
        self.pos = pos + n

    def put_bytes(self, data: bytes) -> None:
        if self.pos + 8 * len(data) > self.end:
            raise ValueError(f"huffs to more than the {self.end} bits of its extent")
        i = self.pos >> 3
        self.out[i : i + len(data)] = data
        self.pos += 8 * len(data)


def _py_huff_deflate(puff: bytes, out: bytearray, start_bit: int, bit_length: int) -> None:
    w = _BitWriter(out, start_bit, start_bit + bit_length)
    puff = bytes(puff)
    size = len(puff)
    i = 0

    def item() -> tuple[str, int, int]:
        """The next literals run / length-distance / end of block: (kind, a, b) and moves ``i``."""
        nonlocal i
        if i >= size:
            raise ValueError(f"puff ends inside a block at byte {i}")
        b = puff[i]
        if b & 0x80:
            if b & 0x7F < 127:
                length = (b & 0x7F) + 3
                i += 1
            else:
                if i + 1 >= size:
                    raise ValueError(f"puff ends inside a length at byte {i}")
                length = puff[i + 1] + 130
                i += 2
                if length > 259:
                    raise ValueError(f"puff length {length} at byte {i - 2} is more than 258")
            if length == 259:
                return "eob", 0, 0
            if i + 2 > size:
                raise ValueError(f"puff ends inside a distance at byte {i}")
            d = puff[i] << 8 | puff[i + 1]
            if d >= 1 << 15:
                raise ValueError(f"puff distance {d + 1} at byte {i} is more than 32768")
            i += 2
            return "match", length, d + 1
        if b < 127:
            n = b + 1
            i += 1
        else:
            if i + 3 > size:
                raise ValueError(f"puff ends inside a literals header at byte {i}")
            n = (puff[i + 1] << 8 | puff[i + 2]) + 128
            i += 3
        if i + n > size:
            raise ValueError(f"puff literals at byte {i} run past its {size} bytes")
        i += n
        return "literals", i - n, n

    while i != size:
        if i + 2 >= size:
            raise ValueError(f"puff ends inside block metadata at byte {i}")
        mlen = (puff[i] << 8 | puff[i + 1]) + 1
        i += 2
        if i + mlen > size or mlen > _MAX_METADATA:
            raise ValueError(f"puff block metadata of {mlen} bytes at byte {i - 2} does not fit")
        md = puff[i : i + mlen]
        i += mlen
        header = md[0]
        btype = (header >> 5) & 3
        w.put(1, header >> 7)
        w.put(2, btype)
        if btype == 0:
            pad = (8 - (w.pos & 7)) & 7
            w.put(pad, (header & 0x1F) & ((1 << pad) - 1))
            kind, a, n = item()
            if kind == "literals":
                if n > 0xFFFF:
                    raise ValueError(f"puff stored block of {n} bytes at byte {a} is more than 65535")
                w.put(16, n)
                w.put(16, n ^ 0xFFFF)
                w.put_bytes(puff[a : a + n])
                kind, _, _ = item()
            elif kind == "eob":  # an empty stored block
                w.put(16, 0)
                w.put(16, 0xFFFF)
            if kind != "eob":
                raise ValueError(f"puff stored block ends without its end of block at byte {i}")
            continue
        if btype == 1:
            lit, dist = _fixed_encoders()
        elif btype == 2:
            lit, dist = _encode_dynamic_header(md, w, i - mlen)
        else:
            raise ValueError(f"puff block at byte {i - mlen} has the reserved type 3")

        def put_symbol(enc: _Encoder, sym: int, what: str) -> None:
            if sym >= len(enc.lens) or not enc.lens[sym]:
                # i late-bound on purpose: where the reading has got to when the error is raised
                raise ValueError(f"puff {what} symbol {sym} before byte {i} has no code in its block")  # noqa: B023
            w.put(enc.lens[sym], enc.codes[sym])

        while True:
            kind, a, b = item()
            if kind == "literals":
                for byte in puff[a : a + b]:
                    put_symbol(lit, byte, "literal")
            elif kind == "match":
                k = 28 if a == 258 else next(k for k in range(28) if _LEN_BASE[k + 1] > a)
                put_symbol(lit, 257 + k, "length")
                w.put(_LEN_EXTRA[k], a - _LEN_BASE[k])
                k = next(k for k in range(29, -1, -1) if _DIST_BASE[k] <= b)
                put_symbol(dist, k, "distance")
                w.put(_DIST_EXTRA[k], b - _DIST_BASE[k])
            else:
                put_symbol(lit, _EOB, "end-of-block")
                break
    # as puffin: the last byte must be the extent's (the rest of it stays zero)
    if (w.pos + 7) >> 3 != (w.end + 7) >> 3:
        raise ValueError(f"huffs to {w.pos - start_bit} bits, its extent has {bit_length}")


def _encode_dynamic_header(md: bytes, w: _BitWriter, at: int) -> tuple[_Encoder, _Encoder]:
    if len(md) < 4:
        raise ValueError(f"puff dynamic block metadata at byte {at} is shorter than its header")
    nlit, ndist, ncode = md[1] + 257, md[2] + 1, md[3] + 4
    if nlit > 286 or ndist > 30 or ncode > 19:
        raise ValueError(f"puff dynamic block at byte {at} declares {nlit}/{ndist}/{ncode} codes "
                         f"(at most 286/30/19)")
    w.put(5, md[1])
    w.put(5, md[2])
    w.put(4, md[3])
    j = 4
    if len(md) - j < (ncode + 1) // 2:
        raise ValueError(f"puff dynamic block metadata at byte {at} ends inside the code-length code")
    code_lens = [0] * 19
    for k in range(ncode):
        v = md[j + k // 2] & 0x0F if k & 1 else md[j + k // 2] >> 4
        if v > 7:
            raise ValueError(f"puff dynamic block at byte {at}: code-length code length {v} is more than 7")
        code_lens[_PERM[k]] = v
        w.put(3, v)
    j += (ncode + 1) // 2
    code = _Encoder(code_lens, "code-length")
    lens: list[int] = []
    total = nlit + ndist
    while len(lens) < total:
        if j >= len(md):
            raise ValueError(f"puff dynamic block metadata at byte {at} ends inside the code lengths")
        p = md[j]
        j += 1
        if p > 155:
            raise ValueError(f"puff dynamic block at byte {at}: code length entry {p} is more than 155")
        sym = p if p < 16 else 16 if p < 20 else 17 if p < 28 else 18
        if not code.lens[sym]:
            raise ValueError(f"puff dynamic block at byte {at}: code-length symbol {sym} has no code")
        w.put(code.lens[sym], code.codes[sym])
        if sym < 16:
            lens.append(sym)
        elif sym == 16:
            if not lens:
                raise ValueError(f"puff dynamic block at byte {at}: repeat with no previous length")
            w.put(2, p - 16)
            lens += [lens[-1]] * (3 + p - 16)
        elif sym == 17:
            w.put(3, p - 20)
            lens += [0] * (3 + p - 20)
        else:
            w.put(7, p - 28)
            lens += [0] * (11 + p - 28)
    if len(lens) != total or j != len(md):
        raise ValueError(f"puff dynamic block metadata at byte {at} does not hold exactly {total} code lengths")
    return _Encoder(lens[:nlit], "literal/length"), _Encoder(lens[nlit:], "distance")


class _Engine:
    """The three bit loops; one pure-Python instance and, when built, the C extension's."""

    def __init__(self, name, puff_deflate, huff_deflate, locate):
        self.name = name
        self.puff_deflate = puff_deflate  # (data, start_bit, end_bit, limit) -> bytes
        self.huff_deflate = huff_deflate  # (puff, out: bytearray, start_bit, bit_length) -> None
        self.locate = locate  # (data, start_bit) -> ([(offset, length)], the bit after the final block)


PYTHON_ENGINE = _Engine("python", _py_puff_deflate, _py_huff_deflate, _py_locate)
try:
    from dmuserd.snapshot import _puffin_native
except ImportError:
    NATIVE_ENGINE: _Engine | None = None
else:
    NATIVE_ENGINE = _Engine("native", _puffin_native.puff_deflate, _puffin_native.huff_deflate,
                            _puffin_native.locate)

#: what puff/huff/puffpatch use: the C engine when built
engine: _Engine = NATIVE_ENGINE or PYTHON_ENGINE


# --------------------------------------------------------------------------
# Whole streams: deflates and the bytes between them.

def _check_deflates(deflates: Sequence[BitExtent], data_bits: int, what: str) -> None:
    end = 0
    for i, d in enumerate(deflates):
        if d.offset < 0 or d.length < 0:
            raise PuffinError(f"{what}deflate {i} ({d.offset}, {d.length}) is negative")
        if d.offset < end:
            raise PuffinError(f"{what}deflate {i} at bit {d.offset} starts before deflate {i - 1} ends "
                              f"(bit {end})")
        end = d.end
    if end > data_bits:
        raise PuffinError(f"{what}deflate {len(deflates) - 1} ends at bit {end}, past the data's {data_bits} bits")


def _puff_bound(bits: int) -> int:
    """The most a deflate extent of ``bits`` bits puffs to.

    Every puffed item costs at most two bytes per deflate bit it stands for
    (a 1-bit literal is one byte plus its share of a run header; a match of
    two 1-bit codes is four bytes; a block's metadata is at most one byte per
    header bit plus 16): this bounds what a hostile header can make us allocate.
    """
    return 2 * bits + 64


def _gap(prev_end: int, start: int) -> tuple[int, int]:
    """The source bytes [first, last) that the puffed stream keeps between two deflates.

    A deflate that ends mid-byte leaves that byte's upper bits to the gap; one
    that starts mid-byte leaves the lower bits of its first byte; two deflates
    that touch leave nothing.
    """
    if prev_end == start:
        return 0, 0
    return prev_end >> 3, (start + 7) >> 3


def _gap_bytes(data, prev_end: int, start: int) -> bytes:
    first, last = _gap(prev_end, start)
    out = bytearray(data[first:last])
    if out:
        if start & 7 and last * 8 > start:
            out[-1] &= (1 << (start & 7)) - 1
        if prev_end & 7:
            out[0] >>= prev_end & 7
    return bytes(out)


def _puff_stream(data, deflates: Sequence[BitExtent], expect: StreamInfo | None,
                 what: str) -> tuple[bytes, list[ByteExtent]]:
    """``data`` puffed at ``deflates``; with ``expect``, each puff must match its extent there."""
    view = memoryview(data)
    size = len(view)
    _check_deflates(deflates, size * 8, what)
    parts: list[bytes] = []
    puffs: list[ByteExtent] = []
    pos = 0
    prev_end = 0
    for i, d in enumerate(deflates):
        gap = _gap_bytes(view, prev_end, d.offset)
        parts.append(gap)
        pos += len(gap)
        if expect is not None:
            want = expect.puffs[i]
            if want.offset != pos:
                raise PuffinError(f"{what}puff {i} is at byte {want.offset}; its deflate at bit {d.offset} "
                                  f"puts it at byte {pos}")
            limit = want.length
        else:
            limit = _puff_bound(d.length)
        try:
            puffed = engine.puff_deflate(view, d.offset, d.end, limit)
        except ValueError as exc:
            raise PuffinError(f"{what}deflate {i} (bit {d.offset}, {d.length} bits): {exc}") from None
        if expect is not None and len(puffed) != limit:
            raise PuffinError(f"{what}deflate {i} puffs to {len(puffed)} bytes, its puff extent says {limit}")
        puffs.append(ByteExtent(pos, len(puffed)))
        parts.append(puffed)
        pos += len(puffed)
        prev_end = d.end
    tail = _gap_bytes(view, prev_end, size * 8)
    parts.append(tail)
    return b"".join(parts), puffs


def puff(data: bytes, deflates: Sequence[BitExtent]) -> bytes:
    """``data`` with each deflate extent puffed, exactly as ``puffin --operation=puff`` writes it."""
    return _puff_stream(data, deflates, None, "")[0]


def puff_extents(data: bytes, deflates: Sequence[BitExtent]) -> list[ByteExtent]:
    """Where each deflate's puff lands in ``puff(data, deflates)`` (puffin's FindPuffLocations; costs a puff)."""
    return _puff_stream(data, deflates, None, "")[1]


def locate_deflates(data: bytes, start_bit: int = 0) -> list[BitExtent]:
    """The compressed blocks of the raw deflate stream at ``start_bit`` of ``data``, up to its final block.

    Stored blocks are left out, as puffin leaves them out (copying them as
    literals gains nothing). These are the extents ``puffin`` finds for a
    file of type ``deflate``.
    """
    if not 0 <= start_bit <= len(data) * 8:
        raise PuffinError(f"deflate start bit {start_bit} is outside the data's {len(data) * 8} bits")
    try:
        blocks, _ = engine.locate(memoryview(data), start_bit)
    except ValueError as exc:
        raise PuffinError(f"deflate stream at bit {start_bit}: {exc}") from None
    return [BitExtent(o, n) for o, n in blocks]


def _huff_size(puffed_size: int, puffs: Sequence[ByteExtent], deflates: Sequence[BitExtent], what: str) -> int:
    """The size of the data that ``puffed`` huffs to; checks that every puff sits where puffin puts it."""
    if len(puffs) != len(deflates):
        raise PuffinError(f"{what}{len(deflates)} deflates but {len(puffs)} puffs")
    pos = 0
    prev_end = 0
    for i, (p, d) in enumerate(zip(puffs, deflates)):
        if d.offset < prev_end or d.offset < 0 or d.length < 0:
            raise PuffinError(f"{what}deflate {i} at bit {d.offset} starts before deflate {i - 1} ends "
                              f"(bit {prev_end})")
        first, last = _gap(prev_end, d.offset)
        pos += last - first
        if p.offset != pos or p.length < 0:
            raise PuffinError(f"{what}puff {i} is at byte {p.offset}; its deflate at bit {d.offset} puts it "
                              f"at byte {pos}")
        if p.length > _puff_bound(d.length):
            raise PuffinError(f"{what}puff {i} of {p.length} bytes is more than a {d.length}-bit deflate can "
                              f"puff to")
        pos = p.end
        prev_end = d.end
    tail = puffed_size - pos
    if tail < (1 if prev_end & 7 else 0):
        raise PuffinError(f"{what}the puffed stream ({puffed_size} bytes) ends before its last deflate's "
                          f"last byte")
    return (prev_end >> 3) + tail


def _huff_stream(puffed, puffs: Sequence[ByteExtent], deflates: Sequence[BitExtent], what: str) -> bytes:
    view = memoryview(puffed)
    out = bytearray(_huff_size(len(view), puffs, deflates, what))
    src = 0  # where the next gap starts in the puffed stream
    prev_end = 0

    def put_gap(end: int, start: int, gap: memoryview) -> None:
        first, last = _gap(end, start)
        if last == first:
            return
        g = bytearray(gap)
        if end & 7:
            g[0] = (g[0] << (end & 7)) & 0xFF
        if start & 7 and last * 8 > start:
            g[-1] &= (1 << (start & 7)) - 1
        for k in (0, len(g) - 1):
            g[k] |= out[first + k]  # the neighbouring deflates' bits
        out[first:last] = g

    for i, (p, d) in enumerate(zip(puffs, deflates)):
        try:
            engine.huff_deflate(view[p.offset : p.end], out, d.offset, d.length)
        except ValueError as exc:
            raise PuffinError(f"{what}puff {i} (byte {p.offset}, {p.length} bytes): {exc}") from None
        put_gap(prev_end, d.offset, view[src : p.offset])
        src = p.end
        prev_end = d.end
    put_gap(prev_end, len(out) * 8, view[src:])
    return bytes(out)


def huff(puffed: bytes, puffs: Sequence[ByteExtent], deflates: Sequence[BitExtent]) -> bytes:
    """The data that ``puffed`` stands for: each puff re-encoded to its deflate extent's exact bits."""
    return _huff_stream(puffed, puffs, deflates, "")


# --------------------------------------------------------------------------
# PUFFDIFF

def _zucchini_apply():
    try:
        module = importlib.import_module("dmuserd.snapshot._zucchini")
    except ModuleNotFoundError as exc:
        if exc.name != "dmuserd.snapshot._zucchini":
            raise
        raise PuffinError("PUFFDIFF patch with a zucchini inner patch: zucchini is not supported yet") from None
    return module.zucchini_apply


def puffpatch(patch: bytes, source: bytes, size: int) -> bytes:
    """Apply a PUFFDIFF ``patch`` to ``source``; the result must be ``size`` bytes.

    As puffin's PuffPatch: puff the source at the header's source deflates,
    apply the inner patch (bsdiff, or brotli-compressed zucchini) to make the
    puffed destination, huff it at the destination deflates.
    """
    header, inner = parse_patch(patch)
    src, dst = header.src, header.dst
    src_size = _huff_size(src.puff_length, src.puffs, src.deflates, "PUFFDIFF source: ")
    if src_size > len(source):
        raise PuffinError(f"PUFFDIFF source is {len(source)} bytes, its header describes {src_size}")
    dst_size = _huff_size(dst.puff_length, dst.puffs, dst.deflates, "PUFFDIFF destination: ")
    if dst_size != size:
        raise PuffinError(f"PUFFDIFF patch makes {dst_size} bytes, its destination holds {size}")
    puffed_src, _ = _puff_stream(memoryview(source)[:src_size], src.deflates, src, "PUFFDIFF source ")
    if header.type == PatchType.BSDIFF:
        try:
            puffed_dst = bspatch(bytes(inner), puffed_src, dst.puff_length)
        except PuffinError:
            raise
        except DataError as exc:
            raise PuffinError(f"PUFFDIFF inner patch: {exc}") from None
    else:
        apply = _zucchini_apply()
        try:
            # the zucchini patch holds at most the new bytes plus their bookkeeping
            raw = decompress(2, bytes(inner), 16 * (dst.puff_length + src.puff_length) + (1 << 20),
                             "PUFFDIFF zucchini patch")
            puffed_dst = apply(raw, puffed_src, dst.puff_length)
        except PuffinError:
            raise
        except DataError as exc:
            raise PuffinError(f"PUFFDIFF inner patch: {exc}") from None
        if len(puffed_dst) != dst.puff_length:
            raise PuffinError(f"PUFFDIFF zucchini patch made {len(puffed_dst)} bytes, expected {dst.puff_length}")
    return _huff_stream(puffed_dst, dst.puffs, dst.deflates, "PUFFDIFF destination: ")
