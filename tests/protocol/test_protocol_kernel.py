"""KernelTarget / Channel: the model of dm-user.c, one behaviour per test.

Bytes written to the channel are packed here with :mod:`struct` from the
spec's offsets (``protocol_testlib.pack``), not with the library's encoder.
"""

from __future__ import annotations

import errno

import pytest

from dmuserd.protocol import (
    FORWARDED_FLAGS,
    HEADER_SIZE,
    MESSAGE_POOL_RESERVE,
    WOULD_BLOCK,
    Bio,
    BioState,
    Flag,
    KernelError,
    KernelTarget,
    RequestType,
    ResponseType,
)
from protocol_testlib import pack, pattern, read_message, unpack

READ, WRITE, FLUSH = RequestType.READ, RequestType.WRITE, RequestType.FLUSH
SUCCESS, ERROR, UNSUPPORTED = ResponseType.SUCCESS, ResponseType.ERROR, ResponseType.UNSUPPORTED


def read_bio(sector=0, length=4096, **kw) -> Bio:
    return Bio(READ, sector, length, **kw)


def write_bio(sector=0, length=4096, salt=0, **kw) -> Bio:
    return Bio(WRITE, sector, length, data=pattern(length, salt), **kw)


def ok(seq: int, payload: bytes = b"") -> bytes:
    return pack(seq, SUCCESS) + payload


def raises_errno(code):
    class _Ctx:
        def __enter__(self):
            self._cm = pytest.raises(KernelError)
            self.info = self._cm.__enter__()
            return self.info

        def __exit__(self, *exc):
            handled = self._cm.__exit__(*exc)
            assert self.info.value.errno == code, f"errno {self.info.value.errno}, wanted {code}"
            return handled

    return _Ctx()


@pytest.fixture
def target():
    return KernelTarget()


@pytest.fixture
def chan(target):
    return target.open_channel()


# -- reads: per-channel position, short reads ----------------------------------------


def test_read_returns_header_fields_per_spec(target, chan):
    bio = target.submit(Bio(READ, 77, 8192, flags=int(Flag.SYNC | Flag.FUA)), now=0)
    raw = chan.read(4096)
    assert raw == pack(0, 0, 0x208, 77, 8192)
    assert bio.seq == 0 and bio.state is BioState.AWAITING


def test_short_reads_header_in_pieces(target, chan):
    target.submit(read_bio(sector=5, length=512), now=0)
    pieces = [chan.read(n) for n in (1, 7, 13, 19)]
    assert [len(x) for x in pieces] == [1, 7, 13, 19]
    assert b"".join(pieces) == pack(0, READ, 0, 5, 512)
    assert chan.read(100) is WOULD_BLOCK  # a READ message is just the header


def test_short_reads_write_payload_in_pieces(target, chan):
    bio = target.submit(write_bio(length=2048, salt=9), now=0)
    assert chan.read(10) == pack(0, WRITE, 0, 0, 2048)[:10]
    assert len(chan.read(1000)) == 30  # the rest of the header, nothing more
    got = bytearray()
    for n in (1, 511, 3, 1000, 5000):
        got += chan.read(n)
    assert bytes(got) == bio.data
    assert bio.state is BioState.AWAITING


def test_read_never_returns_header_and_payload_together(target, chan):
    bio = target.submit(write_bio(length=4096, salt=2), now=0)
    assert len(chan.read(1 << 20)) == HEADER_SIZE
    assert chan.read(1 << 20) == bio.data


def test_read_never_crosses_into_next_message(target, chan):
    target.submit(read_bio(), now=0)
    target.submit(read_bio(sector=8), now=0)
    assert unpack(chan.read(1 << 20))[0] == 0
    assert unpack(chan.read(1 << 20))[0] == 1


def test_messages_go_out_in_seq_order(target, chan):
    bios = [target.submit(read_bio(sector=i), now=0) for i in range(5)]
    assert [b.seq for b in bios] == [0, 1, 2, 3, 4]
    assert [unpack(chan.read(40))[0] for _ in range(5)] == [0, 1, 2, 3, 4]


