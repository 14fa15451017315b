"""One class per mover operation: its device descriptor, its progress, its CPU finish.

An operation object is the remaining work. The device path asks it for the
next descriptor's arguments (:meth:`device_args`, at most ``max_transfer``
bytes), then reports progress with :meth:`advance` (a piece finished, or a
page fault's partial completion); whatever is left when the device gives up
is finished by :meth:`cpu` from exactly that state, so a CRC continues from
the partial value and a fill keeps its pattern's phase. Keeping both paths
in one class is what makes the engines agree byte for byte.
"""

from __future__ import annotations

from dmuserd.dsa_offload import _cpu
from dmuserd.dsa_offload._spec import DELTA_ENTRY, DELTA_GRANULE, Opcode


class Operation:
    opcode: int  # an Opcode
    name: str
    splittable = False  # independent pieces may run in parallel
    restart_on_fault = False  # partial progress cannot be resumed: redo it all

    def nbytes(self) -> int:
        raise NotImplementedError

    @property
    def finished(self) -> bool:
        return self.nbytes() == 0

    def device_args(self, max_transfer: int) -> dict:
        raise NotImplementedError

    def advance(self, done: int, record) -> None:
        """``done`` bytes of the last descriptor are finished (``record`` has the rest)."""
        raise NotImplementedError

    def cpu(self) -> None:
        """Finish the remaining work on the CPU."""
        raise NotImplementedError

    def result(self):
        return None

    def split(self, piece: int) -> list[Operation]:
        return [self]

    def combine(self, parts: list[Operation]):
        return None


def _piece(n: int, max_transfer: int) -> int:
    return min(n, max_transfer)


class Copy(Operation):
    opcode, name, splittable = Opcode.MEMMOVE, "copy", True

    def __init__(self, dst: memoryview, src: memoryview) -> None:
        self.dst, self.src = dst, src

    def nbytes(self) -> int:
        return len(self.dst)

    def device_args(self, max_transfer):
        n = _piece(len(self.dst), max_transfer)
        return {"src": self.src[:n], "dst": self.dst[:n], "size": n}

    def advance(self, done, record):
        if record is not None and record.result == 1:
            # The device ran backwards (overlap): the top is done.
            keep = len(self.dst) - done
            self.dst, self.src = self.dst[:keep], self.src[:keep]
        else:
            self.dst, self.src = self.dst[done:], self.src[done:]

    def cpu(self):
        _cpu.copy(self.dst, self.src)
        self.dst, self.src = self.dst[:0], self.src[:0]

    def split(self, piece):
        return [Copy(self.dst[i : i + piece], self.src[i : i + piece]) for i in range(0, len(self.dst), piece)]


class Fill(Operation):
    opcode, name, splittable = Opcode.MEMFILL, "fill", True

    def __init__(self, dst: memoryview, pattern: bytes, phase: int = 0) -> None:
        self.dst, self.pattern, self.phase = dst, pattern, phase

    def nbytes(self):
        return len(self.dst)

    def device_args(self, max_transfer):
        n = _piece(len(self.dst), max_transfer)
        value = int.from_bytes(_cpu.rotate(self.pattern, self.phase), "little")
        return {"dst": self.dst[:n], "size": n, "pattern": value}

    def advance(self, done, record):
        self.dst = self.dst[done:]
        self.phase = (self.phase + done) % 8

    def cpu(self):
        _cpu.fill(self.dst, _cpu.rotate(self.pattern, self.phase))
        self.dst = self.dst[:0]

    def split(self, piece):
        piece -= piece % 8
        return [Fill(self.dst[i : i + piece], self.pattern, self.phase + i) for i in range(0, len(self.dst), piece)]


class _Search(Operation):
    """Shared by compare and compare-pattern: stop at the first difference."""

    splittable = True

    def __init__(self, base: int = 0) -> None:
        self.base = base
        self.found: int | None = None

    @property
    def finished(self):
        return self.found is not None or self.nbytes() == 0

    def advance(self, done, record):
        if record is not None and record.status_ok and record.result == 1:
            self.found = self.base + record.bytes_completed
            return
        self._skip(done)
        self.base += done

    def result(self):
        return self.found

    def combine(self, parts):
        found = [p.found for p in parts if p.found is not None]
        return min(found) if found else None


class Compare(_Search):
    opcode, name = Opcode.COMPARE, "compare"

    def __init__(self, a: memoryview, b: memoryview, base: int = 0) -> None:
        super().__init__(base)
        self.a, self.b = a, b

    def nbytes(self):
        return len(self.a)

    def device_args(self, max_transfer):
        n = _piece(len(self.a), max_transfer)
        return {"src": self.a[:n], "src2": self.b[:n], "size": n}

    def _skip(self, done):
        self.a, self.b = self.a[done:], self.b[done:]

    def cpu(self):
        offset = _cpu.first_difference(self.a, self.b)
        self.found = None if offset is None else self.base + offset
        self._skip(len(self.a))

    def split(self, piece):
        return [Compare(self.a[i : i + piece], self.b[i : i + piece], self.base + i) for i in range(0, len(self.a), piece)]


