"""An export's model card (README.md): what it is, which file each client takes, the loading code, its numbers."""

from __future__ import annotations

import json
from pathlib import Path

from emd_t2i.errors import UserError
from emd_t2i.export.layout import FACTS_FILE, FACTS_PREFIX, KOHYA_FILE, LORA_FILE, PIPELINE_DIR, SCHEDULER_DIR
from emd_t2i.models.teachers import TEACHERS

EXAMPLE_PROMPT = "a photograph of a red fox in the snow"

# The loading code shown in the model card and docs/EXPORT.md; tests/test_export.py executes the card's copy.
PIPELINE_SNIPPET = """\
import torch
from diffusers import {pipeline_class}

pipe = {pipeline_class}.from_pretrained("{pipeline}")
pipe = pipe.to("cuda" if torch.cuda.is_available() else "cpu")
prompt = "{prompt}"
generator = torch.Generator("cpu").manual_seed(0)
image = pipe(prompt, num_inference_steps=1, guidance_scale=0.0, generator=generator).images[0]
image.save("sample.png")
"""
LORA_SNIPPET = """\
import torch
from diffusers import DDIMScheduler, {pipeline_class}

pipe = {pipeline_class}.from_pretrained("{teacher}"{teacher_kwargs})
pipe.load_lora_weights("{export}", weight_name="{lora_file}")
pipe.scheduler = DDIMScheduler.from_pretrained("{export}", subfolder="{scheduler_dir}")
pipe = pipe.to("cuda" if torch.cuda.is_available() else "cpu")
prompt = "{prompt}"
generator = torch.Generator("cpu").manual_seed(0)
image = pipe(prompt, num_inference_steps=1, guidance_scale=0.0, generator=generator).images[0]
image.save("sample.png")
"""


# Which file each client should take. ComfyUI (comfy/lora.py, model_lora_keys_unet) knows diffusers LoRA attention
# layers only under the old attention-processor names (`...attn1.processor.to_q`), so of the diffusers file it loads
# the resnet, projection and feed-forward layers and reports every attention tensor as "not loaded" (154 of SD 1.5's
# 282 modules); AUTOMATIC1111 (extensions-builtin/Lora/networks.py) reads no `unet.`-prefixed keys at all.
CLIENT_FILES = (
    ("diffusers (`load_lora_weights`)", f"`{LORA_FILE}`, or `{PIPELINE_DIR}/` with `from_pretrained`"),
    ("ComfyUI (LoraLoader)", f"`{KOHYA_FILE}`: of `{LORA_FILE}` it would load no attention layer"),
    ("AUTOMATIC1111 (`<lora:...>`)", f"`{KOHYA_FILE}`: it reads no diffusers-format LoRA keys"),
)


def client_table() -> str:
    """The markdown table of which file each client should load (model card and docs/EXPORT.md)."""
    return "| client | file |\n|---|---|\n" + "\n".join(f"| {c} | {f} |" for c, f in CLIENT_FILES) + "\n"


def loading_snippets(export: str, teacher: str, pipeline_class: str = "StableDiffusionPipeline") -> dict[str, str]:
    """The two diffusers snippets (pipeline folder, teacher + LoRA) for an export at `export`; SDXL exports load
    with StableDiffusionXLPipeline (which has no safety checker to leave out)."""
    sd = pipeline_class == "StableDiffusionPipeline"
    values = {"export": export, "pipeline": f"{export}/{PIPELINE_DIR}", "teacher": teacher,
              "prompt": EXAMPLE_PROMPT, "lora_file": LORA_FILE, "scheduler_dir": SCHEDULER_DIR,
              "pipeline_class": pipeline_class, "teacher_kwargs": ", safety_checker=None" if sd else ""}
    return {"pipeline": PIPELINE_SNIPPET.format(**values), "lora": LORA_SNIPPET.format(**values)}


# ---------------------------------------------------------------------------------------------------------
# The model card
# ---------------------------------------------------------------------------------------------------------


def read_eval(run_dir: Path, name: str = "eval.json") -> dict | None:
    """eval.json (the toy metrics) or metrics.json (the COCO protocol, `emd-t2i eval --prompts`), if there."""
    path = run_dir / name
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err}): fix or delete it, then export again") from err


def _rows(pairs) -> str:
    return "\n".join(f"| {k} | {v} |" for k, v in pairs)


def _coco_section(metrics: dict) -> str:
    """The headline numbers of metrics.json: quality, and the speed a user weighs against it."""
    captions, speed, protocol = metrics.get("captions", {}), metrics.get("speed", {}), metrics.get("protocol")
    rows = [("FID", metrics.get("fid"))] + ([("patch FID", metrics["patch_fid"])] if "patch_fid" in metrics else [])
    rows += [("CLIP score", metrics.get("clip_score")),
             ("images", f"{metrics.get('images', {}).get('count')} ({captions.get('name') or captions.get('source')})"),
             ("precision, rounding", f"{metrics.get('precision')}, {metrics.get('rounding')}")]
    for key in ("one_step", "teacher"):
        if "latency_s" in (run := speed.get(key, {})):
            label = f"{key.replace('_', '-')} ({run['steps']} step{'s' * (run['steps'] != 1)}, {speed['hardware']['name']})"
            rows += [(f"{label} latency, batch 1", f"{run['latency_s']} s"),
                     (f"{label} images/s, batch {run['batch_size']}", run["images_per_s"])]
    if isinstance(protocol, dict):
        head = (f"Protocol `{protocol['name']}`: {protocol['description']}. Comparable with "
                f"{protocol['comparable_with']} (docs/EVALUATION.md).")
    else:
        head = "Zero-shot COCO-2014 val, FID (clean-fid) and CLIP score (open_clip ViT-g-14) at 256 px."
    return head + " From `metrics.json` of the run:\n\n| metric | value |\n|---|---|\n" + _rows(rows)


