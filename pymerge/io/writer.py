"""Atomic output directory with a sharded safetensors checkpoint, task heads and copied config/tokenizer.

Everything is written into a temporary directory beside the target (same filesystem) and renamed onto the
target at the end, so an interrupted merge leaves neither a half-written output nor the temporary directory.
An existing target is only replaced with force=True, and then only after the new output is complete.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch

from pymerge.io.reader import SAFETENSORS_INDEX
from pymerge.io.safetensors_file import SafetensorsStreamWriter, nbytes

Entry = Tuple[str, torch.dtype, Tuple[int, ...]]

# Files beside the weights that `from_pretrained` and the tokenizer need.
COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt",
                "spiece.model", "tokenizer.model", "sentencepiece.bpe.model", "preprocessor_config.json",
                "chat_template.jinja", "chat_template.json")
TOKENIZER_FILES = tuple(f for f in COPIED_FILES if f not in ("config.json", "generation_config.json"))

_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: Union[int, str]) -> int:
    """'2GB', '500MiB', '4096' or an int -> bytes."""
    if isinstance(size, bool):
        raise ValueError(f"max_shard_size: expected a size like '2GB' or a number of bytes, got {size!r}")
    if isinstance(size, int):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(size))
        if not m or m.group(2).upper() not in _SIZE_UNITS:
            raise ValueError(f"max_shard_size: expected a size like '2GB' or a number of bytes, got {size!r}")
        value = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])
    if value <= 0:
        raise ValueError(f"max_shard_size: must be positive, got {size!r}")
    return value


def safe_task_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) or "task"


def plan_shards(entries: Sequence[Entry], max_shard_size: int) -> List[List[Entry]]:
    """Greedy split in write order; a tensor larger than the limit gets a shard of its own."""
    shards: List[List[Entry]] = [[]]
    size = 0
    for e in entries:
        n = nbytes(e[1], e[2])
        if shards[-1] and size + n > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += n
    return shards


def check_target(out_dir: Union[str, os.PathLike], force: bool) -> Path:
    """Fail early (before any tensor is read) when the output exists and force is not given."""
    out = Path(out_dir)
    if out.exists() and not force:
        raise FileExistsError(f"{out}: output exists; pass --force (force=True) to replace it")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a directory")
    return out


class ShardedCheckpoint:
    """The main checkpoint: declared entries, written in order into model-0000i-of-0000N.safetensors."""

    def __init__(self, directory: Path, entries: Sequence[Entry], max_shard_size: int):
        self.directory = directory
        shards = plan_shards(entries, max_shard_size)
        n = len(shards)
        self._names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                                                             for i in range(n)]
        self._shards = shards
        self._shard_of = {e[0]: i for i, s in enumerate(shards) for e in s}
        self._writer: Optional[SafetensorsStreamWriter] = None
        self._current = -1
        self.total_size = sum(nbytes(e[1], e[2]) for e in entries)

    def __contains__(self, name):
        return name in self._shard_of

    def write(self, name: str, tensor: torch.Tensor):
        i = self._shard_of[name]
        if i != self._current:
            if i != self._current + 1:
                raise RuntimeError(f"tensor {name!r} written out of order")
            if self._writer is not None:
                self._writer.close()
            self._writer = SafetensorsStreamWriter(self.directory / self._names[i], self._shards[i],
                                                   metadata={"format": "pt"})
            self._current = i
        self._writer.write(name, tensor)

    def close(self):
        if self._current != len(self._shards) - 1 and any(self._shards):
            raise RuntimeError(f"checkpoint closed after {self._current + 1} of {len(self._shards)} shards")
        if self._writer is not None:
            self._writer.close()
        elif not any(self._shards):  # empty checkpoint: still a valid file
            SafetensorsStreamWriter(self.directory / self._names[0], [], metadata={"format": "pt"}).close()
        if len(self._names) > 1:
            index = {"metadata": {"total_size": self.total_size},
                     "weight_map": {name: self._names[i] for name, i in self._shard_of.items()}}
            (self.directory / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    def abort(self):
        if self._writer is not None:
            self._writer.abort()


class OutputDirectory:
    """Temporary directory beside `out_dir`; `commit()` renames it onto the target, `abort()` removes it."""

    def __init__(self, out_dir: Union[str, os.PathLike], force: bool = False):
        self.target = check_target(out_dir, force).absolute()
        self.force = force
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.tmp-", dir=self.target.parent))
        self._open: List[object] = []

    def checkpoint(self, entries: Sequence[Entry], max_shard_size: int) -> ShardedCheckpoint:
        ckpt = ShardedCheckpoint(self.tmp, entries, max_shard_size)
        self._open.append(ckpt)
        return ckpt

    def file(self, relpath: str, entries: Sequence[Entry], metadata: Optional[Dict[str, str]] = None):
        path = self.tmp / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        w = SafetensorsStreamWriter(path, entries, metadata={"format": "pt", **(metadata or {})})
        self._open.append(w)
        return w

    def write_json(self, relpath: str, obj) -> None:
        path = self.tmp / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")

    def copy_files(self, source_dir: Optional[Path], names: Iterable[str]) -> List[str]:
        copied = []
        if source_dir is None:
            return copied
        for name in names:
            src = Path(source_dir) / name
            if src.is_file() and not (self.tmp / name).exists():
                shutil.copy2(src, self.tmp / name)
                copied.append(name)
        return copied

    def commit(self) -> Path:
        for w in self._open:
            w.close()
        self._open = []
        trash = None
        if self.target.exists():
            if not self.force:  # appeared while we were merging
                raise FileExistsError(f"{self.target}: output appeared during the merge; not replacing it")
            trash = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.old-", dir=self.target.parent))
            os.rename(self.target, trash / "old")
        os.rename(self.tmp, self.target)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        return self.target

    def abort(self) -> None:
        for w in self._open:
            try:
                w.abort()
            except Exception:
                pass
        self._open = []
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        return False
