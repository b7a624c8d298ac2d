"""One-step sampling from an export (the teacher's N-step image beside it, if asked), and writing the PNGs."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from torch import Tensor

from emd_t2i.errors import UserError
from emd_t2i.export.layout import FACTS_FILE, PIPELINE_DIR
from emd_t2i.images import decode_latents, make_grid, to_pil
from emd_t2i.models.roles import Roles
from emd_t2i.models.teachers import load_teacher

RUNS_DIR = Path("runs")


@dataclass
class Samples:
    """Images of `sample`: image i is for prompts[i]; with k images per prompt they come prompt by prompt."""

    prompts: list[str]  # one per image
    images: list[Image.Image]  # the one-step generator's
    latents: Tensor  # x0 = g(z, c), float32 on the CPU, before VAE decoding
    teacher_images: list[Image.Image] | None  # the teacher's `teacher_steps`-step images, same z
    seed: int
    num_images: int
    teacher_steps: int
    model: Path


# ---------------------------------------------------------------------------------------------------------
# Finding the model
# ---------------------------------------------------------------------------------------------------------


def _is_pipeline(folder: Path) -> bool:
    return (folder / "model_index.json").is_file()


def resolve_model(model: str | Path | None = None, runs_dir: str | Path = RUNS_DIR) -> Path:
    """The folder to sample from: an export folder, its pipeline/ subfolder, or a run folder (its export/).

    None picks the most recently written `runs/*/export` (relative to the working directory): where
    `emd-t2i distill` exports at its end with the default --output runs/<name>.
    """
    if model is None:
        found = [p for p in Path(runs_dir).glob("*/export") if _is_pipeline(p / PIPELINE_DIR)]
        if not found:
            raise UserError(
                f"no export found in {runs_dir}/*/export: pass --model an export folder, "
                "or make one with `emd-t2i export RUN_DIR`"
            )
        return max(found, key=lambda p: p.stat().st_mtime)
    path = Path(model).expanduser()
    for candidate in (path, path / "export"):
        if _is_pipeline(candidate / PIPELINE_DIR) or _is_pipeline(candidate):
            return candidate
    if (path / FACTS_FILE).is_file() or (path / "export" / FACTS_FILE).is_file():
        raise UserError(f"{path} was exported without its pipeline: export again with --format pipeline")
    raise UserError(f"{path} is not an export folder (no {PIPELINE_DIR}/model_index.json): pass --model "
                    "a folder written by `emd-t2i export`")


def pipeline_dir(model: Path) -> Path:
    return model if _is_pipeline(model) else model / PIPELINE_DIR


def load_facts(model: Path) -> dict | None:
    """The export's emd_t2i.json (teacher, t*, guidance ...), or None for a bare pipeline folder."""
    for path in (model / FACTS_FILE, model.parent / FACTS_FILE):
        if path.is_file():
            return json.loads(path.read_text())
    return None


# ---------------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------------


def initial_noise(shape: tuple[int, ...], seed: int, device, dtype: torch.dtype) -> Tensor:
    """z ~ N(0, I) drawn exactly as StableDiffusionPipeline draws its latents for generator=Generator("cpu")
    .manual_seed(seed): one draw of shape (prompts * images per prompt, C, H, W), on the CPU."""
    from diffusers.utils.torch_utils import randn_tensor

    generator = torch.Generator("cpu").manual_seed(seed)
    return randn_tensor(shape, generator=generator, device=torch.device(device), dtype=dtype)


def one_step_timestep(scheduler, folder: Path) -> int:
    """t*: the timestep of the export's one-step scheduler, exactly what diffusers evaluates the UNet at."""
    config = scheduler.config
    if type(scheduler).__name__ != "DDIMScheduler" or config.get("timestep_spacing") != "trailing" \
            or not config.get("set_alpha_to_one"):
        raise UserError(f"{folder} is not a one-step export (its scheduler is not the one-step DDIM): pass "
                        "--model a folder written by `emd-t2i export`")
    scheduler.set_timesteps(1)
    return int(scheduler.timesteps[0])


