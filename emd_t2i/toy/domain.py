"""The toy captioned image domain: coloured shapes on plain backgrounds, rendered procedurally from a seed."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

IMAGE_SIZE = 32
SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow")
BACKGROUNDS = ("white", "black")
COLOUR_RGB = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
}
BACKGROUND_RGB = {"white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0)}
# Half-extent of a shape in pixels (circle radius, half the side of a square, half the base of a triangle).
# Large minimum so that the shape survives the 4x downsampling to 8x8 latents.
MIN_SIZE, MAX_SIZE = 6.0, 11.0
PHRASINGS = (
    "a {colour} {shape} on a {background} background",
    "{colour} {shape}, {background} background",
    "a {colour} {shape} against a {background} background",
    "a {background} background with a {colour} {shape}",
    "a picture of a {colour} {shape} on {background}",
    "{colour} {shape} on {background}",
)


@dataclass(frozen=True)
class Attributes:
    """Per-image ground truth: class indices into SHAPES / COLOURS / BACKGROUNDS and geometry in pixels."""

    shape: np.ndarray
    colour: np.ndarray
    background: np.ndarray
    cx: np.ndarray
    cy: np.ndarray
    size: np.ndarray

    def __len__(self) -> int:
        return len(self.shape)

    def __getitem__(self, index) -> Attributes:
        return Attributes(*(np.atleast_1d(getattr(self, f)[index]) for f in self.__dataclass_fields__))


def sample_attributes(n: int, seed: int, shape=None, colour=None, background=None) -> Attributes:
    """n random attribute sets from `seed`; fix shape/colour/background (indices) to condition on them."""
    rng = np.random.default_rng(seed)

    def pick(fixed, k):
        drawn = rng.integers(0, k, n)
        return drawn if fixed is None else np.broadcast_to(np.asarray(fixed), (n,)).copy()

    shapes, colours, backgrounds = pick(shape, len(SHAPES)), pick(colour, len(COLOURS)), pick(background, 2)
    size = rng.uniform(MIN_SIZE, MAX_SIZE, n)
    cx = rng.uniform(size, IMAGE_SIZE - size)
    cy = rng.uniform(size, IMAGE_SIZE - size)
    return Attributes(shapes, colours, backgrounds, cx, cy, size)


def shape_masks(attrs: Attributes) -> np.ndarray:
    """Boolean (N, H, W) masks of the shapes, tested at pixel centres."""
    grid = np.arange(IMAGE_SIZE, dtype=np.float32) + 0.5
    dx = grid[None, None, :] - attrs.cx[:, None, None]
    dy = grid[None, :, None] - attrs.cy[:, None, None]
    s = attrs.size[:, None, None]
    circle = dx**2 + dy**2 <= s**2
    square = (np.abs(dx) <= s) & (np.abs(dy) <= s)
    # Upright isosceles triangle: apex at (cx, cy - s), base of width 2s at y = cy + s.
    triangle = (np.abs(dy) <= s) & (np.abs(dx) <= (dy + s) / 2)
    kind = attrs.shape[:, None, None]
    return np.where(kind == 0, circle, np.where(kind == 1, square, triangle))


def render(attrs: Attributes) -> Tensor:
    """Images (N, 3, 32, 32) as float32 in [-1, 1]."""
    fg = np.asarray([COLOUR_RGB[c] for c in COLOURS], dtype=np.float32)[attrs.colour]
    bg = np.asarray([BACKGROUND_RGB[b] for b in BACKGROUNDS], dtype=np.float32)[attrs.background]
    mask = shape_masks(attrs)[:, None]
    images = np.where(mask, fg[:, :, None, None], bg[:, :, None, None])
    return torch.from_numpy(images * 2 - 1)


# Captions that leave attributes out ("a red shape", "a circle on black", "a shape"): the teacher learns them too, so
# an under-specified prompt has several modes (one per attribute it does not name) for a student to cover or drop.
UNNAMED_SHAPE = "shape"
PARTIAL_PHRASINGS = ("a {object}", "{object}", "a picture of a {object}")  # phrasings without a background


def caption(shape: int | None, colour: int | None, background: int | None, phrasing: int = 0) -> str:
    """One caption for an attribute triple (class indices; None leaves that attribute out), in the given phrasing.

    A full triple gives one of PHRASINGS; a missing shape reads "shape", a missing colour is omitted, and a missing
    background takes one of PARTIAL_PHRASINGS.
    """
    words = ([] if colour is None else [COLOURS[colour]]) + [UNNAMED_SHAPE if shape is None else SHAPES[shape]]
    obj = " ".join(words)
    if background is None:
        return PARTIAL_PHRASINGS[phrasing % len(PARTIAL_PHRASINGS)].format(object=obj)
    template = PHRASINGS[phrasing % len(PHRASINGS)].replace("{colour} {shape}", "{object}")
    return template.format(object=obj, background=BACKGROUNDS[background])


def captions(attrs: Attributes, seed: int | None = None) -> list[str]:
    """Captions for a batch; phrasing 0 everywhere when seed is None, else drawn at random."""
    n = len(attrs)
    phrasing = (
        np.zeros(n, int) if seed is None else np.random.default_rng(seed).integers(0, len(PHRASINGS), n)
    )
    return [caption(s, c, b, p) for s, c, b, p in zip(attrs.shape, attrs.colour, attrs.background, phrasing)]


def all_captions() -> list[str]:
    """Every full caption the domain can produce (each attribute triple in each phrasing)."""
    return [
        caption(s, c, b, p)
        for s in range(len(SHAPES))
        for c in range(len(COLOURS))
        for b in range(len(BACKGROUNDS))
        for p in range(len(PHRASINGS))
    ]


def partial_captions() -> list[str]:
    """Every caption that leaves at least one attribute out (each in each of its phrasings), without duplicates."""
    keys = [(s, c, b) for s in (*range(len(SHAPES)), None) for c in (*range(len(COLOURS)), None)
            for b in (*range(len(BACKGROUNDS)), None) if None in (s, c, b)]
    return list(dict.fromkeys(caption(*key, p) for key in keys for p in range(len(PHRASINGS))))


def parse_prompt(prompt: str) -> tuple[int | None, int | None, int | None]:
    """(shape, colour, background) indices named in a prompt; None where it names none or several."""
    words = set(re.findall(r"[a-z]+", prompt.lower()))

    def find(names):
        hits = [i for i, name in enumerate(names) if name in words]
        return hits[0] if len(hits) == 1 else None

    return find(SHAPES), find(COLOURS), find(BACKGROUNDS)


def make_dataset(n: int, seed: int) -> tuple[Tensor, Attributes, list[str]]:
    """A fixed captioned dataset: images in [-1, 1], their attributes, and captions of random phrasing."""
    attrs = sample_attributes(n, seed)
    return render(attrs), attrs, captions(attrs, seed=seed + 1)
