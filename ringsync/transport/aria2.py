"""Aria2Transport: one large file fetched from every peer holding it at once, with aria2c.

aria2c runs as a subprocess fed an input file (mode 0600, in a private temp directory,
removed after the run): the cluster token is in that file's header lines, never on a
command line (visible in ``ps``) nor in a log. It writes the FileFetcher's ``.part`` temp
file and keeps its own control file beside it (``<part>.aria2``), so a run that is killed
resumes where its pieces were saved.

aria2 cannot say which source served which segment, so the content hash (BLAKE3 of the
whole file) is checked afterwards. When it is wrong, each source's piece list
(/v1/pieces/...) shows which 4 MiB pieces are in dispute; those are fetched again by Range,
source by source, until the file verifies. Every source whose pieces differ from the
verified file, or whose bytes differ from its own piece list, is excluded for that content.

Each source sits behind its circuit breaker for transport ``aria2``: one whose breaker is
open is not handed to aria2c. aria2c reports per server host (``--server-stat-of``), not
per source, whether it could connect: a host it could not connect to or that timed out
(status ERROR) counts against that source's breaker, one that served bytes (OK) closes
it. A source that shares its host with another cannot be told apart and gives no verdict;
an HTTP error answer (busy, not found) gives none either (aria2c records no status for it).
Wrong bytes are not a link failure: they stay with the exclusions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from blake3 import blake3
from yarl import URL

from ringsync.errors import BadInputError, PeerUnreachableError
from ringsync.files.fetch import Exclusions
from ringsync.files.layout import file_url_path
from ringsync.files.pieces import PIECES_PREFIX, hash_pieces, parse_claims, piece_span
from ringsync.files.plan import IndexEntry, Source
from ringsync.inventory import Host
from ringsync.ops.logsafe import bounded, child_env
from ringsync.ops.metrics import Metrics
from ringsync.ops.peer_session import NODE_HEADER, PeerSession
from ringsync.policy.breaker import Attempt, Breakers

log = logging.getLogger(__name__)

ARIA2C = "aria2c"
CONTROL_SUFFIX = ".aria2"
MIXED = "aria2-mixed"  # the metric's source label for bytes aria2 fetched from several peers
FAILURES_BEFORE_FALLBACK = 3
ARIA2 = "aria2"  # the transport name of the sources' circuit breakers
SERVER_STATS = "server-stats"  # aria2c's --server-stat-of file, in the run's private dir
_STDERR_LIMIT = 2000


@dataclass(frozen=True, slots=True)
class Mirror:
    peer: str
    url: str

    @property
    def host(self) -> str:
        return URL(self.url).host or ""


def server_verdicts(stats: str, mirrors: Sequence[Mirror]) -> dict[str, bool]:
    """Per source, from aria2c's server stats (lines of ``key=value, ...``): False when aria2c
    could not connect to its host or it timed out (status=ERROR), True when it served
    (status=OK). A source absent here, or sharing its host with another, is left out."""
    by_host: dict[str, list[str]] = {}
    for m in mirrors:
        by_host.setdefault(m.host, []).append(m.peer)
    verdicts = {}
    for line in stats.splitlines():
        fields = {k.strip(): v.strip() for k, _, v in (f.partition("=") for f in line.split(","))}
        peers = by_host.get(fields.get("host", ""), [])
        if len(peers) == 1 and fields.get("status") in ("OK", "ERROR"):
            verdicts[peers[0]] = fields["status"] == "OK"
    return verdicts


class Aria2Transport:
    """Multi-source fetches for the FileFetcher (its ``multi`` hook)."""

    def __init__(self, node_id: str, token: str | None, hosts: Callable[[str], Host | None],
                 metrics: Metrics, exclusions: Exclusions, *, min_bytes: int,
                 read_timeout: float = 30.0, binary: str | None = None,
                 breakers: Breakers | None = None) -> None:
        self._node_id = node_id
        self._token = token  # also written (0600) into aria2c's input file
        self._hosts = hosts
        self._metrics = metrics
        self._exclusions = exclusions
        self._min_bytes = min_bytes
        self._breakers = breakers  # the node's; None: every source is always tried
        self._read_timeout = read_timeout
        self._binary = binary if binary is not None else shutil.which(ARIA2C)
        self._failures: dict[str, int] = {}  # content hash -> aria2 runs failed in a row
        self._session = PeerSession(node_id, token, aiohttp.ClientTimeout(
            total=None, connect=10, sock_read=read_timeout))
        self.running: dict[str, asyncio.subprocess.Process] = {}  # content hash -> aria2c

    @property
    def available(self) -> bool:
        return self._binary is not None

    def mirrors(self, e: IndexEntry, sources: Sequence[Source]) -> list[Mirror]:
        excluded = self._exclusions.by_hash.get(e.hash, set())
        out, seen = [], set()
        for s in sources:
            host = self._hosts(s.peer)
            if host is None or s.peer in excluded or s.peer in seen or not self._may_try(s.peer):
                continue
            seen.add(s.peer)
            url = URL.build(scheme="http", host=host.address, port=host.p2p_port,
                            path=file_url_path(s.kind, s.relpath))
            out.append(Mirror(s.peer, str(url)))
        return out

    def _may_try(self, peer: str) -> bool:
        return self._breakers is None or self._breakers.get(peer, ARIA2).would_allow()

    def wants(self, e: IndexEntry, sources: Sequence[Source]) -> bool:
        """Worth it: aria2c installed, the file large, and at least two sources."""
        return (self.available and e.size >= self._min_bytes
                and self._failures.get(e.hash, 0) < FAILURES_BEFORE_FALLBACK
                and len(self.mirrors(e, sources)) >= 2)

    async def close(self) -> None:
        await self._session.close()

    async def fetch_into(self, e: IndexEntry, sources: Sequence[Source], part: Path) -> bool | None:
        """Fill ``part`` with the content of ``e``. True: it holds exactly that content
        (verified); False: not now, resumed next time; None: give up on multi-source
        (``part`` removed), the caller fetches from one source."""
        attempts = self._allow(self.mirrors(e, sources))
        mirrors = list(attempts)
        if not mirrors:  # their breakers turned away since wants(): another time
            return False
        control = part.with_name(part.name + CONTROL_SUFFIX)
        verdicts: dict[str, bool] = {}
        try:  # from here every attempt is settled (released without a verdict), come what may
            resumed = await asyncio.to_thread(_prepare, part, control)
            if resumed:
                log.info("resuming the aria2 fetch of %s/%s at about %d of %d bytes", e.kind.value,
                         e.relpath, resumed, e.size)
            ok = await self._run(e, mirrors, part, verdicts)
        finally:
            self._settle(attempts, verdicts)
        if not ok:
            failures = self._failures[e.hash] = self._failures.get(e.hash, 0) + 1
            if failures >= FAILURES_BEFORE_FALLBACK:
                await asyncio.to_thread(_remove, part, control)
                self._metrics.file_multi_source_fetches.labels(outcome="fallback").inc()
                return None
            self._metrics.file_multi_source_fetches.labels(outcome="failed").inc()
            return False
        self._failures.pop(e.hash, None)
        self._metrics.file_source_bytes.labels(peer=MIXED, transport="aria2").inc(
            max(0, e.size - resumed))
        outcome = await self._verify(e, mirrors, part)
        if outcome is None:
            await asyncio.to_thread(_remove, part, control)
            self._metrics.file_multi_source_fetches.labels(outcome="fallback").inc()
            return None
        self._metrics.file_multi_source_fetches.labels(outcome=outcome).inc()
        return True

    # -- the aria2c run ------------------------------------------------------------------------

    def _allow(self, mirrors: list[Mirror]) -> dict[Mirror, Attempt | None]:
        """The mirrors whose breakers let an attempt start now, each with its attempt."""
        if self._breakers is None:
            return dict.fromkeys(mirrors)
        allowed = {m: self._breakers.allow(m.peer, ARIA2) for m in mirrors}
        return {m: a for m, a in allowed.items() if a is not None}

    def _settle(self, attempts: dict[Mirror, Attempt | None], verdicts: dict[str, bool]) -> None:
        """Each source's breaker hears whether aria2c could reach it; no verdict, no count."""
        for m, attempt in attempts.items():
            if attempt is None or self._breakers is None:
                continue
            if m.peer not in verdicts:
                self._breakers.release(attempt)
            else:
                self._breakers.record(attempt, None if verdicts[m.peer] else PeerUnreachableError(
                    m.peer, "aria2c could not connect to it, or it stopped answering"))

    async def _run(self, e: IndexEntry, mirrors: list[Mirror], part: Path,
                   verdicts: dict[str, bool]) -> bool:
        """One aria2c run; ``verdicts`` gets what its server stats say of each source."""
        assert self._binary is not None
        private = Path(tempfile.mkdtemp(prefix="ringsync-aria2-"))  # mode 0700
        try:
            conf = private / "input"
            fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(self._input_file(mirrors, part))
            argv = [self._binary, f"--input-file={conf}", "--no-conf=true", "--continue=true",
                    f"--split={len(mirrors)}", "--max-connection-per-server=1",
                    "--min-split-size=4M", "--piece-length=4M", "--file-allocation=none",
                    "--auto-file-renaming=false", "--allow-overwrite=false",
                    "--max-tries=3", "--retry-wait=1", "--connect-timeout=10", "--auto-save-interval=1",
                    f"--timeout={int(max(1, self._read_timeout))}", "--summary-interval=0",
                    "--console-log-level=error", "--download-result=hide", "--enable-color=false",
                    "--remote-time=false", "--check-certificate=false", "--http-accept-gzip=false",
                    f"--server-stat-of={private / SERVER_STATS}",
                    "--stop-with-process=" + str(os.getpid())]
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE, env=child_env())
            self.running[e.hash] = proc
            try:
                assert proc.stderr is not None
                stderr = await proc.stderr.read(64 * 1024)
                code = await proc.wait()
            except BaseException:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await asyncio.shield(proc.wait())
                raise
            finally:
                self.running.pop(e.hash, None)
            verdicts.update(server_verdicts(_read(private / SERVER_STATS), mirrors))
        finally:
            shutil.rmtree(private, ignore_errors=True)
        if code != 0:
            text = stderr.decode("utf-8", "replace")
            if self._token:
                text = text.replace(self._token, "<token>")
            log.warning("aria2c fetching %s/%s from %s stopped (exit %d): %s", e.kind.value,
                        e.relpath, ", ".join(m.peer for m in mirrors), code,
                        bounded(text.strip(), _STDERR_LIMIT) or "no message")
        return code == 0

    def _input_file(self, mirrors: list[Mirror], part: Path) -> str:
        lines = ["\t".join(m.url for m in mirrors), f" dir={part.parent}", f" out={part.name}",
                 f" header={NODE_HEADER}: {self._node_id}"]
        if self._token:
            lines.append(f" header=Authorization: Bearer {self._token}")
        return "\n".join(lines) + "\n"

    # -- verification and repair ---------------------------------------------------------------

    async def _verify(self, e: IndexEntry, mirrors: list[Mirror], part: Path) -> str | None:
        """'published' or 'repaired' when ``part`` now verifies; None when it cannot be made to."""
        whole, local = await asyncio.to_thread(_hash_path, part, e.size)
        if whole == e.hash:
            return "published"
        if not local:
            log.warning("aria2c left %s/%s at the wrong length", e.kind.value, e.relpath)
            return None
        self._metrics.file_hash_mismatches.labels(kind=e.kind.value).inc()
        claims = {m.peer: c for m in mirrors if (c := await self._claims(e, m)) is not None}
        disputed = sorted({i for c in claims.values() for i, h in enumerate(c) if h != local[i]})
        log.warning("%s/%s from %s: content hash wrong; %d of %d pieces in dispute", e.kind.value,
                    e.relpath, ", ".join(m.peer for m in mirrors), len(disputed), len(local))
        if not disputed:
            return None  # every source claims our bytes: nothing to tell the pieces apart
        # Sources whose claims agree most with the others first.
        votes: dict[tuple[int, str], int] = {}
        for c in claims.values():
            for i in disputed:
                votes[(i, c[i])] = votes.get((i, c[i]), 0) + 1
        order = sorted(claims, key=lambda p: -sum(votes[(i, claims[p][i])] for i in disputed))
        by_peer = {m.peer: m for m in mirrors}
        liars: set[str] = set()
        for peer in order:
            wrong = [i for i in disputed if claims[peer][i] != local[i]]
            got = await self._refetch(e, by_peer[peer], part, wrong, claims[peer], local)
            if got != "ok":
                if got == "lied":
                    liars.add(peer)
                continue
            whole, local = await asyncio.to_thread(_hash_path, part, e.size)
            if whole == e.hash:
                liars.update(p for p, c in claims.items() if c != local)
                self._exclude(e, liars)
                return "repaired"
        self._exclude(e, liars)
        return None

    async def _claims(self, e: IndexEntry, m: Mirror) -> list[str] | None:
        url = m.url.replace("/v1/files/", PIECES_PREFIX, 1)
        try:
            async with self._session.get().get(url) as resp:
                if resp.status != 200:
                    raise BadInputError(f"HTTP {resp.status}")
                return parse_claims(await resp.json(content_type=None), e.size, e.hash)
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError, BadInputError) as exc:
            log.info("no piece list from %s for %s/%s: %s", m.peer, e.kind.value, e.relpath,
                     bounded(str(exc), 300))
            return None

    async def _refetch(self, e: IndexEntry, m: Mirror, part: Path, pieces: list[int],
                       claimed: list[str], local: list[str]) -> str:
        """Fetch ``pieces`` from ``m`` by Range into ``part``: 'ok'; 'lied' when a piece it
        sent is not the one it claims; 'failed' when it could not send one."""
        for i in pieces:
            start, stop = piece_span(i, e.size)
            try:
                async with self._session.get().get(m.url, headers={"Range": f"bytes={start}-{stop - 1}"}
                                              ) as resp:
                    if resp.status != 206 or resp.content_length != stop - start:
                        raise BadInputError(f"HTTP {resp.status}, {resp.content_length} bytes")
                    data = await resp.content.readexactly(stop - start)
            except (aiohttp.ClientError, TimeoutError, OSError, BadInputError,
                    asyncio.IncompleteReadError) as exc:
                log.info("piece %d of %s/%s from %s: %s", i, e.kind.value, e.relpath, m.peer,
                         bounded(str(exc), 300))
                return "failed"
            self._metrics.file_source_bytes.labels(peer=m.peer, transport="http-range").inc(len(data))
            if blake3(data).hexdigest() != claimed[i]:
                log.warning("%s sent piece %d of %s/%s unlike its own piece list", m.peer, i,
                            e.kind.value, e.relpath)
                return "lied"
            await asyncio.to_thread(_write_at, part, start, data)
            local[i] = claimed[i]
        return "ok"

    def _exclude(self, e: IndexEntry, peers: set[str]) -> None:
        for peer in sorted(peers - self._exclusions.by_hash.get(e.hash, set())):
            log.warning("%s serves wrong bytes for %s/%s (%s…): not asking it for this content "
                        "again", peer, e.kind.value, e.relpath, e.hash[:16])
            self._metrics.file_source_exclusions.labels(peer=peer).inc()
        self._exclusions.add(e.hash, peers)



