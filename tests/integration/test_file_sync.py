"""Models and training data between real `ringsync run` nodes on loopback (issue 8 §4)."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from blake3 import blake3

from ringsync.localcluster import Cluster, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

FILE_ENV = {"RINGRIFT_FILE_SETTLE_TIME": "0.5", "RINGRIFT_FILE_POLL_INTERVAL": "0.3"}
MIB = 1024 * 1024


def start(cluster: Cluster, *names: str, settle: str = "0.5") -> None:
    for name in names:
        start_with(cluster, name, settle=settle)


def start_with(cluster: Cluster, name: str, *args: str, settle: str = "0.5") -> None:
    cluster.nodes[name].extra_env.update({**FILE_ENV, "RINGRIFT_FILE_SETTLE_TIME": settle})
    cluster.start(name, *args)


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator[Cluster]:
    clusters: list[Cluster] = []

    def make(nodes: list[tuple[str, str]]) -> Cluster:
        c = Cluster(tmp_path, nodes, sync_interval=30.0)
        clusters.append(c)
        return c

    yield make  # type: ignore[misc]
    for c in clusters:
        c.stop_all()


def models(cluster: Cluster, name: str) -> Path:
    return cluster.nodes[name].data_dir / "models"


def training(cluster: Cluster, name: str) -> Path:
    return cluster.nodes[name].data_dir / "training"


def digest(path: Path) -> str:
    h = blake3()
    with path.open("rb") as f:
        while chunk := f.read(MIB):
            h.update(chunk)
    return h.hexdigest()


def metric(cluster: Cluster, name: str, series: str) -> float:
    url = f"http://127.0.0.1:{cluster.nodes[name].port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(series) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def write_slowly(path: Path, size: int, *, chunk: int = MIB, pause: float = 0.01) -> None:
    with path.open("wb") as f:
        for _ in range(size // chunk):
            f.write(os.urandom(chunk))
            f.flush()
            time.sleep(pause)


class PartialWatcher(threading.Thread):
    """Polls receivers' models dirs: every non-dot name must be a complete file or a symlink."""

    def __init__(self, dirs: list[Path], sizes: dict[str, int]) -> None:
        super().__init__(daemon=True)
        self.dirs, self.sizes = dirs, sizes
        self.violations: list[str] = []
        self.looks = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for d in self.dirs:
                for p in d.iterdir() if d.is_dir() else ():
                    if p.name.startswith(".") or (p.is_dir() and not p.is_symlink()):
                        continue
                    if p.name not in self.sizes:
                        self.violations.append(f"unexpected name {p}")
                    elif not p.is_symlink() and p.stat().st_size != self.sizes[p.name]:
                        self.violations.append(f"{p} visible at {p.stat().st_size} bytes")
            self.looks += 1
            time.sleep(0.005)


SELFPLAY = ("selfplay-1", "selfplay-2", "selfplay-3")


