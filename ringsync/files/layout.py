"""Where a node keeps each kind of file and its file manifest; the wire names peers share."""

from __future__ import annotations

from pathlib import Path

from ringsync.files.kinds import FileKind
from ringsync.settings import Settings
from ringsync.store.manifest import JOURNAL_NAME

INDEX_PATH = "/v1/files/index"
FILES_PREFIX = "/v1/files/"
HASH_HEADER = "X-Ringsync-Content-Hash"
MAX_INDEX_BYTES = 64 * 1024 * 1024  # a peer's index above this is refused unread
MAX_INDEX_ENTRIES = 200_000
MAX_FILE_BYTES = 1 << 40  # 1 TiB: larger sizes in an index are refused as nonsense


def file_dirs(settings: Settings) -> dict[FileKind, Path]:
    return {FileKind.MODELS: settings.models_dir, FileKind.TRAINING_DATA: settings.training_dir}


def manifest_path(settings: Settings) -> Path:
    """The node's one journal, which the game manifest opens too, in this node's own state
    dir (never shared with a sibling)."""
    return settings.state_dir / JOURNAL_NAME


def file_url_path(kind: FileKind, relpath: str) -> str:
    return f"{FILES_PREFIX}{kind.value}/{relpath}"
