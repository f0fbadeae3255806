"""Abandoned downloads between real `ringsync run` nodes on loopback: a half-downloaded file
whose source removed it is cleaned after RINGRIFT_FILE_ABANDON_AFTER; one whose source is
merely unreachable is kept and resumes; start-up removes what no journal entry resumes."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ringsync.daemons.file_cleanup import FileJanitor
from ringsync.files.kinds import FileKind, part_name
from ringsync.files.layout import file_dirs
from ringsync.files.plan import FetchJob, Source
from ringsync.localcluster import Cluster, wait_until
from ringsync.transport.aria2 import CONTROL_SUFFIX, control_file_done
from tests.integration.test_aria2 import NAME, Lab, lab_factory, offer  # noqa: F401 (a fixture)
from tests.integration.test_file_sync import MIB, digest, metric, models, old_file, start

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

GRACE = 2.0


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path, [("train-1", "gpu_training_primary"), ("train-2", "nn_training_primary"),
                           ("selfplay-1", "gpu_selfplay"), ("storage-1", "storage")],
                sync_interval=30.0, host_fields={
                    # Sources only: each model is held by its one source, nowhere else.
                    "train-1": {"skip_sync_receive": True}, "train-2": {"skip_sync_receive": True},
                    # Never started: an SSH peer switched off, whose rsync staging is kept.
                    "storage-1": {"transport": "ssh", "status": "offline"}})
    yield c
    c.stop_all()


def journal(cluster: Cluster, name: str) -> dict[str, int]:
    """relpath -> bytes done, from the node's transfer journal (read-only)."""
    db = cluster.nodes[name].data_dir / ".ringsync" / name / "manifest.db"
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    except sqlite3.OperationalError:
        return {}
    try:
        return dict(conn.execute("SELECT relpath, done FROM transfers").fetchall())
    except sqlite3.OperationalError:
        return {}
    finally:
        conn.close()


def test_a_download_whose_source_removed_the_file_is_cleaned_and_an_unreachable_ones_kept(
        cluster: Cluster) -> None:
    size = 100 * MIB
    vanishing = models(cluster, "train-1") / "candidate_sq8_2p.pth"
    old_file(vanishing, size)
    cut_off = models(cluster, "train-2") / "candidate_hex8_2p.pth"
    expected = old_file(cut_off, size)
    for source in ("train-1", "train-2"):
        cluster.nodes[source].extra_env["RINGRIFT_BANDWIDTH_LIMIT_MBPS"] = "160"  # 20 MB/s: ~5 s
    start(cluster, "train-1", "train-2", "selfplay-1")
    wait_until(lambda: len(journal(cluster, "selfplay-1")) == 2
               and min(journal(cluster, "selfplay-1").values()) >= 20 * MIB, 30, "both half downloaded")
    cluster.kill("selfplay-1")
    vanishing.unlink()  # removed everywhere it was held
    wait_until(lambda: "no longer offering models/candidate_sq8_2p.pth"
               in cluster.nodes["train-1"].log_path.read_text(), 10, "train-1 to stop offering it")
    cluster.kill("train-2")  # a network cut, as far as selfplay-1 can tell

    here = models(cluster, "selfplay-1")
    vanishing_part, cut_off_part = here / part_name(vanishing.name), here / part_name(cut_off.name)
    done_before = journal(cluster, "selfplay-1")[cut_off.name]
    # What a run killed earlier left: an aria2 fetch (its part and control file) whose journal
    # row is gone, and rsync staging of a retired host and of a peer still configured.
    orphan_part = here / part_name("retired.pth")
    orphan_control = here / f"{part_name('retired.pth')}.aria2"
    retired_rsync = here / ".ringsync-rsync" / "old-host" / ".rsync-partial" / "x.pth"
    kept_rsync = here / ".ringsync-rsync" / "storage-1" / ".rsync-partial" / "y.pth"
    for p in (orphan_part, orphan_control, retired_rsync, kept_rsync):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x" * MIB)

    cluster.nodes["selfplay-1"].extra_env["RINGRIFT_FILE_ABANDON_AFTER"] = str(GRACE)
    start(cluster, "selfplay-1")  # returns once READY: start-up cleanup has run
    assert not orphan_part.exists()
    assert not orphan_control.exists()
    assert not retired_rsync.parent.parent.exists()
    assert kept_rsync.exists()
    assert vanishing_part.exists()  # live journal rows: kept at start
    assert cut_off_part.exists()

    began = time.monotonic()
    wait_until(lambda: not vanishing_part.exists(), 20, "the abandoned part removed")
    assert time.monotonic() - began >= GRACE - 0.5  # timed from the first poll after start
    assert vanishing.name not in journal(cluster, "selfplay-1")
    log = cluster.nodes["selfplay-1"].log_path.read_text()
    assert f"abandoned the download of models/{vanishing.name}: " in log
    assert "no peer has offered its content for" in log
    assert metric(cluster, "selfplay-1",
                  'ringsync_file_transfers_abandoned_total{kind="models",reason="unoffered"}') == 1
    assert metric(cluster, "selfplay-1",
                  'ringsync_file_transfers_abandoned_total{kind="models",reason="leftover"}') == 3

    time.sleep(3 * GRACE)  # train-2 is still unreachable: its download stays
    assert cut_off_part.exists()
    assert journal(cluster, "selfplay-1")[cut_off.name] == done_before
    start(cluster, "train-2")  # the cut heals: the download resumes, it does not start over
    received = here / cut_off.name
    wait_until(received.is_file, 30, "the kept download published")
    assert digest(received) == expected
    fetched = metric(cluster, "selfplay-1", "ringsync_file_bytes_fetched_total")
    assert fetched == size - done_before
    assert not (here / vanishing.name).exists()
    assert "Traceback" not in cluster.nodes["selfplay-1"].log_path.read_text()


