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
from safetensors import SafetensorError
from safetensors.torch import load_file
from test_train import tiny_config
from typer.testing import CliRunner

from emd_t2i.cli import app
from emd_t2i.errors import UserError
from emd_t2i.files import save_safetensors
from emd_t2i.training import checkpoint as ckpt
from emd_t2i.training.loop import distill

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


def flip_tail(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-8:] = bytes(8 - i for i in range(8))  # same size, other bytes
    path.write_bytes(bytes(data))


DAMAGE = {
    "a flipped tail": lambda c: flip_tail(c / "generator.safetensors"),
    "a manifest that is not UTF-8": lambda c: (c / "manifest.json").write_bytes(b'{"generator.safetensors": \xff\xfe}'),
    "no manifest and a truncated file": lambda c: ((c / "manifest.json").unlink(), (c / "fake_score.safetensors")
                                                   .write_bytes((c / "fake_score.safetensors").read_bytes()[:100])),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_checkpoint_is_set_aside_and_the_previous_one_used(tiny_teacher_dir, prompt_file, tmp_path,
                                                                     capsys, damage):
    cfg = tiny_config(tiny_teacher_dir, prompt_file, tmp_path / "run", iterations=4, validate_every=0)
    distill(cfg)
    DAMAGE[damage](ckpt.latest_checkpoint(cfg.output))

    distill(tiny_config(tiny_teacher_dir, prompt_file, tmp_path / "run", iterations=6, validate_every=0))
    err = capsys.readouterr()
    assert "checkpoint step-000004 is damaged" in err.err and "resuming from" in err.out
    assert "step-000002" in err.out.split("resuming from")[1].splitlines()[0]
    assert (Path(cfg.output) / "checkpoints" / "corrupt-step-000004").is_dir()  # kept, not deleted
    assert logged_steps(Path(cfg.output)) == [1, 2, 3, 4, 5, 6]


def distill_args(teacher, prompts, out, *extra) -> list[str]:
    return ["distill", "--teacher", str(teacher), "--prompts", str(prompts), "--output", str(out), "--iterations", "4",
            "--batch-size", "2", "--generator-rank", "4", "--fake-rank", "4", "--fake-updates", "1",
            "--checkpoint-every", "2", "--validate-every", "0", "--log-every", "1", "--device", "cpu", "--no-export", *extra]


def one_error_line(result) -> str:
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def test_when_every_checkpoint_is_damaged_the_run_is_refused_until_overwrite(tiny_teacher_dir, prompt_file, tmp_path):
    out = tmp_path / "run"
    assert CliRunner().invoke(app, distill_args(tiny_teacher_dir, prompt_file, out)).exit_code == 0
    for checkpoint in ckpt.list_checkpoints(out):
        DAMAGE["a flipped tail"](checkpoint)
    for _ in range(2):  # refused the same way every time: nothing was moved, nothing restarted
        line = one_error_line(CliRunner().invoke(app, distill_args(tiny_teacher_dir, prompt_file, out)))
        assert "every checkpoint" in line and "step-000004: generator.safetensors does not match its checksum" in line
        assert "step-000002" in line and "--overwrite" in line
        assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-000002", "step-000004"]
        assert logged_steps(out) == [1, 2, 3, 4]
    result = CliRunner().invoke(app, distill_args(tiny_teacher_dir, prompt_file, out, "--overwrite"))
    assert result.exit_code == 0, result.output
    assert logged_steps(out) == [1, 2, 3, 4] and not list((out / "checkpoints").glob("corrupt-*"))
    (old,) = tmp_path.glob("run.old-*")  # the damaged run, kept whole
    assert [p.name for p in ckpt.list_checkpoints(old)] == ["step-000002", "step-000004"]


def ends_mid_write(real, error: Exception):
    """A writer that writes part of its file, then fails as a full disk makes the library fail."""

    def write(obj, path, *args, **kwargs):
        if "step-000004" not in str(path):
            return real(obj, path, *args, **kwargs)
        Path(path).write_bytes(b"\0" * 1000)
        raise error

    return write


FULL_DISK = {  # what each writer raised on a full tmpfs
    "OSError": ("save_safetensors", OSError(errno.ENOSPC, "No space left on device")),
    "SafetensorError": ("save_safetensors", SafetensorError("Error while serializing: I/O error: No space left on device "
                                                     "(os error 28)")),
    "torch's RuntimeError": ("torch.save", RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos "
                                                        "576 vs 534")),
}


