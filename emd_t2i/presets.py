"""Per-teacher defaults (presets), each value with its reason, and which preset a teacher name, id or folder gets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# LoRA targets of the plain defaults; config.py re-exports them (here so that this module imports nothing of ours).
DEFAULT_TARGET_MODULES = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "time_emb_proj",
)
# The toy sweep's IO-layer finding (below): LoRA also on conv_in, conv_out, the samplers' convs, the time embedding.
IO_TARGET_MODULES = DEFAULT_TARGET_MODULES + ("conv_in", "conv_out", "conv", "linear_1", "linear_2")

# Defaults per teacher, applied under the flags a user gave. Numbers for `toy` come from docs/BENCHMARKS.md
# ("Sweep"): rank 64 and 5 fake-score updates per generator update were the largest gains, a faster fake score
# (lr 1e-3) helped; t* = 800 beat 999, 900, 700, 600 and 500 (G1 amplifies the generator's eps error by
# sigma/alpha: 14.6 at t* = 999, 5.1 at 800). Within the 15-minute CPU quickstart, accuracy grows with the number
# of generator updates: gamma_z = 0 (no generator VJPs in the E-step) and K = 2 make an iteration ~30% cheaper,
# which buys 600 iterations, and a cosine decay from generator lr 2e-3 gets the most out of them: 0.929 / 0.66
# (accuracy / diversity) vs 0.863 / 0.63 for 400 constant-lr iterations at K = 4, gamma_z = 0.03. Guidance trades
# one for the other: w = 3 / 2.5 / 2 gave accuracy 0.929 / 0.917 / 0.900 and diversity (3 prompts x 192) 0.683 /
# 0.734 / 0.791; 2.25 sits between the bars of issue 5 (accuracy >= 0.913, diversity >= 0.756). Cheaper iterations
# (fewer fake updates, rank 32), more fake updates, the z-chain at K = 2 and a faster fake score did not move the
# students off that trade by more than run-to-run noise (BENCHMARKS.md, "Sweep", the q_* points). LoRA also on
# conv_in, conv_out, the samplers' convs and the time embedding did: 0.949 accuracy at w = 2.25, and w = 1.75 turns
# that headroom into diversity (0.951 / 0.789 in the sweep). Every sweep point ran in fp32, so the toy pins
# mixed_precision "no" (it was the global default then) rather than follow "auto" into bf16 on a GPU.
# Issue 17 (BENCHMARKS.md, "DMD vs EMD at equal wall-clock", on the partial-caption teacher): chains with the snr z
# step (K = 2, 4, 8) covered the teacher's modes better but lost 7-13 points of full-prompt accuracy at the same
# wall-clock; this eps-only chain kept the accuracy, so it stays the toy's EMD setting.
TOY = {
    "iterations": 600, "batch_size": 32, "generator_lr": 2e-3, "fake_lr": 1e-3, "lr_schedule": "cosine",
    "generator_rank": 64, "fake_rank": 64, "fake_updates": 5, "ema_decay": 0.99, "guidance_scale": 1.75,
    "target_modules": IO_TARGET_MODULES,
    "t_star": 800, "gamma_z": 0.0, "num_langevin_steps": 2,
    "log_every": 10, "validate_every": 100, "checkpoint_every": 50, "num_validation_prompts": 8,
    "mixed_precision": "no",
}

# Stable Diffusion 1.5 at 512 px (64x64 latents, eps-prediction). NONE of these values has been measured at SD
# scale yet (no GPU was available when they were chosen): each line says where it comes from, and the first SD
# runs should check them (docs/BENCHMARKS.md will carry the measured figures).
SD15 = {
    # The toy sweep's largest single gain (800 beat 999 / 900 / 700). (G1) multiplies the generator's eps error by
    # sigma/alpha, which on SD's scaled_linear schedule (beta 0.00085..0.012) is 14.61 at t = 999, 8.35 at 900,
    # 5.11 at 800, 3.33 at 700; SiD-LSG starts SD generators at 625, DMD2 at 999.
    "t_star": 800,
    # The toy's IO-layer finding: LoRA also on conv_in / conv_out / samplers / time embedding lifted its accuracy
    # at w = 2.25 from about 0.90 to 0.949 (BENCHMARKS.md, q_io*).
    "target_modules": IO_TARGET_MODULES,
    # Toy sweep (5 was one of its largest gains, 8 gained nothing); DMD2 uses a fake/generator update ratio of 5
    # (SDXL, ImageNet) to 10 (SD1.5).
    "fake_updates": 5,
    # An EMA over thousands of iterations; the toy's 0.99 averages over ~100, right for its 600.
    "ema_decay": 0.999,
    # Cosine decay helped the toy; the warmup keeps a fresh fake score from steering the first updates. Both and
    # the length are guesses at the usual LoRA-distillation scale, not measurements.
    "lr_schedule": "cosine", "lr_warmup": 500, "iterations": 20000,
    # LoRA rates an order below the toy's (a 860M-parameter UNet, not a tiny one), keeping the toy's finding that a
    # faster fake score than generator helps.
    "generator_lr": 5e-5, "fake_lr": 1e-4,
    # The toy sweep's rank (64 over 16 was one of its largest gains).
    "generator_rank": 64, "fake_rank": 64,
    # DMD2's SD1.5 guidance; DMD and the EMD paper used about 3, and the toy found that lower guidance traded
    # accuracy for diversity well. 1.75 to 3 is the range worth sweeping.
    "guidance_scale": 1.75,
    # The oracle's defaults (docs/ALGORITHM.md: within 1% of the maximum-likelihood fit); the paper's t2i model
    # used K = 8 at twice the E-step cost.
    "num_langevin_steps": 4, "gamma_eps": 0.5, "gamma_z": 0.03, "cancel_initial_noise": True,
    # One 24 GB GPU: one UNet serves teacher, generator and fake score; bf16 on CUDA (DMD2's choice) and
    # checkpointing are meant to keep the activations of a batch of 4 within it (measured figures: BENCHMARKS.md).
    "batch_size": 4, "mixed_precision": "auto", "gradient_checkpointing": True,
    # The plain default clip; a checkpoint and a grid 40 times over the run, a log line often enough for a plot.
    "max_grad_norm": 1.0, "checkpoint_every": 500, "validate_every": 500, "log_every": 10, "keep_checkpoints": 2,
    "num_validation_prompts": 8,
}

# Stable Diffusion 2.1 base: the same as SD1.5, for lack of a reason to differ. It has the same 64x64 latents,
# eps-prediction, schedule and UNet widths; only the text encoder (OpenCLIP ViT-H, 1024 hidden) and the attention
# layout change, and nothing here depends on them.
SD21_BASE = dict(SD15)

# Stable Diffusion 2.1 at 768 px (96x96 latents, v-prediction): SD 2.1 base's values, since the UNet, text encoder
# and schedule are the same and every role speaks eps whatever the UNet predicts (roles.EpsModel; the v <-> eps
# equivalence of the EMD gradient is tests/test_vpred.py). Only the batch halves: a 96x96 latent row holds 2.25 times
# the activations of a 64x64 one, so batch 2 is what keeps SD1.5's batch-4 memory budget.
SD21 = {**SD21_BASE, "batch_size": 2}

# Stable Diffusion XL base 1.0 at 1024 px (128x128 latents, 2.6B-parameter UNet, eps-prediction). Not measured at
# size yet; each value says where it comes from.
SDXL = {
    **SD15,
    # DMD2's one-step SDXL run (model zoo: sdxl_cond399_8node_lr5e-7_1step_diffusion1000_gan5e-3_guidance8) feeds
    # the generator pure noise at timestep 399: from 999, one-step SDXL generators showed noise artifacts (DMD2
    # paper; DMDR's SDXL notes repeat it). Its 4-step runs condition at 999. (G1) amplifies eps errors by only
    # sigma/alpha = 1.16 at 399 on SD's schedule (14.6 at 999).
    "t_star": 399,
    # DMD2's SDXL runs all distil with real guidance 8 (the "guidance8" in every SDXL config name of its model zoo).
    "guidance_scale": 8.0,
    # DMD2's SDXL LoRA run (..._lora) trains its LoRA at 5e-5; the fake score keeps the toy's finding that a faster
    # fake score helps. DMD2's SDXL fake/generator update ratio is 5 (as SD15's preset already has).
    "generator_lr": 5e-5, "fake_lr": 1e-4, "fake_updates": 5,
    # One 80 GB GPU: one UNet (5.1 GB in bf16) serves all three roles; bf16 and checkpointing keep a batch of 2 at
    # 1024 px within it (the goal; benchmarks/gpu_check.py is to report the peak). DMD2 needed two GPUs
    # with FSDP for its three UNets.
    "batch_size": 2, "mixed_precision": "auto", "gradient_checkpointing": True,
}

PRESETS: dict[str, dict[str, Any]] = {"toy": TOY, "sd-1.5": SD15, "sd-2.1-base": SD21_BASE, "sd-2.1": SD21,
                                      "sdxl": SDXL}

# UNet config facts -> preset: (cross_attention_dim, block_out_channels, sample_size, prediction_type).
_ARCHITECTURES = {
    (768, (320, 640, 1280, 1280), 64, "epsilon"): "sd-1.5",  # CLIP ViT-L text encoder
    (1024, (320, 640, 1280, 1280), 64, "epsilon"): "sd-2.1-base",  # OpenCLIP ViT-H text encoder
    (1024, (320, 640, 1280, 1280), 96, "v_prediction"): "sd-2.1",  # the same at 768 px, predicting v
    (2048, (320, 640, 1280), 128, "epsilon"): "sdxl",  # CLIP ViT-L + OpenCLIP ViT-bigG text encoders
}


def preset_name(teacher: str) -> str | None:
    """The preset of a --teacher: a preset name, a registry hub id, or a folder whose configs match a known model."""
    teacher = teacher.strip()
    if teacher in PRESETS:
        return teacher
    from .teachers import TEACHERS, TOY_TEACHER_DIR  # imports torch: only when the name alone does not tell

    path = Path(teacher).expanduser()
    if path.is_dir():
        return "toy" if path.resolve() == TOY_TEACHER_DIR else architecture_preset(path)
    return next((e.name for e in TEACHERS.values() if e.id == teacher and e.name in PRESETS), None)


def architecture_preset(folder: Path) -> str | None:
    """The preset whose architecture a diffusers folder has (read from its JSON configs only), or None."""
    try:
        if not (folder / "model_index.json").is_file():
            return None
        unet = json.loads((folder / "unet" / "config.json").read_text())
        scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None  # load_teacher says what is wrong with the folder; a preset is only a default
    if unet.get("_class_name") != "UNet2DConditionModel" or unet.get("in_channels") != 4:
        return None  # not a text-to-image SD UNet (e.g. inpainting's 9 input channels)
    key = (unet.get("cross_attention_dim"), tuple(unet.get("block_out_channels") or ()), unet.get("sample_size"),
           scheduler.get("prediction_type", "epsilon"))
    return _ARCHITECTURES.get(key)
