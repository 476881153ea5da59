"""Chunking: frames fit the broker limit, reassembly in any order, bounded memory, integrity."""

from __future__ import annotations

import random

import pytest

from device_agent.errors import MalformedMessageError
from device_agent.protocol.chunking import (
    CHUNK_HEADER_BYTES,
    PUBLISH_OVERHEAD,
    PayloadTooLargeError,
    Reassembler,
    check_publish_size,
    frames_for_publish,
    is_chunk,
    parse_chunk,
    split_message,
)

BLOB = random.Random(0).randbytes(10_000)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _ids(start: int = 0):  # type: ignore[no-untyped-def]
    counter = iter(range(start, 1 << 30))
    return lambda n: next(counter).to_bytes(n, "big")


def test_check_publish_size_refuses_at_the_broker_limit() -> None:
    topic = "fedge/demo/dev/dev-1/up/update"
    limit = 1000
    fitting = limit - PUBLISH_OVERHEAD - len(topic)
    check_publish_size(fitting, limit, topic=topic)
    with pytest.raises(PayloadTooLargeError, match="resend it forever"):
        check_publish_size(fitting + 1, limit, topic=topic)


def test_chunking_frames_for_publish_leaves_small_messages_whole() -> None:
    assert frames_for_publish(b"small", broker_limit=1000, topic="t") == [b"small"]


def test_chunking_frames_for_publish_makes_every_frame_fit() -> None:
    topic = "fedge/demo/dev/dev-1/up/update"
    frames = frames_for_publish(BLOB, broker_limit=1500, topic=topic)
    assert len(frames) > 1 and all(is_chunk(f) for f in frames)
    for frame in frames:
        check_publish_size(len(frame), 1500, topic=topic)


def test_chunking_split_refuses_frames_too_small_for_the_header() -> None:
    with pytest.raises(ValueError):
        split_message(BLOB, max_frame_bytes=CHUNK_HEADER_BYTES)


def test_chunking_split_is_deterministic_with_injected_ids() -> None:
    assert split_message(BLOB, max_frame_bytes=900, random_bytes=_ids()) == split_message(BLOB, max_frame_bytes=900, random_bytes=_ids())


@pytest.mark.parametrize("seed", range(5))
def test_reassembler_rebuilds_message_from_shuffled_chunks(seed: int) -> None:
    frames = split_message(BLOB, max_frame_bytes=700)
    random.Random(seed).shuffle(frames)
    reassembler = Reassembler()
    results = [reassembler.add(frame, sender="dev-1") for frame in frames]
    assert results[-1] == BLOB and all(r is None for r in results[:-1])
    assert reassembler.in_flight == 0


def test_reassembler_handles_empty_and_single_chunk_messages() -> None:
    reassembler = Reassembler()
    assert reassembler.add(split_message(b"", max_frame_bytes=200)[0]) == b""
    assert reassembler.add(split_message(b"abc", max_frame_bytes=200)[0]) == b"abc"


def test_reassembler_tolerates_duplicate_chunks_and_late_duplicates() -> None:
    frames = split_message(BLOB, max_frame_bytes=2000)
    reassembler = Reassembler()
    assert reassembler.add(frames[0]) is None
    assert reassembler.add(frames[0]) is None
    outputs = [reassembler.add(f) for f in frames[1:]]
    assert outputs[-1] == BLOB
    assert reassembler.add(frames[2]) is None and reassembler.in_flight == 0


def test_reassembler_keeps_senders_apart() -> None:
    frames = split_message(BLOB, max_frame_bytes=2000, random_bytes=_ids())
    reassembler = Reassembler()
    for frame in frames[:-1]:
        reassembler.add(frame, sender="dev-1")
    assert reassembler.add(frames[-1], sender="dev-2") is None
    assert reassembler.add(frames[-1], sender="dev-1") == BLOB


def test_reassembler_missing_chunk_times_out() -> None:
    clock = FakeClock()
    reassembler = Reassembler(timeout_s=30, clock=clock)
    for frame in split_message(BLOB, max_frame_bytes=2000)[:-1]:
        assert reassembler.add(frame) is None
    assert reassembler.in_flight == 1
    clock.now += 29
    assert reassembler.expire() == 0
    clock.now += 2
    assert reassembler.expire() == 1 and reassembler.in_flight == 0 and reassembler.dropped == 1


