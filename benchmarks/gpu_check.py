"""One-shot GPU check of EMD at SD1.5 size: training memory and speed, MFU, one-step vs 25-step sampling; then
SDXL's training memory at 1024 px (batch 2, checkpointing).

On a random-weight SD1.5 (benchmarks/sd_random.py, built on the GPU, bf16) at 512 px: `emd_t2i.train.distill`
at batch 4, K = 4, gamma_z = 0.03, 5 fake updates, bf16 (the sd-1.5 preset for the rest), gradient checkpointing
on and off (peak CUDA memory, s / iteration after one warm-up iteration, UNet rows / s, model FLOP utilisation),
then the export's one-step pipeline against the teacher's 25-step DDIM (at the preset's guidance) at batch 1 and
16. One JSON; a failing section records its error and the others still run; --budget-s stops starting sections
when time runs low.

    python benchmarks/gpu_check.py                     # one H100 / H200: a few minutes
    python benchmarks/gpu_check.py --tiny --out /tmp/gpu_check_tiny.json    # CPU, tiny model, seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from sd15_cpu import emd_unet_rows

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "gpu_check.json"
GOAL_PEAK_GIB = 16.0  # issue 14: SD1.5 distillation with checkpointing fits a 16 GB card
# Peak dense bf16 tensor FLOP/s by device name (first match wins); None: not in the table (no MFU).
PEAK_BF16_FLOPS = (
    ("H200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", None), ("H100", 989e12), ("A100", 312e12),
    ("L40S", 362e12), ("RTX 4090", 165e12),
)
# The EMD setting of the check (the SD defaults of docs/ALGORITHM.md) and its size
BATCH, K, GAMMA_Z, FAKE_UPDATES = 4, 4, 0.03, 5
TEACHER_STEPS = 25
SAMPLE_BATCHES = (1, 16)
PROMPTS = [
    "a photograph of a red fox in the snow", "a lighthouse at dusk", "a bowl of ramen, studio lighting",
    "an astronaut riding a horse", "a watercolor painting of a harbour", "a cat wearing sunglasses",
    "a city street at night in the rain", "a portrait of an old fisherman",
]
# Rough seconds each section takes on one H100 / H200 (what --budget-s holds back for it)
ESTIMATE_S = {"build": 40, "flops": 15, "train_checkpointing_on": 60, "train_checkpointing_off": 60,
              "export": 90, "sampling": 90, "sdxl_train": 180}
GOAL_SDXL_PEAK_GIB = 80.0  # issue 18: SDXL at 1024 px, batch 2, checkpointing, on one 80 GB GPU


def peak_bf16_flops(device_name: str) -> float | None:
    for key, flops in PEAK_BF16_FLOPS:
        if key in device_name:
            return flops
    return None


# ---------------------------------------------------------------- sections
@dataclasses.dataclass
class Check:
    """What the sections share: where they run and what earlier sections left."""

    tiny: bool
    device: str
    dtype: torch.dtype
    workdir: Path
    iterations: int
    teacher: Path | None = None
    flops_per_row: float | None = None
    peak_flops: float | None = None
    runs: dict = dataclasses.field(default_factory=dict)  # checkpointing on/off -> run folder
    export: Path | None = None

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()


def section_build(c: Check) -> dict:
    from sd_random import save_random_sd

    start = time.perf_counter()
    c.teacher = save_random_sd(c.workdir / "teacher", tiny=c.tiny, dtype=c.dtype, device=c.device)
    c.free()
    return {"path": str(c.teacher), "model": "tiny" if c.tiny else "sd15", "dtype": str(c.dtype),
            "seconds": round(time.perf_counter() - start, 1)}


def section_flops(c: Check) -> dict:
    """FLOPs of one UNet row forward (batch 1, the model's latent size, 77 tokens), by FlopCounterMode. On CUDA
    the attention kernels are counted; on the CPU (--tiny) torch's flash-attention-for-CPU op has no formula."""
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    unet = UNet2DConditionModel.from_pretrained(c.teacher, subfolder="unet", torch_dtype=c.dtype).to(c.device)
    size, channels = unet.config.sample_size, unet.config.in_channels
    x = torch.randn(1, channels, size, size, device=c.device, dtype=c.dtype)
    cond = torch.randn(1, 77, unet.config.cross_attention_dim, device=c.device, dtype=c.dtype)
    t = torch.tensor([500], device=c.device)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        unet(x, t, encoder_hidden_states=cond)
    c.flops_per_row = float(counter.get_total_flops())
    by_op = sorted(((str(op), n) for op, n in counter.get_flop_counts()["Global"].items()), key=lambda kv: -kv[1])
    del unet
    c.free()
    return {"fwd_flops_per_row": c.flops_per_row, "latent_size": size, "tokens": 77,
            "top_ops": {op: n for op, n in by_op[:6]}}


def _distill_config(c: Check, run_dir: Path, checkpointing: bool):
    """The run a user gets for this teacher (its preset: LoRA targets, ranks, EMA, guidance ...), at the check's
    EMD setting and size."""
    from emd_t2i.training.config import build_config

    return build_config(
        teacher=str(c.teacher), prompts=str(c.workdir / "prompts.txt"), output=str(run_dir),
        num_langevin_steps=K, gamma_z=GAMMA_Z, fake_updates=FAKE_UPDATES,
        iterations=c.iterations, lr_warmup=0, batch_size=BATCH, gradient_checkpointing=checkpointing,
        mixed_precision="bf16" if c.cuda else "no", device=c.device, profile=True,
        log_every=1, validate_every=0, num_validation_prompts=1, checkpoint_every=c.iterations, keep_checkpoints=1,
    )


def section_train(c: Check, checkpointing: bool) -> dict:
    import shutil

    from emd_t2i.training.loop import distill

    run_dir = c.workdir / f"run-checkpointing-{'on' if checkpointing else 'off'}"
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = _distill_config(c, run_dir, checkpointing)
    c.free()
    if c.cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    distill(cfg)
    wall = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if c.cuda else None
    c.free()
    c.runs[checkpointing] = run_dir
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    measured = [r for r in records if r["step"] > 1] or records  # after one warm-up iteration
    s_per_it = statistics.mean(1 / r["it_per_s"] for r in measured)
    forward_rows = statistics.mean(r["unet_rows_per_it"] for r in measured)
    expected_forward, expected_backward = emd_unet_rows(K, GAMMA_Z, FAKE_UPDATES, BATCH, cfg.guidance_scale != 1)
    backward_rows = (statistics.mean(r["unet_backward_rows_per_it"] for r in measured)
                     if "unet_backward_rows_per_it" in measured[0] else None)
    used_backward = backward_rows if backward_rows is not None else expected_backward
    out = {
        "gradient_checkpointing": checkpointing, "iterations": c.iterations, "measured_iterations": len(measured),
        "batch_size": BATCH, "K": K, "gamma_z": GAMMA_Z, "fake_updates": FAKE_UPDATES,
        "config": {k: v for k, v in cfg.to_dict().items() if k not in ("teacher", "prompts", "output")},
        "run_wall_s": round(wall, 1), "s_per_it": s_per_it, "it_per_s": 1 / s_per_it,
        "unet_rows_per_it": forward_rows, "unet_rows_per_it_expected": expected_forward,
        "unet_backward_rows_per_it": backward_rows, "unet_backward_rows_per_it_expected": expected_backward,
        "unet_rows_per_s": forward_rows / s_per_it,
        "peak_mem_gib": peak,
        # the log's peak is over the iterations alone; the one above also covers the final checkpoint and grid
        "peak_mem_gib_log": measured[-1].get("peak_mem_gib"),
        "log": measured,
    }
    for key in ("unet_forward_s", "unet_backward_s", "other_s"):
        if key in measured[0]:
            out[key] = statistics.mean(r[key] for r in measured)
    if c.flops_per_row is not None:
        # recomputation under checkpointing is not counted: the same model FLOPs on and off
        out["train_flops_per_it"] = c.flops_per_row * (forward_rows + 2 * used_backward)
        out["achieved_flops"] = out["train_flops_per_it"] / s_per_it
        out["mfu"] = out["achieved_flops"] / c.peak_flops if c.peak_flops else None
    if checkpointing and peak is not None:
        out["goal"] = f"peak memory <= {GOAL_PEAK_GIB:g} GiB with checkpointing"
        out["goal_met"] = peak <= GOAL_PEAK_GIB
    return out


def section_export(c: Check) -> dict:
    from emd_t2i.export.writer import export_run

    run_dir = next((c.runs[k] for k in (True, False) if k in c.runs), None)
    if run_dir is None:
        raise RuntimeError("no training run finished: nothing to export")
    start = time.perf_counter()
    c.export = export_run(run_dir, formats=("pipeline",), overwrite=True)
    return {"run": str(run_dir), "export": str(c.export), "seconds": round(time.perf_counter() - start, 1)}


def _time_call(c: Check, fn, repeats: int) -> float:
    """Median seconds of `fn()` after one warm-up call, with the device synchronised around each."""
    fn()
    c.sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        c.sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def _generate(pipe, prompts: list[str], steps: int, guidance_scale: float) -> None:
    pipe(prompts, num_inference_steps=steps, guidance_scale=guidance_scale, output_type="pt",
         generator=torch.Generator("cpu").manual_seed(0))


def section_sampling(c: Check) -> dict:
    """Latency and images / s of the one-step export and the 25-step teacher (VAE decode included)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from emd_t2i.export.writer import one_step_scheduler
    from emd_t2i.training.config import build_config

    guidance = build_config(teacher=str(c.teacher)).guidance_scale  # the teacher guidance a run distills
    out = {"teacher_steps": TEACHER_STEPS, "teacher_guidance_scale": guidance, "dtype": str(c.dtype),
           "output_type": "pt (decoded on the device; no PIL conversion)", "rows": []}
    teacher = StableDiffusionPipeline.from_pretrained(c.teacher, torch_dtype=c.dtype, safety_checker=None)
    teacher.set_progress_bar_config(disable=True)
    if c.export is not None:
        one_step = StableDiffusionPipeline.from_pretrained(c.export / "pipeline", torch_dtype=c.dtype)
        out["one_step_model"] = "export (generator LoRA fused)"
    else:  # same cost: the teacher UNet with the export's one-step scheduler (a fused LoRA adds no work)
        one_step = StableDiffusionPipeline(**{**teacher.components, "scheduler": one_step_scheduler(
            dict(teacher.scheduler.config), 999, "epsilon")})
        out["one_step_model"] = "teacher with the one-step scheduler (no export)"
    one_step.set_progress_bar_config(disable=True)
    teacher.scheduler = DDIMScheduler.from_config(teacher.scheduler.config)
    for pipe in (teacher, one_step):
        pipe.to(c.device)
    for batch in SAMPLE_BATCHES:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
        for name, pipe, steps, scale in (("one_step", one_step, 1, 0.0),
                                         (f"teacher_{TEACHER_STEPS}", teacher, TEACHER_STEPS, guidance)):
            call = functools.partial(_generate, pipe, prompts, steps, scale)
            seconds = _time_call(c, call, repeats=3 if steps == 1 else 2)
            out["rows"].append({"model": name, "batch": batch, "steps": steps, "latency_s": seconds,
                                "images_per_s": batch / seconds})
    rows = {(r["model"], r["batch"]): r for r in out["rows"]}
    out["speedup_images_per_s"] = {
        str(b): rows[("one_step", b)]["images_per_s"] / rows[(f"teacher_{TEACHER_STEPS}", b)]["images_per_s"]
        for b in SAMPLE_BATCHES}
    del teacher, one_step
    c.free()
    return out


def section_sdxl_train(c: Check) -> dict:
    """SDXL at 1024 px (the real UNet config with random weights; benchmarks/sdxl_cpu.py's builder gives it small
    text encoders and VAE, which training barely uses): batch 2, checkpointing, bf16, t* 399, guidance 8 (the sdxl
    preset's), K = 4, gamma_z = 0.03, 5 fake updates; peak CUDA memory against one 80 GB GPU."""
    import shutil
    import subprocess

    from sdxl_cpu import BUILD_SCRIPT

    from emd_t2i.training.config import build_config
    from emd_t2i.training.loop import distill

    teacher = c.workdir / "sdxl-teacher"
    start = time.perf_counter()
    if not (teacher / "model_index.json").is_file():
        subprocess.run([sys.executable, "-c", BUILD_SCRIPT, str(teacher), "tiny" if c.tiny else "full",
                        str(ROOT / "tests"), str(ROOT / "benchmarks")], check=True, capture_output=True)
    build_s = time.perf_counter() - start
    run_dir = c.workdir / "run-sdxl"
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = build_config(
        teacher=str(teacher), prompts=str(c.workdir / "prompts.txt"), output=str(run_dir), iterations=c.iterations,
        lr_warmup=0, batch_size=2, num_langevin_steps=K, gamma_z=GAMMA_Z, fake_updates=FAKE_UPDATES, t_star=399,
        guidance_scale=8.0, gradient_checkpointing=True, mixed_precision="bf16" if c.cuda else "no",
        device=c.device, profile=True, log_every=1, validate_every=0, num_validation_prompts=0,
        checkpoint_every=c.iterations, keep_checkpoints=1,
    )
    c.free()
    if c.cuda:
        torch.cuda.reset_peak_memory_stats()
    distill(cfg)
    peak = torch.cuda.max_memory_allocated() / 2**30 if c.cuda else None
    c.free()
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    measured = [r for r in records if r["step"] > 1] or records
    s_per_it = statistics.mean(1 / r["it_per_s"] for r in measured)
    out = {"build_s": round(build_s, 1), "batch_size": 2, "resolution": 8 * json.loads(
               (teacher / "unet" / "config.json").read_text())["sample_size"],
           "gradient_checkpointing": True, "s_per_it": s_per_it,
           "unet_rows_per_it": statistics.mean(r["unet_rows_per_it"] for r in measured),
           "peak_mem_gib": peak, "log": measured}
    if peak is not None:
        out["goal"] = f"peak memory <= {GOAL_SDXL_PEAK_GIB:g} GiB (one 80 GB GPU) at batch 2 with checkpointing"
        out["goal_met"] = peak <= GOAL_SDXL_PEAK_GIB
    shutil.rmtree(run_dir, ignore_errors=True)
    return out


# ---------------------------------------------------------------- running the sections
def run_sections(c: Check, results: dict, out: Path, budget_s: float, start: float) -> None:
    sections = [
        ("build", lambda: section_build(c)),
        ("flops", lambda: section_flops(c)),
        ("train_checkpointing_on", lambda: section_train(c, True)),
        ("train_checkpointing_off", lambda: section_train(c, False)),
        ("export", lambda: section_export(c)),
        ("sampling", lambda: section_sampling(c)),
        ("sdxl_train", lambda: section_sdxl_train(c)),
    ]
    for name, fn in sections:
        elapsed = time.perf_counter() - start
        if elapsed + (0 if c.tiny else ESTIMATE_S[name]) > budget_s:
            results["sections"][name] = {"skipped": f"budget: {elapsed:.0f} s of {budget_s:.0f} s used"}
        elif name not in ("build", "sdxl_train") and c.teacher is None:
            results["sections"][name] = {"skipped": "no teacher folder (build failed)"}
        else:
            t0 = time.perf_counter()
            try:
                results["sections"][name] = fn()
            except Exception as err:  # noqa: BLE001 - one failing section is recorded; the rest still run
                results["sections"][name] = {"error": f"{type(err).__name__}: {err}",
                                             "traceback": traceback.format_exc().splitlines()[-12:]}
                c.free()
            results["sections"][name]["section_s"] = round(time.perf_counter() - t0, 1)
        print(f"[{time.perf_counter() - start:6.0f} s] {name}: {_summary(results['sections'][name])}", flush=True)
        _write(out, results)


def _summary(section: dict) -> str:
    for key in ("error", "skipped"):
        if key in section:
            return f"{key.upper()} {section[key]}"
    keys = ("peak_mem_gib", "s_per_it", "unet_rows_per_s", "mfu", "goal_met", "fwd_flops_per_row",
            "speedup_images_per_s", "seconds")
    return ", ".join(f"{k}={_short(section[k])}" for k in keys if k in section) or "ok"


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_short(v)}" for k, v in value.items()) + "}"
    return str(value)