@pytest.mark.skipif(shutil.which("aria2c") is None, reason="aria2c is not installed")
async def test_an_aria2_download_superseded_by_a_new_version_is_dropped_before_it_is_fetched(
        lab_factory: Any) -> None:  # noqa: F811 (the fixture imported above)
    # Without the drop, aria2c would resume the new version from the old one's control file.
    size = 48 * MIB
    lab: Lab = await lab_factory(size, serve_mbps=40.0)  # 3 x 5 MB/s
    control = lab.part().with_name(lab.part().name + CONTROL_SUFFIX)
    first = asyncio.create_task(lab.fetcher.fetch(lab.job()))
    await asyncio.to_thread(wait_until, lambda: control.exists()
                            and control_file_done(control) >= size // 4, 30, "a quarter fetched")
    os.kill(lab.aria2.running[lab.entry.hash].pid, signal.SIGKILL)
    assert await first is False
    assert lab.manifest.transfer(FileKind.MODELS, NAME) is not None
    assert lab.part().exists()

    newer = os.urandom(40 * MIB)
    entry = next(iter({offer(ctx, newer) for ctx in lab.sources.values()}))
    job = FetchJob(entry, tuple(Source(p, FileKind.MODELS, NAME) for p in lab.sources))
    janitor = FileJanitor(file_dirs(lab.receiver.settings), lab.receiver.metrics, 3600.0)
    janitor.sweep(lab.manifest, list(lab.sources), {p: [entry] for p in lab.sources}, [job], set())
    assert lab.manifest.transfer(FileKind.MODELS, NAME) is None
    assert not lab.part().exists()
    assert not control.exists()
    assert lab.receiver.metrics.registry.get_sample_value(
        "ringsync_file_transfers_abandoned_total", {"kind": "models", "reason": "superseded"}) == 1

    assert await lab.fetcher.fetch(job)
    assert lab.final().read_bytes() == newer
    samples = lab.receiver.metrics.registry.get_sample_value
    # aria2 started from byte 0 (a resumed run counts only what it had left), nothing repaired
    assert samples("ringsync_file_source_bytes_total",
                   {"peer": "aria2-mixed", "transport": "aria2"}) == len(newer)
    assert samples("ringsync_file_multi_source_fetches_total", {"outcome": "published"}) == 1
    assert samples("ringsync_file_hash_mismatches_total", {"kind": "models"}) is None