def test_read_with_nothing_queued_would_block(chan):
    assert chan.read(40) is WOULD_BLOCK


def test_message_taken_by_channel_at_first_read(target):
    first, second = target.open_channel(), target.open_channel()
    bio = target.submit(write_bio(length=512), now=0)
    assert len(first.read(1)) == 1
    assert bio.state is BioState.READING and bio.channel is first
    assert second.read(40) is WOULD_BLOCK  # not shared, not redelivered
    rest = first.read(100)
    assert len(rest) == 39


def test_zero_byte_read_takes_message(target):
    # dm-user.c takes the message before copying (zero) bytes.
    first, second = target.open_channel(), target.open_channel()
    bio = target.submit(read_bio(), now=0)
    assert first.read(0) == b""
    assert bio.channel is first and target.queued == 0
    assert second.read(40) is WOULD_BLOCK
    assert first.read(40) == pack(0, READ, 0, 0, 4096)


def test_readinto(target, chan):
    target.submit(read_bio(sector=3), now=0)
    buf = bytearray(64)
    assert chan.readinto(buf) == 40
    assert bytes(buf[:40]) == pack(0, READ, 0, 3, 4096)


def test_interleaved_reads_on_two_channels(target):
    a, b = target.open_channel(), target.open_channel()
    w0 = target.submit(write_bio(length=1024, salt=1), now=0)
    w1 = target.submit(write_bio(sector=8, length=1024, salt=2), now=0)
    ha, hb = a.read(25), b.read(25)
    ha += a.read(100)
    hb += b.read(100)
    assert unpack(ha) == (0, WRITE, 0, 0, 1024) and unpack(hb) == (1, WRITE, 0, 8, 1024)
    pa, pb = bytearray(), bytearray()
    while len(pa) < 1024 or len(pb) < 1024:
        pb += b.read(300) if len(pb) < 1024 else b""
        pa += a.read(200) if len(pa) < 1024 else b""
    assert bytes(pa) == w0.data and bytes(pb) == w1.data


# -- writes: responses -----------------------------------------------------------------


def test_success_response_completes_write(target, chan):
    bio = target.submit(write_bio(), now=0)
    read_message(chan)
    assert chan.write(ok(0)) == 40
    assert bio.done and bio.error == 0
    assert target.outstanding == 0


def test_response_header_and_read_payload_in_one_write(target, chan):
    bio = target.submit(read_bio(length=1024), now=0)
    read_message(chan)
    data = pattern(1024, 5)
    assert chan.write(ok(0, data)) == 1064
    assert bio.done and bio.error == 0 and bytes(bio.data) == data


def test_read_response_in_arbitrary_chunks(target, chan):
    bio = target.submit(read_bio(length=4096), now=0)
    read_message(chan)
    raw = ok(0, pattern(4096, 6))
    cuts = [1, 38, 2, 500, 3000, 595]  # header in three pieces, the last with a payload byte
    assert sum(cuts) == len(raw)
    pos = 0
    for n in cuts:
        assert not bio.done
        assert chan.write(raw[pos : pos + n]) == n
        pos += n
    assert bio.done and bio.error == 0 and bytes(bio.data) == pattern(4096, 6)


def test_response_header_in_pieces_then_nothing_until_complete(target, chan):
    bio = target.submit(Bio(FLUSH, 0, 0), now=0)
    read_message(chan)
    raw = ok(0)
    for i in range(39):
        assert chan.write(raw[i : i + 1]) == 1
        assert not bio.done
    assert chan.write(raw[39:]) == 1
    assert bio.done and bio.error == 0


def test_response_fields_other_than_seq_and_type_are_ignored(target, chan):
    bio = target.submit(write_bio(sector=8), now=0)
    read_message(chan)
    assert chan.write(pack(0, SUCCESS, 0xDEAD, 12345, 99)) == 40
    assert bio.done and bio.error == 0


