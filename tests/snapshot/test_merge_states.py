"""The online merge's state machine: one table, illegal moves refused.

The table itself (every state, every event) and a real :class:`MergeControl`
over a small base + COW pair: requests the table refuses raise
:class:`MergeStateError` and leave the state as it was.
"""

from __future__ import annotations

import pytest
import trio

from merge_testlib import torture_cow
from dmuserd.snapshot.backend import SnapshotBackend
from dmuserd.snapshot.merge import MergeStateError
from dmuserd.snapshot.merge_control import TRANSITIONS, MergeEvent, MergeState, next_state

S, E = MergeState, MergeEvent

LEGAL = {
    (S.NOT_STARTED, E.START): S.MERGING,
    (S.MERGING, E.PAUSE): S.PAUSED,
    (S.MERGING, E.RESUME): S.MERGING,
    (S.MERGING, E.FINISH): S.MERGED,
    (S.MERGING, E.FAIL): S.FAILED,
    (S.PAUSED, E.PAUSE): S.PAUSED,
    (S.PAUSED, E.RESUME): S.MERGING,
    (S.PAUSED, E.FINISH): S.MERGED,
    (S.PAUSED, E.FAIL): S.FAILED,
    (S.FAILED, E.START): S.MERGING,
}


def test_the_table_covers_every_state():
    assert set(TRANSITIONS) == set(MergeState)
    assert {(s, e): n for s, moves in TRANSITIONS.items() for e, n in moves.items()} == LEGAL


@pytest.mark.parametrize("state", list(MergeState))
@pytest.mark.parametrize("event", list(MergeEvent))
def test_next_state(state, event):
    if (state, event) in LEGAL:
        assert next_state(state, event) is LEGAL[state, event]
    else:
        with pytest.raises(MergeStateError, match=f"is {state.value}: it cannot {event.value}"):
            next_state(state, event)


def test_merged_is_final():
    for event in MergeEvent:
        with pytest.raises(MergeStateError):
            next_state(S.MERGED, event)


def test_the_words_are_the_status_words():
    assert [s.value for s in MergeState] == ["not-started", "merging", "paused", "merged", "failed"]


async def test_requests_the_table_refuses(tmp_path):
    t = torture_cow(tmp_path, 41, nblocks=128)
    backend = SnapshotBackend(t["base"], t["cow"], offload="cpu")
    control = backend.merge
    assert control.state is S.NOT_STARTED
    for request in (control.pause, control.resume):
        with pytest.raises(MergeStateError, match=r"t\.cow: the merge is not-started"):
            request()
        assert control.state is S.NOT_STARTED
    assert control.describe()["state"] == "not-started"

    async with trio.open_nursery() as nursery:
        control.start(nursery)
        assert control.state is S.MERGING
        with pytest.raises(MergeStateError, match="cannot start"):
            control.start(nursery)
        control.pause()
        control.pause()  # a second pause changes nothing
        assert control.state is S.PAUSED
        with pytest.raises(MergeStateError, match="cannot start"):
            control.start(nursery)
        control.resume()
        control.resume()
        assert control.state is S.MERGING
    assert control.state is S.MERGED, control.error
    assert control.describe()["state"] == "merged"
    for request in (control.pause, control.resume):
        with pytest.raises(MergeStateError, match="the merge is merged"):
            request()
    with pytest.raises(MergeStateError, match="already merged"):
        control.check_startable()
    assert control.state is S.MERGED
    assert open(t["base"], "rb").read() == t["target_bytes"]
    await backend.close()
