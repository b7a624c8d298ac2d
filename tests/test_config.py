"""The config is resolved in one place: user flags over the teacher's preset over the dataclass defaults."""

import pytest

from emd_t2i.errors import UserError
from emd_t2i.training.config import PRESETS, DistillConfig, build_config, resolve_mixed_precision


def test_toy_preset_applies_under_the_user_flags():
    toy = build_config(teacher="toy")
    for name, value in PRESETS["toy"].items():
        assert getattr(toy, name) == value, name
    assert toy.t_star == 800 != DistillConfig.t_star  # the sweep's choice for the toy, not the global default
    mine = build_config(teacher="toy", t_star=999, iterations=None)  # None = flag not given
    assert mine.t_star == 999 and mine.iterations == PRESETS["toy"]["iterations"]


def test_other_teachers_get_the_plain_defaults(tmp_path):
    cfg = build_config(teacher=str(tmp_path))
    assert cfg == DistillConfig(teacher=str(tmp_path))
    assert cfg.t_star == 999  # EMD_ALGORITHM.md (G1)


@pytest.mark.parametrize("t_star", [0, 1000])
def test_t_star_outside_the_schedule_is_a_user_error(t_star):
    with pytest.raises(UserError, match="--t-star"):
        build_config(teacher="toy", t_star=t_star)


def test_unknown_lr_schedule_is_a_user_error():
    with pytest.raises(UserError, match="--lr-schedule must be one of constant, cosine"):
        build_config(teacher="toy", lr_schedule="linear")


def test_iterations_resume_freely_only_under_a_constant_lr():
    """A cosine schedule decays over --iterations: changing them mid-run would bend the curve, so it is refused."""
    constant = build_config(teacher="toy", lr_schedule="constant")
    assert constant.differences(build_config(teacher="toy", lr_schedule="constant", iterations=800)) == []
    cosine = build_config(teacher="toy", lr_schedule="cosine")
    assert cosine.differences(build_config(teacher="toy", lr_schedule="cosine", iterations=800)) == ["--iterations"]


@pytest.mark.parametrize(
    "value, device_type, bf16, expected",
    [("auto", "cuda", True, "bf16"), ("auto", "cuda", False, "fp16"), ("auto", "cpu", True, "no"),
     ("auto", "mps", False, "no"), ("fp16", "cuda", True, "fp16"), ("bf16", "cpu", False, "bf16"),
     ("no", "cuda", True, "no")],
)
def test_auto_mixed_precision_resolves_by_device_and_explicit_values_stay(value, device_type, bf16, expected):
    assert resolve_mixed_precision(value, device_type, bf16) == expected


def test_auto_is_the_default_mixed_precision_and_unknown_values_name_the_flag():
    assert DistillConfig().mixed_precision == "auto"
    with pytest.raises(UserError, match="--mixed-precision must be one of auto, no, fp16, bf16"):
        DistillConfig(mixed_precision="fp8")


@pytest.mark.parametrize("warmup, message", [(-1, "--lr-warmup must be >= 0"),
                                             (100, "--lr-warmup must be < --iterations")])
def test_lr_warmup_outside_the_run_is_a_user_error(warmup, message):
    with pytest.raises(UserError, match=message):
        DistillConfig(iterations=100, lr_warmup=warmup)
    assert DistillConfig(iterations=100, lr_warmup=99).lr_warmup == 99


def test_profiling_can_be_switched_on_a_resumed_run_but_warmup_cannot():
    run = DistillConfig()
    assert run.differences(DistillConfig(profile=True)) == []
    assert run.differences(DistillConfig(lr_warmup=10)) == ["--lr-warmup"]


def test_config_json_without_the_new_fields_still_loads(tmp_path):
    """A config.json written before --lr-warmup / --profile existed resumes with their defaults."""
    old = {k: v for k, v in build_config(teacher="toy").to_dict().items() if k not in ("lr_warmup", "profile")}
    cfg = DistillConfig.from_dict(old)
    assert cfg.lr_warmup == 0 and cfg.profile is False and cfg == build_config(teacher="toy")


def test_z_step_and_weighting_reach_the_e_step_and_bad_values_are_refused():
    from emd_t2i.choices import WEIGHTINGS, Z_STEPS
    from emd_t2i.training.run import emd_settings

    for z_step in Z_STEPS:
        assert emd_settings(build_config(teacher="toy", z_step=z_step)).z_step == z_step
    for weighting in WEIGHTINGS:
        assert emd_settings(build_config(teacher="toy", weighting=weighting)).weighting == weighting
    with pytest.raises(UserError, match="--z-step must be one of constant, snr"):
        build_config(teacher="toy", z_step="linear")