class ComparePattern(_Search):
    opcode, name = Opcode.COMPARE_PATTERN, "compare_pattern"

    def __init__(self, buf: memoryview, pattern: bytes, base: int = 0) -> None:
        super().__init__(base)
        self.buf, self.pattern = buf, pattern

    def nbytes(self):
        return len(self.buf)

    def device_args(self, max_transfer):
        n = _piece(len(self.buf), max_transfer)
        value = int.from_bytes(_cpu.rotate(self.pattern, self.base), "little")
        return {"src": self.buf[:n], "size": n, "pattern": value}

    def _skip(self, done):
        self.buf = self.buf[done:]

    def advance(self, done, record):
        super().advance(done, record)
        if self.found is not None:
            # Exact to the byte whatever the device's granularity: DML's
            # software kernel reports the offset of the differing 8-byte
            # granule, the spec the first differing byte. Look at most 8 bytes.
            at = record.bytes_completed
            for i in range(at, min(at + 8, len(self.buf))):
                if self.buf[i] != self.pattern[(self.base + i) % 8]:
                    self.found = self.base + i
                    break

    def cpu(self):
        offset = _cpu.pattern_difference(self.buf, _cpu.rotate(self.pattern, self.base))
        self.found = None if offset is None else self.base + offset
        self._skip(len(self.buf))

    def split(self, piece):
        piece -= piece % 8
        return [ComparePattern(self.buf[i : i + piece], self.pattern, self.base + i) for i in range(0, len(self.buf), piece)]


class Crc32c(Operation):
    """CRC-32C; pieces and fault remainders chain through the seed."""

    opcode, name = Opcode.CRCGEN, "crc32c"

    def __init__(self, buf: memoryview, seed: int = 0) -> None:
        self.buf, self.seed = buf, seed

    def nbytes(self):
        return len(self.buf)

    def device_args(self, max_transfer):
        n = _piece(len(self.buf), max_transfer)
        return {"src": self.buf[:n], "size": n, "crc_seed": self.seed}

    def advance(self, done, record):
        if done:  # the record's CRC of what was done is the next seed (nothing done: the seed stands)
            self.seed = record.op_specific
            self.buf = self.buf[done:]

    def cpu(self):
        self.seed = _cpu.crc32c(self.buf, self.seed)
        self.buf = self.buf[:0]

    def result(self):
        return self.seed


class CopyCrc32c(Crc32c):
    opcode, name = Opcode.COPY_CRC, "copy_crc32c"

    def __init__(self, dst: memoryview, src: memoryview, seed: int = 0) -> None:
        super().__init__(src, seed)
        self.dst = dst

    def device_args(self, max_transfer):
        args = super().device_args(max_transfer)
        args["dst"] = self.dst[: args["size"]]
        return args

    def advance(self, done, record):
        super().advance(done, record)
        self.dst = self.dst[done:]

    def cpu(self):
        _cpu.copy(self.dst, self.buf)
        self.dst = self.dst[:0]
        super().cpu()


class Dualcast(Operation):
    opcode, name, splittable = Opcode.DUALCAST, "dualcast", True

    def __init__(self, dst1: memoryview, dst2: memoryview, src: memoryview) -> None:
        self.dst1, self.dst2, self.src = dst1, dst2, src

    def nbytes(self):
        return len(self.src)

    def device_args(self, max_transfer):
        n = _piece(len(self.src), max_transfer)
        return {"src": self.src[:n], "dst": self.dst1[:n], "dst2": self.dst2[:n], "size": n}

    def advance(self, done, record):
        self.dst1, self.dst2, self.src = self.dst1[done:], self.dst2[done:], self.src[done:]

    def cpu(self):
        _cpu.copy(self.dst1, self.src)
        _cpu.copy(self.dst2, self.src)
        self.advance(len(self.src), None)

    def split(self, piece):
        piece -= piece % 4096  # keeps the two destinations' bits 11:0 equal
        return [Dualcast(self.dst1[i : i + piece], self.dst2[i : i + piece], self.src[i : i + piece]) for i in range(0, len(self.src), piece)]


class CreateDelta(Operation):
    """A whole-buffer operation: a fault restarts it (the record is rebuilt)."""

    opcode, name, restart_on_fault = Opcode.CREATE_DELTA, "create_delta", True

    def __init__(self, original: memoryview, modified: memoryview) -> None:
        self.original, self.modified = original, modified
        self.record = bytearray(len(original) // DELTA_GRANULE * DELTA_ENTRY)
        self.delta: bytes | None = None

    def nbytes(self):
        return len(self.original)

    @property
    def finished(self):
        return self.delta is not None

    def device_args(self, max_transfer):
        return {"src": self.original, "src2": self.modified, "size": len(self.original), "delta": self.record, "max_delta": len(self.record)}

    def advance(self, done, record):
        if record is not None and record.status_ok:
            if record.result == 2:  # cannot happen: the record holds every granule
                raise RuntimeError("delta record overflowed its worst-case size")
            self.delta = bytes(self.record[: record.op_specific]) if record.result else b""

    def cpu(self):
        self.delta = _cpu.create_delta(self.original, self.modified)

    def result(self):
        return self.delta


class ApplyDelta(Operation):
    opcode, name, restart_on_fault = Opcode.APPLY_DELTA, "apply_delta", True

    def __init__(self, dst: memoryview, delta: memoryview) -> None:
        self.dst, self.delta = dst, delta
        self.applied = len(delta) == 0  # an empty delta changes nothing

    def nbytes(self):
        return len(self.dst)

    @property
    def finished(self):
        return self.applied

    def device_args(self, max_transfer):
        return {"delta": self.delta, "dst": self.dst, "size": len(self.dst), "delta_size": len(self.delta)}

    def advance(self, done, record):
        self.applied = record is not None and record.status_ok

    def cpu(self):
        _cpu.apply_delta(self.dst, self.delta)
        self.applied = True
