"""A run survives what happens to real runs: Ctrl-C or SIGTERM mid-iteration, and fp16 gradient overflow."""

import dataclasses
import json
import math
import os
import signal

import pytest
import torch
from safetensors.torch import load_file
from test_train import tiny_config
from typer.testing import CliRunner

from emd_t2i.cli import app
from emd_t2i.training import checkpoint as ckpt
from emd_t2i.training import run as run_module
from emd_t2i.training.interrupt import Interrupted
from emd_t2i.training.loop import distill

KEPT = {"ema_decay": 0.9, "lr_schedule": "cosine", "checkpoint_every": 100, "validate_every": 0, "fake_updates": 2}


def signal_on_call(monkeypatch, name: str, call: int, signum: int) -> None:
    """Deliver `signum` to this process from inside the `call`-th call of run_module.<name>."""
    real, calls = getattr(run_module, name), {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            os.kill(os.getpid(), signum)
        return real(*args, **kwargs)

    monkeypatch.setattr(run_module, name, wrapped)


def assert_same_final_state(a_dir, b_dir):
    a, b = ckpt.latest_checkpoint(a_dir), ckpt.latest_checkpoint(b_dir)
    assert a.name == b.name == "step-000004"
    for name in ("generator", "fake_score", "generator_ema"):
        wa, wb = load_file(str(a / f"{name}.safetensors")), load_file(str(b / f"{name}.safetensors"))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name
    sa, sb = ckpt.load_training_state(a), ckpt.load_training_state(b)
    for opt in ("opt_generator", "opt_fake"):
        for ga, gb in zip(sa[opt]["state"].values(), sb[opt]["state"].values()):
            assert torch.equal(ga["exp_avg"], gb["exp_avg"]) and torch.equal(ga["exp_avg_sq"], gb["exp_avg_sq"])
    steps = [json.loads(line)["step"] for line in (b_dir / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4], "log lines were lost or duplicated across the interrupt"


@pytest.fixture(scope="module")
def uninterrupted(tiny_teacher_dir, prompt_file, tmp_path_factory):
    return distill(tiny_config(tiny_teacher_dir, prompt_file, tmp_path_factory.mktemp("straight") / "run", **KEPT))


def test_ctrl_c_inside_the_generator_step_saves_the_whole_iteration(
    tiny_teacher_dir, prompt_file, tmp_path, monkeypatch, uninterrupted
):
    cfg = tiny_config(tiny_teacher_dir, prompt_file, tmp_path / "run", **KEPT)
    signal_on_call(monkeypatch, "generator_step", call=3, signum=signal.SIGINT)  # inside iteration 3
    with pytest.raises(Interrupted) as stopped:
        distill(cfg)
    assert stopped.value.exit_code == 130
    assert ckpt.checkpoint_step(ckpt.latest_checkpoint(cfg.output)) == 3  # iteration 3 finished, then saved
    monkeypatch.undo()
    distill(cfg)  # the same command again
    assert_same_final_state(uninterrupted, tmp_path / "run")


def test_sigterm_inside_the_fake_score_updates_through_the_cli(
    tiny_teacher_dir, prompt_file, tmp_path, monkeypatch, uninterrupted
):
    cfg = tiny_config(tiny_teacher_dir, prompt_file, tmp_path / "run", **KEPT)
    args = ["distill", "--no-export"] + [
        f"--{k.replace('_', '-')}={v}" for k, v in cfg.to_dict().items() if k != "target_modules" and
        not isinstance(v, bool) and v is not None
    ]
    signal_on_call(monkeypatch, "fake_score_step", call=4, signum=signal.SIGTERM)  # iteration 2, second update
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 143, result.output  # 128 + SIGTERM, as a shell reports a terminated job
    assert "stopped after iteration 2" in result.output and "Traceback" not in result.output
    assert ckpt.checkpoint_step(ckpt.latest_checkpoint(cfg.output)) == 2
    monkeypatch.undo()
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert_same_final_state(uninterrupted, tmp_path / "run")


def test_fp16_overflow_skips_the_step_backs_off_and_goes_on(tiny_teacher_dir, prompt_file, tmp_path, monkeypatch):
    real_step, real_optimizer_step, calls, moved = run_module.generator_step, run_module.optimizer_step, {"n": 0}, []

    def overflow_on_second(*args, **kwargs):
        step = real_step(*args, **kwargs)
        calls["n"] += 1
        # Finite loss, but times the loss scale (65536) its gradient overflows fp32: what fp16 runs meet early on.
        return dataclasses.replace(step, loss=step.loss * 1e38) if calls["n"] == 2 else step

    def watch(optimizer, scaler, params, max_norm, world):
        before = [p.detach().clone() for p in params]
        norm = real_optimizer_step(optimizer, scaler, params, max_norm, world)
        moved.append(any(not torch.equal(b, p) for b, p in zip(before, params)))
        return norm

    monkeypatch.setattr(run_module, "generator_step", overflow_on_second)
    monkeypatch.setattr(run_module, "optimizer_step", watch)
    run = distill(tiny_config(tiny_teacher_dir, prompt_file, tmp_path / "run", mixed_precision="fp16",
                              fake_updates=1, validate_every=0))
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]  # the run went on
    assert moved == [True, True, False, True, True, True, True, True]  # only iteration 2's generator step skipped
    assert not math.isfinite(log[1]["grad_norm_generator"])
    assert log[0]["loss_scale_generator"] == 2.0**16 and log[1]["loss_scale_generator"] == log[3]["loss_scale_generator"] == 2.0**15
    assert all(r["non_finite"] == 0 for r in log)  # an overflow is the scaler's business, not a bad step


def test_the_log_shows_both_loss_scales_and_the_mean_fake_gradient_norm(tiny_teacher_dir, prompt_file, tmp_path,
                                                                        monkeypatch):
    real, norms = run_module.optimizer_step, []

    def record(*args):
        norms.append(real(*args))
        return norms[-1]

    monkeypatch.setattr(run_module, "optimizer_step", record)
    run = distill(tiny_config(tiny_teacher_dir, prompt_file, tmp_path / "run", iterations=1, mixed_precision="fp16",
                              fake_updates=3, validate_every=0))
    (log,) = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    generator, *fake = norms  # one generator step, then the fake score's three
    assert log["grad_norm_generator"] == generator and len(set(fake)) == 3
    assert log["grad_norm_fake"] == pytest.approx(sum(fake) / 3)  # the mean over the updates, not the last one
    assert log["loss_scale_generator"] == log["loss_scale_fake"] == 2.0**16
