"""Per-teacher defaults (presets), each value with its reason, and which preset a teacher name, id or folder gets."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# LoRA targets of the plain defaults; config.py re-exports them (here so that this module imports nothing of ours).
DEFAULT_TARGET_MODULES = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "time_emb_proj",
)
# LoRA also on conv_in, conv_out, the samplers' convs and the time embedding (the toy sweep's q_io* points).
IO_TARGET_MODULES = DEFAULT_TARGET_MODULES + ("conv_in", "conv_out", "conv", "linear_1", "linear_2")

# Each preset is a table: flag -> Choice(value, why, where it was measured). "B:" names a section of
# docs/BENCHMARKS.md, "A:" one of docs/ALGORITHM.md; "not measured" says the value is carried over or a guess, and
# where it came from. A user's flags override a preset; `--dry-run` prints what a run will use.
@dataclass(frozen=True)
class Choice:
    value: Any
    why: str
    measured: str


TOY_TABLE = {
    "prompts": Choice("toy", "the toy teacher's 300 full and partial captions: where a student shows both prompt "
                      "accuracy and whether it covers the modes an under-specified caption leaves open",
                      "B: DMD vs EMD at equal iterations"),
    "iterations": Choice(600, "what fits the 15-minute quickstart on 2 CPU cores", "B: Toy quickstart time"),
    "batch_size": Choice(32, "the sweep's batch", "B: Sweep"),
    "generator_lr": Choice(2e-3, "with the cosine decay, the most accuracy in 600 iterations", "B: Sweep"),
    "fake_lr": Choice(1e-3, "a fast fake score helped; 2e-3 was within run-to-run noise", "B: Sweep"),
    "lr_schedule": Choice("cosine", "a fast start and a settled end suit a short fixed budget", "B: Sweep"),
    "generator_rank": Choice(64, "rank 64 over 16 was one of the sweep's largest gains", "B: Sweep"),
    "fake_rank": Choice(64, "as the generator", "B: Sweep"),
    "fake_updates": Choice(5, "1 -> 3 -> 5 raised accuracy; 8 gained nothing (DMD2's ratio is 5 to 10)",
                           "B: Sweep"),
    "ema_decay": Choice(0.99, "lifted accuracy 0.76 -> 0.88 at generator lr 2e-3 (about 100 iterations averaged)",
                        "A: Recommended defaults (ema_decay)"),
    "guidance_scale": Choice(1.75, "with LoRA on the IO layers, the accuracy headroom went to diversity",
                             "B: Sweep (q_io*)"),
    "target_modules": Choice(IO_TARGET_MODULES, "LoRA also on conv_in / conv_out / the samplers / the time "
                             "embedding: accuracy 0.90 -> 0.95 at w 2.25", "B: Sweep (q_io*)"),
    "t_star": Choice(800, "the sweep's largest single gain (800 beat 999, 900, 700, 600, 500): (G1) multiplies the "
                     "eps error by sigma/alpha, 14.6 at 999 and 5.1 at 800", "A: Recommended defaults (t_star)"),
    # DMD, the K = 1 case of the same code: the chain that moves z needs more iterations than 15 minutes hold.
    "num_langevin_steps": Choice(1, "DMD: at this budget the z-moving chains lost 7-13 points of accuracy, and the "
                                 "eps-only K = 2 chain covered modes worse (TV 0.360 vs 0.331, 3 seeds)",
                                 "B: DMD vs EMD at equal wall-clock"),
    "gamma_eps": Choice(2.0, "with K = 1 and gamma_z = 0, the E-step is DMD's: x_t scored once",
                        "A: Labels -> code (K=1 reduction)"),
    "gamma_z": Choice(0.0, "DMD's z does not move; the z-moving chain is toy-emd's (2000 iterations)",
                      "B: DMD vs EMD at equal iterations"),
    "log_every": Choice(10, "a log line every few seconds", "not measured"),
    "validate_every": Choice(100, "six grids over the run", "not measured"),
    "checkpoint_every": Choice(50, "at most 50 iterations (about a minute) lost to a crash", "not measured"),
    "num_validation_prompts": Choice(8, "one of each shape-colour pair shows in a grid", "not measured"),
    "mixed_precision": Choice("no", "every sweep point ran in fp32 (auto would mean bf16 on a GPU)", "B: Sweep"),
}

# The toy's EMD chain with z moving, at the length where DMD's TV stopped improving: at equal iterations it matched
# DMD's accuracy with more of the teacher's modes (docs/BENCHMARKS.md, "DMD vs EMD at equal iterations").
# `emd-t2i distill --teacher toy --preset toy-emd`: about 45 minutes on 2 CPU cores (576 UNet rows per iteration).
TOY_EMD_TABLE = {
    **TOY_TABLE,
    "iterations": Choice(2000, "DMD's TV stopped improving between 1500 and 2000 iterations; the chain is compared "
                         "there", "B: DMD vs EMD at equal iterations"),
    "num_langevin_steps": Choice(2, "the shortest chain that moves z: 1.4x DMD's UNet rows per iteration",
                                 "B: DMD vs EMD at equal iterations"),
    "gamma_eps": Choice(0.5, "the oracle's eps step", "A: Oracle"),
    "gamma_z": Choice(0.1, "with the snr rule, 0.025 at t = 200, where the E-step probe saw the chain move samples "
                      "toward prompt-correct modes; 0.175 over-dispersed at 600 iterations",
                      "B: DMD vs EMD at equal iterations (E-step probe)"),
    "z_step": Choice("snr", "stable at every t on the oracle and the toy; the jacobian bound is ~100x too small a "
                     "step on the toy's generator (|J| up to 36)", "A: The z step"),
    "validate_every": Choice(250, "eight grids over the run", "not measured"),
}

# Stable Diffusion 1.5 at 512 px (64x64 latents, eps-prediction). No value has been measured at SD scale (no GPU was
# lent yet): each says where it comes from, and the first SD runs should check them.
SD15_TABLE = {
    "t_star": Choice(800, "the toy's largest gain; sigma/alpha on SD's schedule is 14.6 at 999, 5.1 at 800 (SiD-LSG "
                     "starts SD generators at 625, DMD2 at 999)", "not measured on SD; B: Sweep"),
    "target_modules": Choice(IO_TARGET_MODULES, "LoRA on the IO layers lifted the toy's accuracy",
                             "not measured on SD; B: Sweep (q_io*)"),
    "fake_updates": Choice(5, "the toy sweep; DMD2 uses a fake/generator ratio of 5 (SDXL) to 10 (SD1.5)",
                           "not measured on SD; B: Sweep"),
    "ema_decay": Choice(0.999, "an EMA over ~1000 of 20000 iterations (the toy's 0.99 spans ~100 of 600)",
                        "not measured"),
    "lr_schedule": Choice("cosine", "helped the toy", "not measured on SD"),
    "lr_warmup": Choice(500, "keeps a fresh fake score from steering the first updates", "not measured"),
    "iterations": Choice(20000, "the usual LoRA-distillation scale", "not measured"),
    "generator_lr": Choice(5e-5, "an order below the toy's for an 860M-parameter UNet", "not measured"),
    "fake_lr": Choice(1e-4, "keeps the toy's faster fake score", "not measured on SD"),
    "generator_rank": Choice(64, "the toy sweep's rank", "not measured on SD; B: Sweep"),
    "fake_rank": Choice(64, "as the generator", "not measured on SD"),
    "guidance_scale": Choice(1.75, "DMD2's SD1.5 guidance; the toy found lower guidance trades accuracy for "
                             "diversity well (1.75 to 3 is the range worth sweeping)", "not measured on SD"),
    "num_langevin_steps": Choice(2, "toy-emd's chain: at equal iterations on the toy it matched DMD's accuracy with "
                                 "more of the teacher's modes, at 1.4x DMD's UNet rows per iteration",
                                 "not measured on SD; B: DMD vs EMD at equal iterations"),
    "gamma_eps": Choice(0.5, "the oracle's eps step", "A: Oracle"),
    "gamma_z": Choice(0.1, "toy-emd's z step: 0.025 at t = 200 and about 0.1 near t = 980 with the snr rule",
                      "not measured on SD; B: DMD vs EMD at equal iterations"),
    "z_step": Choice("snr", "a step fixed across t is unstable at small t on a sharp teacher or frozen at large t",
                     "A: The z step"),
    "cancel_initial_noise": Choice(True, "5-34x less M-step variance on the oracle at K = 4", "A: NC0"),
    "batch_size": Choice(4, "one 24 GB GPU with bf16 and checkpointing", "B: SD1.5 at real size"),
    "mixed_precision": Choice("auto", "bf16 on CUDA, as DMD2 trains", "A: Conventions (precision policy)"),
    "gradient_checkpointing": Choice(True, "one 24 GB GPU; gradients equal to no checkpointing",
                                     "B: SD1.5 at real size"),
    "max_grad_norm": Choice(1.0, "the plain default clip", "not measured"),
    "checkpoint_every": Choice(500, "40 checkpoints over the run", "not measured"),
    "validate_every": Choice(500, "40 grids over the run", "not measured"),
    "log_every": Choice(10, "often enough for a plot", "not measured"),
    "keep_checkpoints": Choice(2, "the newest and one before it, in case the newest is damaged", "not measured"),
    "num_validation_prompts": Choice(8, "a readable grid", "not measured"),
}

# Stable Diffusion 2.1 base: SD1.5's values. Same 64x64 latents, eps-prediction, schedule and UNet widths; only the
# text encoder (OpenCLIP ViT-H) and the attention layout differ, and nothing here depends on them.
SD21_BASE_TABLE = dict(SD15_TABLE)

# Stable Diffusion 2.1 at 768 px (96x96 latents, v-prediction): SD 2.1 base's values (every role speaks eps,
# models.eps.EpsModel), at batch 2.
SD21_TABLE = {**SD21_BASE_TABLE, "batch_size": Choice(
    2, "a 96x96 latent row holds 2.25x the activations of a 64x64 one: batch 2 keeps SD1.5's batch-4 memory",
    "not measured")}

# Stable Diffusion XL base 1.0 at 1024 px (128x128 latents, 2.6B-parameter UNet, eps-prediction).
SDXL_TABLE = {
    **SD15_TABLE,
    "t_star": Choice(399, "DMD2's one-step SDXL generator starts at 399 (from 999 it showed noise artifacts); "
                     "sigma/alpha is 1.16 there", "not measured"),
    "guidance_scale": Choice(8.0, "every DMD2 SDXL run distils with real guidance 8", "not measured"),
    "generator_lr": Choice(5e-5, "DMD2's SDXL LoRA run", "not measured"),
    "batch_size": Choice(2, "one 80 GB GPU with bf16 and checkpointing at 1024 px", "B: SDXL's UNet at size on the "
                         "CPU"),
}

TABLES: dict[str, dict[str, Choice]] = {"toy": TOY_TABLE, "toy-emd": TOY_EMD_TABLE, "sd-1.5": SD15_TABLE,
                                        "sd-2.1-base": SD21_BASE_TABLE, "sd-2.1": SD21_TABLE, "sdxl": SDXL_TABLE}
PRESETS: dict[str, dict[str, Any]] = {name: {k: c.value for k, c in table.items()} for name, table in TABLES.items()}
NOT_A_TEACHER = frozenset({"toy-emd"})  # chosen by --preset only, never by --teacher


# UNet config facts -> preset: (cross_attention_dim, block_out_channels, sample_size, prediction_type).
_ARCHITECTURES = {
    (768, (320, 640, 1280, 1280), 64, "epsilon"): "sd-1.5",  # CLIP ViT-L text encoder
    (1024, (320, 640, 1280, 1280), 64, "epsilon"): "sd-2.1-base",  # OpenCLIP ViT-H text encoder
    (1024, (320, 640, 1280, 1280), 96, "v_prediction"): "sd-2.1",  # the same at 768 px, predicting v
    (2048, (320, 640, 1280), 128, "epsilon"): "sdxl",  # CLIP ViT-L + OpenCLIP ViT-bigG text encoders
}


def chosen_preset(preset: str | None, teacher: str) -> str | None:
    """The preset a run stands on: the one named by --preset, else the teacher's (preset_name)."""
    return preset or preset_name(teacher)


def preset_name(teacher: str) -> str | None:
    """The preset of a --teacher: a preset name, a registry hub id, or a folder whose configs match a known model."""
    teacher = teacher.strip()
    if teacher in PRESETS and teacher not in NOT_A_TEACHER:
        return teacher
    from emd_t2i.models.teachers import (  # imports torch: only when the name alone does not tell
        TEACHERS,
        TOY_TEACHER_DIR,
    )

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
