"""Presets: every one is a valid config, known models get theirs by name, hub id or folder, and the CLI shows them."""

import dataclasses
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from emd_t2i.cli import app
from emd_t2i.models.teachers import TEACHERS, TOY_TEACHER_DIR, alphas_cumprod_from_config
from emd_t2i.training.config import PRESETS, DistillConfig, build_config
from emd_t2i.training.presets import TABLES, architecture_preset, preset_name

SD_WIDTHS = [320, 640, 1280, 1280]


def write_folder(path, cross_attention_dim=768, block_out_channels=SD_WIDTHS, sample_size=64,
                 prediction_type="epsilon", in_channels=4):
    """Only the JSON a fingerprint reads, with the values diffusers writes for SD 1.5 / 2.x-base."""
    (path / "unet").mkdir(parents=True)
    (path / "scheduler").mkdir()
    (path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (path / "unet" / "config.json").write_text(json.dumps({
        "_class_name": "UNet2DConditionModel", "cross_attention_dim": cross_attention_dim,
        "block_out_channels": block_out_channels, "sample_size": sample_size, "in_channels": in_channels,
    }))
    (path / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": prediction_type}))
    return path


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_is_a_valid_config_of_known_flags(name):
    fields = {f.name for f in dataclasses.fields(DistillConfig)}
    assert set(PRESETS[name]) <= fields
    cfg = build_config(preset=name)
    assert all(getattr(cfg, k) == v for k, v in PRESETS[name].items())
    if name in TEACHERS:  # a teacher's own preset is also what --teacher alone gives
        assert dataclasses.replace(build_config(teacher=name), preset=name) == build_config(teacher=name, preset=name)


@pytest.mark.parametrize("name", list(PRESETS))
def test_no_preset_moves_z_with_a_step_fixed_across_t(name):
    """A constant z step is unstable at small t or frozen at large t (docs/ALGORITHM.md, "The z step")."""
    cfg = build_config(preset=name)
    assert cfg.gamma_z == 0 or cfg.z_step != "constant", (cfg.gamma_z, cfg.z_step)


def test_toy_emd_is_the_chain_measured_at_equal_iterations():
    """--preset toy-emd runs exactly the study's z-moving point (benchmarks/em_study.sh emd_k2_z), and the toy
    preset exactly its DMD point at the quickstart's length: the configs recorded with their scores."""
    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "study22"
    untimed = {"output", "seed", "prompts", "preset", "checkpoint_every", "keep_checkpoints", "validate_every",
               "log_every", "jacobian_every"}  # where a run writes and watches, and a field it did not use
    for preset, point, iterations in (("toy-emd", "emd_k2_z", 2000), ("toy", "dmd", 600)):
        ran = json.loads((results / f"{point}_s0_2000.json").read_text())["config"]
        now = build_config(preset=preset).to_dict()
        assert ran["prompts"] == "prompts/toy.txt" and now["prompts"] == "toy"  # the same captions, in order
        assert now["iterations"] == iterations
        unused = {"z_step"} if now["gamma_z"] == 0 else set()  # z does not move: its step rule is never read
        drift = {k: (ran.get(k), now[k]) for k in now if k not in untimed | unused | {"iterations"} and ran.get(k) != now[k]}
        assert not drift, drift
    assert build_config(teacher="toy-emd").preset is None and preset_name("toy-emd") is None  # not a teacher


def test_an_unknown_preset_is_one_line():
    result = CliRunner().invoke(app, ["distill", "--preset", "toy-long", "--dry-run"])
    assert result.exit_code == 2
    assert "--preset must be one of toy, toy-emd, sd-1.5" in result.output and "Traceback" not in result.output


def test_sd_presets_hold_the_issue_values():
    sd15 = build_config(teacher="sd-1.5")
    assert (sd15.t_star, sd15.fake_updates, sd15.ema_decay, sd15.guidance_scale) == (800, 5, 0.999, 1.75)
    assert (sd15.lr_schedule, sd15.lr_warmup, sd15.iterations) == ("cosine", 500, 20000)
    assert (sd15.mixed_precision, sd15.gradient_checkpointing, sd15.batch_size) == ("auto", True, 4)
    assert {"conv_in", "conv_out", "linear_1"} <= set(sd15.target_modules)
    assert PRESETS["sd-2.1-base"] == PRESETS["sd-1.5"]  # same latents, schedule and eps-prediction
    assert build_config(teacher="toy").mixed_precision == "no"  # the sweep's recorded runs were fp32
    sd21 = build_config(teacher="sd-2.1")  # 768 px: SD 2.1 base's values at half the batch
    assert {**PRESETS["sd-2.1"], "batch_size": 4} == PRESETS["sd-2.1-base"] and sd21.batch_size == 2
    sdxl = build_config(teacher="sdxl")  # DMD2's one-step SDXL: conditioning timestep 399, guidance 8
    assert (sdxl.t_star, sdxl.guidance_scale, sdxl.batch_size, sdxl.mixed_precision) == (399, 8.0, 2, "auto")
    assert sdxl.gradient_checkpointing


def test_g1_amplification_quoted_for_t_star_is_that_of_sds_schedule():
    """(G1) carries an eps error into x0 times sigma/alpha; presets.py quotes 14.61 at 999, 5.11 at 800."""
    abar = alphas_cumprod_from_config(
        {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"})
    ratio = ((1 - abar) / abar).sqrt()
    assert [round(float(ratio[t]), 2) for t in (999, 900, 800, 700)] == [14.61, 8.35, 5.11, 3.33]


@pytest.mark.parametrize(
    "config, expected",
    [({}, "sd-1.5"), ({"cross_attention_dim": 1024}, "sd-2.1-base"),
     ({"cross_attention_dim": 1024, "sample_size": 96, "prediction_type": "v_prediction"}, "sd-2.1"),  # 768 px
     ({"cross_attention_dim": 2048, "block_out_channels": [320, 640, 1280], "sample_size": 128}, "sdxl"),
     ({"prediction_type": "v_prediction"}, None), ({"in_channels": 9}, None),  # inpainting
     ({"block_out_channels": [32, 64]}, None), ({"cross_attention_dim": 2048}, None)],
)
def test_folders_are_recognised_by_their_architecture(tmp_path, config, expected):
    assert architecture_preset(write_folder(tmp_path / "teacher", **config)) == expected


def test_folders_missing_configs_get_no_preset(tmp_path):
    folder = write_folder(tmp_path / "teacher")
    (folder / "scheduler" / "scheduler_config.json").write_text("{not json")
    assert architecture_preset(folder) is None
    (folder / "model_index.json").unlink()
    assert architecture_preset(folder) is None
    assert architecture_preset(tmp_path / "nothing") is None


def test_names_hub_ids_and_folders_map_to_presets(tmp_path):
    assert preset_name("sd-1.5") == "sd-1.5" and preset_name("toy") == "toy"
    assert preset_name(TEACHERS["sd-1.5"].id) == "sd-1.5"
    assert preset_name(TEACHERS["sd-2.1-base"].id) == "sd-2.1-base"
    assert preset_name(TEACHERS["sd-2.1"].id) == "sd-2.1" and preset_name(TEACHERS["sdxl"].id) == "sdxl"
    assert preset_name("someone/some-model") is None
    assert preset_name(str(TOY_TEACHER_DIR)) == "toy"
    assert preset_name(str(write_folder(tmp_path / "sd15"))) == "sd-1.5"
    assert preset_name(str(tmp_path)) is None


def test_a_local_sd15_folder_gets_the_sd15_preset_under_the_user_flags(tmp_path):
    folder = str(write_folder(tmp_path / "sd15"))
    cfg = build_config(teacher=folder, t_star=900)
    assert cfg == DistillConfig(**{**PRESETS["sd-1.5"], "teacher": folder, "t_star": 900})


def test_distill_help_shows_the_defaults_each_preset_uses():
    result = CliRunner().invoke(app, ["distill", "--help"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.replace("│", " ").split())  # undo rich's boxes and wrapping
    assert "[default: 999; presets: toy 800, toy-emd 800, sd-1.5 800, sd-2.1-base 800, sd-2.1 800, sdxl 399]" in text
    assert "[default: 0; presets: sd-1.5 500, sd-2.1-base 500, sd-2.1 500, sdxl 500]" in text  # --lr-warmup
    assert "[default: auto; presets: toy no, toy-emd no, sd-1.5 auto, sd-2.1-base auto, sd-2.1 auto, sdxl auto]" in text
    assert "[default: 20]" in text  # --t-min: no preset sets it


def test_dry_run_names_the_preset_and_the_precision_without_the_network(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    args = ["distill", "--prompts", str(prompts), "--device", "cpu", "--dry-run"]
    result = CliRunner().invoke(app, [*args, "--teacher", "sd-1.5"])  # HF_HUB_OFFLINE=1 (conftest)
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    end = lines.index("}") + 1
    config, summary, reasons = lines[:end], lines[end], lines[end + 1:]
    assert json.loads("\n".join(config)) == build_config(teacher="sd-1.5", prompts=str(prompts), device="cpu").to_dict()
    assert summary == "preset: sd-1.5; mixed precision: auto -> no on this machine (cpu)"
    # every preset value the run keeps, with why and where it was measured (the table in training/presets.py)
    assert len(reasons) == len(TABLES["sd-1.5"]) and reasons[0].startswith("  --t-star 800: ")
    assert all(line.rstrip().endswith("]") for line in reasons)

    other = tmp_path / "other"
    other.mkdir()
    (other / "model_index.json").write_text("{}")
    result = CliRunner().invoke(app, [*args, "--teacher", str(other), "--mixed-precision", "bf16"])
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == (
        "no preset: plain defaults; mixed precision: bf16 -> bf16 on this machine (cpu)")  # no preset, no reasons


def test_a_preset_warmup_longer_than_the_run_names_the_flag():
    result = CliRunner().invoke(app, ["distill", "--teacher", "sd-1.5", "--iterations", "100", "--dry-run"])
    assert result.exit_code == 2
    assert "--lr-warmup must be < --iterations (got 500 >= 100)" in result.output
