"""The emulator against an independent model of the device (spec_model.py).

Each case builds real descriptors over a page-aligned arena, runs them on
the emulator (``Emulator.execute``, synchronous) and on the model (a copy
of the arena as a bytearray), then checks the completion record field by
field and every byte of the arena (data, batch lists and records alike).
Non-present pages are declared to both. Nothing here goes through the
mover or its CPU code: this replaces the old differential test, whose two
engines shared that code and so could not see a descriptor-level error.
"""

from __future__ import annotations

import mmap
import random
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import spec_model as m
from spec_model import PAGE, Config, Desc, Model, Rec

PAGES = 16
DATA_PAGES = 12  # pages 0-11: data; 12-13: batch lists; 14-15: records
LIST_PAGE, RECORD_PAGE = 12, 14
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


class Bench:
    """An arena, an emulator configured like ``config``, and the model."""

    def __init__(self, ext, config: Config | None = None, seed: int = 0) -> None:
        self.ext, self.config = ext, config or Config()
        self.area = mmap.mmap(-1, PAGES * PAGE)
        self.area[:] = random.Random(seed).randbytes(PAGES * PAGE)
        self.area[RECORD_PAGE * PAGE :] = bytes((PAGES - RECORD_PAGE) * PAGE)  # records start zeroed
        self.base = ext.address_of(self.area)
        assert self.base % PAGE == 0
        c = self.config
        self.emu = ext.Emulator(max_transfer=c.max_transfer, max_batch=c.max_batch, gen_cap=c.gen_cap,
                                op_config=sum(1 << op for op in c.ops), block_on_fault=c.wq_block_on_fault)

    def addr(self, page: int, offset: int = 0) -> int:
        return self.base + page * PAGE + offset

    def record(self, index: int = 0) -> int:
        return self.addr(RECORD_PAGE) + 32 * index

    def check(self, desc: Desc, missing=(), sticky=()) -> Rec | None:
        """Run ``desc`` on both; assert the same record and the same memory."""
        missing = {self.addr(p) for p in missing}
        sticky = {self.addr(p) for p in sticky}
        model = Model(bytearray(self.area), self.base, self.config, missing | sticky, sticky)
        expected = model.run(desc)
        for page in missing | sticky:
            self.emu.set_fault(page, 1, sticky=page in sticky)
        try:
            self.emu.execute(desc.pack())
        finally:
            self.emu.clear_faults()
        if desc.flags & m.CRAV and desc.completion % 32 == 0:
            got = Rec.unpack(self.area[desc.completion - self.base : desc.completion - self.base + 32])
            if expected is not None:
                assert got == expected, f"{desc}: record {got} != model {expected}"
        if bytes(self.area) != bytes(model.memory):
            first = next(i for i in range(len(model.memory)) if self.area[i] != model.memory[i])
            raise AssertionError(f"{desc}: memory differs first at page {first // PAGE} offset {first % PAGE}"
                                 f" (emulator {self.area[first]:#x}, model {model.memory[first]:#x}); record {expected}")
        return expected


def op_bytes(*, u8_40=None, u32_40=None, u64_40=None, u32_48=None, u64_48=None) -> bytes:
    op = bytearray(24)
    if u8_40 is not None:
        op[0] = u8_40
    if u32_40 is not None:
        struct.pack_into("<I", op, 0, u32_40)
    if u64_40 is not None:
        struct.pack_into("<Q", op, 0, u64_40)
    if u32_48 is not None:
        struct.pack_into("<I", op, 8, u32_48)
    if u64_48 is not None:
        struct.pack_into("<Q", op, 8, u64_48)
    return bytes(op)


# -- single descriptors, drawn at random --------------------------------------

OPCODES = sorted(m.KNOWN - {m.BATCH}) + [0x0B, 0x12]
FLAG_EXTRAS = [m.FENCE, m.BOF, m.CHECK_RESULT, m.CACHE_CONTROL, m.CRC_SEED_ADDR, m.CRC_BYPASS_INV_REFL,
               m.CRC_BYPASS_DATA_REFL, m.STRICT_ORDERING, 0x800000, m.RCI]


