"""Sampling: finding the export, the teacher's N-step image beside the generator's, and writing the PNGs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_export import GUIDANCE, make_run

from emd_t2i.errors import UserError
from emd_t2i.export.layout import FACTS_FILE, PIPELINE_DIR
from emd_t2i.export.sample import resolve_model, sample, save_samples
from emd_t2i.export.writer import export_run


@pytest.fixture(scope="module")
def export(tmp_path_factory, tiny_teacher_dir):
    run = make_run(tmp_path_factory.mktemp("sample"), tiny_teacher_dir)
    return export_run(run, formats=("pipeline",))


def test_teacher_images_beside_the_generator_and_the_pngs(export, tiny_teacher_dir, tmp_path):
    """The teacher's N-step images are plain diffusers' (same noise, same code: exact), and get saved."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    prompts = ["A Red Circle!", "a blue square"]
    samples = sample(prompts, model=export, seed=5, teacher_steps=2, batch_size=1)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_teacher_dir)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    reference = pipe(prompts, num_inference_steps=2, guidance_scale=GUIDANCE,
                     generator=torch.Generator("cpu").manual_seed(5)).images
    for ours, theirs in zip(samples.teacher_images, reference):
        assert np.array_equal(np.asarray(ours), np.asarray(theirs))
    assert not np.array_equal(np.asarray(samples.images[0]), np.asarray(samples.teacher_images[0]))

    paths = save_samples(samples, tmp_path / "out")
    assert [p.name for p in paths] == [
        "0000-a-red-circle.png", "0000-a-red-circle-teacher2.png", "0000-a-red-circle-side.png",
        "0001-a-blue-square.png", "0001-a-blue-square-teacher2.png", "0001-a-blue-square-side.png", "grid.png"]
    w, h = samples.images[0].size
    with Image.open(paths[2]) as side:
        assert side.size == (2 * w, h)  # [generator | teacher]
    with Image.open(paths[-1]) as grid:
        assert grid.size == (2 * w, 2 * h)  # a row per prompt
    with Image.open(paths[3]) as second:
        assert (second.text["prompt"], second.text["seed"], second.text["index"]) == ("a blue square", "5", "1")


def test_resolve_model_finds_exports(export, tmp_path, monkeypatch):
    run = export.parent
    assert resolve_model(export) == export
    assert resolve_model(run) == export  # a run folder means its export/
    assert resolve_model(export / PIPELINE_DIR) == export / PIPELINE_DIR
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="--model"):
        resolve_model(None)
    for name, mtime in (("new", 2_000_000_000), ("old", 1_000_000_000)):
        copy = shutil.copytree(export, tmp_path / "runs" / name / "export")
        os.utime(copy, (mtime, mtime))
    assert resolve_model(None) == Path("runs/new/export")
    with pytest.raises(UserError, match="not an export folder"):
        resolve_model(tmp_path)


def test_a_bare_pipeline_folder_samples_but_has_no_teacher(export, tmp_path):
    bare_dir = shutil.copytree(export / PIPELINE_DIR, tmp_path / "bare")  # without the export's emd_t2i.json
    bare = sample("a red circle", model=bare_dir, seed=1)
    full = sample("a red circle", model=export, seed=1)
    torch.testing.assert_close(bare.latents, full.latents, atol=0, rtol=0)
    with pytest.raises(UserError, match=FACTS_FILE):
        sample("a red circle", model=bare_dir, teacher_steps=1)


def test_user_errors(export, tmp_path):
    with pytest.raises(UserError, match="--num-images"):
        sample("x", model=export, num_images=0)
    with pytest.raises(UserError, match="prompt"):
        sample([], model=export)
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / FACTS_FILE).write_text("{}")
    with pytest.raises(UserError, match="--format pipeline"):
        resolve_model(tmp_path)
