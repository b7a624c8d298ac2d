"""SDXL's UNet at real size on the CPU: one EMD iteration through `emd-t2i distill`, peak RSS against one UNet copy.

Builds (in a subprocess) a StableDiffusionXLPipeline folder whose UNet has the published config of
stabilityai/stable-diffusion-xl-base-1.0 with random weights (2.57 B parameters, 10.3 GB in float32); the text
encoders and the VAE are small stand-ins with SDXL's interface (hidden 768 + 1280 = 2048, a 1280-wide pooled
projection, a VAE with scale factor 8), since the question is what one UNet in three roles costs. Then runs one
iteration at 1024 px (128x128 latents) with the cheapest EMD setting (K = 1, gamma_z = 0, one fake update, batch 1,
guidance 8 so the teacher runs [uncond; cond]) and gradient checkpointing, and reads the distill process's peak RSS
(os.wait4's ru_maxrss). Writes benchmarks/results/sdxl_cpu.json and prints one markdown row.

    python benchmarks/sdxl_cpu.py --tiny                        # the tiny SDXL of tests/tiny.py: a minute
    python benchmarks/sdxl_cpu.py --workdir /tmp/emd_sdxl       # real size: ~11 GB disk, >= 16 GB free RAM, long

Check `free -g` first and run it alone: it holds the 10.3 GB UNet plus activations at 1024 px.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (the keys that differ from diffusers' defaults)
SDXL_UNET_CONFIG = {
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "in_channels": 4,
    "layers_per_block": 2,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}
SDXL_UNET_PARAMETERS = 2_567_463_684  # the published UNet's parameter count: the builder checks it
SDXL_SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                         "beta_schedule": "scaled_linear", "steps_offset": 1, "timestep_spacing": "leading"}

BUILD_SCRIPT = """\
import sys, torch
from pathlib import Path
sys.path.insert(0, sys.argv[3])
if sys.argv[2] == "tiny":
    from tiny import make_tiny_sdxl_pipeline
    make_tiny_sdxl_pipeline(sys.argv[1]); raise SystemExit
import json
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
sys.path.insert(0, sys.argv[4])
from sdxl_cpu import SDXL_SCHEDULER_CONFIG, SDXL_UNET_CONFIG, SDXL_UNET_PARAMETERS
from tools.tokenizer import clip_tokenizer
torch.manual_seed(0)
unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
count = sum(p.numel() for p in unet.parameters())
assert count == SDXL_UNET_PARAMETERS, count
def encoder(cls, hidden, **extra):
    return cls(CLIPTextConfig(hidden_size=hidden, intermediate_size=256, num_hidden_layers=2, num_attention_heads=8,
                              max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                              pad_token_id=49407, **extra)).eval()
vae = AutoencoderKL(block_out_channels=(32, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                    up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=32,
                    layers_per_block=1, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=encoder(CLIPTextModel, 768),
    text_encoder_2=encoder(CLIPTextModelWithProjection, 1280, projection_dim=1280), tokenizer=clip_tokenizer(),
    tokenizer_2=clip_tokenizer(), unet=unet, scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG))
pipe.save_pretrained(sys.argv[1], safe_serialization=True)
"""
TRAIN_PROMPTS = ["a photograph of a red fox in the snow", "a lighthouse at dusk", "an astronaut riding a horse"]


def run_measured(cmd: list[str], log: Path, env: dict) -> dict:
    """Run `cmd` to its end: exit code, wall time and its peak RSS (ru_maxrss, KiB on Linux)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    rc = os.waitstatus_to_exitcode(status)
    out = {"cmd": shlex.join(cmd), "rc": rc, "wall_s": round(time.perf_counter() - start, 1),
           "peak_rss_bytes": usage.ru_maxrss * 1024}
    if rc != 0:
        out["error_tail"] = log.read_text(errors="replace").splitlines()[-15:]
    return out


def unet_bytes(teacher: Path) -> int:
    """Bytes of the UNet's float32 weights as saved (one copy)."""
    return sum(p.stat().st_size for p in (teacher / "unet").glob("*.safetensors"))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the tiny SDXL of tests/tiny.py (seconds)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/emd_sdxl"))
    parser.add_argument("--output", type=Path, default=None, help="JSON results [default: results/sdxl_cpu.json]")
    parser.add_argument("--precision", choices=("no", "bf16"), default="no",
                        help="--mixed-precision of the run: bf16 holds the frozen UNet in half the bytes")
    args = parser.parse_args(argv)
    work, env = args.workdir, {**os.environ, "HF_HUB_OFFLINE": "1"}
    teacher = work / "teacher"
    results: dict = {"tiny": args.tiny, "precision": args.precision}
    if not (teacher / "model_index.json").is_file():
        build = [sys.executable, "-c", BUILD_SCRIPT, str(teacher), "tiny" if args.tiny else "full",
                 str(ROOT / "tests"), str(ROOT / "benchmarks")]
        results["build"] = run_measured(build, work / "logs" / "build.log", env)
        if results["build"]["rc"] != 0:
            print(json.dumps(results, indent=2))
            raise SystemExit(1)
    prompts = work / "prompts.txt"
    prompts.write_text("\n".join(TRAIN_PROMPTS) + "\n")
    emd = str(Path(sys.executable).with_name("emd-t2i"))
    flags = ["--iterations", "1", "--lr-warmup", "0", "--batch-size", "1", "--num-langevin-steps", "1", "--gamma-z", "0",
             "--fake-updates", "1", "--guidance-scale", "8", "--t-star", "399", "--gradient-checkpointing",
             "--mixed-precision", args.precision, "--validate-every", "0", "--log-every", "1", "--checkpoint-every", "1",
             "--device", "cpu", "--no-export", "--overwrite"]
    run = work / "run"
    results["distill"] = run_measured([emd, "distill", "--teacher", str(teacher), "--prompts", str(prompts),
                                       "--output", str(run)] + flags, work / "logs" / "distill.log", env)
    results["unet_bytes"] = unet_bytes(teacher)
    results["peak_over_unet"] = round(results["distill"]["peak_rss_bytes"] / results["unet_bytes"], 3)
    log = run / "log.jsonl"
    if log.is_file():
        results["iteration"] = json.loads(log.read_text().splitlines()[-1])
    out = args.output or RESULTS / f"sdxl_cpu{'_tiny' if args.tiny else ''}{'_bf16' if args.precision == 'bf16' else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    gib = 2**30
    print("| UNet (one float32 copy) | distill peak RSS | ratio | wall |\n|---|---|---|---|")
    print(f"| {results['unet_bytes'] / gib:.2f} GiB | {results['distill']['peak_rss_bytes'] / gib:.2f} GiB | "
          f"{results['peak_over_unet']} | {results['distill']['wall_s']} s |")
    if results["distill"]["rc"] != 0:
        print("\n".join(results["distill"].get("error_tail", [])))
        raise SystemExit(1)
    return results


if __name__ == "__main__":
    main()
