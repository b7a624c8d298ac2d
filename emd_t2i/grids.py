"""A run's validation grid: per prompt, the teacher's N-step image beside the student's one-step image from the same
noise, labelled; the teacher's images are made once per run and kept in the run folder."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from .files import save_image_atomic, write_json_atomic
from .images import labelled_grid
from .sample import teacher_images

TEACHER_STEPS = 25  # DDIM steps of the teacher's reference images (as the toy evaluation's reference sampler)
RECORD = "reference.json"


def teacher_reference(teacher, prompts: list[str], seeds: list[int], z: Tensor, guidance: float, folder: Path,
                      steps: int = TEACHER_STEPS) -> list[Image.Image]:
    """The teacher's `steps`-step images at guidance `guidance` from the latents z: read from `folder` when this run
    made them before for the same prompts, seeds, steps and guidance (a resume), else sampled and saved there.

    The teacher's UNet must have its adapters off. Sampling draws no random numbers from the global generators
    (DDIM with eta 0, latents given), and runs under a forked CPU generator anyway, so a resumed run that reads the
    images instead continues exactly as an uninterrupted one.
    """
    record = {"teacher": teacher.source, "prompts": prompts, "seeds": seeds, "steps": steps, "guidance": guidance}
    files = [folder / f"{i:03d}.png" for i in range(len(prompts))]
    manifest = folder / RECORD
    if manifest.is_file() and json.loads(manifest.read_text()) == record and all(f.is_file() for f in files):
        return [_read(f) for f in files]
    with torch.random.fork_rng(devices=[]):
        images = teacher_images(teacher, prompts, z, steps, guidance)
    folder.mkdir(parents=True, exist_ok=True)
    for image, path in zip(images, files):
        save_image_atomic(path, image)
    write_json_atomic(manifest, record)  # last: the images it describes are all there
    return images


def _read(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def validation_figure(teacher: list[Image.Image], student: list[Image.Image], prompts: list[str], seeds: list[int],
                      steps: int, guidance: float, iteration: int) -> Image.Image:
    """A row per prompt (its text and seed), the teacher's image then the student's."""
    return labelled_grid([[t, s] for t, s in zip(teacher, student)],
                         [f"{p} (seed {s})" for p, s in zip(prompts, seeds)],
                         [f"teacher: {steps} DDIM steps, guidance {guidance:g}", f"student: 1 step, iteration {iteration}"])
