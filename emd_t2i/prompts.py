"""Prompt sources (txt, jsonl, csv, folder, Hugging Face dataset) and the text-embedding cache."""

from __future__ import annotations

import csv
import json
import sys
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from .errors import UserError

DEFAULT_COLUMNS = ("prompt", "text", "caption")
TEXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl", ".jsonlines", ".ndjson")
CSV_SUFFIXES = (".csv", ".tsv")
# The list that ships with the repository (a checkout; it is not package data).
# Prompt lists that ship with the tool: `prompts/NAME.txt` in a checkout, installed to share/emd-t2i/prompts.
BUNDLED_DIRS = (Path(__file__).resolve().parents[1] / "prompts", Path(sys.prefix) / "share" / "emd-t2i" / "prompts")
GENERAL_PROMPTS = BUNDLED_DIRS[0] / "general.txt"


def bundled_prompt_file(name: str) -> Path | None:
    """The shipped list called `name` (e.g. `general`), wherever this install keeps it."""
    for folder in BUNDLED_DIRS:
        if (folder / f"{name}.txt").is_file():
            return folder / f"{name}.txt"
    return None


# ---------------------------------------------------------------------------------------------------------
# Loading prompts
# ---------------------------------------------------------------------------------------------------------


def load_prompts(
    source: str, *, column: str | None = None, split: str = "train", limit: int | None = None
) -> list[str]:
    """Prompts from a source; whitespace is collapsed and empty prompts are skipped.

    source: a bundled list by name (`general`), `file.txt` (one prompt a line), `file.jsonl` / `file.csv` / `file.tsv` (the `column`, by default
    the first of prompt/text/caption present), a folder (every line of every *.txt in it, sorted by file
    name: a file holding one caption and a file holding a list both work), or `hf:owner/name` (a Hugging
    Face dataset's `split` and `column`; needs `pip install datasets`). `limit` keeps the first N.
    """
    if limit is not None and limit < 1:
        raise UserError(f"the prompt limit must be >= 1 (got {limit})")
    if not Path(source).exists() and (bundled := bundled_prompt_file(source)) is not None:
        source = str(bundled)
    if source.startswith("hf:"):
        prompts = _from_hf(source[3:], column, split, limit)
    else:
        prompts = _clean(_from_path(Path(source).expanduser(), column))
    if not prompts:
        raise UserError(f"prompt source {source} holds no prompts: give --prompts a non-empty source")
    return prompts[:limit] if limit is not None else prompts


def _clean(prompts: Iterable[object]) -> list[str]:
    """Collapse whitespace as CLIP's tokenizer does, and drop empty entries."""
    cleaned = (" ".join(str(p).split()) for p in prompts if p is not None)
    return [p for p in cleaned if p]


def _from_path(path: Path, column: str | None) -> list[str]:
    if not path.exists():
        raise UserError(
            f"prompt source {path} does not exist: give --prompts a file, folder or hf:owner/name"
        )
    if path.is_dir():
        return _from_folder(path)
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        return _read_text(path).splitlines()
    if suffix in JSONL_SUFFIXES:
        return _from_jsonl(path, column)
    if suffix in CSV_SUFFIXES:
        return _from_csv(path, column)
    supported = ", ".join(TEXT_SUFFIXES + JSONL_SUFFIXES + CSV_SUFFIXES)
    raise UserError(f"prompt file {path} has an unknown type {suffix!r}: use one of {supported}, or a folder")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(
            f"cannot read prompt file {path} ({err.__class__.__name__}): it must be UTF-8 text"
        ) from err


def _from_folder(folder: Path) -> list[str]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".txt")
    if not files:
        raise UserError(f"prompt folder {folder} has no .txt files: put one prompt (or one a line) in each")
    return [line for f in files for line in _read_text(f).splitlines()]


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


def _from_jsonl(path: Path, column: str | None) -> list[str]:
    rows = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise UserError(
                f"prompt file {path}, line {number}, is not valid JSON: fix or remove it"
            ) from err
    if all(isinstance(r, str) for r in rows):
        return rows
    objects = [r for r in rows if isinstance(r, dict)]
    if len(objects) != len(rows):
        raise UserError(f"prompt file {path} mixes JSON objects with other values: use one object a line")
    columns = list(dict.fromkeys(k for r in objects for k in r))
    name = pick_column(columns, column, str(path))
    return [r.get(name) for r in objects]


