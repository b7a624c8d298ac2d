"""The published zero-shot COCO protocols an evaluation can follow, and the precision and pixel rounding of the
images: which published rows each setting reproduces (docs/EVALUATION.md)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from emd_t2i.errors import UserError
from emd_t2i.evaluation.captions import COCO_30K
from emd_t2i.evaluation.fid import EVAL_RESOLUTION

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ROUNDINGS = ("round", "truncate")


@dataclass(frozen=True)
class Protocol:
    name: str
    description: str
    fid_resolution: int  # FID on the centre square resized (Lanczos) to this
    patch_fid: bool  # also FID on the centre 299 px patch at the generated resolution
    clip_resolution: int  # CLIP score on the centre square resized to this
    captions: str  # the caption list of the published rows
    reference: str  # the real images of the published rows
    precision: str  # "auto": fp16 on CUDA (fp32 on a CPU)
    rounding: str
    comparable_with: str  # the published rows, and what to change to match each

    def info(self) -> dict:
        return asdict(self)


PROTOCOLS = {p.name: p for p in (
    Protocol(
        name="coco2014-30k-256",
        description="zero-shot COCO-2014: one image per caption of the published 30K list, FID (clean-fid) against "
                    "val2014 and CLIP score (open_clip ViT-g-14), both on the 256 px centre crop",
        fid_resolution=EVAL_RESOLUTION, patch_fid=False, clip_resolution=EVAL_RESOLUTION, captions=COCO_30K,
        reference="COCO val2014, all 40,504 images", precision="auto", rounding="round",
        comparable_with="SD 1.5 / 2.1-base one-step rows of SiD-LSG (README: 8.71, 8.15 ...; fp16, rounded, as "
                        "here by default) and of DMD2 (experiments/sdv1.5: 8.35, 9.28; --precision fp32 --rounding "
                        "truncate); GigaGAN's evaluation code"),
    Protocol(
        name="dmd2-sdxl-coco10k",
        description="DMD2's SDXL evaluation (main/sdxl/test_folder_sdxl.py): FID (clean-fid) on the 512 px centre "
                    "crop and patch FID on the centre 299 px of the 1024 px image, against DMD2's 10K val2014 "
                    "subset; CLIP score (open_clip ViT-g-14) on the 256 px centre crop",
        fid_resolution=512, patch_fid=True, clip_resolution=EVAL_RESOLUTION,
        captions="DMD2's coco10k/all_prompts.pkl (its HF data/coco/coco10k.zip)",
        reference="DMD2's coco10k/subset (same zip)", precision="fp32", rounding="truncate",
        comparable_with="DMD2's SDXL rows (experiments/sdxl/README.md: 19.01 one step at t* = 399, 19.32 four "
                        "steps), generated in fp32 and truncated to 8 bits as here by default"),
)}
DEFAULT_PROTOCOL, SDXL_PROTOCOL = "coco2014-30k-256", "dmd2-sdxl-coco10k"


def check_protocol_name(name: str) -> None:
    if name != "auto" and name not in PROTOCOLS:
        raise UserError(f"--protocol must be auto or one of {', '.join(PROTOCOLS)} (got {name!r})")


def resolve_protocol(name: str, is_sdxl: bool) -> Protocol:
    """`auto`: DMD2's SDXL protocol for an SDXL model, the 30K / 256 px protocol for SD 1.x / 2.x."""
    check_protocol_name(name)
    return PROTOCOLS[(SDXL_PROTOCOL if is_sdxl else DEFAULT_PROTOCOL) if name == "auto" else name]


def resolve_precision(name: str, protocol: Protocol, device: torch.device) -> torch.dtype:
    """`auto`: the protocol's precision, its own "auto" being fp16 on CUDA (SiD-LSG generates in fp16) and fp32 on
    a CPU."""
    if name == "auto":
        name = protocol.precision
    if name == "auto":
        name = "fp16" if device.type == "cuda" else "fp32"
    if name not in PRECISIONS:
        raise UserError(f"--precision must be auto or one of {', '.join(PRECISIONS)} (got {name!r})")
    return PRECISIONS[name]


def resolve_rounding(name: str, protocol: Protocol) -> str:
    """`auto`: the protocol's. "round": nearest 8-bit level (SiD-LSG); "truncate": toward zero (DMD2)."""
    name = protocol.rounding if name == "auto" else name
    if name not in ROUNDINGS:
        raise UserError(f"--rounding must be auto or one of {', '.join(ROUNDINGS)} (got {name!r})")
    return name
