"""The teacher registry and loading a Stable Diffusion teacher (hub id, registry name or local folder)."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from emd_t2i.errors import UserError
from emd_t2i.toy import TEACHER_DIR

SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
SDXL_PIPELINE = "StableDiffusionXLPipeline"
PREDICTION_TYPES = ("epsilon", "v_prediction")
TOY_TEACHER_DIR = TEACHER_DIR.resolve()
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class TeacherEntry:
    """One registry row; `resolution` / `prediction_type` None means "read it from the folder"."""

    name: str
    id: str
    description: str
    resolution: int | None
    prediction_type: str | None
    licence: str


TEACHERS: dict[str, TeacherEntry] = {
    e.name: e
    for e in (
        TeacherEntry(
            "sd-1.5",
            "stable-diffusion-v1-5/stable-diffusion-v1-5",
            "Stable Diffusion 1.5 (CLIP ViT-L/14 text encoder)",
            512,
            "epsilon",
            "CreativeML OpenRAIL-M: accept it on the model page; use restrictions carry to the student",
        ),
        TeacherEntry(
            "sd-2.1-base",
            "stabilityai/stable-diffusion-2-1-base",
            "Stable Diffusion 2.1 base (OpenCLIP ViT-H/14 text encoder)",
            512,
            "epsilon",
            "CreativeML Open RAIL++-M: use restrictions carry to the student",
        ),
        TeacherEntry(
            "sd-2.1",
            "stabilityai/stable-diffusion-2-1",
            "Stable Diffusion 2.1 at 768 px, v-prediction (OpenCLIP ViT-H/14 text encoder)",
            768,
            "v_prediction",
            "CreativeML Open RAIL++-M: use restrictions carry to the student",
        ),
        TeacherEntry(
            "sdxl",
            "stabilityai/stable-diffusion-xl-base-1.0",
            "Stable Diffusion XL base 1.0 at 1024 px (CLIP ViT-L + OpenCLIP ViT-bigG text encoders); its VAE "
            "overflows in fp16: decoding runs it in float32 (or use madebyollin/sdxl-vae-fp16-fix)",
            1024,
            "epsilon",
            "CreativeML Open RAIL++-M: use restrictions carry to the student",
        ),
        TeacherEntry(
            "toy",
            str(TOY_TEACHER_DIR),
            "tiny SD-shaped teacher trained by this project on procedural captioned images (CPU-friendly)",
            None,
            None,
            "Apache-2.0 (this project's own weights and data)",
        ),
    )
}


# ---------------------------------------------------------------------------------------------------------
# Resolving a spec to a source (a local folder or a hub id)
# ---------------------------------------------------------------------------------------------------------


def _registry_names() -> str:
    return ", ".join(TEACHERS)


def _check_folder(folder: Path) -> str:
    if not folder.is_dir():
        raise UserError(f"teacher {folder} is a file, not a folder: pass a diffusers pipeline folder")
    if not (folder / "model_index.json").is_file():
        raise UserError(
            f"teacher folder {folder} has no model_index.json: pass a diffusers pipeline folder "
            "(one saved with StableDiffusionPipeline.save_pretrained)"
        )
    return str(folder)


def resolve_teacher(spec: str) -> str:
    """Turn a registry name, a local diffusers folder or a hub id `owner/name` into a loadable source."""
    spec = spec.strip()
    if spec == "toy":
        if not (TOY_TEACHER_DIR / "model_index.json").is_file():
            raise UserError(
                "the toy teacher is not in this install: train it with `emd-t2i toy train-teacher`"
            )
        return str(TOY_TEACHER_DIR)
    if spec in TEACHERS:
        return TEACHERS[spec].id
    path = Path(spec).expanduser()
    if path.exists():
        return _check_folder(path)
    if _HUB_ID.match(spec):
        return spec
    if "/" in spec or os.sep in spec or spec.startswith((".", "~")):
        raise UserError(f"teacher folder {spec} does not exist: check the path given to --teacher")
    raise UserError(
        f"unknown teacher {spec!r}: use one of {_registry_names()}, a local diffusers folder, "
        "or a hub id like owner/name"
    )


# ---------------------------------------------------------------------------------------------------------
# Reading configs (cheap json) before any weights, so unsupported teachers fail fast
# ---------------------------------------------------------------------------------------------------------


def _not_available(source: str, what: str, err: Exception) -> UserError:
    """A one-line message for a hub id or folder whose files cannot be read."""
    if Path(source).is_dir():
        return UserError(
            f"teacher folder {source} has no readable {what} ({type(err).__name__}): re-save it "
            "with StableDiffusionPipeline.save_pretrained"
        )
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if isinstance(err, GatedRepoError):
        return UserError(f"teacher {source} is gated: accept its licence on the hub and `hf auth login`")
    if isinstance(err, RepositoryNotFoundError):
        return UserError(f"teacher {source} was not found on the hub: check the id, or pass a local folder")
    return UserError(
        f"teacher {source} ({what}) is not in the local cache and offline: download it first with "
        f"`huggingface-cli download {source}` or pass a local folder"
    )


def _read_json(source: str, filename: str) -> dict:
    """A json file of the pipeline, from a folder or from the hub cache (downloaded if online)."""
    try:
        if Path(source).is_dir():
            path = Path(source) / filename
        else:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(source, filename))
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise _not_available(source, filename, err) from err


def is_sdxl_source(spec: str) -> bool:
    """Whether a teacher spec (name, folder or hub id) is an SDXL pipeline, from its model_index.json alone."""
    return _read_json(resolve_teacher(spec), "model_index.json").get("_class_name") == SDXL_PIPELINE


def _check_supported(source: str, model_index: dict, unet_config: dict, text_config: dict,
                     text_config_2: dict | None = None) -> None:
    kind = model_index.get("_class_name")
    if kind not in SUPPORTED_PIPELINES:
        raise UserError(
            f"teacher {source} is a {kind}, which is not supported: use a Stable Diffusion 1.x/2.x/XL "
            f"pipeline ({', '.join(SUPPORTED_PIPELINES)}), e.g. one of {_registry_names()}"
        )
    sdxl_unet = unet_config.get("addition_embed_type") == "text_time"
    if (kind == SDXL_PIPELINE) != sdxl_unet or (kind == SDXL_PIPELINE and not (model_index.get("text_encoder") or [None])[0]):
        raise UserError(
            f"teacher {source}: only the full SDXL base pipeline (two text encoders, a UNet conditioned on pooled "
            "text embeds and time ids) is supported, not a refiner or a UNet of another kind"
        )
    cross = unet_config.get("cross_attention_dim")
    if unet_config.get("_class_name") != "UNet2DConditionModel" or not isinstance(cross, int):
        raise UserError(
            f"teacher {source} has a UNet without text cross-attention: only text-conditioned "
            "UNet2DConditionModel teachers (SD 1.x/2.x) are supported"
        )
    hidden = text_config.get("hidden_size")
    if text_config_2 is not None:
        hidden += text_config_2.get("hidden_size", 0)
    elif sdxl_unet:
        return  # SDXL: checked again with text_encoder_2's config
    if hidden != cross:
        raise UserError(
            f"teacher {source}: the text encoder's hidden size {hidden} does not match the UNet's "
            f"cross_attention_dim {cross}: the folder mixes components of different models"
        )


# ---------------------------------------------------------------------------------------------------------
# The loaded teacher
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Teacher:
    """A frozen Stable Diffusion teacher: tokenizer, text encoder, UNet, optional VAE and its noise schedule."""

    name: str
    source: str
    tokenizer: object
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    vae: torch.nn.Module | None
    vae_config: dict
    scheduler: object
    alphas_cumprod: Tensor
    prediction_type: str
    tokenizer_2: object = None  # SDXL's second tokenizer and text encoder (None for SD 1.x / 2.x)
    text_encoder_2: torch.nn.Module | None = None
    force_zeros_for_empty_prompt: bool = False  # SDXL's null prompt: zero embeddings (model_index.json)

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    def conditioning_encoder(self) -> torch.nn.Module:
        """What turns prompts into the UNet's conditioning (embeddings.encode_prompts): the text encoder, or for
        SDXL both encoders with the pooled embedding and time ids (conditioning.DualTextEncoder)."""
        if not self.is_sdxl:
            return self.text_encoder
        from emd_t2i.models.conditioning import DualTextEncoder

        return DualTextEncoder(self.tokenizer, self.text_encoder, self.tokenizer_2, self.text_encoder_2,
                               self.resolution, self.force_zeros_for_empty_prompt)

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def latent_size(self) -> int:
        return int(self.unet.config.sample_size)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_config["block_out_channels"]) - 1)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae_config.get("scaling_factor", 0.18215))  # diffusers' AutoencoderKL default

    @property
    def resolution(self) -> int:
        return self.latent_size * self.vae_scale_factor

    @property
    def cross_attention_dim(self) -> int:
        return int(self.unet.config.cross_attention_dim)


def alphas_cumprod_from_config(config: dict) -> Tensor:
    """abar_t in float64 from a scheduler config (exact for SD's linear/scaled_linear; else via DDPM)."""
    n, start, end = config["num_train_timesteps"], config["beta_start"], config["beta_end"]
    schedule = config.get("beta_schedule", "linear")
    if config.get("trained_betas") is not None:
        betas = torch.tensor(config["trained_betas"], dtype=torch.float64)
    elif schedule == "scaled_linear" and not config.get("rescale_betas_zero_snr"):
        betas = torch.linspace(start**0.5, end**0.5, n, dtype=torch.float64) ** 2
    elif schedule == "linear" and not config.get("rescale_betas_zero_snr"):
        betas = torch.linspace(start, end, n, dtype=torch.float64)
    else:
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(config).alphas_cumprod.to(torch.float64)
    return torch.cumprod(1 - betas, dim=0)


def _load(source: str, what: str, loader, **kwargs):
    try:
        return loader(source, subfolder=what, **kwargs)
    except OSError as err:
        raise _not_available(source, f"{what}/", err) from err


def _freeze(module: torch.nn.Module, device: str | torch.device) -> torch.nn.Module:
    return module.to(device).requires_grad_(False).eval()


def _load_scheduler(source: str, config: dict):
    import diffusers

    cls = getattr(diffusers, config.get("_class_name", ""), diffusers.DDIMScheduler)
    return _load(source, "scheduler", cls.from_pretrained)


def load_teacher(
    spec: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    load_vae: bool = True,
) -> Teacher:
    """Load a frozen teacher, component by component (never the safety checker)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    source = resolve_teacher(spec)
    model_index = _read_json(source, "model_index.json")
    unet_config = _read_json(source, "unet/config.json")
    text_config = _read_json(source, "text_encoder/config.json")
    _check_supported(source, model_index, unet_config, text_config)
    sdxl = model_index.get("_class_name") == SDXL_PIPELINE
    if sdxl:  # the text widths again, with the second encoder's
        _check_supported(source, model_index, unet_config, text_config,
                         _read_json(source, "text_encoder_2/config.json"))
    scheduler_config = _read_json(source, "scheduler/scheduler_config.json")
    prediction_type = scheduler_config.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise UserError(
            f"teacher {source} predicts {prediction_type!r}: only {PREDICTION_TYPES} are supported"
        )
    vae_config = _read_json(source, "vae/config.json")

    tokenizer = _load(source, "tokenizer", CLIPTokenizer.from_pretrained)
    text_encoder = _load(source, "text_encoder", CLIPTextModel.from_pretrained, dtype=dtype)
    unet = _load(source, "unet", UNet2DConditionModel.from_pretrained, torch_dtype=dtype)
    vae = _load(source, "vae", AutoencoderKL.from_pretrained, torch_dtype=dtype) if load_vae else None
    extra = {}
    if sdxl:
        text_encoder_2 = _load(source, "text_encoder_2", CLIPTextModelWithProjection.from_pretrained, dtype=dtype)
        extra = {"tokenizer_2": _load(source, "tokenizer_2", CLIPTokenizer.from_pretrained),
                 "text_encoder_2": _freeze(text_encoder_2, device),
                 "force_zeros_for_empty_prompt": bool(model_index.get("force_zeros_for_empty_prompt", True))}
    return Teacher(
        name=spec,
        source=source,
        tokenizer=tokenizer,
        text_encoder=_freeze(text_encoder, device),
        unet=_freeze(unet, device),
        vae=_freeze(vae, device) if vae is not None else None,
        vae_config=vae_config,
        scheduler=_load_scheduler(source, scheduler_config),
        alphas_cumprod=alphas_cumprod_from_config(scheduler_config),
        prediction_type=prediction_type,
        **extra,
    )


def load_text_encoder(spec: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """(tokenizer, text encoder, resolved source) of a teacher, without its UNet or VAE."""
    from transformers import CLIPTextModel, CLIPTokenizer

    source = resolve_teacher(spec)
    if _read_json(source, "model_index.json").get("_class_name") == SDXL_PIPELINE:
        raise UserError(f"teacher {spec} is SDXL: a precomputed embedding store is SD 1.x/2.x only; distill without "
                        "--embeddings (SDXL embeddings are encoded on the fly and cached)")
    tokenizer = _load(source, "tokenizer", CLIPTokenizer.from_pretrained)
    text_encoder = _load(source, "text_encoder", CLIPTextModel.from_pretrained, dtype=dtype)
    return tokenizer, text_encoder.to(device).requires_grad_(False).eval(), source


def _toy_facts() -> tuple[int | None, str | None]:
    """Resolution and prediction type of the toy teacher, if it is installed."""
    try:
        unet = json.loads((TOY_TEACHER_DIR / "unet" / "config.json").read_text())
        vae = json.loads((TOY_TEACHER_DIR / "vae" / "config.json").read_text())
        sched = json.loads((TOY_TEACHER_DIR / "scheduler" / "scheduler_config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None, None
    size = unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1)
    return size, sched.get("prediction_type", "epsilon")


def teacher_table() -> list[dict]:
    """One row per registry entry, for `emd-t2i teachers`."""
    rows = []
    for e in TEACHERS.values():
        resolution, prediction = e.resolution, e.prediction_type
        installed = True
        if e.name == "toy":
            resolution, prediction = _toy_facts()
            installed = resolution is not None
        rows.append(
            {
                "name": e.name,
                "id": e.id,
                "resolution": resolution,
                "prediction_type": prediction,
                "description": e.description + ("" if installed else " [not installed]"),
                "licence": e.licence,
            }
        )
    return rows
