"""FID in the published COCO protocols: the crop-and-Lanczos transform (256 px, or 512 px for DMD2's SDXL rows) or
DMD2's centre 299 px patch, clean-fid's Inception, cached reference statistics."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from emd_t2i.errors import UserError
from emd_t2i.evaluation.captions import cache_dir

EVAL_RESOLUTION = 256
PATCH = 299  # DMD2's patch FID: Inception's own input size, cut from the full-resolution image
INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/" + INCEPTION_FILE
INCEPTION = f"clean-fid 'clean' mode: Inception-v3 {INCEPTION_FILE} pool3 (2048-d) after PIL bicubic resize to 299"
CLEANFID_DIR = Path("/tmp")  # where clean-fid itself downloads the Inception weights (cleanfid/features.py)


# ---------------------------------------------------------------------------------------------------------
# The image transform, the same for generated and reference images
# ---------------------------------------------------------------------------------------------------------


def center_crop_resize(image: Image.Image, size: int = EVAL_RESOLUTION) -> Image.Image:
    """The centre square of side min(w, h), then PIL Lanczos to size x size.

    The crop offsets round as torchvision's `center_crop` does (`int(round((w - s) / 2.0))`), which the DMD2 and
    GigaGAN evaluation code call through `CenterCropLongEdge`.
    """
    w, h = image.size
    side = min(w, h)
    left, top = round((w - side) / 2), round((h - side) / 2)  # Python's round: half to even, as torchvision
    return image.crop((left, top, left + side, top + side)).resize((size, size), Image.LANCZOS)


def center_patch(image: Image.Image, size: int = PATCH) -> Image.Image:
    """The centre size x size patch at the image's own resolution, as DMD2's patch FID cuts it (torchvision's
    `center_crop`; an image smaller than the patch on a side is left as it is)."""
    w, h = image.size
    if w < size or h < size:
        return image
    left, top = round((w - size) / 2), round((h - size) / 2)
    return image.crop((left, top, left + size, top + size))


@dataclass(frozen=True)
class Transform:
    """What every image, generated or real, goes through before clean-fid's own resize to 299; `name` is recorded
    with statistics, and statistics made under another transform are refused. Picklable (no lambdas): clean-fid's
    loader workers receive it."""

    name: str
    image: Callable[[Image.Image], Image.Image]

    def __call__(self, array: np.ndarray) -> np.ndarray:
        """On a uint8 HxWx3 array: clean-fid's `custom_image_tranform` hook."""
        return np.asarray(self.image(Image.fromarray(array)))


def crop_resize(size: int = EVAL_RESOLUTION) -> Transform:
    return Transform(f"center crop to the short side, PIL Lanczos resize to {size}x{size}",
                     functools.partial(center_crop_resize, size=size))


def patch(size: int = PATCH) -> Transform:
    return Transform(f"center {size}x{size} patch at full resolution (DMD2's patch FID)",
                     functools.partial(center_patch, size=size))


TRANSFORM = crop_resize().name  # the default protocol's


def transform_array(array: np.ndarray) -> np.ndarray:
    """`center_crop_resize` on a uint8 HxWx3 array: clean-fid's `custom_image_tranform` hook."""
    return crop_resize()(array)


# ---------------------------------------------------------------------------------------------------------
# The feature extractor: clean-fid's Inception (a thin adapter), or a stand-in with the same interface
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Extractor:
    """(B, 3, 299, 299) float images in [0, 255] -> (B, D) features; `name` is recorded with the statistics, and
    statistics made by another extractor are refused."""

    name: str
    model: Callable[[Tensor], Tensor]


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def inception_weights(weights: str | Path | None = None) -> Path:
    """The local Inception file: `weights` if given, else the emd-t2i cache or clean-fid's own download folder;
    downloaded into the cache when missing unless offline (HF_HUB_OFFLINE=1)."""
    if weights is not None:
        path = Path(weights).expanduser()
        path = path / INCEPTION_FILE if path.is_dir() else path
        if not path.is_file() or path.name != INCEPTION_FILE:
            raise UserError(f"--inception-weights {weights}: give the file {INCEPTION_FILE} (by that name) or the "
                            f"folder holding it; download it from {INCEPTION_URL}")
        return path
    candidates = [cache_dir() / INCEPTION_FILE, CLEANFID_DIR / INCEPTION_FILE]
    for path in candidates:
        if path.is_file():
            return path
    if not _offline():
        try:
            return _download_inception(candidates[0])
        except OSError as err:  # urllib's URLError is an OSError
            reason = f"the download failed ({err.__class__.__name__})"
    else:
        reason = "offline (HF_HUB_OFFLINE=1)"
    raise UserError(f"FID needs the Inception weights {INCEPTION_FILE}, not found in {' or '.join(map(str, candidates))}"
                    f" and {reason}: download {INCEPTION_URL} on a connected machine and put it in "
                    f"{candidates[0].parent} or pass --inception-weights PATH")


