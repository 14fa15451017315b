"""ARM (AArch32 ARM/THUMB2) and AArch64 branch immediates as zucchini reads and writes them.

Each "address type" is one instruction encoding whose immediate is a
PC-relative displacement: AArch32 ``A24`` (B/BL/BLX, ARM mode), THUMB2 ``T8``
(conditional B), ``T11`` (B), ``T20`` (conditional B.W), ``T24`` (B.W, BL,
BLX); AArch64 ``IMMD14`` (TBZ/TBNZ), ``IMMD19`` (B.cond, CBZ/CBNZ) and
``IMMD26`` (B, BL). For each: decode (displacement and the target's
alignment), encode (into an existing instruction, refusing what does not
fit), read (instruction RVA -> target RVA) and write (target RVA ->
instruction). Arithmetic is 32-bit unsigned for RVAs and 32-bit signed for
displacements, as in zucchini.
"""

from __future__ import annotations

from typing import Iterator

_M32 = 0xFFFFFFFF

MODE_A32, MODE_T32, MODE_A64 = 0, 1, 2
A24, T8, T11, T20, T24 = range(5)
IMMD14, IMMD19, IMMD26 = range(3)


def addr_types(a64: bool) -> range:
    return range(3) if a64 else range(5)


def _sext(value: int, bit: int) -> int:
    """``value``'s bits 0..bit as a signed number."""
    value &= (1 << (bit + 1)) - 1
    return value - (1 << (bit + 1)) if value >> bit else value


def _i32(value: int) -> int:
    return _sext(value, 31)


def _bits(value: int, lo: int, hi: int) -> int:
    return (value >> lo) & ((1 << (hi - lo + 1)) - 1)


def _fits(value: int, digits: int) -> bool:
    return -(1 << (digits - 1)) <= value < (1 << (digits - 1))


# -- AArch32 -------------------------------------------------------------------
# decoders return (displacement, target alignment) or None


def _dec_a24(code: int):
    if _bits(code, 24, 27) in (0xA, 0xB):
        disp = _sext(code, 23) << 2
        if code >> 28 == 0xF:
            return disp | (_bits(code, 24, 24) << 1), 2
        return disp, 4
    return None


def _enc_a24(disp: int, code: int):
    if _bits(code, 24, 27) not in (0xA, 0xB) or not _fits(disp, 26):
        return None
    if code >> 28 == 0xF:
        if disp % 2:
            return None
        code = (code & 0xFEFFFFFF) | (((disp >> 1) & 1) << 24)
    elif disp % 4:
        return None
    return (code & 0xFF000000) | ((disp >> 2) & 0x00FFFFFF)


def _dec_t8(code: int):
    if (code & 0xF000) == 0xD000 and (code & 0x0F00) != 0x0F00:
        return _sext(code, 7) << 1, 2
    return None


def _enc_t8(disp: int, code: int):
    if (code & 0xF000) == 0xD000 and (code & 0x0F00) != 0x0F00 and not disp % 2 and _fits(disp, 9):
        return (code & 0xFF00) | ((disp >> 1) & 0xFF)
    return None


def _dec_t11(code: int):
    if (code & 0xF800) == 0xE000:
        return _sext(code, 10) << 1, 2
    return None


def _enc_t11(disp: int, code: int):
    if (code & 0xF800) == 0xE000 and not disp % 2 and _fits(disp, 12):
        return (code & 0xF800) | ((disp >> 1) & 0x07FF)
    return None


def _dec_t20(code: int):
    if (code & 0xF800D000) == 0xF0008000 and (code & 0x03C00000) != 0x03C00000:
        t = (_bits(code, 16, 21) << 12) | (_bits(code, 0, 10) << 1)
        t |= (_bits(code, 26, 26) << 20) | (_bits(code, 11, 11) << 19) | (_bits(code, 13, 13) << 18)
        return _sext(t, 20), 2
    return None


def _enc_t20(disp: int, code: int):
    if (code & 0xF800D000) != 0xF0008000 or (code & 0x03C00000) == 0x03C00000:
        return None
    if disp % 2 or not _fits(disp, 21):
        return None
    code &= 0xFBC0D000
    code |= (_bits(disp, 20, 20) << 26) | (_bits(disp, 12, 17) << 16) | (_bits(disp, 18, 18) << 13)
    code |= (_bits(disp, 19, 19) << 11) | _bits(disp, 1, 11)
    return code


