"""The run folder: who may write it (one command at a time), whether a command continues the run in it, config.json
and log.jsonl."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from emd_t2i.errors import UserError
from emd_t2i.files import unused_path, write_failure, write_text_atomic
from emd_t2i.training import checkpoint as ckpt
from emd_t2i.training.config import DistillConfig, read_record


def claim_run_dir(cfg: DistillConfig, overwrite: bool, world: int, lock: ckpt.RunLock) -> None:
    """Lock the run folder and check that a run already in it is this one (then it resumes): one made by a different
    config, or at another global batch, is refused. With `overwrite` a run there is moved aside, never deleted, and
    this one starts over. config.json is written later (`record_config`), once the inputs have been checked, so a
    refused start leaves the folder as it was."""
    run_dir = Path(cfg.output)
    lock.acquire()
    saved = run_dir / "config.json"
    if saved.exists() and overwrite:
        backup = unused_path(run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}"))
        run_dir.rename(backup)
        print(f"moved the previous run to {backup}")
        lock.acquire()  # the locked folder was moved aside; lock the new one
    elif saved.exists():
        check_same_run(cfg, saved, world)
    elif run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise UserError(f"--output {run_dir} exists and is not an emd-t2i run; choose an empty or new folder")
    ckpt.remove_partial_checkpoints(run_dir)


def check_same_run(cfg: DistillConfig, saved: Path, world: int) -> None:
    """Refuse to continue a run with other math: other flags, or another global batch (processes x --grad-accum x
    --batch-size; how it is split does not matter, every sample's draws follow from its place in the global batch)."""
    run_dir, record, previous = Path(cfg.output), read_record(saved), DistillConfig.load(saved)
    if changed := cfg.differences(previous):
        raise UserError(f"--output {run_dir} holds a run with a different config ({', '.join(changed)}); use another "
                        "--output, the same flags to resume, or --overwrite to start over")
    was = record.get("global_batch", previous.global_batch(world))  # unrecorded: it ran on as many processes
    if was != cfg.global_batch(world):
        was_world = record.get("world_size", world)
        raise UserError(
            f"--output {run_dir} holds a run at a global batch of {was} ({_split(was_world, previous)}); this command "
            f"makes {cfg.global_batch(world)} ({_split(world, cfg)}): continue it with {continuing_flags(was, world, cfg)}"
            ", or start over with --overwrite")


def _split(world: int, cfg: DistillConfig) -> str:
    return f"{world} process{'es' if world > 1 else ''} x --batch-size {cfg.batch_size} x --grad-accum {cfg.grad_accum}"


def continuing_flags(global_batch: int, world: int, cfg: DistillConfig) -> str:
    """The flags that give `global_batch` on `world` processes: more accumulation first (same memory per step)."""
    if global_batch % world:
        return f"a number of processes that divides {global_batch}"
    per_process = global_batch // world
    whole = f"--batch-size {per_process} --grad-accum 1"
    if per_process % cfg.batch_size or per_process == cfg.batch_size:
        return whole
    return f"--batch-size {cfg.batch_size} --grad-accum {per_process // cfg.batch_size} (or {whole})"


def record_config(cfg: DistillConfig, world: int) -> None:
    """Write config.json (the flags and the split they run with) when it says something new, and samples/."""
    run_dir = Path(cfg.output)
    path = run_dir / "config.json"
    if not path.is_file() or read_record(path) != json.loads(json.dumps(cfg.record(world))):
        cfg.save(path, world)
    (run_dir / "samples").mkdir(exist_ok=True)


def append_jsonl(path: Path, record: dict) -> None:
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as err:  # a line cut short by a full disk is dropped by truncate_log on the next start
        raise write_failure(path, err) from err


def truncate_log(path: Path, last_step: int) -> None:
    """On (re)start, drop log lines after the iteration we continue from (they will be redone), and a last line a
    kill cut in half, so each iteration is logged once however the previous process ended."""
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if _logged_step(line) <= last_step]
        write_text_atomic(path, "".join(line + "\n" for line in kept))


def _logged_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf
