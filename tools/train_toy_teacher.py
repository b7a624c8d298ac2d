"""The toy teacher's training recipe: AutoencoderKL, then a tiny CLIP text encoder + UNet, saved as a diffusers pipeline."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from emd_t2i.files import atomic_output, follow_umask
from emd_t2i.schedule import alpha_sigma, forward_noise, sd_alphas_cumprod
from emd_t2i.toy import domain
from emd_t2i.training.optim import ema_decay_at, update_ema
from tools.tokenizer import CLIP_MAX_LENGTH, CLIP_VOCAB_SIZE, clip_tokenizer

NULL_PROMPT = ""  # the unconditional prompt of classifier-free guidance, as Stable Diffusion pipelines use it


@dataclass(frozen=True)
class TeacherRecipe:
    """Every knob of the recipe; written beside the checkpoints and into the exported pipeline."""

    seed: int = 0
    num_images: int = 50_000  # the fixed training set, encoded to latents once
    vae_steps: int = 1_200
    vae_batch_size: int = 64
    vae_lr: float = 1e-3
    kl_weight: float = 1e-4  # on the per-sample KL divided by the number of pixels, beside a per-pixel MSE
    unet_steps: int = 100_000
    batch_size: int = 128
    lr: float = 6e-4
    warmup_steps: int = 500
    ema_decay: float = 0.999
    caption_dropout: float = 0.1  # share of captions replaced by the null prompt (classifier-free guidance)
    attribute_dropout: float = 0.0  # chance that a caption leaves out each attribute, independently (partial captions)
    init_from: str | None = None  # a teacher folder to fine-tune (its VAE is kept; no VAE phase)
    min_snr_gamma: float = 5.0  # Min-SNR loss weighting (Hang et al. 2023): faster convergence
    text_hidden_size: int = 64
    text_layers: int = 2
    unet_channels: tuple[int, ...] = (32, 64)
    vae_channels: tuple[int, ...] = (16, 32, 64)


def build_vae(recipe: TeacherRecipe) -> AutoencoderKL:
    """A small AutoencoderKL: 3 levels, so 32x32 images become 4x8x8 latents."""
    levels = len(recipe.vae_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
                         up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=recipe.vae_channels,
                         layers_per_block=1, latent_channels=4, norm_num_groups=min(recipe.vae_channels),
                         sample_size=domain.IMAGE_SIZE)


def build_text_encoder(recipe: TeacherRecipe) -> CLIPTextModel:
    """A tiny CLIP text transformer over the real CLIP vocabulary and context length."""
    config = CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_size=recipe.text_hidden_size,
        intermediate_size=4 * recipe.text_hidden_size,
        num_hidden_layers=recipe.text_layers,
        num_attention_heads=4,
        bos_token_id=CLIP_VOCAB_SIZE - 2,
        eos_token_id=CLIP_VOCAB_SIZE - 1,
        pad_token_id=CLIP_VOCAB_SIZE - 1,
    )
    return CLIPTextModel(config)


def build_unet(recipe: TeacherRecipe, latent_size: int) -> UNet2DConditionModel:
    """A small UNet; cross-attention only below the top level, where it costs little (see docs/TOY_TEACHER.md)."""
    levels = len(recipe.unet_channels)
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1)
    up = ("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",)
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=4,
        out_channels=4,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=recipe.unet_channels,
        layers_per_block=1,
        cross_attention_dim=recipe.text_hidden_size,
        attention_head_dim=4,
        norm_num_groups=min(recipe.unet_channels),
    )


def sd_scheduler() -> DDIMScheduler:
    """DDIM with Stable Diffusion's betas (scaled_linear, 0.00085..0.012, 1000 steps, epsilon prediction)."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


# ----------------------------------------------------------------------------- checkpoints and export


def save_atomic(obj, path: Path) -> None:
    """torch.save through the project's atomic writer: a killed process never leaves a half-written checkpoint."""
    with atomic_output(path) as f:
        torch.save(obj, f)


