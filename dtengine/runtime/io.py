"""Atomic writes and output folders: readers only ever see complete files, and nothing written is lost.

A file is written under a temporary name beside its target, flushed and fsynced, then renamed over the target
(and the folder fsynced), so an interrupted write leaves the previous version intact. Temporary files are
created with mode "x", which honours the umask (tempfile.mkstemp's 0600 would hide shared shards and caches).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import socket
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from dtengine.runtime.errors import OutputDirError


def cache_dir() -> Path:
    """dtengine's cache folder (the built-in dataset, compiled kernels): `$DTENGINE_CACHE`, or
    `~/.cache/dtengine` when it is unset or empty. Read on every call, so tests and users can point it elsewhere."""
    return Path(os.environ.get("DTENGINE_CACHE") or "~/.cache/dtengine").expanduser()


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def _fsync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a folder be opened or synced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | Path) -> Iterator[IO[bytes]]:
    """A binary file to write; on success it replaces `path` in one rename, on error it is removed."""
    path = Path(path)
    tmp = _temp_name(path)
    try:
        with open(tmp, "xb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def atomic_write(path: str | Path, content: bytes | str | Callable[[IO[bytes]], None]) -> Path:
    """Write bytes, text (UTF-8) or whatever `content(handle)` writes to `path`, atomically. Returns the path."""
    with atomic_open(path) as handle:
        if callable(content):
            content(handle)
        else:
            handle.write(content.encode() if isinstance(content, str) else content)
    return Path(path)


@contextlib.contextmanager
def atomic_folder(target: str | Path) -> Iterator[Path]:
    """A temporary folder beside `target` to fill; on success it is renamed to `target` in one step.

    Raises:
        FileExistsError: `target` appeared while the folder was being filled (e.g. another process made it).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(target)
    tmp.mkdir()
    try:
        yield tmp
        try:
            os.rename(tmp, target)
        except OSError as err:
            if target.exists():
                raise FileExistsError(f"'{target}' was created while this folder was being written") from err
            raise
        _fsync_folder(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prepare_output_dir(path: str | Path, what: str = "output directory", fix: str = "choose another") -> Path:
    """Create `path` if needed and prove it is writable, before any compute starts.

    Raises:
        OutputDirError: one line naming `what`, the folder and `fix`.
    """
    folder = Path(path).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = _temp_name(folder / "write-test")
        probe.touch(exist_ok=False)
        probe.unlink()
    except OSError as err:
        raise OutputDirError(f"{what} '{folder}' is not writable ({err.strerror or err}); {fix}") from err
    return folder


def _describe_holder(text: str) -> str:
    try:
        holder = json.loads(text)
        return f"pid {holder['pid']} on {holder['host']}, started {holder['since']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"


class FolderLock:
    """An exclusive lock on an output folder (`fcntl.flock` on `<folder>/.dtengine.lock`), holding who took it.

    The operating system releases a flock when its process dies, so a lock left by a killed run is free: it is
    taken over, with a warning naming the run that left it. flock is per host; on a filesystem shared by several
    hosts (NFS) it may not see a holder on another host.
    """

    NAME = ".dtengine.lock"

    def __init__(self, folder: str | Path):
        self.folder, self.path, self.fd = Path(folder), Path(folder) / self.NAME, None

    def acquire(self) -> FolderLock:
        """Take the lock. Raises: OutputDirError naming the holder when a live run has it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe_holder(self.path.read_text())
            os.close(fd)
            raise OutputDirError(
                f"'{self.folder}' is in use by another dtengine run ({holder}); wait for it, stop it, or choose "
                "another out_dir"
            ) from None
        previous = os.pread(fd, 4096, 0).decode(errors="replace")
        if previous.strip():
            warnings.warn(
                f"took over the lock of '{self.folder}' left by a run that is gone ({_describe_holder(previous)})",
                stacklevel=2,
            )
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)  # an empty lock file says nobody left it behind
            os.close(self.fd)  # closing releases the flock
            self.fd = None
