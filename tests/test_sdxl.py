"""SDXL teachers: both text encoders, the pooled embedding and the time ids in every role and in guidance; a tiny
SDXL distills, resumes and exports through the CLI into folders StableDiffusionXLPipeline loads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from test_export import LATENT_ATOL, PIXEL_ATOL, RANK
from tiny import TINY_SDXL_POOLED, randomize_lora
from typer.testing import CliRunner

from emd_t2i.cli import app
from emd_t2i.data.cache import EmbeddingCache
from emd_t2i.data.embeddings import open_embeddings
from emd_t2i.emd import EMDSettings, draw, generator_step
from emd_t2i.errors import UserError
from emd_t2i.export.card import loading_snippets
from emd_t2i.export.layout import FACTS_FILE, KOHYA_FILE, LORA_FILE, PIPELINE_DIR, SCHEDULER_DIR
from emd_t2i.export.sample import sample
from emd_t2i.models.conditioning import add_time_ids
from emd_t2i.models.roles import FAKE_SCORE, GENERATOR, Roles, adapter_parameters, add_roles
from emd_t2i.models.teachers import TEACHERS, load_teacher, load_text_encoder, teacher_table
from emd_t2i.training import checkpoint as ckpt
from emd_t2i.training.config import DEFAULT_TARGET_MODULES

PROMPTS = ["a cat", "a dog on a beach"]


def _pipeline(folder):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_conditioning_is_the_pipelines_in_every_role_and_in_guidance(tiny_sdxl_teacher_dir):
    teacher = load_teacher(str(tiny_sdxl_teacher_dir), load_vae=False)
    assert teacher.is_sdxl and teacher.force_zeros_for_empty_prompt
    cache = EmbeddingCache(teacher.tokenizer, teacher.conditioning_encoder())
    cond, null = cache.get(PROMPTS), cache.null_embedding()
    pipe = _pipeline(tiny_sdxl_teacher_dir)
    hidden, neg_hidden, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                                                do_classifier_free_guidance=True)
    time_ids = torch.tensor([add_time_ids(teacher.resolution)] * 2, dtype=torch.float32)
    assert teacher.resolution == pipe.default_sample_size * pipe.vae_scale_factor  # the pipeline's default size
    assert not neg_hidden.any() and not neg_pooled.any()  # force_zeros_for_empty_prompt: the null is zeros

    add_roles(teacher.unet, RANK, RANK, DEFAULT_TARGET_MODULES)
    rng = torch.Generator().manual_seed(0)
    randomize_lora(teacher.unet, rng, 0.05)
    roles = Roles(teacher.unet, teacher.alphas_cumprod, teacher.prediction_type, 999, guidance_scale=3.0)
    x, t = torch.randn(2, 4, 8, 8, generator=rng), torch.tensor([100, 700])

    def unet(adapter, h, p):
        roles.activate(adapter)
        added = {"text_embeds": p, "time_ids": time_ids}
        return teacher.unet(x, t, encoder_hidden_states=h, added_cond_kwargs=added).sample

    with torch.no_grad():
        outputs = []
        for adapter in (None, GENERATOR, FAKE_SCORE):
            outputs.append(roles.eps(adapter, x, t, cond))
            torch.testing.assert_close(outputs[-1], unet(adapter, hidden, pooled), atol=1e-5, rtol=0)
        assert (outputs[0] - outputs[1]).abs().max() > 1e-3 and (outputs[1] - outputs[2]).abs().max() > 1e-3
        guided = roles.teacher_eps(x, t, cond, null.expand_as(cond))
        uncond = unet(None, neg_hidden, neg_pooled)
        expected = uncond + 3.0 * (unet(None, hidden, pooled) - uncond)
        torch.testing.assert_close(guided, expected, atol=1e-5, rtol=0)


def test_null_prompt_follows_force_zeros(tmp_path):
    from tiny import make_tiny_sdxl_pipeline

    folder = make_tiny_sdxl_pipeline(tmp_path / "t", force_zeros_for_empty_prompt=False)
    teacher = load_teacher(str(folder), load_vae=False)
    null = EmbeddingCache(teacher.tokenizer, teacher.conditioning_encoder()).null_embedding()
    _, neg_hidden, _, neg_pooled = _pipeline(folder).encode_prompt(
        "a cat", device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True)
    assert neg_hidden.abs().max() > 0
    torch.testing.assert_close(null[:, :-1], neg_hidden, atol=0, rtol=0)
    torch.testing.assert_close(null[:, -1, :TINY_SDXL_POOLED], neg_pooled, atol=0, rtol=0)


def test_a_precomputed_store_is_refused_for_sdxl(tiny_sdxl_teacher_dir, tmp_path):
    teacher = load_teacher(str(tiny_sdxl_teacher_dir), load_vae=False)
    with pytest.raises(UserError, match="--embeddings"):
        open_embeddings(teacher.tokenizer, teacher.conditioning_encoder(), PROMPTS, tmp_path)
    with pytest.raises(UserError, match="is SDXL"):  # `emd-t2i prompts encode` would encode one encoder only
        load_text_encoder(str(tiny_sdxl_teacher_dir))


def test_checkpointing_gives_the_same_sdxl_gradient(tiny_sdxl_teacher_dir):
    """The pooled embeds and time ids reach every checkpointed block's recomputation (docs/ALGORITHM.md, 8)."""
    grads = []
    for checkpointing in (False, True):
        teacher = load_teacher(str(tiny_sdxl_teacher_dir), load_vae=False)
        torch.manual_seed(0)
        add_roles(teacher.unet, RANK, RANK, DEFAULT_TARGET_MODULES)
        rng = torch.Generator().manual_seed(1)
        randomize_lora(teacher.unet, rng, 0.05)
        roles = Roles(teacher.unet, teacher.alphas_cumprod, teacher.prediction_type, 399, guidance_scale=3.0)
        if checkpointing:
            roles.enable_gradient_checkpointing()
        teacher.unet.train()  # diffusers checkpoints only in training mode
        cache = EmbeddingCache(teacher.tokenizer, teacher.conditioning_encoder())
        cond = cache.get(PROMPTS)
        settings = EMDSettings(num_steps=2, gamma_eps=0.5, gamma_z=0.1)
        draws = draw(settings, (2, 4, 8, 8), torch.Generator().manual_seed(2))
        generator, teacher_eps, fake_eps = roles.bind(cond, cache.null_embedding().expand_as(cond))
        generator_step(generator, teacher_eps, fake_eps, roles.alphas_cumprod, draws, settings).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in adapter_parameters(teacher.unet, GENERATOR)]))
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5 * float(grads[0].abs().max()), rtol=1e-4)


