"""Prometheus metrics of one node, in a registry owned by that node (no globals)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """Every metric ringsync exports; names are ringsync_* in base units.

    Labels are bounded: a peer name (cluster size), a daemon type, an outcome.
    Nothing is labelled per file or per game.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.games_discovered = Counter(
            "ringsync_games_discovered_total",
            "Completed games found in local selfplay databases.",
            registry=r,
        )
        self.games_shipped = Counter(
            "ringsync_games_shipped_total",
            "Games a peer acknowledged as merged (new at the peer).",
            ["peer"],
            registry=r,
        )
        self.games_already_present = Counter(
            "ringsync_games_already_present_total",
            "Games sent that the peer already held (retries after a crash).",
            ["peer"],
            registry=r,
        )
        self.batches_sent = Counter(
            "ringsync_batches_sent_total",
            "Game batches pushed to peers, by outcome.",
            ["peer", "outcome"],
            registry=r,
        )
        self.bytes_sent = Counter(
            "ringsync_sent_bytes_total", "Payload bytes pushed to peers.", ["peer"], registry=r
        )
        self.push_duration = Histogram(
            "ringsync_push_duration_seconds",
            "Time to push one batch and get the peer's acknowledgement.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.sync_cycles = Counter(
            "ringsync_sync_cycles_total", "Auto-sync cycles run, by trigger.", ["trigger"], registry=r
        )
        self.sync_cycle_duration = Histogram(
            "ringsync_sync_cycle_duration_seconds",
            "Duration of one auto-sync cycle: finding new games and queueing them for every "
            "target (each target's delivery runs on its own: ringsync_delivery_pass_duration_seconds).",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.delivery_pass_duration = Histogram(
            "ringsync_delivery_pass_duration_seconds",
            "Duration of one delivery pass over a peer's outbox (its own loop: a slow peer "
            "holds only its own games).",
            ["peer"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.outbox_games = Gauge(
            "ringsync_outbox_games", "Games waiting to be delivered, per peer.", ["peer"], registry=r
        )
        self.circuit_state = Gauge(
            "ringsync_circuit_state",
            "Circuit breaker per peer and transport (http, ssh, rsync, aria2): 0 closed, 1 "
            "half-open (probing), 2 open (the transport is skipped for this peer; while all of a "
            "peer's game transports are open, its games wait in its outbox).",
            ["peer", "transport"],
            registry=r,
        )
        self.shared_storage_skips = Counter(
            "ringsync_shared_storage_skips_total",
            "Games not sent to a peer because it uses this node's data dir (shared storage).",
            ["peer"],
            registry=r,
        )
        self.shared_dir_shipper = Gauge(
            "ringsync_shared_dir_shipper",
            "1 when this node ships the games of its shared data dir, 0 when another sharer does.",
            registry=r,
        )
        self.games_received = Counter(
            "ringsync_games_received_total",
            "Games merged from peers (new here).",
            registry=r,
        )
        self.games_duplicate_received = Counter(
            "ringsync_games_duplicate_received_total",
            "Games received that were already held here; ignored.",
            registry=r,
        )
        self.batches_received = Counter(
            "ringsync_batches_received_total",
            "Game batches received from peers, by outcome.",
            ["outcome"],
            registry=r,
        )
        self.bytes_received = Counter(
            "ringsync_received_bytes_total", "Payload bytes received from peers.", registry=r
        )
        self.merge_duration = Histogram(
            "ringsync_merge_duration_seconds",
            "Time to verify and merge one received batch.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.http_requests = Counter(
            "ringsync_http_requests_total",
            "HTTP requests served, by route and status code.",
            ["route", "code"],
            registry=r,
        )
        self.auth_failures = Counter(
            "ringsync_auth_failures_total",
            "Peer requests refused for a missing or wrong cluster token.",
            registry=r,
        )
        self.daemon_restarts = Counter(
            "ringsync_daemon_restarts_total",
            "Daemon restarts after a crash.",
            ["daemon"],
            registry=r,
        )
        self.daemon_up = Gauge(
            "ringsync_daemon_up", "1 when the daemon is running and ready.", ["daemon"], registry=r
        )
        self.source_read_errors = Counter(
            "ringsync_source_read_errors_total",
            "Failed reads of a local selfplay DB, by kind (corrupt, busy); names in the health.",
            ["kind"],
            registry=r,
        )
        self.sources_unreadable = Gauge(
            "ringsync_sources_unreadable", "Local selfplay DBs whose last read failed.", registry=r
        )
        self.source_games_changed = Counter(
            "ringsync_source_games_changed_total",
            "Shipped games that gained rows at the source later; re-sent to their holders.",
            registry=r,
        )
        self.source_games_deleted = Counter(
            "ringsync_source_games_deleted_total",
            "Shipped games found deleted at the source (checked in slices on forced scans).",
            registry=r,
        )
        self.source_games_given_up = Counter(
            "ringsync_source_active_games_given_up_total",
            "Games left unfinished past the active-game timeout; no longer re-checked.",
            registry=r,
        )
        self.source_lost_locks = Counter(
            "ringsync_source_lost_locks_total",
            "Source views found stale because the WAL was deleted under them (locks lost "
            "to an open()/close() of the file in this process); reopened.",
            registry=r,
        )

        self.jsonl_malformed_lines = Counter(
            "ringsync_jsonl_malformed_lines_total",
            "Complete lines of local JSONL game logs that are not a valid game record; skipped.",
            registry=r,
        )
        self.jsonl_games_skipped = Counter(
            "ringsync_jsonl_games_skipped_total",
            "JSONL game records not shipped, by reason (incomplete, too_short, duplicate).",
            ["reason"],
            registry=r,
        )
        self.games_refused_received = Counter(
            "ringsync_games_refused_total",
            "Received completed games with fewer than 5 moves, dropped as RingRift's "
            "enforce_moves_on_insert trigger in the merged DB refuses them.",
            registry=r,
        )
        self.games_refused_by_peer = Counter(
            "ringsync_games_refused_by_peer_total",
            "Games a peer's RingRift DB refused (completed with fewer than 5 moves); not sent again.",
            ["peer"], registry=r,
        )
        self.late_rows_received = Counter(
            "ringsync_late_rows_received_total",
            "Rows added to games already held here (rows a source added after completion).",
            registry=r,
        )
        self.connections_open = Gauge(
            "ringsync_http_connections_open", "Connections the data server holds open now.",
            registry=r,
        )
        self.connections_shed = Counter(
            "ringsync_connections_shed_total",
            "Data server connections closed unserved, by reason (total_limit, address_limit, "
            "header_timeout).",
            ["reason"], registry=r,
        )
        self.http_malformed = Counter(
            "ringsync_http_malformed_total",
            "Requests refused as malformed HTTP (bad framing, oversized request line or headers).",
            registry=r,
        )
        self.uploads_dropped = Counter(
            "ringsync_uploads_dropped_total",
            "Batch uploads not received, by reason (stalled: no byte within the body timeout; "
            "aborted: the peer disconnected mid-body; malformed: broken body framing; busy: "
            "the upload budget was full, 503).",
            ["reason"], registry=r,
        )
        self.upload_bytes_in_flight = Gauge(
            "ringsync_upload_bytes_in_flight",
            "Bytes reserved for batch uploads being received or waiting to merge.",
            registry=r,
        )
        self.received_configs = Gauge(
            "ringsync_received_configs",
            "Config DBs this node holds received games in (at most RINGRIFT_MAX_CONFIGS).",
            registry=r,
        )
        self.received_configs_refused = Counter(
            "ringsync_received_configs_refused_total",
            "Batches refused because their config key would be one config DB more than "
            "RINGRIFT_MAX_CONFIGS allows.",
            registry=r,
        )

        # Issue 7 A3: merged DBs' WALs (one series each: config keys come from peers).
        self.merged_wal_bytes = Gauge(
            "ringsync_merged_wal_bytes",
            "Largest WAL file among the merged DBs open here, after the last merge into it.",
            registry=r,
        )
        self.checkpoints_blocked = Counter(
            "ringsync_checkpoints_blocked_total",
            "Checkpoints of a merged DB that a reader's open transaction stopped part-way "
            "(the WAL keeps growing until readers allow one).",
            registry=r,
        )
        # -- sender scale (issue 7: A4, A7)
        self.source_rows_scanned = Counter(
            "ringsync_source_rows_scanned_total",
            "Rows of local games tables read by scans (new and in-progress rows only).",
            registry=r,
        )
        self.source_rows_rescanned = Counter(
            "ringsync_source_rows_rescanned_total",
            "Rows read again below a scan cursor because SQLite handed out their rowids again "
            "(the newest games were deleted and others inserted).",
            registry=r,
        )
        self.source_scan_backlog = Gauge(
            "ringsync_source_scan_backlog",
            "Local sources whose scan stopped at its row chunk and continues next cycle.",
            registry=r,
        )
        # -- bandwidth (issue 8 §3): fed by the limiter's callbacks, so policy/ stays I/O-free
        self.bandwidth_bytes = Counter(
            "ringsync_bandwidth_bytes_total",
            "Bytes sent through the bandwidth limiter, by peer and priority (critical, high, "
            "normal, low).",
            ["peer", "priority"], registry=r,
        )
        self.bandwidth_wait = Counter(
            "ringsync_bandwidth_wait_seconds_total",
            "Seconds transfers waited in the bandwidth limiter, by priority and reason (rate: "
            "for tokens of a peer or the total limit; slot: for a transfer slot).",
            ["priority", "reason"], registry=r,
        )

        self.transport_attempts = Counter(
            "ringsync_transport_attempts_total",
            "Steps of the fallback chains (RINGRIFT_TRANSPORT_CHAINS) by data type, transport and "
            "outcome (ok; next: could not do it now, the next transport was tried; failed: a "
            "final answer for this attempt; unavailable: named but not provided here; "
            "breaker_open: skipped, its circuit breaker open). Files: each file's steps and rsync "
            "batch runs under its kind, the http/ssh requests under a file's http step under "
            "data_type files.",
            ["data_type", "transport", "outcome"], registry=r,
        )

        # -- models and training data (issue 8 §4); kind is 'models' or 'training_data'
        self.files_picked_up = Counter(
            "ringsync_files_picked_up_total",
            "Local model and training files (and new versions of them) hashed and offered to peers.",
            ["kind"], registry=r,
        )
        self.files_published = Counter(
            "ringsync_files_published_total",
            "Files published here after verification, by how (fetched, linked, copied, symlink).",
            ["kind", "how"], registry=r,
        )
        self.file_bytes_fetched = Counter(
            "ringsync_file_bytes_fetched_total",
            "Bytes of model and training files fetched from peers.",
            ["kind"], registry=r,
        )
        self.file_hash_mismatches = Counter(
            "ringsync_file_hash_mismatches_total",
            "Downloads discarded because their content hash or length was wrong.",
            ["kind"], registry=r,
        )
        self.files_held = Gauge(
            "ringsync_files_held", "Model and training files this node holds and offers.",
            ["kind"], registry=r,
        )
        # -- multi-source fetches and peer-to-peer spread (issue 8 §2, §4); peer is a node name
        self.file_bytes_served = Counter(
            "ringsync_file_bytes_served_total",
            "Bytes of model and training files this node served, by the peer that asked.",
            ["peer"], registry=r,
        )
        self.file_source_bytes = Counter(
            "ringsync_file_source_bytes_total",
            "Bytes of model and training files fetched here, by source peer and transport "
            "(aria2 cannot say which source served which segment: its bytes count under the "
            "source 'aria2-mixed'; ranged piece repairs count under their source).",
            ["peer", "transport"], registry=r,
        )
        self.file_source_exclusions = Counter(
            "ringsync_file_source_exclusions_total",
            "Sources proven to serve wrong bytes for some content and not asked for it again.",
            ["peer"], registry=r,
        )
        self.file_multi_source_fetches = Counter(
            "ringsync_file_multi_source_fetches_total",
            "Multi-source (aria2) fetches by outcome: published, repaired (bad pieces fetched "
            "again from another source), failed (retried later), fallback (single-source HTTP).",
            ["outcome"], registry=r,
        )

        self.file_transfers_abandoned = Counter(
            "ringsync_file_transfers_abandoned_total",
            "Downloads given up and removed from disk, by reason (unoffered: no peer offered "
            "the content for RINGRIFT_FILE_ABANDON_AFTER; superseded: a newer version of the "
            "name is fetched instead; leftover: found at start-up with no journal entry, or "
            "rsync staging of a peer no longer used).",
            ["kind", "reason"], registry=r,
        )
        self.file_abandoned_bytes = Counter(
            "ringsync_file_abandoned_bytes_total",
            "Bytes of abandoned downloads removed from disk (ringsync_file_transfers_abandoned_total).",
            ["kind"], registry=r,
        )

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
