"""FileSyncDaemon: offers this node's models and training data, and pulls what it lacks."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
from collections.abc import Awaitable, Callable, Mapping

from ringsync.daemons.base import Daemon, DaemonType, Health, HealthState
from ringsync.daemons.file_cleanup import FileJanitor
from ringsync.errors import BadInputError, TransportError
from ringsync.files.fetch import Exclusions, FileFetcher
from ringsync.files.kinds import FileKind, FileRouting
from ringsync.files.layout import file_dirs, manifest_path
from ringsync.files.manifest import FileManifest
from ringsync.files.plan import FetchJob, Ident, IndexEntry, plan_fetches
from ringsync.files.relay import Relay, RelayClient, with_relays
from ringsync.files.scanner import FileScanner, ScanResult
from ringsync.files.watch import watch_renames
from ringsync.inventory import Host
from ringsync.node import NodeContext
from ringsync.ops.logsafe import bounded
from ringsync.policy.breaker import Attempt, Breakers
from ringsync.policy.chains import Outcome
from ringsync.transport.aria2 import Aria2Transport
from ringsync.transport.files import build_file_client
from ringsync.transport.rsync import (
    RsyncBatch,
    RsyncOptions,
    RsyncRun,
    admitted,
    batches,
    behind_breakers,
    bwlimit_args,
    settle,
)
from ringsync.transport.select import count_attempts

log = logging.getLogger(__name__)

# One transport's way to make a file present here: True once published, False when it
# could not now (the chain's next step is tried); a raised error ends this attempt.
FileStep = Callable[[FetchJob], Awaitable[bool]]

FETCHES_IN_FLIGHT = 4  # per file kind
INDEX_POLLS_IN_FLIGHT = 16
_JITTER = 0.1
# A fetch every source turned away (busy: it streams to as many peers as it may) is tried
# again this soon, with jitter, a bounded number of times: relays appear within a second.
QUICK_RETRY_SECONDS = 0.3
QUICK_RETRIES = 30
FILE_REQUESTS = "files"  # data_type of the per-peer client chain's steps (index reads, opens)


class FileSyncDaemon(Daemon):
    """Two loops in one task group.

    The scanner picks up complete local files (RINGRIFT_FILE_SETTLE_TIME) and records
    their hashes in the file manifest, which the data server's /v1/files routes serve.
    The puller polls every peer's /v1/files/index each RINGRIFT_FILE_POLL_INTERVAL
    (gossip will replace the polling) and fetches the newest version of each file of a
    kind this node holds (FileRouting) from any peer holding that content: a node that
    got a model serves it on, so later receivers fetch from earlier ones.
    """

    daemon_type = DaemonType.FILE_SYNC
    depends_on = (DaemonType.DATA_SERVER,)

    def __init__(self, ctx: NodeContext) -> None:
        s = ctx.settings
        self._ctx = ctx
        self._dirs = file_dirs(s)
        self._routing = FileRouting(s.inventory, s.node_id, s.coordinator_node)
        self._wanted = self._routing.kinds_wanted_here()
        # Each request's way through a peer's http/ssh steps, under data_type "files".
        self._client = build_file_client(s, ctx.breakers, ctx.ssh(),
                                         on_attempt=count_attempts(ctx.metrics, FILE_REQUESTS))
        self._relay_client = RelayClient(s.node_id, s.auth_token)
        self._exclusions = Exclusions()
        self._aria2 = Aria2Transport(s.node_id, s.auth_token, s.inventory.get, ctx.metrics,
                                     self._exclusions, min_bytes=s.transport_chains.large_file_bytes,
                                     breakers=ctx.breakers)
        self._in_flight: dict[Ident, asyncio.Task[None]] = {}
        self._janitor = FileJanitor(self._dirs, ctx.metrics, s.file_abandon_after)
        # Per kind: a backlog of training data never holds the slots a new model needs here
        # (the serving side then gives the model its priority's share of the bandwidth).
        self._slots = {kind: asyncio.Semaphore(FETCHES_IN_FLIGHT) for kind in FileKind}
        self._failing_peers: set[str] = set()
        self._stuck: set[Ident] = set()  # files no source could serve last time
        self._quick: dict[Ident, int] = {}  # quick retries spent per file
        self._retry = asyncio.Event()  # a fetch failed: poll again soon
        self._rsync_missed: set[Ident] = set()  # a failed rsync run's files: one by one next
        self._stopping = False
        self._wake = asyncio.Event()  # a file was renamed into place: scan now
        self._health = Health(HealthState.STARTING)

    async def run(self, ready: Callable[[], None]) -> None:
        manifest = await asyncio.to_thread(FileManifest, manifest_path(self._ctx.settings))
        try:
            await asyncio.to_thread(self._janitor.at_start, manifest,
                                    lambda peer: self._over_ssh(peer) is not None)
            s = self._ctx.settings
            scanner = FileScanner(self._dirs, manifest, s.file_settle_time)
            fetcher = FileFetcher(self._dirs, manifest, self._client, self._ctx.metrics,
                                  s.inventory.get, self._exclusions, self._aria2)
            # The transports a file's chain (RINGRIFT_TRANSPORT_CHAINS) may name, as built
            # here: aria2 (every holder at once, when two or more hold it) and http (one source
            # at a time, relays included); rsync plugs in with the same FileStep shape.
            steps: dict[str, FileStep] = {
                "aria2": functools.partial(fetcher.fetch, single=False),
                "http": functools.partial(fetcher.fetch, multi=False),
            }
            log.info("file sync: models in %s, training data in %s; fetching %s", s.models_dir,
                     s.training_dir, ", ".join(sorted(k.value for k in self._wanted)) or "nothing")
            self._health = Health(HealthState.HEALTHY)
            ready()
            # What is on disk here is known before any download may land beside it.
            self._note(await asyncio.to_thread(scanner.scan))
            async with asyncio.TaskGroup() as tg:
                tg.create_task(watch_renames(self._dirs, functools.partial(self._renamed, scanner)))
                tg.create_task(self._scan_loop(scanner, manifest))
                if self._wanted:
                    tg.create_task(self._pull_loop(tg, scanner, manifest, fetcher, steps))
        finally:
            self._health = Health(HealthState.STOPPED)
            await asyncio.shield(self._client.close())
            await asyncio.shield(self._aria2.close())
            await asyncio.shield(self._relay_client.close())
            await asyncio.shield(asyncio.to_thread(manifest.close))

    async def drain(self) -> None:
        # Downloads are journalled and resume after a restart: none is waited for.
        self._stopping = True

    def health(self) -> Health:
        return self._health

    # -- local pickup -------------------------------------------------------------------------

    def _renamed(self, scanner: FileScanner, kind: FileKind, relpath: str) -> None:
        scanner.note_renamed(kind, relpath)
        self._wake.set()

    async def _scan_loop(self, scanner: FileScanner, manifest: FileManifest) -> None:
        every = max(0.1, min(1.0, self._ctx.settings.file_settle_time / 2))
        while not self._stopping:
            self._wake.clear()
            result = await asyncio.to_thread(scanner.scan)
            self._note(result)
            held = await asyncio.to_thread(manifest.records)
            for kind in FileKind:
                self._ctx.metrics.files_held.labels(kind=kind.value).set(
                    sum(1 for r in held if r.kind is kind))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(every):
                    await self._wake.wait()

    def _note(self, result: ScanResult) -> None:
        for rec in result.picked_up:
            self._ctx.metrics.files_picked_up.labels(kind=rec.kind.value).inc()
            what = f"-> {rec.link_target}" if rec.link_target else f"{rec.size} bytes, {rec.hash[:16]}…"
            log.info("offering %s/%s (%s)", rec.kind.value, rec.relpath, what)
        for kind, relpath in result.forgotten:
            log.info("no longer offering %s/%s (removed or no longer complete)", kind.value, relpath)

    # -- pulling from peers ---------------------------------------------------------------------

    async def _pull_loop(self, tg: asyncio.TaskGroup, scanner: FileScanner, manifest: FileManifest,
                         fetcher: FileFetcher, steps: Mapping[str, FileStep]) -> None:
        interval = self._ctx.settings.file_poll_interval
        while not self._stopping:
            indexes = await self._poll_indexes()
            local = {(r.kind, r.relpath): r for r in await asyncio.to_thread(manifest.records)}
            gone = await asyncio.to_thread(manifest.gone)
            jobs = plan_fetches(local, scanner.unsettled(), indexes, self._wanted,
                                self._exclusions.by_hash, gone)
            await asyncio.to_thread(self._janitor.sweep, manifest, [p.name for p in self._routing.peers()],
                                    indexes, jobs, set(self._in_flight))
            self._start_batches(tg, fetcher, [j for j in jobs if j.entry.ident not in self._in_flight])
            if any(ident not in self._in_flight for ident in (j.entry.ident for j in jobs)):
                jobs = with_relays(jobs, await self._poll_relays(), self._exclusions.by_hash)
            for job in jobs:
                ident = job.entry.ident
                if ident not in self._in_flight and not self._stopping:
                    self._in_flight[ident] = tg.create_task(self._fetch(steps, job))
            self._update_health(local)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval * random.uniform(1 - _JITTER, 1 + _JITTER)):
                    await self._retry.wait()
                    await asyncio.sleep(QUICK_RETRY_SECONDS * random.uniform(0.5, 1.5))
            self._retry.clear()

    async def _poll_indexes(self) -> dict[str, list[IndexEntry]]:
        limit = asyncio.Semaphore(INDEX_POLLS_IN_FLIGHT)
        peers = self._routing.peers()

        async def one(peer: Host) -> list[IndexEntry] | None:
            async with limit:
                try:
                    entries = await self._client.index(peer)
                except (TransportError, BadInputError) as exc:
                    if peer.name not in self._failing_peers:
                        self._failing_peers.add(peer.name)
                        log.warning("cannot read the file index of %s: %s", peer.name,
                                    bounded(str(exc)))
                    return None
            if peer.name in self._failing_peers:
                self._failing_peers.discard(peer.name)
                log.info("file index of %s readable again", peer.name)
            return entries

        answers = await asyncio.gather(*(one(p) for p in peers))
        return {p.name: a for p, a in zip(peers, answers, strict=True) if a is not None}

    async def _poll_relays(self) -> dict[str, list[Relay]]:
        """Peers' downloads in progress: sources for receivers the holders turn away."""
        peers = self._routing.peers()
        answers = await asyncio.gather(*(self._relay_client.relays(p) for p in peers))
        return {p.name: a for p, a in zip(peers, answers, strict=True) if a}

    async def _fetch(self, steps: Mapping[str, FileStep], job: FetchJob) -> None:
        e = job.entry
        try:
            async with self._slots[e.kind]:
                if self._stopping or await self._through_chain(steps, job):
                    self._stuck.discard(e.ident)
                    self._quick.pop(e.ident, None)
                    return
                if self._quick.get(e.ident, 0) < QUICK_RETRIES:
                    self._quick[e.ident] = self._quick.get(e.ident, 0) + 1
                    self._retry.set()
                if e.ident not in self._stuck:  # logged when it starts failing, not each round
                    self._stuck.add(e.ident)
                    log.info("%s/%s not fetched: no source could serve it now; retrying every "
                             "poll", e.kind.value, e.relpath)
        except (OSError, TransportError, BadInputError) as exc:
            log.warning("fetching %s/%s failed: %s", e.kind.value, e.relpath, bounded(str(exc)))
        finally:
            self._in_flight.pop(e.ident, None)
            self._rsync_missed.discard(e.ident)  # it had its turn one by one

    async def _through_chain(self, steps: Mapping[str, FileStep], job: FetchJob) -> bool:
        """The job's chain, step by step, until one publishes the file; each step counted."""
        e = job.entry
        for name in self._ctx.settings.transport_chains.for_file(e.kind.value, e.size):
            step = steps.get(name)
            if step is None:
                self._attempted(e.kind, name, Outcome.UNAVAILABLE)
                continue
            try:
                done = await step(job)
            except (OSError, TransportError, BadInputError):
                self._attempted(e.kind, name, Outcome.FAILED)
                raise
            self._attempted(e.kind, name, Outcome.OK if done else Outcome.NEXT)
            if done:
                return True
        return False

    def _attempted(self, kind: FileKind, transport: str, outcome: Outcome) -> None:
        count_attempts(self._ctx.metrics, kind.value)(transport, outcome)

    # -- many small files from one SSH peer: one rsync run -----------------------------------------

    def _over_ssh(self, name: str) -> Host | None:
        host = self._ctx.settings.inventory.get(name)
        if host is None or "ssh" not in (host.transport or self._ctx.settings.transport_order):
            return None
        return host

    def _remote_root(self, host: Host, kind: FileKind) -> str:
        """Where the peer keeps ``kind``: its inventory models_dir / training_dir, else the
        same path as here (one layout cluster-wide)."""
        theirs = host.models_dir if kind is FileKind.MODELS else host.training_dir
        return theirs or str(self._dirs[kind])

    def _start_batches(self, tg: asyncio.TaskGroup, fetcher: FileFetcher, jobs: list[FetchJob]) -> None:
        """Files owed by one SSH-reachable peer, RINGRIFT_RSYNC_MIN_FILES or more of them,
        go in one rsync run while that peer's rsync breaker lets one start; the rest (and any
        a batch did not deliver) are fetched one by one."""
        if self._stopping:
            return
        breakers = self._ctx.breakers
        jobs = [j for j in jobs if j.entry.ident not in self._rsync_missed]
        groups = batches(jobs, behind_breakers(breakers, self._over_ssh), self._exclusions.by_hash,
                         self._ctx.settings.rsync_min_files)
        for run in admitted(groups, breakers):
            task = tg.create_task(self._rsync(fetcher, run))
            # However the task ends (even cancelled before it ran), its attempt ends: a run
            # that told its breaker nothing leaves no probe slot held (a second end is a no-op).
            task.add_done_callback(_ends(breakers, run.attempt))
            for f in run.files:
                self._in_flight[f.entry.ident] = task

    async def _rsync(self, fetcher: FileFetcher, run: RsyncRun) -> None:
        s, host, peer, kind = self._ctx.settings, self._over_ssh(run.peer), run.peer, run.kind
        try:
            async with self._slots[kind]:
                if host is None or self._stopping:
                    return  # nothing ran: no verdict (the task's end releases the attempt)
                opts = RsyncOptions.from_settings(s, extra_args=bwlimit_args(s.bandwidth_limits, peer))
                batch = RsyncBatch(self._dirs[kind], opts, fetcher.publish_staged, fetcher.reject_copy,
                                   tunnels=self._ctx.ssh())
                result = await batch.fetch(host, self._remote_root(host, kind), run.files)
        except (OSError, TransportError) as exc:
            settle(self._ctx.breakers, run, exc)
            log.warning("rsync of %d %s files from %s failed: %s; fetching them one by one next",
                        len(run.files), kind.value, peer, bounded(str(exc)))
            self._attempted(kind, "rsync", Outcome.NEXT)
            self._rsync_missed.update(f.entry.ident for f in run.files)
            self._retry.set()
        else:
            settle(self._ctx.breakers, run, None)
            log.info("rsync from %s: %d of %d %s files published, %d corrupt", peer,
                     len(result.published), len(run.files), kind.value, len(result.corrupt))
            self._attempted(kind, "rsync", Outcome.OK)
        finally:
            for f in run.files:
                self._in_flight.pop(f.entry.ident, None)

    def _update_health(self, local: Mapping[Ident, object]) -> None:
        detail = f"{len(local)} files held, {len(self._in_flight)} fetching"
        if self._failing_peers:
            detail += f", index unreadable at {len(self._failing_peers)} peers"
        self._health = Health(HealthState.HEALTHY, detail)


def _ends(breakers: Breakers, attempt: Attempt) -> Callable[[object], None]:
    """A done-callback that ends ``attempt`` without a verdict (a no-op once it was told one)."""
    return lambda _task: breakers.release(attempt)