def test_model_reaches_every_selfplay_node_whole_and_training_data_only_the_trainers(
        make_cluster: type[Cluster]) -> None:
    cluster = make_cluster([("train-1", "gpu_training_primary"), ("train-2", "nn_training_primary"),
                            *((n, "gpu_selfplay") for n in SELFPLAY), ("coordinator", "coordinator")])
    # The source's settle time is longer than the test: its files are picked up because they
    # appear by rename (the receivers offer theirs on after 0.5 s).
    start(cluster, "train-1", settle="300")
    start(cluster, *(n for n in cluster.nodes if n not in ("train-1", "coordinator")))
    # The coordinator runs the file daemon too: only routing keeps files from it.
    start_with(cluster, "coordinator", "--daemon", "file_sync")
    size = 50 * MIB
    sizes = {"canonical_hex8_2p.pth": size, "ringrift_best_hex8_2p.pth": 0}
    watcher = PartialWatcher([models(cluster, n) for n in (*SELFPLAY, "train-2")], sizes)
    watcher.start()
    src = models(cluster, "train-1")
    src.mkdir(parents=True, exist_ok=True)
    tmp = src / "canonical_hex8_2p.tmp"  # RingRift's promotion temp name: never shipped
    write_slowly(tmp, size)
    os.rename(tmp, src / "canonical_hex8_2p.pth")
    os.symlink("canonical_hex8_2p.pth", src / "ringrift_best_hex8_2p.pth")
    npz_dir = training(cluster, "train-1")
    npz_dir.mkdir(parents=True, exist_ok=True)
    (npz_dir / "hex8_2p.npz.lock").write_bytes(b"")  # as RingRift's exporter does it
    (npz_dir / "tmpab12.npz").write_bytes(os.urandom(3 * MIB))
    os.replace(npz_dir / "tmpab12.npz", npz_dir / "hex8_2p.npz")
    (npz_dir / "tmpcd34.npz").write_bytes(b"partial")
    expected = digest(src / "canonical_hex8_2p.pth")
    nested = old_file(src / "production" / "hex8_2p" / "hex8_2p_1767225600.pth", MIB)

    receivers = (*SELFPLAY, "train-2")
    try:
        wait_until(lambda: all((models(cluster, n) / "ringrift_best_hex8_2p.pth").is_symlink()
                               and (models(cluster, n) / "canonical_hex8_2p.pth").is_file()
                               and (models(cluster, n) / "production/hex8_2p").is_dir()
                               and any((models(cluster, n) / "production/hex8_2p").iterdir())
                               for n in receivers), 40, "the models and the symlink everywhere")
        wait_until(lambda: (training(cluster, "train-2") / "hex8_2p.npz").is_file(), 20,
                   "the NPZ at train-2")
    finally:
        watcher.stop.set()
        watcher.join(5)
    assert watcher.violations == []
    assert watcher.looks > 100
    for n in receivers:
        model = models(cluster, n) / "canonical_hex8_2p.pth"
        assert digest(model) == expected, n
        assert os.readlink(models(cluster, n) / "ringrift_best_hex8_2p.pth") == "canonical_hex8_2p.pth"
        assert digest(models(cluster, n) / "production/hex8_2p/hex8_2p_1767225600.pth") == nested
    assert digest(training(cluster, "train-2") / "hex8_2p.npz") == digest(npz_dir / "hex8_2p.npz")
    assert sorted(p.name for p in training(cluster, "train-2").iterdir()) == ["hex8_2p.npz"]
    # Training data never leaves the training nodes; the coordinator gets nothing at all.
    for n in (*SELFPLAY, "coordinator"):
        assert not training(cluster, n).exists() or not any(training(cluster, n).iterdir()), n
    assert not any(models(cluster, "coordinator").iterdir())
    assert "fetching nothing" in cluster.nodes["coordinator"].log_path.read_text()
    assert sum(metric(cluster, n, "ringsync_file_hash_mismatches_total") for n in receivers) == 0
    for name in cluster.nodes:
        assert cluster.terminate(name) == 0, cluster.nodes[name].log_tail()


class HostileServer(threading.Thread):
    """A peer that lists the right index (the real content hash) but serves wrong bytes."""

    def __init__(self, port: int, entry: dict[str, object]) -> None:
        super().__init__(daemon=True)
        self.port, self.entry = port, entry
        self.file_requests = 0
        self._started = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._quit: asyncio.Event | None = None

    def run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        from aiohttp import web

        async def index(request: web.Request) -> web.Response:
            return web.json_response({"node": "evil-1", "files": [self.entry]})

        async def body(request: web.Request) -> web.Response:
            self.file_requests += 1
            size = int(self.entry["size"])  # type: ignore[call-overload]
            return web.Response(body=os.urandom(size), headers={
                "X-Ringsync-Content-Hash": str(self.entry["hash"])})

        app = web.Application()
        app.router.add_get("/v1/files/index", index)
        app.router.add_get("/v1/files/{kind}/{relpath:.+}", body)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()
        self._loop, self._quit = asyncio.get_running_loop(), asyncio.Event()
        self._started.set()
        await self._quit.wait()
        await runner.cleanup()

    def __enter__(self) -> HostileServer:
        self.start()
        assert self._started.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None
        assert self._quit is not None
        self._loop.call_soon_threadsafe(self._quit.set)
        self.join(10)