@pytest.mark.parametrize("raised", FULL_DISK)
def test_a_full_disk_leaves_the_previous_checkpoint_and_ends_in_one_line(tiny_teacher_dir, prompt_file, tmp_path,
                                                                         monkeypatch, raised):
    writer, error = FULL_DISK[raised]
    if writer == "save_safetensors":
        monkeypatch.setattr(ckpt, "save_safetensors", ends_mid_write(ckpt.save_safetensors, error))
    else:
        monkeypatch.setattr(torch, "save", ends_mid_write(torch.save, error))
    out = tmp_path / "run"
    line = one_error_line(CliRunner().invoke(app, distill_args(tiny_teacher_dir, prompt_file, out)))
    assert "cannot write" in line and "step-000004" in line and "resumes from step-000002, which is intact" in line
    if raised != "torch's RuntimeError":
        assert "no space left on the disk" in line
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-000002"]
    ckpt.read_checkpoint(ckpt.latest_checkpoint(out))  # intact: verifies and loads
    assert not list((out / "checkpoints").glob(".tmp-*")), "a half-written checkpoint was left behind"

    monkeypatch.undo()  # space freed
    config = (out / "config.json").stat()
    partial = out / "checkpoints" / ".tmp-step-000009"  # as a SIGKILL mid-save leaves it
    partial.mkdir()
    (partial / "generator.safetensors").write_bytes(b"\0" * 1000)
    assert CliRunner().invoke(app, distill_args(tiny_teacher_dir, prompt_file, out)).exit_code == 0
    assert logged_steps(out) == [1, 2, 3, 4] and not partial.exists()
    assert (out / "config.json").stat().st_mtime_ns == config.st_mtime_ns, "an unchanged config.json was rewritten"


def test_a_full_disk_during_export_keeps_the_previous_export(tiny_teacher_dir, prompt_file, tmp_path, monkeypatch):
    from emd_t2i.export import writer as export

    out = tmp_path / "run"
    assert CliRunner().invoke(app, distill_args(tiny_teacher_dir, prompt_file, out)).exit_code == 0
    args = ["export", str(out), "--format", "lora", "--format", "kohya", "--overwrite"]
    assert CliRunner().invoke(app, args).exit_code == 0
    before = {p.name: p.read_bytes() for p in (out / "export").iterdir() if p.is_file()}
    calls = {"n": 0}

    def second_fails(state, path, metadata=None):  # the LoRA file is written, the kohya file meets the full disk
        calls["n"] += 1
        if calls["n"] == 2:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return save_safetensors(state, path, metadata=metadata)

    monkeypatch.setattr(export, "save_safetensors", second_fails)
    line = one_error_line(CliRunner().invoke(app, args))
    assert "cannot write" in line and "no space left on the disk" in line and str(out / "export") in line
    assert not [p.name for p in out.iterdir() if p.name.startswith((".tmp", ".old"))], "partial export left behind"
    assert {p.name: p.read_bytes() for p in (out / "export").iterdir() if p.is_file()} == before


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


def test_the_run_folder_stays_locked_through_the_export(tiny_teacher_dir, prompt_file, tmp_path, monkeypatch):
    from emd_t2i.export import writer as export

    real, seen = export.export_run, []

    def export_run(run_dir, **kwargs):  # a second command arriving now must be refused, not export beside this one
        second = ckpt.RunLock(run_dir)
        try:
            second.acquire()
            seen.append("unlocked")
        except UserError:
            seen.append("locked")
        second.release()
        return real(run_dir, **kwargs)

    monkeypatch.setattr(export, "export_run", export_run)
    args = distill_args(tiny_teacher_dir, prompt_file, tmp_path / "run", "--iterations", "1")
    result = CliRunner().invoke(app, [a for a in args if a != "--no-export"])
    assert result.exit_code == 0, result.output
    assert seen == ["locked"]
