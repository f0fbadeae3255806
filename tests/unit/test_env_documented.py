"""Every RINGRIFT_* name the code mentions is documented in .env.example and declared in ENV_VARS."""

from __future__ import annotations

import io
import re
import tokenize
from pathlib import Path

from ringsync.settings import ENV_VARS

ROOT = Path(__file__).resolve().parents[2]
ENV_EXAMPLE = ROOT / ".env.example"
SCANNED_DIRS = ("ringsync", "bench")
NAME = re.compile(r"RINGRIFT_[A-Z0-9_]*[A-Z0-9]")
ASSIGNMENT = re.compile(r"^#?(RINGRIFT_[A-Z0-9_]+)=(.*)$", re.MULTILINE)
# f-string pieces are their own tokens from Python 3.12 on.
_STRING_TOKENS = {tokenize.STRING} | {getattr(tokenize, "FSTRING_MIDDLE", tokenize.STRING)}


def _string_literals(path: Path) -> list[str]:
    tokens = tokenize.generate_tokens(io.StringIO(path.read_text(encoding="utf-8")).readline)
    return [tok.string for tok in tokens if tok.type in _STRING_TOKENS]


def _names_in_code() -> dict[str, set[str]]:
    """RINGRIFT_* name → the files whose string literals mention it."""
    found: dict[str, set[str]] = {}
    for top in SCANNED_DIRS:
        for path in sorted((ROOT / top).rglob("*.py")):
            for literal in _string_literals(path):
                for name in NAME.findall(literal):
                    found.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    return found


def _documented() -> dict[str, str]:
    return dict(ASSIGNMENT.findall(ENV_EXAMPLE.read_text(encoding="utf-8")))


def test_scanner_finds_names() -> None:
    names = _names_in_code()
    assert "RINGRIFT_NODE_ID" in names
    assert "ringsync/settings.py" in names["RINGRIFT_NODE_ID"]


def test_every_name_in_code_is_documented() -> None:
    documented = _documented()
    missing = {n: sorted(files) for n, files in _names_in_code().items() if n not in documented}
    assert not missing, f"add these to .env.example (and ENV_VARS in ringsync/settings.py): {missing}"


def test_env_example_matches_env_vars() -> None:
    documented = set(_documented())
    declared = {v.name for v in ENV_VARS}
    assert not documented - declared, f"documented but not in ENV_VARS: {documented - declared}"
    assert not declared - documented, f"in ENV_VARS but not documented: {declared - documented}"


def test_documented_defaults_match_env_vars() -> None:
    documented = _documented()
    wrong = {v.name: documented[v.name] for v in ENV_VARS
             if v.name in documented and documented[v.name] != v.default}
    assert not wrong, f".env.example defaults differ from ENV_VARS: {wrong}"


def test_each_variable_has_a_comment_block() -> None:
    lines = ENV_EXAMPLE.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if ASSIGNMENT.match(line):
            assert i > 0, line
            assert lines[i - 1].startswith("# "), f"{line} needs a '# meaning. Default: X' comment"


def test_env_vars_are_unique_and_described() -> None:
    names = [v.name for v in ENV_VARS]
    assert len(names) == len(set(names))
    assert all(NAME.fullmatch(v.name) and v.meaning and v.documented_default for v in ENV_VARS)
