"""Toy metrics: the shipped attribute classifier, prompt accuracy, Frechet distance, and the shipped teacher."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from emd_t2i.toy import CLASSIFIER_PATH, TEACHER_DIR, domain, metrics

needs_classifier = pytest.mark.skipif(not CLASSIFIER_PATH.exists(), reason="classifier weights not shipped")


@pytest.fixture(scope="module")
def held_out():
    attrs = domain.sample_attributes(
        1000, seed=123_457
    )  # seeds disjoint from the classifier's training seeds
    return domain.render(attrs), attrs


@needs_classifier
def test_classifier_accuracy_on_held_out_real_images(held_out):
    images, attrs = held_out
    accuracy = metrics.attribute_accuracy(images, attrs)
    assert all(accuracy[a] > 0.98 for a in metrics.ATTRIBUTES), accuracy


@needs_classifier
def test_classifier_geometry_is_accurate(held_out):
    images, attrs = held_out
    predicted = metrics.predict(images)["geometry"]
    truth = torch.from_numpy(np.stack([attrs.cx, attrs.cy, attrs.size], 1)).float()
    assert (predicted - truth).abs().mean(0).max() < 1.0  # pixels


@needs_classifier
def test_prompt_accuracy_is_high_for_matching_and_low_for_wrong_prompts(held_out):
    images, attrs = held_out
    right = domain.captions(attrs, seed=0)
    wrong = domain.captions(domain.Attributes(
        (attrs.shape + 1) % 3, (attrs.colour + 1) % 4, (attrs.background + 1) % 2, attrs.cx, attrs.cy, attrs.size
    ))  # fmt: skip
    assert metrics.prompt_accuracy(images, right)["all"] > 0.95
    assert all(v < 0.05 for v in metrics.prompt_accuracy(images, wrong).values())


@needs_classifier
def test_diversity_ratio_is_one_for_real_and_small_for_collapsed():
    prompt = "a red circle on a white background"
    real_a = metrics.real_images_for_prompt(prompt, 200, seed=1)
    real_b = metrics.real_images_for_prompt(prompt, 200, seed=2)
    collapsed = real_a[:1].repeat(200, 1, 1, 1)
    assert abs(metrics.diversity_ratio(real_a, real_b)["mean"] - 1) < 0.2
    assert metrics.diversity_ratio(collapsed, real_b)["mean"] < 0.05


@needs_classifier
def test_frechet_distance_is_zero_on_itself_and_large_for_other_data(held_out):
    images, _ = held_out
    other = metrics.real_images_for_prompt("a blue square on a black background", 500, seed=5)
    same = metrics.classifier_frechet_distance(images[:500], images[:500])
    fresh = metrics.classifier_frechet_distance(images[:500], images[500:])
    different = metrics.classifier_frechet_distance(images[:500], other)
    assert abs(same) < 1e-6
    assert different > 10 * fresh


def test_frechet_distance_of_gaussians_matches_closed_form():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(20000, 4, generator=gen)
    b = 2 * torch.randn(20000, 4, generator=gen) + 1
    # ||mu||^2 = 4, trace term = 4 * (1 + 4 - 2 * 2) = 4.
    assert abs(metrics.frechet_distance(a, b) - 8.0) < 0.3


def test_evaluation_prompts_cover_every_attribute_triple():
    prompts = metrics.evaluation_prompts(48, seed=0)
    assert len({domain.parse_prompt(p) for p in prompts}) == 24


@pytest.mark.skipif(not (TEACHER_DIR / "model_index.json").exists(), reason="toy teacher not shipped")
def test_shipped_teacher_loads_offline_and_is_small():
    from diffusers import StableDiffusionPipeline

    size_mb = sum(f.stat().st_size for f in TEACHER_DIR.rglob("*") if f.is_file()) / 2**20
    assert size_mb <= 30, size_mb
    pipe = StableDiffusionPipeline.from_pretrained(str(TEACHER_DIR))
    assert pipe.safety_checker is None
    assert (
        pipe.scheduler.config.beta_schedule == "scaled_linear"
        and pipe.scheduler.config.prediction_type == "epsilon"
    )
    assert pipe.vae_scale_factor == 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    assert pipe.vae.config.scaling_factor != 0.18215  # measured from the latents, not copied from SD
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    images = metrics.sample_teacher(pipe, ["a red circle on a white background"] * 2, steps=2, guidance=3.0)
    assert images.shape == (2, 3, 32, 32) and images.min() >= -1 and images.max() <= 1


@pytest.mark.slow
def test_recipe_resumes_and_exports_a_loadable_pipeline(tmp_path):
    import json

    from tools.train_toy_teacher import TeacherRecipe, train_teacher

    recipe = TeacherRecipe(num_images=32, vae_steps=2, vae_batch_size=4, unet_steps=2, batch_size=4)
    out, ckpt = tmp_path / "teacher", tmp_path / "ckpt"
    train_teacher(out, ckpt, recipe)
    assert json.loads((out / "toy_teacher.json").read_text())["step"] == 2
    train_teacher(
        out, ckpt, TeacherRecipe(**{**recipe.__dict__, "unet_steps": 3})
    )  # the same command, resumed
    assert json.loads((out / "toy_teacher.json").read_text())["step"] == 3
    assert not (tmp_path / "teacher.tmp").exists() and not (tmp_path / "teacher.old").exists()
    pipe = metrics.load_pipeline(out)
    assert (
        pipe.vae.config.scaling_factor
        == torch.load(ckpt / "latents.pt", weights_only=False)["scaling_factor"]
    )
    images = metrics.sample_teacher(pipe, ["red circle, black background"], steps=2, guidance=3.0)
    assert images.shape == (1, 3, 32, 32)
    # fine-tuning on partial captions from that teacher keeps its VAE and latent scale and starts from its weights
    tuned = tmp_path / "tuned"
    train_teacher(tuned, tmp_path / "ckpt2", TeacherRecipe(**{**recipe.__dict__, "unet_steps": 1,
                                                              "attribute_dropout": 0.5, "init_from": str(out)}))
    meta, after = json.loads((tuned / "toy_teacher.json").read_text()), metrics.load_pipeline(tuned)
    assert meta["initialised_from"]["step"] == 3 and meta["recipe"]["attribute_dropout"] == 0.5
    assert after.vae.config.scaling_factor == pipe.vae.config.scaling_factor
    assert all(torch.equal(a, b) for a, b in zip(after.vae.state_dict().values(), pipe.vae.state_dict().values()))
    moved = [float((a - b).abs().max()) for a, b in zip(after.unet.state_dict().values(), pipe.unet.state_dict().values())]
    assert 0 < max(moved) < 0.1  # one small step away from the initial teacher, not a fresh model


@pytest.mark.slow
def test_cli_trains_a_tiny_toy_teacher(tmp_path):
    from typer.testing import CliRunner

    from emd_t2i.cli import app
    from emd_t2i.models.teachers import load_teacher

    out = tmp_path / "teacher"
    args = [
        "toy",
        "train-teacher",
        "--output",
        str(out),
        "--checkpoints",
        str(tmp_path / "ckpt"),
        "--num-images",
        "32",
        "--vae-steps",
        "2",
        "--unet-steps",
        "2",
        "--batch-size",
        "4",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert load_teacher(str(out)).latent_size == 8
    assert CliRunner().invoke(app, [*args[:2], "--unet-steps", "0"]).exit_code == 2


def test_teacher_batches_leave_each_attribute_out_at_the_recipe_rate():
    from tools.tokenizer import clip_tokenizer
    from tools.train_toy_teacher import NULL_PROMPT, TeacherRecipe, caption_table, draw_batch

    tokens, index = caption_table(clip_tokenizer())
    texts = list(dict.fromkeys(domain.all_captions() + domain.partial_captions())) + [NULL_PROMPT]
    text_of = {tuple(row.tolist()): text for row, text in zip(tokens, texts)}
    combos = torch.from_numpy(np.stack(np.unravel_index(np.arange(600) % 24, (3, 4, 2)), 1))
    data = {"mean": torch.zeros(600, 4, 8, 8), "std": torch.ones(600, 4, 8, 8), "combo": combos,
            "scaling_factor": 1.0}
    for rate in (0.0, 0.3):
        recipe = TeacherRecipe(batch_size=2000, attribute_dropout=rate, caption_dropout=0.1)
        batch = draw_batch(data, tokens, index, recipe, torch.Generator().manual_seed(0))
        captions = [text_of[tuple(row.tolist())] for row in batch["tokens"]]
        named = [domain.parse_prompt(c) for c in captions if c != NULL_PROMPT]
        assert abs(1 - len(named) / len(captions) - 0.1) < 0.02  # dropout to the null prompt
        missing = np.array([[v is None for v in attrs] for attrs in named]).mean(0)
        assert np.all(np.abs(missing - rate) < 0.035), (rate, missing)
