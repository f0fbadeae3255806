"""Files over SSH on loopback, ringsync vs rsync in the same run (real sshd, real rsync).

1. One big model (default 1 GiB): ringsync's FileFetcher through its SSH tunnel (an OpenSSH
   master's local port forward to a real `ringsync run` node's data server on 127.0.0.1) vs
   `rsync -W -e ssh` of the same file (whole file, no delta).
2. Many small files (default 10,000) in one batch: ringsync's rsync path (RsyncBatch: one
   `rsync --files-from` over ssh into a staging dir, then BLAKE3 of each file against the
   index and an atomic publish) vs one plain `rsync --files-from` run over the same files.

    python3 bench/ssh_file.py [--size-mib 1024] [--runs 3] [--files 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import time
from pathlib import Path

from _common import emit_result, fmt, print_table, run_bounded, temp_root
from _files import (
    MIB,
    SOURCE,
    fetch_once,
    fresh_step,
    fsync_file,
    inventory_host,
    median,
    offered,
    source_node,
)
from _sshd import SshServer, sshd_server

from ringsync.files.client import FileClient
from ringsync.files.fetch import Exclusions, FileFetcher
from ringsync.files.hashing import hash_file
from ringsync.files.kinds import FileKind
from ringsync.files.manifest import FileManifest
from ringsync.files.plan import IndexEntry, Source
from ringsync.inventory import Host
from ringsync.ops.metrics import Metrics
from ringsync.transport.files import SshFileClient
from ringsync.transport.rsync import BatchFile, RsyncBatch, RsyncOptions
from ringsync.transport.ssh_tunnel import SshOptions, SshTunnels

TARGET_BIG = 1.0
M = FileKind.MODELS


def ssh_fields(server: SshServer) -> dict[str, object]:
    return {"ssh_host": server.host, "ssh_port": server.port, "ssh_user": server.user,
            "ssh_key": str(server.client_key), "transport": "ssh"}


def big_file(server: SshServer, root: Path, size: int, runs: int) -> dict[str, float]:
    with source_node(root / "cluster", size, ssh_fields(server)) as (cluster, model):
        host = inventory_host(cluster, SOURCE)
        token = cluster.token

        def client() -> SshFileClient:
            return SshFileClient(FileClient("bench", token, read_timeout=60.0),
                                 SshTunnels(SshOptions(known_hosts=server.known_hosts)))

        entry = offered(client, host)
        ours, ref, ref_sync = [], [], []
        for run in range(runs):
            dest = root / f"ringsync-{run}"
            fresh_step(root / "scratch", size)
            ours.append(fetch_once(client, host, entry, dest))
            shutil.rmtree(dest)
            out = root / "rsync-out"
            out.mkdir()
            fresh_step(root / "scratch", size)
            took = run_bounded(["rsync", "-W", "-e", server.rsync_rsh(), server.target(model),
                                f"{out}/"], 600)
            ref.append(took)
            ref_sync.append(took + fsync_file(out / model.name))
            shutil.rmtree(out)
            time.sleep(0.5)
    mb = size / MIB
    return {"ringsync_ssh_mib_s": mb / median(ours), "rsync_W_mib_s": mb / median(ref),
            "rsync_W_fsync_mib_s": mb / median(ref_sync)}


def small_files(server: SshServer, root: Path, count: int, runs: int) -> dict[str, float]:
    remote = root / "peer-models"
    files = []
    for i in range(count):
        relpath = f"production/cfg_{i % 20:02d}/m_{i:05d}.pth"
        path = remote / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(1024 + (i * 37) % 3072))
        st = path.stat()
        files.append(BatchFile(IndexEntry(M, relpath, st.st_size, st.st_mtime_ns, hash_file(path)),
                               Source(SOURCE, M, relpath)))
    peer = Host(SOURCE, ssh_host=server.host, ssh_port=server.port, ssh_user=server.user,
                ssh_key=str(server.client_key), transport=("ssh",))
    listing = root / "list"
    listing.write_text("".join(f.source.relpath + "\n" for f in files))
    ours, ref = [], []
    for run in range(runs):  # alternated, each into an empty directory, each from no dirty pages
        os.sync()
        ours.append(asyncio.run(_rsync_batch(server, root / f"ringsync-{run}", peer, str(remote), files)))
        shutil.rmtree(root / f"ringsync-{run}")
        out = root / f"rsync-{run}"
        os.sync()
        ref.append(run_bounded(["rsync", "-t", "--files-from", str(listing), "-e", server.rsync_rsh(),
                                server.target(f"{remote}/"), f"{out}/"], 600))
        got = sum(1 for _ in out.rglob("*.pth"))
        if got != count:
            raise RuntimeError(f"plain rsync delivered {got} of {count} files")
        shutil.rmtree(out)
    ours_s, ref_s = median(ours), median(ref)
    return {"ringsync_batch_s": ours_s, "rsync_s": ref_s,
            "ringsync_ms_per_file": 1000 * ours_s / count, "rsync_ms_per_file": 1000 * ref_s / count}


async def _rsync_batch(server: SshServer, here: Path, peer: Host, remote: str,
                       files: list[BatchFile]) -> float:
    models = here / "models"
    models.mkdir(parents=True)
    manifest = FileManifest(here / "files.db")
    try:
        fetcher = FileFetcher({M: models}, manifest, FileClient("bench", None), Metrics(), lambda _: None,
                              Exclusions())
        batch = RsyncBatch(models, RsyncOptions(known_hosts=server.known_hosts), fetcher.publish_staged,
                           fetcher.reject_copy)
        started = time.perf_counter()
        result = await batch.fetch(peer, remote, files)
        elapsed = time.perf_counter() - started
    finally:
        manifest.close()
    if len(result.published) != len(files):
        raise RuntimeError(f"ringsync published {len(result.published)} of {len(files)} files")
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--skip-big", action="store_true")
    args = ap.parse_args()
    figures: dict[str, object] = {"size_mib": args.size_mib, "runs": args.runs, "files": args.files}
    with temp_root("sshfile") as root, sshd_server() as server:
        if not args.skip_big:
            big = big_file(server, root / "big", args.size_mib * MIB, args.runs)
            print_table(f"{args.size_mib} MiB over SSH on loopback (median of {args.runs})",
                        ["path", "MiB/s", "vs rsync -W", "vs rsync -W + fsync"],
                        [[k, fmt(v), fmt(v / big["rsync_W_mib_s"], 2), fmt(v / big["rsync_W_fsync_mib_s"], 2)]
                         for k, v in big.items()])
            ratio = big["ringsync_ssh_mib_s"] / big["rsync_W_mib_s"]
            figures.update({k: round(v, 1) for k, v in big.items()})
            figures.update({"ratio_vs_rsync_W": round(ratio, 3), "target_big": TARGET_BIG,
                            "met_big": ratio >= TARGET_BIG})
        small = small_files(server, root / "small", args.files, args.runs)
        print_table(f"{args.files:,} small files over SSH in one batch (median of {args.runs})",
                    ["path", "seconds", "ms per file"],
                    [["ringsync (rsync + BLAKE3 + atomic publish)", fmt(small["ringsync_batch_s"], 2),
                      fmt(small["ringsync_ms_per_file"], 3)],
                     ["plain rsync --files-from", fmt(small["rsync_s"], 2),
                      fmt(small["rsync_ms_per_file"], 3)]])
        figures.update({k: round(v, 3) for k, v in small.items()})
        figures["met_small"] = small["ringsync_ms_per_file"] <= small["rsync_ms_per_file"]
    emit_result("ssh_file", figures)


if __name__ == "__main__":
    main()
