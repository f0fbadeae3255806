"""Running simulated selfplay writers: a mix of game outcomes, paced, on several threads."""

from __future__ import annotations

import json
import random
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ringsync._selfplay_writer import SelfplayWriter

__all__ = ["Mix", "Outcomes", "run_writer", "simulate"]



@dataclass
class Outcomes:
    """Which game ids ended in which outcome (``late`` ids are also in ``completed``)."""

    completed: list[str] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    truncated: list[str] = field(default_factory=list)
    killed: list[str] = field(default_factory=list)
    late: list[str] = field(default_factory=list)
    in_progress: list[str] = field(default_factory=list)

    def add(self, other: Outcomes) -> None:
        for name, ids in asdict(other).items():
            getattr(self, name).extend(ids)

    def write(self, path: Path) -> None:
        """The summary as JSON, written atomically (end-to-end tests read it)."""
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        tmp.replace(path)


@dataclass(frozen=True)
class Mix:
    """Probabilities of the outcomes other than completed, drawn per game."""

    aborted: float = 0.0
    truncated: float = 0.0
    killed: float = 0.0
    late: float = 0.0

    def draw(self, rng: random.Random) -> str:
        r = rng.random()
        for name in ("aborted", "truncated", "killed", "late"):
            p = getattr(self, name)
            if r < p:
                return name
            r -= p
        return "completed"


def simulate(
    db_path: Path,
    n_games: int,
    *,
    leave_in_progress: int = 0,
    rate: float | None = None,
    mix: Mix = Mix(),
    writers: int = 1,
    stop: threading.Event | None = None,
    **writer_options: object,
) -> Outcomes:
    """``writers`` concurrent writers complete ``n_games`` games between them.

    Other outcomes are drawn from ``mix`` on top; ``rate`` paces completions in total.
    """
    stop = stop or threading.Event()
    seed = writer_options.pop("seed", None)
    results = [Outcomes() for _ in range(writers)]
    errors: list[BaseException] = []

    def one(i: int) -> None:
        share = n_games // writers + (i < n_games % writers)
        s = None if seed is None else int(str(seed)) + i * 7919
        try:
            with SelfplayWriter(db_path, seed=s, **writer_options) as w:  # type: ignore[arg-type]
                if i == 0:
                    results[i].in_progress = _placeholders(w, leave_in_progress)
                _write_paced(w, share, rate / writers if rate else None, mix, stop, results[i])
        except BaseException as exc:
            errors.append(exc)
            stop.set()

    if writers == 1:
        one(0)
    else:
        threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(writers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if errors:
        raise errors[0]
    total = Outcomes()
    for r in results:
        total.add(r)
    return total


def _placeholders(writer: SelfplayWriter, n: int) -> list[str]:
    ids = []
    for _ in range(n):
        gid = writer.start_game()
        writer.add_moves(gid, max(1, writer.moves_per_game // 2))
        writer._moves.pop(gid)
        ids.append(gid)
    return ids


def _write_paced(writer: SelfplayWriter, n_games: int, rate: float | None, mix: Mix,
                 stop: threading.Event, out: Outcomes) -> None:
    started = time.monotonic()
    pending_late: list[str] = []
    while len(out.completed) < n_games and not stop.is_set():
        outcome = mix.draw(writer._rng)
        gid = writer.write_game(outcome)
        getattr(out, "completed" if outcome == "late" else outcome).append(gid)
        for late in pending_late:  # a game changes after a later one completed
            writer.change_later(late)
            out.late.append(late)
        pending_late = [gid] if outcome == "late" else []
        if rate and outcome in ("late", "completed"):  # paced against the start: no drift
            stop.wait(max(0.0, started + len(out.completed) / rate - time.monotonic()))
    for late in pending_late:
        writer.change_later(late)
        out.late.append(late)


def run_writer(
    db_path: Path,
    n_games: int,
    *,
    leave_in_progress: int = 0,
    rate: float | None = None,
    board_type: str = "hex8",
    num_players: int = 2,
    moves_per_game: int = 80,
    seed: int | None = None,
    stop: threading.Event | None = None,
    **options: Any,
) -> int:
    """Leave ``leave_in_progress`` games half-written, then write ``n_games`` completed ones.

    ``rate`` paces completions (games/s); ``stop`` ends early; ``options`` go to simulate()
    and SelfplayWriter. Returns the games completed.
    """
    out = simulate(db_path, n_games, leave_in_progress=leave_in_progress, rate=rate, stop=stop,
                   board_type=board_type, num_players=num_players,
                   moves_per_game=moves_per_game, seed=seed, **options)
    return len(out.completed)