def test_reassembler_detects_corrupted_chunk_data() -> None:
    frames = split_message(BLOB, max_frame_bytes=2000)
    damaged = bytearray(frames[1])
    damaged[-5] ^= 0x10
    frames[1] = bytes(damaged)
    reassembler = Reassembler()
    for frame in frames[:-1]:
        reassembler.add(frame)
    with pytest.raises(MalformedMessageError, match="SHA-256"):
        reassembler.add(frames[-1])
    assert reassembler.in_flight == 0


def test_reassembler_detects_wrong_total_length() -> None:
    frames = split_message(b"x" * 100, max_frame_bytes=CHUNK_HEADER_BYTES + 60)
    reassembler = Reassembler()
    reassembler.add(frames[0])
    with pytest.raises(MalformedMessageError):
        reassembler.add(frames[1][:-1])


def test_reassembler_rejects_conflicting_duplicate() -> None:
    frames = split_message(BLOB, max_frame_bytes=2000)
    reassembler = Reassembler()
    reassembler.add(frames[0])
    conflicting = frames[0][:-1] + bytes([frames[0][-1] ^ 1])
    with pytest.raises(MalformedMessageError, match="twice"):
        reassembler.add(conflicting)
    assert reassembler.in_flight == 0


def test_reassembler_rejects_chunk_inconsistent_with_its_message() -> None:
    frames = split_message(BLOB, max_frame_bytes=2000)
    reassembler = Reassembler()
    reassembler.add(frames[0])
    other_digest = bytearray(frames[1])
    other_digest[30] ^= 1  # inside the SHA-256 field
    with pytest.raises(MalformedMessageError, match="disagrees"):
        reassembler.add(bytes(other_digest))


def test_reassembler_refuses_oversized_messages() -> None:
    reassembler = Reassembler(max_total_bytes=5000)
    with pytest.raises(MalformedMessageError, match="limits"):
        reassembler.add(split_message(BLOB, max_frame_bytes=2000)[0])
    with pytest.raises(MalformedMessageError, match="limits"):
        Reassembler(max_chunks=3).add(split_message(BLOB, max_frame_bytes=2000)[0])


def test_reassembler_evicts_oldest_when_too_many_messages_in_flight() -> None:
    reassembler = Reassembler(max_messages=2)
    firsts = [split_message(BLOB, max_frame_bytes=2000, random_bytes=_ids(i)) for i in range(3)]
    for frames in firsts:
        reassembler.add(frames[0])
    assert reassembler.in_flight == 2 and reassembler.dropped == 1
    outputs = [reassembler.add(f) for f in firsts[2][1:]]
    assert outputs[-1] == BLOB


def test_reassembler_evicts_to_stay_within_byte_budget() -> None:
    reassembler = Reassembler(max_total_bytes=25_000)
    for i in range(3):
        reassembler.add(split_message(BLOB, max_frame_bytes=2000, random_bytes=_ids(i))[0])
    assert reassembler.reserved_bytes <= 25_000 and reassembler.in_flight == 2


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda f: b"FDGX" + f[4:], "magic"),
        (lambda f: f[:4] + b"\x09" + f[5:], "version"),
        (lambda f: f[:30], "truncated"),
        (lambda f: f[:21] + (7).to_bytes(4, "little") + (7).to_bytes(4, "little") + f[29:], "index"),
    ],
)
def test_chunking_parse_rejects_malformed_frames(mutate, match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(MalformedMessageError, match=match):
        parse_chunk(mutate(split_message(BLOB, max_frame_bytes=2000)[0]))


def test_reassembler_survives_random_corruption() -> None:
    rng = random.Random(9)
    frames = split_message(BLOB[:3000], max_frame_bytes=500)
    for _ in range(100):
        reassembler = Reassembler()
        victim = rng.randrange(len(frames))
        result = None
        try:
            for i, frame in enumerate(frames):
                mutated = bytearray(frame)
                if i == victim:
                    mutated[rng.randrange(len(mutated))] ^= 1 << rng.randrange(8)
                result = reassembler.add(bytes(mutated)) or result
        except MalformedMessageError:
            continue
        assert result is None or result == BLOB[:3000]
