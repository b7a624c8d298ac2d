"""The run folder's checkpoints: atomic writes, finding the latest, keeping the last M.

Layout of a run folder:
    config.json                      the resolved DistillConfig
    log.jsonl                        one JSON object per logged iteration
    samples/step-000100.png          validation grids
    checkpoints/step-000100/         one complete checkpoint (written as .tmp-*, then renamed)
        generator.safetensors        peft-format LoRA state dict of the generator adapter
        fake_score.safetensors       the same for the fake score
        generator_ema.safetensors    the EMA of the generator (with --ema-decay > 0): what is exported
        training_state.pt            optimizers, RNG states, step, data position
    export/                          what `emd-t2i export` writes
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .roles import FAKE_SCORE, GENERATOR

GENERATOR_EMA = "generator_ema"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:06d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (half-written ones are hidden as .tmp-* and never listed)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def checkpoint_step(path: Path) -> int:
    return int(_STEP_DIR.match(Path(path).name).group(1))


def save_checkpoint(
    run_dir: Path,
    step: int,
    adapters: dict[str, dict[str, torch.Tensor]],
    training_state: dict[str, Any],
    keep: int,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write a checkpoint to a hidden folder, then rename it into place (atomic on POSIX), then prune."""
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, state in adapters.items():
        save_file(state, str(tmp / f"{name}.safetensors"), metadata=metadata)
    torch.save(training_state, tmp / "training_state.pt")
    if final.exists():  # a re-save of the same step (e.g. Ctrl-C right after a checkpoint)
        shutil.rmtree(final)
    tmp.rename(final)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_adapters(ckpt: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The checkpoint's LoRA state dicts: generator, fake score, and the generator EMA when the run keeps one."""
    names = (GENERATOR, FAKE_SCORE, GENERATOR_EMA)
    return {name: load_file(str(path)) for name in names if (path := Path(ckpt) / f"{name}.safetensors").is_file()}


def exported_generator(ckpt: Path, raw: bool = False) -> Path:
    """The generator weights to export: the EMA when the run keeps one (unless `raw`), else the raw weights."""
    ema = Path(ckpt) / f"{GENERATOR_EMA}.safetensors"
    return ema if ema.is_file() and not raw else Path(ckpt) / f"{GENERATOR}.safetensors"


def load_training_state(ckpt: Path) -> dict[str, Any]:
    return torch.load(Path(ckpt) / "training_state.pt", map_location="cpu", weights_only=False)
