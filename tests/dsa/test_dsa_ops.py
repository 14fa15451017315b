"""Operation objects reading completion records (no device needed)."""

import pytest

from dmuserd.dsa_offload import _ops
from dmuserd.dsa_offload._device import Record


def record(status=1, result=0, bytes_completed=0, op_specific=0):
    return Record(status=status, result=result, bytes_completed=bytes_completed, fault_addr=0, op_specific=op_specific)


@pytest.mark.parametrize("reported", [800, 803])  # the 8-byte granule (DML's software kernel) or the byte (the spec)
def test_compare_pattern_finds_the_exact_byte_whatever_the_devices_granularity(reported):
    buf = bytearray(b"abcdefgh" * 200)
    buf[803] = 0
    op = _ops.ComparePattern(memoryview(buf)[16:], b"abcdefgh", base=16)
    op.advance(0, record(result=1, bytes_completed=reported - 16))
    assert op.result() == 803


def test_a_crc_record_with_nothing_done_keeps_the_seed():
    op = _ops.Crc32c(memoryview(bytes(100)), seed=1234)
    op.advance(0, record(status=3, op_specific=0))  # a fault before the first byte
    assert op.seed == 1234 and op.nbytes() == 100
    op.advance(40, record(status=3, bytes_completed=40, op_specific=99))
    assert op.seed == 99 and op.nbytes() == 60


def test_a_backward_memmove_record_shrinks_from_the_top():
    buf = bytearray(100)
    op = _ops.Copy(memoryview(buf)[10:60], memoryview(buf)[0:50])
    op.advance(30, record(status=3, result=1, bytes_completed=30))
    assert op.nbytes() == 20 and op.dst.obj is buf
