"""Two processes through the CLI (torchrun on CPU, gloo; accelerate reads its environment as under
`accelerate launch` on GPUs) compute and log what one process does with the same global batch, write one export, and
stop together in one line; a run continues on another number of processes at its global batch."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from emd_t2i.cli import app
from emd_t2i.training import checkpoint as ckpt

FLAGS = ["--iterations", "2", "--num-langevin-steps", "2", "--gamma-z", "0.1", "--generator-rank", "4",
         "--fake-rank", "4", "--fake-updates", "2", "--validate-every", "0", "--log-every", "1", "--device", "cpu",
         "--max-grad-norm", "0", "--guidance-scale", "2",
         "--weighting", "dmd-t", "--z-step", "jacobian",  # the per-t table and |J|: made from the global batch
         "--no-cancel-initial-noise"]  # NC0 leaves a small eps_tilde whose float cancellation (1e-4) hides the test


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(args: list[str], processes: int, monitor_interval: float = 0.1) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
              "--master_port", str(free_port()), "--monitor-interval", str(monitor_interval),
              "-m", "emd_t2i.cli", "distill"]
    return subprocess.run(launch + args, env=env, capture_output=True, text=True, timeout=600, check=False)


def lora_update(run_dir: Path) -> torch.Tensor:
    """The generator's and fake score's LoRA weights after the run, minus where they started (B = 0)."""
    last = ckpt.latest_checkpoint(run_dir)
    weights = {**load_file(str(last / "generator.safetensors")), **{
        f"fake.{k}": v for k, v in load_file(str(last / "fake_score.safetensors")).items()}}
    return torch.cat([v.flatten() for k, v in sorted(weights.items()) if "lora_B" in k])


def read_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


MEANS = ("loss_generator", "loss_fake", "weight", "eps_tilde_rms")


@pytest.fixture(scope="module")
def runs(tiny_teacher_dir, prompt_file, tmp_path_factory) -> SimpleNamespace:
    """The same run as 2 processes x batch 2 (checkpointed every iteration, exported) and 1 process x batch 4."""
    root = tmp_path_factory.mktemp("processes")
    common = ["--teacher", str(tiny_teacher_dir), "--prompts", str(prompt_file)] + FLAGS
    two = run_cli(common + ["--output", str(root / "two"), "--batch-size", "2", "--checkpoint-every", "1"], processes=2)
    assert two.returncode == 0, two.stderr[-3000:]
    one = run_cli(common + ["--output", str(root / "one"), "--batch-size", "4", "--no-export"], processes=1)
    assert one.returncode == 0, one.stderr[-3000:]
    return SimpleNamespace(two=root / "two", one=root / "one", two_stdout=two.stdout)


@pytest.mark.slow
def test_two_processes_equal_one_with_the_same_global_batch(runs):
    assert runs.two_stdout.count("exported to") == 1, runs.two_stdout  # side effects on the main process only
    assert (runs.two / "export" / "pytorch_lora_weights.safetensors").is_file()
    log = read_log(runs.two)
    assert [r["step"] for r in log] == [1, 2]
    # 2 processes x batch 2 with rows (4K + 2) B + 2B per extra fake update each, plus the |J| measurement at
    # iteration 0 (4 samples: one forward, then 2 per power iteration); the log counts one process.
    assert log[0]["unet_rows_per_it"] == (4 * 2 + 2) * 2 + 2 * 2 + 4 * (1 + 2 * 8)
    assert log[1]["unet_rows_per_it"] == (4 * 2 + 2) * 2 + 2 * 2

    a, b = lora_update(runs.two), lora_update(runs.one)
    assert b.norm() > 0
    assert float((a - b).norm() / b.norm()) < 1e-4  # equal up to float summation order (all-reduce vs one batch)
    # The log reads the global batch's means, as one process at the same global batch logs them, not rank 0's own;
    # eps_tilde_rms, a small remainder of cancelled noise, agrees to 2e-4 only.
    for two, one in zip(log, read_log(runs.one)):
        assert [two[k] for k in MEANS] == pytest.approx([one[k] for k in MEANS], rel=1e-3)
        assert two["grad_norm_generator"] == pytest.approx(one["grad_norm_generator"], rel=1e-4)


@pytest.mark.slow
def test_a_run_continues_on_another_number_of_processes_at_its_global_batch(runs, tiny_teacher_dir, prompt_file,
                                                                            tmp_path):
    run = Path(shutil.copytree(runs.two, tmp_path / "run"))  # as if the 2 processes had stopped after iteration 1
    shutil.rmtree(run / "checkpoints" / "step-000002")
    shutil.rmtree(run / "export")
    config = (run / "config.json").read_bytes()
    assert json.loads(config)["world_size"] == 2 and json.loads(config)["global_batch"] == 4
    args = ["distill", "--teacher", str(tiny_teacher_dir), "--prompts", str(prompt_file), "--output", str(run),
            "--no-export", *FLAGS, "--batch-size", "2"]

    refused = CliRunner().invoke(app, args)  # one process at the same --batch-size: half the global batch
    assert refused.exit_code == 2 and "Traceback" not in refused.output, refused.output
    (line,) = [line for line in refused.output.splitlines() if line.startswith("error:")]
    assert "global batch of 4 (2 processes x --batch-size 2 x --grad-accum 1)" in line
    assert "makes 2" in line and "continue it with --batch-size 2 --grad-accum 2 (or --batch-size 4" in line
    assert (run / "config.json").read_bytes() == config and ckpt.list_checkpoints(run)[-1].name == "step-000001"

    result = CliRunner().invoke(app, args + ["--grad-accum", "2"])  # the same global batch on one process
    assert result.exit_code == 0, result.output
    assert "resuming from" in result.output and "iteration 1" in result.output
    a, b = lora_update(run), lora_update(runs.two)
    assert float((a - b).norm() / b.norm()) < 1e-4  # what the 2 processes computed for iteration 2
    log = read_log(run)
    assert [r["step"] for r in log] == [1, 2]
    assert [log[1][k] for k in MEANS] == pytest.approx([read_log(runs.two)[1][k] for k in MEANS], rel=1e-3)
    recorded = json.loads((run / "config.json").read_text())
    assert (recorded["world_size"], recorded["global_batch"], recorded["grad_accum"]) == (1, 4, 2)


@pytest.mark.slow
def test_an_error_found_on_the_main_process_ends_every_process_in_one_line(tiny_teacher_dir, prompt_file, tmp_path):
    out = tmp_path / "run"
    with ckpt.RunLock(out):  # another run holds the folder: only the main process can know
        # torchrun looks at its workers every 2 s, not 0.1 s: a rank left waiting gets the time to fail by itself
        # (with a traceback) before torchrun would stop it, as it does on a loaded machine
        result = run_cli(["--teacher", str(tiny_teacher_dir), "--prompts", str(prompt_file), "--output", str(out),
                          *FLAGS, "--batch-size", "2"], processes=2, monitor_interval=2)
    assert result.stderr.count("error:") == 1, result.stderr
    assert "error: --output" in result.stderr and "is in use by another emd-t2i run" in result.stderr
    assert re.findall(r"exitcode\s*: (-?\d+) \(pid", result.stderr) == ["2", "2"], result.stderr  # each rank, as torchrun saw it
    assert not re.search(r'File ".*emd_t2i', result.stderr), "a rank's traceback: " + result.stderr[-3000:]


@pytest.mark.parametrize("kind", ["FSDP", "DEEPSPEED", "MEGATRON_LM"])
def test_sharded_launch_configs_are_refused_in_one_line(kind):
    from accelerate.utils import DistributedType

    from emd_t2i.errors import UserError
    from emd_t2i.training.distributed import refuse_sharding

    with pytest.raises(UserError, match=f"asks for {kind}.*plain multi-GPU config"):
        refuse_sharding(DistributedType[kind])
    refuse_sharding(DistributedType.MULTI_GPU)  # plain data parallel is what the loop does


def test_device_cuda_n_is_refused_under_a_launcher(monkeypatch):
    from emd_t2i.errors import UserError
    from emd_t2i.training.distributed import select_gpu

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="each process takes its own GPU"):
        select_gpu(1, "cuda:1")