def test_one_response_per_write_call(target, chan):
    a = target.submit(Bio(FLUSH, 0, 0), now=0)
    b = target.submit(Bio(FLUSH, 0, 0), now=0)
    read_message(chan), read_message(chan)
    both = ok(0) + ok(1)
    assert chan.write(both) == 40  # short write: the daemon writes the rest again
    assert a.done and not b.done
    assert chan.write(both[40:]) == 40
    assert b.done


def test_read_response_extra_bytes_not_taken(target, chan):
    bio = target.submit(read_bio(length=512), now=0)
    read_message(chan)
    assert chan.write(ok(0, pattern(512)) + b"trailing") == 552
    assert bio.done


def test_write_all_continues_after_short_writes(target, chan):
    bios = [target.submit(read_bio(sector=i, length=512), now=0) for i in range(3)]
    for _ in bios:
        read_message(chan)
    chan.write_all(b"".join(ok(b.seq, pattern(512, b.seq)) for b in bios))
    assert all(b.done and bytes(b.data) == pattern(512, b.seq) for b in bios)


def test_out_of_order_completion(target, chan):
    bios = [target.submit(read_bio(sector=i, length=512), now=0) for i in range(4)]
    for _ in bios:
        read_message(chan)
    done = []
    for b in bios:
        b.on_complete = done.append
    for seq in (2, 0, 3, 1):
        chan.write_all(ok(seq, pattern(512, seq)))
    assert [b.seq for b in done] == [2, 0, 3, 1]
    assert all(bytes(b.data) == pattern(512, b.seq) and b.error == 0 for b in bios)


def test_answer_on_another_channel_is_unknown_seq(target):
    a, b = target.open_channel(), target.open_channel()
    bio = target.submit(Bio(FLUSH, 0, 0), now=0)
    read_message(a)
    assert b.write(ok(0)) == 40  # accepted once...
    with raises_errno(errno.EINVAL):
        b.write(ok(0))
    assert not bio.done
    assert a.write(ok(0)) == 40  # the owner can still answer
    assert bio.done and bio.error == 0


@pytest.mark.parametrize("rtype", [ERROR, UNSUPPORTED, 3, 1 << 63], ids=["ERROR", "UNSUPPORTED", "3", "2**63"])
@pytest.mark.parametrize("kind", [READ, WRITE, FLUSH], ids=lambda t: t.name)
def test_error_response_fails_bio_with_eio(target, chan, rtype, kind):
    data = pattern(1024) if kind is WRITE else None
    bio = target.submit(Bio(kind, 0, 1024 if kind is not FLUSH else 0, data=data), now=0)
    read_message(chan)
    assert chan.write(pack(0, rtype, 0, 0, 1024)) == 40
    assert bio.done and bio.error == errno.EIO
    assert target.outstanding == 0


def test_error_response_with_payload_is_short_write(target, chan):
    bio = target.submit(read_bio(length=512), now=0)
    read_message(chan)
    assert chan.write(pack(0, ERROR) + pattern(512)) == 40  # no payload follows an error
    assert bio.done and bio.error == errno.EIO
    assert bio.data is None  # nothing of the payload reached the BIO


def test_error_response_payload_written_again_poisons_channel(target, chan):
    # A daemon that blindly re-writes the "rest" makes it the next header.
    target.submit(read_bio(length=512), now=0)
    read_message(chan)
    with raises_errno(errno.EINVAL):
        chan.write_all(pack(0, ERROR) + pattern(512))


# -- bad seq, zero-length writes ---------------------------------------------------------------


def test_bad_seq_accepted_once_then_einval_forever(target, chan):
    bio = target.submit(Bio(FLUSH, 0, 0), now=0)
    read_message(chan)
    assert chan.write(ok(1234)) == 40
    for raw in (ok(0), b"x", ok(1234)):
        with raises_errno(errno.EINVAL):
            chan.write(raw)
    assert not bio.done  # hangs until the channel closes...
    chan.close()
    assert bio.done and bio.error == errno.EIO  # ...then fails


