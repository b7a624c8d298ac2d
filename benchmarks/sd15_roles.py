"""SD1.5-architecture costs of the three roles (random weights from the real config; no download).

Prints a markdown table: parameter counts, the cost of switching roles, and the forward time and peak memory
of one UNet row, on whatever device is given. Usage: python benchmarks/sd15_roles.py [--device cuda] [--dtype fp16]
"""

import argparse
import time

import torch
from diffusers import UNet2DConditionModel

from emd_t2i.models.roles import FAKE_SCORE, GENERATOR, Roles, add_roles
from emd_t2i.schedule import sd_alphas_cumprod
from emd_t2i.training.config import DEFAULT_TARGET_MODULES

SD15_UNET = {"sample_size": 64, "cross_attention_dim": 768, "attention_head_dim": 8,
             "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2}


def timed(fn, repeat: int) -> float:
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeat


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    unet = UNet2DConditionModel(**SD15_UNET).to(args.device, dtype)
    add_roles(unet, args.rank, args.rank, DEFAULT_TARGET_MODULES)
    unet.to(args.device)
    roles = Roles(unet, sd_alphas_cumprod())
    base = sum(p.numel() for n, p in unet.named_parameters() if "lora_" not in n)
    lora = sum(p.numel() for n, p in unet.named_parameters() if "lora_" in n)
    switch = timed(lambda: (roles.activate(GENERATOR), roles.activate(None), roles.activate(FAKE_SCORE)), 10) / 3
    x = torch.randn(args.batch, 4, 64, 64, device=args.device)
    t = torch.full((args.batch,), 500, device=args.device)
    cond = torch.randn(args.batch, 77, 768, device=args.device)
    with torch.no_grad(), torch.autocast(args.device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32):
        forward = timed(lambda: roles.eps(GENERATOR, x, t, cond), 3)
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else float("nan")
    print(f"| device | {args.device} ({args.dtype}) |\n|---|---|")
    print(f"| base UNet parameters | {base / 1e6:.1f} M |")
    print(f"| LoRA parameters, both adapters, rank {args.rank} | {lora / 1e6:.1f} M |")
    print(f"| role switch | {switch * 1e3:.2f} ms |")
    print(f"| one UNet forward, batch {args.batch}, 64x64 latents | {forward:.3f} s |")
    print(f"| peak GPU memory | {peak:.2f} GiB |")


if __name__ == "__main__":
    main()
