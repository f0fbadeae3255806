"""Simulated JSONL game logs, written the way RingRift's selfplay scripts write them.

- GPU selfplay (``scripts/run_gpu_selfplay.py``): ``games_{b}_{n}p_{pid}.jsonl`` opened with
  mode "w" under an exclusive flock held for the run, flushed every ``flush_every`` lines and
  at the end, never fsynced; ``status`` is always "completed", even for games cut off
  (winner 0, victory_type "in_progress"); ids ``gpu_{b}_{n}p_{idx}_{unix_s}`` are not unique.
  Long lines reach the file in several writes, so a partial last line is visible mid-write.
- Gumbel (``scripts/generate_gumbel_selfplay.py``): one line per game appended with
  open/write/close, no lock; the uuid4 game id is the same as the game's DB row; a truncated
  game has status "active".
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import random
import signal
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

__all__ = ["append_gumbel_line", "gpu_record", "gumbel_record", "main", "write_gpu_log"]

_MOVE_TYPES = ("place_ring", "move_stack", "overtaking_capture", "process_line")


def _moves(rng: random.Random, n: int, players: int, *, policy: bool = False) -> list[dict[str, Any]]:
    out = []
    for m in range(n):
        move: dict[str, Any] = {"type": _MOVE_TYPES[m % 4], "player": m % players + 1,
                                "phase": "movement", "moveNumber": m + 1,
                                "to": {"x": rng.randint(0, 8), "y": rng.randint(0, 8)}}
        if policy:
            move["mcts_policy"] = {str(i): round(rng.random(), 3) for i in range(4)}
        out.append(move)
    return out


def gpu_record(rng: random.Random, idx: int, *, board: str = "hex8", players: int = 2,
               moves: int = 40, cut_off: bool = False) -> dict[str, Any]:
    """One line of run_gpu_selfplay.py (a game cut off at max moves when ``cut_off``)."""
    return {
        "game_id": f"gpu_{board}_{players}p_{idx}_{int(time.time())}", "board_type": board,
        "num_players": players, "winner": 0 if cut_off else rng.randint(1, players),
        "move_count": moves, "status": "completed",
        "victory_type": "in_progress" if cut_off else "territory",
        "termination_reason": "max_moves" if cut_off else "status:completed:territory",
        "moves": _moves(rng, moves, players), "initial_state": {"board": board},
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "source": "run_gpu_selfplay.py",
    }


def gumbel_record(rng: random.Random, game_id: str, *, board: str = "hex8", players: int = 2,
                  moves: int = 40, truncated: bool = False) -> dict[str, Any]:
    """One line of generate_gumbel_selfplay.py for the game ``game_id``."""
    return {
        "game_id": game_id, "board_type": board, "num_players": players,
        "winner": None if truncated else rng.randint(1, players),
        "status": "active" if truncated else "completed", "num_moves": moves,
        "duration_ms": rng.randint(1000, 90000), "moves": _moves(rng, moves, players, policy=True),
        "parity_ok": True, "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "initial_state": {"board": board},
    }


def append_gumbel_line(path: Path, record: dict[str, Any]) -> None:
    """Append one game as the Gumbel script does: open, write, close; no lock, no fsync."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")


def write_gpu_log(out_dir: Path, games: int, *, cut_off: int = 0, flush_every: int = 7,
                  rate: float | None = None, seed: int | None = None, board: str = "hex8",
                  players: int = 2, moves: int = 40,
                  stop: threading.Event | None = None) -> tuple[Path, list[str], list[str]]:
    """Write ``games`` finished and ``cut_off`` cut-off games; return (file, finished, cut) ids.

    Each line goes out in two writes with a pause between them, so readers see partial lines.
    """
    rng = random.Random(seed)
    stop = stop or threading.Event()
    path = out_dir / f"games_{board}_{players}p_{os.getpid()}.jsonl"
    out_dir.mkdir(parents=True, exist_ok=True)
    kinds = [False] * games + [True] * cut_off
    rng.shuffle(kinds)
    finished: list[str] = []
    cut: list[str] = []
    started = time.monotonic()
    with path.open("w", encoding="utf-8") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the run holds it, as upstream does
        for idx, is_cut in enumerate(kinds):
            if stop.is_set():
                break
            record = gpu_record(rng, idx, board=board, players=players, moves=moves, cut_off=is_cut)
            text = json.dumps(record) + "\n"
            half = len(text) // 2
            fh.write(text[:half])
            fh.flush()  # a partial line is now visible
            stop.wait(0.002)
            fh.write(text[half:])
            (cut if is_cut else finished).append(record["game_id"])
            if (idx + 1) % flush_every == 0:
                fh.flush()
            if rate:
                stop.wait(max(0.0, started + (idx + 1) / rate - time.monotonic()))
        fh.flush()
    return path, finished, cut


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: write a GPU selfplay JSONL log; prints the file and writes a JSON summary."""
    parser = argparse.ArgumentParser(prog="python -m ringsync.jsonl_sim", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path, help="the --output-dir of run_gpu_selfplay.py")
    parser.add_argument("--games", type=int, default=100, help="finished games")
    parser.add_argument("--cut-off", type=int, default=0, help="games cut off at max moves")
    parser.add_argument("--rate", type=float, default=None, help="lines per second")
    parser.add_argument("--moves", type=int, default=40)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--summary", type=Path, default=None,
                        help="write {file, finished, cut_off} (local ids) to this JSON file")
    args = parser.parse_args(argv)
    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    path, finished, cut = write_gpu_log(args.out_dir, args.games, cut_off=args.cut_off,
                                        rate=args.rate, seed=args.seed, moves=args.moves,
                                        stop=stop)
    if args.summary is not None:
        tmp = args.summary.with_name(args.summary.name + ".tmp")
        tmp.write_text(json.dumps({"file": str(path), "finished": finished, "cut_off": cut}))
        tmp.replace(args.summary)
    print(f"wrote {len(finished)} finished, {len(cut)} cut off to {path}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

