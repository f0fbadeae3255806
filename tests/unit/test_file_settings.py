"""RINGRIFT_MODELS_DIR, RINGRIFT_TRAINING_DIR and the file-sync timings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ringsync.errors import ConfigError
from ringsync.files.kinds import FileKind
from ringsync.files.layout import file_dirs, manifest_path
from ringsync.settings import load_settings

BASE = {"RINGRIFT_NODE_ID": "n1", "RINGRIFT_ENV_FILE": os.devnull}


def test_defaults_live_in_the_data_dir(tmp_path: Path) -> None:
    s = load_settings({**BASE, "RINGRIFT_DATA_DIR": "data"}, cwd=tmp_path)
    assert file_dirs(s) == {FileKind.MODELS: tmp_path / "data" / "models",
                            FileKind.TRAINING_DATA: tmp_path / "data" / "training"}
    assert manifest_path(s) == tmp_path / "data" / ".ringsync" / "n1" / "manifest.db"
    assert (s.file_settle_time, s.file_poll_interval) == (5.0, 10.0)
    assert s.file_abandon_after == 3600.0


def test_ringrift_layout_models_beside_data(tmp_path: Path) -> None:
    s = load_settings({**BASE, "RINGRIFT_DATA_DIR": "ai-service/data",
                       "RINGRIFT_MODELS_DIR": "ai-service/models", "RINGRIFT_FILE_SETTLE_TIME": "2",
                       "RINGRIFT_FILE_POLL_INTERVAL": "0.5"},
                      cwd=tmp_path)
    assert s.models_dir == tmp_path / "ai-service" / "models"
    assert s.training_dir == tmp_path / "ai-service" / "data" / "training"
    assert (s.file_settle_time, s.file_poll_interval) == (2.0, 0.5)


@pytest.mark.parametrize(("name", "value", "message"), [
    ("RINGRIFT_FILE_SETTLE_TIME", "0", "RINGRIFT_FILE_SETTLE_TIME = '0' is out of range"),
    ("RINGRIFT_FILE_POLL_INTERVAL", "soon", "RINGRIFT_FILE_POLL_INTERVAL = 'soon' is not a number"),
    ("RINGRIFT_FILE_ABANDON_AFTER", "1h", "RINGRIFT_FILE_ABANDON_AFTER = '1h' is not a number"),
    ("RINGRIFT_FILE_ABANDON_AFTER", "-5", "RINGRIFT_FILE_ABANDON_AFTER = '-5' is out of range; use a "
                                          "number > 0"),
    ("RINGRIFT_FILE_ABANDON_AFTER", "0", "RINGRIFT_FILE_ABANDON_AFTER = '0' is out of range"),
    ("RINGRIFT_FILE_SERVE_MBPS", "800", "RINGRIFT_FILE_SERVE_MBPS is no longer read: .* set "
                                        "RINGRIFT_BANDWIDTH_LIMIT_MBPS"),
    ("RINGRIFT_MODELS_DIR", "afile", "RINGRIFT_MODELS_DIR = 'afile' is not a directory"),
])
def test_bad_values_name_the_variable_and_the_fix(tmp_path: Path, name: str, value: str,
                                                  message: str) -> None:
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match=message):
        load_settings({**BASE, name: value}, cwd=tmp_path)
