"""Export: the LoRA, pipeline and kohya files load in plain diffusers and give the generator's (G1) images."""

from __future__ import annotations

import functools
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny import randomize_lora

from emd_t2i.errors import UserError
from emd_t2i.export.card import EXAMPLE_PROMPT, client_table, loading_snippets, method_name
from emd_t2i.export.layout import FACTS_FILE, FACTS_PREFIX, KOHYA_FILE, LORA_FILE, PIPELINE_DIR, SCHEDULER_DIR
from emd_t2i.export.sample import initial_noise, sample
from emd_t2i.export.writer import export_run
from emd_t2i.files import save_safetensors
from emd_t2i.models.roles import (
    FAKE_SCORE,
    GENERATOR,
    Roles,
    adapter_state_dict,
    add_roles,
    load_adapter_state_dict,
)
from emd_t2i.models.teachers import load_teacher
from emd_t2i.training.checkpoint import GENERATOR_EMA, save_checkpoint
from emd_t2i.training.config import DEFAULT_TARGET_MODULES, DistillConfig

RANK = 4
GUIDANCE = 2.0
# fp32 on CPU: fused weights and diffusers' DDIM arithmetic change eps by ~1e-6, and
# x0 = (z - sigma eps) / alpha multiplies that by sigma / alpha (~15 at t* = 999): latents agree to ~2e-5.
LATENT_ATOL = 1e-4
PIXEL_ATOL = 1  # uint8 levels: diffusers maps [-1, 1] to pixels as (x / 2 + 0.5) * 255, we as (x + 1) * 127.5
DOCS = Path(__file__).resolve().parents[1] / "docs" / "EXPORT.md"


# ---------------------------------------------------------------------------------------------------------
# A distilled tiny model: the tiny teacher, its LoRA roles with random non-zero weights, a run folder
# ---------------------------------------------------------------------------------------------------------


def _random_roles(teacher_dir: Path, seed: int):
    teacher = load_teacher(str(teacher_dir), load_vae=False)
    add_roles(teacher.unet, RANK, RANK, DEFAULT_TARGET_MODULES)
    rng = torch.Generator().manual_seed(seed)
    randomize_lora(teacher.unet, rng, 0.1)  # B = 0 at init would hide every export bug
    return teacher


def make_run(root: Path, teacher_dir: Path, *, t_star: int = 999, seed: int = 0) -> Path:
    """A run folder in the checkpoint layout whose generator LoRA is random and non-zero."""
    teacher = _random_roles(teacher_dir, seed)
    run = root / "run"
    run.mkdir(parents=True)
    cfg = DistillConfig(teacher=str(teacher_dir), output=str(run), t_star=t_star, guidance_scale=GUIDANCE,
                        generator_rank=RANK, fake_rank=RANK, iterations=20)
    cfg.save(run / "config.json")
    adapters = {GENERATOR: adapter_state_dict(teacher.unet, GENERATOR),
                FAKE_SCORE: adapter_state_dict(teacher.unet, FAKE_SCORE)}
    save_checkpoint(run, 10, adapters, {"step": 10}, keep=2)
    return run


def generator_latents(run: Path, prompts: list[str], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(G1) as training computes it: the teacher UNet + the checkpoint's adapter, through Roles.generator;
    and the same with the adapter's weights zeroed (the bare teacher's x0-prediction at t*)."""
    from diffusers import StableDiffusionPipeline

    cfg = DistillConfig.load(run / "config.json")
    teacher = load_teacher(cfg.teacher, load_vae=False)
    add_roles(teacher.unet, RANK, RANK, cfg.target_modules)
    state = load_file(str(run / "checkpoints" / "step-000010" / f"{GENERATOR}.safetensors"))
    load_adapter_state_dict(teacher.unet, GENERATOR, state)
    pipe = StableDiffusionPipeline(teacher.vae, teacher.text_encoder, teacher.tokenizer, teacher.unet,
                                   teacher.scheduler, None, None, requires_safety_checker=False)
    with torch.no_grad():
        cond, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
        size = teacher.latent_size
        z = initial_noise((len(prompts), 4, size, size), seed, "cpu", cond.dtype)
        roles = Roles(teacher.unet, teacher.alphas_cumprod, teacher.prediction_type, cfg.t_star)
        with_lora = roles.generator(z, cond)
        load_adapter_state_dict(teacher.unet, GENERATOR, {k: torch.zeros_like(v) for k, v in state.items()})
        return with_lora, roles.generator(z, cond)


@pytest.fixture(scope="module")
def eps_export(tmp_path_factory, tiny_teacher_dir):
    """(run, export) for an epsilon teacher at t* = 999, every format."""
    run = make_run(tmp_path_factory.mktemp("eps"), tiny_teacher_dir, t_star=999)
    return run, export_run(run)


@pytest.fixture(scope="module")
def vpred_export(tmp_path_factory, tiny_vpred_teacher_dir):
    """(run, export) for a v-prediction teacher at t* = 500 (the cut schedule of `one_step_scheduler`)."""
    run = make_run(tmp_path_factory.mktemp("vpred"), tiny_vpred_teacher_dir, t_star=500, seed=1)
    return run, export_run(run)


@pytest.fixture(params=["eps_export", "vpred_export"])
def exported(request):
    return request.getfixturevalue(request.param)


@functools.lru_cache(maxsize=4)
def example_sample(export: Path):
    """sample() of the card's prompt and seed, once per export (loading a pipeline is the slow part)."""
    return sample(EXAMPLE_PROMPT, model=export, seed=0)


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory, tiny_teacher_dir):
    """A run folder not yet exported; tests copy it (`_copy_run`) and export the copy."""
    return make_run(tmp_path_factory.mktemp("plain"), tiny_teacher_dir)


