"""The COCO-2014 val caption lists: the published 30K list of the one-step papers (pinned by its sha256), and this
project's own seeded draw from the COCO annotations; prepared once, verified whenever used."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from emd_t2i.errors import UserError
from emd_t2i.files import write_atomic, write_text_atomic

# The published list: DMD2's main/coco_eval/captions_coco14_test.txt and SiD-LSG's prompts/captions.txt are the same
# file (GigaGAN's captions.txt), 30,000 lines; its sha256 pins it, so no caption text lives in this repository.
COCO_30K = "coco2014-val-30k"
PUBLISHED_SHA256 = "edabd2a556026cbf5d36a5fffa35ad43d7ba71b72f6d640b727c1edefb7f1945"
PUBLISHED_FILES = ("DMD2's main/coco_eval/captions_coco14_test.txt (github.com/tianweiy/DMD2) or SiD-LSG's "
                   "prompts/captions.txt (github.com/mingyuanzhou/SiD-LSG), the same file")
PUBLISHED_READING = ("each line stripped of surrounding whitespace, empty lines skipped, as DMD2 (main/utils.py "
                     "SDTextDataset) and SiD-LSG (generate_onestep.py read_file_to_sentences) read it")
EMD_30K = "coco2014-val-30k-emd"  # this project's seed-0 draw from captions_val2014.json (not the published list)
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
    """The name of a draw from the annotations: coco2014-val-30k-emd for the default one, coco2014-val-<n>-seed<seed>
    for any other (coco2014-val-30k is the published list, not a draw)."""
    return EMD_30K if (n, seed) == (DEFAULT_CAPTIONS, DEFAULT_CAPTION_SEED) else f"coco2014-val-{n}-seed{seed}"


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


def prepare_captions(source: str, output: str | Path | None = None, *, n: int | None = None,
                     seed: int | None = None, split: str = "validation", caption_column: str | None = None,
                     image_column: str | None = None) -> Path:
    """Prepare a caption list and return its path; by default into the cache under its name, where `--prompts NAME`
    finds it. A .txt source must be the published list (checked by its sha256), written as `coco2014-val-30k`;
    annotations (captions_val2014.json or hf:owner/name) give this project's seeded draw (JSON, with the source, its
    sha256, seed and selection rule)."""
    if Path(source).suffix.lower() == ".txt":
        if n is not None or seed is not None:
            raise UserError("--n and --seed select captions from captions_val2014.json; the published list is used "
                            "whole (evaluate its first N captions with `emd-t2i eval --n N`)")
        return prepare_published(source, output)
    n = DEFAULT_CAPTIONS if n is None else n
    seed = DEFAULT_CAPTION_SEED if seed is None else seed
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
# The published list: kept as the user's file, byte for byte, and verified by its sha256 on every read
# ---------------------------------------------------------------------------------------------------------


def published_path() -> Path:
    return captions_dir() / f"{COCO_30K}.txt"


def _published_bytes(path: Path, flag: str) -> bytes:
    """The file's bytes if they are the published list; otherwise a UserError saying where to get it."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise UserError(f"{flag} {path} cannot be read ({err.__class__.__name__}): pass {PUBLISHED_FILES}") from None
    digest = hashlib.sha256(raw).hexdigest()
    if digest != PUBLISHED_SHA256:
        raise UserError(f"{flag} {path} is not the published COCO-2014 30K caption list (sha256 {digest[:12]}..., "
                        f"expected {PUBLISHED_SHA256[:12]}...): pass {PUBLISHED_FILES}, unchanged")
    return raw


def published_captions(raw: bytes) -> list[str]:
    """The captions of the published file as the reference code reads it (PUBLISHED_READING)."""
    return [line.strip() for line in io.StringIO(raw.decode("utf-8"), newline=None) if line.strip()]


def prepare_published(source: str | Path, output: str | Path | None = None) -> Path:
    """Check that `source` is the published list and keep a copy (the cache's coco2014-val-30k.txt by default)."""
    raw = _published_bytes(Path(source).expanduser(), "caption file")
    path = Path(output).expanduser() if output else published_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, raw)
    return path