def test_bad_seq_only_the_header_is_taken(target, chan):
    target.submit(read_bio(length=512), now=0)
    read_message(chan)
    assert chan.write(ok(77, pattern(512))) == 40


def test_bad_seq_in_header_pieces(target, chan):
    target.submit(Bio(FLUSH, 0, 0), now=0)
    read_message(chan)
    raw = ok(5)
    assert chan.write(raw[:30]) == 30
    assert chan.write(raw[30:]) == 10
    with raises_errno(errno.EINVAL):
        chan.write(ok(0))


def test_reads_still_work_after_write_poisoned(target, chan):
    target.submit(Bio(FLUSH, 0, 0), now=0)
    read_message(chan)
    chan.write(ok(9))
    target.submit(read_bio(sector=1), now=0)
    assert unpack(chan.read(40))[0] == 1


def test_responding_to_write_not_yet_fully_read_einval(target, chan):
    bio = target.submit(write_bio(length=1024), now=0)
    chan.read(40)
    chan.read(512)  # half the payload: not answerable yet
    assert chan.write(ok(0)) == 40
    with raises_errno(errno.EINVAL):
        chan.write(ok(0))
    assert not bio.done
    chan.read(512)  # reads go on, but the answer can never be accepted
    with raises_errno(errno.EINVAL):
        chan.write(ok(0))
    chan.close()
    assert bio.error == errno.EIO


def test_responding_to_header_only_partly_read_einval(target, chan):
    bio = target.submit(Bio(FLUSH, 0, 0), now=0)
    chan.read(39)
    assert chan.write(ok(0)) == 40
    chan.read(1)
    with raises_errno(errno.EINVAL):
        chan.write(ok(0))
    assert not bio.done


def test_zero_length_write_when_header_due_poisons(target, chan):
    bio = target.submit(Bio(FLUSH, 0, 0), now=0)
    read_message(chan)
    assert chan.write(b"") == 0  # dm-user.c returns 0 and sets the error
    with raises_errno(errno.EINVAL):
        chan.write(ok(0))
    assert not bio.done


def test_zero_length_write_mid_header_poisons(target, chan):
    target.submit(Bio(FLUSH, 0, 0), now=0)
    read_message(chan)
    chan.write(ok(0)[:20])
    assert chan.write(b"") == 0
    with raises_errno(errno.EINVAL):
        chan.write(ok(0)[20:])


def test_zero_length_write_during_read_payload_is_harmless(target, chan):
    bio = target.submit(read_bio(length=512), now=0)
    read_message(chan)
    assert chan.write(ok(0)) == 40
    assert chan.write(b"") == 0
    assert chan.write(pattern(512)) == 512
    assert bio.done and bio.error == 0


# -- no cap on outstanding messages (the mempool is a reserve) ------------------------------------


def test_every_bio_becomes_a_message_however_many_are_outstanding(target, chan):
    n = 3 * MESSAGE_POOL_RESERVE + 5
    bios = [target.submit(read_bio(sector=i, length=512), now=0) for i in range(n)]
    assert target.outstanding == n and target.queued == n
    assert all(b.state is BioState.QUEUED for b in bios)
    seqs = [unpack(chan.read(40))[0] for _ in range(n)]  # all taken before any answer
    assert seqs == list(range(n))
    assert chan.read(40) is WOULD_BLOCK
    for seq in reversed(seqs):
        chan.write_all(ok(seq, pattern(512, seq & 0xFF)))
    assert all(b.done and b.error == 0 and bytes(b.data) == pattern(512, b.seq & 0xFF) for b in bios)
    assert target.outstanding == 0


def test_error_completion_frees_the_message(target, chan):
    bio = target.submit(Bio(FLUSH, 0, 0), now=0)
    read_message(chan)
    chan.write(pack(0, ERROR))
    assert bio.error == errno.EIO and target.outstanding == 0


