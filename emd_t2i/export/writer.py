"""Export a run's generator: diffusers LoRA, one-step diffusers pipeline folder, kohya LoRA, model card."""

from __future__ import annotations

import inspect
import json
import os
import shutil
from pathlib import Path

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

from emd_t2i import __version__
from emd_t2i.errors import UserError
from emd_t2i.export import kohya
from emd_t2i.export.card import model_card, read_eval
from emd_t2i.export.layout import FACTS_FILE, FACTS_PREFIX, KOHYA_FILE, LORA_FILE, PIPELINE_DIR, SCHEDULER_DIR
from emd_t2i.files import WRITE_ERRORS, follow_umask, save_safetensors, write_failure
from emd_t2i.models.roles import GENERATOR, load_adapter_state_dict, lora_config
from emd_t2i.models.teachers import load_teacher
from emd_t2i.training.checkpoint import (
    GENERATOR_EMA,
    checkpoint_dir,
    checkpoint_step,
    exported_generator,
    latest_checkpoint,
    list_checkpoints,
)
from emd_t2i.training.config import DistillConfig

FORMATS = ("lora", "pipeline", "kohya")

# ---------------------------------------------------------------------------------------------------------
# The one-step scheduler
# ---------------------------------------------------------------------------------------------------------


def one_step_scheduler(teacher_scheduler_config: dict, t_star: int, prediction_type: str):
    """A DDIMScheduler whose single step evaluates the UNet at t* and returns its x0-prediction exactly.

    With `timestep_spacing="trailing"` one step is timestep T - 1 (T = num_train_timesteps); its DDIM update
    x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev) eps_hat, with `set_alpha_to_one` (abar_prev = 1),
    is x0_hat = (z - sigma_t eps_hat) / alpha_t: (G1), and for v-prediction alpha_t z - sigma_t v, the same.
    For t* < T - 1 the schedule is cut to its first t* + 1 betas (`trained_betas`, T = t* + 1): abar is
    unchanged at every t <= t*, and the one trailing step is t*. (`steps_offset` is not usable for this:
    StableDiffusionPipeline resets it to 1 when it loads a folder.)
    """
    from diffusers import DDIMScheduler

    accepted = inspect.signature(DDIMScheduler.__init__).parameters  # drop e.g. PNDM's skip_prk_steps
    teacher_scheduler_config = {k: v for k, v in teacher_scheduler_config.items() if k in accepted}
    base = DDIMScheduler.from_config(teacher_scheduler_config)
    last = base.config.num_train_timesteps - 1
    if not 0 < t_star <= last:
        raise UserError(f"--t-star {t_star} is outside the teacher's timesteps 1..{last}: distill again with "
                        "a valid t*")
    overrides = {"timestep_spacing": "trailing", "set_alpha_to_one": True, "clip_sample": False,
                 "thresholding": False, "steps_offset": 1, "prediction_type": prediction_type}
    if t_star != last:
        overrides |= {"num_train_timesteps": t_star + 1, "trained_betas": base.betas[: t_star + 1].tolist(),
                      "rescale_betas_zero_snr": False}
    scheduler = DDIMScheduler.from_config(teacher_scheduler_config, **overrides)
    scheduler.set_timesteps(1)
    assert int(scheduler.timesteps[0]) == t_star, scheduler.timesteps
    assert torch.equal(scheduler.alphas_cumprod[t_star], base.alphas_cumprod[t_star])
    return scheduler


# ---------------------------------------------------------------------------------------------------------
# LoRA state dicts: peft (checkpoint) -> diffusers and kohya keys
# ---------------------------------------------------------------------------------------------------------


