"""The trial log: JSONL, a header line then one line per finished evaluation, appended, flushed and fsynced.

    {"header": {...search settings...}}
    {"trial": k, "lambdas": [..], "metrics": {task: value}, "objective": x, "phase": "random" | "search",
     "seconds": {"fisher": s, "combine": s, "evaluate": s}, "elapsed": s}

"elapsed": the search's own wall-clock seconds when this evaluation finished, summed over every run of it
(a resumed run goes on from the log's largest; logs written before it existed count the summed phase seconds
instead). The wall-clock budget is checked against it (pymerge.search.loop).

A process killed mid-write (kill -9) leaves at most a truncated last line: it is dropped on reading and cut off
before appending. Lines may be out of trial order (parallel workers finish in any order); readers key by trial.
This module is the one reader of the format (`read`, `trials_in_order`; the plots use it too).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

TRIAL_KEYS = ("trial", "lambdas", "metrics", "objective", "phase", "seconds")


class TrialLogError(ValueError):
    pass


def read(path: Union[str, os.PathLike], required: Sequence[str] = TRIAL_KEYS
         ) -> Tuple[Optional[dict], Dict[int, dict], int]:
    """(header or None, {trial: record}, byte length of the intact part). A last line without its newline
    (cut off by a kill) is ignored; any other unreadable line, or a record lacking a `required` key, is an
    error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such trial log")
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
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                msg = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8"
                raise TrialLogError(f"{path}:{lineno}: not valid JSON ({msg}); the log is damaged") from exc
            if isinstance(rec, dict) and "header" in rec and lineno == 1:
                header = rec["header"]
            else:
                missing = [k for k in required if k not in rec] if isinstance(rec, dict) else list(required)
                if missing:
                    raise TrialLogError(f"{path}:{lineno}: a trial record needs {missing} (a record has "
                                        f"{', '.join(TRIAL_KEYS)})")
                try:
                    trials[int(rec["trial"])] = rec
                except (TypeError, ValueError) as exc:
                    raise TrialLogError(f"{path}:{lineno}: trial: expected an integer, got {rec['trial']!r}") from exc
        good = good_next
    return header, trials, good


def elapsed(rec: dict, summed_before: float = 0.0) -> float:
    """The search's wall-clock seconds when `rec` finished: its "elapsed", or for a log without it the phase
    seconds summed over this and the earlier trials (`summed_before`)."""
    if "elapsed" in rec:
        return float(rec["elapsed"])
    return summed_before + sum(float(v) for v in rec.get("seconds", {}).values())


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


def trials_in_order(path: Union[str, os.PathLike], required: Sequence[str] = TRIAL_KEYS
                    ) -> Tuple[Optional[dict], List[dict]]:
    """(header or None, the finished trials of a log sorted by trial number) for plots and reports."""
    header, trials, _ = read(path, required)
    return header, [trials[k] for k in sorted(trials)]