def _copy_run(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def _python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.DOTALL)


def _run_card_snippet(code: str, cwd: Path, monkeypatch) -> dict:
    monkeypatch.chdir(cwd)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the point: run the card's own code
    return namespace


# ---------------------------------------------------------------------------------------------------------
# Plain diffusers reproduces emd_t2i.sample, which reproduces (G1) of the training code
# ---------------------------------------------------------------------------------------------------------


def test_sample_is_the_generator_of_training(exported):
    run, export = exported
    reference, without_lora = generator_latents(run, [EXAMPLE_PROMPT], seed=0)
    torch.testing.assert_close(example_sample(export).latents, reference, atol=LATENT_ATOL, rtol=0)
    assert (without_lora - reference).abs().max() > 1000 * LATENT_ATOL  # so a lost LoRA would show


@pytest.mark.parametrize("which", ["pipeline", "lora"])
def test_card_snippets_reproduce_sample(exported, which, tmp_path, monkeypatch):
    """The model card's code, run as is (plain diffusers, nothing from emd_t2i), gives sample()'s image."""
    _, export = exported
    blocks = _python_blocks((export / "README.md").read_text())
    teacher_source = json.loads((export / FACTS_FILE).read_text())["teacher_source"]
    snippets = loading_snippets(export.as_posix(), teacher_source)
    assert blocks == [snippets["pipeline"], snippets["lora"]]
    namespace = _run_card_snippet(snippets[which], tmp_path, monkeypatch)
    ours = example_sample(export)
    diff = np.abs(np.asarray(namespace["image"], dtype=int) - np.asarray(ours.images[0], dtype=int))
    assert diff.max() <= PIXEL_ATOL
    latents = namespace["pipe"](EXAMPLE_PROMPT, num_inference_steps=1, guidance_scale=0.0,
                                output_type="latent", generator=torch.Generator("cpu").manual_seed(0)).images
    torch.testing.assert_close(latents.float(), ours.latents, atol=LATENT_ATOL, rtol=0)
    assert (tmp_path / "sample.png").is_file()


def test_batches_and_images_per_prompt_match_diffusers(eps_export):
    _, export = eps_export
    from diffusers import StableDiffusionPipeline

    prompts = ["a red circle", "a green triangle"]
    ours = sample(prompts, model=export, seed=7, num_images=2, batch_size=3)
    pipe = StableDiffusionPipeline.from_pretrained(export / PIPELINE_DIR)
    latents = pipe(prompts, num_inference_steps=1, guidance_scale=0.0, num_images_per_prompt=2,
                   output_type="latent", generator=torch.Generator("cpu").manual_seed(7)).images
    torch.testing.assert_close(latents, ours.latents, atol=LATENT_ATOL, rtol=0)
    assert ours.prompts == ["a red circle"] * 2 + ["a green triangle"] * 2


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")  # two adapters on one UNet: intended
def test_kohya_file_loads_in_diffusers_as_the_same_lora(eps_export):
    run, export = eps_export
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(DistillConfig.load(run / "config.json").teacher)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(1))
    outputs = []
    for name, weight_name in (("diffusers", LORA_FILE), ("kohya", KOHYA_FILE)):
        pipe.load_lora_weights(export, weight_name=weight_name, adapter_name=name)
        pipe.set_adapters(name)
        with torch.no_grad():
            outputs.append(pipe.unet(z, torch.tensor([999, 500]), encoder_hidden_states=cond).sample)
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-6, rtol=0)
    pipe.unet.disable_lora()
    with torch.no_grad():
        bare = pipe.unet(z, torch.tensor([999, 500]), encoder_hidden_states=cond).sample
    assert (bare - outputs[0]).abs().max() > 1e-3  # the LoRA is really on in both
    keys = set(load_file(str(export / KOHYA_FILE)))
    for module in ("resnets_0_conv1", "resnets_0_conv2", "resnets_0_conv_shortcut", "resnets_0_time_emb_proj",
                   "attentions_0_proj_in", "attentions_0_proj_out", "ff_net_0_proj", "ff_net_2",
                   "attn2_to_out_0"):
        assert any(module + ".lora_down.weight" in k for k in keys), module
    assert all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))
               for k in keys)


