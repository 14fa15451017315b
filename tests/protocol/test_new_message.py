"""new_message: a Request or Response built in one C call equals the one its constructor builds."""

from __future__ import annotations

from typing import NamedTuple

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dmuserd.daemon.dispatcher import Refused
from dmuserd.protocol import Flag, Request, RequestType, Response, ResponseType, new_message


def test_the_c_module_is_built():
    """The package is built with it (pyproject.toml ext-modules); a build without a compiler uses tuple.__new__."""
    from dmuserd.protocol import _records

    assert new_message is _records.new_message


@given(seq=st.integers(0, 2**64 - 1), kind=st.sampled_from(list(RequestType)), flags=st.integers(0, 2**20),
       sector=st.integers(0, 2**63), length=st.integers(0, 2**32),
       payload=st.one_of(st.none(), st.binary(max_size=64), st.binary(max_size=64).map(memoryview)))
def test_request_equals_its_constructors(seq, kind, flags, sector, length, payload):
    made = new_message(Request, seq, kind, Flag(flags), sector, length, payload)
    expected = Request(seq, kind, Flag(flags), sector, length, payload)
    assert type(made) is Request and made == expected and made.payload is payload
    assert (made.seq, made.type, made.flags, made.sector, made.len) == expected[:5]
    assert repr(made) == repr(expected) and hash(made[:5]) == hash(expected[:5])


def test_response_and_subclasses():
    data = [memoryview(b"x" * 8)]
    made = new_message(Response, 7, ResponseType.SUCCESS, data)
    assert type(made) is Response and made == Response(7, ResponseType.SUCCESS, data) and made.payload is data
    refused = new_message(Refused, 3, ResponseType.ERROR, None)
    assert type(refused) is Refused and refused == Refused(3, ResponseType.ERROR)


def test_other_classes_are_built_the_long_way():
    """A subclass with a __dict__, a plain tuple or a non-tuple class: tuple.__new__'s own answer or error."""

    class WithDict(Response):  # no __slots__: instances carry a __dict__
        pass

    made = new_message(WithDict, 1, ResponseType.ERROR, None)
    assert type(made) is WithDict and made == (1, ResponseType.ERROR, None)
    made.note = "kept"  # the instance has its dict
    assert made.note == "kept"
    assert new_message(tuple, 1, 2) == (1, 2) and type(new_message(tuple, 1, 2)) is tuple
    with pytest.raises(TypeError):
        new_message(int, 1)
    with pytest.raises(TypeError):
        new_message("Response", 1)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        new_message()  # type: ignore[call-arg]

    class Pair(NamedTuple):
        a: int
        b: int

    assert new_message(Pair, 1, 2) == Pair(1, 2) and new_message(Pair, 1, 2).b == 2
