"""systemd/ringsync@.service: verify cleanly, stay sandboxed, keep the daemon's contract."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from ringsync.settings import Settings

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "ringsync@.service"
PROFILES = sorted(p.stem for p in (REPO / "daemons").glob("*.yaml"))
MAX_EXPOSURE = 2.0

needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed (apt: systemd)"
)


def _parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Section -> key -> every value in order (systemd keys repeat, unlike INI)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"key outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def _exec_path(service: dict[str, list[str]]) -> str:
    (exec_start,) = service["ExecStart"]
    return exec_start.split()[0]


def _instance(tmp_path: Path, profile: str) -> Path:
    """The unit as an instance file whose ExecStart binary exists (verify checks it)."""
    text = UNIT.read_text()
    stub = tmp_path / "bin" / "ringsync"
    stub.parent.mkdir(exist_ok=True)
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    text = text.replace(_exec_path(_parse_unit(text)["Service"]), str(stub))
    path = tmp_path / f"ringsync@{profile}.service"
    path.write_text(text)
    return path


def _systemd_analyze(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0", "LC_ALL": "C.UTF-8"}
    return subprocess.run(
        ["systemd-analyze", "--no-pager", *args], cwd=cwd, env=env, capture_output=True,
        text=True, encoding="utf-8", errors="replace", timeout=60, check=False,
    )


@needs_systemd_analyze
@pytest.mark.parametrize("profile", PROFILES)
def test_verify_is_clean(tmp_path: Path, profile: str) -> None:
    unit = _instance(tmp_path, profile)
    result = _systemd_analyze("verify", str(unit), cwd=tmp_path)
    # verify exits 0 on warnings (unknown keys, bad values): any output on stderr is a defect.
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr


@needs_systemd_analyze
def test_security_exposure(tmp_path: Path) -> None:
    unit = _instance(tmp_path, "selfplay")
    result = _systemd_analyze("security", "--offline=true", str(unit), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", result.stdout)
    assert match, result.stdout + result.stderr
    exposure = float(match.group(1))
    assert exposure <= MAX_EXPOSURE, f"exposure {exposure} > {MAX_EXPOSURE}:\n{result.stdout}"


def test_service_contract() -> None:
    service = _parse_unit(UNIT.read_text())["Service"]

    def one(key: str) -> str:
        (value,) = service[key]
        return value

    assert one("Type") == "notify"
    assert one("NotifyAccess") == "main"
    assert one("Restart") == "on-failure"
    assert one("KillSignal") == "SIGTERM"
    assert one("WatchdogSec") == "30"
    assert one("ExecStart").endswith(" run --profile %i")
    assert _exec_path(service).startswith("/")
    assert service["EnvironmentFile"] == ["-/etc/ringsync/ringsync.env", "-/etc/ringsync/%i.env"]
    assert one("StateDirectory") == "ringsync"
    assert "RINGRIFT_DATA_DIR=/var/lib/ringsync" in service["Environment"]
    families = one("RestrictAddressFamilies").split()
    assert {"AF_UNIX", "AF_INET", "AF_INET6"} <= set(families)
    # systemd must wait longer than the daemon drains before it sends SIGKILL.
    drain = Settings.__dataclass_fields__["drain_timeout"].default
    assert isinstance(drain, float)
    # the manager's worst case: a drain plus a cancel wait per daemon, two daemons in turn
    assert float(one("TimeoutStopSec")) > 2 * 2 * drain


def test_profiles_exist() -> None:
    assert {"selfplay", "training", "coordinator", "sync-only"} <= set(PROFILES)
