"""`emd-t2i eval` checks every file its metrics read before the first image is made, and never mixes two models'
images in one FID; `emd-t2i coco reference` checks the images before the weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from test_eval_coco import StandInInception, annotation_file, reference_dir, tiny_clip  # noqa: F401 (a fixture)
from test_export import make_run
from typer.testing import CliRunner

from emd_t2i.cli import app
from emd_t2i.errors import UserError
from emd_t2i.evaluation import fid
from emd_t2i.evaluation.coco import Extractors, evaluate_coco
from emd_t2i.export.writer import export_run


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EMD_T2I_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fid, "CLEANFID_DIR", tmp_path / "cleanfid")
    return tmp_path / "cache"


def evaluate(model, tmp_path, reference, **kwargs):
    captions = tmp_path / "captions.txt"
    captions.write_text("a red fox\na lighthouse\n")
    extractors = kwargs.pop("extractors", Extractors(fid.Extractor("stand-in inception", StandInInception()),
                                                     tiny_clip()))
    return evaluate_coco(model, prompts=str(captions), reference=reference, output=tmp_path / "eval", seed=0,
                         batch_size=2, device="cpu", speed_teacher_steps=0, speed_repeats=1, num_workers=0,
                         extractors=extractors, progress=False, **kwargs)


def refused_before_any_image(tmp_path, reference, match: str, **kwargs) -> None:
    """The model is never opened (it does not exist): the check came first."""
    with pytest.raises(UserError, match=match):
        evaluate(tmp_path / "no-model-here", tmp_path, reference, **kwargs)
    assert not (tmp_path / "eval" / "images").exists()


def test_a_damaged_inception_file_is_one_line_before_generation(tmp_path, reference_dir):  # noqa: F811
    weights = tmp_path / "inception-2015-12-05.pt"
    weights.write_bytes(b"PK\x03\x04 not a torchscript archive")
    refused_before_any_image(tmp_path, reference_dir, "does not load as clean-fid's Inception.*--inception-weights",
                             extractors=Extractors(clip=tiny_clip()), inception_weights=weights)


def test_an_empty_reference_folder_is_one_line_before_generation(tmp_path):
    (tmp_path / "val2014").mkdir()
    refused_before_any_image(tmp_path, tmp_path / "val2014", "--reference .*val2014 holds 0 images")


def test_a_bad_reference_npz_is_one_line_before_generation(tmp_path, reference_dir):  # noqa: F811
    (tmp_path / "garbage.npz").write_bytes(b"not numpy")
    refused_before_any_image(tmp_path, tmp_path / "garbage.npz", "garbage.npz is not a statistics file")
    other = fid.stats_of(np.random.default_rng(0).normal(size=(5, 4)), {"extractor": "another network",
                                                                        "transform": fid.TRANSFORM})
    other.save(tmp_path / "other.npz")
    refused_before_any_image(tmp_path, tmp_path / "other.npz", "other.npz was computed with 'another network'")


def test_a_wrong_clip_file_is_one_line_before_generation(tmp_path, reference_dir):  # noqa: F811
    inception = Extractors(inception=fid.Extractor("stand-in inception", StandInInception()))
    small = tmp_path / "open_clip_model.safetensors"  # a CLIP, but not ViT-g-14
    save_file({"visual.proj": torch.zeros(32, 16), "text_projection": torch.zeros(32, 16)}, str(small))
    refused_before_any_image(tmp_path, reference_dir, "are not open_clip ViT-g-14", extractors=inception,
                             clip_weights=small)
    (tmp_path / "open_clip_pytorch_model.bin").write_bytes(b"\x80\x02 truncated pickle")
    refused_before_any_image(tmp_path, reference_dir, "do not load", extractors=inception,
                             clip_weights=tmp_path / "open_clip_pytorch_model.bin")


def test_coco_reference_checks_the_images_before_the_weights(tmp_path):
    (tmp_path / "val2014").mkdir()
    result = CliRunner().invoke(app, ["coco", "reference", str(tmp_path / "val2014"), "--device", "cpu"])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert "IMAGES" in result.output and "holds 0 images" in result.output and "Inception" not in result.output


def test_a_re_export_into_the_same_folder_is_another_model_to_the_resume_guard(tmp_path, tiny_teacher_dir,
                                                                              reference_dir):  # noqa: F811
    export = export_run(make_run(tmp_path / "a", tiny_teacher_dir, seed=0), output=tmp_path / "export",
                        formats=("pipeline",))
    assert evaluate(export, tmp_path, reference_dir)["images"]["count"] == 2
    export_run(make_run(tmp_path / "b", tiny_teacher_dir, seed=1), output=export, formats=("pipeline",),
               overwrite=True)  # other weights, the same folder
    with pytest.raises(UserError, match="other settings.*weights_sha256"):
        evaluate(export, tmp_path, reference_dir)