_T24_KINDS = (0xF0009000, 0xF000D000, 0xF000C000)


def _dec_t24(code: int):
    kind = code & 0xF800D000
    if kind not in _T24_KINDS:
        return None
    s = _bits(code, 26, 26)
    t = (_bits(code, 16, 25) << 12) | (_bits(code, 0, 10) << 1)
    t |= (s << 24) | ((_bits(code, 13, 13) ^ s ^ 1) << 23) | ((_bits(code, 11, 11) ^ s ^ 1) << 22)
    align = 2
    if kind == 0xF000C000:
        if code & 1:
            return None
        align = 4
    return _sext(t, 24), align


def _enc_t24(disp: int, code: int):
    kind = code & 0xF800D000
    if kind not in _T24_KINDS or disp % 2:
        return None
    if kind == 0xF000C000 and (disp >> 1) & 1:
        return None
    if not _fits(disp, 25):
        return None
    s = _bits(disp, 24, 24)
    code &= 0xF800D000
    code |= (s << 26) | (_bits(disp, 12, 21) << 16) | ((_bits(disp, 23, 23) ^ s ^ 1) << 13)
    code |= ((_bits(disp, 22, 22) ^ s ^ 1) << 11) | _bits(disp, 1, 11)
    return code


# -- AArch64 -------------------------------------------------------------------


def _dec_immd14(code: int):
    if code & 0x7F000000 in (0x36000000, 0x37000000):
        return _sext(code >> 5, 13) << 2, 4
    return None


def _enc_immd14(disp: int, code: int):
    if code & 0x7F000000 in (0x36000000, 0x37000000) and not disp % 4 and _fits(disp, 16):
        return (code & 0xFFF8001F) | (_bits(disp, 2, 15) << 5)
    return None


def _dec_immd19(code: int):
    if (code & 0xFF000010) == 0x54000000 or code & 0x7F000000 in (0x34000000, 0x35000000):
        return _sext(code >> 5, 18) << 2, 4
    return None


def _enc_immd19(disp: int, code: int):
    if ((code & 0xFF000010) == 0x54000000 or code & 0x7F000000 in (0x34000000, 0x35000000)) \
            and not disp % 4 and _fits(disp, 21):
        return (code & 0xFF00001F) | (_bits(disp, 2, 20) << 5)
    return None


def _dec_immd26(code: int):
    if code & 0xFC000000 in (0x14000000, 0x94000000):
        return _sext(code, 25) << 2, 4
    return None


def _enc_immd26(disp: int, code: int):
    if code & 0xFC000000 in (0x14000000, 0x94000000) and not disp % 4 and _fits(disp, 28):
        return (code & 0xFC000000) | _bits(disp, 2, 27)
    return None


# (decode, encode, instruction alignment, pc bias, code width, thumb 32-bit halves, target align fixed)
_A32_TYPES = {
    A24: (_dec_a24, _enc_a24, 4, 8, 4, False, None),
    T8: (_dec_t8, _enc_t8, 2, 4, 2, False, 2),
    T11: (_dec_t11, _enc_t11, 2, 4, 2, False, 2),
    T20: (_dec_t20, _enc_t20, 2, 4, 4, True, 2),
    T24: (_dec_t24, _enc_t24, 2, 4, 4, True, None),
}
_A64_TYPES = {
    IMMD14: (_dec_immd14, _enc_immd14, 4, 0, 4, False, 4),
    IMMD19: (_dec_immd19, _enc_immd19, 4, 0, 4, False, 4),
    IMMD26: (_dec_immd26, _enc_immd26, 4, 0, 4, False, 4),
}


def fetch(data, pos: int, width: int, halves: bool) -> int:
    if width == 2:
        return data[pos] | data[pos + 1] << 8
    if halves:
        return (data[pos] | data[pos + 1] << 8) << 16 | data[pos + 2] | data[pos + 3] << 8
    return int.from_bytes(data[pos : pos + 4], "little")


def store(buf: bytearray, pos: int, width: int, halves: bool, code: int) -> None:
    if halves:
        code = ((code & 0xFFFF) << 16) | (code >> 16)
    buf[pos : pos + width] = code.to_bytes(width, "little")


