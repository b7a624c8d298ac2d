"""Tiny Stable-Diffusion-shaped pipelines built in code (like diffusers' own tests), for offline tests."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from tools.tokenizer import CLIP_MAX_LENGTH, CLIP_VOCAB_SIZE, clip_tokenizer

TINY_HIDDEN = 32  # text hidden size = UNet cross_attention_dim
TINY_LATENT_SIZE = 8
TINY_IMAGE_SIZE = 16  # VAE with 2 blocks: scale factor 2 ** (2 - 1) = 2


def tiny_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=TINY_LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TINY_HIDDEN,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def randomize_lora(unet, rng: torch.Generator, scale: float) -> None:
    """Both LoRA factors of every adapter to scale * N(0, 1) from `rng` (B = 0 at init would make every role the
    teacher and hide bugs that tell them apart)."""
    for name, param in unet.named_parameters():
        if "lora_" in name:
            param.data = scale * torch.randn(param.shape, generator=rng)


def tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=TINY_IMAGE_SIZE,
    )


def tiny_text_encoder() -> CLIPTextModel:
    config = CLIPTextConfig(
        hidden_size=TINY_HIDDEN,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=CLIP_VOCAB_SIZE,
        max_position_embeddings=CLIP_MAX_LENGTH,
        layer_norm_eps=1e-5,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return CLIPTextModel(config).eval()


def sd_scheduler(prediction_type: str = "epsilon") -> PNDMScheduler:
    """The scheduler config Stable Diffusion ships (scaled_linear 0.00085..0.012, 1000 steps)."""
    return PNDMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        set_alpha_to_one=False,
        skip_prk_steps=True,
        prediction_type=prediction_type,
    )


def make_tiny_pipeline(path: str | Path, *, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """Build a seeded tiny SD pipeline and save it as a diffusers folder at `path`; returns the folder."""
    path = Path(path)
    torch.manual_seed(seed)
    unet = tiny_unet()
    torch.manual_seed(seed + 1)
    vae = tiny_vae()
    torch.manual_seed(seed + 2)
    text_encoder = tiny_text_encoder()
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        unet=unet,
        scheduler=sd_scheduler(prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path


# ---------------------------------------------------------------------------------------------------------
# A tiny SDXL-shaped pipeline: two text encoders (hidden 32 each, concatenated 64 = cross_attention_dim), the
# second with a 32-wide projection (the pooled embedding), a UNet conditioned on pooled embeds and time ids
# (diffusers' own tiny SDXL test config).
# ---------------------------------------------------------------------------------------------------------
TINY_SDXL_POOLED = 32
TINY_SDXL_TIME_EMBED = 8


def tiny_sdxl_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=TINY_LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TINY_SDXL_TIME_EMBED,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * TINY_SDXL_TIME_EMBED + TINY_SDXL_POOLED,
        cross_attention_dim=2 * TINY_HIDDEN,
        norm_num_groups=8,
    )


def make_tiny_sdxl_pipeline(path: str | Path, *, seed: int = 0, force_zeros_for_empty_prompt: bool = True) -> Path:
    """Build a seeded tiny SDXL pipeline (StableDiffusionXLPipeline folder) at `path`; returns the folder."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModelWithProjection

    path = Path(path)
    torch.manual_seed(seed)
    unet = tiny_sdxl_unet()
    torch.manual_seed(seed + 1)
    vae = tiny_vae()
    torch.manual_seed(seed + 2)
    text_encoder = tiny_text_encoder()
    torch.manual_seed(seed + 3)
    config = tiny_text_encoder().config
    config.projection_dim = TINY_SDXL_POOLED
    text_encoder_2 = CLIPTextModelWithProjection(config).eval()
    scheduler = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(), unet=unet, scheduler=scheduler,
        force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path
