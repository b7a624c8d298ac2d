"""The distillation run on a tiny teacher: the run folder, bit-exact resume, refusal of a foreign config, Ctrl-C."""

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from emd_t2i.cli import app
from emd_t2i.errors import UserError
from emd_t2i.export.writer import diffusers_state_dict, export_run
from emd_t2i.training import checkpoint as ckpt
from emd_t2i.training.batch import batch_prompts
from emd_t2i.training.config import DistillConfig
from emd_t2i.training.loop import distill
from emd_t2i.training.optim import ema_decay_at, lr_scale, update_ema

PROMPTS = ["a cat", "a dog on a beach", "a red car at night", "an old castle", "a bowl of fruit"]


def tiny_config(teacher, prompts, output, **overrides) -> DistillConfig:
    base = {
        "teacher": str(teacher),
        "prompts": str(prompts),
        "output": str(output),
        "iterations": 4,
        "batch_size": 2,
        "num_langevin_steps": 2,
        "gamma_eps": 0.5,
        "gamma_z": 0.1,
        "generator_rank": 4,
        "fake_rank": 4,
        "log_every": 1,
        "validate_every": 2,
        "checkpoint_every": 2,
        "num_validation_prompts": 3,
        "guidance_scale": 2.0,
        "fake_updates": 1,
        "device": "cpu",
    }
    return DistillConfig(**{**base, **overrides})


