"""Labelled example rows read from user data files (.jsonl / .csv / .tsv), shared by `pymerge stats` and the
search's task configs: one reader, one set of error messages naming the file and line."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Dict, List


def read_rows(path: Path, what: str = "--data") -> List[Dict[str, object]]:
    """The rows of a .jsonl (one JSON object per line) or .csv / .tsv file (a header row); `what` names the file
    in errors (the option or config key it came from)."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path}: file not found")
    rows: List[Dict[str, object]] = []
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{what} {path}:{lineno}: not valid JSON ({exc.msg})") from exc
                if not isinstance(row, dict):
                    raise ValueError(f"{what} {path}:{lineno}: expected a JSON object per line")
                rows.append(row)
    elif path.suffix.lower() in (".csv", ".tsv"):
        with path.open(encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ","))
    else:
        raise ValueError(f"{what} {path}: expected a .jsonl or .csv file")
    return rows


def label_id(value, label2id, where: str) -> int:
    """A label given as an integer, a digit string, or one of the model's label names (label2id)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    text = str(value).strip()
    if text.lstrip("-").isdigit():
        return int(text)
    if label2id and text in label2id:
        return int(label2id[text])
    raise ValueError(f"{where}: label {value!r} is neither an integer nor one of the model's labels "
                     f"{sorted(label2id) if label2id else []}")