def old_file(path: Path, size: int) -> str:
    """A finished file written a while ago: offered as soon as its node starts."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        for _ in range(size // MIB):
            f.write(os.urandom(MIB))
    os.utime(path, (time.time() - 3600, time.time() - 3600))
    return digest(path)


def test_a_source_serving_corrupt_bytes_is_detected_excluded_and_the_file_fetched_elsewhere(
        make_cluster: type[Cluster]) -> None:
    cluster = make_cluster([("train-1", "gpu_training_primary"), ("selfplay-1", "gpu_selfplay"),
                            ("evil-1", "gpu_selfplay")])
    model = models(cluster, "train-1") / "canonical_sq8_2p.pth"
    expected = old_file(model, 8 * MIB)
    entry = {"kind": "models", "relpath": model.name, "size": 8 * MIB,
             "mtime_ns": model.stat().st_mtime_ns, "hash": expected, "link_target": None}
    received = models(cluster, "selfplay-1") / model.name
    with HostileServer(cluster.nodes["evil-1"].port, entry) as evil:
        start(cluster, "selfplay-1")  # evil-1 is the only holder at first
        wait_until(lambda: metric(cluster, "selfplay-1", "ringsync_file_hash_mismatches_total") >= 1,
                   20, "the corrupt download detected")
        assert not received.exists()
        start(cluster, "train-1")
        wait_until(received.is_file, 20, "the model fetched from the honest source")
        assert digest(received) == expected
        assert evil.file_requests == 1  # excluded for this content after its wrong bytes
    assert metric(cluster, "selfplay-1", "ringsync_file_hash_mismatches_total") == 1
    assert "not asking it for this content again" in cluster.nodes["selfplay-1"].log_path.read_text()


def journal_done(cluster: Cluster, name: str) -> int:
    db = cluster.nodes[name].data_dir / ".ringsync" / name / "manifest.db"
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    except sqlite3.OperationalError:
        return 0
    try:
        row = conn.execute("SELECT max(done) FROM transfers").fetchone()
    except sqlite3.OperationalError:
        return 0
    finally:
        conn.close()
    return int(row[0] or 0)


def test_a_receiver_killed_mid_download_resumes_where_its_journal_says(
        make_cluster: type[Cluster]) -> None:
    cluster = make_cluster([("train-1", "gpu_training_primary"), ("selfplay-1", "gpu_selfplay")])
    size = 300 * MIB
    model = models(cluster, "train-1") / "candidate_hexagonal_4p.pth"
    expected = old_file(model, size)
    cluster.nodes["train-1"].extra_env["RINGRIFT_BANDWIDTH_LIMIT_MBPS"] = "480"  # 60 MB/s: ~5 s
    start(cluster, "train-1", "selfplay-1")
    wait_until(lambda: journal_done(cluster, "selfplay-1") >= 160 * MIB, 30, "half downloaded")
    cluster.kill("selfplay-1")
    done = journal_done(cluster, "selfplay-1")
    received = models(cluster, "selfplay-1") / model.name
    assert not received.exists()
    assert done < size
    start(cluster, "selfplay-1")
    wait_until(received.is_file, 30, "the resumed download published")
    assert digest(received) == expected
    refetched = metric(cluster, "selfplay-1", "ringsync_file_bytes_fetched_total")
    assert refetched == size - done  # only what the journal did not hold
    assert refetched < 0.5 * size
    assert "resuming models/candidate_hexagonal_4p.pth at" in cluster.nodes["selfplay-1"].log_tail(200)
    source_log = cluster.nodes["train-1"].log_path.read_text()
    assert "stopped reading candidate_hexagonal_4p.pth" in source_log
    assert "Traceback" not in source_log


def test_a_receiver_serves_its_copy_on_and_a_new_version_written_in_place_replaces_the_old(
        make_cluster: type[Cluster]) -> None:
    cluster = make_cluster([("train-1", "gpu_training_primary"), ("selfplay-1", "gpu_selfplay"),
                            ("selfplay-2", "gpu_selfplay")])
    model = models(cluster, "train-1") / "canonical_square19_2p.pth"
    first = old_file(model, 4 * MIB)
    start(cluster, "train-1", "selfplay-1")
    wait_until((models(cluster, "selfplay-1") / model.name).is_file, 20, "the model at selfplay-1")
    assert cluster.terminate("train-1") == 0
    start(cluster, "selfplay-2")  # its only possible source is the earlier receiver
    copy = models(cluster, "selfplay-2") / model.name
    wait_until(copy.is_file, 20, "the model at selfplay-2")
    assert digest(copy) == first
    assert "fetched from selfplay-1" in cluster.nodes["selfplay-2"].log_path.read_text()

    # auto_promote copies onto the canonical file in place: a new version, hashed once settled.
    start(cluster, "train-1")
    with model.open("r+b") as f:
        f.write(os.urandom(MIB))
    second = digest(model)
    for name in ("selfplay-1", "selfplay-2"):
        wait_until(lambda n=name: digest(models(cluster, n) / model.name) == second, 20,
                   f"the new version at {name}")

    # An operator frees disk on selfplay-2: its peers still hold the model, but what was
    # removed here is not fetched back (a newer version would be).
    (models(cluster, "selfplay-2") / model.name).unlink()
    published = metric(cluster, "selfplay-2", "ringsync_files_published_total")
    time.sleep(3)  # ten poll rounds
    assert not (models(cluster, "selfplay-2") / model.name).exists()
    assert metric(cluster, "selfplay-2", "ringsync_files_published_total") == published


def test_sigterm_mid_download_stops_promptly_and_the_restart_resumes(
        make_cluster: type[Cluster]) -> None:
    cluster = make_cluster([("train-1", "gpu_training_primary"), ("train-2", "nn_training_primary")])
    npz = training(cluster, "train-1") / "hexagonal_4p.npz"
    expected = old_file(npz, 120 * MIB)
    cluster.nodes["train-1"].extra_env["RINGRIFT_BANDWIDTH_LIMIT_MBPS"] = "240"  # 30 MB/s: ~4 s
    start(cluster, "train-1", "train-2")
    wait_until(lambda: journal_done(cluster, "train-2") >= 32 * MIB, 30, "a quarter downloaded")
    began = time.monotonic()
    assert cluster.terminate("train-2") == 0, cluster.nodes["train-2"].log_tail()
    assert time.monotonic() - began < 5  # downloads are journalled: none is waited for
    received = training(cluster, "train-2") / npz.name
    assert not received.exists()
    done = journal_done(cluster, "train-2")
    assert 32 * MIB <= done < 120 * MIB
    start(cluster, "train-2")
    wait_until(received.is_file, 30, "the resumed NPZ published")
    assert digest(received) == expected
    assert metric(cluster, "train-2", "ringsync_file_bytes_fetched_total") == 120 * MIB - done


@pytest.mark.parametrize("relpath", ["../../escaped.pth", "sub/../../escaped.pth", "/tmp/escaped.pth"])
def test_an_index_naming_a_path_outside_the_directory_is_refused_whole(
        make_cluster: type[Cluster], relpath: str) -> None:
    cluster = make_cluster([("selfplay-1", "gpu_selfplay"), ("evil-1", "gpu_selfplay")])
    entry = {"kind": "models", "relpath": relpath, "size": MIB, "mtime_ns": 1,
             "hash": "a" * 64, "link_target": None}
    with HostileServer(cluster.nodes["evil-1"].port, entry) as evil:
        start(cluster, "selfplay-1")
        log = cluster.nodes["selfplay-1"].log_path
        wait_until(lambda: "cannot read the file index of evil-1" in log.read_text(), 20,
                   "the hostile index refused")
        assert evil.file_requests == 0
    root = cluster.nodes["selfplay-1"].root
    assert not list(root.rglob("escaped.pth"))
    assert not Path("/tmp/escaped.pth").exists()
    assert not any(models(cluster, "selfplay-1").iterdir())
