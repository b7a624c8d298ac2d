"""The published COCO-2014 protocols: one image per caption (resumable), FID and CLIP score as the papers compute
them, one-step vs teacher speed, all settings and versions in metrics.json."""

from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from emd_t2i.errors import UserError
from emd_t2i.evaluation import fid
from emd_t2i.evaluation.captions import load_caption_list
from emd_t2i.evaluation.clip import CLIP_PREFIX, ClipScorer, check_clip_weights, clip_score, load_clip
from emd_t2i.evaluation.fid import Extractor
from emd_t2i.evaluation.generate import (
    IMAGES_DIR,
    TEACHER_GUIDANCE,
    TEACHER_STEPS,
    OneStep,
    TeacherSampler,
    generate_missing,
    image_path,
    is_sdxl_model,
    measure_speed,
    open_source,
)
from emd_t2i.evaluation.protocols import (
    check_protocol_name,
    resolve_precision,
    resolve_protocol,
    resolve_rounding,
)
from emd_t2i.export.sample import pipeline_dir
from emd_t2i.files import file_sha256, write_text_atomic
from emd_t2i.training.distributed import agreed

GENERATION_FILE = "generation.json"  # the settings the images in --output were made with (guards a resume)
METRICS_FILE = "metrics.json"
CAPTIONS_FILE = "captions.txt"  # caption i on line i, beside images/ (GigaGAN's evaluation script reads this)
UNRECORDED = {"rounding": "round"}  # settings older generation.json files lack, with the value they were made with
PACKAGES = ("emd-t2i", "torch", "diffusers", "transformers", "accelerate", "clean-fid", "open_clip_torch", "pillow",
            "numpy", "scipy")


@dataclass
class Extractors:
    """Feature extractors to use instead of the real ones (tests inject small stand-ins); None loads the real."""

    inception: Extractor | None = None
    clip: ClipScorer | None = None


