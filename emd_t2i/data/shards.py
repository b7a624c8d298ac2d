"""Shards of the embedding store: safetensors files written as a stream (the prompts' hashes, their embeddings batch
by batch, a checksum of each row), checked when opened, and read row by row."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from emd_t2i.files import atomic_output

ROWS_READ_AT_ONCE = 64  # rows per read when a whole shard is verified


class DamagedShard(Exception):
    """A shard whose header, size or rows are not what it was written with; the message says which."""


def header_bytes(tensors: dict[str, tuple[str, list[int], int]], metadata: dict[str, str]) -> bytes:
    """The safetensors header (length + JSON, padded so that the data starts 8-byte aligned)."""
    header, offset = {"__metadata__": metadata}, 0
    for name, (dtype, shape, nbytes) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def read_header(path: Path) -> tuple[dict, int] | None:
    """(header, byte offset of the data) of a safetensors file, or None if it is not one."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if size > 100 << 20:
                return None
            header = json.loads(f.read(size))
    except (OSError, ValueError):
        return None
    return (header, 8 + size) if isinstance(header, dict) else None


def tensor_bytes(t: Tensor) -> bytes:
    t = t.detach().contiguous().cpu()
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes()


def row_checksum(prompt_hash: int, raw: bytes) -> int:
    """A 64-bit BLAKE2b of a row's bytes and its prompt's hash: a flipped byte, or a row read for another prompt
    (a damaged lookup table), does not match."""
    digest = hashlib.blake2b(int(prompt_hash).to_bytes(8, "little", signed=True), digest_size=8)
    digest.update(raw)
    return int.from_bytes(digest.digest(), "little", signed=True)


def write_shard(path: Path, hashes: np.ndarray, batches: Iterable[Tensor], shape: list[int], st_dtype: str,
                row_bytes: int) -> None:
    """Stream one shard to a temporary name and rename it: a shard under its final name is always whole. Only one
    batch is in memory at a time (a shard of SD 1.5 in float16 is 1.2 GB at the default shard size); the rows'
    checksums, known once they are written, come last."""
    count = len(hashes)
    header = header_bytes({"hashes": ("I64", [count], 8 * count),
                           "embeddings": (st_dtype, [count, *shape], count * row_bytes),
                           "checksums": ("I64", [count], 8 * count)}, {"format": "pt"})
    checksums = np.empty(count, dtype="<i8")
    with atomic_output(path) as f:
        f.write(header)
        f.write(hashes.astype("<i8").tobytes())
        written = 0
        for batch in batches:
            data = tensor_bytes(batch)
            for k in range(len(batch)):
                checksums[written + k] = row_checksum(hashes[written + k], data[k * row_bytes:(k + 1) * row_bytes])
            f.write(data)
            written += len(batch)
        assert written == count, (written, count)
        f.write(checksums.tobytes())


@dataclass(frozen=True)
class ShardLayout:
    """Where a shard's parts start (byte offsets in its file)."""

    hashes: int
    embeddings: int
    checksums: int


def open_shard(path: Path, count: int, shape: list[int], st_dtype: str, row_bytes: int) -> ShardLayout:
    """The layout of a shard written by `write_shard` for `count` rows of `shape`; DamagedShard if its header or
    size say otherwise (a truncated or overwritten file)."""
    found = read_header(path)
    if found is None:
        raise DamagedShard("its header is not readable")
    header, start = found
    expected = {"hashes": ("I64", [count]), "embeddings": (st_dtype, [count, *shape]), "checksums": ("I64", [count])}
    offsets = {}
    for name, (dtype, tensor_shape) in expected.items():
        entry = header.get(name)
        if not isinstance(entry, dict) or (entry.get("dtype"), entry.get("shape")) != (dtype, tensor_shape):
            raise DamagedShard(f"its header does not describe {count} rows of {dtype} {tensor_shape}")
        offsets[name] = start + entry["data_offsets"][0]
    size = start + 16 * count + count * row_bytes
    if not path.is_file() or path.stat().st_size != size:
        raise DamagedShard(f"it has {path.stat().st_size if path.is_file() else 0} bytes, expected {size}")
    return ShardLayout(**offsets)


def read_shard_hashes(path: Path, layout: ShardLayout, count: int) -> np.ndarray:
    return np.fromfile(path, dtype="<i8", count=count, offset=layout.hashes).astype(np.int64)


def shard_problem(path: Path, hashes: np.ndarray, shape: list[int], st_dtype: str, row_bytes: int) -> str | None:
    """What is wrong with a shard from an earlier run (None: it is whole, holds exactly these prompts in this order,
    and every row matches its checksum). Reads the whole shard."""
    count = len(hashes)
    try:
        layout = open_shard(path, count, shape, st_dtype, row_bytes)
    except DamagedShard as err:
        return str(err)
    if not np.array_equal(read_shard_hashes(path, layout, count), hashes):
        return "it holds other prompts"
    checksums = np.fromfile(path, dtype="<i8", count=count, offset=layout.checksums)
    with open(path, "rb") as f:
        f.seek(layout.embeddings)
        for first in range(0, count, ROWS_READ_AT_ONCE):
            data = f.read(min(ROWS_READ_AT_ONCE, count - first) * row_bytes)
            for k in range(len(data) // row_bytes):
                if row_checksum(hashes[first + k], data[k * row_bytes:(k + 1) * row_bytes]) != checksums[first + k]:
                    return f"row {first + k} does not match its checksum"
    return None