def _published_list(path: Path, flag: str) -> CaptionList:
    raw = _published_bytes(path, flag)
    captions = published_captions(raw)
    return CaptionList(captions, {"name": COCO_30K, "source": f"the published list: {PUBLISHED_FILES}",
                                  "file": str(path), "file_sha256": PUBLISHED_SHA256, "verified": True,
                                  "reading": PUBLISHED_READING, "n": len(captions),
                                  "captions_sha256": sha256_of(captions)})


# ---------------------------------------------------------------------------------------------------------
# Loading a list for evaluation
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaptionList:
    captions: list[str]
    info: dict  # where the list came from: name, source, seed, n, sha256 ... (goes into metrics.json)


def load_caption_list(spec: str) -> CaptionList:
    """`coco2014-val-30k` (the published list, verified by its sha256), another prepared name, a list .json written
    by `emd-t2i coco captions`, a pickled list as DMD2 ships them (.pkl), or any prompt source `--prompts` takes
    elsewhere (.txt one a line, .jsonl, .csv, hf:owner/name); a .txt that is the published list is read as the
    reference code reads it."""
    path = Path(spec).expanduser()
    if spec == COCO_30K and not path.exists():
        if not published_path().is_file():
            raise UserError(_not_prepared())
        return _published_list(published_path(), "the prepared caption list")
    if path.suffix.lower() == ".txt" and path.is_file() and _file_sha256(path) == PUBLISHED_SHA256:
        return _published_list(path, "--prompts")
    if path.suffix.lower() == ".pkl" and path.is_file():
        captions = read_pickled_captions(path)
        return CaptionList(captions, {"source": spec, "file_sha256": _file_sha256(path), "n": len(captions),
                                      "captions_sha256": sha256_of(captions)})
    named = captions_dir() / f"{spec}.json"
    if path.suffix == ".json" and path.is_file():
        return _read_list(path)
    if not path.exists() and named.is_file():
        return _read_list(named)
    if spec.startswith("coco2014-val"):
        raise UserError(f"the caption list {spec} is not prepared (looked for {named}): run `emd-t2i coco captions "
                        "captions_val2014.json` (from annotations_trainval2014.zip at cocodataset.org) once")
    from emd_t2i.data.prompts import load_prompts

    captions = load_prompts(spec)
    return CaptionList(captions, {"source": spec, "n": len(captions), "captions_sha256": sha256_of(captions)})


class _ListsAndStrings(pickle.Unpickler):
    """Unpickles lists of strings and refuses everything that would import or call code from the file."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"it refers to {module}.{name}")


def read_pickled_captions(path: Path) -> list[str]:
    """A pickled list of captions, as DMD2 ships its lists (coco10k/all_prompts.pkl, captions_coco14_test.pkl) and
    reads them (main/utils.py SDTextDataset: pickle.load, None as ""); nothing in the file is run."""
    hint = "pass a pickled list of caption strings (DMD2's coco10k/all_prompts.pkl) or a .txt file, one a line"
    try:
        with open(path, "rb") as f:
            data = _ListsAndStrings(f).load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as err:
        raise UserError(f"--prompts {path} is not a plain pickled list of captions ({err}): {hint}") from None
    if not isinstance(data, list) or not all(c is None or isinstance(c, str) for c in data):
        raise UserError(f"--prompts {path} holds a {type(data).__name__}, not a list of strings: {hint}")
    return ["" if c is None else c for c in data]


def _not_prepared() -> str:
    old = captions_dir() / f"{COCO_30K}.json"
    hint = (f" ({old} there is this project's own seed-0 draw from an earlier version, now called {EMD_30K}: rename "
            f"it to {EMD_30K}.json to keep using it)") if old.is_file() else ""
    return (f"the caption list {COCO_30K} (the published list) is not prepared (looked for {published_path()}): run "
            f"`emd-t2i coco captions captions_coco14_test.txt` once with {PUBLISHED_FILES}{hint}")


def _read_list(path: Path) -> CaptionList:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        captions = [_clean(c["caption"]) for c in document["captions"]]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise UserError(f"{path} is not a caption list written by `emd-t2i coco captions` "
                        f"({err.__class__.__name__}): write it again") from err
    info = {k: v for k, v in document.items() if k != "captions"}
    return CaptionList(captions, {**info, "file": str(path), "captions_sha256": sha256_of(captions)})
