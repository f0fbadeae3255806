"""A real `ringsync run` node against hostile or broken HTTP peers, over raw sockets.

Each test starts one node with its guards set small through the environment, attacks
it from 127.0.0.2 (loopback, but another address than the operator's 127.0.0.1), and
checks that it stays reachable, sheds and counts the attack, keeps its memory bounded
and logs no traceback.
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ringsync.localcluster import Cluster, Node, wait_until
from ringsync.node import NodeContext
from ringsync.protocol.batch import content_digest
from ringsync.transport.http import BATCH_CONTENT_TYPE, DIGEST_HEADER, GAMES_PATH
from tests.conftest import TOKEN

ATTACKER = "127.0.0.2"
MIB = 1024 * 1024


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[Callable[..., tuple[Cluster, Node]]]:
    clusters: list[Cluster] = []

    def start(**env: str) -> tuple[Cluster, Node]:
        cluster = Cluster(tmp_path, [("train-1", "gpu_training_primary")], sync_interval=60.0)
        clusters.append(cluster)
        cluster.nodes["train-1"].extra_env.update(env)
        return cluster, cluster.start("train-1")

    yield start
    for cluster in clusters:
        cluster.stop_all()


def connect(node: Node, source: str = ATTACKER, timeout: float = 10.0) -> socket.socket:
    sock = socket.socket()
    sock.settimeout(timeout)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", node.port))
    return sock


def exchange(node: Node, request: bytes, source: str = ATTACKER) -> bytes:
    """Send raw bytes, return everything the server answers until it closes."""
    with connect(node, source) as sock:
        sock.sendall(request)
        return read_to_close(sock)


def read_to_close(sock: socket.socket) -> bytes:
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    return received


def closed_by_server(sock: socket.socket) -> bool:
    """True once the server closed the connection (EOF or reset); waits up to the timeout."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def healthz(node: Node, source: str = "127.0.0.1") -> int:
    conn = http.client.HTTPConnection("127.0.0.1", node.port, timeout=10,
                                      source_address=(source, 0))
    try:
        conn.request("GET", "/healthz")
        return conn.getresponse().status
    finally:
        conn.close()


def metric(node: Node, name: str, **labels: str) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", node.port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples
               if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()))


def status_kb(node: Node, field: str) -> int:
    assert node.process is not None
    for line in Path(f"/proc/{node.process.pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/<pid>/status")


def peak_rss_mb(node: Node) -> float:
    return status_kb(node, "VmHWM") / 1024


def assert_log_clean(node: Node) -> None:
    text = node.log_path.read_text(errors="replace")
    assert "Traceback" not in text, node.log_tail(60)
    assert " ERROR " not in text, node.log_tail(60)


def upload_head(token: str, length: int, digest: str = "xxh3-128:" + "0" * 32) -> bytes:
    return (f"POST {GAMES_PATH} HTTP/1.1\r\nHost: node\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: {BATCH_CONTENT_TYPE}\r\n{DIGEST_HEADER}: {digest}\r\n"
            f"Content-Length: {length}\r\nConnection: close\r\n\r\n").encode()


# -- B1: idle and half-header connections (slowloris) --------------------------------------


def test_a_flood_of_idle_and_half_header_connections_is_shed_and_timed_out(
        start_node: Callable[..., tuple[Cluster, Node]]) -> None:
    _, node = start_node(RINGRIFT_HTTP_MAX_CONNECTIONS_PER_ADDRESS="40",
                         RINGRIFT_HTTP_HEADER_TIMEOUT="2", RINGRIFT_HTTP_IDLE_TIMEOUT="3")
    flood: list[socket.socket] = []
    try:
        for i in range(300):
            sock = connect(node)
            if i % 2:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: node\r\nX-Slow: ")
            flood.append(sock)
        # One address holds 40; everything else it opens is shed at once.
        wait_until(lambda: metric(node, "ringsync_connections_shed_total",
                                  reason="address_limit") == 260, 10, "260 connections shed")
        assert healthz(node) == 200  # the operator's address is not locked out
        # The 40 admitted ones never finished a header: closed after 2 s, counted.
        deadline = time.monotonic() + 15
        for sock in flood:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            assert closed_by_server(sock)
        assert metric(node, "ringsync_connections_shed_total", reason="header_timeout") == 40
        assert healthz(node, source=ATTACKER) == 200  # the address is served again
    finally:
        for sock in flood:
            sock.close()
    text = node.log_path.read_text(errors="replace")
    assert text.count("shedding connections: 127.0.0.2 over its limit") == 1  # rate-limited
    assert_log_clean(node)


