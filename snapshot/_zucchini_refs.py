"""Zucchini's reference correction: the third step of applying an element.

After the equivalences, extra data and raw delta have built a new element
whose bytes are right except for references (pointers, relative branches),
each reference found by the element's disassembler in the copied old blocks
is rewritten in the new element to point at its new target:

1. per pool (in tag order), the old targets of all the pool's reference types
   are projected through the equivalences (old targets no equivalence covers
   are dropped), the patch's extra targets for the pool are added, and the
   set sorted: the new target list;
2. each old reference in an equivalence's old block predicts a new target
   (its old target projected, extended to uncovered offsets by the nearest
   block); the patch's next reference delta is the distance in the new list
   from the target nearest that prediction to the real one;
3. the reference is written at its location moved by the equivalence, by the
   new element's disassembler.

The disassemblers are in ``_zucchini_elf``; this module only needs their
``groups()`` (type tag, pool tag, reader over an offset range, writer).
"""

from __future__ import annotations

from array import array
from typing import TYPE_CHECKING

from dmuserd.snapshot import _zucchini_kernel as kernel
from dmuserd.snapshot._zucchini import ZucchiniError, decode_targets, exe_type_name

if TYPE_CHECKING:
    from dmuserd.snapshot._zucchini import ElementPatch



_THRESHOLD = 16


def cxx_sort(items: list[list[int]]) -> None:
    """Sort ``items`` by their first field in the order GCC's ``std::sort`` leaves ties in.

    Zucchini sorts equivalences by old offset with ``std::sort``, which is not
    stable; several equivalences can share an old offset, and which of two
    equally long ones survives the pruning depends on their order. To build
    the same new bytes we reproduce that order: introsort (median-of-three
    quicksort, heapsort past 2*log2(n) levels) down to runs of 16, then one
    insertion sort.
    """
    n = len(items)
    if n < 2:
        return
    _introsort(items, 0, n, 2 * (n.bit_length() - 1))
    if n > _THRESHOLD:
        _insertion_sort(items, 0, _THRESHOLD)
        for i in range(_THRESHOLD, n):
            _linear_insert(items, i)
    else:
        _insertion_sort(items, 0, n)


def _introsort(a: list, first: int, last: int, depth: int) -> None:
    while last - first > _THRESHOLD:
        if depth == 0:
            _heap_sort(a, first, last)
            return
        depth -= 1
        # the median of (second, middle, last-but-one) becomes the pivot, at first
        x, y, z = first + 1, first + (last - first) // 2, last - 1
        ax, ay, az = a[x][0], a[y][0], a[z][0]
        if ax < ay:
            m = y if ay < az else (z if ax < az else x)
        else:
            m = x if ax < az else (z if ay < az else y)
        a[first], a[m] = a[m], a[first]
        pivot = a[first][0]
        lo, hi = first + 1, last
        while True:
            while a[lo][0] < pivot:
                lo += 1
            hi -= 1
            while pivot < a[hi][0]:
                hi -= 1
            if lo >= hi:
                break
            a[lo], a[hi] = a[hi], a[lo]
            lo += 1
        _introsort(a, lo, last, depth)
        last = lo


def _insertion_sort(a: list, first: int, last: int) -> None:
    for i in range(first + 1, last):
        if a[i][0] < a[first][0]:
            a.insert(first, a.pop(i))
        else:
            _linear_insert(a, i)


def _linear_insert(a: list, i: int) -> None:
    value = a[i]
    key = value[0]
    while key < a[i - 1][0]:
        a[i] = a[i - 1]
        i -= 1
    a[i] = value


def _sift(a: list, first: int, hole: int, length: int, value: list) -> None:
    top = hole
    child = hole
    while child < (length - 1) // 2:
        child = 2 * (child + 1)
        if a[first + child][0] < a[first + child - 1][0]:
            child -= 1
        a[first + hole] = a[first + child]
        hole = child
    if length % 2 == 0 and child == (length - 2) // 2:
        child = 2 * (child + 1)
        a[first + hole] = a[first + child - 1]
        hole = child - 1
    parent = (hole - 1) // 2
    while hole > top and a[first + parent][0] < value[0]:
        a[first + hole] = a[first + parent]
        hole = parent
        parent = (hole - 1) // 2
    a[first + hole] = value


