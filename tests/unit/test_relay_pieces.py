"""Untrusted relay lists and piece lists; relays added to fetch jobs; aria2 control files."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from ringsync.errors import BadInputError
from ringsync.files.kinds import FileKind
from ringsync.files.pieces import PIECE_BYTES, hash_pieces, parse_claims, piece_count, piece_span
from ringsync.files.plan import FetchJob, IndexEntry, Source
from ringsync.files.relay import Relay, parse_relays, with_relays
from ringsync.transport.aria2 import control_file_done

H1, H2 = "a" * 64, "b" * 64


def test_pieces_cover_the_file_and_hash_what_they_cover(tmp_path: Path) -> None:
    size = 2 * PIECE_BYTES + 5
    assert piece_count(size) == 3
    assert piece_count(0) == 1
    assert piece_span(2, size) == (2 * PIECE_BYTES, size)
    data = os.urandom(size)
    (tmp_path / "f").write_bytes(data)
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        whole, pieces = hash_pieces(fd, size)
    finally:
        os.close(fd)
    from blake3 import blake3
    assert whole == blake3(data).hexdigest()
    assert pieces[2] == blake3(data[2 * PIECE_BYTES:]).hexdigest()
    assert len(set(pieces)) == 3


@pytest.mark.parametrize(("data", "problem"), [
    ([], "not an object"),
    ({"hash": H2, "size": 10, "piece_bytes": PIECE_BYTES, "pieces": [H1]}, "other content"),
    ({"hash": H1, "size": 11, "piece_bytes": PIECE_BYTES, "pieces": [H1]}, "other content"),
    ({"hash": H1, "size": 10, "piece_bytes": 1024, "pieces": [H1]}, "pieces of 1024"),
    ({"hash": H1, "size": 10, "piece_bytes": PIECE_BYTES, "pieces": [H1, H1]}, "number of pieces"),
    ({"hash": H1, "size": 10, "piece_bytes": PIECE_BYTES, "pieces": ["x"]}, "not a hash"),
])
def test_a_bad_piece_list_is_refused(data: object, problem: str) -> None:
    with pytest.raises(BadInputError, match=problem):
        parse_claims(data, 10, H1)


def test_a_good_piece_list_is_read() -> None:
    assert parse_claims({"hash": H1, "size": 10, "piece_bytes": PIECE_BYTES, "pieces": [H2]},
                        10, H1) == [H2]


@pytest.mark.parametrize("data", [
    {"relays": "x"}, [], {"relays": [1]},
    {"relays": [{"kind": "games", "relpath": "a.pth", "hash": H1, "size": 1}]},
    {"relays": [{"kind": "models", "relpath": "../a.pth", "hash": H1, "size": 1}]},
    {"relays": [{"kind": "models", "relpath": "a.pth", "hash": "zz", "size": 1}]},
    {"relays": [{"kind": "models", "relpath": "a.pth", "hash": H1, "size": -1}]},
])
def test_a_bad_relay_list_is_refused(data: object) -> None:
    with pytest.raises(BadInputError):
        parse_relays("p", data)


def test_relays_are_added_to_the_jobs_for_their_content_only() -> None:
    entry = IndexEntry(FileKind.MODELS, "m.pth", 10, 1, H1)
    job = FetchJob(entry, (Source("holder", FileKind.MODELS, "m.pth"),))
    other = FetchJob(IndexEntry(FileKind.MODELS, "n.pth", 10, 1, H2), ())
    relays = {
        "r1": parse_relays("r1", {"relays": [{"kind": "models", "relpath": "x/m.pth", "hash": H1,
                                              "size": 10}]}),
        "holder": [Relay("holder", FileKind.MODELS, "m.pth", H1, 10)],  # holds it whole
        "liar": [Relay("liar", FileKind.MODELS, "m.pth", H1, 10)],
    }
    out = with_relays([job, other], relays, {H1: {"liar"}})
    assert out[0].relays == (Source("r1", FileKind.MODELS, "x/m.pth"),)
    assert out[0].sources == job.sources
    assert out[1] == other


def test_an_aria2_control_file_says_how_much_is_done(tmp_path: Path) -> None:
    control = tmp_path / "c.aria2"
    bitfield = bytes([0b11100000, 0b00000001])
    control.write_bytes(struct.pack(">HII", 1, 0, 0) + struct.pack(">IQQI", 1024, 16 * 1024, 0,
                                                                    len(bitfield)) + bitfield)
    assert control_file_done(control) == 4 * 1024
    control.write_bytes(b"\x00")
    assert control_file_done(control) == 0
    assert control_file_done(tmp_path / "missing") == 0
