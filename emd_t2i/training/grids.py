"""A run's validation grid: per prompt, the teacher's N-step image beside the student's one-step image from the same
noise, labelled; the teacher's images are made once per run and kept in the run folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from emd_t2i.export.sample import teacher_images
from emd_t2i.files import save_image_atomic, write_json_atomic
from emd_t2i.images import decode_latents, labelled_grid, to_pil

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


def validation_grid(run, cache, prompts: list[str], teacher, accelerator) -> None:
    """One-step samples for fixed prompts and seeds (seed + i for prompt i) beside the teacher's N-step images from
    the same noise at the run's guidance (made once, kept in samples/teacher/), labelled, saved as one PNG and sent
    to the tracker."""
    cfg, device = run.cfg, run.device
    shape = (teacher.latent_channels, teacher.latent_size, teacher.latent_size)
    seeds = [cfg.seed + i for i in range(len(prompts))]
    z = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
    with torch.no_grad(), run.exported_weights():
        x0 = run.roles.generator(z.to(device), cache.get(prompts, device=device))
        run.roles.activate(None)
    images = to_pil(decode_latents(teacher.vae, x0, teacher.scaling_factor))
    samples = Path(cfg.output) / "samples"
    reference = teacher_reference(teacher, prompts, seeds, z, cfg.guidance_scale, samples / "teacher")
    grid = validation_figure(reference, images, prompts, seeds, TEACHER_STEPS, cfg.guidance_scale, run.step)
    save_image_atomic(samples / f"step-{run.step:06d}.png", grid)
    if cfg.report_to == "tensorboard":
        writer = accelerator.get_tracker("tensorboard", unwrap=True)
        writer.add_image("samples", np.asarray(grid), run.step, dataformats="HWC")
    elif cfg.report_to == "wandb":
        import wandb

        accelerator.log({"samples": wandb.Image(grid)}, step=run.step)