def diffusers_state_dict(peft_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft keys -> the UNet keys diffusers' `load_lora_weights` reads: `unet.<module>.lora_A.weight`."""
    return {f"unet.{key}": value.contiguous() for key, value in peft_state.items()}


def lora_metadata(config: LoraConfig, facts: dict) -> dict[str, str]:
    """safetensors metadata: diffusers' LoRA config (so rank and alpha load right) and the run's facts."""
    # rank_pattern / alpha_pattern (empty: one rank, alpha = rank everywhere) too: diffusers 0.39 to 0.41 read the
    # metadata as LoraConfig keyword arguments and look both up without a default
    adapter = {"unet.r": config.r, "unet.lora_alpha": config.lora_alpha,
               "unet.target_modules": sorted(config.target_modules), "unet.rank_pattern": {}, "unet.alpha_pattern": {}}
    meta = {"format": "pt", "lora_adapter_metadata": json.dumps(adapter, indent=2, sort_keys=True)}
    meta.update({FACTS_PREFIX + k: v if isinstance(v, str) else json.dumps(v) for k, v in facts.items()})
    return meta


def kohya_file_metadata(config: LoraConfig, facts: dict, base: str, resolution: int) -> dict[str, str]:
    """kohya's metadata (kohya.kohya_metadata: which base model, rank, alpha) and the run's facts."""
    meta = lora_metadata(config, facts)
    del meta["lora_adapter_metadata"]
    meta.update(kohya.kohya_metadata(config.r, config.lora_alpha, sorted(config.target_modules), base,
                                     facts["prediction_type"], resolution, "emd_t2i_generator"))
    return meta


# ---------------------------------------------------------------------------------------------------------
# Reading the run
# ---------------------------------------------------------------------------------------------------------


def _load_config(run_dir: Path) -> DistillConfig:
    path = run_dir / "config.json"
    if not path.is_file():
        raise UserError(f"{run_dir} is not a run folder (no config.json): pass the --output of "
                        "`emd-t2i distill`")
    return DistillConfig.load(path)


def _find_checkpoint(run_dir: Path, checkpoint: str | Path | int | None) -> Path:
    if checkpoint is None:
        found = latest_checkpoint(run_dir)
        if found is None:
            raise UserError(f"run {run_dir} has no checkpoint yet: let `emd-t2i distill` write one first")
        return found
    if isinstance(checkpoint, int):
        candidates = [checkpoint_dir(run_dir, checkpoint)]
    else:
        candidates = [Path(checkpoint), run_dir / "checkpoints" / str(checkpoint)]
    for path in candidates:
        if (path / f"{GENERATOR}.safetensors").is_file():
            return path
    have = ", ".join(p.name for p in list_checkpoints(run_dir)) or "none"
    raise UserError(f"checkpoint {checkpoint} not found in {run_dir}: give --checkpoint one of: {have}")


def run_facts(cfg: DistillConfig, teacher_source: str, step: int, prediction_type: str) -> dict:
    """What the exported weights say about themselves (model card, safetensors metadata, emd_t2i.json)."""
    emd = ("num_langevin_steps", "gamma_eps", "gamma_z", "noise_cancellation", "cancel_initial_noise",
           "t_min", "t_max", "weighting", "fake_updates", "iterations", "batch_size", "generator_lr",
           "fake_lr", "generator_rank", "fake_rank", "target_modules", "ema_decay", "mixed_precision", "seed")
    facts = {"version": __version__, "teacher": cfg.teacher, "teacher_source": teacher_source,
             "prediction_type": prediction_type, "t_star": cfg.t_star, "guidance_scale": cfg.guidance_scale,
             "step": step}
    facts.update({k: list(v) if isinstance(v, tuple) else v for k, v in cfg.to_dict().items() if k in emd})
    return facts


def _trained_precision(weights: Path) -> str | None:
    """What --mixed-precision resolved to in training (the checkpoint's metadata; "auto" says nothing)."""
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        return (f.metadata() or {}).get("mixed_precision")


def _teacher_source(source: str) -> str:
    """A hub id as is; a local folder as an absolute path, so the export works from any directory."""
    return str(Path(source).resolve()) if Path(source).is_dir() else source


# ---------------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------------


def _check_formats(formats) -> tuple[str, ...]:
    formats = tuple(dict.fromkeys(formats))
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise UserError(f"--format must be one or more of {', '.join(FORMATS)} (got {list(formats)})")
    return formats


def _refuse_existing(output: Path, overwrite: bool) -> None:
    if output.exists() and not overwrite:
        raise UserError(f"export folder {output} already exists: pass --overwrite to replace it, or --output")


def _attach_generator(unet: torch.nn.Module, state: dict, config: LoraConfig, run_dir: Path, teacher: str):
    """Add the generator LoRA to the teacher UNet and load the checkpoint's weights (keys must match)."""
    unet.add_adapter(config, adapter_name=GENERATOR)
    expected = set(get_peft_model_state_dict(unet, adapter_name=GENERATOR))
    if expected != set(state):
        odd = sorted(set(state) ^ expected)
        raise UserError(
            f"the generator LoRA of {run_dir} does not fit teacher {teacher} ({len(odd)} keys differ, e.g. "
            f"{odd[0]}): config.json must name the teacher the run was distilled from"
        )
    load_adapter_state_dict(unet, GENERATOR, state)


def _write_pipeline(folder: Path, teacher, scheduler) -> None:
    """Fuse the generator LoRA into the teacher UNet; save every component (no safety checker)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    try:
        teacher.unet.fuse_lora(safe_fusing=True, adapter_names=[GENERATOR])
    except ValueError as err:  # raised by peft's safe_merge on NaN / inf
        raise UserError(f"the generator LoRA has NaN or inf weights ({err}): export an earlier "
                        "--checkpoint") from err
    teacher.unet.unload_lora()
    if teacher.is_sdxl:
        pipe = StableDiffusionXLPipeline(
            vae=teacher.vae, text_encoder=teacher.text_encoder, text_encoder_2=teacher.text_encoder_2,
            tokenizer=teacher.tokenizer, tokenizer_2=teacher.tokenizer_2, unet=teacher.unet, scheduler=scheduler,
            force_zeros_for_empty_prompt=teacher.force_zeros_for_empty_prompt,
        )
        pipe.save_pretrained(folder, safe_serialization=True)
        return
    pipe = StableDiffusionPipeline(
        vae=teacher.vae, text_encoder=teacher.text_encoder, tokenizer=teacher.tokenizer, unet=teacher.unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)


def export_run(
    run_dir: str | Path,
    output: str | Path | None = None,
    formats: tuple[str, ...] = FORMATS,
    overwrite: bool = False,
    checkpoint: str | Path | int | None = None,
    raw: bool = False,
) -> Path:
    """Export the generator of a run's latest (or given) checkpoint into `output` (default run_dir/export):
    its EMA weights when the run keeps an EMA, its raw weights when it does not or `raw` is set.

    Written into a hidden sibling folder and renamed into place, so `output` is either complete or absent.
    """
    run_dir = Path(run_dir)
    formats = _check_formats(formats)
    output = Path(output) if output is not None else run_dir / "export"
    _refuse_existing(output, overwrite)
    cfg = _load_config(run_dir)
    ckpt = _find_checkpoint(run_dir, checkpoint)
    weights = exported_generator(ckpt, raw)
    state = load_file(str(weights))
    teacher = load_teacher(cfg.teacher, load_vae="pipeline" in formats)
    config = lora_config(cfg.generator_rank, cfg.target_modules)
    _attach_generator(teacher.unet, state, config, run_dir, cfg.teacher)
    facts = run_facts(cfg, _teacher_source(teacher.source), checkpoint_step(ckpt), teacher.prediction_type)
    facts["generator_weights"] = "ema" if weights.stem == GENERATOR_EMA else "raw"
    facts["mixed_precision"] = _trained_precision(weights) or cfg.mixed_precision
    pipeline_class = "StableDiffusionXLPipeline" if teacher.is_sdxl else "StableDiffusionPipeline"
    facts["pipeline_class"] = pipeline_class
    scheduler = one_step_scheduler(dict(teacher.scheduler.config), cfg.t_star, teacher.prediction_type)
    alpha_bar = float(scheduler.alphas_cumprod[cfg.t_star])  # k-diffusion UIs name the start by its sigma
    facts["sigma_t_star"] = round(((1 - alpha_bar) / alpha_bar) ** 0.5, 4)

    tmp = output.with_name(f".tmp-{output.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        scheduler.save_pretrained(tmp / SCHEDULER_DIR)
        if "lora" in formats:
            meta = lora_metadata(config, facts)
            save_safetensors(diffusers_state_dict(state), tmp / LORA_FILE, metadata=meta)
        if "kohya" in formats:
            base = kohya.base_model(teacher.unet.config)
            weights = kohya.kohya_state_dict(state, config.lora_alpha, teacher.unet.config, base)
            kohya.check_round_trip(weights, state, pipeline_class, teacher.unet.config)
            save_safetensors(weights, tmp / KOHYA_FILE,
                             metadata=kohya_file_metadata(config, facts, base, teacher.resolution))
        if "pipeline" in formats:
            _write_pipeline(tmp / PIPELINE_DIR, teacher, scheduler)
        (tmp / FACTS_FILE).write_text(json.dumps({**facts, "formats": list(formats)}, indent=2) + "\n")
        card = model_card(facts, formats, output, read_eval(run_dir), read_eval(run_dir, "metrics.json"))
        (tmp / "README.md").write_text(card)
        follow_umask(tmp)  # safetensors' save_file (under ours and diffusers' save_pretrained) makes files 0600
        _publish(tmp, output, overwrite)
    except WRITE_ERRORS as err:  # a full disk, whichever writer met it; the half-written folder goes below
        raise write_failure(output, err) from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output


def _publish(tmp: Path, output: Path, overwrite: bool) -> None:
    """Rename the finished folder into place; an old export is moved aside first and deleted after."""
    if not output.exists():
        tmp.rename(output)
        return
    _refuse_existing(output, overwrite)  # someone else may have exported meanwhile
    old = output.with_name(f".old-{output.name}-{os.getpid()}")
    output.rename(old)
    tmp.rename(output)
    shutil.rmtree(old, ignore_errors=True)