def test_closing_last_channel_with_many_queued_does_not_recurse(target, chan):
    bios = [target.submit(read_bio(sector=i, length=512), now=0) for i in range(5000)]
    chan.close()
    assert all(b.done and b.error == errno.EIO for b in bios)
    assert target.outstanding == 0 and target.queued == 0


# -- closing a channel -------------------------------------------------------------------------------


def test_close_fails_awaiting_messages_with_eio(target, chan):
    bios = [target.submit(read_bio(sector=i), now=0) for i in range(3)]
    for _ in bios:
        read_message(chan)
    assert chan.awaiting == 3
    chan.close()
    assert all(b.done and b.error == errno.EIO for b in bios)
    assert target.outstanding == 0


def test_close_fails_partly_read_message(target):
    keeper, chan = target.open_channel(), target.open_channel()
    bio = target.submit(write_bio(length=1024), now=0)
    chan.read(40)
    chan.read(100)
    chan.close()
    assert bio.done and bio.error == errno.EIO
    assert keeper.read(40) is WOULD_BLOCK  # not redelivered


def test_close_fails_partly_written_response(target):
    _keeper, chan = target.open_channel(), target.open_channel()  # the keeper: a channel stays open
    bio = target.submit(read_bio(length=1024), now=0)
    read_message(chan)
    chan.write(ok(0, pattern(1024))[:600])
    chan.close()
    assert bio.done and bio.error == errno.EIO


def test_close_fails_message_whose_response_header_is_partly_written(target):
    _keeper, chan = target.open_channel(), target.open_channel()  # the keeper: a channel stays open
    bio = target.submit(Bio(FLUSH, 0, 0), now=0)
    read_message(chan)
    chan.write(ok(0)[:20])
    chan.close()
    assert bio.done and bio.error == errno.EIO


def test_close_leaves_other_channels_and_queue_alone(target):
    a, b = target.open_channel(), target.open_channel()
    mine = target.submit(read_bio(), now=0)
    theirs = target.submit(read_bio(sector=8), now=0)
    queued = target.submit(read_bio(sector=16), now=0)
    read_message(a), read_message(b)
    a.close()
    assert mine.error == errno.EIO
    assert not theirs.done and not queued.done and queued.state is BioState.QUEUED
    b.write_all(ok(1, pattern(4096)))
    assert theirs.error == 0
    assert unpack(b.read(40))[0] == 2


def test_close_is_idempotent_and_closed_channel_ebadf(target, chan):
    chan.close()
    chan.close()
    with raises_errno(errno.EBADF):
        chan.read(40)
    with raises_errno(errno.EBADF):
        chan.write(ok(0))


# -- no daemon yet: the timeout -------------------------------------------------------------------------


def test_timeout_before_attach_fails_after_deadline(target):
    bio = target.submit(read_bio(), now=100.0)
    assert bio.deadline == pytest.approx(104.0)
    assert target.next_deadline() == pytest.approx(104.0)
    assert target.advance(103.999) == []
    assert not bio.done
    assert target.advance(104.0) == [bio]
    assert bio.done and bio.error == errno.EIO
    assert target.outstanding == 0 and target.next_deadline() is None


def test_timeout_each_bio_has_its_own_deadline(target):
    early = target.submit(read_bio(), now=0.0)
    late = target.submit(read_bio(), now=3.0)
    assert target.advance(4.5) == [early]
    assert not late.done
    assert target.advance(7.0) == [late]


def test_custom_daemon_timeout():
    target = KernelTarget(daemon_timeout=0.5)
    bio = target.submit(read_bio(), now=10.0)
    target.advance(10.49)
    assert not bio.done
    target.advance(10.5)
    assert bio.error == errno.EIO


def test_attach_within_timeout_serves_queued_io(target):
    bios = [target.submit(read_bio(sector=i, length=512), now=0.0) for i in range(3)]
    chan = target.open_channel()  # at t=2
    for b in bios:
        assert unpack(read_message(chan))[0] == b.seq
    assert target.next_deadline() is None  # reading cancels the timer
    assert target.advance(10.0) == []
    for b in bios:
        chan.write_all(ok(b.seq, pattern(512, b.seq)))
    assert all(b.error == 0 and bytes(b.data) == pattern(512, b.seq) for b in bios)