def _prepare(part: Path, control: Path) -> int:
    """Bytes a resumed run already holds (from aria2's control file). A part without a
    control file is not aria2's (or its run finished unverified): it is started over."""
    if not control.exists():
        with contextlib.suppress(FileNotFoundError):
            part.unlink()
        return 0
    if not part.exists():
        control.unlink()
        return 0
    return control_file_done(control)


def control_file_done(control: Path) -> int:
    """Bytes marked complete in an aria2 control file (format version 1, big endian)."""
    try:
        data = control.read_bytes()
        version, _ext, hash_len = struct.unpack_from(">HII", data, 0)
        offset = 10 + hash_len
        piece, total, _upload, bits = struct.unpack_from(">IQQI", data, offset)
        bitfield = data[offset + 24: offset + 24 + bits]
    except (OSError, struct.error):
        return 0
    if version != 1 or piece == 0:
        return 0
    done = sum(bin(b).count("1") for b in bitfield) * piece
    return int(min(done, total))


def _read(path: Path) -> str:
    """The text at ``path``; "" when there is none (aria2c writes its stats as it exits)."""
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _remove(part: Path, control: Path) -> None:
    for path in (part, control):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _hash_path(part: Path, size: int) -> tuple[str, list[str]]:
    fd = os.open(part, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        if os.fstat(fd).st_size != size:
            return "", []
        return hash_pieces(fd, size)
    finally:
        os.close(fd)


def _write_at(part: Path, start: int, data: bytes) -> None:
    fd = os.open(part, os.O_WRONLY | os.O_NOFOLLOW)
    try:
        view = memoryview(data)
        while view:
            n = os.pwrite(fd, view, start)
            start += n
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)
