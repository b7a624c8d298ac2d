"""The run folder's checkpoints: atomic writes, finding the latest, keeping the last M.

Layout of a run folder:
    config.json                      the resolved DistillConfig
    log.jsonl                        one JSON object per logged iteration
    samples/step-000100.png          validation grids
    checkpoints/step-000100/         one complete checkpoint (written as .tmp-*, then renamed)
        generator.safetensors        peft-format LoRA state dict of the generator adapter
        fake_score.safetensors       the same for the fake score
        generator_ema.safetensors    the EMA of the generator (with --ema-decay > 0): what is exported
        training_state.pt            optimizers, loss scalers, RNG states, step
        manifest.json                size and sha256 of each file above, written last: a checkpoint
                                     whose files do not match it is skipped (moved to corrupt-step-*)
    export/                          what `emd-t2i export` writes
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .errors import UserError
from .files import follow_umask
from .roles import FAKE_SCORE, GENERATOR

GENERATOR_EMA = "generator_ema"
_STEP_DIR = re.compile(r"^step-(\d+)$")
MANIFEST = "manifest.json"


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
    """Write a checkpoint to a hidden folder, fsync it, then rename it into place (atomic on POSIX), then prune.

    A crash or a full disk at any point leaves the previous checkpoints as they were.
    """
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        for name, state in adapters.items():
            save_file(state, str(tmp / f"{name}.safetensors"), metadata=metadata)
        torch.save(training_state, tmp / "training_state.pt")
        follow_umask(tmp)  # safetensors' save_file makes its files 0600
        manifest = {p.name: _fingerprint(p) for p in sorted(tmp.iterdir())}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        for path in tmp.iterdir():
            _fsync(path)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            last = latest_checkpoint(run_dir)
            raise UserError(
                f"no space left on the disk of {run_dir} while saving iteration {step}: free some space and run the "
                f"same command again (it resumes from {last.name if last else 'the start'}, which is intact)"
            ) from None
        raise
    if final.exists():  # a re-save of the same step (e.g. a stop right after a checkpoint)
        shutil.rmtree(final)
    tmp.rename(final)
    _fsync(final.parent)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _fingerprint(path: Path) -> dict:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def _fsync(path: Path) -> None:
    """Flush a file or a folder's entries to disk, so a machine that dies keeps what a rename published."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def verify_checkpoint(ckpt: Path) -> str | None:
    """What is wrong with a checkpoint's files (None: they match its manifest). Checkpoints written before
    manifests existed are taken as they are."""
    manifest_path = Path(ckpt) / MANIFEST
    if not manifest_path.is_file():
        return None if (Path(ckpt) / "training_state.pt").is_file() else "no training_state.pt"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError):
        return f"unreadable {MANIFEST}"
    for name, expected in manifest.items():
        path = Path(ckpt) / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, expected {expected['bytes']}"
        if _fingerprint(path)["sha256"] != expected["sha256"]:
            return f"{name} does not match its checksum"
    return None


def latest_valid_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint whose files are intact. A damaged one is moved aside to corrupt-step-* (kept, not
    deleted) with a warning, and the one before it is used."""
    for ckpt in reversed(list_checkpoints(run_dir)):
        problem = verify_checkpoint(ckpt)
        if problem is None:
            return ckpt
        aside = ckpt.with_name(f"corrupt-{ckpt.name}")
        shutil.rmtree(aside, ignore_errors=True)
        ckpt.rename(aside)
        print(f"warning: checkpoint {ckpt.name} is damaged ({problem}); moved it to {aside.name} and resuming "
              "from the one before it", file=sys.stderr)
    return None


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


class RunLock:
    """One process at a time per run folder: an exclusive flock on the folder itself, which the kernel releases
    when the holder exits, however it dies (no stale lock files to clean up after a SIGKILL)."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self._fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        self.release()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.run_dir, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(f"--output {self.run_dir} is in use by another emd-t2i run: wait for it to finish or "
                            "stop it, or choose another --output") from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