def _eval_section(evaluation: dict | None, metrics: dict | None = None) -> str:
    if metrics is not None:
        return _coco_section(metrics) + ("\n\n" + _eval_section(evaluation) if evaluation is not None else "")
    if evaluation is None:
        return "No evaluation yet: run `emd-t2i eval` on this export, then export again to list the numbers."
    flat = []
    for key, value in evaluation.items():
        items = value.items() if isinstance(value, dict) else [("", value)]
        flat += [(f"{key}.{k}" if k else key, v) for k, v in items]
    return "From `eval.json` of the run:\n\n| metric | value |\n|---|---|\n" + _rows(flat)


def _front_matter(teacher_source: str) -> str:
    """The YAML header the Hugging Face hub reads (base_model only for a hub teacher, not a local folder)."""
    base = "" if Path(teacher_source).is_absolute() else f"base_model: {teacher_source}\n"
    return (f"---\nlibrary_name: diffusers\n{base}pipeline_tag: text-to-image\n"
            "tags: [text-to-image, stable-diffusion, lora, one-step, emd-t2i]\n---\n")


def method_name(facts: dict) -> str:
    """What the run's E-step was: DMD is EMD's K = 1 chain with gamma_eps = 2 and z fixed (docs/ALGORITHM.md)."""
    k, gamma_eps, gamma_z = facts.get("num_langevin_steps"), facts.get("gamma_eps"), facts.get("gamma_z")
    if gamma_z != 0:
        return "EM Distillation"
    if k == 1 and gamma_eps == 2:
        return "DMD (EM Distillation's K = 1 chain)"
    return "EM Distillation's eps-only chain (z fixed)"


def model_card(facts: dict, formats: tuple[str, ...], output: Path, evaluation: dict | None,
               metrics: dict | None = None) -> str:
    """README.md of an export: the teacher, how it was distilled, how to load it, and its evaluation."""
    snippets = loading_snippets(output.as_posix(), facts["teacher_source"],
                                facts.get("pipeline_class", "StableDiffusionPipeline"))
    entry = TEACHERS.get(facts["teacher"])
    hyper = [(k, facts[k]) for k in facts if k not in ("version", "teacher", "teacher_source", "step")]
    files = {"lora": f"`{LORA_FILE}`: diffusers LoRA (load with `load_lora_weights`; not for ComfyUI or "
                     "AUTOMATIC1111, see below)",
             "pipeline": f"`{PIPELINE_DIR}/`: a complete diffusers pipeline, LoRA fused, one-step scheduler",
             "kohya": f"`{KOHYA_FILE}`: the same LoRA with kohya keys and metadata (ComfyUI, AUTOMATIC1111)"}
    parts = [
        _front_matter(facts["teacher_source"]),
        f"# One-step generator distilled from {facts['teacher']} with {method_name(facts)}\n",
        f"Made by emd-t2i {facts['version']} from step {facts['step']} of the run. Teacher: "
        f"`{facts['teacher_source']}`" + (f" ({entry.description}; licence: {entry.licence})." if entry
                                          else "."),
        ("\nOne UNet call makes an image: g(z, c) = (z - sigma_t* eps(z, t*, c)) / alpha_t*, with "
         "classifier-free guidance distilled in (so sample with guidance 0 or 1).\n"),
        "## Files\n", "\n".join(f"- {files[f]}" for f in formats),
        f"- `{SCHEDULER_DIR}/`: the one-step DDIM scheduler (its single step is t* = {facts['t_star']})",
        f"- `{FACTS_FILE}`: the facts below as JSON (also in the safetensors metadata: `{FACTS_PREFIX}*`)\n",
        "## How it was distilled\n", "| setting | value |\n|---|---|\n" + _rows(hyper) + "\n",
        "## Which file for which client\n", client_table(),
        "## Loading it with diffusers\n",
    ]
    if "pipeline" in formats:
        parts += ["The pipeline folder:\n", f"```python\n{snippets['pipeline']}```\n"]
    if "lora" in formats:
        parts += ["The teacher plus the LoRA:\n", f"```python\n{snippets['lora']}```\n"]
    if "kohya" in formats:
        start = f"timestep {facts['t_star']}" + (", the last one" if facts["t_star"] == 999 else ", not the last")
        start += f" (k-diffusion sigma {facts['sigma_t_star']})"
        parts += [(f"AUTOMATIC1111 / ComfyUI: put `{KOHYA_FILE}` in the LoRA folder, use weight 1.0, 1 step, "
                   f"CFG 1, and a sampler whose single step starts at {start} (untested here; the "
                   "diffusers code above is the reference).\n")]
    parts += ["## Evaluation\n", _eval_section(evaluation, metrics) + "\n"]
    return "\n".join(parts)