@st.composite
def descriptors(draw):
    opcode = draw(st.sampled_from(OPCODES))
    often = lambda n: st.sampled_from([True] * n + [False])  # noqa: E731 (True first: what shrinking prefers)
    flags = m.CRAV | (m.RCR if draw(often(9)) else 0)
    if not draw(often(2)):
        for extra in draw(st.lists(st.sampled_from(FLAG_EXTRAS), max_size=2)):
            flags |= extra
    if opcode in (m.CRCGEN, m.COPY_CRC) and not draw(often(1)):
        flags |= draw(st.sampled_from([m.CRC_BYPASS_INV_REFL, m.CRC_BYPASS_DATA_REFL, m.CRC_SEED_ADDR,
                                       m.CRC_BYPASS_INV_REFL | m.CRC_BYPASS_DATA_REFL]))
    if not draw(often(30)):
        flags &= ~m.CRAV  # RCR without CRAV: invalid flags, and no record
    size = draw(st.one_of(st.integers(0, 64), st.integers(1, 3 * PAGE + 100), st.sampled_from([8, 800, 4096, 8192])))
    in_data = st.integers(0, DATA_PAGES * PAGE - 1)
    src, dst, third = draw(in_data), draw(in_data), draw(in_data)
    if opcode in (m.CREATE_DELTA, m.APPLY_DELTA):
        size -= size % 8 if draw(st.booleans()) else 0
    d = Desc(opcode, flags, completion=0, size=size, reserved=0 if draw(often(30)) else 1)
    d.src, d.dst = src, dst
    if opcode == m.MEMFILL:
        d.src = draw(st.integers(0, (1 << 64) - 1))  # the pattern
    if opcode == m.COMPARE_PATTERN:
        d.dst = draw(st.integers(0, (1 << 64) - 1))
    if opcode == m.COMPARE and draw(st.booleans()):
        d.dst = d.src + draw(st.sampled_from([PAGE, 2 * PAGE, 8]))  # compared against a copy, below
    expected_res = draw(st.integers(0, 1))
    if opcode in (m.COMPARE, m.COMPARE_PATTERN):
        d.op = op_bytes(u8_40=expected_res)
    elif opcode in (m.CRCGEN, m.COPY_CRC):
        d.op = op_bytes(u32_40=draw(st.integers(0, 0xFFFFFFFF)), u64_48=third)
    elif opcode == m.DUALCAST:
        d.op = op_bytes(u64_40=third if draw(st.booleans()) else (dst + 4 * PAGE) % (DATA_PAGES * PAGE))
    elif opcode == m.CREATE_DELTA:
        d.op = op_bytes(u64_40=third, u32_48=draw(st.sampled_from([0, 10, 100, 5120, 7])))
    elif opcode == m.APPLY_DELTA:
        d.op = op_bytes(u32_40=draw(st.sampled_from([0, 10, 20, 30, 7])))
    return d


def place(bench: Bench, d: Desc) -> Desc:
    """Turn a drawn descriptor's arena offsets into addresses."""
    to_addr = lambda off: bench.base + off  # noqa: E731
    if d.opcode != m.MEMFILL:
        d.src = to_addr(d.src)
    if d.opcode not in (m.COMPARE_PATTERN,):
        d.dst = to_addr(d.dst % (DATA_PAGES * PAGE))
    if d.opcode in (m.CRCGEN, m.COPY_CRC):
        d.op = op_bytes(u32_40=d.u32(40), u64_48=to_addr(d.u64(48)))
    elif d.opcode == m.DUALCAST:
        d.op = op_bytes(u64_40=to_addr(d.u64(40)))
    elif d.opcode == m.CREATE_DELTA:
        d.op = op_bytes(u64_40=to_addr(d.u64(40)), u32_48=d.u32(48))
    d.completion = bench.record(1)
    return d


@settings(max_examples=400, **SETTINGS)
@given(d=descriptors(), missing=st.sets(st.integers(0, PAGES - 1), max_size=3),
       near=st.sets(st.tuples(st.sampled_from(["src", "dst"]), st.integers(0, 3)), max_size=2),
       sticky=st.sets(st.integers(0, DATA_PAGES - 1), max_size=1), gen_cap=st.sampled_from([15, 0, 1, 2, 4, 11]),
       wq_bof=st.booleans(), small_transfer=st.booleans(), seed=st.integers(0, 3))
