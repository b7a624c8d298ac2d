"""Latents to pictures: VAE decoding, PIL conversion, and grids."""

from __future__ import annotations

import torch
from PIL import Image
from torch import Tensor


@torch.no_grad()
def decode_latents(vae, latents: Tensor, scaling_factor: float) -> Tensor:
    """VAE-decode (latents in the diffusion model's units) to images in [-1, 1], float32 on the CPU."""
    if vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        vae.to(torch.float32)  # SDXL's VAE overflows in fp16 (its config's force_upcast): decode in float32
    images = vae.decode(latents.to(vae.dtype) / scaling_factor).sample
    return images.float().clamp(-1, 1).cpu()


def to_pil(images: Tensor, rounding: str = "round") -> list[Image.Image]:
    """(N, 3, H, W) in [-1, 1] to PIL images: the level (x + 1) * 127.5 rounded to the nearest integer ("round", ties
    to even; SiD-LSG's `(x * 127.5 + 128).to(uint8)` rounds ties up, a difference only at exact halves) or truncated
    ("truncate", as DMD2's `((x + 1) * 127.5).clamp(0, 255).to(uint8)`)."""
    assert rounding in ("round", "truncate"), rounding
    levels = ((images + 1) * 127.5).clamp(0, 255)
    levels = levels.round() if rounding == "round" else levels.floor()
    array = levels.to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in array]


def make_grid(images: list[Image.Image], columns: int) -> Image.Image:
    """Paste equally sized images into a grid, row by row."""
    assert images, "no images to put in a grid"
    w, h = images[0].size
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * w, rows * h), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * w, (i // columns) * h))
    return grid