def test_distill_through_the_cli_makes_a_complete_run_folder(tiny_teacher_dir, prompt_file, tmp_path):
    out = tmp_path / "run"
    args = [
        "distill",
        "--teacher",
        str(tiny_teacher_dir),
        "--prompts",
        str(prompt_file),
        "--output",
        str(out),
        "--iterations",
        "3",
        "--batch-size",
        "2",
        "--num-langevin-steps",
        "2",
        "--gamma-z",
        "0.1",
        "--generator-rank",
        "4",
        "--fake-rank",
        "4",
        "--fake-updates",
        "1",
        "--log-every",
        "1",
        "--validate-every",
        "2",
        "--checkpoint-every",
        "2",
        "--device",
        "cpu",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (out / "export" / "pytorch_lora_weights.safetensors").exists(), "no automatic export at the end"
    result = CliRunner().invoke(
        app, ["sample", "a cat", "--model", str(out / "export"), "--seed", "3", "--output", str(tmp_path / "png")]
    )
    assert result.exit_code == 0, result.output
    written = sorted((tmp_path / "png").glob("*.png"))
    assert written and all(str(p) in result.output for p in written)

    saved = DistillConfig.load(out / "config.json")
    assert saved.iterations == 3 and saved.num_langevin_steps == 2 and saved.teacher == str(tiny_teacher_dir)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    for record in log:
        assert all(k in record for k in ("loss_generator", "loss_fake", "grad_norm_generator", "it_per_s"))
    # (4K + 2) B forward rows per iteration with gamma_z > 0: the minimum of docs/ALGORITHM.md.
    assert log[0]["unet_rows_per_it"] == (4 * 2 + 2) * 2
    assert (out / "samples" / "step-000002.png").exists() and (out / "samples" / "step-000003.png").exists()
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-000002", "step-000003"]
    weights = load_file(str(ckpt.latest_checkpoint(out) / "generator.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in weights.items()), (
        "generator never moved"
    )


def test_gamma_z_zero_shares_the_generator_forward(tiny_teacher_dir, prompt_file, tmp_path):
    run = distill(
        tiny_config(
            tiny_teacher_dir, prompt_file, tmp_path / "r", iterations=1, gamma_z=0.0, validate_every=0
        )
    )
    record = json.loads((run / "log.jsonl").read_text().splitlines()[0])
    assert record["unet_rows_per_it"] == (3 * 2 + 2) * 2


# The EMA, the lr curve, the per-t table of "dmd-t" and the |J| of z_step "jacobian" (measured at iterations 0 and
# 3 here, so the resumed run starts with the saved one) must survive the resume too.
@pytest.mark.parametrize("extra", [{}, {"weighting": "dmd-t", "z_step": "jacobian", "jacobian_every": 3}])
def test_resume_is_bit_identical_to_an_uninterrupted_run(tiny_teacher_dir, prompt_file, tmp_path, extra):
    kept = {"ema_decay": 0.9, "lr_schedule": "cosine", **extra}
    straight = distill(tiny_config(tiny_teacher_dir, prompt_file, tmp_path / "straight", **kept))
    interrupted = tiny_config(tiny_teacher_dir, prompt_file, tmp_path / "resumed", **kept)
    distill(interrupted, stop_after=2)
    assert ckpt.checkpoint_step(ckpt.latest_checkpoint(tmp_path / "resumed")) == 2
    distill(interrupted)  # the same command again continues from iteration 2 to 4

    a, b = ckpt.latest_checkpoint(straight), ckpt.latest_checkpoint(tmp_path / "resumed")
    assert a.name == b.name == "step-000004"
    for name in ("generator", "fake_score", "generator_ema"):
        wa, wb = load_file(str(a / f"{name}.safetensors")), load_file(str(b / f"{name}.safetensors"))
        assert wa.keys() == wb.keys()
        for key in wa:
            assert torch.equal(wa[key], wb[key]), f"{name}:{key} differs after resume"
    sa, sb = ckpt.load_training_state(a), ckpt.load_training_state(b)
    for group_a, group_b in zip(sa["opt_generator"]["state"].values(), sb["opt_generator"]["state"].values()):
        assert torch.equal(group_a["exp_avg"], group_b["exp_avg"])
    records = [json.loads(line) for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4], "log lines were lost or duplicated across the resume"
    assert [r["lr_scale"] for r in records] == [lr_scale("cosine", s, 4) for s in range(4)]
    if extra:
        assert records[0]["jacobian_norm"] > 0 and sa["error_table"] is not None
        assert records[1]["jacobian_norm"] == records[2]["jacobian_norm"] != records[3]["jacobian_norm"]
        assert torch.equal(sa["error_table"].nan_to_num(-1), sb["error_table"].nan_to_num(-1))


def test_cosine_lr_falls_from_one_to_zero():
    assert [lr_scale("cosine", s, 4) for s in (0, 2, 4, 9)] == pytest.approx([1.0, 0.5, 0.0, 0.0])
    assert lr_scale("constant", 3, 4) == 1.0


def test_a_different_config_on_an_existing_run_is_refused(tiny_teacher_dir, prompt_file, tmp_path):
    cfg = tiny_config(tiny_teacher_dir, prompt_file, tmp_path / "run", iterations=1, validate_every=0)
    distill(cfg)
    changed = tiny_config(tiny_teacher_dir, prompt_file, tmp_path / "run", iterations=1, gamma_eps=0.9)
    with pytest.raises(UserError, match="--gamma-eps"):
        distill(changed)
    result = CliRunner().invoke(
        app,
        [
            "distill",
            "--teacher",
            str(tiny_teacher_dir),
            "--prompts",
            str(prompt_file),
            "--output",
            str(tmp_path / "run"),
            "--gamma-eps",
            "0.9",
            "--no-export",
        ],
    )
    assert result.exit_code == 2 and "--overwrite" in result.output and "Traceback" not in result.output
    distill(changed, overwrite=True)  # the old run is moved aside, never deleted
    backups = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(backups) == 1 and (backups[0] / "config.json").exists()
    assert DistillConfig.load(tmp_path / "run" / "config.json").gamma_eps == 0.9


def test_every_prompt_is_seen_once_per_epoch():
    prompts = [f"p{i}" for i in range(7)]
    seen = [p for step in range(7) for p in batch_prompts(prompts, seed=3, step=step, rows=range(2), global_batch=2)]
    assert sorted(seen[:7]) == sorted(prompts) and sorted(seen[7:14]) == sorted(prompts)
    ranks = [batch_prompts(prompts, 3, 0, range(2 * rank, 2 * rank + 2), 4) for rank in (0, 1)]
    assert not set(ranks[0]) & set(ranks[1]), "two processes drew the same prompts in one step"
    assert ranks[0] + ranks[1] == batch_prompts(prompts, 3, 0, range(4), 4), "the split changed the data"


def test_report_to_tensorboard_writes_scalars_and_the_grid(tiny_teacher_dir, prompt_file, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = distill(tiny_config(tiny_teacher_dir, prompt_file, tmp_path / "run", iterations=2, report_to="tensorboard"))
    events = sorted(run.rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file in the run folder"
    tags = {"scalars": set(), "images": set()}
    for folder in {e.parent for e in events}:  # accelerate also writes the hyperparameters in a subfolder
        found = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0}).Reload().Tags()
        tags = {k: v | set(found[k]) for k, v in tags.items()}
    assert {"loss_generator", "loss_fake", "grad_norm_generator", "it_per_s"} <= tags["scalars"]
    assert "samples" in tags["images"]


def test_bf16_gradient_checkpointing_and_accumulation_run_on_cpu(tiny_teacher_dir, prompt_file, tmp_path):
    """The frozen base in bf16, LoRA weights in fp32, activations recomputed, two micro-batches per update."""
    cfg = tiny_config(tiny_teacher_dir, prompt_file, tmp_path / "run", iterations=2, mixed_precision="bf16",
                      gradient_checkpointing=True, grad_accum=2, validate_every=0)
    run = distill(cfg)
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert all(r["non_finite"] == 0 and r["grad_norm_generator"] > 0 for r in log)
    assert log[0]["unet_rows_per_it"] == 2 * (4 * 2 + 2) * 2, "two micro-batches per iteration"
    weights = load_file(str(ckpt.latest_checkpoint(run) / "generator.safetensors"))
    assert all(v.dtype == torch.float32 for v in weights.values()), "LoRA weights must stay in float32"


def test_validation_prompts_spread_over_the_dataset():
    from emd_t2i.data.prompts import distinct_spread

    assert distinct_spread([str(i) for i in range(10)], 3) == ["0", "3", "6"]
    assert distinct_spread(["1", "2"], 5) == ["1", "2"]


def test_a_second_run_in_the_same_process_may_change_precision(tiny_teacher_dir, prompt_file, tmp_path):
    """accelerate's state is a process-wide singleton; a sweep or notebook must still be able to switch precision
    (and device). What --mixed-precision resolved to is recorded in the checkpoint."""
    for i, precision in enumerate(["bf16", "no", "auto"]):
        cfg = tiny_config(tiny_teacher_dir, prompt_file, tmp_path / str(i), mixed_precision=precision, iterations=1,
                          validate_every=0)
        state = ckpt.load_training_state(ckpt.latest_checkpoint(distill(cfg)))
        assert state["mixed_precision"] == {"auto": "no"}.get(precision, precision)  # auto: none on a CPU


def test_ema_update_and_warm_up():
    ema, params = [torch.zeros(3)], [torch.nn.Parameter(torch.full((3,), 2.0))]
    update_ema(ema, params, 0.75)
    assert torch.allclose(ema[0], torch.full((3,), 0.5))  # 0.75 * 0 + 0.25 * 2
    assert ema_decay_at(0.999, 0) == pytest.approx(0.1) and ema_decay_at(0.999, 10**6) == 0.999
    assert ema_decay_at(0.5, 100) == 0.5


def test_the_export_is_the_ema_of_the_generator(tiny_teacher_dir, prompt_file, tmp_path):
    run = distill(tiny_config(tiny_teacher_dir, prompt_file, tmp_path / "run", iterations=3, ema_decay=0.5,
                              validate_every=0))
    latest = ckpt.latest_checkpoint(run)
    raw, ema = (load_file(str(latest / f"{name}.safetensors")) for name in ("generator", "generator_ema"))
    assert raw.keys() == ema.keys()
    assert any(not torch.equal(raw[k], ema[k]) for k in raw), "the EMA is a copy of the raw weights"
    exported = load_file(str(export_run(run, formats=("lora",)) / "pytorch_lora_weights.safetensors"))
    expected = diffusers_state_dict(ema)
    assert exported.keys() == expected.keys()
    assert all(torch.equal(exported[k], expected[k]) for k in expected)


def test_every_config_field_is_a_distill_flag():
    import dataclasses
    import inspect

    from emd_t2i.cli.distilling import distill as distill_command

    flags = set(inspect.signature(distill_command).parameters)
    missing = [f.name for f in dataclasses.fields(DistillConfig) if f.name not in flags]
    assert not missing, f"config fields without a --flag: {missing}"


def test_training_leaves_the_teacher_untouched(tiny_teacher_dir, prompt_file, tmp_path, monkeypatch):
    """After real iterations, adapters off is still the original UNet: base weights and output, bit for bit."""
    from emd_t2i.models.roles import GENERATOR
    from emd_t2i.models.teachers import load_teacher
    from emd_t2i.training import loop as train

    used = {}

    def capture(*args, **kwargs):
        used["teacher"] = load_teacher(*args, **kwargs)
        return used["teacher"]

    monkeypatch.setattr(train, "load_teacher", capture)
    distill(tiny_config(tiny_teacher_dir, prompt_file, tmp_path / "run", iterations=3, validate_every=0))
    unet = used["teacher"].unet
    fresh = load_teacher(str(tiny_teacher_dir), load_vae=False).unet
    trained_base = {n.replace(".base_layer", ""): p for n, p in unet.named_parameters() if "lora_" not in n}
    for name, param in fresh.named_parameters():
        assert torch.equal(trained_base[name], param), f"training changed base weight {name}"
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t, cond = torch.tensor([10, 700]), torch.randn(2, 77, fresh.config.cross_attention_dim)
    with torch.no_grad():
        expected = fresh(x, t, encoder_hidden_states=cond).sample
        unet.disable_adapters()
        torch.testing.assert_close(unet(x, t, encoder_hidden_states=cond).sample, expected, rtol=0, atol=0)
        unet.enable_adapters()
        unet.set_adapter(GENERATOR)
        assert (unet(x, t, encoder_hidden_states=cond).sample - expected).abs().max() > 1e-6, "generator never moved"


def test_a_moved_run_folder_resumes(tiny_teacher_dir, prompt_file, tmp_path):
    import shutil

    distill(tiny_config(tiny_teacher_dir, prompt_file, tmp_path / "here", validate_every=0), stop_after=2)
    shutil.move(str(tmp_path / "here"), str(tmp_path / "there"))
    moved = distill(tiny_config(tiny_teacher_dir, prompt_file, tmp_path / "there", validate_every=0))
    assert [p.name for p in ckpt.list_checkpoints(moved)][-1] == "step-000004"
    steps = [json.loads(line)["step"] for line in (moved / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4], "the moved run started over instead of resuming"
    assert DistillConfig.load(moved / "config.json").output == str(tmp_path / "there")


def test_no_validation_prompts_means_no_grids(tiny_teacher_dir, prompt_file, tmp_path):
    run = distill(tiny_config(tiny_teacher_dir, prompt_file, tmp_path / "run", iterations=2, validate_every=0,
                              num_validation_prompts=0))
    assert not list((run / "samples").glob("*.png"))
    assert ckpt.checkpoint_step(ckpt.latest_checkpoint(run)) == 2  # the last iterations were saved


def test_the_export_names_the_precision_the_run_trained_in(tiny_teacher_dir, prompt_file, tmp_path):
    from emd_t2i.export.layout import FACTS_FILE

    run = distill(tiny_config(tiny_teacher_dir, prompt_file, tmp_path / "run", iterations=1, validate_every=0,
                              mixed_precision="auto"))
    facts = json.loads((export_run(run, formats=("lora",)) / FACTS_FILE).read_text())
    assert facts["mixed_precision"] == "no"  # what "auto" was on this CPU, not "auto"