def _write(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(results, indent=2, default=str) + "\n")
    tmp.replace(path)


def environment(c: Check) -> dict:
    import diffusers

    info = {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "device": c.device, "dtype": str(c.dtype), "tiny": c.tiny}
    try:
        import peft
        import transformers

        info.update(transformers=transformers.__version__, peft=peft.__version__)
    except ImportError:
        pass
    if c.cuda:
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gib=props.total_memory / 2**30,
                    capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda)
    else:
        info["gpu"] = None
    info["peak_bf16_flops"] = c.peak_flops
    return info


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON to write")
    parser.add_argument("--tiny", action="store_true", help="tiny model on the CPU, fp32 (no CUDA numbers, MFU null)")
    parser.add_argument("--workdir", type=Path, default=None, help="teacher, runs, export [default: a temp folder]")
    parser.add_argument("--iterations", type=int, default=3, help="per training setting; the first is warm-up")
    parser.add_argument("--budget-s", type=float, default=450.0,
                        help="no section starts that its estimate says would end past this many seconds")
    args = parser.parse_args(argv)
    if args.iterations < 2:
        parser.error("--iterations must be >= 2 (the first is a warm-up)")
    start = time.perf_counter()
    if not args.tiny and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU, or pass --tiny for the CPU smoke run")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="emd_gpu_check_"))
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    c = Check(tiny=args.tiny, device="cpu" if args.tiny else "cuda", dtype=torch.float32 if args.tiny else torch.bfloat16,
              workdir=workdir, iterations=args.iterations)
    c.peak_flops = peak_bf16_flops(torch.cuda.get_device_name(0)) if c.cuda else None
    results = {"command": " ".join(["python", "benchmarks/gpu_check.py"] + (argv if argv is not None else sys.argv[1:])),
               "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "environment": environment(c),
               "goal": f"peak memory <= {GOAL_PEAK_GIB:g} GiB with gradient checkpointing",
               "workdir": str(workdir), "sections": {}}
    run_sections(c, results, args.out, args.budget_s, start)
    on = results["sections"].get("train_checkpointing_on", {})
    results["goal_met"] = on.get("goal_met")
    results["total_s"] = round(time.perf_counter() - start, 1)
    _write(args.out, results)
    print(f"goal: {results['goal']}: {on.get('peak_mem_gib')} GiB -> {results['goal_met']}; wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