def read_target(a64: bool, addr_type: int, instr_rva: int, code: int) -> int | None:
    """The target RVA of the instruction ``code`` at ``instr_rva``, or None if it is not that type."""
    dec, _enc, ialign, bias, _w, _h, _fixed = (_A64_TYPES if a64 else _A32_TYPES)[addr_type]
    if instr_rva % ialign:
        return None
    decoded = dec(code)
    if decoded is None:
        return None
    disp, align = decoded
    ret = (instr_rva + bias + disp) & _M32
    if not a64:
        ret -= ret & (align - 1)
    return ret


def write_target(a64: bool, addr_type: int, instr_rva: int, target_rva: int, code: int) -> int | None:
    """``code`` re-encoded to reach ``target_rva`` from ``instr_rva``, or None if it cannot."""
    dec, enc, ialign, bias, _w, _h, fixed = (_A64_TYPES if a64 else _A32_TYPES)[addr_type]
    if instr_rva % ialign:
        return None
    if fixed is None:
        decoded = dec(code)
        if decoded is None:
            return None
        align = decoded[1]
    else:
        align = fixed
    if target_rva % align:
        return None
    if a64:
        disp = _i32((target_rva - instr_rva) & _M32)
    else:
        disp = _i32(_i32(target_rva) - _i32((instr_rva + bias) & _M32))
        disp += (-disp) & (align - 1)
    return enc(disp, code)


def is_thumb2(data, offset: int, size: int, addr: int) -> bool:
    """Zucchini's guess that an AArch32 executable section is THUMB2: few words with condition "always"."""
    if addr % 4 or size % 4:
        return True
    high = bytes(data[offset + 3 : offset + size : 4])
    always = len(high) - len(high.translate(None, bytes(range(0xE0, 0xF0))))
    return always < len(high) * 0.4


def code_width(a64: bool, addr_type: int) -> tuple[int, bool]:
    """Bytes of the instruction and whether it is two THUMB2 halfwords (high one first)."""
    entry = (_A64_TYPES if a64 else _A32_TYPES)[addr_type]
    return entry[4], entry[5]


def scan_gap(data, lo: int, hi: int, mode: int, units) -> list[tuple[int, int, int]]:
    """(address type, location, target RVA) of the branches in ``[lo, hi)``, scanning as zucchini does."""
    if mode == MODE_T32:
        return list(_scan_t32(data, lo, hi, units))
    return list(_scan_words(data, lo, hi, mode == MODE_A64, units))


def _scan_words(data, lo: int, hi: int, a64: bool, translator) -> Iterator[tuple[int, int, int]]:
    if hi - lo < 4:
        return
    pos = lo + ((-lo) & 3)
    types = (IMMD14, IMMD19, IMMD26) if a64 else (A24,)
    while hi - pos >= 4:
        code = int.from_bytes(data[pos : pos + 4], "little")
        if (a64 and (code & 0x7E000000 in (0x34000000, 0x36000000) or (code & 0xFF000010) == 0x54000000
                     or code & 0x7C000000 == 0x14000000)) or (not a64 and _bits(code, 24, 27) in (0xA, 0xB)):
            rva = translator.offset_to_rva(pos)
            for addr_type in types:
                target = read_target(a64, addr_type, rva, code)
                if target is not None:
                    yield addr_type, pos, target
                    break
        pos += 4


def _scan_t32(data, lo: int, hi: int, translator) -> Iterator[tuple[int, int, int]]:
    if hi - lo < 2:
        return
    pos = lo + (lo & 1)
    while hi - pos >= 2:
        code16 = data[pos] | data[pos + 1] << 8
        size = 4 if (code16 & 0xF000) == 0xF000 or (code16 & 0xF800) == 0xE800 else 2
        found = None
        if size == 2:
            if (code16 & 0xF000) == 0xD000 or (code16 & 0xF800) == 0xE000:
                rva = translator.offset_to_rva(pos)
                for addr_type in (T8, T11):
                    target = read_target(False, addr_type, rva, code16)
                    if target is not None:
                        found = addr_type, pos, target
                        break
        elif hi - pos >= 4:
            code32 = code16 << 16 | data[pos + 2] | data[pos + 3] << 8
            if (code32 & 0xF8008000) == 0xF0008000:
                rva = translator.offset_to_rva(pos)
                for addr_type in (T20, T24):
                    target = read_target(False, addr_type, rva, code32)
                    if target is not None:
                        found = addr_type, pos, target
                        break
        if found is not None:
            yield found
        pos += size