def test_single_descriptors_match_the_model(ext, d, missing, near, sticky, gen_cap, wq_bof, small_transfer, seed):
    config = Config(max_transfer=2 * PAGE if small_transfer else 1 << 20, gen_cap=gen_cap, wq_block_on_fault=wq_bof)
    bench = Bench(ext, config, seed)
    # pages a few pages into the buffers, so that faults land inside transfers
    missing = set(missing) | {(getattr(d, side) // PAGE + i) % DATA_PAGES for side, i in near}
    d = place(bench, d)
    if d.opcode == m.COMPARE and d.dst - d.src in (PAGE, 2 * PAGE, 8):
        bench.area[d.dst - bench.base : d.dst - bench.base + d.size] = bench.area[d.src - bench.base : d.src - bench.base + d.size]
    if d.opcode == m.COMPARE_PATTERN:  # mostly the pattern, so that faults and late differences happen
        start = d.src - bench.base
        bench.area[start : start + d.size] = (struct.pack("<Q", d.dst) * (d.size // 8 + 1))[: len(bench.area[start : start + d.size])]
    bench.check(d, missing - sticky, sticky - {RECORD_PAGE})


def test_opcodes_the_queue_does_not_take(ext):
    bench = Bench(ext, Config(ops=frozenset(m.KNOWN - {m.CRCGEN, m.MEMMOVE})))
    for opcode in (m.CRCGEN, m.MEMMOVE, m.MEMFILL):
        bench.check(Desc(opcode, completion=bench.record(), src=bench.addr(0), dst=bench.addr(1), size=100))


# -- faults at every byte offset -------------------------------------------------

FAULT_OPS = [m.MEMMOVE, m.MEMFILL, m.COMPARE, m.COMPARE_PATTERN, m.CRCGEN, m.COPY_CRC, m.DUALCAST]


@pytest.mark.parametrize("opcode", FAULT_OPS, ids=lambda o: f"op{o:#x}")
@pytest.mark.parametrize("side", ["src", "dst"])
def test_faults_at_every_byte_offset(ext, opcode, side):
    """A 300-byte transfer ending k bytes into a non-present page, for every k:
    the fault lands at each byte offset of the transfer."""
    bench = Bench(ext)
    n = 300
    src_page, dst_page = 2, 6
    if opcode == m.COMPARE:  # equal data, so the fault and not a difference ends it
        bench.area[dst_page * PAGE - PAGE : dst_page * PAGE + PAGE] = bench.area[src_page * PAGE - PAGE : src_page * PAGE + PAGE]
    for k in range(1, n):
        start = PAGE - (n - k)  # the transfer crosses into the next page after n - k bytes
        if side == "src":
            src, dst, missing = bench.addr(src_page - 1, start), bench.addr(dst_page - 1, start), {src_page}
        else:
            src, dst, missing = bench.addr(src_page - 1, start), bench.addr(dst_page - 1, start), {dst_page}
        d = Desc(opcode, completion=bench.record(), src=src, dst=dst, size=n)
        if opcode == m.MEMFILL:
            d.src = 0x0102030405060708
        if opcode == m.COMPARE_PATTERN:
            d.dst = int.from_bytes(bytes(bench.area[src - bench.base : src - bench.base + 8]), "little")
            bench.area[src - bench.base : src - bench.base + n] = (struct.pack("<Q", d.dst) * 40)[:n]
        if opcode == m.DUALCAST:
            d.op = op_bytes(u64_40=bench.addr(9, start) if side == "src" else dst + 2 * PAGE)
        if opcode in (m.CRCGEN, m.COPY_CRC):
            d.op = op_bytes(u32_40=k * 7919)
        rec = bench.check(d, missing)
        uses_side = opcode != m.MEMFILL if side == "src" else opcode not in (m.COMPARE_PATTERN, m.CRCGEN)
        if uses_side:
            assert rec.status & 0x7F == m.PAGE_FAULT and rec.bytes_completed == n - k, (k, rec)


def test_backward_memmove_faults_at_every_page_offset(ext):
    bench = Bench(ext)
    for shift in (1, 100, 4095, 4096, 5000):
        for missing in ({3}, {4}, {3, 5}):
            bench.check(Desc(m.MEMMOVE, completion=bench.record(), src=bench.addr(2, 17), dst=bench.addr(2, 17 + shift),
                             size=3 * PAGE), missing)


def test_block_on_fault_waits_and_a_sticky_page_is_rejected(ext):
    bench = Bench(ext, Config(wq_block_on_fault=True))
    flags = m.CRAV | m.RCR | m.BOF
    rec = bench.check(Desc(m.MEMMOVE, flags, bench.record(), bench.addr(0, 5), bench.addr(4, 9), 3 * PAGE), {1, 6})
    assert rec.status == m.SUCCESS
    rec = bench.check(Desc(m.MEMMOVE, flags, bench.record(), bench.addr(0, 5), bench.addr(4, 9), 3 * PAGE), {1}, {6})
    assert rec.status == m.PAGE_REQUEST_REJECTED


# -- CRC: every flag combination ------------------------------------------------------

def test_the_models_crc_is_crc32c_by_default():
    assert m.crc(b"123456789", 0, 0) == 0xE3069283  # CRC-32C's check value
    # With both bypasses it is the plain MSB-first CRC with polynomial 0x1EDC6F41.
    reg = 0
    for byte in b"\x80":
        reg ^= byte << 24
        for _ in range(8):
            reg = ((reg << 1) ^ 0x1EDC6F41) & 0xFFFFFFFF if reg & 0x80000000 else reg << 1 & 0xFFFFFFFF
    assert m.crc(b"\x80", 0, m.CRC_BYPASS_INV_REFL | m.CRC_BYPASS_DATA_REFL) == reg


@pytest.mark.parametrize("flags", [0, m.CRC_BYPASS_INV_REFL, m.CRC_BYPASS_DATA_REFL,
                                   m.CRC_BYPASS_INV_REFL | m.CRC_BYPASS_DATA_REFL])
@pytest.mark.parametrize("seed_from_memory", [False, True])
@pytest.mark.parametrize("opcode", [m.CRCGEN, m.COPY_CRC])
def test_crc_flag_combinations(ext, flags, seed_from_memory, opcode):
    bench = Bench(ext, seed=3)
    rng = random.Random(flags * 4 + seed_from_memory)
    for length in (1, 7, 8, 63, 4096, 5000):
        seed = rng.getrandbits(32)
        seed_addr = bench.addr(10, 40)
        struct.pack_into("<I", bench.area, seed_addr - bench.base, rng.getrandbits(32))
        f = m.CRAV | m.RCR | flags | (m.CRC_SEED_ADDR if seed_from_memory else 0)
        d = Desc(opcode, f, bench.record(), bench.addr(1, 3), bench.addr(5, 11), length,
                 op=op_bytes(u32_40=seed, u64_48=seed_addr))
        rec = bench.check(d)
        assert rec.status == m.SUCCESS
        # and with a fault in the middle: the partial value is the CRC of the bytes done
        if length > 1000:
            rec = bench.check(d, {2})
            assert rec.status & 0x7F == m.PAGE_FAULT and 0 < rec.bytes_completed < length


# -- batches: fences, failures, list faults -----------------------------------------------

MEMBER_KINDS = ["copy", "fill", "unsupported", "false_predicate", "true_predicate", "faulting_copy", "no_record"]


def member(bench: Bench, kind: str, index: int, fence: bool) -> Desc:
    flags = m.CRAV | m.RCR | (m.FENCE if fence else 0)
    rec = bench.record(2 + index)
    src, dst = bench.addr(index % 4, 64 * index), bench.addr(4 + index % 4, 64 * index)
    if kind == "copy":
        return Desc(m.MEMMOVE, flags, rec, src, dst, 200)
    if kind == "fill":
        return Desc(m.MEMFILL, flags, rec, 0x1122334455667788, dst, 120)
    if kind == "unsupported":
        return Desc(0x0B, flags, rec)
    if kind in ("false_predicate", "true_predicate"):
        # compare two regions that differ; expected result 0 (false) or 1 (true)
        return Desc(m.COMPARE, flags | m.CHECK_RESULT, rec, src, dst, 100,
                    op=op_bytes(u8_40=0 if kind == "false_predicate" else 1))
    if kind == "faulting_copy":
        return Desc(m.MEMMOVE, flags, rec, src, bench.addr(11, 10), 200)  # page 11 is made non-present
    if kind == "no_record":  # CRAV without RCR: a record only on failure
        return Desc(m.MEMMOVE, m.CRAV | (m.FENCE if fence else 0), rec, src, dst, 64)
    raise AssertionError(kind)


def batch(bench: Bench, members: list[Desc], list_offset: int = 0) -> Desc:
    list_addr = bench.addr(LIST_PAGE) + list_offset
    for i, desc in enumerate(members):
        bench.area[list_addr - bench.base + 64 * i : list_addr - bench.base + 64 * (i + 1)] = desc.pack()
    return Desc(m.BATCH, m.CRAV | m.RCR, bench.record(), list_addr, 0, len(members))


@settings(max_examples=300, **SETTINGS)
@given(kinds=st.lists(st.sampled_from(MEMBER_KINDS), min_size=2, max_size=40), fences=st.data(),
       list_fault=st.one_of(st.none(), st.integers(0, 39)), seed=st.integers(0, 3))
def test_batches_match_the_model(ext, kinds, fences, list_fault, seed):
    bench = Bench(ext, Config(max_batch=64), seed)
    members = [member(bench, kind, i, fences.draw(st.booleans())) for i, kind in enumerate(kinds)]
    # The list starts 64 bytes before the end of its first page when a list fault is drawn,
    # so the fault can land after some members ran.
    offset = PAGE - 64 * (1 + (list_fault or 0) % 8) if list_fault is not None else 0
    d = batch(bench, members, offset)
    missing = {11} | ({LIST_PAGE + 1} if list_fault is not None else set())
    rec = bench.check(d, missing)
    assert rec.status in (m.SUCCESS, m.BATCH_FAIL, m.BATCH_LIST_FAULT)


def test_a_fence_after_a_failure_abandons_the_rest(ext):
    bench = Bench(ext)
    members = [member(bench, "copy", 0, False), member(bench, "false_predicate", 1, False),
               member(bench, "copy", 2, False), member(bench, "copy", 3, True), member(bench, "fill", 4, False)]
    rec = bench.check(batch(bench, members))
    assert (rec.status, rec.result, rec.bytes_completed) == (m.BATCH_FAIL, 1, 3)
    statuses = [bench.area[bench.record(2 + i) - bench.base] for i in range(5)]
    assert statuses[:4] == [m.SUCCESS, m.FALSE_PREDICATE, m.SUCCESS, 0] and statuses[4] == 0  # 3 and 4 never ran


def test_a_false_predicate_fails_the_batch_and_sets_its_result(ext):
    bench = Bench(ext)
    rec = bench.check(batch(bench, [member(bench, "copy", 0, False), member(bench, "false_predicate", 1, False)]))
    assert (rec.status, rec.result, rec.bytes_completed) == (m.BATCH_FAIL, 1, 2)
    rec = bench.check(batch(bench, [member(bench, "copy", 0, False), member(bench, "true_predicate", 1, False)]))
    assert (rec.status, rec.result, rec.bytes_completed) == (m.SUCCESS, 0, 2)


def test_a_batch_list_fault_reports_the_members_completed(ext):
    bench = Bench(ext)
    members = [member(bench, "copy", i, False) for i in range(6)]
    rec = bench.check(batch(bench, members, PAGE - 3 * 64), {LIST_PAGE + 1})
    assert (rec.status, rec.bytes_completed, rec.result) == (m.BATCH_LIST_FAULT, 3, 0)
    assert rec.fault_addr == bench.addr(LIST_PAGE + 1)


def test_batch_errors(ext):
    bench = Bench(ext, Config(max_batch=8))
    members = [member(bench, "copy", i, False) for i in range(9)]
    bench.check(batch(bench, members))  # too many
    bench.check(batch(bench, members[:1]))  # too few
    d = batch(bench, members[:2])
    d.src += 8
    bench.check(d)  # misaligned list
    nested = Desc(m.BATCH, m.CRAV | m.RCR, bench.record(5), bench.addr(LIST_PAGE), 0, 2)
    bench.check(batch(bench, [members[0], nested], 2048))  # no batch inside a batch


def test_record_faults_and_misaligned_records(ext):
    bench = Bench(ext)
    for opcode in (m.MEMMOVE, m.CRCGEN, m.COMPARE, m.NOOP):
        d = Desc(opcode, m.CRAV | m.RCR, bench.record(), bench.addr(0, 5), bench.addr(3, 5), 5000)
        bench.check(d, {RECORD_PAGE})
        bench.check(d, {RECORD_PAGE, 1})  # a data fault too: partial, then the record's
    d = Desc(m.MEMMOVE, m.CRAV | m.RCR, bench.record() + 8, bench.addr(0), bench.addr(3), 100)
    assert bench.check(d).status == m.RECORD_ALIGN
