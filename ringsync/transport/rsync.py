"""Many small files from one peer in one rsync run over SSH, verified here before publication.

One ``rsync --files-from`` run per batch (one process pair) instead of one request per
file; its ssh rides the node's SSH connection to the peer (the master's control socket,
``ssh -S``) when the node has one, so rsync adds no login. rsync writes into a staging
directory beside the destination (a dot directory: never scanned, watched or shipped;
same file system, so publication is a rename), keeps interrupted files in
``--partial-dir`` so the next run resumes them, and checks host keys against
RINGRIFT_SSH_KNOWN_HOSTS (StrictHostKeyChecking=yes, never accept-new). rsync's own
checksums are not trusted: each staged file is hashed (BLAKE3) and published atomically
only when it matches the peer's index; a mismatch is discarded.

A peer's rsync runs sit behind its circuit breaker for transport ``rsync`` (the node's
Breakers, shared with every other path): while it is open, that peer's files are fetched
one by one; once half-open, one run probes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import signal
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ringsync.errors import PeerUnreachableError, TransientError, TransportError
from ringsync.files.hashing import hash_file
from ringsync.files.kinds import FileKind
from ringsync.files.plan import FetchJob, IndexEntry, Source
from ringsync.inventory import Host
from ringsync.ops.logsafe import bounded, child_env
from ringsync.policy.bandwidth import BandwidthLimits, bytes_per_second
from ringsync.policy.breaker import Attempt, Breakers
from ringsync.transport.ssh_login import Login, login_refusal, ssh_address, ssh_args, ssh_refused
from ringsync.transport.ssh_tunnel import SshTunnels

log = logging.getLogger(__name__)

STAGING_DIR = ".ringsync-rsync"  # under a kind's directory: a dot-dir, skipped by scan and watch
PARTIAL_DIR = ".rsync-partial"  # inside the staging dir; rsync resumes interrupted files from it
IO_TIMEOUT = 60  # rsync --timeout: a stall this long fails the run (there is no total timeout)
_STOP_TIMEOUT = 5.0
_SSH_FAILED = 255  # rsync's exit code when the ssh it ran failed (connect, host key, login)
# rsync's "protocol data stream" error: also what it exits with when its ssh dies before
# rsync notices (a race seen with a changed host key), so ssh's own words decide then.
_STREAM_ERROR = 12
_NO_REMOTE_RSYNC = 127
_SOME_FILES_FAILED = (23, 24)  # partial transfer / source files vanished: the rest arrived
RSYNC = "rsync"  # the transport name of rsync runs' circuit breakers


@dataclass(frozen=True, slots=True)
class RsyncOptions(Login):
    """How rsync logs in to peers (the node's SSH settings); the host's own ssh_* fields come
    from the inventory."""

    io_timeout: int = IO_TIMEOUT
    rsync: str = "rsync"
    extra_args: tuple[str, ...] = ()  # e.g. ("--bwlimit=20m",) in tests and benchmarks


@dataclass(frozen=True, slots=True)
class BatchFile:
    """One file owed by the batch's peer: what we want, and the peer's name for its content."""

    entry: IndexEntry
    source: Source


@dataclass
class BatchResult:
    published: list[IndexEntry] = field(default_factory=list)
    corrupt: list[IndexEntry] = field(default_factory=list)  # bytes differ from the index's hash
    missing: list[IndexEntry] = field(default_factory=list)  # not (fully) arrived this run
    bytes_received: int = 0  # on the wire, rsync's --stats figure (a resumed file costs less)


# (entries with their verified staged files, how) -> the entries published
Publish = Callable[[Sequence[tuple[IndexEntry, Path]], str], list[IndexEntry]]
Reject = Callable[[IndexEntry, str, str], None]  # (entry, peer, why): a wrong copy was discarded


def ssh_command(peer: Host, opts: RsyncOptions, control: Path | None = None) -> list[str]:
    """The ``ssh`` rsync runs: the inventory's key and port, host keys checked strictly; over
    the master at ``control`` when given (ssh logs in itself if that master is gone)."""
    cmd = ssh_args(peer, opts)
    if control is not None:
        cmd += ["-S", str(control), "-o", "ControlMaster=no"]
    return cmd


def rsync_command(peer: Host, remote_root: str, files_from: Path, staging: Path,
                  opts: RsyncOptions, control: Path | None = None) -> list[str]:
    return [opts.rsync, "--files-from", str(files_from), "--from0", "--times", "--protect-args",
            "--partial-dir", PARTIAL_DIR, "--timeout", str(opts.io_timeout), "--no-motd", "--stats",
            *opts.extra_args,
            "-e", shlex.join(ssh_command(peer, opts, control)),
            f"{ssh_address(peer)}:{remote_root.rstrip('/')}/", f"{staging}/"]


def bwlimit_args(limits: BandwidthLimits, peer: str) -> tuple[str, ...]:
    """rsync cannot draw from the node's token buckets: it is capped at the smaller of the
    peer's limit and the node's total instead (``--bwlimit`` in KiB/s)."""
    caps = [c for c in (bytes_per_second(limits.peer_mbps(peer)), bytes_per_second(limits.total_mbps))
            if c]
    return (f"--bwlimit={max(1, int(min(caps) // 1024))}",) if caps else ()


def batches(jobs: Iterable[FetchJob], over_ssh: Callable[[str], Host | None],
            excluded: Mapping[str, set[str]], min_files: int) -> dict[tuple[str, FileKind], list[BatchFile]]:
    """Jobs worth one rsync run: grouped by (peer, kind), the peer the first SSH-reachable
    holder of each file, kept only where a group has at least ``min_files`` files. No I/O."""
    groups: dict[tuple[str, FileKind], list[BatchFile]] = {}
    if min_files <= 0:
        return groups
    taken: set[tuple[str, FileKind, str]] = set()  # one staged file feeds one name
    for job in jobs:
        if job.entry.link_target is not None:
            continue
        for s in job.sources:
            if s.kind is job.entry.kind and s.peer not in excluded.get(job.entry.hash, ()) \
                    and (s.peer, s.kind, s.relpath) not in taken and over_ssh(s.peer) is not None:
                taken.add((s.peer, s.kind, s.relpath))
                groups.setdefault((s.peer, s.kind), []).append(BatchFile(job.entry, s))
                break
    return {key: files for key, files in groups.items() if len(files) >= min_files}


@dataclass(frozen=True, slots=True)
class RsyncRun:
    """One batch its peer's breaker let start: hand ``attempt`` back with ``settle``."""

    attempt: Attempt
    kind: FileKind
    files: list[BatchFile]

    @property
    def peer(self) -> str:
        return self.attempt.peer


def behind_breakers(breakers: Breakers, over_ssh: Callable[[str], Host | None]
                    ) -> Callable[[str], Host | None]:
    """``over_ssh`` for ``batches`` minus the peers whose rsync breaker would turn a run away,
    so their files go to another holder's batch or one by one. Nothing changes."""
    def usable(peer: str) -> Host | None:
        return over_ssh(peer) if breakers.get(peer, RSYNC).would_allow() else None
    return usable


def admitted(groups: Mapping[tuple[str, FileKind], list[BatchFile]], breakers: Breakers) -> list[RsyncRun]:
    """The batches whose peer's breaker lets a run start now. A half-open breaker admits one
    (its probe); the files of the others are left to the per-file chain."""
    runs = []
    for (peer, kind), files in groups.items():
        attempt = breakers.allow(peer, RSYNC)
        if attempt is not None:
            runs.append(RsyncRun(attempt, kind, files))
    return runs


def settle(breakers: Breakers, run: RsyncRun, error: BaseException | None) -> None:
    """Tell the run's breaker how it went. A TransportError speaks for the link (only a
    transient one counts against it, see CircuitBreaker); a local error (a full disk) or a
    cancellation says nothing about the peer."""
    if error is None or isinstance(error, TransportError):
        breakers.record(run.attempt, error)
    else:
        breakers.release(run.attempt)


class RsyncBatch:
    """Fetches one peer's batch of files of one kind with a single rsync run."""

    def __init__(self, root: Path, opts: RsyncOptions, publish: Publish, reject: Reject, *,
                 tunnels: SshTunnels | None = None) -> None:
        self._root = root
        self._opts = opts
        self._publish = publish
        self._reject = reject
        self._tunnels = tunnels  # the node's SSH connections: rsync runs over the peer's

    def _connection(self, peer: Host) -> contextlib.AbstractAsyncContextManager[Path | None]:
        if self._tunnels is None:
            return contextlib.nullcontext()
        return self._tunnels.control_path(peer)

    def staging(self, peer: str) -> Path:
        return self._root / STAGING_DIR / peer

    async def fetch(self, peer: Host, remote_root: str, files: Sequence[BatchFile]) -> BatchResult:
        """Run rsync, then verify and publish whatever arrived whole, even after a failed run
        (its verified files need not be fetched again). Files that did not arrive are in
        ``missing``; a run that failed as a whole raises afterwards: PeerUnreachableError
        when ssh could not log in, else TransientError."""
        staging = self.staging(peer.name)
        await asyncio.to_thread(_clean_staging, staging)
        wanted = {f.source.relpath for f in files}
        list_file = staging / PARTIAL_DIR / "files-from"
        await asyncio.to_thread(_write_list, list_file, sorted(wanted))
        try:
            async with self._connection(peer) as control:
                cmd = rsync_command(peer, remote_root, list_file, staging, self._opts, control)
                code, stdout, stderr = await _run(cmd, peer.name)
        finally:
            await asyncio.to_thread(list_file.unlink, missing_ok=True)
        result = await asyncio.to_thread(self._settle, peer.name, staging, files)
        result.bytes_received = _received(stdout)
        if code in _SOME_FILES_FAILED:  # e.g. removed at the peer since its index was read
            log.info("rsync from %s: %d of %d files did not arrive (%s)", peer.name, len(result.missing),
                     len(files), bounded(" ".join(stderr.split()), 300))
        elif code != 0:
            raise _failure(peer, code, stderr, self._opts)
        await asyncio.to_thread(_remove_if_empty, staging)
        return result

    def _settle(self, peer: str, staging: Path, files: Sequence[BatchFile]) -> BatchResult:
        """Hash each staged file against the index; publish the ones that match, together."""
        result, verified = BatchResult(), []
        for f in files:
            staged, e = staging / f.source.relpath, f.entry
            try:
                if not staged.is_file() or staged.is_symlink() or staged.stat().st_size != e.size:
                    result.missing.append(e)
                    continue
                digest = hash_file(staged)
            except OSError:
                result.missing.append(e)
                continue
            if digest != e.hash:
                why = f"content hash {digest[:16]}… is not the expected {e.hash[:16]}…"
                with contextlib.suppress(FileNotFoundError):
                    staged.unlink()
                self._reject(e, peer, why)
                result.corrupt.append(e)
                continue
            verified.append((e, staged))
        published = self._publish(verified, f"rsync from {peer}")
        result.published.extend(published)
        done = {e.ident for e in published}
        result.missing.extend(e for e, _ in verified if e.ident not in done)
        return result


def _clean_staging(staging: Path) -> None:
    """Make the staging dir; drop temp files a killed rsync left (dot-files outside the
    partial dir: a SIGKILLed rsync cannot move its temp file there, so it cannot resume it)."""
    staging.mkdir(parents=True, exist_ok=True)
    for current, dirnames, filenames in os.walk(staging):
        dirnames[:] = [d for d in dirnames if d != PARTIAL_DIR]
        for name in filenames:
            if name.startswith("."):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(current, name))


