"""The trial log: JSONL, a header line then one line per finished evaluation, appended, flushed and fsynced.

    {"header": {...search settings...}}
    {"trial": k, "lambdas": [..], "metrics": {task: value}, "objective": x, "phase": "random" | "search",
     "seconds": {"fisher": s, "combine": s, "evaluate": s}}

A process killed mid-write (kill -9) leaves at most a truncated last line: it is dropped on reading and cut off
before appending. Lines may be out of trial order (parallel workers finish in any order); readers key by trial.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

TRIAL_KEYS = ("trial", "lambdas", "metrics", "objective", "phase", "seconds")


class TrialLogError(ValueError):
    pass


def read(path: Union[str, os.PathLike]) -> Tuple[Optional[dict], Dict[int, dict], int]:
    """(header or None, {trial: record}, byte length of the intact part). A last line without its newline
    (cut off by a kill) is ignored; any other unreadable line is an error naming the line."""
    path = Path(path)
    data = path.read_bytes()
    header, trials, good = None, {}, 0
    lines = data.split(b"\n")
    for lineno, raw in enumerate(lines, start=1):
        last = lineno == len(lines)
        if last:  # text after the final newline: a write that did not finish
            break
        good_next = good + len(raw) + 1
        if raw.strip():
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise TrialLogError(f"{path}:{lineno}: not valid JSON ({exc.msg}); the log is damaged") from exc
            if isinstance(rec, dict) and "header" in rec and lineno == 1:
                header = rec["header"]
            elif isinstance(rec, dict) and all(k in rec for k in TRIAL_KEYS):
                trials[int(rec["trial"])] = rec
            else:
                raise TrialLogError(f"{path}:{lineno}: expected a trial record with keys {TRIAL_KEYS}")
        good = good_next
    return header, trials, good


class TrialLog:
    """Appends records to a JSONL file; `open_log` decides between a fresh log and resuming one."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = open(self.path, "ab")

    def append(self, record: dict) -> None:
        self._file.write((json.dumps(record, sort_keys=True) + "\n").encode())
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def open_log(path: Union[str, os.PathLike], header: dict, *, resume: bool = False, overwrite: bool = False
             ) -> Tuple[TrialLog, Dict[int, dict]]:
    """A log to append to and the trials already in it. An existing log is resumed only with resume=True (its
    header must equal `header`) and replaced only with overwrite=True; otherwise it is an error."""
    path = Path(path)
    header = json.loads(json.dumps(header))  # the JSON form, as it will be compared on resume
    if path.exists() and not overwrite:
        if not resume:
            raise FileExistsError(f"{path}: trial log exists; pass resume=True (--resume) to continue it or "
                                  f"overwrite=True (--force) to start again")
        old, trials, good = read(path)
        if old is not None and old != header:
            diff = sorted(k for k in set(old) | set(header) if old.get(k) != header.get(k))
            raise TrialLogError(f"{path}: was written by a search with other settings ({', '.join(diff)}: "
                                f"{[old.get(k) for k in diff]} in the log, {[header.get(k) for k in diff]} now); "
                                f"resume with the same settings or start a new log")
        with open(path, "r+b") as f:  # drop a half-written last line
            f.truncate(good)
        log = TrialLog(path)
        if old is None:
            if good:
                raise TrialLogError(f"{path}: has trials but no header line; cannot check its settings")
            log.append({"header": header})
        return log, trials
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb"):
        pass
    log = TrialLog(path)
    log.append({"header": header})
    return log, {}


def trials_in_order(path: Union[str, os.PathLike]) -> List[dict]:
    """The finished trials of a log sorted by trial number (for plots and reports)."""
    _, trials, _ = read(path)
    return [trials[k] for k in sorted(trials)]