def as_pipeline(model, scheduler=None):
    """A StableDiffusion(XL)Pipeline over already loaded components (no copies, no safety checker)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if model.is_sdxl:
        pipe = StableDiffusionXLPipeline(
            vae=model.vae, text_encoder=model.text_encoder, text_encoder_2=model.text_encoder_2,
            tokenizer=model.tokenizer, tokenizer_2=model.tokenizer_2, unet=model.unet,
            scheduler=scheduler or model.scheduler, force_zeros_for_empty_prompt=model.force_zeros_for_empty_prompt,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe
    pipe = StableDiffusionPipeline(
        vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer, unet=model.unet,
        scheduler=scheduler or model.scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def prompt_conditioning(model, prompts: list[str], num_images: int, device):
    """The UNet's conditioning per image (prompt-major), as the pipeline computes it: for SDXL the packed
    embeddings, pooled embedding and time ids (conditioning.py) of StableDiffusionXLPipeline.encode_prompt."""
    if not model.is_sdxl:
        return as_pipeline(model).encode_prompt(prompts, device, num_images, False)[0]
    return model.conditioning_encoder().encode(prompts).repeat_interleave(num_images, dim=0)


def _check_arguments(prompts: list[str], num_images: int, teacher_steps: int, batch_size: int) -> None:
    if not prompts or not all(p.strip() for p in prompts):
        raise UserError("give at least one non-empty prompt")
    if num_images < 1:
        raise UserError(f"--num-images must be >= 1 (got {num_images})")
    if teacher_steps < 0:
        raise UserError(f"--teacher-steps must be >= 0 (0: no teacher image; got {teacher_steps})")
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1 (got {batch_size})")


@torch.no_grad()
def sample(
    prompts: str | list[str],
    model: str | Path | None = None,
    *,
    seed: int = 0,
    num_images: int = 1,
    device: str = "cpu",
    teacher_steps: int = 0,
    guidance_scale: float | None = None,
    batch_size: int = 8,
    dtype: torch.dtype | None = None,
) -> Samples:
    """One-step images: one UNet call per image through (G1) `Roles.generator`, then the VAE.

    Image i equals `StableDiffusion(XL)Pipeline.from_pretrained(<model>/pipeline)(prompts, num_inference_steps=1,
    guidance_scale=0, num_images_per_prompt=num_images, generator=torch.Generator("cpu").manual_seed(seed))
    .images[i]`. `teacher_steps=N` also renders the teacher's N-step DDIM image from the same z, with
    classifier-free guidance `guidance_scale` (default: the one the generator was distilled with).
    device "auto": CUDA if there is one. dtype: float16 on CUDA, float32 otherwise, unless given.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    _check_arguments(prompts, num_images, teacher_steps, batch_size)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = dtype or (torch.float16 if str(device).startswith("cuda") else torch.float32)
    root = resolve_model(model)
    student = load_teacher(str(pipeline_dir(root)), dtype=dtype, device=device)
    t_star = one_step_timestep(student.scheduler, root)
    if student.is_sdxl and student.vae.dtype == torch.float16 and student.vae.config.get("force_upcast"):
        student.vae.to(torch.float32)  # SDXL's VAE overflows in fp16: decode in float32, as its pipeline does
    cond = prompt_conditioning(student, prompts, num_images, device)
    z = initial_noise((len(cond), student.latent_channels, student.latent_size, student.latent_size),
                      seed, device, cond.dtype)
    roles = Roles(student.unet, student.alphas_cumprod, student.prediction_type, t_star)
    latents, images = [], []
    for z_b, cond_b in zip(z.split(batch_size), cond.split(batch_size)):
        latents.append(roles.generator(z_b, cond_b))  # (G1): one UNet call per image
        images += to_pil(decode_latents(student.vae, latents[-1], student.scaling_factor))
    latents = torch.cat(latents).float().cpu()
    expanded = [p for p in prompts for _ in range(num_images)]
    teacher_images = None
    if teacher_steps:
        teacher_images = _teacher_images(root, expanded, z, teacher_steps, guidance_scale, device, dtype,
                                         batch_size)
    return Samples(expanded, images, latents, teacher_images, seed, num_images, teacher_steps, root)


