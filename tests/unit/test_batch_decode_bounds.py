"""decode_batch builds only what the batch format allows, whatever a peer sends."""

from __future__ import annotations

import contextlib
import tracemalloc

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ringsync.errors import BadInputError, TooLargeError
from ringsync.protocol.batch import Column, TableSchema, build_batch, decode_batch, encode_batch

MIB = 1024 * 1024


def array_of_empty_maps(nbytes: int) -> bytes:
    """The memory bomb: one byte on the wire per dict built by a plain unpackb."""
    count = nbytes - 5
    return b"\xdd" + count.to_bytes(4, "big") + b"\x80" * count


def peak_bytes_while_decoding(payload: bytes) -> int:
    tracemalloc.start()
    try:
        with pytest.raises(BadInputError):
            decode_batch(payload)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("payload", [
    array_of_empty_maps(4 * MIB),
    # the bomb in a field of a valid-looking header, and in a field the decoder skips
    msgpack.packb({"v": 2, "game_ids": [{}] * 50_000}),
    msgpack.packb({"v": 2, "future_field": [[{}] * 2_000] * 1_000}),
    msgpack.packb({"v": 2, "tables": [{"name": "games", "columns": [[{}] * 8] * 256}] * 64}),
], ids=["array_of_maps", "ids_are_maps", "skipped_field", "columns_are_maps"])
def test_a_memory_bomb_is_refused_without_building_it(payload: bytes) -> None:
    # A plain msgpack.unpackb builds one dict per 0x80 byte (about 64 bytes each):
    # 4 MiB of them is over 250 MB. The decoder builds nothing and at most buffers
    # the payload once.
    assert peak_bytes_while_decoding(payload) < len(payload) + 2 * MIB


@pytest.mark.parametrize(("doc", "message"), [
    ([], "batch payload must be a map, got an array"),
    ({"v": 2, "source_node": ["x"]}, "batch field 'source_node' must be a scalar, got an array"),
    ({"v": 2, "source_node": "x" * 5000}, "exceeds max_str_len"),
    ({1: 2}, "field names must be strings"),
    ({"v": 3, "tables": {}}, "unsupported batch version 3"),
    ({"v": 2, "tables": [{"name": "games"}] * 65}, "has 65 entries, limit is 64"),
    ({"v": 2, "tables": [{"columns": [[1] * 9]}]}, "a column has 9 entries, limit is 8"),
])
def test_a_malformed_header_names_the_field(doc: object, message: str) -> None:
    with pytest.raises(BadInputError, match=message):
        decode_batch(msgpack.packb(doc, use_bin_type=True))


def test_duplicate_fields_and_trailing_bytes_are_refused() -> None:
    one = msgpack.packb({"v": 2}, use_bin_type=True)
    twice = b"\x82" + one[1:] + one[1:]
    with pytest.raises(BadInputError, match="'v' appears twice"):
        decode_batch(twice)
    with pytest.raises(BadInputError, match="1 bytes after its end"):
        decode_batch(one + b"\x00")
    with pytest.raises(BadInputError, match="truncated"):
        decode_batch(b"")


def test_too_many_game_ids_or_too_large_an_image_is_too_large_before_reading_them() -> None:
    ids = b"\x82\xa1v\x02\xa8game_ids\xdd" + (10**9).to_bytes(4, "big")
    with pytest.raises(TooLargeError, match="1000000000 entries, limit is 100000"):
        decode_batch(ids)
    image = b"\x82\xa1v\x02\xa5image\xc6" + (2**31).to_bytes(4, "big")
    with pytest.raises(TooLargeError, match="batch image has 2147483648 bytes"):
        decode_batch(image)


# -- whatever the bytes, the decoder returns a batch or raises BadInputError ---------------

_VALID = encode_batch(build_batch(
    "node-a", "hex8_2p", ("g1", "g2"),
    [(TableSchema("games", (Column("game_id", "TEXT", 1, True), Column("n", "INTEGER", 0, False))),
      [("g1", 1), ("g2", 2)])]))

_msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | st.text(max_size=20) | st.binary(max_size=40) | st.sampled_from(
        ["v", "source_node", "config_key", "game_ids", "tables", "image", "name", "columns"]),
    lambda inner: st.lists(inner, max_size=6)
    | st.dictionaries(st.text(max_size=10) | st.sampled_from(["v", "tables", "name", "columns"]),
                      inner, max_size=6),
    max_leaves=30,
)


def decodes_or_refuses(payload: bytes) -> None:
    """Anything but a batch or a BadInputError (TooLargeError, UnsafePathError) fails."""
    with contextlib.suppress(BadInputError):
        decode_batch(payload)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes(payload: bytes) -> None:
    decodes_or_refuses(payload)


@settings(max_examples=100, deadline=None)
@given(_msgpack_values)
def test_arbitrary_msgpack(value: object) -> None:
    decodes_or_refuses(msgpack.packb(value, use_bin_type=True))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(_VALID) - 1), st.integers(0, 255)), max_size=4),
       st.integers(0, len(_VALID)))
def test_mutated_valid_batch(flips: list[tuple[int, int]], cut: int) -> None:
    payload = bytearray(_VALID)
    for at, value in flips:
        payload[at] = value
    decodes_or_refuses(bytes(payload[:cut]))


def _batch_with_image_of(nbytes: int) -> bytes:
    blob = bytes(nbytes)
    return encode_batch(build_batch(
        "node-a", "hex8_2p", ("g1",),
        [(TableSchema("games", (Column("game_id", "TEXT", 1, True), Column("b", "BLOB", 0, False))),
          [("g1", blob)])]))


def test_a_large_valid_batch_is_decoded_with_one_copy_of_its_image() -> None:
    payload = _batch_with_image_of(8 * MIB)
    tracemalloc.start()
    try:
        batch = decode_batch(payload)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(batch.image) > 8 * MIB
    assert peak < len(batch.image) + 2 * MIB  # the image, not also the unpacker's buffer of it


def test_an_image_that_is_not_the_last_field_is_decoded_too() -> None:
    doc = msgpack.unpackb(_batch_with_image_of(1000), raw=False)
    image = doc.pop("image")
    reordered = {"image": image, **doc}
    assert decode_batch(msgpack.packb(reordered, use_bin_type=True)).image == image
