"""Mode coverage (TV, modes recalled, entropy ratio, bootstrap s.e.) and shape fidelity on samples of known law."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from emd_t2i.toy import domain, modes


def labels(counts: dict[tuple[int, ...], int]) -> np.ndarray:
    """Exactly `count` rows of each mode: the empirical law equals the intended one."""
    return np.array([m for m, c in counts.items() for _ in range(c)])


def draw(probs: list[float], n: int, seed: int) -> np.ndarray:
    """n labels (mode index, mode index // 2) from `probs`, two attributes per row like (shape, colour)."""
    index = np.random.default_rng(seed).choice(len(probs), size=n, p=probs)
    return np.stack([index, index // 2], 1)


def test_identical_samples_have_no_distance_and_full_coverage():
    teacher = draw([0.4, 0.3, 0.2, 0.1], 800, seed=0)
    out = modes.mode_coverage(teacher, teacher.copy())
    assert out["tv"] == 0 and out["modes_recalled"] == 1 and out["entropy_ratio"] == pytest.approx(1)
    assert out["teacher_modes"] == out["student_modes"] == 4


def test_two_samples_of_one_law_differ_only_by_sampling_error():
    """Independent samples of the same law: TV is its finite-sample floor within the s.e., recall 1, entropy 1."""
    probs = [0.25, 0.25, 0.2, 0.15, 0.1, 0.05]
    for seed in range(3):
        out = modes.mode_coverage(draw(probs, 2000, 2 * seed), draw(probs, 2000, 2 * seed + 1), seed=seed)
        assert abs(out["tv"] - out["tv_floor"]) < 3 * out["tv_se"], out
        assert out["tv"] < 0.06 and out["modes_recalled"] == 1
        assert abs(out["entropy_ratio"] - 1) < 3 * out["entropy_ratio_se"], out


def test_a_student_that_drops_a_mode():
    """Teacher uniform over 4 modes, student uniform over 3 of them: TV = 1/2 (3 |1/3 - 1/4| + 1/4) = 1/4 exactly."""
    teacher = labels({(0, 0, 0): 300, (1, 0, 1): 300, (2, 1, 0): 300, (0, 3, 1): 300})
    student = labels({(0, 0, 0): 200, (1, 0, 1): 200, (2, 1, 0): 200})
    out = modes.mode_coverage(student, teacher)
    assert out["tv"] == pytest.approx(0.25, abs=1e-12)
    assert out["modes_recalled"] == pytest.approx(0.75)
    assert out["entropy_ratio"] == pytest.approx(math.log(3) / math.log(4))
    assert out["tv_se"] > 0 and out["student_modes"] == 3 and out["teacher_modes"] == 4


def test_recall_needs_a_third_of_the_teacher_frequency():
    teacher = labels({(0,): 50, (1,): 50})
    assert modes.mode_coverage(labels({(0,): 84, (1,): 16}), teacher)["modes_recalled"] == 0.5  # 0.16 < 0.5 / 3
    assert modes.mode_coverage(labels({(0,): 83, (1,): 17}), teacher)["modes_recalled"] == 1.0  # 0.17 >= 0.5 / 3


def test_entropy_ratio_of_a_point_mass_and_a_uniform():
    uniform = labels({(m,): 100 for m in range(8)})
    point = labels({(3,): 800})
    assert modes.mode_coverage(point, uniform)["entropy_ratio"] == 0
    assert modes.mode_coverage(uniform, uniform)["entropy_ratio"] == pytest.approx(1)
    half = labels({(m,): 100 for m in range(4)})
    assert modes.mode_coverage(half, uniform)["entropy_ratio"] == pytest.approx(math.log(4) / math.log(8))
    assert modes.mode_coverage(point, uniform)["modes_recalled"] == pytest.approx(1 / 8)
    assert modes.mode_coverage(point, uniform)["tv"] == pytest.approx(7 / 8)


def test_bootstrap_standard_error_shrinks_like_one_over_sqrt_n():
    teacher = {(0,): 4, (1,): 3, (2,): 2, (3,): 1}
    student = {(0,): 6, (1,): 2, (2,): 1, (3,): 1}
    small = modes.mode_coverage(labels({m: 50 * c for m, c in student.items()}),
                                labels({m: 50 * c for m, c in teacher.items()}))
    large = modes.mode_coverage(labels({m: 200 * c for m, c in student.items()}),
                                labels({m: 200 * c for m, c in teacher.items()}))
    assert small["tv"] == pytest.approx(large["tv"]) == pytest.approx(0.2)
    for name in ("tv", "entropy_ratio"):
        assert 1.6 < small[f"{name}_se"] / large[f"{name}_se"] < 2.5  # 4x the samples: half the s.e.
    assert large["tv_floor"] < small["tv_floor"] < small["tv"]


def test_mode_coverage_is_seeded_and_accepts_tensors_and_tuples():
    student, teacher = draw([0.5, 0.3, 0.2], 300, 1), draw([0.4, 0.4, 0.2], 300, 2)
    a = modes.mode_coverage(student, teacher, seed=7)
    assert a == modes.mode_coverage(torch.from_numpy(student), [tuple(r) for r in teacher], seed=7)
    assert a["tv_se"] != modes.mode_coverage(student, teacher, seed=8)["tv_se"]


# ---------------------------------------------------------------- shape fidelity
def blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    r = int(3 * sigma) + 1
    k = torch.exp(-torch.arange(-r, r + 1).float() ** 2 / (2 * sigma**2))
    k = k / k.sum()
    x = F.conv2d(F.pad(images, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).repeat(3, 1, 1, 1), groups=3)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1).repeat(3, 1, 1, 1), groups=3)


def rounded_squares(attrs: domain.Attributes, p: float) -> torch.Tensor:
    """Blobby squares: the superellipse |dx|^p + |dy|^p <= s^p (p = 2 a circle, p -> inf the square)."""
    grid = np.arange(domain.IMAGE_SIZE) + 0.5
    dx = np.abs(grid[None, None, :] - attrs.cx[:, None, None]) / attrs.size[:, None, None]
    dy = np.abs(grid[None, :, None] - attrs.cy[:, None, None]) / attrs.size[:, None, None]
    fg = np.asarray([domain.COLOUR_RGB[c] for c in domain.COLOURS], np.float32)[attrs.colour]
    bg = np.asarray([domain.BACKGROUND_RGB[b] for b in domain.BACKGROUNDS], np.float32)[attrs.background]
    inside = (dx**p + dy**p <= 1)[:, None]
    return torch.from_numpy(np.where(inside, fg[:, :, None, None], bg[:, :, None, None]) * 2 - 1)


def test_shape_fidelity_is_one_for_ideal_shapes_and_finds_their_geometry():
    attrs = domain.sample_attributes(120, seed=11)
    images = domain.render(attrs)
    score = modes.shape_fidelity(images, attrs.shape)
    assert score.shape == (120,) and float(score.mean()) > 0.98 and float(score.min()) > 0.93
    geometry = modes.mask_geometry(modes.foreground(images) >= 0.5)
    truth = torch.from_numpy(np.stack([attrs.cx, attrs.cy, attrs.size], 1))
    assert float((geometry - truth).abs().mean()) < 0.35  # pixels, before the sub-pixel refinement


def test_shape_fidelity_is_clearly_lower_for_blurred_blobby_or_wrong_shapes():
    """Measured: ideal 1.0, superellipse p = 2.5 0.87, circle as square 0.83; a 1-px Gaussian blur 0.85 soft
    (0.99 hard: thresholded, a blurred square is still a square)."""
    squares = domain.sample_attributes(60, seed=12, shape=1)
    images = domain.render(squares)
    ideal = float(modes.shape_fidelity(images, squares.shape).mean())
    blobby = float(modes.shape_fidelity(rounded_squares(squares, 2.5), squares.shape).mean())
    circles = domain.sample_attributes(60, seed=13, shape=0)
    as_square = float(modes.shape_fidelity(domain.render(circles), np.ones(60, int)).mean())
    assert ideal > 0.98 and float(modes.shape_fidelity(images, squares.shape, soft=True).mean()) > 0.98
    assert blobby < 0.9 and as_square < 0.87, (blobby, as_square)
    blurred = blur(images, 1.0)
    assert float(modes.shape_fidelity(blurred, squares.shape, soft=True).mean()) < 0.9
    assert float(modes.shape_fidelity(blurred, squares.shape).mean()) > 0.95
    # an empty image (background only) has no shape at all
    assert float(modes.shape_fidelity(torch.ones(1, 3, 32, 32), [1])[0]) == 0
