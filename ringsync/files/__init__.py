"""Models and training data: picked up when complete, hashed once, spread peer to peer."""

from __future__ import annotations

from ringsync.files.kinds import FileKind, FileRouting
from ringsync.files.manifest import FileManifest, FileRecord, Transfer
from ringsync.files.publish import ContentDeduplicator

__all__ = ["ContentDeduplicator", "FileKind", "FileManifest", "FileRecord", "FileRouting", "Transfer"]
