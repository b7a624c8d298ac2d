"""Two CPU processes (gloo): explicit gradient averaging keeps the ranks' LoRA weights identical."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


@pytest.mark.slow
def test_two_processes_stay_in_sync(tiny_teacher_dir, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na dog\na red car\nan old castle\n")
    out = tmp_path / "run"
    worker = Path(__file__).with_name("ddp_worker.py")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           str(worker), str(tiny_teacher_dir), str(prompts), str(out)]
    result = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = load_file(str(out / "rank0.safetensors")), load_file(str(out / "rank1.safetensors"))
    moved = [k for k in rank0 if k.endswith("lora_B.weight") and rank0[k].abs().sum() > 0]
    assert moved, "the generator did not train"
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), f"ranks diverged at {key}: gradients were not averaged"
    assert (out / "checkpoints" / "step-000003").is_dir() and not (out / "checkpoints" / ".tmp-step-000003").exists()