def _distill_args(teacher_dir, prompt_file, out, iterations: int) -> list[str]:
    return ["distill", "--teacher", str(teacher_dir), "--prompts", str(prompt_file), "--output", str(out),
            "--iterations", str(iterations), "--batch-size", "2", "--num-langevin-steps", "2", "--gamma-z", "0.1",
            "--generator-rank", str(RANK), "--fake-rank", str(RANK), "--fake-updates", "1", "--t-star", "999",
            "--guidance-scale", "2.0", "--generator-lr", "0.01", "--log-every", "1", "--validate-every", "0",
            "--checkpoint-every", "1", "--device", "cpu"]


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")
def test_sdxl_distills_resumes_and_exports_through_the_cli(tiny_sdxl_teacher_dir, prompt_file, tmp_path,
                                                           monkeypatch):
    from diffusers import DDIMScheduler

    out, runner = tmp_path / "run", CliRunner()
    result = runner.invoke(app, _distill_args(tiny_sdxl_teacher_dir, prompt_file, out, 1) + ["--no-export"])
    assert result.exit_code == 0, result.output
    assert ckpt.checkpoint_step(ckpt.latest_checkpoint(out)) == 1
    result = runner.invoke(app, _distill_args(tiny_sdxl_teacher_dir, prompt_file, out, 2))  # resumes, exports
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2]
    export = out / "export"
    facts = json.loads((export / FACTS_FILE).read_text())
    assert facts["pipeline_class"] == "StableDiffusionXLPipeline" and facts["t_star"] == 999
    assert json.loads((export / PIPELINE_DIR / "model_index.json").read_text())["_class_name"] == (
        "StableDiffusionXLPipeline")
    card = (export / "README.md").read_text()
    assert str(tiny_sdxl_teacher_dir.resolve()) in card and "t* = 999" in card

    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["sample", PROMPTS[1], "--model", str(export), "--seed", "4", "--device", "cpu",
                                 "--output", str(tmp_path / "png")])
    assert result.exit_code == 0, result.output
    ours = sample(PROMPTS[1], model=export, seed=4)
    with Image.open(tmp_path / "png" / "0000-a-dog-on-a-beach.png") as png:
        assert np.array_equal(np.asarray(png), np.asarray(ours.images[0]))
    lora_pipe = _pipeline(tiny_sdxl_teacher_dir)
    lora_pipe.load_lora_weights(export, weight_name=LORA_FILE)
    lora_pipe.scheduler = DDIMScheduler.from_pretrained(export, subfolder=SCHEDULER_DIR)
    for pipe in (_pipeline(export / PIPELINE_DIR), lora_pipe):
        kwargs = {"num_inference_steps": 1, "guidance_scale": 0.0}
        latents = pipe(PROMPTS[1], output_type="latent", generator=torch.Generator("cpu").manual_seed(4),
                       **kwargs).images
        torch.testing.assert_close(latents.float(), ours.latents, atol=LATENT_ATOL, rtol=0)
        image = pipe(PROMPTS[1], generator=torch.Generator("cpu").manual_seed(4), **kwargs).images[0]
        assert np.abs(np.asarray(image, dtype=int) - np.asarray(ours.images[0], dtype=int)).max() <= PIXEL_ATOL
    bare = _pipeline(tiny_sdxl_teacher_dir)(PROMPTS[1], output_type="latent", num_inference_steps=1,
                                            guidance_scale=0.0, generator=torch.Generator("cpu").manual_seed(4))
    assert bare.images.abs().max() > 0  # (the LoRA's effect on the latents is asserted below, per UNet call)

    # The kohya file is the same LoRA as the diffusers one, as diffusers' SDXL loader reads it.
    kohya = _pipeline(tiny_sdxl_teacher_dir)
    kohya.load_lora_weights(export, weight_name=KOHYA_FILE)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    added = {"text_embeds": torch.randn(1, TINY_SDXL_POOLED), "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]])}
    cond = torch.randn(1, 77, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        outs = [p.unet(z, torch.tensor([999]), encoder_hidden_states=cond, added_cond_kwargs=added).sample
                for p in (kohya, lora_pipe)]
        lora_pipe.unet.disable_lora()
        plain = lora_pipe.unet(z, torch.tensor([999]), encoder_hidden_states=cond, added_cond_kwargs=added).sample
    torch.testing.assert_close(outs[0], outs[1], atol=1e-6, rtol=0)
    assert (plain - outs[1]).abs().max() > 1e-4  # the distilled LoRA really changes the UNet
    keys = load_file(str(export / KOHYA_FILE))
    assert all(k.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_"))
               for k in keys)  # Stability's names, as kohya's SDXL trainer writes them (tests/test_kohya.py)
    with safe_open(str(export / KOHYA_FILE), "pt") as f:
        assert f.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"  # AUTOMATIC1111 lists it under SDXL

    # The card's snippets are the SDXL ones.
    assert loading_snippets(export.as_posix(), facts["teacher_source"],
                            "StableDiffusionXLPipeline")["pipeline"] in card


def test_teachers_lists_sdxl_with_its_hub_id():
    row = next(r for r in teacher_table() if r["name"] == "sdxl")
    assert row["id"] == TEACHERS["sdxl"].id == "stabilityai/stable-diffusion-xl-base-1.0"
    assert (row["resolution"], row["prediction_type"]) == (1024, "epsilon")
    result = CliRunner().invoke(app, ["teachers"])
    assert result.exit_code == 0 and "stabilityai/stable-diffusion-xl-base-1.0" in result.output
