"""Teacher registry, resolution and loading on the tiny pipeline; every user mistake is one UserError."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from emd_t2i.errors import UserError
from emd_t2i.models import teachers
from emd_t2i.models.teachers import TEACHERS, load_teacher, resolve_teacher, teacher_table
from emd_t2i.schedule import sd_alphas_cumprod


@pytest.fixture(scope="module")
def tiny_teacher(tiny_teacher_dir):
    return load_teacher(str(tiny_teacher_dir))


def _edited_copy(src, dst, filename, edit):
    """A copy of the tiny folder with one json file changed by `edit(dict) -> dict`."""
    shutil.copytree(src, dst)
    path = dst / filename
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    return dst


# --- loading ------------------------------------------------------------------------------------------


def test_loads_tiny_folder(tiny_teacher, tiny_teacher_dir):
    t = tiny_teacher
    assert t.source == str(tiny_teacher_dir)
    assert t.prediction_type == "epsilon"
    assert (t.latent_channels, t.latent_size, t.cross_attention_dim) == (4, 8, 32)
    assert t.vae_scale_factor == 2 ** (len(t.vae.config.block_out_channels) - 1) == 2
    assert t.scaling_factor == t.vae.config.scaling_factor
    assert t.resolution == 16
    assert t.tokenizer.model_max_length == 77
    assert type(t.scheduler).__name__ == "PNDMScheduler"


def test_frozen_and_eval(tiny_teacher):
    for module in (tiny_teacher.unet, tiny_teacher.text_encoder, tiny_teacher.vae):
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())


def test_alphas_cumprod_is_sd_schedule(tiny_teacher):
    assert tiny_teacher.alphas_cumprod.dtype == torch.float64
    torch.testing.assert_close(tiny_teacher.alphas_cumprod, sd_alphas_cumprod(), rtol=0, atol=1e-12)


def test_dtype_and_no_vae(tiny_teacher_dir):
    t = load_teacher(str(tiny_teacher_dir), dtype=torch.bfloat16, load_vae=False)
    assert t.vae is None
    assert t.vae_scale_factor == 2  # from the vae config alone
    assert t.unet.dtype == torch.bfloat16 and t.text_encoder.dtype == torch.bfloat16


def test_v_prediction(tiny_vpred_teacher_dir):
    assert load_teacher(str(tiny_vpred_teacher_dir), load_vae=False).prediction_type == "v_prediction"


# --- registry and resolution --------------------------------------------------------------------------


def test_registry_names_resolve_to_hub_ids():
    assert resolve_teacher("sd-1.5") == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert resolve_teacher("sd-2.1-base") == "stabilityai/stable-diffusion-2-1-base"
    assert resolve_teacher("sd-2.1") == "stabilityai/stable-diffusion-2-1"
    assert TEACHERS["sd-2.1"].prediction_type == "v_prediction" and TEACHERS["sd-2.1"].resolution == 768


def test_hub_id_and_folder_resolve(tiny_teacher_dir):
    assert resolve_teacher("someone/some-model") == "someone/some-model"
    assert resolve_teacher(str(tiny_teacher_dir)) == str(tiny_teacher_dir)


def test_toy_missing_says_how_to_train(monkeypatch, tmp_path):
    monkeypatch.setattr(teachers, "TOY_TEACHER_DIR", tmp_path / "absent")
    with pytest.raises(UserError, match="emd-t2i toy train-teacher"):
        resolve_teacher("toy")


def test_toy_present(monkeypatch, tiny_teacher_dir):
    monkeypatch.setattr(teachers, "TOY_TEACHER_DIR", tiny_teacher_dir)
    assert resolve_teacher("toy") == str(tiny_teacher_dir)
    row = next(r for r in teacher_table() if r["name"] == "toy")
    assert (row["resolution"], row["prediction_type"]) == (16, "epsilon")


def test_teacher_table_lists_registry():
    rows = teacher_table()
    assert [r["name"] for r in rows] == list(TEACHERS)
    assert all({"id", "resolution", "prediction_type", "description", "licence"} <= r.keys() for r in rows)


# --- user errors --------------------------------------------------------------------------------------


def test_unknown_name_lists_registry():
    with pytest.raises(UserError, match="unknown teacher 'sd-9'.*sd-1.5, sd-2.1-base, sd-2.1, sdxl, toy"):
        resolve_teacher("sd-9")


def test_missing_path(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        resolve_teacher(str(tmp_path / "a" / "b"))


def test_folder_without_model_index(tmp_path):
    with pytest.raises(UserError, match=re.escape(str(tmp_path)) + ".*model_index.json"):
        load_teacher(str(tmp_path))


def test_file_is_not_a_folder(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(UserError, match="not a folder"):
        load_teacher(str(weights))


def test_hub_id_offline_not_cached(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        UserError, match="not in the local cache and offline.*huggingface-cli download emd-t2i"
    ):
        load_teacher("emd-t2i-tests/not-a-real-model")


def test_other_pipelines_are_not_supported(tiny_teacher_dir, tmp_path):
    folder = _edited_copy(
        tiny_teacher_dir,
        tmp_path / "sd3",
        "model_index.json",
        lambda d: {**d, "_class_name": "StableDiffusion3Pipeline"},
    )
    with pytest.raises(
        UserError, match="StableDiffusion3Pipeline, which is not supported.*StableDiffusionPipeline"
    ):
        load_teacher(str(folder))


def test_sdxl_label_on_an_sd_unet_is_refused(tiny_teacher_dir, tmp_path):
    """An SDXL pipeline needs a UNet conditioned on pooled embeds and time ids (not a refiner, not SD's)."""
    folder = _edited_copy(
        tiny_teacher_dir,
        tmp_path / "xl",
        "model_index.json",
        lambda d: {**d, "_class_name": "StableDiffusionXLPipeline"},
    )
    with pytest.raises(UserError, match="only the full SDXL base pipeline"):
        load_teacher(str(folder))


def test_unet_without_cross_attention(tiny_teacher_dir, tmp_path):
    folder = _edited_copy(
        tiny_teacher_dir,
        tmp_path / "uncond",
        "unet/config.json",
        lambda d: {**d, "_class_name": "UNet2DModel"},
    )
    with pytest.raises(UserError, match="without text cross-attention"):
        load_teacher(str(folder))


def test_unsupported_prediction_type(tiny_teacher_dir, tmp_path):
    folder = _edited_copy(
        tiny_teacher_dir,
        tmp_path / "x0",
        "scheduler/scheduler_config.json",
        lambda d: {**d, "prediction_type": "sample"},
    )
    with pytest.raises(UserError, match="predicts 'sample'"):
        load_teacher(str(folder))


def test_missing_component_names_it(tiny_teacher_dir, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(tiny_teacher_dir, folder)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(UserError, match=re.escape(f"{folder} has no readable unet/")):
        load_teacher(str(folder), load_vae=False)
