"""Files the project writes are readable as the user's umask says (safetensors' save_file alone makes them 0600)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_export import make_run

from emd_t2i.data.store import encode_store
from emd_t2i.export.writer import export_run
from emd_t2i.files import current_umask, follow_umask, new_file_mode
from emd_t2i.models.teachers import load_text_encoder
from emd_t2i.training.checkpoint import save_checkpoint


@pytest.fixture
def umask(request):
    """Run the test under the umask given by parametrize, restoring the old one after."""
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("umask", [0o022, 0o027], indirect=True)
def test_exports_checkpoints_and_stores_follow_the_umask(umask, tiny_teacher_dir, tmp_path):
    expected = 0o666 & ~umask
    assert current_umask() == umask and new_file_mode() == expected

    run = make_run(tmp_path / "a", tiny_teacher_dir)  # writes a checkpoint through save_checkpoint
    export = export_run(run)
    save_checkpoint(run, 20, {"generator": {"w": torch.ones(2)}}, {"step": 20}, keep=5)
    tokenizer, text_encoder, _ = load_text_encoder(str(tiny_teacher_dir))
    encode_store(tokenizer, text_encoder, ["a cat", "a dog", "a boat"], tmp_path / "store", teacher="tiny",
                 shard_size=2)

    for folder in (run / "checkpoints", export, tmp_path / "store"):
        modes = _modes(folder)
        assert any(name.endswith(".safetensors") for name in modes), folder
        assert modes == dict.fromkeys(modes, expected), folder
    exported = _modes(export)
    assert {"pytorch_lora_weights.safetensors", "emd_lora_kohya.safetensors"} <= set(exported)
    assert any(name.startswith("pipeline/unet/") for name in exported)  # diffusers' save_pretrained too
    if umask == 0o022:  # group and others can read what was written, and nobody else can write it
        assert all(mode & 0o044 == 0o044 and mode & 0o022 == 0 for mode in exported.values())


@pytest.mark.parametrize("umask", [0o077], indirect=True)
def test_a_private_umask_stays_private(umask, tmp_path):
    save_file({"w": torch.zeros(1)}, str(tmp_path / "x.safetensors"))
    follow_umask(tmp_path)
    assert stat.S_IMODE((tmp_path / "x.safetensors").stat().st_mode) == 0o600