def test_channel_present_at_deadline_keeps_io_queued(target):
    bio = target.submit(read_bio(), now=0.0)
    chan = target.open_channel()
    assert target.advance(5.0) == []
    assert not bio.done and bio.state is BioState.QUEUED
    read_message(chan)
    chan.write_all(ok(0, pattern(4096)))
    assert bio.error == 0


def test_timer_pending_survives_attach_and_detach_until_deadline(target):
    bio = target.submit(read_bio(), now=0.0)
    target.open_channel().close()  # a daemon came and went without reading
    assert target.daemon_terminated
    assert not bio.done  # its timer was armed: it waits for the deadline
    chan = target.open_channel()  # another daemon, in time
    read_message(chan)
    chan.write_all(ok(0, pattern(4096)))
    assert bio.error == 0


def test_timer_pending_fails_at_deadline_after_detach(target):
    bio = target.submit(read_bio(), now=0.0)
    target.open_channel().close()
    assert target.advance(3.9) == [] and not bio.done
    assert target.advance(4.0) == [bio] and bio.error == errno.EIO


def test_spent_timer_message_not_failed_on_last_detach(target):
    # dm-user.c: the timer fired while a daemon was attached (so it did
    # nothing), ``delayed`` stays set, and target_put() does not re-arm it when
    # the last channel closes: the message stays queued.
    bio = target.submit(read_bio(), now=0.0)
    chan = target.open_channel()
    target.advance(5.0)
    chan.close()
    assert not bio.done and bio.state is BioState.QUEUED
    assert target.advance(100.0) == [] and target.next_deadline() is None  # not re-armed
    late = target.open_channel()  # a new daemon can still serve it
    read_message(late)
    late.write_all(ok(0, pattern(4096)))
    assert bio.error == 0


def test_killed_at_submit_no_timer_no_seq(target):
    bio = target.submit(Bio(RequestType.ZONE_OPEN, 0, 0), now=0.0)
    assert bio.done and bio.error == errno.EIO and bio.seq is None
    assert target.next_deadline() is None and target.next_seq == 0


# -- the daemon went away ----------------------------------------------------------------------------------


def test_last_detach_fails_queued_at_once(target):
    chan = target.open_channel()
    queued = [target.submit(read_bio(sector=i), now=0.0) for i in range(3)]
    assert all(b.deadline is None for b in queued)
    chan.close()
    assert target.daemon_terminated
    assert all(b.done and b.error == errno.EIO for b in queued)


def test_immediate_failure_after_last_detach(target):
    target.open_channel().close()
    bio = target.submit(read_bio(), now=0.0)
    assert bio.done and bio.error == errno.EIO
    assert bio.seq == 0  # mapped, then failed by the zero-delay timer
    assert target.outstanding == 0


def test_daemon_terminated_is_sticky_but_new_channel_serves(target):
    target.open_channel().close()
    chan = target.open_channel()
    assert target.daemon_terminated
    bio = target.submit(Bio(FLUSH, 0, 0), now=0.0)
    read_message(chan)
    chan.write(ok(bio.seq))
    assert bio.error == 0
    chan.close()
    assert target.submit(Bio(FLUSH, 0, 0), now=1.0).error == errno.EIO


def test_not_last_detach_keeps_queue(target):
    a, b = target.open_channel(), target.open_channel()
    bio = target.submit(read_bio(), now=0.0)
    a.close()
    assert not target.daemon_terminated and not bio.done
    read_message(b)


def test_everything_queued_fails_on_last_detach(target):
    chan = target.open_channel()
    bios = [target.submit(Bio(FLUSH, 0, 0), now=0.0) for _ in range(6)]
    read_message(chan)
    chan.close()
    assert all(b.done and b.error == errno.EIO for b in bios)


