"""SD1.5 at real size on the CPU: distill, export and sample through the CLI, with each subprocess's peak memory.

On a random-weight SD1.5 folder (benchmarks/sd_random.py) this runs, each as its own subprocess whose peak RSS
is read with os.wait4: `emd-t2i distill` at 64x64 latents for each setting (minimal: K = 1, gamma_z = 0, one
fake update; defaults: K = 4, gamma_z = 0.03, 5 fake updates), `emd-t2i export RUN --format all`, the one-step
sample of `emd-t2i sample` (its library function, which also returns the latents), and the export's pipeline
folder in plain diffusers; then checks that the last two agree. Peak memory of a distill run is set against
the budget: one float32 copy of UNet + text encoder + VAE, 4x the LoRA bytes of both adapters (weights, grads,
two Adam moments) and 1 GB. Writes JSON (benchmarks/results/sd15_cpu.json) and prints a markdown table.

    python benchmarks/sd15_cpu.py --tiny                           # the same on a tiny model, in about a minute
    python benchmarks/sd15_cpu.py --workdir /tmp/emd_sd15           # real size: tens of minutes, ~10 GB RAM
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shlex
import shutil
import struct
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

# No torch in this process: a child's ru_maxrss starts at its parent's peak RSS (Linux carries the high-water
# mark through fork and exec), so the parent stays small and builds the teacher in a subprocess too.
ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
RESULTS = BENCHMARKS / "results"
PROMPT = "a photograph of a red fox in the snow"
SEED = 0
LATENT_ATOL = 1e-4  # tests/test_export.py's tolerances for the same comparison on tiny models
PIXEL_ATOL = 1
# (K, gamma_z, fake updates) per setting; the flags are built from these
SETTINGS = {"minimal": (1, 0.0, 1), "defaults": (4, 0.03, 5)}
CONFIG_KEYS = ("t_star", "guidance_scale", "generator_rank", "fake_rank", "target_modules", "ema_decay",
               "mixed_precision", "gradient_checkpointing", "lr_schedule", "lr_warmup")
TRAIN_PROMPTS = [
    "a photograph of a red fox in the snow", "a lighthouse at dusk", "a bowl of ramen, studio lighting",
    "an astronaut riding a horse", "a watercolor painting of a harbour", "a cat wearing sunglasses",
]

SAMPLE_SCRIPT = """\
import sys, numpy
from emd_t2i.export.sample import sample
s = sample([sys.argv[2]], model=sys.argv[1], seed=int(sys.argv[3]), device="cpu")
numpy.save(sys.argv[4] + "/latents.npy", s.latents.float().numpy())
s.images[0].save(sys.argv[4] + "/image.png")
"""
DIFFUSERS_SCRIPT = """\
import sys, numpy, torch
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1])
pipe.set_progress_bar_config(disable=True)
with torch.no_grad():
    latents = pipe(sys.argv[2], num_inference_steps=1, guidance_scale=0.0, output_type="latent",
                   generator=torch.Generator("cpu").manual_seed(int(sys.argv[3]))).images
    # the pipeline's own decode (no safety checker: every image denormalised)
    image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    pipe.image_processor.postprocess(image, output_type="pil")[0].save(sys.argv[4] + "/image.png")
