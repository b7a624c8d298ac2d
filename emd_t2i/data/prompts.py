"""Prompt sources read lazily by index (files, shards, tars, Hugging Face datasets), the truncation report and
the validation prompts."""

from __future__ import annotations

import glob
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from emd_t2i.data.readers import (
    ARROW_SUFFIXES,
    KINDS,
    PromptSource,
    clean,
    index_files,
    pick_column,
)
from emd_t2i.errors import UserError

# Prompt lists that ship with the tool: `prompts/NAME.txt` in a checkout, installed to share/emd-t2i/prompts.
BUNDLED_DIRS = (Path(__file__).resolve().parents[2] / "prompts", Path(sys.prefix) / "share" / "emd-t2i" / "prompts")
GENERAL_PROMPTS = BUNDLED_DIRS[0] / "general.txt"


def bundled_prompt_file(name: str) -> Path | None:
    """The shipped list called `name` (e.g. `general`), wherever this install keeps it."""
    for folder in BUNDLED_DIRS:
        if (folder / f"{name}.txt").is_file():
            return folder / f"{name}.txt"
    return None


# ---------------------------------------------------------------------------------------------------------
# Opening a source
# ---------------------------------------------------------------------------------------------------------


def open_prompts(
    source: str, *, column: str | None = None, split: str = "train", limit: int | None = None, cache: bool = True
) -> Sequence[str]:
    """A random-access, read-only sequence of the prompts of a source; whitespace collapsed, empty ones skipped.

    Nothing but a compact index (8 bytes a prompt for files) is held in memory; prompt i is read when asked for.
    source: a bundled list by name (`general`); `file.txt` (one prompt a line); `file.jsonl` / `.csv` / `.tsv`
    (the `column`, by default the first of prompt/text/caption present); `shards.tar` (webdataset: members
    KEY.txt, or KEY.<column>); a folder (its *.txt files, sorted by name, else its *.jsonl shards, else its *.tar
    shards; a folder written by `datasets`' save_to_disk is read as that dataset); a glob (`data/*.jsonl`, files of
    one type); a `datasets` .arrow file; or `hf:owner/name` (a Hugging Face dataset's `split`; needs `pip install
    datasets`). `limit` keeps the first N. `cache` keeps the offset index of a large file (>= 8 MiB) in
    `prompt_files.index_cache_dir()`, keyed by the file's path, size and modification time.
    """
    if limit is not None and limit < 1:
        raise UserError(f"the prompt limit must be >= 1 (got {limit})")
    if not Path(source).exists() and (bundled := bundled_prompt_file(source)) is not None:
        source = str(bundled)
    if source.startswith("hf:"):
        prompts = _from_hf(source[3:], column, split, limit)
    else:
        prompts = _from_path(source, column, split, limit, cache)
    if not len(prompts):
        raise UserError(f"prompt source {source} holds no prompts: give --prompts a non-empty source")
    return prompts if limit is None or limit >= len(prompts) else _Head(prompts, limit)


def load_prompts(
    source: str, *, column: str | None = None, split: str = "train", limit: int | None = None
) -> list[str]:
    """All the prompts of a source as a list (for short lists: `sample`, `eval`); see `open_prompts`."""
    return list(open_prompts(source, column=column, split=split, limit=limit))


def _from_path(source: str, column: str | None, split: str, limit: int | None, cache: bool) -> Sequence[str]:
    path = Path(source).expanduser()
    if not path.exists() and glob.has_magic(source):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise UserError(f"prompt glob {source} matches no files: check the pattern given to --prompts")
        kinds = {KINDS.get(f.suffix.lower()) for f in files}
        if len(kinds) != 1 or None in kinds:
            found = ", ".join(sorted({f.suffix or "(none)" for f in files}))
            raise UserError(f"prompt glob {source} matches files of types {found}: match one of "
                            f"{', '.join(KINDS)}")
        return index_files(source, kinds.pop(), files, column, cache)
    if not path.exists():
        raise UserError(f"prompt source {path} does not exist: give --prompts a file, folder or hf:owner/name")
    if path.is_dir():
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            return _from_saved_dataset(path, column, split, limit)
        return _from_folder(path, column, cache)
    suffix = path.suffix.lower()
    if suffix in KINDS:
        return index_files(source, KINDS[suffix], [path], column, cache)
    if suffix in ARROW_SUFFIXES:
        datasets = _import_datasets(str(path))
        return _dataset_prompts(datasets.Dataset.from_file(str(path)), column, str(path), limit)
    supported = ", ".join((*KINDS, *ARROW_SUFFIXES))
    raise UserError(f"prompt file {path} has an unknown type {suffix!r}: use one of {supported}, or a folder")


def _from_folder(folder: Path, column: str | None, cache: bool) -> Sequence[str]:
    files = sorted(p for p in folder.iterdir() if p.is_file())
    for kind in ("txt", "jsonl", "tar"):  # captions beside images come first, as they always did
        chosen = [p for p in files if KINDS.get(p.suffix.lower()) == kind]
        if chosen:
            return index_files(str(folder), kind, chosen, column, cache)
    raise UserError(f"prompt folder {folder} has no .txt files (nor .jsonl or .tar shards): put one prompt "
                    "(or one a line) in each")


