"""Evaluation on the toy domain: real images score as real, a collapsed generator is caught."""

import numpy as np
import torch

from emd_t2i.evaluation.toy import toy_report
from emd_t2i.toy import metrics, modes


def real_source(prompts, seed):
    return torch.cat([metrics.real_images_for_prompt(p, 1, seed=seed + 1000 + i) for i, p in enumerate(prompts)])


def collapsed_source(prompts, seed):
    """Right attributes, but every image of a prompt is the same picture (no diversity)."""
    return torch.cat([metrics.real_images_for_prompt(p, 1, seed=7) for p in prompts])


def test_real_images_score_as_real():
    report = toy_report(real_source, n=96, diversity_images=48, diversity_samples=48)
    assert report["prompt_accuracy"]["all"] > 0.95
    assert 0.7 < report["diversity_ratio"]["mean"] < 1.4
    assert 0.8 < report["diversity"]["mean"] < 1.25 and len(report["diversity"]["per_prompt"]) == 3


def test_a_collapsed_generator_is_caught():
    sizes = {"n": 96, "diversity_images": 48, "diversity_samples": 48}
    real, collapsed = toy_report(real_source, **sizes), toy_report(collapsed_source, **sizes)
    assert collapsed["prompt_accuracy"]["all"] > 0.95  # adherence alone cannot see collapse ...
    assert collapsed["diversity_ratio"]["mean"] < 0.1  # ... diversity can
    assert collapsed["diversity"]["mean"] < 0.1
    assert collapsed["frechet_distance_to_real"] > 2 * real["frechet_distance_to_real"]


def test_diversity_says_which_spread_is_missing():
    """A source that draws sizes like the data but always centres the shape lacks cx / cy spread, not size."""
    from dataclasses import replace

    from emd_t2i.toy import domain

    def centred_source(prompts, seed):
        shape, colour, background = domain.parse_prompt(prompts[0])
        attrs = domain.sample_attributes(len(prompts), seed, shape=shape, colour=colour, background=background)
        middle = np.full_like(attrs.cx, 16)
        return domain.render(replace(attrs, cx=middle, cy=middle))

    geometry = metrics.mean_diversity(centred_source, metrics.diversity_prompts(2), samples=64)["geometry"]
    assert geometry["cx"] < 0.2 and geometry["cy"] < 0.2
    assert 0.7 < geometry["size"] < 1.4


def test_mode_coverage_tells_a_collapsed_student_from_a_covering_one():
    """Under-specified prompts ("a shape": 24 modes ... "a blue square": 2): real images against other real images
    sit at the sampling floor and recall every mode; one picture per prompt recalls one mode and has no entropy."""
    sizes = {"n": 48, "diversity_images": 16, "diversity_prompts": 0, "coverage_samples": 96}

    def teacher(prompts, seed):
        return real_source(prompts, seed + 5000)

    real = toy_report(real_source, teacher=teacher, **sizes)["mode_coverage"]
    collapsed = toy_report(collapsed_source, teacher=teacher, **sizes)["mode_coverage"]
    assert set(real["prompts"]) == set(modes.UNDERSPECIFIED_PROMPTS)
    assert abs(real["mean"]["tv"] - real["mean"]["tv_floor"]) < 4 * real["mean"]["tv_se"]
    assert real["mean"]["modes_recalled"] > 0.9 and real["mean"]["entropy_ratio"] > 0.9
    assert collapsed["mean"]["entropy_ratio"] == 0 and collapsed["mean"]["tv"] > 0.5
    one_mode = np.mean([1 / r["teacher_modes"] for r in collapsed["prompts"].values()])
    assert abs(collapsed["mean"]["modes_recalled"] - one_mode) < 0.05
    assert collapsed["mean"]["tv"] > real["mean"]["tv"] + 10 * collapsed["mean"]["tv_se"]


def test_shape_fidelity_sits_beside_accuracy_in_the_report():
    report = toy_report(real_source, n=48, diversity_images=16, diversity_prompts=0)
    assert report["mode_coverage"] is None  # no teacher given
    assert report["shape_fidelity"]["mean"] > 0.97 and report["shape_fidelity"]["where_shape_correct"] > 0.97


def test_student_and_teacher_samples_draw_different_noise():
    seen = {}

    def source(name):
        def generate(prompts, seed):
            seen[name] = seed
            return real_source(prompts, seed)
        return generate

    report = modes.coverage_report(source("student"), source("teacher"), prompts=("a circle",), n=8, seed=3)
    assert seen == {"student": 3, "teacher": 3 + modes.TEACHER_SEED_OFFSET}
    assert report["prompts"]["a circle"]["n_student"] == report["prompts"]["a circle"]["n_teacher"] == 8