def evaluate_coco(
    model: str | Path | None,
    *,
    prompts: str,
    reference: str | Path | None,
    output: str | Path | None,
    n: int | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    scheduler: str = "teacher",
    seed: int = 0,
    batch_size: int = 8,
    device: str = "auto",
    protocol: str = "auto",
    precision: str = "auto",
    rounding: str = "auto",
    clip_weights: str | Path | None = None,
    inception_weights: str | Path | None = None,
    speed_teacher_steps: int = TEACHER_STEPS,
    speed_repeats: int = 3,
    num_workers: int | None = None,
    extractors: Extractors | None = None,
    progress: bool = True,
) -> dict | None:
    """Generate one PNG per caption into `output`/images (what is there is kept), then FID against `reference`,
    CLIP score and speed; write `output`/metrics.json and return it (None on the processes other than the main
    one under `accelerate launch`, which split the captions). `protocol`, `precision` and `rounding` "auto" follow
    the model: DMD2's SDXL protocol (fp32, truncated) for SDXL, else the 30K / 256 px one (fp16 on CUDA, rounded)."""
    from accelerate import PartialState

    # the inputs: anything missing stops the run here, before hours of generation
    _check_coco_arguments(reference, output, n, seed, batch_size, speed_teacher_steps)
    check_protocol_name(protocol)
    # cpu=True: under a launcher on CPU accelerate then joins the processes (gloo) instead of running each alone
    state = PartialState(cpu=device == "cpu" or (device == "auto" and not torch.cuda.is_available()))
    dev = state.device if device in ("auto", "cuda") else torch.device(device)
    listing = load_caption_list(prompts)
    if n is not None and n > len(listing.captions):
        raise UserError(f"--n {n} is more than the {len(listing.captions)} captions of {prompts}")
    captions = listing.captions[:n]
    output, extractors = Path(output).expanduser(), extractors or Extractors()
    inception = agreed(state, _metric_networks, reference, extractors, dev, inception_weights, clip_weights,
                       main_only=True)
    chosen = resolve_protocol(protocol, is_sdxl_model(model))
    dtype, rounding = resolve_precision(precision, chosen, dev), resolve_rounding(rounding, chosen)
    source = open_source(model, steps=steps, guidance=guidance, scheduler=scheduler, device=dev, dtype=dtype,
                         rounding=rounding)
    settings = {**{k: source.info.get(k) for k in ("kind", "steps", "guidance", "scheduler", "resolution", "dtype",
                                                   "rounding")},
                "model": _identity(source.info["model"]), "weights_sha256": _weights_sha256(source), "seed": seed,
                "captions_sha256": listing.info["captions_sha256"]}

    # the images: every process renders its share of what is missing
    agreed(state, _claim, output, settings, True, main_only=True)
    agreed(state, _claim, output, settings, False)
    generation = generate_missing(source, captions, output / IMAGES_DIR, seed=seed, batch_size=batch_size,
                                  process_index=state.process_index, num_processes=state.num_processes,
                                  progress=progress and state.is_main_process)
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    files = [image_path(output / IMAGES_DIR, i) for i in range(len(captions))]
    if missing := [f.name for f in files if not f.is_file()]:
        raise RuntimeError(f"{len(missing)} images missing after generation ({missing[:3]} ...): run the same "
                           "command again to render them")
    write_text_atomic(output / CAPTIONS_FILE, "\n".join(captions) + "\n")

    # speed on the main process, then the model makes room for the metrics' networks
    speed = _speed(source, captions[0], batch_size, speed_teacher_steps, speed_repeats, dev, dtype)
    speed["hardware"]["processes"] = state.num_processes
    model_info, export = dict(source.info), getattr(source, "root", None)
    del source
    if dev.type == "cuda":
        torch.cuda.empty_cache()

    # FID (and DMD2's patch FID) and CLIP score, as the protocol measures them
    workers = min(8, os.cpu_count() or 1) if num_workers is None else num_workers
    transforms = {"fid": fid.crop_resize(chosen.fid_resolution)} | ({"patch_fid": fid.patch()} if chosen.patch_fid
                                                                     else {})
    fids = {name: _fid(files, reference, inception, dev, batch_size, workers, transform)
            for name, transform in transforms.items()}
    scorer = extractors.clip or load_clip(dev, clip_weights)
    clip = clip_score(scorer, files, captions, batch_size, progress, size=chosen.clip_resolution)

    metrics = {
        **{name: value for name, (value, _) in fids.items()},
        "clip_score": round(clip["mean"], 5),
        "protocol": chosen.info(),
        "precision": str(dtype).removeprefix("torch."),
        "rounding": rounding,
        "model": model_info,
        "captions": {**listing.info, "used": len(captions)},
        "images": {"folder": str(output / IMAGES_DIR), "count": len(files), "seed": seed,
                   "seeds": f"caption i has seed {seed} + i", "generation_main_process": generation},
        **{f"{name}_details": details for name, (_, details) in fids.items()},
        "clip_details": {**clip, "model": scorer.name, "prefix": CLIP_PREFIX,
                         "transform": fid.crop_resize(chosen.clip_resolution).name, "similarity": "cosine, not x100"},
        "speed": speed,
        "versions": _versions(),
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    text = json.dumps(metrics, indent=2) + "\n"
    write_text_atomic(output / METRICS_FILE, text)
    if export is not None and (card_dir := _card_dir(export)) is not None:
        write_text_atomic(card_dir / METRICS_FILE, text)  # `emd-t2i export` puts it into the model card
    return metrics


def _fid(files: list[Path], reference, inception: Extractor, device, batch_size: int, workers: int,
         transform: fid.Transform) -> tuple[float, dict]:
    """FID of the image files against the reference under one transform, and how it was computed."""
    ref, ref_path = fid.reference_stats(reference, inception, device, batch_size=batch_size, num_workers=workers,
                                        transform=transform)
    features = fid.file_features(files, inception, device, batch_size, workers, "FID features", transform)
    generated = fid.stats_of(features, {})
    details = {"images": generated.info["count"], "extractor": inception.name, "transform": transform.name,
               "reference": {"source": str(reference), "stats_file": str(ref_path), **ref.info}}
    return round(fid.frechet_distance(generated, ref), 4), details


def _check_coco_arguments(reference, output, n, seed, batch_size, speed_teacher_steps) -> None:
    if output is None:
        raise UserError("--output is needed with --prompts: a folder for the images and metrics.json (running the "
                        "same command again resumes)")
    if reference is None:
        raise UserError("--reference is needed with --prompts: the COCO val2014 image folder, or a statistics .npz "
                        "made by `emd-t2i coco reference`")
    if not Path(reference).expanduser().exists():
        raise UserError(f"--reference {reference} does not exist: pass the COCO val2014 image folder (or its zip), or "
                        "a statistics .npz made by `emd-t2i coco reference`")
    for flag, value, low in (("--n", n, 1), ("--seed", seed, 0), ("--batch-size", batch_size, 1),
                             ("--speed-teacher-steps", speed_teacher_steps, 0)):
        if value is not None and value < low:
            raise UserError(f"{flag} must be >= {low} (got {value})")


def _metric_networks(reference, extractors: Extractors, device, inception_weights, clip_weights) -> Extractor:
    """Every file the metrics read, checked before the first image is made (a bad one would otherwise show only after
    hours of generation): the reference, the Inception network (loaded: it is small) and the CLIP weights (their
    shapes); returns the Inception extractor."""
    fid.check_reference_source(reference)
    if extractors.inception is None:
        fid.inception_weights(inception_weights)  # where it is (downloaded once when online), before CLIP's
    if extractors.clip is None:
        check_clip_weights(clip_weights)
    inception = extractors.inception or fid.load_inception(device, inception_weights)
    fid.check_reference_source(reference, inception)
    return inception


def _weights_sha256(source) -> str | None:
    """An export's UNet weights, hashed, so that the resume guard tells a re-export into the same folder from the
    images already there; None for a teacher (named by its source)."""
    root = getattr(source, "root", None)
    if root is None:
        return None
    digest = hashlib.sha256()
    for path in sorted((pipeline_dir(root) / "unet").glob("*.safetensors")) or sorted(
            (pipeline_dir(root) / "unet").glob("*.bin")):
        file_sha256(path, digest)
    return digest.hexdigest()


def _identity(model: str) -> str:
    """A local folder by its absolute path (so `runs/x` and `/home/me/runs/x` are one model), a hub id as is."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def _claim(output: Path, settings: dict, write: bool) -> None:
    """Refuse to add images to a folder made with other settings; record the settings in a new folder."""
    path = output / GENERATION_FILE
    if path.is_file():
        old = {**UNRECORDED, **json.loads(path.read_text())}
        if changed := [f"{k} {old.get(k)!r} -> {v!r}" for k, v in settings.items() if old.get(k) != v]:
            raise UserError(f"--output {output} holds images made with other settings ({'; '.join(changed)}): pass "
                            "another --output, or delete that folder to start over")
    elif write:
        output.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(settings, indent=2) + "\n")


def hardware(device: torch.device) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {"device": str(device), "name": name, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def _speed(source, prompt: str, batch_size: int, teacher_steps: int, repeats: int, device, dtype) -> dict:
    """The evaluated model's latency and images/s; for an export also its teacher's at `teacher_steps`, on the
    same hardware, batch size and precision."""
    own = measure_speed(source, prompt, batch_size, repeats)
    speed = {"hardware": hardware(device), "dtype": str(dtype).removeprefix("torch."),
             "one_step" if isinstance(source, OneStep) else "teacher": own}
    facts = getattr(source, "facts", {})
    if isinstance(source, OneStep) and teacher_steps and facts.get("teacher_source"):
        guidance = facts.get("guidance_scale", TEACHER_GUIDANCE)
        try:
            teacher = TeacherSampler(facts["teacher_source"], teacher_steps, guidance, "teacher", device, dtype)
        except UserError as err:  # e.g. the teacher is not in the offline cache: the metrics still count
            speed["teacher"] = {"skipped": str(err)}
            return speed
        speed["teacher"] = measure_speed(teacher, prompt, batch_size, repeats)
        speed["one_step_speedup"] = {
            "latency": round(speed["teacher"]["latency_s"] / own["latency_s"], 2),
            "images_per_s": round(own["images_per_s"] / speed["teacher"]["images_per_s"], 2)}
    return speed


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def _card_dir(export: Path) -> Path | None:
    """Where `emd-t2i export` looks for metrics.json: the run folder of a run's export, else the export folder
    (None for a bare pipeline folder, which has no card)."""
    from emd_t2i.export.layout import FACTS_FILE, PIPELINE_DIR

    folder = export.parent if export.name == PIPELINE_DIR and (export.parent / FACTS_FILE).is_file() else export
    if not (folder / FACTS_FILE).is_file():
        return None
    return folder.parent if (folder.parent / "config.json").is_file() else folder
