"""Stable Diffusion 1.5 with random weights from its published configs, saved as a pipeline folder (no download).

The configs are those of stable-diffusion-v1-5/stable-diffusion-v1-5 (unet/, text_encoder/, vae/, scheduler/);
the builder checks them by parameter count. `tiny=True` saves the tiny pipeline of tests/tiny.py instead, so the
scripts that use this run in seconds. Usage:

    python benchmarks/sd_random.py /tmp/sd15-random            # ~4.3 GB of float32 safetensors
    python benchmarks/sd_random.py /tmp/tiny-random --tiny
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# stable-diffusion-v1-5/stable-diffusion-v1-5, unet/config.json (diffusers 0.6.0 keys; the rest take defaults)
SD15_UNET_CONFIG = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
# text_encoder/config.json: the text tower of openai/clip-vit-large-patch14 (bos/eos/pad ids as that file has them)
SD15_TEXT_ENCODER_CONFIG = {
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "vocab_size": 49408,
}
# vae/config.json (no scaling_factor key: diffusers' default 0.18215 is SD1.5's)
SD15_VAE_CONFIG = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
# scheduler/scheduler_config.json (PNDM ignores clip_sample; the file carries it)
SD15_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
# Parameter counts of the published checkpoints: the check that the configs above are the real ones.
SD15_PARAMETERS = {"unet": 859_520_964, "text_encoder": 123_060_480, "vae": 83_653_863}
STAMP = "sd_random.json"  # what was built, so a folder is reused only for the same request


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def tiny_module():
    """tests/tiny.py, imported by path (it is not part of the package)."""
    spec = importlib.util.spec_from_file_location("_emd_tests_tiny", ROOT / "tests" / "tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_sd15(*, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> dict:
    """SD1.5's UNet, text encoder, VAE (random, seeded, built on `device`, cast to `dtype`), tokenizer, scheduler."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from tools.tokenizer import clip_tokenizer

    components = {}
    with torch.device(device):  # initialised where they will run: on a GPU in seconds
        torch.manual_seed(seed)
        components["unet"] = UNet2DConditionModel(**SD15_UNET_CONFIG)
        torch.manual_seed(seed + 1)
        components["text_encoder"] = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_ENCODER_CONFIG))
        torch.manual_seed(seed + 2)
        components["vae"] = AutoencoderKL(**SD15_VAE_CONFIG)
    for name, expected in SD15_PARAMETERS.items():
        found = parameter_count(components[name])
        assert found == expected, f"SD1.5 {name}: {found:,} parameters, the published model has {expected:,}"
        if dtype != torch.float32:  # (diffusers warns about any dtype cast, even a no-op)
            components[name] = components[name].to(dtype)
        components[name].eval()
    components["tokenizer"] = clip_tokenizer()
    components["scheduler"] = PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    return components


def _stamp(tiny: bool, seed: int, dtype: torch.dtype) -> dict:
    return {"model": "tiny" if tiny else "sd15", "seed": seed, "dtype": str(dtype).removeprefix("torch.")}


def save_random_sd(path: str | Path, *, tiny: bool = False, seed: int = 0, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu", rebuild: bool = False) -> Path:
    """Save a random-weight SD1.5 (or tiny) StableDiffusionPipeline folder at `path` and return it.

    A folder already built with the same (tiny, seed, dtype) is reused (an SD1.5 build writes ~4.3 GB in float32);
    otherwise it is built in a hidden sibling and renamed into place. `tiny` is always float32.
    """
    from diffusers import StableDiffusionPipeline

    path = Path(path)
    want = _stamp(tiny, seed, torch.float32 if tiny else dtype)
    stamp = path / STAMP
    if not rebuild and stamp.is_file() and json.loads(stamp.read_text()) == want:
        return path
    tmp = path.with_name(f".tmp-{path.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    if tiny:
        tiny_module().make_tiny_pipeline(tmp, seed=seed)
    else:
        parts = build_sd15(device=device, dtype=dtype, seed=seed)
        parts.update({k: parts[k].to("cpu") for k in ("unet", "text_encoder", "vae")})
        pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        pipe.save_pretrained(tmp, safe_serialization=True)
        del pipe, parts
    (tmp / STAMP).write_text(json.dumps(want) + "\n")
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="pipeline folder to write")
    parser.add_argument("--tiny", action="store_true", help="the tiny pipeline of tests/tiny.py instead")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--device", default="cpu", help="where the weights are initialised (cuda is faster)")
    parser.add_argument("--rebuild", action="store_true", help="rebuild even if the folder matches")
    args = parser.parse_args()
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    start = time.perf_counter()
    path = save_random_sd(args.path, tiny=args.tiny, seed=args.seed, dtype=dtype, device=args.device,
                          rebuild=args.rebuild)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    print(f"{path}: {size / 1e9:.2f} GB on disk, {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
