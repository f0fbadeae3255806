"""Issue 8 acceptance on network-namespace hosts with real `ringsync run` nodes.

A training host cut off for 30 s; a 200 MB model spread to four selfplay hosts past a source
serving corrupt bytes; the bandwidth limit under a ``tc tbf`` cap, and a model overtaking a
training-data backlog; kill -9 in the middle of a 1 GiB download. Each test is bounded and
removes its big files (the lab's tmp dir) when it ends.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ringsync.localcluster import Cluster, held_game_ids, read_game_ids, wait_until
from tests.integration.test_file_sync import PartialWatcher, digest, journal_done
from tests.integration.test_ssh_netns import assert_holds_exactly
from tests.netns import LabHost, NetnsLab, lab_cluster, netns_lab, writing_games

pytestmark = [pytest.mark.slow, pytest.mark.needs_root, pytest.mark.timeout(90)]

MIB = 1 << 20
MB = 1_000_000
FILE_ENV = {"RINGRIFT_FILE_SETTLE_TIME": "0.5", "RINGRIFT_FILE_POLL_INTERVAL": "0.3"}
SOURCE_DB = "games/hex8_2p.db"


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    """The test's dir, removed at the end: it holds files of up to a GiB."""
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


def scrape(lab: NetnsLab, host: LabHost, port: int, series: str) -> float:
    """The sum of a metric's samples whose line starts with ``series``, read inside the host."""
    text = lab.run(host, "curl", "-sf", "--max-time", "5", f"http://{host.address}:{port}/metrics")
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(series))


def random_file(path: Path, size: int, *, block: int = 4 * MIB, age: float = 0.0) -> str:
    """``size`` bytes of a repeated random block with the offset stamped in each (fast, never
    sparse, no two blocks alike); its BLAKE3."""
    path.parent.mkdir(parents=True, exist_ok=True)
    base = bytearray(os.urandom(block))
    with path.open("wb") as f:
        for offset in range(0, size, block):
            base[:8] = offset.to_bytes(8, "little")
            f.write(base[:min(block, size - offset)])
    if age:
        os.utime(path, (time.time() - age, time.time() - age))
    return digest(path)


def received_bytes(directory: Path) -> int:
    """Bytes under ``directory``, downloads in progress (part files) included."""
    total = 0
    for p in directory.rglob("*") if directory.is_dir() else ():
        try:
            if p.is_file() and not p.is_symlink():
                total += p.stat().st_size
        except FileNotFoundError:  # a part renamed into place between listing and stat
            continue
    return total


def file_nodes(cluster: Cluster, *names: str) -> None:
    for name in names:
        cluster.nodes[name].extra_env.update(FILE_ENV)
        cluster.start(name)


# -- (a) a training host cut off for 30 s mid-stream -------------------------------------------

