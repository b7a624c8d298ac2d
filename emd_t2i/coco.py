"""The COCO-2014 val caption list of the published one-step protocol: prepared once, with its seed recorded."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError
from .files import write_text_atomic

COCO_30K = "coco2014-val-30k"  # the name `--prompts` knows once `emd-t2i coco captions` has written it
DEFAULT_CAPTIONS = 30_000
DEFAULT_CAPTION_SEED = 0
SELECTION = (
    "the source's images sorted by id, permuted by numpy.random.default_rng(seed), the first n kept; for each, "
    "one of its captions (sorted by annotation id) drawn by numpy.random.default_rng([seed, 1]); whitespace "
    "collapsed. A shorter list with the same seed is a prefix of a longer one."
)
IMAGE_ID_COLUMNS = ("image_id", "cocoid", "imgid", "id")
CAPTION_COLUMNS = ("caption", "captions", "sentences", "text")


def cache_dir() -> Path:
    """Where caption lists, FID reference statistics and downloaded Inception weights are kept:
    $EMD_T2I_CACHE, else $XDG_CACHE_HOME/emd_t2i, else ~/.cache/emd_t2i."""
    if os.environ.get("EMD_T2I_CACHE"):
        return Path(os.environ["EMD_T2I_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "emd_t2i"


def captions_dir() -> Path:
    return cache_dir() / "captions"


def list_name(n: int, seed: int) -> str:
    """coco2014-val-30k for the protocol's list; coco2014-val-<n>-seed<seed> for any other."""
    return COCO_30K if (n, seed) == (DEFAULT_CAPTIONS, DEFAULT_CAPTION_SEED) else f"coco2014-val-{n}-seed{seed}"


@dataclass(frozen=True)
class Caption:
    caption: str
    image_id: int
    annotation_id: int | None = None
    file_name: str | None = None


def _clean(text: str) -> str:
    return " ".join(str(text).split())


# ---------------------------------------------------------------------------------------------------------
# Reading the sources
# ---------------------------------------------------------------------------------------------------------


def read_annotations(path: str | Path) -> list[Caption]:
    """Every caption of the official `captions_val2014.json` (from annotations_trainval2014.zip)."""
    path = Path(path).expanduser()
    hint = "pass captions_val2014.json from cocodataset.org's annotations_trainval2014.zip"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"annotation file {path} does not exist: {hint}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"annotation file {path} is not readable JSON ({err.__class__.__name__}): {hint}") from err
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise UserError(f"annotation file {path} has no 'annotations' list: {hint}")
    files = {im.get("id"): im.get("file_name") for im in data.get("images", []) if isinstance(im, dict)}
    try:
        return [Caption(_clean(a["caption"]), int(a["image_id"]), int(a["id"]), files.get(a["image_id"]))
                for a in data["annotations"]]
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"annotation file {path}: an annotation lacks image_id, id or caption ({err}): {hint}") \
            from err


def read_hf_dataset(name: str, split: str = "validation", caption_column: str | None = None,
                    image_column: str | None = None) -> list[Caption]:
    """Captions from a Hugging Face dataset of COCO-2014 val: one row per caption or per image (a list)."""
    try:
        import datasets
    except ImportError as err:
        raise UserError(f"hf:{name} needs the `datasets` library: `pip install datasets`") from err
    try:
        rows = datasets.load_dataset(name, split=split)
    except (OSError, ValueError, ConnectionError) as err:
        raise UserError(f"cannot load dataset hf:{name} split {split!r} ({err.__class__.__name__}): check the name "
                        "and --split, and that it is downloaded when offline") from err
    columns = list(rows.column_names)
    image_key = _column(columns, image_column, IMAGE_ID_COLUMNS, "--image-column", name)
    caption_key = _column(columns, caption_column, CAPTION_COLUMNS, "--caption-column", name)
    captions = []
    for row in rows:
        texts = row[caption_key]
        for text in texts if isinstance(texts, list) else [texts]:
            text = text.get("raw", "") if isinstance(text, dict) else text  # karpathy-style {"raw": ...}
            captions.append(Caption(_clean(text), int(row[image_key])))
    return captions


def _column(columns: list[str], wanted: str | None, defaults: tuple[str, ...], flag: str, name: str) -> str:
    for candidate in [wanted] if wanted else defaults:
        if candidate in columns:
            return candidate
    raise UserError(f"hf:{name} has no column {wanted or ' / '.join(defaults)} (found: {', '.join(columns)}): "
                    f"choose one with {flag}")