# ---------------------------------------------------------------------------------------------------------
# Metadata, model card, docs, refusals
# ---------------------------------------------------------------------------------------------------------


def test_metadata_describes_the_run(exported):
    run, export = exported
    cfg = DistillConfig.load(run / "config.json")
    with safe_open(str(export / LORA_FILE), "pt") as f:
        meta = f.metadata()
    assert all(k.startswith("unet.") and ".lora_" in k for k in load_file(str(export / LORA_FILE)))
    assert json.loads(meta["lora_adapter_metadata"])["unet.r"] == RANK
    assert json.loads(meta["lora_adapter_metadata"])["unet.lora_alpha"] == RANK
    assert json.loads(meta["lora_adapter_metadata"])["unet.rank_pattern"] == {}  # diffusers 0.39-0.41 need the key
    assert meta["emd_t2i.teacher"] == cfg.teacher
    assert json.loads(meta["emd_t2i.t_star"]) == cfg.t_star
    assert json.loads(meta["emd_t2i.guidance_scale"]) == GUIDANCE
    assert json.loads(meta["emd_t2i.step"]) == 10
    for key in ("version", "num_langevin_steps", "gamma_eps", "gamma_z", "iterations"):
        assert FACTS_PREFIX + key in meta
    with safe_open(str(export / KOHYA_FILE), "pt") as f:
        kohya_meta = f.metadata()
    assert kohya_meta["ss_network_dim"] == str(RANK) and kohya_meta["ss_network_alpha"] == str(float(RANK))
    v_prediction = cfg.t_star == 500  # the v-prediction fixture; both tiny teachers have SD 1.x's shape
    assert kohya_meta["ss_base_model_version"] == "sd_v1" + "_v" * v_prediction and kohya_meta["ss_v2"] == "False"
    assert kohya_meta[FACTS_PREFIX + "teacher"] == cfg.teacher
    facts = json.loads((export / FACTS_FILE).read_text())
    assert facts["t_star"] == cfg.t_star and facts["formats"] == ["lora", "pipeline", "kohya"]
    alpha_bar = float(DDIMScheduler.from_pretrained(export / SCHEDULER_DIR).alphas_cumprod[cfg.t_star])
    assert facts["sigma_t_star"] == pytest.approx(((1 - alpha_bar) / alpha_bar) ** 0.5, abs=1e-4)
    start = "the last one" if cfg.t_star == 999 else "not the last"  # what a ComfyUI / A1111 user must set
    assert f"starts at timestep {cfg.t_star}, {start} (k-diffusion sigma {facts['sigma_t_star']})" in (
        export / "README.md").read_text()
    assert not (export / PIPELINE_DIR / "safety_checker").exists()
    assert list((export / PIPELINE_DIR / "unet").glob("*.safetensors"))


def test_docs_show_the_card_snippets(eps_export):
    """docs/EXPORT.md shows the same code the card carries (and the test above runs), and the same table of which
    file each client takes."""
    text = DOCS.read_text()
    assert client_table() in text and client_table() in (eps_export[1] / "README.md").read_text()
    assert "| ComfyUI (LoraLoader) | `emd_lora_kohya.safetensors`" in client_table()
    example = loading_snippets("runs/emd/export", "stable-diffusion-v1-5/stable-diffusion-v1-5")
    for snippet in example.values():
        assert snippet in text