def _download_inception(path: Path) -> Path:
    """clean-fid's own downloader, into a temporary folder first so an interrupted download leaves nothing."""
    from cleanfid.downloads_helper import check_download_inception

    tmp = path.parent / f".download-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        Path(check_download_inception(str(tmp))).replace(path)
    finally:
        for leftover in tmp.glob("*"):
            leftover.unlink()
        tmp.rmdir()
    return path


def load_inception(device: str | torch.device, weights: str | Path | None = None) -> Extractor:
    """clean-fid's Inception in its "clean" mode (`build_feature_extractor("clean")`), from a local file."""
    from cleanfid.inception_torchscript import InceptionV3W

    path = inception_weights(weights)
    try:
        network = InceptionV3W(str(path.parent), download=False, resize_inside=False).to(device).eval()
    except (RuntimeError, OSError, ValueError) as err:  # torch.jit.load of a damaged or other file
        raise UserError(f"{path} does not load as clean-fid's Inception ({type(err).__name__}): download {INCEPTION_URL}"
                        " again and pass it with --inception-weights") from err
    return Extractor(INCEPTION, network)


# ---------------------------------------------------------------------------------------------------------
# Features and statistics (clean-fid's own loaders and Frechet distance)
# ---------------------------------------------------------------------------------------------------------


@dataclass
class FidStats:
    mu: np.ndarray
    sigma: np.ndarray
    info: dict  # count, extractor, transform, source: saved with the numbers

    def save(self, path: Path) -> None:
        """Atomic: a crash leaves the old file or the new one."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp.npz")  # np.savez appends .npz to names without it
        np.savez(tmp, mu=self.mu, sigma=self.sigma, info=json.dumps(self.info))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> FidStats:
        try:
            with np.load(path) as data:
                return cls(data["mu"], data["sigma"], json.loads(str(data["info"])))
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as err:
            raise UserError(f"--reference {path} is not a statistics file written by emd-t2i "
                            f"({err.__class__.__name__}): make one with `emd-t2i coco reference VAL2014_DIR`") from err


def stats_of(features: np.ndarray, info: dict) -> FidStats:
    """Mean and covariance of the features, as clean-fid computes them."""
    return FidStats(np.mean(features, axis=0), np.cov(features, rowvar=False), {**info, "count": len(features)})


def file_features(files: Sequence[Path], extractor: Extractor, device, batch_size: int = 32,
                  num_workers: int = 0, description: str = "FID features",
                  transform: Transform | None = None) -> np.ndarray:
    """Features of these image files after the protocol's transform (clean-fid's `get_files_features`)."""
    from cleanfid.fid import get_files_features

    return get_files_features([str(f) for f in files], extractor.model, num_workers=num_workers,
                              batch_size=batch_size, device=torch.device(device), mode="clean",
                              custom_image_tranform=transform or crop_resize(), description=description)


def frechet_distance(a: FidStats, b: FidStats) -> float:
    from cleanfid.fid import frechet_distance as cleanfid_frechet_distance

    return float(cleanfid_frechet_distance(a.mu, a.sigma, b.mu, b.sigma))


# ---------------------------------------------------------------------------------------------------------
# Reference statistics: from a folder (computed once, cached) or a saved .npz
# ---------------------------------------------------------------------------------------------------------


def _image_files(folder: Path) -> list[Path]:
    from cleanfid.utils import EXTENSIONS

    return sorted(p for p in folder.rglob("*") if p.suffix[1:] in EXTENSIONS and p.is_file())


def _fingerprint(source: Path) -> str:
    """Names and sizes of the source's images: a changed folder gets new statistics."""
    digest = hashlib.sha256(str(source.resolve()).encode())
    files = _image_files(source) if source.is_dir() else [source]
    for f in files:
        digest.update(f"{f.relative_to(source) if source.is_dir() else f.name}:{f.stat().st_size}\n".encode())
    return digest.hexdigest()[:16]


