"""Reads at a byte offset and atomic writes: what lazy prompt sources and the embedding store stand on."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

CHUNK = 1 << 16


class OpenFiles:
    """Read-only file descriptors kept open for positioned reads, at most `limit` at a time.

    Reads use `os.pread`, which moves no shared file position: several threads, or processes forked after the
    files were opened, read the same descriptors safely. Nothing is memory-mapped, so what a process has read
    stays in the OS page cache (shared by every rank on the machine) and never counts towards its own RSS.
    """

    def __init__(self, limit: int = 64):
        self.limit = limit
        self._fds: OrderedDict[str, int] = OrderedDict()

    def fd(self, path: str) -> int:
        fd = self._fds.pop(path, None)
        if fd is None:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
            while len(self._fds) >= self.limit:
                os.close(self._fds.popitem(last=False)[1])
        self._fds[path] = fd
        return fd

    def read(self, path: str, offset: int, size: int) -> bytes:
        """Exactly `size` bytes at `offset` (fewer only at the end of the file)."""
        fd, parts, got = self.fd(path), [], 0
        while got < size:
            part = _pread(fd, size - got, offset + got)
            if not part:
                break
            parts.append(part)
            got += len(part)
        return b"".join(parts)

    def lines(self, path: str, offset: int) -> Iterator[bytes]:
        """The lines (each with its b"\\n", the last maybe without) from `offset` to the end of the file."""
        fd, rest = self.fd(path), b""
        while True:
            chunk = _pread(fd, CHUNK, offset)
            if not chunk:
                if rest:
                    yield rest
                return
            offset += len(chunk)
            rest += chunk
            start = 0
            while (end := rest.find(b"\n", start)) >= 0:
                yield rest[start : end + 1]
                start = end + 1
            rest = rest[start:]

    def line(self, path: str, offset: int) -> bytes:
        return next(self.lines(path, offset), b"")

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.popitem()[1])

    def __del__(self):
        with contextlib.suppress(OSError, TypeError, AttributeError):  # at interpreter shutdown `os` may be gone
            self.close()

    def __getstate__(self):  # a pickled copy (a spawned worker) opens its own descriptors
        return {"limit": self.limit}

    def __setstate__(self, state):
        self.__init__(state["limit"])


def _pread(fd: int, size: int, offset: int) -> bytes:
    if hasattr(os, "pread"):
        return os.pread(fd, size, offset)
    os.lseek(fd, offset, os.SEEK_SET)  # Windows has no pread; there a descriptor must not be shared
    return os.read(fd, size)


@contextlib.contextmanager
def atomic_output(path: Path):
    """A binary file to write `path` through: it is written under a temporary name beside `path`, flushed to disk,
    then renamed, so readers (and a resumed run) see the old file or the whole new one, never half of it."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def file_sha256(path: Path, digest=None) -> str:
    """The sha256 of a file's bytes, read in 4 MiB blocks (or fed into `digest`, to hash several files as one)."""
    digest = digest or hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    with atomic_output(path) as f:
        f.write(data)


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, text.encode())


def write_json_atomic(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def save_image_atomic(path: Path, image, **png_options) -> None:
    """A PIL image as a PNG, atomically (a PNG that exists is complete: resumable image folders rely on it)."""
    with atomic_output(path) as f:
        image.save(f, format="PNG", **png_options)
