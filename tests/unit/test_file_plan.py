"""What a node fetches and from whom (ringsync.files.plan, kinds.FileRouting): no I/O."""

from __future__ import annotations

from ringsync.files.kinds import FileKind, FileRouting
from ringsync.files.manifest import FileRecord
from ringsync.files.plan import IndexEntry, Source, plan_fetches
from ringsync.inventory import ExternalStorage, Host, Inventory, SyncRouting

M, T = FileKind.MODELS, FileKind.TRAINING_DATA
H1, H2, H3 = "1" * 64, "2" * 64, "3" * 64


def e(relpath: str, digest: str = H1, mtime: int = 10, kind: FileKind = M,
      link: str | None = None) -> IndexEntry:
    return IndexEntry(kind, relpath, 5, mtime, "" if link else digest, link)


def rec(relpath: str, digest: str, mtime: int, kind: FileKind = M) -> FileRecord:
    return FileRecord(kind, relpath, 5, mtime, 1, digest)


def plan(peers: dict[str, list[IndexEntry]], local: list[FileRecord] = (),  # type: ignore[assignment]
         wanted: frozenset[FileKind] = frozenset({M, T}), **kw: object) -> list[tuple[str, list[str]]]:
    jobs = plan_fetches({(r.kind, r.relpath): r for r in local}, kw.get("occupied", ()),  # type: ignore[arg-type]
                        peers, wanted, kw.get("excluded", {}))  # type: ignore[arg-type]
    return [(j.entry.relpath, sorted(s.peer for s in j.sources)) for j in jobs]


def test_the_newest_version_of_a_name_wins_and_every_holder_of_that_content_is_a_source() -> None:
    peers = {"train-1": [e("canonical.pth", H2, mtime=20)],
             "sp-1": [e("canonical.pth", H1, mtime=10)],
             "sp-2": [e("production/copy.pth", H2, mtime=5)]}  # same content, another name
    assert plan(peers) == [("canonical.pth", ["sp-2", "train-1"]),
                           ("production/copy.pth", ["sp-2", "train-1"])]
    job = plan_fetches({}, (), peers, {M}, {})[0]
    assert job.entry.hash == H2
    assert Source("sp-2", M, "production/copy.pth") in job.sources


def test_nothing_is_fetched_that_is_held_or_older_or_being_written_here() -> None:
    peers = {"p": [e("a.pth", H1, 10), e("b.pth", H2, 10), e("c.pth", H3, 10)]}
    local = [rec("a.pth", H1, 3), rec("b.pth", H3, 50)]  # same content; a newer version of ours
    assert plan(peers, local, occupied={(M, "c.pth")}) == []
    assert plan(peers, [rec("b.pth", H3, 5)]) == [("a.pth", ["p"]), ("b.pth", ["p"]), ("c.pth", ["p"])]


def test_unwanted_kinds_and_excluded_sources_are_left_out() -> None:
    peers = {"bad": [e("a.pth"), e("d.npz", kind=T)], "good": [e("a.pth")]}
    assert plan(peers, wanted=frozenset({M}), excluded={H1: {"bad"}}) == [("a.pth", ["good"])]
    assert plan({"bad": [e("a.pth")]}, excluded={H1: {"bad"}}) == []


def test_a_symlink_waits_for_its_target_to_arrive_first() -> None:
    peers = {"p": [e("canonical.pth"), e("best.pth", link="canonical.pth")]}
    assert plan(peers) == [("canonical.pth", ["p"])]
    assert plan(peers, [rec("canonical.pth", H1, 10)]) == [("best.pth", [])]


def hosts() -> Inventory:
    return Inventory(hosts={h.name: h for h in [
        Host("coord", role="coordinator"), Host("t1", role="gpu_training_primary"),
        Host("sp", role="gpu_selfplay"), Host("cpu", role="cpu_selfplay"),
        Host("st", role="storage"), Host("off", role="gpu_selfplay", status="offline"),
        Host("skip", role="gpu_training_primary", skip_sync_receive=True),
        Host("pri", role="storage"), Host("ext", role="gpu_training_primary"),
    ]}, sync_routing=SyncRouting(priority_hosts=("pri",), allowed_external_storage=(
        ExternalStorage("ext", receive_npz=False),)))


def test_models_go_to_selfplay_and_training_nodes_training_data_only_to_training_nodes() -> None:
    inv = hosts()
    routing = FileRouting(inv, "sp", None)
    wants = {k: sorted(n for n, h in inv.hosts.items() if routing.wants(h, k)) for k in FileKind}
    assert wants[M] == ["cpu", "ext", "pri", "sp", "t1"]
    assert wants[T] == ["pri", "t1"]
    assert FileRouting(inv, "coord", None).kinds_wanted_here() == frozenset()
    assert FileRouting(inv, "t1", None).kinds_wanted_here() == {M, T}
    assert FileRouting(inv, "sp", "sp").kinds_wanted_here() == frozenset()  # RINGRIFT_COORDINATOR_NODE
    assert sorted(h.name for h in routing.peers()) == ["coord", "cpu", "ext", "pri", "skip", "st", "t1"]


def test_a_version_removed_here_is_not_fetched_back_but_a_newer_one_is() -> None:
    peers = {"p": [e("old_candidate.pth", H1, 10)]}
    gone = {(M, "old_candidate.pth", H1)}
    assert plan_fetches({}, (), peers, {M}, {}, gone) == []
    newer = {"p": [e("old_candidate.pth", H2, 20)]}
    assert [j.entry.hash for j in plan_fetches({}, (), newer, {M}, {}, gone)] == [H2]
