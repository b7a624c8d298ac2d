"""Two processes through the CLI (torchrun on CPU, gloo; accelerate reads its environment as under
`accelerate launch` on GPUs) compute what one process does with the same global batch, and write one export."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from emd_t2i import checkpoint as ckpt

FLAGS = ["--iterations", "2", "--num-langevin-steps", "2", "--gamma-z", "0.1", "--generator-rank", "4",
         "--fake-rank", "4", "--fake-updates", "2", "--validate-every", "0", "--log-every", "1", "--device", "cpu",
         "--max-grad-norm", "0", "--guidance-scale", "2",
         "--weighting", "dmd-t", "--z-step", "jacobian",  # the per-t table and |J|: made from the global batch
         "--no-cancel-initial-noise"]  # NC0 leaves a small eps_tilde whose float cancellation (1e-4) hides the test


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(args: list[str], processes: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
              "--master_port", str(free_port()), "-m", "emd_t2i.cli", "distill"]
    return subprocess.run(launch + args, env=env, capture_output=True, text=True, timeout=600, check=False)


def lora_update(run_dir: Path) -> torch.Tensor:
    """The generator's and fake score's LoRA weights after the run, minus where they started (B = 0)."""
    last = ckpt.latest_checkpoint(run_dir)
    weights = {**load_file(str(last / "generator.safetensors")), **{
        f"fake.{k}": v for k, v in load_file(str(last / "fake_score.safetensors")).items()}}
    return torch.cat([v.flatten() for k, v in sorted(weights.items()) if "lora_B" in k])


@pytest.mark.slow
def test_two_processes_equal_one_with_the_same_global_batch(tiny_teacher_dir, prompt_file, tmp_path):
    common = ["--teacher", str(tiny_teacher_dir), "--prompts", str(prompt_file)] + FLAGS
    two = run_cli(common + ["--output", str(tmp_path / "two"), "--batch-size", "2"], processes=2)
    assert two.returncode == 0, two.stderr[-3000:]
    one = run_cli(common + ["--output", str(tmp_path / "one"), "--batch-size", "4", "--no-export"], processes=1)
    assert one.returncode == 0, one.stderr[-3000:]

    assert two.stdout.count("exported to") == 1, two.stdout  # side effects on the main process only
    assert (tmp_path / "two" / "export" / "pytorch_lora_weights.safetensors").is_file()
    log = [json.loads(line) for line in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    # 2 processes x batch 2 with rows (4K + 2) B + 2B per extra fake update each, plus the |J| measurement at
    # iteration 0 (4 samples: one forward, then 2 per power iteration); the log counts one process.
    assert log[0]["unet_rows_per_it"] == (4 * 2 + 2) * 2 + 2 * 2 + 4 * (1 + 2 * 8)
    assert log[1]["unet_rows_per_it"] == (4 * 2 + 2) * 2 + 2 * 2

    a, b = lora_update(tmp_path / "two"), lora_update(tmp_path / "one")
    assert b.norm() > 0
    assert float((a - b).norm() / b.norm()) < 1e-4  # equal up to float summation order (all-reduce vs one batch)


@pytest.mark.parametrize("kind", ["FSDP", "DEEPSPEED", "MEGATRON_LM"])
def test_sharded_launch_configs_are_refused_in_one_line(kind):
    from accelerate.utils import DistributedType

    from emd_t2i.distributed import refuse_sharding
    from emd_t2i.errors import UserError

    with pytest.raises(UserError, match=f"asks for {kind}.*plain multi-GPU config"):
        refuse_sharding(DistributedType[kind])
    refuse_sharding(DistributedType.MULTI_GPU)  # plain data parallel is what the loop does


def test_device_cuda_n_is_refused_under_a_launcher(monkeypatch):
    from emd_t2i.distributed import select_gpu
    from emd_t2i.errors import UserError

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="each process takes its own GPU"):
        select_gpu(1, "cuda:1")