def _teacher_images(root: Path, prompts: list[str], z: Tensor, steps: int, guidance_scale: float | None,
                    device, dtype, batch_size: int) -> list[Image.Image]:
    """The teacher (its id from emd_t2i.json) with DDIM on its own noise schedule, from the same z."""
    facts = load_facts(root)
    if facts is None:
        raise UserError(f"{root} has no {FACTS_FILE} naming the teacher: pass --model a folder written by "
                        "`emd-t2i export` to render teacher images")
    teacher = load_teacher(facts["teacher_source"], dtype=dtype, device=device)
    scale = facts["guidance_scale"] if guidance_scale is None else guidance_scale
    return teacher_images(teacher, prompts, z, steps, scale, batch_size)


@torch.no_grad()
def teacher_images(teacher, prompts: list[str], z: Tensor, steps: int, guidance_scale: float,
                   batch_size: int = 8) -> list[Image.Image]:
    """A loaded teacher (SD or SDXL; a UNet carrying LoRA adapters must have them off) sampled with `steps` DDIM
    steps on its own noise schedule and classifier-free guidance, from the latents z (one per prompt). The VAE
    decodes through `decode_latents` (which runs a VAE in float32 when half precision would overflow, and may leave it
    there: the pipeline's own decoding would then meet half-precision latents), and the pipeline's image processor
    makes the PIL images, so they equal the pipeline's own output."""
    from diffusers import DDIMScheduler

    # clip_sample=False: StableDiffusionPipeline forces it for DDIM anyway (SD's configs leave it unset)
    pipe = as_pipeline(teacher, DDIMScheduler.from_config(teacher.scheduler.config, clip_sample=False))
    device, dtype = teacher.unet.device, teacher.unet.dtype
    images = []
    for start in range(0, len(prompts), batch_size):
        latents = pipe(prompts[start:start + batch_size], num_inference_steps=steps, guidance_scale=guidance_scale,
                       latents=z[start:start + batch_size].to(device, dtype), output_type="latent").images
        decoded = decode_latents(teacher.vae, latents, teacher.scaling_factor)
        images += pipe.image_processor.postprocess(decoded, output_type="pil")
    return images


# ---------------------------------------------------------------------------------------------------------
# Writing PNGs
# ---------------------------------------------------------------------------------------------------------


def _slug(prompt: str, length: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:length].rstrip("-") or "prompt"


def _save(image: Image.Image, path: Path, info: PngInfo) -> Path:
    image.save(path, pnginfo=info)
    return path


def save_samples(samples: Samples, out_dir: str | Path) -> list[Path]:
    """Write NNNN-<prompt>.png per image (prompt and seed in the PNG text), the teacher's image and a
    side-by-side [generator | teacher] beside each when there is one, and grid.png (a row per prompt)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (prompt, image) in enumerate(zip(samples.prompts, samples.images)):
        info = PngInfo()
        text = {"prompt": prompt, "seed": samples.seed, "index": i, "model": samples.model}
        for key, value in text.items():
            info.add_text(key, str(value))
        stem = f"{i:04d}-{_slug(prompt)}"
        paths.append(_save(image, out_dir / f"{stem}.png", info))
        if samples.teacher_images is not None:
            teacher = samples.teacher_images[i]
            paths.append(_save(teacher, out_dir / f"{stem}-teacher{samples.teacher_steps}.png", info))
            paths.append(_save(make_grid([image, teacher], 2), out_dir / f"{stem}-side.png", info))
    paths.append(_save(_grid(samples), out_dir / "grid.png", PngInfo()))
    return paths


def _grid(samples: Samples) -> Image.Image:
    """One row per prompt: its generator images, then (if any) its teacher images."""
    k = samples.num_images
    rows = []
    for start in range(0, len(samples.images), k):
        rows += samples.images[start:start + k]
        if samples.teacher_images is not None:
            rows += samples.teacher_images[start:start + k]
    return make_grid(rows, 2 * k if samples.teacher_images is not None else k)