def _heap_sort(a: list, first: int, last: int) -> None:
    length = last - first
    if length >= 2:
        parent = (length - 2) // 2
        while True:
            _sift(a, first, parent, length, a[first + parent])
            if parent == 0:
                break
            parent -= 1
    while last - first > 1:
        last -= 1
        value = a[last]
        a[last] = a[first]
        _sift(a, first, 0, last - first, value)


class OffsetMapper:
    """Old-to-new offsets through the equivalences, pruned so each old byte is in at most one block.

    Pruning sorts the blocks by old offset and trims overlaps, the longer
    block winning (zucchini's PruneEquivalencesAndSortBySource); the kernels
    take the result as three arrays (old start, new start, old end).
    """

    def __init__(self, equivalences, old_size: int, new_size: int) -> None:
        self.old_size, self.new_size = old_size, new_size
        eqs = [[e.src, e.dst, e.length] for e in equivalences]
        if len({e[0] for e in eqs}) == len(eqs):
            eqs.sort(key=lambda e: e[0])  # no ties: every sort agrees
        else:
            cxx_sort(eqs)
        n = len(eqs)
        i = 0
        while i < n:
            cur = eqs[i]
            cur_end = cur[0] + cur[2]
            j = i + 1
            reaper = False
            while j < n:
                nxt = eqs[j]
                if nxt[0] >= cur_end:
                    break
                if cur[2] < nxt[2]:
                    cur[2] -= cur_end - nxt[0]
                    reaper = True
                    break
                j += 1
            if reaper:
                for k in range(i + 1, j):
                    eqs[k][2] = 0
                i = j
                continue
            for k in range(i + 1, j):
                red = eqs[k]
                delta = cur_end - red[0]
                red[2] -= min(red[2], delta)
                red[0] += delta
                red[1] += delta
            i += 1
        kept = [e for e in eqs if e[2]]
        self.src = array("I", [e[0] for e in kept])
        self.dst = array("I", [e[1] for e in kept])
        self.end = array("I", [e[0] + e[2] for e in kept])


def correct_references(element: ElementPatch, old: memoryview, new: bytearray) -> None:
    """Rewrite the references of ``element``'s new bytes in ``new`` (whole images, element located by offsets)."""
    from dmuserd.snapshot import _zucchini_elf

    what = f"zucchini patch: element {element.index} ({exe_type_name(element.exe_type)})"
    old_view = old[element.old_offset : element.old_offset + element.old_length]
    old_dis = _zucchini_elf.disassemble(element.exe_type, old_view, full=True, what=f"{what}: old element")
    new_dis = _zucchini_elf.disassemble(element.exe_type, memoryview(new)[element.new_offset : element.new_offset
                                        + element.new_length], full=False, what=f"{what}: new element")
    if old_dis.size != element.old_length or new_dis.size != element.new_length:
        raise ZucchiniError(f"{what}: the ELF images are {old_dis.size} and {new_dis.size} bytes, "
                            f"the element {element.old_length} and {element.new_length}")
    mapper = OffsetMapper(element.equivalences, element.old_length, element.new_length)
    deltas = array("i", element.reference_deltas)
    next_delta = 0
    new_groups = new_dis.groups()
    pools: dict[int, list] = {}
    for group in old_dis.groups():
        pools.setdefault(group.pool, []).append(group)
    try:
        for pool in sorted(pools):
            sub = pools[pool]
            old_targets: set[int] = set()
            for group in sub:
                old_targets.update(old_dis.all_refs(group)[1])
            targets = set(kernel.project_all(array("I", sorted(old_targets)), mapper.src, mapper.dst, mapper.end))
            targets.update(decode_targets(element, pool))
            pool_targets = array("I", sorted(targets))
            for group in sub:
                locs, old_of, runs = old_dis.refs_in_blocks(group, element.equivalences)
                next_delta = kernel.correct_group(
                    new_groups[group.type_tag].kind, new, element.new_offset, element.new_length, locs, old_of,
                    runs, mapper.src, mapper.dst, mapper.end, element.old_length, element.new_length,
                    pool_targets, deltas, next_delta, new_dis.units)
    except ValueError as exc:
        if isinstance(exc, ZucchiniError):
            raise
        raise ZucchiniError(f"{what}: {exc}") from None
    if next_delta != len(deltas):
        raise ZucchiniError(f"{what}: {len(deltas) - next_delta} reference deltas are left over after "
                            f"the {next_delta} references")
