"""What kills, full disks and damaged files do to a run: it resumes from its last intact checkpoint and loses
nothing that was saved; a second process on the same run folder is refused."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import tiny_config
from typer.testing import CliRunner

from emd_t2i import checkpoint as ckpt
from emd_t2i.cli import app
from emd_t2i.train import distill

FLAGS = ["--iterations", "10", "--batch-size", "2", "--num-langevin-steps", "2", "--gamma-z", "0.1",
         "--generator-rank", "4", "--fake-rank", "4", "--fake-updates", "2", "--validate-every", "0",
         "--log-every", "1", "--checkpoint-every", "4", "--ema-decay", "0.9", "--lr-schedule", "cosine",
         "--device", "cpu", "--no-export"]


def cli_command(teacher, prompts, output) -> list[str]:
    return [sys.executable, "-m", "emd_t2i.cli", "distill", "--teacher", str(teacher), "--prompts", str(prompts),
            "--output", str(output), *FLAGS]


def cli_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "log.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def kill_when(command: list[str], ready, timeout: float = 120.0) -> None:
    """Start `command`, SIGKILL it as soon as `ready()` holds (polled every 10 ms), and check it was still running."""
    proc = subprocess.Popen(command, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "the run never got there"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()


def final_weights(run_dir: Path) -> dict:
    last = ckpt.latest_checkpoint(run_dir)
    return {f"{n}.{k}": v for n in ("generator", "fake_score", "generator_ema")
            for k, v in load_file(str(last / f"{n}.safetensors")).items()}


@pytest.fixture(scope="module")
def reference(tiny_teacher_dir, prompt_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    subprocess.run(cli_command(tiny_teacher_dir, prompt_file, out), env=cli_env(), check=True, capture_output=True)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["before the first checkpoint", "after a checkpoint"])
def test_sigkill_then_the_same_command_equals_an_uninterrupted_run(
    tiny_teacher_dir, prompt_file, tmp_path, reference, moment
):
    out = tmp_path / "run"
    command = cli_command(tiny_teacher_dir, prompt_file, out)
    if moment == "before the first checkpoint":
        kill_when(command, lambda: len(logged_steps(out)) >= 2 and not ckpt.list_checkpoints(out))
        assert not ckpt.list_checkpoints(out)
    else:
        kill_when(command, lambda: len(logged_steps(out)) >= 6)
        assert ckpt.checkpoint_step(ckpt.latest_checkpoint(out)) == 4
    subprocess.run(command, env=cli_env(), check=True, capture_output=True)  # the same command again
    assert logged_steps(out) == list(range(1, 11)), "an iteration was logged twice or lost"
    want, got = final_weights(reference), final_weights(out)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_a_damaged_checkpoint_is_set_aside_and_the_previous_one_used(tiny_teacher_dir, prompt_file, tmp_path,
                                                                     capsys):
    cfg = tiny_config(tiny_teacher_dir, prompt_file, tmp_path / "run", iterations=4, validate_every=0)
    distill(cfg)
    newest = ckpt.latest_checkpoint(cfg.output)
    data = bytearray((newest / "generator.safetensors").read_bytes())
    data[-8:] = bytes(8 - i for i in range(8))  # a flipped tail: same size, other bytes
    (newest / "generator.safetensors").write_bytes(bytes(data))
    assert "checksum" in ckpt.verify_checkpoint(newest)

    distill(tiny_config(tiny_teacher_dir, prompt_file, tmp_path / "run", iterations=6, validate_every=0))
    err = capsys.readouterr()
    assert "checkpoint step-000004 is damaged" in err.err and "resuming from" in err.out
    assert "step-000002" in err.out.split("resuming from")[1].splitlines()[0]
    assert (Path(cfg.output) / "checkpoints" / "corrupt-step-000004").is_dir()  # kept, not deleted
    assert logged_steps(Path(cfg.output)) == [1, 2, 3, 4, 5, 6]


def test_a_full_disk_leaves_the_previous_checkpoint_and_ends_in_one_line(tiny_teacher_dir, prompt_file, tmp_path,
                                                                         monkeypatch):
    real = ckpt.save_file

    def fill_up(state, path, metadata=None):
        if "step-000004" in path:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(state, path, metadata=metadata)

    monkeypatch.setattr(ckpt, "save_file", fill_up)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["distill", "--teacher", str(tiny_teacher_dir), "--prompts", str(prompt_file),
                                      "--output", str(out), "--iterations", "4", "--batch-size", "2",
                                      "--generator-rank", "4", "--fake-rank", "4", "--fake-updates", "1",
                                      "--checkpoint-every", "2", "--validate-every", "0", "--device", "cpu"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    message = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(message) == 1 and "no space left" in message[0] and "step-000002" in message[0]
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-000002"]
    assert ckpt.verify_checkpoint(ckpt.latest_checkpoint(out)) is None
    assert not list((out / "checkpoints").glob(".tmp-*")), "a half-written checkpoint was left behind"


def test_a_second_process_on_the_same_run_folder_is_refused(tiny_teacher_dir, prompt_file, tmp_path):
    out = tmp_path / "run"
    args = ["distill", "--teacher", str(tiny_teacher_dir), "--prompts", str(prompt_file), "--output", str(out),
            "--iterations", "1", "--batch-size", "2", "--generator-rank", "4", "--fake-rank", "4",
            "--fake-updates", "1", "--validate-every", "0", "--device", "cpu", "--no-export"]
    with ckpt.RunLock(out):  # another run holds the folder
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2 and "in use by another emd-t2i run" in result.output
        assert not (out / "config.json").exists()
    result = CliRunner().invoke(app, args)  # released (a killed holder releases it too: the kernel drops it)
    assert result.exit_code == 0, result.output