numpy.save(sys.argv[4] + "/latents.npy", latents.float().numpy())
"""


def emd_unet_rows(K: int, gamma_z: float, fake_updates: int, batch: int, guided: bool = True) -> tuple[int, int]:
    """UNet rows of one EMD iteration (emd_t2i/emd.py, train.py): (forward, backward).

    Each Langevin step: the teacher (2B rows, [uncond; cond] when guided), the fake score (B) and, when z moves
    (gamma_z > 0), a generator forward (B) whose VJP w.r.t. z is a backward row; with gamma_z = 0 one generator
    forward serves E- and M-step. Then the M-step backward (B), the first fake-score update on g(z_0) (B forward,
    B backward), and each further update a fresh generator sample and a fake-score forward (2B, B backward).
    """
    teacher = 2 if guided else 1
    forward = K * (teacher + 2) + 1 if gamma_z > 0 else 1 + K * (teacher + 1)
    forward += 1 + 2 * (fake_updates - 1)
    backward = (K if gamma_z > 0 else 0) + 1 + fake_updates
    return forward * batch, backward * batch


# ---------------------------------------------------------------- measuring one subprocess
def other_processes(own_pid: int) -> dict[str, float]:
    """Processes outside this benchmark that used CPU: command -> %CPU (ps's, over each process's lifetime)."""
    out = subprocess.run(["ps", "-eo", "pid,ppid,pcpu,args", "--sort=-pcpu"], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    mine = {str(os.getpid()), str(own_pid)}
    busy = {}
    for line in out[1:]:
        pid, ppid, pcpu, args = line.split(None, 3)
        if pid not in mine and ppid not in mine and float(pcpu) >= 1.0:
            busy[args[:160]] = float(pcpu)
    return busy


def run_measured(cmd: list[str], log: Path, env: dict, poll_s: float = 60.0) -> dict:
    """Run `cmd` to its end; its wall time, CPU time, exit code and peak RSS (ru_maxrss, KiB on Linux)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    seen, loads, hwm, timeline = {}, [], 0, []
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        next_poll = start
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            rss, peak = vm_rss(proc.pid)
            hwm = max(hwm, peak)
            now = time.perf_counter() - start
            if rss and (not timeline or (abs(rss - timeline[-1][1]) > 0.05 * timeline[-1][1]
                                         and now - timeline[-1][0] >= 2)):
                timeline.append((round(now, 1), rss))  # when the memory moves: where a peak falls
            if time.perf_counter() >= next_poll:  # what else shares the cores, now and then
                loads.append(round(os.getloadavg()[0], 2))
                for command, pcpu in other_processes(proc.pid).items():
                    seen[command] = max(pcpu, seen.get(command, 0.0))
                next_poll += poll_s
            time.sleep(0.1)
    proc.returncode = rc = os.waitstatus_to_exitcode(status)
    result = {
        "cmd": shlex.join(cmd), "rc": rc, "wall_s": round(time.perf_counter() - start, 2),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1), "peak_rss_bytes": usage.ru_maxrss * 1024,
        # the same peak read from /proc while it ran (VmHWM, polled every 0.1 s): a cross-check
        "vm_hwm_bytes": hwm, "rss_timeline": timeline,
        "load_avg_1min": loads, "other_processes": seen, "log": str(log),
    }
    if rc != 0:
        result["error_tail"] = log.read_text(errors="replace").splitlines()[-15:]
    return result


def vm_rss(pid: int) -> tuple[int, int]:
    """(current RSS, peak RSS so far) of a running process from /proc, in bytes; (0, 0) once it has exited."""
    values = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    values[line[:5]] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return values.get("VmRSS", 0), values.get("VmHWM", 0)


# ---------------------------------------------------------------- reading what a run left
def safetensors_parameters(paths) -> int:
    """Elements in safetensors files, from their JSON headers (8-byte length, then the header; no torch)."""
    total = 0
    for path in paths:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return total


def teacher_parameters(teacher: Path) -> dict[str, int]:
    return {part: safetensors_parameters(sorted((teacher / part).glob("*.safetensors")))
            for part in ("unet", "text_encoder", "vae")}


def lora_parameters(run_dir: Path) -> dict[str, int]:
    """LoRA parameters of both adapters, counted in the run's last checkpoint (checkpoints/step-NNNNNN)."""
    ckpt = max((run_dir / "checkpoints").glob("step-*"))
    return {name: safetensors_parameters([ckpt / f"{name}.safetensors"]) for name in ("generator", "fake_score")}