def test_a_training_host_cut_off_30s_opens_its_breaker_catches_up_exactly_once_and_closes_it(
        scratch: Path) -> None:
    with netns_lab(scratch / "lab", 3) as lab:
        h0, h1, h2 = lab.hosts
        cluster = lab_cluster(lab, [("selfplay-1", "gpu_selfplay", h0),
                                    ("train-1", "gpu_training_primary", h1),
                                    ("train-2", "nn_training_primary", h2)],
                              root=scratch / "nodes", sync_interval=2.0)
        cluster.nodes["selfplay-1"].extra_env.update({
            "RINGRIFT_CIRCUIT_FAILURE_THRESHOLD": "2", "RINGRIFT_CIRCUIT_RECOVERY": "4",
            "RINGRIFT_CIRCUIT_RECOVERY_MAX": "8", "RINGRIFT_PUSH_TIMEOUT": "5"})
        selfplay, train1, train2 = (cluster.nodes[n] for n in ("selfplay-1", "train-1", "train-2"))
        source = selfplay.data_dir / SOURCE_DB

        def breaker() -> float:
            return scrape(lab, h0, selfplay.port, 'ringsync_circuit_state{peer="train-1",transport="http"}')

        try:
            for name in ("train-1", "train-2", "selfplay-1"):  # receivers up before the sender
                cluster.start(name)
            with writing_games(source, 450, rate=15, seed=17) as writer:
                wait_until(lambda: len(held_game_ids(train1)) >= 20, 30, "the first games at train-1")
                lab.cut(h1)
                cut_at, at_cut = time.monotonic(), len(held_game_ids(train2))
                wait_until(lambda: breaker() == 2, 25, "train-1's breaker open")
                opened_after = time.monotonic() - cut_at
                health = auto_sync_health(lab, h0, cluster)
                assert health["state"] == "degraded", health
                assert re.search(r"train-1: circuit (open|half_open) over http since "
                                 r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC \(\d+s\)", health["detail"])
                during = len(held_game_ids(train1))
                assert scrape(lab, h0, selfplay.port, 'ringsync_circuit_state{peer="train-2"') == 0
                time.sleep(max(0.0, 30 - (time.monotonic() - cut_at)))
                flowed = len(held_game_ids(train2)) - at_cut
                assert flowed > 150  # the other kept receiving
                assert len(held_game_ids(train1)) == during  # nothing reaches a cut-off host
                assert breaker() in (1, 2)  # open, or half-open while a probe tries
                lab.heal(h1)
                assert writer.wait(30) == 0
            completed = read_game_ids(source, "WHERE game_status = 'completed'")
            assert len(completed) == 450
            wait_until(lambda: all(len(held_game_ids(n)) >= 450 for n in (train1, train2)), 25,
                       "every game at both trainers after the heal")
            for trainer in ("train-1", "train-2"):
                assert_holds_exactly(cluster, trainer, completed)
            wait_until(lambda: breaker() == 0, 10, "train-1's breaker closed again")
            print(f"breaker open {opened_after:.1f} s after the cut; train-2 got {flowed} games "
                  "during the 30 s cut; train-1 caught up after the heal")
            assert auto_sync_health(lab, h0, cluster)["state"] == "healthy"
            log = selfplay.log_path.read_text()
            assert re.search(r"circuit to train-1 over http: closed for \d+s -> open", log), log[-3000:]
            # closed by its probe, or by an answer to a push begun before it opened
            closed = r"circuit to train-1 over http: (half_)?open for \d+s -> closed"
            assert re.search(closed, log), log[-3000:]
            assert "circuit to train-2" not in log
        finally:
            cluster.stop_all()


def auto_sync_health(lab: NetnsLab, host: LabHost, cluster: Cluster) -> dict[str, str]:
    """What an operator sees in the selfplay node's /v1/status: auto_sync's state and detail."""
    node = cluster.nodes["selfplay-1"]
    body = lab.run(host, "curl", "-sf", "--max-time", "5", "-H",
                   f"Authorization: Bearer {cluster.token}", f"http://{host.address}:{node.port}/v1/status")
    return dict(json.loads(body)["daemons"]["auto_sync"])


# -- (b) a 200 MB model to every selfplay host, past a source serving corrupt bytes -------------

HOSTILE = """
import os, sys
from aiohttp import web
address, port, entry = sys.argv[1], int(sys.argv[2]), eval(sys.argv[3])

async def index(request):
    return web.json_response({"node": "evil-1", "files": [entry]})

async def body(request):
    # Wrong bytes of the right length under the right hash header: only the hash check catches it.
    print("served", request.headers.get("X-Ringsync-Node"), flush=True)
    resp = web.StreamResponse(headers={"X-Ringsync-Content-Hash": entry["hash"],
                                       "Content-Length": str(entry["size"])})
    await resp.prepare(request)
    junk = os.urandom(1 << 20)
    for _ in range(entry["size"] >> 20):
        await resp.write(junk)
    return resp

app = web.Application()
app.router.add_get("/v1/files/index", index)
app.router.add_get("/v1/files/{kind}/{relpath:.+}", body)
web.run_app(app, host=address, port=port, print=None)
"""

RECEIVERS = ("selfplay-1", "selfplay-2", "selfplay-3", "selfplay-4")


@pytest.mark.timeout(240)  # bounds, not figures: a loaded 2-core machine moves 1.2 GB slowly
def test_a_200mb_model_reaches_four_selfplay_hosts_whole_past_a_source_serving_corrupt_bytes(
        scratch: Path) -> None:
    size = 200 * MIB
    with netns_lab(scratch / "lab", 6) as lab:
        roles = [("train-1", "gpu_training_primary"), *((n, "gpu_selfplay") for n in RECEIVERS),
                 ("evil-1", "gpu_selfplay")]
        cluster = lab_cluster(lab, [(n, r, h) for (n, r), h in zip(roles, lab.hosts, strict=True)],
                              root=scratch / "nodes")
        models = {n: cluster.nodes[n].data_dir / "models" for n in cluster.nodes}
        src = models["train-1"]
        staged = src / "canonical_hex8_4p.pth.tmp"  # RingRift's temp name: never shipped
        try:
            # Written slowly (the source's settle time outlasts the test: only the rename counts).
            cluster.nodes["train-1"].extra_env["RINGRIFT_FILE_SETTLE_TIME"] = "300"
            cluster.nodes["train-1"].extra_env["RINGRIFT_FILE_POLL_INTERVAL"] = "0.3"
            cluster.start("train-1")
            expected = _write_slowly(staged, size)
            entry = {"kind": "models", "relpath": "canonical_hex8_4p.pth", "size": size,
                     "mtime_ns": staged.stat().st_mtime_ns, "hash": expected, "link_target": None}
            evil_host = lab.hosts[5]
            evil = lab.spawn(evil_host, [sys.executable, "-c", HOSTILE, evil_host.address,
                                         str(cluster.nodes["evil-1"].port), repr(entry)],
                             log=scratch / "evil.log")
            time.sleep(1.0)
            assert evil.poll() is None, (scratch / "evil.log").read_text()
            file_nodes(cluster, *RECEIVERS)  # evil-1 is the only holder at first
            wait_until(lambda: all(scrape(lab, lab.hosts[i + 1], cluster.nodes[n].port,
                                          "ringsync_file_hash_mismatches_total") >= 1
                                   for i, n in enumerate(RECEIVERS)), 90,
                       "the corrupt bytes detected at every receiver")
            watcher = PartialWatcher([models[n] for n in RECEIVERS], {"canonical_hex8_4p.pth": size})
            watcher.start()
            try:
                started = time.monotonic()
                os.rename(staged, src / "canonical_hex8_4p.pth")
                wait_until(lambda: all((models[n] / "canonical_hex8_4p.pth").is_file()
                                       for n in RECEIVERS), 90, "the model at every selfplay host")
                spread = time.monotonic() - started
            finally:
                watcher.stop.set()
                watcher.join(5)
            assert watcher.violations == []
            assert watcher.looks > 100
            for n in RECEIVERS:
                assert digest(models[n] / "canonical_hex8_4p.pth") == expected, n
                log = cluster.nodes[n].log_path.read_text()
                assert "not asking it for this content again" in log, n
            served = [ln.split()[1] for ln in (scratch / "evil.log").read_text().splitlines()
                      if ln.startswith("served ")]
            # Each receiver asked it once, then excluded it. train-1 (it wants models too and
            # held only the temp file then) asks at most once: it polled evil-1 before evil-1
            # listened, so its breaker for evil-1 may still be open.
            assert sorted(n for n in served if n != "train-1") == sorted(RECEIVERS), served
            assert served.count("train-1") <= 1, served
            print(f"200 MB model at 4 selfplay hosts {spread:.1f} s after its rename")
        finally:
            cluster.stop_all()


def _write_slowly(path: Path, size: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    block = bytearray(os.urandom(4 * MIB))
    with path.open("wb") as f:
        for offset in range(0, size, len(block)):
            block[:8] = offset.to_bytes(8, "little")
            f.write(block)
            f.flush()
            time.sleep(0.02)
    return digest(path)


# -- (c) the configured rate under a tbf cap, and a model overtaking an NPZ backlog ------------

LIMIT_MBPS = 40.0


def test_the_configured_rate_holds_under_a_tbf_cap_and_a_model_overtakes_a_training_data_backlog(
        scratch: Path) -> None:
    with netns_lab(scratch / "lab", 2) as lab:
        h0, h1 = lab.hosts
        # The operator's per-peer limit: sends to train-2 at most 40 Mbit/s (its bandwidth_mbps).
        cluster = lab_cluster(lab, [("train-1", "gpu_training_primary", h0),
                                    ("train-2", "nn_training_primary", h1)], root=scratch / "nodes",
                              host_fields={"train-2": {"bandwidth_mbps": LIMIT_MBPS}})
        src, dst = (cluster.nodes[n].data_dir for n in ("train-1", "train-2"))
        for i in range(4):  # a backlog of 64 MB of training data, there before the nodes start
            random_file(src / "training" / f"sq19_{i}.npz", 16 * MB, age=3600)
        lab.cap(h0, 60)  # the link allows more than the limit: the limiter must hold the rate
        try:
            file_nodes(cluster, "train-1", "train-2")
            wait_until(lambda: received_bytes(dst / "training") >= 4 * MB, 20, "the backlog flowing")
            t0, b0 = time.monotonic(), received_bytes(dst / "training")
            wait_until(lambda: received_bytes(dst / "training") >= b0 + 20 * MB, 20, "20 MB more")
            t1, b1 = time.monotonic(), received_bytes(dst / "training")
            rate = (b1 - b0) * 8 / (t1 - t0) / 1e6
            print(f"measured {rate:.1f} Mbit/s under a {LIMIT_MBPS} Mbit/s limit and a 60 Mbit/s tbf cap")
            assert abs(rate - LIMIT_MBPS) <= 0.1 * LIMIT_MBPS, rate

            model = src / "models" / "canonical_sq19_2p.pth"
            random_file(model.with_suffix(".tmp"), 8 * MB)
            os.rename(model.with_suffix(".tmp"), model)
            written = time.monotonic()
            received = dst / "models" / model.name
            wait_until(received.is_file, 20, "the model at train-2")
            model_took = time.monotonic() - written
            left = 64 * MB - received_bytes(dst / "training")
            wait_until(lambda: len(list((dst / "training").glob("*.npz"))) == 4, 30, "the backlog done")
            backlog_after = time.monotonic() - written
            print(f"model in {model_took:.1f} s with {left / MB:.0f} MB of the backlog left; "
                  f"backlog done {backlog_after:.1f} s after the model was written")
            assert left >= 20 * MB  # it did not wait behind the backlog...
            assert backlog_after >= model_took + 3  # ...which finished long after it
            assert digest(received) == digest(model)
            sent = scrape(lab, h0, cluster.nodes["train-1"].port,
                          'ringsync_bandwidth_bytes_total{peer="train-2"')
            assert sent >= 72 * MB  # file serving went through the node's limiter, as train-2's
            assert scrape(lab, h1, cluster.nodes["train-2"].port,
                          'ringsync_transport_attempts_total{data_type="models",outcome="ok",'
                          'transport="http"}') >= 1
        finally:
            cluster.stop_all()


# -- (d) kill -9 of a receiver in the middle of a 1 GiB download --------------------------------

def test_a_receiver_killed_mid_1gib_download_resumes_and_publishes_a_verified_file(scratch: Path) -> None:
    size = 1 << 30
    with netns_lab(scratch / "lab", 2) as lab:
        h0, h1 = lab.hosts
        cluster = lab_cluster(lab, [("train-1", "gpu_training_primary", h0),
                                    ("selfplay-1", "gpu_selfplay", h1)], root=scratch / "nodes")
        model = cluster.nodes["train-1"].data_dir / "models" / "checkpoint_hex8_2p.pth"
        expected = random_file(model, size, age=3600)
        # 800 Mbit/s: about 11 s for the whole file, so the kill lands mid-download.
        cluster.nodes["train-1"].extra_env["RINGRIFT_BANDWIDTH_LIMIT_MBPS"] = "800"
        received = cluster.nodes["selfplay-1"].data_dir / "models" / model.name
        try:
            file_nodes(cluster, "train-1", "selfplay-1")
            wait_until(lambda: journal_done(cluster, "selfplay-1") >= 400 * MIB, 40, "400 MiB journalled")
            cluster.kill("selfplay-1")
            done = journal_done(cluster, "selfplay-1")
            assert not received.exists()  # nothing under the final name
            assert 0 < done < size
            file_nodes(cluster, "selfplay-1")
            wait_until(received.is_file, 40, "the resumed download published")
            refetched = scrape(lab, h1, cluster.nodes["selfplay-1"].port,
                               "ringsync_file_bytes_fetched_total")
            print(f"killed at {done / MIB:.0f} MiB journalled; re-fetched {refetched / MIB:.0f} MiB")
            assert refetched == size - done  # only what the journal did not hold
            assert refetched < 0.65 * size
            assert digest(received) == expected
            log = cluster.nodes["selfplay-1"].log_tail(200)
            assert "resuming models/checkpoint_hex8_2p.pth at" in log
        finally:
            cluster.stop_all()
