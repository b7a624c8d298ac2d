"""Reads at a byte offset, atomic writes, the mode of written files, and the one line a failed write ends in: what
lazy prompt sources, the embedding store, checkpoints and exports stand on."""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

from safetensors import SafetensorError

from emd_t2i.errors import UserError

CHUNK = 1 << 16
# What a writer raises when the disk is full or the folder cannot be written: the OS's own error, and the same error
# as safetensors (SafetensorError) and torch's zip writer (RuntimeError "unexpected pos", "file write failed")
# report it. Caught only around writes, where none of them can be anything else.
WRITE_ERRORS = (OSError, SafetensorError, RuntimeError)


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


def write_failure(path: Path, err: BaseException, then: str = "run the same command again") -> UserError:
    """The one line a failed write of `path` ends in, whichever library raised `err` (one of WRITE_ERRORS)."""
    if isinstance(err, (IsADirectoryError, NotADirectoryError, FileExistsError)):
        return UserError(wrong_kind(err))
    text = str(err)
    if getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in text or "os error 28" in text:
        reason = "no space left on the disk"
    elif isinstance(err, OSError) and err.strerror:
        reason = err.strerror[0].lower() + err.strerror[1:]
    else:
        reason = f"{type(err).__name__}: {text.strip().splitlines()[0] if text.strip() else 'no message'}"
    return UserError(f"cannot write {path} ({reason}): free some space or make the folder writable, then {then}")


def wrong_kind(err: OSError, flag: str | None = None) -> str:
    """What to say when a path names a file where a folder is expected (NotADirectoryError; FileExistsError from
    mkdir) or a folder where a file is (IsADirectoryError)."""
    path = Path(err.filename or "")
    named = f"{flag} {path}" if flag else str(path)
    if isinstance(err, IsADirectoryError):
        return f"{named} is a folder where a file is expected: give the path of a file"
    culprit = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), path)
    return f"{named}: {culprit} is a file where a folder is expected: give a folder (or a new path)"


@contextlib.contextmanager
def atomic_output(path: Path):
    """A binary file to write `path` through: it is written under a temporary name beside `path`, flushed to disk,
    then renamed, so readers (and a resumed run) see the old file or the whole new one, never half of it. A write
    the OS refuses (a full disk, a read-only folder) ends in one line; the partial file is removed either way."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if err.errno is None:  # not the OS refusing a write (e.g. PIL's "cannot write mode"): a bug, shown as is
            raise
        raise write_failure(path, err) from err
    finally:
        tmp.unlink(missing_ok=True)


def file_sha256(path: Path, digest=None) -> str:
    """The sha256 of a file's bytes, read in 4 MiB blocks (or fed into `digest`, to hash several files as one)."""
    digest = digest or hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def unused_path(path: Path) -> Path:
    """`path`, or the first of path.2, path.3, ... that does not exist: where to move something aside."""
    path, n = Path(path), 2
    found = path
    while found.exists():
        found, n = path.with_name(f"{path.name}.{n}"), n + 1
    return found


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


def save_safetensors(tensors: dict, path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' `save_file`, then `sort_safetensors_metadata`: the same tensors and metadata give the same bytes."""
    from safetensors.torch import save_file  # imports torch

    save_file(tensors, str(path), metadata=metadata)
    sort_safetensors_metadata(path)


def sort_safetensors_metadata(path: Path) -> None:
    """Rewrite a .safetensors header in place with its metadata keys sorted (`sorted_safetensors_header`).

    safetensors keeps the metadata in a hash map, so its keys come out in a new order on every call and two exports
    of one checkpoint would differ in sha256.
    """
    with open(path, "r+b") as f:
        size = f.read(8)
        header = size + f.read(int.from_bytes(size, "little"))
        f.seek(0)
        f.write(sorted_safetensors_header(header))


def sorted_safetensors_header(raw: bytes) -> bytes:
    """A .safetensors header (the 8-byte length and the JSON after it) with the metadata keys sorted. It keeps its
    length (the same JSON, reordered; padded with spaces as safetensors pads), so the tensor offsets are unchanged;
    a header that would not fit is returned as it was."""
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size], object_pairs_hook=OrderedDict)
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    canonical = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    return raw[:8] + canonical.ljust(size, b" ") if len(canonical) <= size else raw[:8 + size]


# ---------------------------------------------------------------------------------------------------------
# File modes: what the project writes is readable as the user's umask says, like any file `open` creates
# ---------------------------------------------------------------------------------------------------------


def current_umask() -> int:
    """The process umask. Linux reports it in /proc/self/status; elsewhere it can only be read by setting it, which
    for an instant applies to files other threads create, so that fallback is taken once and remembered."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return _umask_by_setting()


@functools.lru_cache(maxsize=1)
def _umask_by_setting() -> int:
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The mode `open` gives a new file: 0o666 less the umask (0o644 under the usual umask 022)."""
    return 0o666 & ~current_umask()


def follow_umask(path: Path) -> None:
    """Give a file, or every file under a folder, the mode `open` would have given it. Some writers create private
    files whatever the umask (safetensors 0.8's `save_file` makes them 0600), so that a shared LoRA, checkpoint or
    pipeline folder could not be read by a UI or a colleague running as another user."""
    path = Path(path)
    mode = new_file_mode()
    for file in [path] if path.is_file() else (p for p in path.rglob("*") if p.is_file() and not p.is_symlink()):
        os.chmod(file, mode)