def test_an_idle_keep_alive_connection_is_closed(
        start_node: Callable[..., tuple[Cluster, Node]]) -> None:
    _, node = start_node(RINGRIFT_HTTP_IDLE_TIMEOUT="1")
    with connect(node) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: node\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        # then half of a next request, never finished
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        assert closed_by_server(sock)
    assert_log_clean(node)


# -- B2: memory bomb with a valid token ----------------------------------------------------


def array_of_empty_maps(nbytes: int) -> bytes:
    count = nbytes - 5
    return b"\xdd" + count.to_bytes(4, "big") + b"\x80" * count


def test_a_msgpack_memory_bomb_with_a_valid_token_is_refused_in_bounded_memory(
        start_node: Callable[..., tuple[Cluster, Node]]) -> None:
    cluster, node = start_node()
    bomb = array_of_empty_maps(64 * MIB)
    head = upload_head(cluster.token, len(bomb), content_digest(bomb))
    answers: list[bytes] = []

    def attack() -> None:
        answers.append(exchange(node, head + bomb))

    attackers = [threading.Thread(target=attack) for _ in range(3)]
    for thread in attackers:
        thread.start()
    while any(t.is_alive() for t in attackers):
        assert healthz(node) == 200
        time.sleep(0.05)
    assert len(answers) == 3
    for answer in answers:
        assert answer.startswith(b"HTTP/1.1 400"), answer[:300]
        assert b"batch payload must be a map, got an array" in answer
    # Three 64 MiB bombs at once took 10 GB before; now their bodies (within the upload
    # budget, 4 x 64 MiB) and a copy each while the last chunk is joined: about 310 MB.
    assert peak_rss_mb(node) < 450
    assert_log_clean(node)


# -- B3: stalled and aborted uploads -------------------------------------------------------


def test_aborted_uploads_free_their_partial_bodies_and_log_no_traceback(
        start_node: Callable[..., tuple[Cluster, Node]]) -> None:
    cluster, node = start_node()
    head = upload_head(cluster.token, 60 * MIB)
    part = b"\0" * (4 * MIB)
    idle_rss_mb = status_kb(node, "VmRSS") / 1024
    for _ in range(80):
        with connect(node) as sock:
            sock.sendall(head + part)
        # closed mid-body, as a sender whose push timed out does
    wait_until(lambda: metric(node, "ringsync_uploads_dropped_total", reason="aborted") == 80,
               20, "80 aborted uploads counted")
    # Partial bodies lived on in traceback cycles before: RSS 50 -> 189 MB here (the
    # cyclic GC freed some). Now the node stays at its idle size.
    assert status_kb(node, "VmRSS") / 1024 < idle_rss_mb + 40
    assert metric(node, "ringsync_upload_bytes_in_flight") == 0
    assert healthz(node) == 200
    assert_log_clean(node)


