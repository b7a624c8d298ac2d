"""Prompt files indexed once by byte offset (txt, jsonl, csv, webdataset tar) and read one prompt at a time."""

from __future__ import annotations

import csv
import hashlib
import json
import operator
import os
import tarfile
from array import array
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from emd_t2i.errors import UserError
from emd_t2i.files import OpenFiles

DEFAULT_COLUMNS = ("prompt", "text", "caption")
TEXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl", ".jsonlines", ".ndjson")
CSV_SUFFIXES = (".csv", ".tsv")
TAR_SUFFIXES = (".tar",)  # webdataset shards: a caption is the member KEY.txt (or KEY.<--prompt-column>)
ARROW_SUFFIXES = (".arrow",)
KINDS = {**dict.fromkeys(TEXT_SUFFIXES, "txt"), **dict.fromkeys(JSONL_SUFFIXES, "jsonl"),
         **dict.fromkeys(CSV_SUFFIXES, "csv"), **dict.fromkeys(TAR_SUFFIXES, "tar")}
INDEX_CACHE_MIN_BYTES = 8 << 20  # smaller files are indexed in well under a second: not worth a cache file
INDEX_VERSION = 1
BOM = "\ufeff"


def index_cache_dir() -> Path:
    """Where line-offset indexes of large prompt files are kept: $EMD_T2I_CACHE, else ~/.cache/emd-t2i."""
    root = os.environ.get("EMD_T2I_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "emd-t2i"
    return Path(root) / "prompt-index"


class PromptSource(Sequence):
    """A read-only list of prompts (cleaned, none empty) read one at a time; subclasses define `_get`."""

    name: str

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._get(j) for j in range(*i.indices(len(self)))]
        i, n = operator.index(i), len(self)
        if not -n <= i < n:
            raise IndexError(f"prompt {i} of {n}")
        return self._get(i % n)

    def __iter__(self) -> Iterator[str]:
        return (self._get(i) for i in range(len(self)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {len(self)} prompts)"

    def _get(self, i: int) -> str:
        raise NotImplementedError


class IndexedFiles(PromptSource):
    """Files of one kind (txt, jsonl, csv, tar) end to end; prompt i is read at the byte offset the index keeps."""

    def __init__(self, name: str, kind: str, files: list[str], fields: list, counts: list[int],
                 offsets: np.ndarray, sizes: np.ndarray | None):
        self.name, self.kind, self.files, self.fields = name, kind, files, fields
        self.bounds = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self.offsets, self.sizes = offsets, sizes
        self._open = OpenFiles()

    def __len__(self) -> int:
        return int(self.bounds[-1])

    def _get(self, i: int) -> str:
        f = int(np.searchsorted(self.bounds, i, side="right")) - 1
        path, field, offset = self.files[f], self.fields[f], int(self.offsets[i])
        if self.kind == "tar":
            return clean(_decode(self._open.read(path, offset, int(self.sizes[i])), path, offset))
        if self.kind == "csv":
            delimiter, col = field
            lines = (_decode(line, path, offset) for line in self._open.lines(path, offset))
            row = next(csv.reader(lines, delimiter=delimiter))
            return clean(row[col] if col < len(row) else None)
        text = _decode(self._open.line(path, offset), path, offset)
        if self.kind == "txt":
            return clean(text)
        row = json.loads(text)
        return clean(row if field is None else row.get(field))


def clean(value: object) -> str:
    """Collapse whitespace as CLIP's tokenizer does; None and blank values become "" (skipped by the index)."""
    return "" if value is None else " ".join(str(value).split())


def _decode(raw: bytes, path: str, offset: int, where: str = "") -> str:
    """UTF-8 text; `where` (", line N") says where a file that is not UTF-8 goes wrong."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"prompt file {path}{where} is not UTF-8 text: save the file as UTF-8") from err
    return text[1:] if offset == 0 and text.startswith(BOM) else text


# ---------------------------------------------------------------------------------------------------------
# Indexing files: one pass that keeps the byte offset of every non-empty prompt
# ---------------------------------------------------------------------------------------------------------


def index_files(name: str, kind: str, files: list[Path], column: str | None, cache: bool) -> IndexedFiles:
    """The prompts of `files` (all of one kind) as one sequence: each file is scanned once, or its cached index
    read; the offsets of all files are kept in one int64 array."""
    parts = [_index_file(path, kind, column, cache) for path in files]
    offsets = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
    sizes = np.concatenate([p[1] for p in parts]) if kind == "tar" else None
    return IndexedFiles(name, kind, [str(p) for p in files], [p[2] for p in parts], [len(p[0]) for p in parts],
                        offsets, sizes)


def _index_file(path: Path, kind: str, column: str | None, cache: bool):
    """(offsets, sizes or None, field) of one file, from the index cache when it is there and current."""
    stat = path.stat()
    cached = None
    if cache and stat.st_size >= INDEX_CACHE_MIN_BYTES:
        key = json.dumps([INDEX_VERSION, str(path.resolve()), stat.st_size, stat.st_mtime_ns, kind, column])
        cached = index_cache_dir() / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.npz"
        try:
            with np.load(cached, allow_pickle=False) as saved:
                return saved["offsets"], saved["sizes"] if kind == "tar" else None, json.loads(str(saved["field"]))
        except (OSError, ValueError, KeyError):
            pass
    offsets, sizes, field = _SCANNERS[kind](path, column)
    offsets = np.frombuffer(offsets, dtype=np.int64) if len(offsets) else np.zeros(0, np.int64)
    sizes = np.asarray(sizes, dtype=np.int64) if sizes is not None else None
    if cached is not None:
        try:  # a cache that cannot be written (read-only home) only costs the next run this scan again
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_name(f"{cached.stem}.tmp-{os.getpid()}.npz")
            np.savez(tmp, offsets=offsets, sizes=sizes if sizes is not None else np.zeros(0, np.int64),
                     field=np.array(json.dumps(field)))
            os.replace(tmp, cached)
        except OSError:
            pass
    return offsets, sizes, field


def _lines(path: Path) -> Iterator[tuple[int, int, str]]:
    """(byte offset, offset of the next line, decoded line) for each line of a file, read once in order."""
    try:
        with open(path, "rb") as f:
            offset = 0
            for number, raw in enumerate(f, start=1):
                yield offset, offset + len(raw), _decode(raw, str(path), offset, f", line {number},")
                offset += len(raw)
    except OSError as err:
        raise UserError(f"cannot read prompt file {path} ({err.__class__.__name__}): check it exists and is "
                        "readable") from err


def _scan_txt(path: Path, column: str | None):
    return array("q", (offset for offset, _, line in _lines(path) if line.strip())), None, None


def _scan_jsonl(path: Path, column: str | None):
    """Every non-blank line is parsed once. Without `column`, which default column applies is only known at the
    end (the first of prompt/text/caption that any row has), so each row notes which of them it fills."""
    wanted = [column] if column is not None else list(DEFAULT_COLUMNS)
    offsets, filled, keys = array("q"), bytearray(), {}
    strings = objects = 0
    for number, (offset, _, line) in enumerate(_lines(path), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"prompt file {path}, line {number}, is not valid JSON: fix or remove it") from err
        bits = 0
        if isinstance(row, str):
            strings += 1
            bits = 0x80 if row.strip() else 0
        elif isinstance(row, dict):
            objects += 1
            keys.update(dict.fromkeys(row))
            bits = sum(1 << k for k, name in enumerate(wanted) if clean(row.get(name)))
        offsets.append(offset)
        filled.append(bits)
    if objects == 0 and strings == len(offsets):
        bit, field = 0x80, None
    elif objects != len(offsets):
        raise UserError(f"prompt file {path} mixes JSON objects with other values: use one object a line")
    else:
        field = pick_column(list(keys), column, str(path))
        bit = 1 << wanted.index(field)
    return array("q", (o for o, b in zip(offsets, filled) if b & bit)), None, field


def _scan_csv(path: Path, column: str | None):
    """Records may span lines (quoted newlines): a record starts where the previous one's last line ended."""
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    end = [0]

    def lines():
        for _, next_offset, line in _lines(path):
            end[0] = next_offset
            yield line

    offsets = array("q")
    reader = csv.reader(lines(), delimiter=delimiter)
    try:
        header = next(reader, None)
        if header is None:  # an empty file: open_prompts reports it as holding no prompts
            return offsets, None, (delimiter, 0)
        col = header.index(pick_column(header, column, str(path)))
        start = end[0]
        for row in reader:
            if row and clean(row[col] if col < len(row) else None):
                offsets.append(start)
            start = end[0]
    except csv.Error as err:
        raise UserError(f"prompt file {path} is not valid CSV ({err}): fix it or use .txt / .jsonl") from err
    return offsets, None, (delimiter, col)


def _scan_tar(path: Path, column: str | None):
    suffix = "." + (column or "txt")
    offsets, sizes = array("q"), []
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(suffix):
                    text = _decode(tar.extractfile(member).read(), str(path), -1, f", member {member.name},")
                    if clean(text):
                        offsets.append(member.offset_data)
                        sizes.append(member.size)
    except tarfile.TarError as err:
        raise UserError(f"prompt shard {path} is not an uncompressed tar ({err}): prompts are read in place, "
                        "so decompress .tar.gz shards first") from err
    return offsets, sizes, column


_SCANNERS = {"txt": _scan_txt, "jsonl": _scan_jsonl, "csv": _scan_csv, "tar": _scan_tar}


def pick_column(columns: Sequence[str], column: str | None, source: str) -> str:
    """The requested column, or the first default one present; a UserError lists what exists."""
    if column is not None and column in columns:
        return column
    if column is None:
        for name in DEFAULT_COLUMNS:
            if name in columns:
                return name
    wanted = repr(column) if column is not None else f"any of {', '.join(DEFAULT_COLUMNS)}"
    found = ", ".join(map(str, columns)) or "none"
    raise UserError(
        f"prompt source {source} has no column {wanted} (found: {found}): choose one with --prompt-column"
    )
