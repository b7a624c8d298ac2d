"""SD 2.1 (768 px, v-prediction) end to end: the EMD gradient does not depend on what the UNet predicts, and a
v-prediction teacher distills, resumes and exports through the CLI into folders plain diffusers loads."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file
from test_export import LATENT_ATOL, PIXEL_ATOL, RANK
from tiny import randomize_lora
from typer.testing import CliRunner

from emd_t2i.cli import app
from emd_t2i.emd import EMDSettings, draw, generator_step
from emd_t2i.export.layout import FACTS_FILE, KOHYA_FILE, LORA_FILE, PIPELINE_DIR, SCHEDULER_DIR
from emd_t2i.export.sample import sample
from emd_t2i.models.roles import GENERATOR, Roles, adapter_parameters, add_roles
from emd_t2i.models.teachers import TEACHERS, load_teacher, teacher_table
from emd_t2i.schedule import alpha_sigma
from emd_t2i.training import checkpoint as ckpt
from emd_t2i.training.config import DEFAULT_TARGET_MODULES

PROMPT = "a red car at night"


class VFromEps(torch.nn.Module):
    """The same UNet, re-parameterised: returns v = alpha_t eps - sigma_t x0 = (eps - sigma_t x_t) / alpha_t from
    its eps output (x0 the eps-model's own x0-prediction)."""

    def __init__(self, unet: torch.nn.Module, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.unet, self.alphas_cumprod = unet, alphas_cumprod

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def forward(self, x_t, t, encoder_hidden_states, **kwargs):
        eps = self.unet(x_t, t, encoder_hidden_states=encoder_hidden_states, **kwargs).sample
        alpha_t, sigma_t = alpha_sigma(self.alphas_cumprod, t, like=eps)
        return SimpleNamespace(sample=((eps.double() - sigma_t * x_t.double()) / alpha_t).to(eps.dtype))


def _generator_gradient(roles: Roles, settings: EMDSettings, cond, uncond, seed: int) -> list[torch.Tensor]:
    params = adapter_parameters(roles.unet, GENERATOR)
    for p in params:
        p.grad = None
    draws = draw(settings, (2, 4, 8, 8), torch.Generator().manual_seed(seed))
    generator, teacher_eps, fake_eps = roles.bind(cond, uncond)
    step = generator_step(generator, teacher_eps, fake_eps, roles.alphas_cumprod, draws, settings)
    step.loss.backward()
    roles.activate(None)
    return [p.grad.detach().clone() for p in params]


def test_a_v_model_and_its_eps_equivalent_give_the_same_emd_gradient(tiny_teacher_dir):
    """EpsModel's v -> eps conversion is the only place that knows the parameterisation: a UNet wrapped to predict
    v (from its own eps) gives, as a "v_prediction" model, the generator gradient the bare UNet gives as
    "epsilon" (through the E-step's teacher and fake score, (G1) at t* and the M-step (M1))."""
    teacher = load_teacher(str(tiny_teacher_dir), load_vae=False)
    add_roles(teacher.unet, RANK, RANK, DEFAULT_TARGET_MODULES)
    rng = torch.Generator().manual_seed(0)
    randomize_lora(teacher.unet, rng, 0.05)  # non-zero adapters: the three roles differ
    cond = torch.randn(2, 77, teacher.cross_attention_dim, generator=rng)
    uncond = torch.randn(1, 77, teacher.cross_attention_dim, generator=rng).expand_as(cond)
    settings = EMDSettings(num_steps=2, gamma_eps=0.5, gamma_z=0.1, t_min=20, t_max=980)
    eps_roles = Roles(teacher.unet, teacher.alphas_cumprod, "epsilon", 800, 2.0)
    v_roles = Roles(VFromEps(teacher.unet, teacher.alphas_cumprod), teacher.alphas_cumprod, "v_prediction", 800,
                    2.0)
    v_roles.unet = teacher.unet  # Roles.unet is where adapter_parameters looks: the same weights for both

    eps_grad = _generator_gradient(eps_roles, settings, cond, uncond, seed=3)
    v_grad = _generator_gradient(v_roles, settings, cond, uncond, seed=3)
    scale = max(float(g.abs().max()) for g in eps_grad)
    assert scale > 0
    for a, b in zip(eps_grad, v_grad):
        torch.testing.assert_close(b, a, atol=1e-4 * scale, rtol=1e-3)
    # A v-model read as eps (the conversion skipped) gives another gradient: the test can fail.
    wrong = Roles(VFromEps(teacher.unet, teacher.alphas_cumprod), teacher.alphas_cumprod, "epsilon", 800, 2.0)
    wrong.unet = teacher.unet
    wrong_grad = _generator_gradient(wrong, settings, cond, uncond, seed=3)
    assert max(float((a - b).abs().max()) for a, b in zip(eps_grad, wrong_grad)) > 0.1 * scale


def _distill_args(teacher_dir, prompt_file, out, iterations: int) -> list[str]:
    return ["distill", "--teacher", str(teacher_dir), "--prompts", str(prompt_file), "--output", str(out),
            "--iterations", str(iterations), "--batch-size", "2", "--num-langevin-steps", "2", "--gamma-z", "0.1",
            "--generator-rank", str(RANK), "--fake-rank", str(RANK), "--fake-updates", "1", "--t-star", "700",
            "--guidance-scale", "2.0", "--log-every", "1", "--validate-every", "0", "--checkpoint-every", "1",
            "--device", "cpu"]


def test_v_prediction_teacher_distills_resumes_and_exports_through_the_cli(tiny_vpred_teacher_dir, prompt_file,
                                                                            tmp_path, monkeypatch):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    out = tmp_path / "run"
    runner = CliRunner()
    result = runner.invoke(app, _distill_args(tiny_vpred_teacher_dir, prompt_file, out, 1) + ["--no-export"])
    assert result.exit_code == 0, result.output
    assert ckpt.checkpoint_step(ckpt.latest_checkpoint(out)) == 1
    result = runner.invoke(app, _distill_args(tiny_vpred_teacher_dir, prompt_file, out, 2))  # resumes, exports
    assert result.exit_code == 0, result.output
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    export = out / "export"
    facts = json.loads((export / FACTS_FILE).read_text())
    assert facts["prediction_type"] == "v_prediction" and facts["t_star"] == 700 and facts["step"] == 2
    assert facts["formats"] == ["lora", "pipeline", "kohya"]
    for folder in (export / SCHEDULER_DIR, export / PIPELINE_DIR / "scheduler"):
        scheduler = DDIMScheduler.from_pretrained(folder)
        assert scheduler.config.prediction_type == "v_prediction"
        scheduler.set_timesteps(1)
        assert scheduler.timesteps.tolist() == [700]
    card = (export / "README.md").read_text()
    assert str(tiny_vpred_teacher_dir.resolve()) in card and "t* = 700" in card

    # `emd-t2i sample` and plain diffusers (pipeline folder; teacher + LoRA + one-step scheduler) agree.
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["sample", PROMPT, "--model", str(export), "--seed", "4", "--device", "cpu",
                                 "--output", str(tmp_path / "png")])
    assert result.exit_code == 0, result.output
    ours = sample(PROMPT, model=export, seed=4)
    with Image.open(tmp_path / "png" / "0000-a-red-car-at-night.png") as png:
        assert np.array_equal(np.asarray(png), np.asarray(ours.images[0]))
    pipe = StableDiffusionPipeline.from_pretrained(export / PIPELINE_DIR)
    lora_pipe = StableDiffusionPipeline.from_pretrained(tiny_vpred_teacher_dir, safety_checker=None)
    lora_pipe.load_lora_weights(export, weight_name=LORA_FILE)
    lora_pipe.scheduler = DDIMScheduler.from_pretrained(export, subfolder=SCHEDULER_DIR)
    for p in (pipe, lora_pipe):
        p.set_progress_bar_config(disable=True)
        kwargs = {"num_inference_steps": 1, "guidance_scale": 0.0}
        latents = p(PROMPT, output_type="latent", generator=torch.Generator("cpu").manual_seed(4), **kwargs).images
        torch.testing.assert_close(latents.float(), ours.latents, atol=LATENT_ATOL, rtol=0)
        image = p(PROMPT, generator=torch.Generator("cpu").manual_seed(4), **kwargs).images[0]
        assert np.abs(np.asarray(image, dtype=int) - np.asarray(ours.images[0], dtype=int)).max() <= PIXEL_ATOL

    # The kohya file is the same LoRA as the diffusers one, as diffusers reads it.
    kohya = StableDiffusionPipeline.from_pretrained(tiny_vpred_teacher_dir, safety_checker=None)
    kohya.load_lora_weights(export, weight_name=KOHYA_FILE)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = kohya.unet(z, torch.tensor([700]), encoder_hidden_states=cond).sample
        b = lora_pipe.unet(z, torch.tensor([700]), encoder_hidden_states=cond).sample
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert all(k.startswith("lora_unet_") for k in load_file(str(export / KOHYA_FILE)))


def test_teachers_lists_sd21_with_its_hub_id():
    row = next(r for r in teacher_table() if r["name"] == "sd-2.1")
    assert row["id"] == TEACHERS["sd-2.1"].id == "stabilityai/stable-diffusion-2-1"
    assert (row["resolution"], row["prediction_type"]) == (768, "v_prediction")
    result = CliRunner().invoke(app, ["teachers"])
    assert result.exit_code == 0 and "stabilityai/stable-diffusion-2-1 " in result.output