# ---------------------------------------------------------------------------------------------------------
# The sequences
# ---------------------------------------------------------------------------------------------------------


class DatasetPrompts(PromptSource):
    """One column of a `datasets` table (memory-mapped arrow); rows whose prompt is empty are skipped."""

    def __init__(self, name: str, column: Sequence):
        self.name, self.column = name, column
        keep = np.ones(len(column), dtype=bool)
        for start in range(0, len(column), 8192):
            for j, value in enumerate(column[start : start + 8192]):
                keep[start + j] = bool(clean(value))
        self.rows = None if keep.all() else np.flatnonzero(keep)  # None: every row is a prompt

    def __len__(self) -> int:
        return len(self.column) if self.rows is None else len(self.rows)

    def _get(self, i: int) -> str:
        return clean(self.column[i if self.rows is None else int(self.rows[i])])


class _Head(PromptSource):
    """The first `n` prompts of a source (`--limit`)."""

    def __init__(self, source: Sequence[str], n: int):
        self.source, self.n, self.name = source, n, getattr(source, "name", "prompts")

    def __len__(self) -> int:
        return self.n

    def _get(self, i: int) -> str:
        return self.source[i]


# ---------------------------------------------------------------------------------------------------------
# Hugging Face datasets (memory-mapped arrow tables, random access by row)
# ---------------------------------------------------------------------------------------------------------


def _import_datasets(what: str):
    try:
        import datasets
    except ImportError as err:
        raise UserError(f"{what} needs the `datasets` library: `pip install datasets`") from err
    return datasets


def _from_hf(name: str, column: str | None, split: str, limit: int | None) -> Sequence[str]:
    datasets = _import_datasets(f"hf:{name}")
    try:
        dataset = datasets.load_dataset(name, split=split)
    except (OSError, ValueError, ConnectionError) as err:
        raise UserError(
            f"cannot load dataset hf:{name} split {split!r} ({err.__class__.__name__}): check the name and "
            "split, and that it is downloaded when offline"
        ) from err
    return _dataset_prompts(dataset, column, f"hf:{name}", limit)


def _from_saved_dataset(folder: Path, column: str | None, split: str, limit: int | None) -> Sequence[str]:
    datasets = _import_datasets(f"dataset folder {folder}")
    try:
        dataset = datasets.load_from_disk(str(folder))
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load dataset folder {folder} ({err.__class__.__name__}): re-save it with "
                        "Dataset.save_to_disk") from err
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise UserError(f"dataset folder {folder} has no split {split!r} (found: {', '.join(dataset)}): "
                            "choose one with --split")
        dataset = dataset[split]
    return _dataset_prompts(dataset, column, str(folder), limit)


def _dataset_prompts(dataset, column: str | None, name: str, limit: int | None) -> DatasetPrompts:
    if limit is not None and limit < len(dataset):
        dataset = dataset.select(range(limit))
    return DatasetPrompts(name, dataset[pick_column(dataset.column_names, column, name)])


# ---------------------------------------------------------------------------------------------------------
# What the run reads of a source besides its batches
# ---------------------------------------------------------------------------------------------------------


def truncate_report(tokenizer, prompts: Sequence[str], *, sample: int = 10_000) -> int:
    """Count the prompts longer than the tokenizer's window (77 for CLIP) and warn once if any are.

    A source larger than `sample` is judged by `sample` prompts evenly spaced through it; the count is theirs.
    """
    if not len(prompts):
        return 0
    checked = [prompts[i] for i in spread_indices(len(prompts), sample)]
    count = 0
    for start in range(0, len(checked), 1024):
        ids = tokenizer(checked[start : start + 1024], truncation=False, verbose=False).input_ids
        count += sum(len(x) > tokenizer.model_max_length for x in ids)
    if count:
        of = f"{len(checked)}" if len(checked) == len(prompts) else f"{len(checked)} sampled (of {len(prompts)})"
        warnings.warn(f"{count} of {of} prompts are longer than {tokenizer.model_max_length} tokens and will be "
                      "truncated", stacklevel=2)
    return count


def spread_indices(size: int, n: int) -> list[int]:
    """n positions evenly spaced through range(size) (all of them when size <= n)."""
    return [i * size // n for i in range(n)] if size > n else list(range(size))


def distinct_spread(prompts: Sequence[str], n: int, *, probes: int = 64) -> list[str]:
    """Up to n distinct prompts evenly spaced through a source (the validation prompts), reading about n of them.

    Equals `spread(list(dict.fromkeys(prompts)), n)` when the prompts are distinct. A repeated prompt is passed
    over for the next new one in its stretch of the source (at most `probes` reads), so a source with few
    distinct prompts may give fewer than n.
    """
    size = len(prompts)
    if size <= n:
        return list(dict.fromkeys(prompts))
    chosen: dict[str, None] = {}
    for k in range(n):
        for i in range(k * size // n, min((k + 1) * size // n, k * size // n + probes)):
            if (prompt := prompts[i]) not in chosen:
                chosen[prompt] = None
                break
    return list(chosen)