def iteration_records(run_dir: Path) -> list[dict]:
    keys = ("step", "it_per_s", "unet_rows_per_it", "unet_backward_rows_per_it", "unet_forward_s",
            "unet_backward_s", "other_s", "peak_mem_gib")
    records = []
    for line in (run_dir / "log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        row = {k: rec[k] for k in keys if k in rec}
        row["s_per_it"] = 1 / rec["it_per_s"]
        records.append(row)
    return records


def distill_args(setting: str, teacher: Path, prompts: Path, run_dir: Path, iterations: int) -> list[str]:
    """`emd-t2i distill` arguments of one setting; the rest comes from the teacher's preset (sd-1.5 for SD1.5)."""
    K, gamma_z, fake_updates = SETTINGS[setting]
    return [
        "distill", "--teacher", str(teacher), "--prompts", str(prompts), "--output", str(run_dir),
        "--iterations", str(iterations), "--lr-warmup", "0", "--batch-size", "1", "--gradient-checkpointing",
        "--device", "cpu", "--mixed-precision", "no", "--no-export",
        # validate_every 0 still renders one grid after the last iteration (after its log line): 1 prompt
        "--validate-every", "0", "--num-validation-prompts", "1",
        "--log-every", "1", "--checkpoint-every", str(iterations), "--keep-checkpoints", "1", "--profile",
        "--num-langevin-steps", str(K), "--gamma-z", str(gamma_z), "--fake-updates", str(fake_updates),
    ]


# ---------------------------------------------------------------- the benchmark
def distill_setting(name: str, teacher: Path, prompts: Path, workdir: Path, iterations: int, env: dict,
                    emd: list[str], fp32_bytes: int) -> dict:
    K, gamma_z, fake_updates = SETTINGS[name]
    run_dir = workdir / f"run-{name}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, never a resume
    cmd = emd + distill_args(name, teacher, prompts, run_dir, iterations)
    result = {"K": K, "gamma_z": gamma_z, "fake_updates": fake_updates, "batch_size": 1,
              "run_dir": str(run_dir), "process": run_measured(cmd, workdir / "logs" / f"distill-{name}.log", env)}
    forward, backward = emd_unet_rows(K, gamma_z, fake_updates, batch=1)
    result["expected_rows_per_it"] = {"forward": forward, "backward": backward}
    if result["process"]["rc"] != 0:
        return result
    config = json.loads((run_dir / "config.json").read_text())  # resolved: the teacher's preset under our flags
    lora = lora_parameters(run_dir)
    lora_bytes = 4 * sum(lora.values())  # float32
    budget = fp32_bytes + 4 * lora_bytes + 10**9
    peak = result["process"]["peak_rss_bytes"]
    records = iteration_records(run_dir)
    result.update(config={k: config[k] for k in CONFIG_KEYS if k in config}, lora_parameters=lora,
                  lora_bytes=lora_bytes, budget_bytes=budget, within_budget=peak <= budget,
                  # not in the budget: the generator's EMA (the preset keeps one), a fifth copy of its LoRA
                  ema_bytes=4 * lora["generator"] if config.get("ema_decay", 0) > 0 else 0,
                  peak_over_budget=round(peak / budget, 3), iterations=records,
                  s_per_it=records[-1]["s_per_it"])  # the last iteration: no first-call warm-up
    return result


def compare_samples(ours: Path, theirs: Path) -> dict:
    import numpy as np
    from PIL import Image

    a, b = np.load(ours / "latents.npy"), np.load(theirs / "latents.npy")
    img_a = np.asarray(Image.open(ours / "image.png"), dtype=int)
    img_b = np.asarray(Image.open(theirs / "image.png"), dtype=int)
    latent_diff = float(np.abs(a - b).max())
    pixel_diff = int(np.abs(img_a - img_b).max())
    return {
        "latent_shape": list(a.shape), "latent_max_abs": float(np.abs(a).max()), "latent_max_abs_diff": latent_diff,
        "image_size": list(img_a.shape), "image_max_abs_diff": pixel_diff,
        # a random VAE may saturate: the share of clipped pixels says how much the image check can see
        "image_saturated_fraction": float(((img_a == 0) | (img_a == 255)).mean()),
        "latent_atol": LATENT_ATOL, "pixel_atol": PIXEL_ATOL,
        "match": latent_diff <= LATENT_ATOL and pixel_diff <= PIXEL_ATOL,
    }


def sample_and_compare(export: Path, workdir: Path, env: dict, emd_python: str) -> dict:
    ours, theirs = workdir / "sample-emd", workdir / "sample-diffusers"
    for folder in (ours, theirs):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    out = {
        "sample": run_measured([emd_python, "-c", SAMPLE_SCRIPT, str(export), PROMPT, str(SEED), str(ours)],
                               workdir / "logs" / "sample.log", env),
        "diffusers": run_measured([emd_python, "-c", DIFFUSERS_SCRIPT, str(export / "pipeline"), PROMPT, str(SEED),
                                   str(theirs)], workdir / "logs" / "diffusers.log", env),
    }
    if out["sample"]["rc"] == 0 and out["diffusers"]["rc"] == 0:
        out["comparison"] = compare_samples(ours, theirs)
    return out


def gb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e9:.2f}"


