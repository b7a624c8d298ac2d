"""Latents to pictures: VAE decoding, PIL conversion, and grids."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image, ImageDraw, ImageFont
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


# ---------------------------------------------------------------------------------------------------------
# Labelled grids: a row per prompt, a titled column per image source
# ---------------------------------------------------------------------------------------------------------

Box = tuple[int, int, int, int]  # left, top, right, bottom


@dataclass(frozen=True)
class GridLayout:
    """Where everything of a labelled grid goes: `cells[r][c]` holds image c of row r, `labels[r]` its text,
    `titles[c]` the column's title; images are scaled up by the whole number `scale`."""

    size: tuple[int, int]
    scale: int
    titles: list[Box]
    labels: list[Box]
    cells: list[list[Box]]


def grid_layout(rows: int, columns: int, image_size: tuple[int, int], min_side: int = 128,
                line_height: int = 18, label_width: int = 192, title_lines: int = 1) -> GridLayout:
    """A title band (`title_lines` lines) over the image columns, and per row a text column then its images. Images
    smaller than `min_side` are scaled up by the smallest whole factor that reaches it, so small images stay
    legible."""
    w, h = image_size
    scale = max(1, -(-min_side // min(w, h)))
    cell_w, cell_h = w * scale, h * scale
    label_w, pad = max(label_width, cell_w // 2), line_height // 2
    title_h = title_lines * line_height + 2 * pad
    titles = [(label_w + c * cell_w, 0, label_w + (c + 1) * cell_w, title_h) for c in range(columns)]
    labels = [(0, title_h + r * cell_h, label_w, title_h + (r + 1) * cell_h) for r in range(rows)]
    cells = [[(label_w + c * cell_w, top, label_w + (c + 1) * cell_w, bottom) for c in range(columns)]
             for _, top, _, bottom in labels]
    return GridLayout((label_w + columns * cell_w, title_h + rows * cell_h), scale, titles, labels, cells)


def _wrap(text: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and font.getlength(candidate) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    return lines + ([line] if line else [])


def labelled_grid(rows: list[list[Image.Image]], row_labels: list[str], column_titles: list[str],
                  min_side: int = 128) -> Image.Image:
    """Equally sized images in rows (one per label), each row headed by its wrapped label, each column by its title
    (PIL's built-in font: nothing to download)."""
    assert rows and len(rows) == len(row_labels) and all(len(r) == len(column_titles) for r in rows)
    font, line = ImageFont.load_default(size=14), 18
    shape = (len(rows), len(column_titles), rows[0][0].size, min_side, line)
    left, _, right, _ = grid_layout(*shape).titles[0]
    titles = [_wrap(title, font, right - left - 12) for title in column_titles]
    layout = grid_layout(*shape, title_lines=max(map(len, titles)))
    grid = Image.new("RGB", layout.size, "white")
    draw = ImageDraw.Draw(grid)
    for lines, (left, top, _, _) in zip(titles, layout.titles):
        draw.multiline_text((left + 6, top + 6), "\n".join(lines), fill="black", font=font, spacing=line - 14)
    for r, (images, label) in enumerate(zip(rows, row_labels)):
        left, top, right, bottom = layout.labels[r]
        lines = _wrap(label, font, right - left - 12)[: max(1, (bottom - top - 12) // line)]
        draw.multiline_text((left + 6, top + 6), "\n".join(lines), fill="black", font=font, spacing=line - 14)
        for image, (x, y, x1, y1) in zip(images, layout.cells[r]):
            grid.paste(image.resize((x1 - x, y1 - y), Image.NEAREST), (x, y))
    return grid
