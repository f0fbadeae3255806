"""Peer-to-peer spread between real `ringsync run` nodes: receivers still downloading relay."""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.request

import pytest

from ringsync.localcluster import Cluster, wait_until
from tests.integration.test_file_sync import (
    MIB,
    digest,
    metric,
    models,
    start_with,
)
from tests.integration.test_file_sync import make_cluster as make_cluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

SELFPLAY = ("selfplay-1", "selfplay-2", "selfplay-3")
NAME = "canonical_sq8_2p.pth"


class RelayWatcher(threading.Thread):
    """Polls every receiver's /v1/relays: who relayed the model while still downloading it."""

    def __init__(self, cluster: Cluster, names: tuple[str, ...]) -> None:
        super().__init__(daemon=True)
        self.cluster, self.names = cluster, names
        self.relayed: set[str] = set()
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for name in self.names:
                req = urllib.request.Request(
                    f"http://127.0.0.1:{self.cluster.nodes[name].port}/v1/relays",
                    headers={"Authorization": f"Bearer {self.cluster.token}"})
                try:
                    with urllib.request.urlopen(req, timeout=2) as resp:
                        listed = json.loads(resp.read())["relays"]
                except OSError:
                    continue
                if any(r["relpath"] == NAME for r in listed):
                    self.relayed.add(name)
            time.sleep(0.05)


def test_receivers_still_downloading_serve_the_model_to_the_others(make_cluster: type[Cluster]) -> None:
    cluster = make_cluster([("train-1", "gpu_training_primary"),
                            *((n, "gpu_selfplay") for n in SELFPLAY)])
    cluster.nodes["train-1"].extra_env["RINGRIFT_FILE_UPLOAD_SLOTS"] = "1"
    for name in cluster.nodes:  # every uplink slow enough for the downloads to overlap
        cluster.nodes[name].extra_env.update({"RINGRIFT_BANDWIDTH_LIMIT_MBPS": "60",
                                              "RINGRIFT_FILE_UPLOAD_SLOTS": "1"})
    start_with(cluster, "train-1", settle="300")
    for name in SELFPLAY:
        start_with(cluster, name)
    size = 30 * MIB
    watcher = RelayWatcher(cluster, SELFPLAY)
    watcher.start()
    src = models(cluster, "train-1")
    src.mkdir(parents=True, exist_ok=True)
    (src / "canonical_sq8_2p.tmp").write_bytes(os.urandom(size))
    os.rename(src / "canonical_sq8_2p.tmp", src / NAME)
    expected = digest(src / NAME)
    try:
        wait_until(lambda: all((models(cluster, n) / NAME).is_file() for n in SELFPLAY), 60,
                   "the model at every selfplay node")
    finally:
        watcher.stop.set()
        watcher.join(5)
    for name in SELFPLAY:
        assert digest(models(cluster, name) / NAME) == expected, name
    served = {n: metric(cluster, n, "ringsync_file_bytes_served_total") for n in cluster.nodes}
    # One upload slot: the source streamed the model to one receiver at a time, and the
    # others got it (mostly) from receivers that were still downloading it.
    assert served["train-1"] < 2 * size, served
    relayed_bytes = sum(served[n] for n in SELFPLAY)
    assert relayed_bytes >= size, served
    assert watcher.relayed, "no receiver listed the model as a relay while downloading it"
    assert any(served[n] > 0 for n in watcher.relayed), (watcher.relayed, served)
    assert sum(metric(cluster, n, "ringsync_file_hash_mismatches_total") for n in SELFPLAY) == 0
    for name in cluster.nodes:
        assert cluster.terminate(name) == 0, cluster.nodes[name].log_tail()
