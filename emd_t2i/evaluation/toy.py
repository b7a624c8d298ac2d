"""The toy teacher's exact metrics of an image source (prompt accuracy, diversity, Frechet distance, shape
fidelity, mode coverage against the 25-step teacher), and `emd-t2i eval` of a toy export (eval.json)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from emd_t2i.errors import UserError
from emd_t2i.files import write_text_atomic
from emd_t2i.training.config import EVAL_PROMPTS

ImagesFn = Callable[[list[str], int], Tensor]  # (prompts, seed) -> images in [-1, 1], (N, 3, H, W)


def toy_report(generate: ImagesFn, n: int = EVAL_PROMPTS, diversity_images: int = 64, seed: int = 0,
               diversity_prompts: int = 3, diversity_samples: int = 192, teacher: ImagesFn | None = None,
               coverage_samples: int = 384) -> dict:
    """Measures of one image source on the toy domain, against real images of the same prompts.

    prompt accuracy per attribute (and all three); diversity, the spread of position and size relative to real
    images of the same prompt (1 = as diverse as the data), twice: `diversity_ratio` for one fixed prompt and
    `diversity_images` samples (the sweep's measure, +-0.035) and `diversity` averaged over `diversity_prompts`
    prompts of `diversity_samples` samples each (+-0.015; 0 prompts skips it); the Frechet distance to real
    images in the attribute classifier's feature space; the geometric shape fidelity of the images; and, given the
    `teacher` as an image source, the mode coverage on the under-specified prompts (toy.modes.coverage_report,
    `coverage_samples` per prompt).
    """
    from emd_t2i.toy import metrics, modes

    prompts = metrics.evaluation_prompts(n, seed)
    images = generate(prompts, seed)
    real = torch.cat([metrics.real_images_for_prompt(p, 1, seed=seed + i) for i, p in enumerate(prompts)])
    fixed = prompts[0]
    fixed_images = generate([fixed] * diversity_images, seed + 1)
    wide = (metrics.mean_diversity(generate, metrics.diversity_prompts(diversity_prompts, seed), diversity_samples,
                                   seed) if diversity_prompts else None)
    return {
        "n": n,
        "prompt_accuracy": metrics.prompt_accuracy(images, prompts),
        "diversity_ratio": {"prompt": fixed, **metrics.diversity_ratio(
            fixed_images, metrics.real_images_for_prompt(fixed, diversity_images, seed))},
        "diversity": wide,
        "frechet_distance_to_real": metrics.classifier_frechet_distance(images, real),
        "shape_fidelity": modes.fidelity_report(images, prompts),
        "mode_coverage": (modes.coverage_report(generate, teacher, n=coverage_samples, seed=seed)
                          if teacher is not None else None),
    }


def one_step_images(model: Path, device: str = "cpu") -> ImagesFn:
    """The distilled generator as an image source (one UNet call per image)."""
    from emd_t2i.export.sample import sample

    def generate(prompts: list[str], seed: int) -> Tensor:
        out = sample(prompts, model, seed=seed, device=device, batch_size=64)
        return _pil_to_tensor(out.images)

    return generate


TOY_TEACHER_STEPS = 25  # the toy teacher's reference sampler for mode coverage


def teacher_images(guidance: float, device: str = "cpu", steps: int = TOY_TEACHER_STEPS) -> ImagesFn:
    """The shipped toy teacher as an image source: `steps` DDIM steps at the student's guidance."""
    from emd_t2i.toy.metrics import load_pipeline, sample_teacher

    pipe = load_pipeline().to(device)

    def generate(prompts: list[str], seed: int) -> Tensor:
        return sample_teacher(pipe, prompts, steps, guidance, seed).cpu()

    return generate


def _pil_to_tensor(images) -> Tensor:
    import numpy as np

    array = np.stack([np.asarray(im, dtype=np.float32) for im in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1


def evaluate_export(model: str | Path | None, n: int = EVAL_PROMPTS, device: str = "cpu") -> dict:
    """Evaluate an export; the numbers go to the run folder's eval.json (the model card shows them)."""
    from emd_t2i.export.sample import load_facts, resolve_model

    root = resolve_model(model)
    facts = load_facts(root) or {}
    if facts.get("teacher") != "toy":
        raise UserError(
            f"{root} was distilled from {facts.get('teacher', 'an SD teacher')}, not the toy: score it in the COCO "
            "protocol with --prompts coco2014-val-30k --reference VAL2014_DIR --output DIR (docs/EVALUATION.md)"
        )
    guidance = facts.get("guidance_scale")
    report = {"model": str(root), "one_step": toy_report(one_step_images(root, device), n=n,
                                                         teacher=teacher_images(guidance, device)),
              "coverage_teacher": {"steps": TOY_TEACHER_STEPS, "guidance": guidance}}
    run_dir = root.parent if (root.parent / "config.json").exists() else root
    write_text_atomic(run_dir / "eval.json", json.dumps(report, indent=2) + "\n")
    return report