def stats_cache_path(source: Path, extractor: Extractor, transform: Transform | None = None) -> Path:
    name = (transform or crop_resize()).name
    key = hashlib.sha256(f"{_fingerprint(source)}|{extractor.name}|{name}".encode()).hexdigest()[:16]
    return cache_dir() / "fid-stats" / f"{source.name}-{key}.npz"


REFERENCE_HINT = ("pass the COCO val2014 image folder (or its zip), or a statistics .npz made by `emd-t2i coco "
                  "reference`")


def reference_images(source: str | Path, flag: str = "--reference") -> int:
    """How many images a folder or zip of real images holds: one that is missing, empty or no such thing ends in
    one line here, before any network is loaded."""
    source = Path(source).expanduser()
    if not source.exists():
        raise UserError(f"{flag} {source} does not exist: {REFERENCE_HINT}")
    if source.is_dir():
        count = len(_image_files(source))
    elif zipfile.is_zipfile(source):
        from cleanfid.utils import EXTENSIONS

        with zipfile.ZipFile(source) as archive:
            count = sum(Path(name).suffix.lower()[1:] in EXTENSIONS for name in archive.namelist())
    else:
        raise UserError(f"{flag} {source} is a file but not a zip of images nor a .npz: {REFERENCE_HINT}")
    if count < 2:
        raise UserError(f"{flag} {source} holds {count} images: {REFERENCE_HINT}")
    return count


def check_reference_source(reference: str | Path, extractor: Extractor | None = None) -> None:
    """What `reference_stats` will read, checked before any image is generated: a .npz that loads (and was made by
    `extractor`, when given), or a folder or zip of images."""
    path = Path(reference).expanduser()
    if path.suffix != ".npz":
        reference_images(path)
        return
    if not path.is_file():
        raise UserError(f"--reference {path} does not exist: make it with `emd-t2i coco reference VAL2014_DIR "
                        f"--output {path}` or pass the image folder")
    stats = FidStats.load(path)
    if extractor is not None:
        check_reference(stats, path, extractor)


def compute_reference(source: str | Path, extractor: Extractor, device, *, output: Path | None = None,
                      batch_size: int = 32, num_workers: int = 0,
                      transform: Transform | None = None) -> tuple[FidStats, Path]:
    """Statistics of every image in a folder (or zip) of real images under the protocol's transform, saved to
    `output` (default: the cache, where `--reference FOLDER` finds them next time)."""
    from cleanfid.fid import get_folder_features

    source = Path(source).expanduser()
    reference_images(source)
    transform = transform or crop_resize()
    path = output or stats_cache_path(source, extractor, transform)
    features = get_folder_features(str(source), extractor.model, num_workers=num_workers, batch_size=batch_size,
                                   device=torch.device(device), mode="clean", custom_image_tranform=transform,
                                   description=f"reference {source.name}")
    if len(features) < 2:
        raise UserError(f"--reference {source} holds {len(features)} images: pass the folder of COCO val2014 images")
    stats = stats_of(features, {"source": str(source), "extractor": extractor.name, "transform": transform.name})
    stats.save(path)
    return stats, path


def reference_stats(reference: str | Path, extractor: Extractor, device, *, batch_size: int = 32,
                    num_workers: int = 0, transform: Transform | None = None) -> tuple[FidStats, Path]:
    """The reference statistics and the file they are in: a given .npz, the cached statistics of a folder,
    or, the first time a folder is used, computed and cached."""
    path, transform = Path(reference).expanduser(), transform or crop_resize()
    if path.suffix == ".npz":
        if not path.is_file():
            raise UserError(f"--reference {path} does not exist: make it with `emd-t2i coco reference VAL2014_DIR "
                            f"--output {path}` or pass the image folder")
        return check_reference(FidStats.load(path), path, extractor, transform), path
    if path.exists() and (cached := stats_cache_path(path, extractor, transform)).is_file():
        return check_reference(FidStats.load(cached), cached, extractor, transform), cached
    return compute_reference(path, extractor, device, batch_size=batch_size, num_workers=num_workers,
                             transform=transform)


def check_reference(stats: FidStats, path: Path, extractor: Extractor, transform: Transform | None = None) -> FidStats:
    name = (transform or crop_resize()).name
    made = (stats.info.get("extractor"), stats.info.get("transform"))
    if made != (extractor.name, name):
        raise UserError(f"--reference {path} was computed with {made[0]!r} / {made[1]!r}, not {extractor.name!r} / "
                        f"{name!r}: pass the image folder, or recompute it with `emd-t2i coco reference`")
    return stats
