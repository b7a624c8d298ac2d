"""Evaluation images: one PNG per caption (seed base + i), resumable and split across processes; and speed."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from torch import Tensor
from tqdm import tqdm

from emd_t2i.errors import UserError
from emd_t2i.export.sample import (
    as_pipeline,
    initial_noise,
    load_facts,
    one_step_timestep,
    pipeline_dir,
    prompt_conditioning,
    resolve_model,
)
from emd_t2i.files import save_image_atomic
from emd_t2i.images import decode_latents, to_pil
from emd_t2i.models.roles import Roles
from emd_t2i.models.teachers import is_sdxl_source, load_teacher

IMAGES_DIR = "images"
TEACHER_STEPS = 50  # the published teacher row: SD1.5, 50 steps, guidance 3
TEACHER_GUIDANCE = 3.0
SCHEDULERS = ("teacher", "ddim")


class ImageSource(Protocol):
    info: dict  # what made the images (kind, model, steps, guidance ...): recorded in metrics.json
    device: torch.device

    def __call__(self, prompts: list[str], seeds: list[int]) -> list[Image.Image]: ...


def per_image_noise(seeds: list[int], shape: tuple[int, ...], device, dtype: torch.dtype) -> Tensor:
    """z for image i from its own seed, drawn as diffusers draws it for generator=Generator("cpu")
    .manual_seed(seed): image i is the same whatever the batch, the process or an earlier interruption."""
    return torch.cat([initial_noise((1, *shape), s, device, dtype) for s in seeds])


class OneStep:
    """An export's generator: one UNet call per image (G1), as `emd_t2i.sample.sample` makes it."""

    def __init__(self, root: Path, device, dtype: torch.dtype, rounding: str = "round"):
        self.model = load_teacher(str(pipeline_dir(root)), dtype=dtype, device=device)
        self.rounding = rounding
        t_star = one_step_timestep(self.model.scheduler, root)
        self.roles = Roles(self.model.unet, self.model.alphas_cumprod, self.model.prediction_type, t_star)
        self.device = torch.device(device)
        self.root, self.facts = root, load_facts(root) or {}
        self.info = {"kind": "one-step export", "model": str(root), "steps": 1, "t_star": t_star,
                     "teacher": self.facts.get("teacher_source"), "distilled_guidance": self.facts.get("guidance_scale"),
                     "checkpoint_step": self.facts.get("step"), "resolution": self.model.resolution,
                     "dtype": str(dtype).removeprefix("torch."), "rounding": rounding}

    @torch.no_grad()
    def __call__(self, prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        cond = prompt_conditioning(self.model, prompts, 1, self.device)
        m = self.model
        z = per_image_noise(seeds, (m.latent_channels, m.latent_size, m.latent_size), self.device, cond.dtype)
        return to_pil(decode_latents(m.vae, self.roles.generator(z, cond), m.scaling_factor), self.rounding)


class TeacherSampler:
    """A teacher at `steps` steps with classifier-free guidance, through plain diffusers (StableDiffusionPipeline
    over the loaded components) with its own scheduler ("teacher", as the published teacher rows) or DDIM."""

    def __init__(self, spec: str, steps: int, guidance: float, scheduler: str, device, dtype: torch.dtype,
                 rounding: str = "round"):
        from diffusers import DDIMScheduler

        if scheduler not in SCHEDULERS:
            raise UserError(f"--scheduler must be one of {', '.join(SCHEDULERS)} (got {scheduler!r})")
        if steps < 1:
            raise UserError(f"--steps must be >= 1 (got {steps})")
        self.model = load_teacher(spec, dtype=dtype, device=device)
        sched = self.model.scheduler
        if scheduler == "ddim":  # clip_sample=False: StableDiffusionPipeline forces it for DDIM anyway
            sched = DDIMScheduler.from_config(sched.config, clip_sample=False)
        self.pipe = as_pipeline(self.model, sched)
        self.steps, self.guidance, self.device, self.rounding = steps, guidance, torch.device(device), rounding
        self.info = {"kind": "teacher", "model": self.model.source, "steps": steps, "guidance": guidance,
                     "scheduler": type(sched).__name__, "resolution": self.model.resolution,
                     "dtype": str(dtype).removeprefix("torch."), "rounding": rounding}

    @torch.no_grad()
    def __call__(self, prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        m = self.model
        z = per_image_noise(seeds, (m.latent_channels, m.latent_size, m.latent_size), self.device, m.unet.dtype)
        kwargs = {"num_inference_steps": self.steps, "guidance_scale": self.guidance, "latents": z}
        if self.rounding == "round":  # diffusers' own PIL images: (x / 2 + 0.5) * 255, rounded
            return self.pipe(prompts, **kwargs).images
        levels = self.pipe(prompts, output_type="np", **kwargs).images * 255  # as DMD2's teacher rows truncate it
        return [Image.fromarray(a.astype(np.uint8)) for a in levels]


def as_export(model: str | Path | None) -> Path | None:
    """The export folder if `model` is one (its scheduler is the one-step DDIM), None if it names a teacher."""
    if model is not None and not Path(model).expanduser().exists():
        return None  # a registry name or hub id: a teacher
    try:
        root = resolve_model(model)
    except UserError as err:
        raise UserError(f"{err}, or a teacher (a name from `emd-t2i teachers`, a hub id or a diffusers folder)") \
            from None
    config_file = pipeline_dir(root) / "scheduler" / "scheduler_config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    one_step = (config.get("_class_name") == "DDIMScheduler" and config.get("timestep_spacing") == "trailing"
                and config.get("set_alpha_to_one"))
    return root if one_step else None


def is_sdxl_model(model: str | Path | None) -> bool:
    """Whether an export or a teacher is SDXL-shaped (read from its model_index.json, before any weights)."""
    export = as_export(model)
    return is_sdxl_source(str(pipeline_dir(export)) if export is not None else str(model))


def open_source(model: str | Path | None, *, steps: int | None, guidance: float | None, scheduler: str,
                device, dtype: torch.dtype, rounding: str = "round") -> OneStep | TeacherSampler:
    """An export gives its one-step generator; anything else is loaded as a teacher sampled at `steps`."""
    export = as_export(model)
    if export is None:
        return TeacherSampler(str(model), TEACHER_STEPS if steps is None else steps,
                              TEACHER_GUIDANCE if guidance is None else guidance, scheduler, device, dtype,
                              rounding)
    if steps not in (None, 1) or guidance is not None:
        teacher = (load_facts(export) or {}).get("teacher_source", "its teacher")
        raise UserError(f"--steps / --guidance sample a teacher, and {export} is a one-step export (guidance distilled "
                        f"in): pass --model {teacher} to score the teacher")
    if scheduler != "teacher":
        raise UserError(f"--scheduler applies to a teacher; {export} is a one-step export: leave it out")
    return OneStep(export, device, dtype, rounding)


# ---------------------------------------------------------------------------------------------------------
# Writing the images: resumable, split across processes
# ---------------------------------------------------------------------------------------------------------


def image_path(folder: Path, index: int) -> Path:
    return folder / f"{index:06d}.png"


def save_png(image: Image.Image, path: Path, text: dict) -> None:
    """Atomic: the PNG is written under a hidden name and renamed, so a file that exists is complete."""
    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, str(value))
    save_image_atomic(path, image, pnginfo=info)


