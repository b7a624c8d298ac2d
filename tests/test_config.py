"""The config is resolved in one place: user flags over the teacher's preset over the dataclass defaults."""

import pytest

from emd_t2i.config import PRESETS, DistillConfig, build_config
from emd_t2i.errors import UserError


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
