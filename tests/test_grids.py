"""Validation grids: a labelled row per prompt with the teacher's N-step image beside the student's (the layout, not
the pixels), the teacher's images made once per run, for SD and SDXL teachers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from test_train import tiny_config
from tiny import randomize_lora

from emd_t2i.images import grid_layout, labelled_grid
from emd_t2i.models.roles import Roles, add_roles
from emd_t2i.models.teachers import load_teacher
from emd_t2i.training import grids
from emd_t2i.training.loop import distill


def _white(box, grid) -> bool:
    return bool((np.asarray(grid.crop(box)) == 255).all())


def _layout_of(grid, rows: int, columns: int, side: int):
    """The layout a grid was drawn with (its titles took one to three lines)."""
    found = [layout for lines in (1, 2, 3) if (layout := grid_layout(rows, columns, (side, side), title_lines=lines))
             .size == grid.size]
    assert len(found) == 1, grid.size
    return found[0]


@pytest.mark.parametrize("side, scale", [(16, 8), (32, 4), (200, 1), (512, 1)])
def test_small_images_are_scaled_up_and_every_part_has_its_own_place(side, scale):
    layout = grid_layout(3, 2, (side, side), min_side=128)
    assert layout.scale == scale and min(b[2] - b[0] for row in layout.cells for b in row) >= min(128, side)
    boxes = layout.titles + layout.labels + [b for row in layout.cells for b in row]
    for i, a in enumerate(boxes):  # nothing overlaps, everything is on the canvas
        assert 0 <= a[0] < a[2] <= layout.size[0] and 0 <= a[1] < a[3] <= layout.size[1]
        for b in boxes[i + 1:]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (a, b)
    for r, row in enumerate(layout.cells):
        label = layout.labels[r]
        assert label[2] <= row[0][0] and row[0][2] <= row[1][0]  # label, then column 0, then column 1
        assert label[1] == row[0][1] == row[1][1]  # on one line
        assert [t[0] for t in layout.titles] == [c[0] for c in row]  # titles over their columns


def test_the_grid_draws_labels_titles_and_the_images_where_the_layout_says():
    rng = np.random.default_rng(0)
    images = [[Image.fromarray(rng.integers(0, 200, (16, 16, 3), dtype=np.uint8)) for _ in range(2)] for _ in range(3)]
    labels = ["a red fox in the snow, a rather long prompt that has to wrap over more than one line", "a cat", "a dog"]
    grid = labelled_grid(images, labels, ["teacher: 25 DDIM steps, guidance 1.75", "student"])
    layout = _layout_of(grid, 3, 2, 16)
    assert layout.scale == 8 and layout.titles[0][3] > grid_layout(3, 2, (16, 16)).titles[0][3]  # a wrapped title
    for r, row in enumerate(layout.cells):
        assert not _white(layout.labels[r], grid)  # the prompt is written
        for c, box in enumerate(row):
            expected = images[r][c].resize((box[2] - box[0], box[3] - box[1]), Image.NEAREST)
            assert np.array_equal(np.asarray(grid.crop(box)), np.asarray(expected)), (r, c)
    assert not any(_white(t, grid) for t in layout.titles)


def test_a_run_grid_shows_teacher_and_student_and_makes_the_teacher_images_once(tiny_teacher_dir, prompt_file,
                                                                                tmp_path, monkeypatch):
    cfg = tiny_config(tiny_teacher_dir, prompt_file, tmp_path / "run", iterations=4, validate_every=2)
    distill(cfg, stop_after=2)
    samples = tmp_path / "run" / "samples"
    made = sorted(p.name for p in (samples / "teacher").iterdir())
    assert made == ["000.png", "001.png", "002.png", grids.RECORD]
    first = np.asarray(Image.open(samples / "step-000002.png"))

    def no_sampling(*args, **kwargs):
        raise AssertionError("the teacher's grid images were sampled again on resume")

    monkeypatch.setattr(grids, "teacher_images", no_sampling)
    distill(cfg)  # resumes at 2, validates at 4 with the kept teacher images
    last = Image.open(samples / "step-000004.png")
    layout = _layout_of(last, cfg.num_validation_prompts, 2, 16)  # a row per prompt, teacher and student
    teacher_column = [b[0] for b in layout.cells]
    for box in teacher_column:  # the teacher's images are the same in every grid of the run
        assert np.array_equal(np.asarray(last.crop(box)), first[box[1]:box[3], box[0]:box[2]])
    student = [b[1] for b in layout.cells]
    assert any(not np.array_equal(np.asarray(last.crop(b)), first[b[1]:b[3], b[0]:b[2]]) for b in student)


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")
def test_the_teacher_images_of_an_sdxl_run_are_its_pipelines(tiny_sdxl_teacher_dir, tmp_path):
    """SDXL too: with the run's adapters on the UNet but off, the grid's teacher images are what
    StableDiffusionXLPipeline with DDIM makes from the same latents."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    teacher = load_teacher(str(tiny_sdxl_teacher_dir))
    add_roles(teacher.unet, 4, 4, ("to_q", "to_v"))
    randomize_lora(teacher.unet, torch.Generator().manual_seed(0), 0.5)
    Roles(teacher.unet, teacher.alphas_cumprod, teacher.prediction_type, 999).activate(None)
    prompts, seeds = ["a cat", "a dog on a beach"], [3, 4]
    z = torch.stack([torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(s)) for s in seeds])
    ours = grids.teacher_reference(teacher, prompts, seeds, z, 2.0, tmp_path / "teacher", steps=3)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_teacher_dir)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(prompts, num_inference_steps=3, guidance_scale=2.0, latents=z).images
    for a, b in zip(ours, expected):
        assert np.array_equal(np.asarray(a), np.asarray(b))