def markdown(results: dict) -> str:
    lines = [
        (f"Teacher: {results['teacher']['kind']} ({results['teacher']['path']}), float32 copy "
         f"{gb(results['teacher']['fp32_bytes'])} GB; {results['iterations']} iterations, batch 1, CPU."),
        "",
        ("| setting | s / it (per iteration) | UNet fwd s | UNet bwd s | other s | fwd rows / it | bwd rows / it "
         "| peak RSS GB | budget GB | peak / budget |"),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(rec: dict, key: str, fmt: str = "{:.1f}") -> str:
        return fmt.format(rec[key]) if rec.get(key) is not None else "-"

    for name, s in results["settings"].items():
        if s["process"]["rc"] != 0:
            lines.append(f"| {name} | failed (rc {s['process']['rc']}, {s['process']['log']}) |||||||||")
            continue
        last = s["iterations"][-1]
        per_it = " / ".join(f"{r['s_per_it']:.1f}" for r in s["iterations"])
        lines.append(
            f"| {name} (K={s['K']}, gz={s['gamma_z']}, F={s['fake_updates']}) | {per_it} | "
            f"{cell(last, 'unet_forward_s')} | {cell(last, 'unet_backward_s')} | {cell(last, 'other_s')} | "
            f"{cell(last, 'unet_rows_per_it', '{:g}')} | {cell(last, 'unet_backward_rows_per_it', '{:g}')} | "
            f"{gb(s['process']['peak_rss_bytes'])} | {gb(s['budget_bytes'])} | {s['peak_over_budget']} |")
    lines += ["", "| subprocess | wall s | peak RSS GB | exit |", "|---|---|---|---|"]
    steps = {f"distill {n}": s["process"] for n, s in results["settings"].items()}
    steps.update({k: results[k] for k in ("export",) if k in results})
    steps.update({k: v for k, v in results.get("sampling", {}).items() if k in ("sample", "diffusers")})
    for name, p in steps.items():
        lines.append(f"| {name} | {p['wall_s']:.0f} | {gb(p['peak_rss_bytes'])} | {p['rc']} |")
    comparison = results.get("sampling", {}).get("comparison")
    if comparison:
        lines += ["", (f"diffusers vs emd-t2i sample (seed {SEED}): latents max |diff| "
                       f"{comparison['latent_max_abs_diff']:.2e} (max |latent| {comparison['latent_max_abs']:.2f}), "
                       f"image max |diff| {comparison['image_max_abs_diff']} levels "
                       f"({comparison['image_saturated_fraction']:.0%} of pixels saturated): "
                       f"{'match' if comparison['match'] else 'MISMATCH'}")]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None,
                        help="teacher folder, runs, exports, logs [default: /tmp/emd_sd15 or /tmp/emd_sd15_tiny]")
    parser.add_argument("--settings", default="minimal,defaults", help=f"comma list of {', '.join(SETTINGS)}")
    parser.add_argument("--tiny", action="store_true", help="the tiny pipeline of tests/tiny.py (seconds)")
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the subprocesses "
                        "[default: torch's own, all cores]")
    parser.add_argument("--distill-only", action="store_true", help="no export, sampling or comparison")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON to write [default: benchmarks/results/sd15_cpu.json; WORKDIR/sd15_cpu.json "
                             "with --tiny]")
    args = parser.parse_args(argv)
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        parser.error(f"--settings: unknown {unknown}; choose from {', '.join(SETTINGS)}")
    workdir = args.workdir or Path("/tmp/emd_sd15_tiny" if args.tiny else "/tmp/emd_sd15")
    out = args.out or (workdir / "sd15_cpu.json" if args.tiny else RESULTS / "sd15_cpu.json")
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    cli = Path(sys.executable).with_name("emd-t2i")
    emd = [str(cli)] if cli.exists() else [sys.executable, "-m", "emd_t2i.cli"]

    start = time.perf_counter()
    teacher = workdir / "teacher"
    build = run_measured([sys.executable, str(BENCHMARKS / "sd_random.py"), str(teacher)]
                         + (["--tiny"] if args.tiny else []), workdir / "logs" / "build.log", env)
    if build["rc"] != 0:
        raise SystemExit(f"building the random teacher failed: see {build['log']}")
    (workdir / "prompts.txt").write_text("\n".join(TRAIN_PROMPTS) + "\n")
    params = teacher_parameters(teacher)
    fp32_bytes = 4 * sum(params.values())
    results = {
        "command": shlex.join(["python", "benchmarks/sd15_cpu.py"] + (argv if argv is not None else sys.argv[1:])),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": version("torch"), "diffusers": version("diffusers"),
                    "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS"),
                    "other_processes_at_start": other_processes(os.getpid())},
        "teacher": {"kind": "tiny" if args.tiny else "sd15", "path": str(teacher), "parameters": params,
                    "fp32_bytes": fp32_bytes, "build": build},
        "iterations": args.iterations,
        "settings": {},
    }
    for name in settings:
        results["settings"][name] = distill_setting(name, teacher, workdir / "prompts.txt", workdir,
                                                    args.iterations, env, emd, fp32_bytes)
        _write(out, results)
    done = [n for n in settings if results["settings"][n]["process"]["rc"] == 0]
    if done and not args.distill_only:
        run_dir = Path(results["settings"][done[-1]]["run_dir"])
        results["export"] = run_measured(emd + ["export", str(run_dir), "--format", "all"],
                                         workdir / "logs" / "export.log", env)
        results["export"]["run"] = done[-1]
        if results["export"]["rc"] == 0:
            results["sampling"] = sample_and_compare(run_dir / "export", workdir, env, sys.executable)
    results["total_wall_s"] = round(time.perf_counter() - start, 1)
    # every child's ru_maxrss includes this process's peak (carried through fork + exec): the floor of the readings
    results["parent_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    _write(out, results)
    print(markdown(results))
    print(f"\nwrote {out}")
    return results


def _write(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