# -- destroy ----------------------------------------------------------------------------------------------------


def test_enotblk_after_destroy_sticky(target, chan):
    target.destroy(now=0.0)
    with raises_errno(errno.ENOTBLK):
        chan.read(40)
    with raises_errno(errno.ENOTBLK):
        chan.read(40)
    with raises_errno(errno.ENOTBLK):
        chan.read(0)


def test_destroy_wakes_reader(target, chan):
    calls = []
    target.on_queue = lambda: calls.append(1)
    target.destroy(now=0.0)
    assert calls


def test_destroy_lets_partly_read_message_finish(target, chan):
    bio = target.submit(write_bio(length=512), now=0.0)
    chan.read(40)
    target.destroy(now=0.0)
    assert chan.read(1000) == bio.data  # the current message continues
    assert chan.write(ok(0)) == 40  # and answers are still taken
    assert bio.error == 0
    with raises_errno(errno.ENOTBLK):
        chan.read(40)


def test_destroy_without_channels_fails_queued(target):
    bios = [target.submit(read_bio(sector=i), now=0.0) for i in range(3)]
    target.destroy(now=1.0)
    assert all(b.done and b.error == errno.EIO for b in bios)
    assert target.next_deadline() is None


def test_destroy_then_last_close_fails_queued_and_owned(target):
    a, b = target.open_channel(), target.open_channel()
    owned = target.submit(read_bio(), now=0.0)
    queued = target.submit(read_bio(sector=8), now=0.0)
    read_message(a)
    target.destroy(now=0.0)
    assert not queued.done  # two channels remain
    b.close()  # dm-user.c counts references: one channel left is "no daemon"
    assert queued.done and queued.error == errno.EIO
    assert not owned.done
    a.close()
    assert owned.error == errno.EIO


def test_destroy_with_one_channel_fails_queued_at_once(target, chan):
    # user_dtr() drops DM's reference; with a single channel left
    # is_user_space_thread_present() is false, so queued messages get a
    # zero-delay timer and fail (nothing could read them anyway: ENOTBLK).
    bio = target.submit(read_bio(), now=0.0)
    target.destroy(now=0.0)
    assert bio.done and bio.error == errno.EIO


def test_destroy_fails_everything_queued(target):
    bios = [target.submit(Bio(FLUSH, 0, 0), now=0.0) for _ in range(3)]
    target.destroy(now=0.0)
    assert all(b.error == errno.EIO for b in bios)


def test_submit_after_destroy_fails_eio(target):
    target.destroy(now=0.0)
    assert target.submit(read_bio(), now=0.0).error == errno.EIO


def test_open_after_destroy_enoent(target):
    target.destroy(now=0.0)
    with raises_errno(errno.ENOENT):
        target.open_channel()


def test_destroy_twice_is_harmless(target, chan):
    target.destroy(now=0.0)
    target.destroy(now=1.0)
    assert target.destroyed


# -- what never reaches user space -------------------------------------------------------------------------


ZONE_TYPES = [t for t in RequestType if t.name.startswith("ZONE_")]


@pytest.mark.parametrize("kind", ZONE_TYPES, ids=lambda t: t.name)
def test_zone_types_killed_at_submit(target, chan, kind):
    bio = target.submit(Bio(kind, 0, 4096), now=0.0)
    assert bio.done and bio.error == errno.EIO
    assert chan.read(40) is WOULD_BLOCK
    assert target.outstanding == 0


@pytest.mark.parametrize("flags", [0x80000, 1 << 63, 0x8 | 0x100000], ids=hex)
def test_unknown_flags_killed_at_submit(target, chan, flags):
    bio = target.submit(read_bio(flags=flags), now=0.0)
    assert bio.done and bio.error == errno.EIO
    assert chan.read(40) is WOULD_BLOCK


UNMAPPED_FLAGS = [Flag.CGROUP_PUNT, Flag.HIPRI, Flag.DRV, Flag.SWAP]


