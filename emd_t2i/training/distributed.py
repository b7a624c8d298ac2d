"""Processes and devices: the accelerator, the GPU of a single process, what a multi-process run refuses, how the
processes agree to stop on an error, and the check that every process holds the same weights."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from emd_t2i.errors import ReportedElsewhere, UserError
from emd_t2i.models.roles import GENERATOR
from emd_t2i.training.config import DistillConfig


def make_accelerator(cfg: DistillConfig, run_dir: Path):
    """Processes, devices and trackers. Precision is not accelerate's job here: the loop owns its autocast and
    one loss scaler per optimizer (`optim.py`), the same on every device."""
    from accelerate import Accelerator

    cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {cfg.device}: no CUDA device is visible; use --device cpu")
    if cfg.device.startswith("cuda:"):
        select_gpu(int(cfg.device.split(":")[1]) if cfg.device[5:].isdigit() else -1, cfg.device)
    log_with = None if cfg.report_to == "none" else cfg.report_to
    if _accelerator_state_differs(cpu):
        # accelerate keeps a process-wide singleton; a second run in the same process (a notebook, a sweep,
        # the test suite) on another device would be refused. The process group itself is kept.
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(mixed_precision="no", cpu=cpu, log_with=log_with, project_dir=str(run_dir))
    refuse_sharding(accelerator.distributed_type)
    return accelerator


def select_gpu(index: int, flag: str) -> None:
    """`--device cuda:N` for a single process; under a launcher each process takes the GPU of its local rank."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError(f"--device {flag}: under accelerate launch / torchrun each process takes its own GPU; "
                        "drop --device (choose GPUs with CUDA_VISIBLE_DEVICES)")
    if not 0 <= index < torch.cuda.device_count():
        raise UserError(f"--device {flag}: this machine has {torch.cuda.device_count()} visible CUDA devices "
                        f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    torch.cuda.set_device(index)


def refuse_sharding(distributed_type) -> None:
    """FSDP, DeepSpeed and Megatron shard or wrap the model; emd-t2i keeps ONE UNet in three roles and averages
    the LoRA gradients itself, which those wrappers would break silently."""
    name = str(getattr(distributed_type, "value", distributed_type))
    if name in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        raise UserError(f"the accelerate config asks for {name}, which emd-t2i does not support (one UNet serves "
                        "three roles and LoRA gradients are averaged explicitly): use a plain multi-GPU config "
                        "(docs/accelerate/one_node.yaml)")


def agreed(accelerator, fn, *args, main_only: bool = False):
    """`fn(*args)` on every process (on the main process only with `main_only`), and its result there; if it
    fails on any process, it fails on all of them.

    Under a launcher a process that stops alone leaves the others waiting in their next collective until they die
    with a traceback of their own. So the processes compare notes first: a UserError anywhere ends every process
    with exit code 2 and its line printed once, by the main process (the others raise ReportedElsewhere); any
    other exception is re-raised where it happened, with its traceback, and ends the others the same way.
    """
    problem, result = None, None
    if not main_only or accelerator.is_main_process:
        try:
            result = fn(*args)
        except Exception as err:  # noqa: BLE001 - re-raised below, after the other processes know
            problem = err
    if accelerator.num_processes == 1:
        if problem is not None:
            raise problem
        return result
    failed = torch.tensor([problem is not None], dtype=torch.int32, device=accelerator.device)
    torch.distributed.all_reduce(failed, op=torch.distributed.ReduceOp.MAX)
    if not failed.item():
        return result
    rank = accelerator.process_index
    mine = None if problem is None else str(problem) if isinstance(problem, UserError) else (
        f"process {rank} failed with {type(problem).__name__} (its traceback is above)")
    notes = [None] * accelerator.num_processes
    torch.distributed.all_gather_object(notes, mine)
    if problem is not None and (accelerator.is_main_process or not isinstance(problem, UserError)):
        raise problem
    first = next(note for note in notes if note is not None)
    if accelerator.is_main_process:
        raise UserError(first)
    raise ReportedElsewhere(first) from problem


def check_ranks_agree(unet: torch.nn.Module, accelerator, when: str) -> None:
    """Every process must hold the same weights: a checksum of the base, the generator and the fake score."""
    if accelerator.num_processes == 1:
        return
    sums = [torch.zeros((), dtype=torch.float64, device=accelerator.device) for _ in range(3)]
    for name, p in unet.named_parameters():
        part = 0 if "lora_" not in name else (1 if f".{GENERATOR}." in name else 2)
        sums[part] += p.detach().double().sum()
    gathered = accelerator.gather(torch.stack(sums)[None])
    differ = [int(r) for r in range(gathered.shape[0]) if not torch.equal(gathered[r], gathered[0])]
    if differ:
        problem = ReportedElsewhere if accelerator.process_index else UserError  # every process knows: one line
        raise problem(f"processes {differ} hold other weights than process 0 {when}: every process must load the "
                      "same teacher and see the same run folder (shared storage), with the same emd-t2i version")


def _accelerator_state_differs(cpu: bool) -> bool:
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if not state:
        return False
    return state.get("_mixed_precision") != "no" or (cpu and state.get("device", torch.device("cpu")).type != "cpu")