def export_pipeline(vae, text_encoder, unet, output_dir: Path, meta: dict) -> None:
    """Write a StableDiffusionPipeline folder (safetensors) to a temp folder, then swap it into place."""
    output_dir = Path(output_dir)
    tmp, old = output_dir.with_name(output_dir.name + ".tmp"), output_dir.with_name(output_dir.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet,
                                   scheduler=sd_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(tmp, safe_serialization=True)
    follow_umask(tmp)
    (tmp / "toy_teacher.json").write_text(json.dumps(meta, indent=2))
    shutil.rmtree(old, ignore_errors=True)
    if output_dir.exists():
        os.replace(output_dir, old)
    os.replace(tmp, output_dir)
    shutil.rmtree(old, ignore_errors=True)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ----------------------------------------------------------------------------- phase 1: the autoencoder


def vae_loss(vae: AutoencoderKL, images: torch.Tensor, kl_weight: float, generator) -> torch.Tensor:
    """Per-pixel MSE + L1 of the reconstruction, plus a light KL to keep the latent space smooth."""
    posterior = vae.encode(images).latent_dist
    recon = vae.decode(posterior.sample(generator)).sample
    kl = posterior.kl().mean() / images[0].numel()
    return F.mse_loss(recon, images) + F.l1_loss(recon, images) + kl_weight * kl


def train_vae(recipe: TeacherRecipe, ckpt_dir: Path, checkpoint_every_s: float) -> AutoencoderKL:
    """Train (or resume) the autoencoder on freshly rendered images; return it once vae_steps are done.

    Once the latents are encoded the VAE is frozen for good: a different --vae-steps then changes nothing.
    """
    path = ckpt_dir / "vae.pt"
    if (ckpt_dir / "latents.pt").exists():
        recipe = TeacherRecipe(**{**asdict(recipe), "vae_steps": 0})
    vae = build_vae(recipe)
    opt = torch.optim.Adam(vae.parameters(), lr=recipe.vae_lr)
    step = 0
    if path.exists():
        state = torch.load(path, weights_only=False)
        vae.load_state_dict(state["vae"]), opt.load_state_dict(state["opt"])
        step = state["step"]
    last_save, t0, t0_step, running = time.time(), time.time(), step, None
    while step < recipe.vae_steps:
        # Per-step seeding from (seed, step): resuming replays exactly the data it would have seen.
        gen = torch.Generator().manual_seed(recipe.seed * 1_000_003 + step)
        images = domain.render(
            domain.sample_attributes(recipe.vae_batch_size, seed=10**9 + recipe.seed * 10**6 + step)
        )
        lr = recipe.vae_lr * 0.5 * (1 + np.cos(np.pi * step / recipe.vae_steps))
        for group in opt.param_groups:
            group["lr"] = lr
        loss = vae_loss(vae, images, recipe.kl_weight, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 50 == 0:
            log(
                f"vae step {step}/{recipe.vae_steps} loss {running:.4f} ({(time.time() - t0) / (step - t0_step):.2f} s/step)"
            )
            t0, t0_step = time.time(), step
        if time.time() - last_save > checkpoint_every_s or step == recipe.vae_steps:
            save_atomic({"vae": vae.state_dict(), "opt": opt.state_dict(), "step": step}, path)
            last_save = time.time()
    return vae.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- phase 2: latents, once


@torch.no_grad()
def encode_dataset(vae: AutoencoderKL, recipe: TeacherRecipe, ckpt_dir: Path) -> dict:
    """Encode the fixed training set once: posterior mean/std per image, attributes, and the latent scale."""
    path = ckpt_dir / "latents.pt"
    if path.exists():
        return torch.load(path, weights_only=False)
    images, attrs, _ = domain.make_dataset(recipe.num_images, seed=recipe.seed)
    means, stds = [], []
    for chunk in images.split(500):
        dist = vae.encode(chunk).latent_dist
        means.append(dist.mean), stds.append(dist.std)
    mean, std = torch.cat(means), torch.cat(stds)
    sample = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(recipe.seed))
    data = {
        "mean": mean,
        "std": std,
        "combo": torch.from_numpy(np.stack([attrs.shape, attrs.colour, attrs.background], 1)),
        "scaling_factor": float(1.0 / sample.std()),
        "recon_mse": float(F.mse_loss(vae.decode(mean[:500]).sample, images[:500])),
    }
    save_atomic(data, path)
    return data


# ----------------------------------------------------------------------------- phase 3: text encoder + UNet


def caption_table(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of every domain caption, full and partial, plus the null prompt (last row), and an index
    (shape, colour, background, phrasing) -> row in which the last class of each attribute means "left out"."""
    texts = list(dict.fromkeys(domain.all_captions() + domain.partial_captions())) + [NULL_PROMPT]
    tokens = tokenizer(
        texts, padding="max_length", max_length=CLIP_MAX_LENGTH, truncation=True, return_tensors="pt"
    )
    position = {text: i for i, text in enumerate(texts)}
    dims = (len(domain.SHAPES) + 1, len(domain.COLOURS) + 1, len(domain.BACKGROUNDS) + 1, len(domain.PHRASINGS))
    named = [len(domain.SHAPES), len(domain.COLOURS), len(domain.BACKGROUNDS)]
    index = torch.tensor([
        position[domain.caption(*(None if k == n else k for k, n in zip(key[:3], named)), key[3])]
        for key in np.ndindex(*dims)
    ]).reshape(dims)
    return tokens.input_ids, index


def min_snr_weight(alpha_t: torch.Tensor, sigma_t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma weight for an epsilon-prediction loss: min(SNR, gamma) / SNR."""
    snr = (alpha_t / sigma_t) ** 2
    return snr.clamp(max=gamma) / snr


def diffusion_loss(
    batch: dict, text_encoder, unet, alphas_cumprod, recipe: TeacherRecipe, gen
) -> torch.Tensor:
    """(N1) noise the latents at a uniform t, predict eps with the caption (dropped to null at rate p), Min-SNR MSE."""
    z0 = batch["latents"]
    t = torch.randint(0, len(alphas_cumprod), (len(z0),), generator=gen)
    eps = torch.randn(z0.shape, generator=gen)
    alpha_t, sigma_t = alpha_sigma(alphas_cumprod, t, z0)
    hidden = text_encoder(batch["tokens"]).last_hidden_state
    eps_hat = unet(forward_noise(z0, eps, alpha_t, sigma_t), t, hidden).sample
    weight = min_snr_weight(alpha_t, sigma_t, recipe.min_snr_gamma).flatten()
    return (weight * (eps_hat - eps).square().mean(dim=(1, 2, 3))).mean()


def draw_batch(data: dict, tokens, index, recipe: TeacherRecipe, gen) -> dict:
    """A batch of latents sampled from their posteriors, with captions of random phrasing, attributes left out at
    rate attribute_dropout, and dropout to the null prompt."""
    n = len(data["mean"])
    i = torch.randint(0, n, (recipe.batch_size,), generator=gen)
    phrasing = torch.randint(0, index.shape[-1], (recipe.batch_size,), generator=gen)
    combo = data["combo"][i].clone()
    left_out = torch.rand(combo.shape, generator=gen) < recipe.attribute_dropout
    combo[left_out] = torch.tensor(index.shape[:3]).sub(1).expand_as(combo)[left_out]
    caption = index[combo[:, 0], combo[:, 1], combo[:, 2], phrasing]
    dropped = torch.rand(recipe.batch_size, generator=gen) < recipe.caption_dropout
    caption = torch.where(dropped, torch.full_like(caption, len(tokens) - 1), caption)
    noise = torch.randn(data["mean"][i].shape, generator=gen)
    latents = (data["mean"][i] + data["std"][i] * noise) * data["scaling_factor"]
    return {"latents": latents, "tokens": tokens[caption]}


def train_teacher(
    output_dir: str | Path,
    ckpt_dir: str | Path,
    recipe: TeacherRecipe = TeacherRecipe(),
    checkpoint_every_s: float = 180.0,
    export_every_s: float = 600.0,
    export_only: bool = False,
) -> Path:
    """Run (or resume) the whole recipe; export the EMA teacher to `output_dir` periodically and at the end."""
    ckpt_dir, output_dir = Path(ckpt_dir), Path(output_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    (ckpt_dir / "recipe.json").write_text(json.dumps(asdict(recipe), indent=2))
    torch.manual_seed(recipe.seed)
    init = Path(recipe.init_from) if recipe.init_from else None
    if init is not None:  # fine-tune: the teacher's VAE and latent scale stay as they are
        loaded = AutoencoderKL.from_pretrained(init / "vae")
        vae = build_vae(recipe).eval().requires_grad_(False)
        vae.load_state_dict(loaded.state_dict()), vae.register_to_config(scaling_factor=loaded.config.scaling_factor)
        data = {**encode_dataset(vae, recipe, ckpt_dir), "scaling_factor": vae.config.scaling_factor}
    else:
        vae = train_vae(recipe, ckpt_dir, checkpoint_every_s)
        data = encode_dataset(vae, recipe, ckpt_dir)
        vae.register_to_config(scaling_factor=data["scaling_factor"])
    log(f"latents: scaling_factor {data['scaling_factor']:.4f}, VAE recon MSE {data['recon_mse']:.5f}")

    latent_size = data["mean"].shape[-1]
    text_encoder, unet = build_text_encoder(recipe), build_unet(recipe, latent_size)
    ema_text, ema_unet = build_text_encoder(recipe), build_unet(recipe, latent_size)
    if init is not None:
        for module in (text_encoder, ema_text):
            module.load_state_dict(CLIPTextModel.from_pretrained(init / "text_encoder").state_dict())
        for module in (unet, ema_unet):
            module.load_state_dict(UNet2DConditionModel.from_pretrained(init / "unet").state_dict())
    params = list(text_encoder.parameters()) + list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    path, step = ckpt_dir / "unet.pt", 0
    if path.exists():
        state = torch.load(path, weights_only=False)
        for name, module in [
            ("text", text_encoder),
            ("unet", unet),
            ("ema_text", ema_text),
            ("ema_unet", ema_unet),
        ]:
            module.load_state_dict(state[name])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        log(f"resumed at step {step}")
    elif init is None:
        ema_text.load_state_dict(text_encoder.state_dict()), ema_unet.load_state_dict(unet.state_dict())

    def export() -> None:
        meta = {"step": step, "recipe": asdict(recipe), "recon_mse": data["recon_mse"],
                "initialised_from": json.loads((init / "toy_teacher.json").read_text()) if init else None}
        export_pipeline(vae, ema_text, ema_unet, output_dir, meta)
        log(f"exported the EMA teacher at step {step} to {output_dir}")

    def checkpoint() -> None:
        modules = {"text": text_encoder, "unet": unet, "ema_text": ema_text, "ema_unet": ema_unet}
        save_atomic(
            {**{k: m.state_dict() for k, m in modules.items()}, "opt": opt.state_dict(), "step": step}, path
        )

    if export_only:
        export()
        return output_dir
    tokens, index = caption_table(clip_tokenizer())
    alphas_cumprod = sd_alphas_cumprod()
    last_save = last_export = t0 = time.time()
    t0_step = step
    running = None
    while step < recipe.unet_steps:
        gen = torch.Generator().manual_seed(recipe.seed * 1_000_003 + 10**7 + step)
        for group in opt.param_groups:
            group["lr"] = recipe.lr * min(1.0, (step + 1) / recipe.warmup_steps)
        loss = diffusion_loss(
            draw_batch(data, tokens, index, recipe, gen), text_encoder, unet, alphas_cumprod, recipe, gen
        )
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite loss at step {step}; resume from the last checkpoint with a lower lr"
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        decay = recipe.ema_decay if init is not None else ema_decay_at(recipe.ema_decay, step)
        update_ema(ema_text.parameters(), text_encoder.parameters(), decay)
        update_ema(ema_unet.parameters(), unet.parameters(), decay)
        running = loss.item() if running is None else 0.99 * running + 0.01 * loss.item()
        if step % 100 == 0:
            log(
                f"unet step {step}/{recipe.unet_steps} loss {running:.4f} ({(time.time() - t0) / (step - t0_step):.3f} s/step)"
            )
            t0, t0_step = time.time(), step
        if time.time() - last_save > checkpoint_every_s:
            checkpoint()
            last_save = time.time()
        if time.time() - last_export > export_every_s:
            export()
            last_export = time.time()
    checkpoint()
    export()
    return output_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", required=True, help="pipeline folder to write (replaced atomically)")
    parser.add_argument("--checkpoints", required=True, help="folder for resumable checkpoints (outside git)")
    knobs = {f.name: {"int": int, "float": float, "str | None": str}[f.type] for f in fields(TeacherRecipe)
             if f.type in ("int", "float", "str | None")}  # every scalar knob of the recipe, as --knob-name
    for name, kind in knobs.items():
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=getattr(TeacherRecipe, name))
    parser.add_argument("--checkpoint-every-min", type=float, default=3.0)
    parser.add_argument("--export-every-min", type=float, default=10.0)
    parser.add_argument("--export-only", action="store_true", help="re-export the pipeline from the last checkpoint")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is faster on a busy machine)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = TeacherRecipe(**{name: getattr(args, name) for name in knobs})
    train_teacher(args.output, args.checkpoints, recipe, 60 * args.checkpoint_every_min,
                  60 * args.export_every_min, args.export_only)


if __name__ == "__main__":
    main()
