"""Atomic output directory with a sharded safetensors checkpoint, task heads and copied config/tokenizer.

Everything is written into a temporary directory `.OUT.tmp-XXXXXXXX/` beside the target (same filesystem) and
renamed onto the target at the end, so an interrupted merge leaves neither a half-written output nor (SIGINT,
SIGTERM, errors) the temporary directory. An existing target is only replaced with force=True, and then only
after the new output is complete.

What a hard kill (SIGKILL, power loss) leaves behind is found by the next run against the same output: each
temporary directory holds an owner record (host, boot, PID and the PID's start time), and a directory whose
owner is provably gone is removed; one whose owner may still be running is never touched.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch

from pymerge.errors import DiskFullError
from pymerge.io.reader import SAFETENSORS_INDEX
from pymerge.io.safetensors_file import SafetensorsStreamWriter, nbytes
from pymerge.signals import signals_deferred, signals_interrupt



def _note(message: str) -> None:
    """What the cleanup of earlier runs did or could not do: one line on stderr (it concerns the user's files)."""
    print(f"pymerge: {message}", file=sys.stderr)

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


def _same_or_inside(inner: Path, outer: Path) -> bool:
    """`inner` is `outer` or lies inside it; both resolved. Also catches two spellings of one directory that
    path comparison misses (bind mounts, case-insensitive filesystems, hard-linked files) by device/inode."""
    if inner == outer or outer in inner.parents:
        return True
    try:
        st = outer.stat()
    except OSError:
        return False
    for q in (inner, *inner.parents):
        try:
            s = q.stat()
        except OSError:
            continue
        if (s.st_dev, s.st_ino) == (st.st_dev, st.st_ino):
            return True
    return False


def check_not_input(out: Union[str, os.PathLike], inputs: Iterable[Tuple[str, Union[str, os.PathLike]]]) -> None:
    """Refuse an output that is, contains or lies inside one of the inputs ((what, path) pairs), after resolving
    symlinks: replacing it (--force) would destroy the input, and writing inside it changes the input."""
    out_r = Path(os.path.abspath(out)).resolve()
    for what, path in inputs:
        in_r = Path(os.path.abspath(path)).resolve()
        if _same_or_inside(out_r, in_r):
            relation = "is" if _same_or_inside(in_r, out_r) else "lies inside"
        elif _same_or_inside(in_r, out_r):
            relation = "contains"
        else:
            continue
        raise ValueError(f"{out}: the output {relation} the {what} ({path}); refused with or without --force, "
                         "since writing there would change or destroy an input")


# --------------------------------------------------------------------------------------------------
# owner records: is the process that made a temporary directory still running?
# --------------------------------------------------------------------------------------------------
OWNER_FILE = ".pymerge-owner.json"
OWNERLESS_GRACE_S = 300  # a directory just made by mkdtemp has no owner record for a moment


def _boot_id() -> Optional[str]:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _proc_stat(pid: int) -> Optional[List[str]]:
    """Fields 3.. of /proc/PID/stat (state, ppid, ..., starttime at index 19); None off Linux or if gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return data[data.rindex(")") + 2:].split()


def owner_record() -> Dict[str, object]:
    stat = _proc_stat(os.getpid())
    return {"pid": os.getpid(), "start": stat[19] if stat else None, "boot": _boot_id(),
            "host": socket.gethostname(), "created": time.time()}


def owner_alive(rec: Dict[str, object]) -> Optional[bool]:
    """True: the owner runs; False: it is provably gone; None: cannot tell (another host)."""
    if rec.get("host") != socket.gethostname():
        return None
    boot = _boot_id()
    if boot and rec.get("boot") and rec["boot"] != boot:
        return False  # made before the last reboot
    pid = rec.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    stat = _proc_stat(pid)
    if stat is None:
        return True  # no /proc: trust the PID
    if stat[0] in ("Z", "X"):
        return False  # killed, not yet reaped: writes nothing any more
    if rec.get("start") is not None and stat[19] != rec["start"]:
        return False  # the PID was reused by a later process
    return True


def _read_owner(directory: Path) -> Optional[Dict[str, object]]:
    try:
        rec = json.loads((directory / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def _write_owner(directory: Path, target: Path) -> None:
    rec = owner_record()
    rec["target"] = str(target)
    (directory / OWNER_FILE).write_text(json.dumps(rec))


def _leftover_pattern(target: Path) -> "re.Pattern[str]":
    return re.compile(rf"\.{re.escape(target.name)}\.(tmp|old)-[A-Za-z0-9_]+")


def remove_stale(target: Union[str, os.PathLike]) -> List[Path]:
    """Remove what killed runs against `target` left beside it; returns the removed directories.

    A directory goes only when its owner record names this target and its owner is provably gone. If a kill
    hit the moment an old output was set aside for its replacement (`.OUT.old-*/old` with no OUT), the old
    output is put back. Leftovers that cannot be judged (no owner record, another host) are reported with the
    command that removes them, never removed.
    """
    target = Path(os.path.abspath(target))
    parent = target.parent
    if not parent.is_dir():
        return []
    pattern = _leftover_pattern(target)
    removed = []
    for d in sorted(parent.iterdir()):
        if not pattern.fullmatch(d.name) or d.is_symlink() or not d.is_dir():
            continue
        rec = _read_owner(d)
        alive = owner_alive(rec) if rec is not None and rec.get("target") == str(target) else None
        if alive is False:
            old = d / "old"
            if d.name.split(".")[-1].startswith("old-") and old.is_dir() and not os.path.lexists(target):
                os.rename(old, target)
                _note(f"restored {target} from {d} (a merge replacing it was killed midway)")
            shutil.rmtree(d, ignore_errors=True)
            if not os.path.lexists(d):
                _note(f"removed {d}, left by an interrupted run (process {rec.get('pid')}, no longer running)")
                removed.append(d)
            continue
        if alive is True:
            continue
        try:
            age = time.time() - d.stat().st_mtime
        except OSError:
            continue
        if rec is None and age < OWNERLESS_GRACE_S:
            continue  # probably being created right now
        why = "on another host" if rec is not None else "with no owner record (older pymerge?)"
        _note(f"{d} was left by an interrupted run {why}; if no pymerge process is writing {target}, "
              f"remove it with: rm -rf '{d}'")
    return removed


# --------------------------------------------------------------------------------------------------
# disk space
# --------------------------------------------------------------------------------------------------
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def human_bytes(n: int) -> str:
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= size:
            return f"{n / size:.1f} {unit} ({n:,} bytes)"
    return f"{n} bytes"


def free_bytes(path: Union[str, os.PathLike]) -> Optional[int]:
    try:
        st = os.statvfs(path)
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize


@contextlib.contextmanager
def _naming(path: Path):
    """Disk-full and other OS errors from a write name the file being written."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None:
            exc.filename = str(path)
        raise


def _current_umask() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no /proc: read it by setting it (restored at once)
    os.umask(mask)
    return mask


# --------------------------------------------------------------------------------------------------
# one atomic file (statistics files): the same guarantees as the output directory
# --------------------------------------------------------------------------------------------------
def _short_hash(text: Optional[str]) -> str:
    import hashlib

    return hashlib.sha256((text or "").encode()).hexdigest()[:8]


def _file_owner_token() -> str:
    """Who writes a temporary file, in its name (a file has no room for an owner record): host and boot (hashed),
    PID and the PID's start time."""
    stat = _proc_stat(os.getpid())
    return f"{_short_hash(socket.gethostname())}{_short_hash(_boot_id())}-{os.getpid()}-{stat[19] if stat else 0}"


def remove_stale_files(path: Union[str, os.PathLike]) -> List[Path]:
    """Temporary files `.NAME.tmp-OWNER-XXXX` beside `path` whose owner is provably gone are removed."""
    path = Path(os.path.abspath(path))
    pattern = re.compile(rf"\.{re.escape(path.name)}\.tmp-([0-9a-f]{{8}})([0-9a-f]{{8}})-(\d+)-(\d+)-[A-Za-z0-9_]+")
    removed = []
    if not path.parent.is_dir():
        return removed
    for f in sorted(path.parent.iterdir()):
        m = pattern.fullmatch(f.name)
        if not m or f.is_symlink() or not f.is_file():
            continue
        host, boot, pid, start = m.groups()
        rec = {"host": socket.gethostname() if host == _short_hash(socket.gethostname()) else "?", "pid": int(pid),
               "start": None if start == "0" else start,
               "boot": _boot_id() if boot == _short_hash(_boot_id()) else "another boot"}
        if owner_alive(rec) is False:
            with contextlib.suppress(OSError):
                f.unlink()
                _note(f"removed {f}, left by an interrupted run (process {pid}, no longer running)")
                removed.append(f)
    return removed


@contextlib.contextmanager
def atomic_file(path: Union[str, os.PathLike], *, expected_bytes: Optional[int] = None):
    """Yields a temporary path beside `path` to write; on success it is renamed onto `path` (mode following the
    umask, not mkstemp's 0600). On an error, Ctrl-C or SIGTERM it is removed; one a SIGKILL left is removed by
    the next write of the same path. Out of space: a DiskFullError naming the path and the bytes needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_files(path)
    free = free_bytes(path.parent)
    if expected_bytes is not None and free is not None and expected_bytes > free:
        raise DiskFullError(f"{path}: not enough space: the file needs {human_bytes(expected_bytes)}, and "
                            f"{human_bytes(free)} are free on that filesystem; nothing was written", str(path))
    with signals_interrupt():
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{_file_owner_token()}-", dir=path.parent)
        os.close(fd)
        try:
            yield Path(tmp)
            os.chmod(tmp, 0o666 & ~_current_umask())
            os.replace(tmp, path)
        except BaseException as exc:
            with signals_deferred():
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            full = isinstance(exc, OSError) and exc.errno in DISK_FULL
            if not full and "os error 28" not in str(exc).lower() and "no space left" not in str(exc).lower():
                raise
            free = free_bytes(path.parent)
            raise DiskFullError(
                f"no space left on device while writing {path}: the file needs "
                f"{human_bytes(expected_bytes) if expected_bytes is not None else 'more space'}"
                + (f", {human_bytes(free)} are free there now (the partial file was removed)" if free is not None
                   else " (the partial file was removed)"), str(path)) from exc


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

    def file_names(self) -> List[str]:
        return self._names + ([SAFETENSORS_INDEX] if len(self._names) > 1 else [])

    def write(self, name: str, tensor: torch.Tensor):
        i = self._shard_of[name]
        if i != self._current:
            if i != self._current + 1:
                raise RuntimeError(f"tensor {name!r} written out of order")
            if self._writer is not None:
                with _naming(self._writer.path):
                    self._writer.close()
            with _naming(self.directory / self._names[i]):
                self._writer = SafetensorsStreamWriter(self.directory / self._names[i], self._shards[i],
                                                       metadata={"format": "pt"})
            self._current = i
        with _naming(self._writer.path):
            self._writer.write(name, tensor)

    def close(self):
        if self._current != len(self._shards) - 1 and any(self._shards):
            raise RuntimeError(f"checkpoint closed after {self._current + 1} of {len(self._shards)} shards")
        with _naming(self.directory / self._names[max(self._current, 0)]):
            if self._writer is not None:
                self._writer.close()
            elif not any(self._shards):  # empty checkpoint: still a valid file
                SafetensorsStreamWriter(self.directory / self._names[0], [], metadata={"format": "pt"}).close()
        if len(self._names) > 1:
            index = {"metadata": {"total_size": self.total_size},
                     "weight_map": {name: self._names[i] for name, i in self._shard_of.items()}}
            with _naming(self.directory / SAFETENSORS_INDEX):
                (self.directory / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    def abort(self):
        if self._writer is not None:
            self._writer.abort()


class _GuardedFile:
    """A SafetensorsStreamWriter whose OS errors name its file."""

    def __init__(self, path: Path, entries, metadata):
        self.path = path
        with _naming(path):
            self._w = SafetensorsStreamWriter(path, entries, metadata=metadata)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        with _naming(self.path):
            self._w.write(name, tensor)

    def close(self) -> None:
        with _naming(self.path):
            self._w.close()

    def abort(self) -> None:
        self._w.abort()


class OutputDirectory:
    """Temporary directory beside `out_dir`; `commit()` renames it onto the target, `abort()` removes it.

    Used as a context manager it also turns SIGTERM (like SIGINT) into an exception that removes the temporary
    directory, and an out-of-space error into a `DiskFullError` naming the file, the bytes the output needs and
    the bytes free. Every file must be declared before its data is written (checkpoint(), file()); a declared
    total larger than the free space is refused at once, before any data is written.
    """

    def __init__(self, out_dir: Union[str, os.PathLike], force: bool = False):
        self.target = check_target(out_dir, force).absolute()
        self.force = force
        self.target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(self.target)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.tmp-", dir=self.target.parent))
        try:
            _write_owner(self.tmp, self.target)
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        self._open: List[object] = []
        self._paths: Dict[str, str] = {}       # case-folded relative path -> as declared
        self.declared_bytes = 0
        self._free_at_start = free_bytes(self.tmp)
        self._signals = None
        self.committed = False

    # -- declared files -------------------------------------------------------------------------------
    def _claim(self, relpath: str) -> Path:
        """Each output path is written once; names equal up to case collide too (macOS, Windows)."""
        key = os.path.normpath(relpath).casefold()
        if key in self._paths:
            raise ValueError(f"{self.target}: two outputs would be written to one file: "
                             f"{self._paths[key]!r} and {relpath!r}")
        self._paths[key] = relpath
        path = self.tmp / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def _declare(self, n: int, what: str) -> None:
        self.declared_bytes += n
        free = self._free_at_start
        if free is not None and self.declared_bytes > free:
            raise DiskFullError(
                f"{self.target}: not enough space for the output: it needs at least "
                f"{human_bytes(self.declared_bytes)} (counted up to {what}), and {human_bytes(free)} are free on "
                "that filesystem; nothing was written",
                str(self.target.parent))

    def checkpoint(self, entries: Sequence[Entry], max_shard_size: int) -> "ShardedCheckpoint":
        ckpt = ShardedCheckpoint(self.tmp, entries, max_shard_size)
        for name in ckpt.file_names():
            self._claim(name)
        self._declare(ckpt.total_size, "the main checkpoint")
        self._open.append(ckpt)
        return ckpt

    def file(self, relpath: str, entries: Sequence[Entry], metadata: Optional[Dict[str, str]] = None):
        path = self._claim(relpath)
        self._declare(sum(nbytes(e[1], e[2]) for e in entries), relpath)
        w = _GuardedFile(path, entries, {"format": "pt", **(metadata or {})})
        self._open.append(w)
        return w

    def write_json(self, relpath: str, obj) -> None:
        path = self._claim(relpath)
        with _naming(path):
            path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")

    def copy_files(self, source_dir: Optional[Path], names: Iterable[str]) -> List[str]:
        copied = []
        if source_dir is None:
            return copied
        for name in names:
            src = Path(source_dir) / name
            if src.is_file() and os.path.normpath(name).casefold() not in self._paths:
                dst = self._claim(name)
                with _naming(dst):
                    shutil.copy2(src, dst)
                copied.append(name)
        return copied

    # -- end ------------------------------------------------------------------------------------------
    def commit(self) -> Path:
        for w in self._open:
            w.close()
        self._open = []
        mode = 0o777 & ~_current_umask()  # mkdtemp made it 0700; the output follows the umask like mkdir
        os.chmod(self.tmp, mode)
        trash = None
        with signals_interrupt(), signals_deferred():  # no signal between the renames
            if os.path.lexists(self.target):
                if not self.force:  # appeared while we were merging
                    raise FileExistsError(f"{self.target}: output appeared during the merge; not replacing it")
                trash = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.old-", dir=self.target.parent))
                _write_owner(trash, self.target)  # a kill before the second rename: the next run restores it
                os.rename(self.target, trash / "old")
            try:
                os.rename(self.tmp, self.target)
            except BaseException:
                if trash is not None:
                    os.rename(trash / "old", self.target)
                raise
            self.committed = True
            with contextlib.suppress(OSError):
                (self.target / OWNER_FILE).unlink()
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        return self.target

    def abort(self) -> None:
        with signals_interrupt(), signals_deferred():  # a second Ctrl-C does not stop the cleanup halfway
            for w in self._open:
                try:
                    w.abort()
                except Exception:
                    pass
            self._open = []
            if not self.committed:
                shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self):
        self._signals = signals_interrupt()
        self._signals.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is not None:
                self.abort()
        finally:
            self._signals.__exit__(None, None, None)
        if isinstance(exc, OSError) and exc.errno in DISK_FULL and not isinstance(exc, DiskFullError):
            raise self._disk_full(exc) from exc
        return False

    def _disk_full(self, exc: OSError) -> DiskFullError:
        free = free_bytes(self.target.parent)
        where = Path(exc.filename) if exc.filename else self.target
        if where.is_relative_to(self.tmp):  # name the file as the user will know it
            where = self.target / where.relative_to(self.tmp)
        kept = "; the existing output was left unchanged" if os.path.lexists(self.target) else ""
        msg = (f"no space left on device while writing {where} for output {self.target}: the output needs "
               f"{human_bytes(self.declared_bytes)} or more"
               + (f", {human_bytes(free)} are free there now (the partial output was removed)"
                  if free is not None else " (the partial output was removed)") + kept)
        return DiskFullError(msg, str(where))