@pytest.mark.parametrize("flag", UNMAPPED_FLAGS, ids=lambda f: f.name)
@pytest.mark.parametrize("make", [read_bio, write_bio], ids=["read", "write"])
def test_uapi_flags_the_kernel_does_not_map_are_killed(target, flag, make):
    # bio_flags_to_user_flags() maps 15 flags; a BIO with any other is
    # DM_MAPIO_KILL: no message, no seq, no timer, even with no daemon.
    bio = target.submit(make(flags=int(flag | Flag.SYNC)), now=0.0)
    assert bio.done and bio.error == errno.EIO and bio.seq is None
    assert target.next_seq == 0 and target.outstanding == 0 and target.next_deadline() is None
    assert target.open_channel().read(40) is WOULD_BLOCK


@pytest.mark.parametrize(
    "kind",
    [RequestType.FLUSH, RequestType.DISCARD, RequestType.SECURE_ERASE, RequestType.WRITE_SAME, RequestType.WRITE_ZEROES],
    ids=lambda t: t.name,
)
def test_other_forwarded_types_are_bare_headers(target, chan, kind):
    bio = target.submit(Bio(kind, 16, 8192), now=0.0)
    assert chan.read(1 << 20) == pack(0, kind, 0, 16, 8192)
    assert chan.read(40) is WOULD_BLOCK  # no payload either way
    assert chan.write(ok(0) + b"extra") == 40
    assert bio.error == 0


def test_flush_as_write_preflush_len0(target, chan):
    bio = target.submit(Bio(WRITE, 0, 0, flags=int(Flag.PREFLUSH), data=b""), now=0.0)
    assert chan.read(1 << 20) == pack(0, WRITE, 0x400, 0, 0)
    assert chan.write(ok(0)) == 40
    assert bio.error == 0


def test_every_mapped_flag_forwarded(target, chan):
    assert FORWARDED_FLAGS == 0x3FFF | int(Flag.NOUNMAP)  # the first 14 and NOUNMAP
    target.submit(read_bio(flags=FORWARDED_FLAGS), now=0.0)
    assert unpack(chan.read(40))[2] == FORWARDED_FLAGS


# -- misuse of the model, callbacks ---------------------------------------------------------------------------


def test_write_bio_needs_data(target):
    with pytest.raises(ValueError):
        target.submit(Bio(WRITE, 0, 512), now=0.0)
    with pytest.raises(ValueError):
        target.submit(Bio(WRITE, 0, 512, data=b"short"), now=0.0)


def test_read_bio_data_must_fit(target):
    with pytest.raises(ValueError):
        target.submit(Bio(READ, 0, 512, data=bytearray(100)), now=0.0)
    with pytest.raises(ValueError):
        target.submit(Bio(READ, 0, 512, data=bytes(512)), now=0.0)  # read-only
    buf = bytearray(512)
    bio = target.submit(Bio(READ, 0, 512, data=buf), now=0.0)
    assert bio.data is buf


def test_on_complete_called_exactly_once(target, chan):
    calls = []
    bio = target.submit(read_bio(length=512, on_complete=calls.append), now=0.0)
    read_message(chan)
    chan.write_all(ok(0, pattern(512)))
    chan.close()
    target.destroy(now=0.0)
    assert calls == [bio]


def test_on_queue_called_when_message_readable():
    calls = []
    target = KernelTarget(on_queue=lambda: calls.append(target.queued))
    target.submit(read_bio(), now=0.0)
    assert calls == [1]


def test_spent_timer_message_leaks_on_release_as_in_dm_user_c(target):
    # target_release(): cancel_delayed_work_sync() returns false for a
    # message whose timer already ran, so dm-user.c skips it: it never ends.
    bio = target.submit(read_bio(), now=0.0)
    chan = target.open_channel()
    target.advance(5.0)
    chan.close()
    target.destroy(now=6.0)
    assert not bio.done and bio.state is BioState.QUEUED
    fresh = target.submit(read_bio(), now=6.0)
    assert fresh.error == errno.EIO