def shard(count: int, process_index: int, num_processes: int) -> range:
    """The caption indices one process renders: every num_processes-th, from its own index. Fixed by the index
    range alone, so processes that resume at different moments never skip or repeat a caption."""
    return range(process_index, count, num_processes)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate_missing(source: ImageSource, captions: list[str], folder: Path, *, seed: int, batch_size: int,
                     process_index: int = 0, num_processes: int = 1, progress: bool = True) -> dict:
    """Render this process's captions whose PNG is missing (image i: caption i, seed `seed` + i)."""
    folder.mkdir(parents=True, exist_ok=True)
    mine = shard(len(captions), process_index, num_processes)
    todo = [i for i in mine if not image_path(folder, i).is_file()]
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), unit="img", desc="generating", disable=not progress)
    _sync(source.device)
    start = time.perf_counter()
    for b in range(0, len(todo), batch_size):
        batch = todo[b:b + batch_size]
        images = source([captions[i] for i in batch], [seed + i for i in batch])
        for i, image in zip(batch, images):
            save_png(image, image_path(folder, i), {"caption": captions[i], "seed": seed + i, "index": i})
        bar.update(len(batch))
    _sync(source.device)
    seconds = time.perf_counter() - start
    bar.close()
    return {"generated": len(todo), "reused": len(mine) - len(todo), "seconds": round(seconds, 3),
            "images_per_s": round(len(todo) / seconds, 4) if todo else None}


# ---------------------------------------------------------------------------------------------------------
# Speed: what a user weighs against quality
# ---------------------------------------------------------------------------------------------------------


def measure_speed(source: ImageSource, prompt: str, batch_size: int, repeats: int = 3) -> dict:
    """Latency of one image (batch 1) and images/s at `batch_size`, medians of `repeats` timed calls after one
    warm-up call; prompt encoding, sampling and VAE decoding included, PNG writing not."""

    def timed(n: int) -> float:
        _sync(source.device)
        start = time.perf_counter()
        source([prompt] * n, list(range(n)))
        _sync(source.device)
        return time.perf_counter() - start

    timed(1)
    latency = statistics.median(timed(1) for _ in range(repeats))
    batch = statistics.median(timed(batch_size) for _ in range(repeats))
    return {**{k: source.info[k] for k in ("kind", "model", "steps", "guidance", "scheduler") if k in source.info},
            "latency_s": round(latency, 5), "images_per_s": round(batch_size / batch, 4),
            "batch_size": batch_size, "repeats": repeats}
