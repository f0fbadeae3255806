"""Which bandwidth share a served file gets (issue 8 §3): promoted models first, NPZ last."""

from __future__ import annotations

import pytest

from ringsync.files.kinds import FileKind, file_priority
from ringsync.policy.bandwidth import Priority


@pytest.mark.parametrize(("kind", "relpath", "priority"), [
    (FileKind.MODELS, "canonical_hex8_2p.pth", Priority.CRITICAL),
    (FileKind.MODELS, "sub/ringrift_best_sq8_2p.pth", Priority.CRITICAL),
    (FileKind.MODELS, "checkpoints/epoch_12.pth", Priority.HIGH),
    (FileKind.MODELS, "old/not_canonical_x.onnx", Priority.HIGH),
    (FileKind.TRAINING_DATA, "canonical_hex8_2p.npz", Priority.LOW),
    (FileKind.TRAINING_DATA, "hex8_2p.npz", Priority.LOW),
])
def test_models_before_games_before_training_data(kind: FileKind, relpath: str,
                                                  priority: Priority) -> None:
    assert file_priority(kind, relpath) is priority
    assert (file_priority(kind, relpath) > Priority.NORMAL) == (kind is FileKind.MODELS)