def _from_csv(path: Path, column: str | None) -> list[str]:
    text = _read_text(path)
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    reader = csv.DictReader(text.splitlines(), delimiter=delimiter)
    try:
        rows = list(reader)
    except csv.Error as err:
        raise UserError(f"prompt file {path} is not valid CSV ({err}): fix it or use .txt / .jsonl") from err
    if reader.fieldnames is None:  # an empty file: load_prompts reports it as holding no prompts
        return []
    name = pick_column(reader.fieldnames or [], column, str(path))
    return [r.get(name) for r in rows]


def _from_hf(name: str, column: str | None, split: str, limit: int | None) -> list[str]:
    try:
        import datasets
    except ImportError as err:
        raise UserError(f"hf:{name} needs the `datasets` library: `pip install datasets`") from err
    try:
        dataset = datasets.load_dataset(name, split=split)
    except (OSError, ValueError, ConnectionError) as err:
        raise UserError(
            f"cannot load dataset hf:{name} split {split!r} ({err.__class__.__name__}): check the name and "
            "split, and that it is downloaded when offline"
        ) from err
    if limit is not None and limit < len(dataset):
        dataset = dataset.select(range(limit))
    return _clean(dataset[pick_column(dataset.column_names, column, f"hf:{name}")])


# ---------------------------------------------------------------------------------------------------------
# Tokenizing and encoding
# ---------------------------------------------------------------------------------------------------------


def truncate_report(tokenizer, prompts: Sequence[str]) -> int:
    """Count the prompts longer than the tokenizer's window (77 for CLIP) and warn once if any are."""
    if not prompts:
        return 0
    ids = tokenizer(list(prompts), truncation=False, verbose=False).input_ids
    count = sum(len(x) > tokenizer.model_max_length for x in ids)
    if count:
        warnings.warn(
            f"{count} of {len(prompts)} prompts are longer than {tokenizer.model_max_length} tokens "
            "and will be truncated",
            stacklevel=2,
        )
    return count


@torch.no_grad()
def encode_prompts(
    tokenizer, text_encoder, prompts: Sequence[str], *, device: str | torch.device, batch_size: int = 64
) -> Tensor:
    """The text encoder's last_hidden_state (B, 77, D) as Stable Diffusion conditions its UNet on it."""
    chunks = []
    for start in range(0, len(prompts), batch_size):
        ids = tokenizer(
            list(prompts[start : start + batch_size]),
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        chunks.append(text_encoder(ids.to(device))[0])
    return torch.cat(chunks)


class EmbeddingCache:
    """Encodes each distinct prompt once; keeps the embeddings on the CPU in the text encoder's dtype."""

    def __init__(self, tokenizer, text_encoder, *, batch_size: int = 64):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.batch_size = batch_size
        self.encoded = 0  # prompts sent through the text encoder (a cache hit adds nothing)
        self.encoder_calls = 0  # forward calls of the text encoder
        self._store: dict[str, Tensor] = {}

    @property
    def _device(self) -> torch.device:
        return next(self.text_encoder.parameters()).device

    def __len__(self) -> int:
        return len(self._store)

    def _encode_missing(self, prompts: Sequence[str]) -> None:
        missing = [p for p in dict.fromkeys(prompts) if p not in self._store]
        if not missing:
            return
        embeddings = encode_prompts(
            self.tokenizer, self.text_encoder, missing, device=self._device, batch_size=self.batch_size
        ).cpu()
        self.encoded += len(missing)
        self.encoder_calls += -(-len(missing) // self.batch_size)
        self._store.update(zip(missing, embeddings))

    def get(self, prompts: Sequence[str], device: str | torch.device | None = None) -> Tensor:
        """The embeddings (B, 77, D) of `prompts`, in order, on `device` (default: the encoder's)."""
        self._encode_missing(prompts)
        batch = torch.stack([self._store[p] for p in prompts])
        return batch.to(device if device is not None else self._device)

    def null_embedding(self, device: str | torch.device | None = None) -> Tensor:
        """The embedding (1, 77, D) of the empty prompt "", the unconditional branch of guidance."""
        return self.get([""], device)
