"""Content-addressed file store for raw mails and attachments: <root>/ab/<sha256>."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import itertools
import os
import secrets
from pathlib import Path


class BlobStore:
    """Blobs are written with `put` and made durable with `sync`, once for a whole group of blobs:
    one syncfs(2) instead of two fsyncs per blob (the file and its directory entry)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._root = str(root)  # plain strings: `put` runs for every mail and attachment
        self._made_dirs: set[str] = set()  # mkdir is a syscall per blob otherwise
        self._unsynced: list[str] = []
        # Temporary names unique to this store object and process (the process id at each write, as a
        # forked copy shares the rest; a random part; a counter) instead of a random name drawn per blob
        # as tempfile does. O_EXCL still refuses a name that exists.
        self._temp_token = secrets.token_hex(4)
        self._temp_count = itertools.count()

    def path(self, sha256: str) -> Path:
        # One level of 256 directories: a million blobs are ~4,000 files each, and a new store does not
        # pay a mkdir for almost every blob, as two levels (65,536 directories) would.
        return self.root / sha256[:2] / sha256

    def put(self, data: bytes, sha256: str | None = None) -> str:
        """Store bytes once; safe to call again and from several processes at once."""
        digest = sha256 or hashlib.sha256(data).hexdigest()
        directory = f"{self._root}/{digest[:2]}"
        target = f"{directory}/{digest}"
        if os.path.exists(target):
            return digest
        if directory not in self._made_dirs:
            os.makedirs(directory, exist_ok=True)
            self._made_dirs.add(directory)
        temp = f"{directory}/.tmp-{os.getpid()}-{self._temp_token}-{next(self._temp_count)}"
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                with memoryview(data) as rest:
                    while rest:
                        rest = rest[os.write(fd, rest) :]
            finally:
                os.close(fd)
            os.replace(temp, target)  # atomic: a reader never sees half a file
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
            raise
        self._unsynced.append(target)
        return digest

    def sync(self) -> None:
        """Make every blob written since the last sync durable (survives a power cut)."""
        if not self._unsynced:
            return
        if not _syncfs(self.root):
            for path in self._unsynced:
                _fsync(path)
            for directory in {os.path.dirname(p) for p in self._unsynced}:
                _fsync(directory)
        self._unsynced.clear()

    def get(self, sha256: str) -> bytes:
        return self.path(sha256).read_bytes()


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_libc_name = ctypes.util.find_library("c")
_libc = ctypes.CDLL(_libc_name, use_errno=True) if _libc_name else None


def _syncfs(path: Path) -> bool:
    """syncfs(2) on the file system holding `path`; False where the platform has none (not Linux)."""
    if _libc is None or not hasattr(_libc, "syncfs"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.syncfs(fd) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, os.strerror(errno), str(path))
    finally:
        os.close(fd)
    return True