def test_stalled_uploads_are_dropped_and_the_upload_budget_answers_503(
        start_node: Callable[..., tuple[Cluster, Node]]) -> None:
    cluster, node = start_node(RINGRIFT_MAX_BATCH_BYTES=str(MIB),
                               RINGRIFT_MAX_UPLOAD_BYTES_IN_FLIGHT=str(2 * MIB),
                               RINGRIFT_HTTP_BODY_TIMEOUT="2")
    head = upload_head(cluster.token, MIB)
    stalled = [connect(node, timeout=20) for _ in range(2)]
    try:
        for sock in stalled:
            sock.sendall(head + b"\0" * 1000)
        wait_until(lambda: metric(node, "ringsync_upload_bytes_in_flight") == 2 * MIB, 10,
                   "two uploads holding the budget")
        # The budget is held: a third upload is refused before its body is read.
        answer = exchange(node, head + b"\0" * MIB)
        assert answer.startswith(b"HTTP/1.1 503"), answer[:300]
        assert b"Retry-After: 5" in answer
        # No byte for 2 s: both stalled uploads are answered 408 and closed.
        for sock in stalled:
            answer = read_to_close(sock)
            assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
    finally:
        for sock in stalled:
            sock.close()
    assert metric(node, "ringsync_uploads_dropped_total", reason="stalled") == 2
    assert metric(node, "ringsync_uploads_dropped_total", reason="busy") == 1
    assert metric(node, "ringsync_upload_bytes_in_flight") == 0
    # The budget is free again: an upload is read (and refused for its garbage).
    answer = exchange(node, head + b"\0" * MIB)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:300]
    assert_log_clean(node)


# -- B6 and malformed HTTP -----------------------------------------------------------------


def test_a_non_utf8_authorization_header_is_a_401(
        start_node: Callable[..., tuple[Cluster, Node]]) -> None:
    _, node = start_node()
    for value in (b"Bearer \xff\xfe\x80", b"\xc3\x28", b"Bearer " + b"\xed\xa0\x80" * 8):
        answer = exchange(node, b"GET /v1/status HTTP/1.1\r\nHost: node\r\nAuthorization: "
                          + value + b"\r\nConnection: close\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 401"), answer[:300]
    assert metric(node, "ringsync_auth_failures_total") == 3
    assert metric(node, "ringsync_http_requests_total", route="/v1/status", code="401") == 3
    assert_log_clean(node)


@pytest.mark.parametrize(("request_bytes", "status"), [
    (b"POST /v1/notify HTTP/1.1\r\nHost: node\r\nContent-Length: -5\r\n\r\n", b"400"),
    (b"GET /healthz HTTP/1.1\r\nHost: node\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n", b"400"),
    (b"GET /healthz HTTP/1.1\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(300))
     + b"\r\n", b"400"),
    (b"POST /v1/notify HTTP/1.1\r\nHost: node\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"zz\r\n", b"400"),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32), b"400"),  # TLS hello
], ids=["negative_length", "100k_header", "300_headers", "bad_chunk", "not_http"])
def test_malformed_http_is_refused_counted_and_not_a_traceback(
        start_node: Callable[..., tuple[Cluster, Node]], request_bytes: bytes,
        status: bytes) -> None:
    _, node = start_node()
    for _ in range(3):
        answer = exchange(node, request_bytes)
        assert answer.split(b" ", 2)[1] == status, answer[:300]
    assert metric(node, "ringsync_http_malformed_total") == 3
    assert healthz(node) == 200
    text = node.log_path.read_text(errors="replace")
    assert text.count("refused malformed HTTP") == 1  # rate-limited: one line a minute
    assert_log_clean(node)


# -- every 5xx is counted ------------------------------------------------------------------


async def test_an_unexpected_error_is_a_counted_500(
        node_factory: Callable[..., NodeContext], served: Callable[..., Any],
        monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = node_factory()
    await served(ctx)

    def fail(payload: bytes, digest: str) -> None:
        raise RuntimeError("a bug in the merge")

    monkeypatch.setattr(ctx.receiver, "receive", fail)
    payload = b"\x80"
    headers = {"Authorization": f"Bearer {TOKEN}", DIGEST_HEADER: content_digest(payload)}
    async with aiohttp.ClientSession() as s, s.post(
            f"http://127.0.0.1:{ctx.settings.p2p_port}{GAMES_PATH}", data=payload,
            headers=headers) as r:
        assert r.status == 500
    assert ctx.metrics.http_requests.labels(route=GAMES_PATH, code="500")._value.get() == 1
