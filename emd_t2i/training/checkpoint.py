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
                                     whose files do not match it, or that does not load, is moved to
                                     corrupt-step-* when an intact one precedes it
    export/                          what `emd-t2i export` writes
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from emd_t2i.errors import UserError
from emd_t2i.files import (
    WRITE_ERRORS,
    file_sha256,
    follow_umask,
    save_safetensors,
    unused_path,
    write_failure,
)
from emd_t2i.models.roles import FAKE_SCORE, GENERATOR

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

    A crash, a full disk or any other failed write at any point leaves the previous checkpoints as they were and
    the hidden folder removed; a failed write ends in one line.
    """
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(f".tmp-{final.name}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name, state in adapters.items():
            save_safetensors(state, tmp / f"{name}.safetensors", metadata=metadata)
        torch.save(training_state, tmp / "training_state.pt")
        follow_umask(tmp)  # safetensors' save_file makes its files 0600
        manifest = {p.name: _fingerprint(p) for p in sorted(tmp.iterdir())}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        for path in tmp.iterdir():
            _fsync(path)
    except BaseException as err:  # a Ctrl-C mid-write too: never leave a half-written folder to fill the disk
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(err, WRITE_ERRORS):
            raise
        last = latest_checkpoint(run_dir)
        resumes = f"it resumes from {last.name}, which is intact" if last else "it starts from the beginning"
        raise write_failure(final, err, f"run the same command again ({resumes})") from err
    if final.exists():  # a re-save of the same step (e.g. a stop right after a checkpoint)
        shutil.rmtree(final)
    tmp.rename(final)
    _fsync(final.parent)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def remove_partial_checkpoints(run_dir: Path) -> None:
    """Delete the hidden folders of checkpoints a killed process was writing (they may hold most of a disk)."""
    root = Path(run_dir) / "checkpoints"
    for partial in root.glob(".tmp-*") if root.is_dir() else ():
        shutil.rmtree(partial, ignore_errors=True)


def _fingerprint(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


def _fsync(path: Path) -> None:
    """Flush a file or a folder's entries to disk, so a machine that dies keeps what a rename published."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def verify_checkpoint(ckpt: Path) -> str | None:
    """What is wrong with a checkpoint's files by its manifest (None: they match it, or it has none: then only
    loading it tells, see `read_checkpoint`)."""
    manifest_path = Path(ckpt) / MANIFEST
    if not manifest_path.is_file():
        return None
    try:
        manifest = json.loads(manifest_path.read_bytes())  # bytes: bad UTF-8 is a ValueError like bad JSON
    except (OSError, ValueError):
        return f"unreadable {MANIFEST}"
    if not isinstance(manifest, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("bytes"), int) and isinstance(v.get("sha256"), str)
            for v in manifest.values()):
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


class DamagedCheckpoint(Exception):
    """A checkpoint whose files do not match its manifest or do not load; the message says what is wrong."""


def read_checkpoint(ckpt: Path, adapters: tuple[str, ...] = (GENERATOR, FAKE_SCORE)) -> tuple[dict, dict]:
    """(LoRA state dicts, training state) of a checkpoint that verifies and loads, else DamagedCheckpoint.
    `adapters` are the ones the run needs (the EMA's too when it keeps one)."""
    problem = verify_checkpoint(ckpt)
    if problem is None and (missing := [n for n in adapters if not (Path(ckpt) / f"{n}.safetensors").is_file()]):
        problem = f"{missing[0]}.safetensors is missing"
    if problem is None:
        try:
            state_dicts, state = load_adapters(ckpt), load_training_state(ckpt)
        except Exception as err:  # noqa: BLE001 - what a damaged file makes a loader raise is the file's fault
            problem = f"it does not load ({type(err).__name__})"
        else:
            if not isinstance(state, dict) or "step" not in state:
                problem = "training_state.pt holds no training state"
    if problem is not None:
        raise DamagedCheckpoint(problem)
    return state_dicts, state


def latest_intact_checkpoint(run_dir: Path, adapters: tuple[str, ...] = (GENERATOR, FAKE_SCORE)):
    """(path, LoRA state dicts, training state) of the newest checkpoint that verifies and loads, or None when the
    run has none. A damaged one newer than it is moved aside to corrupt-step-* (kept, not deleted) with a warning.
    When every checkpoint is damaged nothing is moved and a UserError names them: starting over is the user's call."""
    damaged = []
    for ckpt in reversed(list_checkpoints(run_dir)):
        try:
            state_dicts, state = read_checkpoint(ckpt, adapters)
        except DamagedCheckpoint as err:
            damaged.append((ckpt, str(err)))
            continue
        for bad, problem in damaged:
            aside = _set_aside(bad)
            print(f"warning: checkpoint {bad.name} is damaged ({problem}); moved it to {aside.name} and resuming "
                  "from the one before it", file=sys.stderr)
        return ckpt, state_dicts, state
    if damaged:
        found = "; ".join(f"{ckpt.name}: {problem}" for ckpt, problem in damaged)
        raise UserError(f"every checkpoint of {run_dir} is damaged ({found}); nothing was changed: restore them, or "
                        "add --overwrite to start over (the run folder is moved aside, never deleted)")
    return None


def _set_aside(ckpt: Path) -> Path:
    """Rename a damaged checkpoint to corrupt-step-N (corrupt-step-N.2, ... if that name is taken)."""
    aside = unused_path(ckpt.with_name(f"corrupt-{ckpt.name}"))
    ckpt.rename(aside)
    return aside


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
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise UserError(f"--output {self.run_dir} is a file: give a folder for the run (new, empty, or a run's)")
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