# ---------------------------------------------------------------------------------------------------------
# Selecting the fixed list
# ---------------------------------------------------------------------------------------------------------


def select_captions(captions: Iterable[Caption], n: int = DEFAULT_CAPTIONS,
                    seed: int = DEFAULT_CAPTION_SEED) -> list[Caption]:
    """n distinct images, one caption each (see SELECTION): the list is a function of the source and seed."""
    by_image: dict[int, list[Caption]] = {}
    for c in captions:
        if c.caption:
            by_image.setdefault(c.image_id, []).append(c)
    if n < 1 or n > len(by_image):
        raise UserError(f"--n must be between 1 and the {len(by_image)} captioned images of the source (got {n})")
    ids = sorted(by_image)
    order = np.random.default_rng(seed).permutation(len(ids))[:n]
    pick = np.random.default_rng([seed, 1])
    chosen = []
    for k in order:
        options = sorted(by_image[ids[k]], key=lambda c: (c.annotation_id is None, c.annotation_id or 0, c.caption))
        chosen.append(options[int(pick.integers(len(options)))])
    return chosen


def sha256_of(captions: list[str]) -> str:
    """The fingerprint of a caption list (in order), recorded with every evaluation."""
    return hashlib.sha256("\n".join(captions).encode("utf-8")).hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def prepare_captions(source: str, output: str | Path | None = None, *, n: int = DEFAULT_CAPTIONS,
                     seed: int = DEFAULT_CAPTION_SEED, split: str = "validation", caption_column: str | None = None,
                     image_column: str | None = None) -> Path:
    """Write the fixed caption list (JSON, with the source, its sha256, seed and selection rule) and return
    its path; by default into the cache under its name, so `--prompts coco2014-val-30k` finds it."""
    if source.startswith("hf:"):
        rows, fingerprint = read_hf_dataset(source[3:], split, caption_column, image_column), None
        source_text = f"{source} (split {split})"
    else:
        rows, fingerprint = read_annotations(source), _file_sha256(Path(source).expanduser())
        source_text = Path(source).name
    chosen = select_captions(rows, n, seed)
    name = list_name(n, seed)
    path = Path(output).expanduser() if output else captions_dir() / f"{name}.json"
    document = {
        "name": name, "source": source_text, "source_sha256": fingerprint, "seed": seed, "n": n,
        "images_in_source": len({c.image_id for c in rows}), "captions_in_source": len(rows),
        "selection": SELECTION, "captions_sha256": sha256_of([c.caption for c in chosen]),
        "captions": [{k: v for k, v in vars(c).items() if v is not None} for c in chosen],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(document, indent=1) + "\n")
    return path


# ---------------------------------------------------------------------------------------------------------
# Loading a list for evaluation
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaptionList:
    captions: list[str]
    info: dict  # where the list came from: name, source, seed, n, sha256 ... (goes into metrics.json)


def load_caption_list(spec: str) -> CaptionList:
    """`coco2014-val-30k` (or another prepared name), a list .json written by `emd-t2i coco captions`, or any
    prompt source `--prompts` takes elsewhere (.txt one a line, .jsonl, .csv, hf:owner/name)."""
    path = Path(spec).expanduser()
    named = captions_dir() / f"{spec}.json"
    if path.suffix == ".json" and path.is_file():
        return _read_list(path)
    if not path.exists() and named.is_file():
        return _read_list(named)
    if spec.startswith("coco2014-val"):
        raise UserError(f"the caption list {spec} is not prepared (looked for {named}): run `emd-t2i coco captions "
                        "captions_val2014.json` (from annotations_trainval2014.zip at cocodataset.org) once")
    from .prompts import load_prompts

    captions = load_prompts(spec)
    return CaptionList(captions, {"source": spec, "n": len(captions), "captions_sha256": sha256_of(captions)})


def _read_list(path: Path) -> CaptionList:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        captions = [_clean(c["caption"]) for c in document["captions"]]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise UserError(f"{path} is not a caption list written by `emd-t2i coco captions` "
                        f"({err.__class__.__name__}): write it again") from err
    info = {k: v for k, v in document.items() if k != "captions"}
    return CaptionList(captions, {**info, "file": str(path), "captions_sha256": sha256_of(captions)})
