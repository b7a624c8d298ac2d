"""CLIP score in the published COCO protocol: open_clip ViT-g-14 (laion2b_s12b_b42k) on the 256 px crop, text
"A photo depicts " + caption, mean cosine similarity (not x100)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from emd_t2i.errors import UserError
from emd_t2i.evaluation.fid import EVAL_RESOLUTION, center_crop_resize

CLIP_ARCH = "ViT-g-14"
CLIP_PRETRAINED = "laion2b_s12b_b42k"
CLIP_HUB = "laion/CLIP-ViT-g-14-laion2B-s12B-b42K"
CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # open_clip tries them in this order
CLIP_PREFIX = "A photo depicts "  # Hessel et al. 2021 (CLIPScore), as DMD2 and GigaGAN prepend it


class ClipScorer:
    """The thin adapter over an open_clip model: its eval image transform, its tokenizer, cosine similarity."""

    def __init__(self, model: torch.nn.Module, preprocess: Callable[[Image.Image], Tensor], tokenizer,
                 device: str | torch.device, name: str):
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.name = name

    @torch.no_grad()
    def similarities(self, images: Sequence[Image.Image], captions: Sequence[str]) -> Tensor:
        """cos(image, "A photo depicts " + caption) per pair; images are already the protocol's 256 px crop."""
        pixels = torch.stack([self.preprocess(image) for image in images]).to(self.device)
        tokens = self.tokenizer([CLIP_PREFIX + c for c in captions]).to(self.device)
        image_features = self.model.encode_image(pixels).float()
        text_features = self.model.encode_text(tokens).float()
        return torch.nn.functional.cosine_similarity(image_features, text_features, dim=1).cpu()


def clip_score(scorer: ClipScorer, files: Sequence[Path], captions: Sequence[str], batch_size: int = 32,
               progress: bool = True, size: int = EVAL_RESOLUTION) -> dict:
    """Mean (and spread) of the per-image CLIP similarity over image files and their captions, each image first
    cropped to its centre square and resized to `size` (the protocol's)."""
    assert len(files) == len(captions), "one caption per image"
    scores = []
    for start in tqdm(range(0, len(files), batch_size), desc="CLIP score", unit="batch", disable=not progress):
        images = []
        for f in files[start:start + batch_size]:
            with Image.open(f) as image:
                images.append(center_crop_resize(image.convert("RGB"), size))
        scores.append(scorer.similarities(images, captions[start:start + batch_size]))
    values = torch.cat(scores).double().numpy()
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "count": len(values)}


def _missing(where: str) -> UserError:
    return UserError(
        f"CLIP score needs the open_clip weights {CLIP_ARCH} {CLIP_PRETRAINED} ({CLIP_FILES[1]} or {CLIP_FILES[0]} "
        f"of the hub repo {CLIP_HUB}), not found {where}: on a connected machine run `hf download {CLIP_HUB} "
        f"{CLIP_FILES[1]}` and copy the Hugging Face cache over, or pass --clip-weights PATH to the file"
    )


def check_clip_weights(weights: str | Path | None = None) -> str:
    """The local weights file open_clip will load: `weights`, or the tag's file from the Hugging Face cache
    (downloaded there when online). Called before any image is generated, so a missing file stops the run at
    its start rather than at its end."""
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise UserError(f"--clip-weights {weights} is not a file: give the path of {CLIP_FILES[1]} "
                            f"(or {CLIP_FILES[0]}) from {CLIP_HUB}")
        check_clip_file(path)
        return str(path)
    import open_clip
    from huggingface_hub import constants
    from open_clip.pretrained import download_pretrained

    try:
        path = download_pretrained(open_clip.get_pretrained_cfg(CLIP_ARCH, CLIP_PRETRAINED))
    except (RuntimeError, FileNotFoundError, OSError) as err:
        why = "the hub is offline (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else "the download failed"
        raise _missing(f"in the Hugging Face cache {constants.HF_HUB_CACHE} and {why}") from err
    check_clip_file(Path(path))
    return path


def clip_shapes() -> dict[str, tuple[int, int]]:
    """Shapes of two weights every open_clip CLIP of this architecture has, from its config."""
    import open_clip

    cfg = open_clip.get_model_config(CLIP_ARCH)
    return {"visual.proj": (cfg["vision_cfg"]["width"], cfg["embed_dim"]),
            "text_projection": (cfg["text_cfg"]["width"], cfg["embed_dim"])}


def check_clip_file(path: Path) -> None:
    """Read a weights file's tensor shapes only (the safetensors header, or torch's zip index mapped, not loaded)
    and refuse one that is not open_clip's ViT-g-14, so a wrong file stops the run before its images are made."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                names = set(f.keys())
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in clip_shapes() if k in names}
        else:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else {}
            shapes = {k: tuple(state[k].shape) for k in clip_shapes() if k in state}
    except Exception as err:  # whatever the loader raises on a damaged or foreign file
        raise UserError(f"CLIP weights {path} do not load ({type(err).__name__}): give --clip-weights the "
                        f"{CLIP_FILES[1]} or {CLIP_FILES[0]} of {CLIP_HUB}") from err
    if shapes != clip_shapes():
        raise UserError(f"CLIP weights {path} are not open_clip {CLIP_ARCH} (projections {shapes or 'absent'}, expected "
                        f"{clip_shapes()}): give --clip-weights the {CLIP_FILES[1]} or {CLIP_FILES[0]} of {CLIP_HUB}")


def load_clip(device: str | torch.device, weights: str | Path | None = None) -> ClipScorer:
    """open_clip's ViT-g-14 with the weights and preprocessing of its laion2b_s12b_b42k tag, in float32 as the
    reference code runs it."""
    import open_clip

    path = check_clip_weights(weights)
    cfg = open_clip.get_pretrained_cfg(CLIP_ARCH, CLIP_PRETRAINED)
    try:  # from a file open_clip skips the tag's preprocessing config: pass it, so both load the same way
        model, _, preprocess = open_clip.create_model_and_transforms(
            CLIP_ARCH, pretrained=path, device=device, image_mean=cfg["mean"], image_std=cfg["std"],
            image_interpolation=cfg["interpolation"], image_resize_mode=cfg["resize_mode"])
    except (RuntimeError, OSError, KeyError) as err:
        raise UserError(f"{path} does not load as open_clip {CLIP_ARCH} ({err.__class__.__name__}): give "
                        f"--clip-weights the {CLIP_FILES[1]} or {CLIP_FILES[0]} of {CLIP_HUB}") from err
    name = f"open_clip {CLIP_ARCH} {CLIP_PRETRAINED} ({Path(path).name})"
    return ClipScorer(model.float(), preprocess, open_clip.get_tokenizer(CLIP_ARCH), device, name)
