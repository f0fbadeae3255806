"""The circuit breaker's env vars: defaults, values, and errors that name the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from ringsync.errors import ConfigError
from ringsync.node import breaker_config
from ringsync.policy.breaker import BreakerConfig
from ringsync.settings import load_settings

BASE = {"RINGRIFT_NODE_ID": "selfplay-1"}


def test_defaults_are_the_breakers_defaults(tmp_path: Path) -> None:
    s = load_settings(BASE, cwd=tmp_path)
    assert breaker_config(s) == BreakerConfig()


def test_values_reach_the_breaker(tmp_path: Path) -> None:
    s = load_settings({**BASE, "RINGRIFT_CIRCUIT_FAILURE_THRESHOLD": "3",
                       "RINGRIFT_CIRCUIT_RECOVERY": "2.5", "RINGRIFT_CIRCUIT_RECOVERY_MAX": "60"},
                      cwd=tmp_path)
    config = breaker_config(s)
    assert (config.failure_threshold, config.recovery_s, config.recovery_max_s) == (3, 2.5, 60.0)


def test_a_recovery_above_300s_raises_the_default_cap_with_it(tmp_path: Path) -> None:
    s = load_settings({**BASE, "RINGRIFT_CIRCUIT_RECOVERY": "600"}, cwd=tmp_path)
    assert (s.circuit_recovery, s.circuit_recovery_max) == (600.0, 600.0)


@pytest.mark.parametrize(("env", "expected"), [
    ({"RINGRIFT_CIRCUIT_FAILURE_THRESHOLD": "0"},
     "RINGRIFT_CIRCUIT_FAILURE_THRESHOLD = '0' is out of range; use an integer 1-1000"),
    ({"RINGRIFT_CIRCUIT_RECOVERY": "0"}, "RINGRIFT_CIRCUIT_RECOVERY = '0' is out of range"),
    ({"RINGRIFT_CIRCUIT_RECOVERY": "30", "RINGRIFT_CIRCUIT_RECOVERY_MAX": "10"},
     "RINGRIFT_CIRCUIT_RECOVERY_MAX = '10' is below RINGRIFT_CIRCUIT_RECOVERY=30; use a number "
     "of seconds >= it"),
])
def test_bad_values_name_the_variable_and_the_fix(tmp_path: Path, env: dict[str, str],
                                                   expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({**BASE, **env}, cwd=tmp_path)
    assert str(info.value).startswith(expected)