def test_eval_json_goes_into_the_card(plain_run, tmp_path):
    run = _copy_run(plain_run, tmp_path)
    (run / "eval.json").write_text(json.dumps({"fid": 12.5, "clip_score": {"mean": 0.31}}))
    export = export_run(run, formats=("lora",))
    card = (export / "README.md").read_text()
    assert "| fid | 12.5 |" in card and "| clip_score.mean | 0.31 |" in card
    assert not (export / PIPELINE_DIR).exists() and not (export / KOHYA_FILE).exists()


def test_export_takes_the_ema_unless_raw(plain_run, tmp_path):
    run = _copy_run(plain_run, tmp_path)
    ckpt = run / "checkpoints" / "step-000010"
    raw = load_file(str(ckpt / f"{GENERATOR}.safetensors"))
    save_file({k: 0.5 * v for k, v in raw.items()}, str(ckpt / f"{GENERATOR_EMA}.safetensors"))

    def lora_abs_sum(export: Path) -> float:
        return sum(float(v.abs().sum()) for v in load_file(str(export / LORA_FILE)).values())

    ema = export_run(run, output=tmp_path / "ema", formats=("lora",))
    plain = export_run(run, output=tmp_path / "raw", formats=("lora",), raw=True)
    assert lora_abs_sum(ema) == pytest.approx(0.5 * lora_abs_sum(plain), rel=1e-6)
    assert lora_abs_sum(plain) == pytest.approx(sum(float(v.abs().sum()) for v in raw.values()), rel=1e-6)
    assert json.loads((ema / FACTS_FILE).read_text())["generator_weights"] == "ema"
    assert json.loads((plain / FACTS_FILE).read_text())["generator_weights"] == "raw"


def test_existing_export_is_refused_unless_overwrite(plain_run, tmp_path):
    run = _copy_run(plain_run, tmp_path)
    export = export_run(run, formats=("lora",))
    with pytest.raises(UserError, match="--overwrite"):
        export_run(run, formats=("lora",))
    (export / "marker").write_text("old")
    assert export_run(run, formats=("kohya",), overwrite=True) == export
    assert not (export / "marker").exists() and (export / KOHYA_FILE).is_file()
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []


def test_user_errors(plain_run, tmp_path):
    with pytest.raises(UserError, match="config.json"):
        export_run(tmp_path)
    run = _copy_run(plain_run, tmp_path)
    with pytest.raises(UserError, match="--format"):
        export_run(run, formats=("onnx",))
    with pytest.raises(UserError, match="step-000010"):
        export_run(run, checkpoint=5)
    assert export_run(run, output=tmp_path / "out", formats=("lora",), checkpoint="step-000010").is_dir()


def test_readme_shows_the_tested_snippets():
    """The README's diffusers snippets are the ones the tests above run, rendered for an SD1.5 run."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for snippet in loading_snippets("runs/sd15/export", "stable-diffusion-v1-5/stable-diffusion-v1-5").values():
        assert snippet.strip() in readme


def test_safetensors_files_are_byte_reproducible(tmp_path):
    """safetensors writes its metadata from a hash map (a new key order on every call); save_safetensors sorts it,
    so the same tensors and metadata give the same bytes, and the file reads back unchanged."""
    tensors = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(3, dtype=torch.float16)}
    metadata = {f"key_{i:02d}": f"value {i} é" for i in range(40)}
    for name in ("x", "y"):
        save_safetensors(tensors, tmp_path / f"{name}.safetensors", metadata=metadata)
    assert (tmp_path / "x.safetensors").read_bytes() == (tmp_path / "y.safetensors").read_bytes()
    with safe_open(tmp_path / "x.safetensors", "pt") as f:
        assert f.metadata() == metadata
        assert all(torch.equal(f.get_tensor(k), v) for k, v in tensors.items())


def test_exporting_a_checkpoint_twice_gives_the_same_bytes(tiny_teacher_dir, tmp_path):
    run = make_run(tmp_path, tiny_teacher_dir)
    first, second = export_run(run, tmp_path / "one"), export_run(run, tmp_path / "two")
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file() and p.name != "README.md")
    assert any(p.suffix == ".safetensors" for p in files)
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file() and p.name != "README.md")
    assert all((first / p).read_bytes() == (second / p).read_bytes() for p in files)


def test_the_model_card_names_the_method_the_run_used():
    assert method_name({"num_langevin_steps": 2, "gamma_eps": 0.5, "gamma_z": 0.1}) == "EM Distillation"
    assert method_name({"num_langevin_steps": 1, "gamma_eps": 2.0, "gamma_z": 0.0}).startswith("DMD")
    assert "eps-only" in method_name({"num_langevin_steps": 2, "gamma_eps": 0.5, "gamma_z": 0.0})