def _received(stats: str) -> int:
    for line in stats.splitlines():
        if line.startswith("Total bytes received:"):
            with contextlib.suppress(ValueError):
                return int(line.split(":", 1)[1].strip().replace(",", ""))
    return 0


def _write_list(path: Path, relpaths: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(os.fsencode(r) + b"\0" for r in relpaths))


def _remove_if_empty(staging: Path) -> None:
    """Leave nothing behind after a clean run; a partial dir with resumable data stays."""
    for current, _, _ in sorted(os.walk(staging), key=lambda w: -len(w[0])):
        with contextlib.suppress(OSError):
            os.rmdir(current)
    with contextlib.suppress(OSError):
        staging.parent.rmdir()  # .ringsync-rsync itself, once no peer's staging is left


async def _run(cmd: list[str], peer: str) -> tuple[int, str, str]:
    """rsync in its own process group; cancelled: the group is stopped (bounded), then re-raised."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, start_new_session=True, env=child_env(LC_ALL="C"))
    except FileNotFoundError as exc:
        raise PeerUnreachableError(peer, f"{cmd[0]} is not installed on this node "
                                         "(apt-get install rsync); files are fetched one by one") from exc
    try:
        out, err = await proc.communicate()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(TimeoutError, ProcessLookupError):
            async with asyncio.timeout(_STOP_TIMEOUT):
                await asyncio.shield(proc.wait())
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")


def _failure(peer: Host, code: int, stderr: str, login: Login) -> TransportError:
    said = bounded(" ".join(stderr.split()), 400) or "nothing on stderr"
    if code == _SSH_FAILED or (code == _STREAM_ERROR and ssh_refused(stderr)):
        return login_refusal(peer, stderr, login, prefix="rsync: ", nothing="nothing was fetched")
    if code == _NO_REMOTE_RSYNC:
        return PeerUnreachableError(peer.name, f"rsync is not installed on {peer.name} ({said}); install "
                                               "it there, or files are fetched one by one")
    return TransientError(peer.name, f"rsync exited with {code}: {said}")
