"""How good can a one-step student of the toy teacher be? A regression probe of the generator's capacity.

The EMD student is the teacher's UNet plus a LoRA, asked to turn noise into an image in one call. Is that
network able to do what 25 guided teacher steps do? This probe trains the same generator adapter (same rank,
target modules, t*, `Roles.generator`) by plain regression onto the teacher's own deterministic 25-step DDIM
sample from the same noise (Luhman & Luhman's knowledge distillation), then measures it like every row of
docs/BENCHMARKS.md. It is not a distillation method of this tool: it is an estimate of what the one-step
architecture can express, so the EMD numbers can be read against it.

    python benchmarks/one_step_capacity.py --pairs 8192 --steps 2000 --out benchmarks/results/capacity.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from emd_t2i.data.cache import EmbeddingCache
from emd_t2i.evaluation.toy import toy_report
from emd_t2i.images import decode_latents
from emd_t2i.models.roles import GENERATOR, TEACHER, Roles, adapter_parameters, add_roles
from emd_t2i.models.teachers import load_teacher
from emd_t2i.toy.domain import all_captions
from emd_t2i.toy.metrics import prompt_accuracy
from emd_t2i.training.config import DEFAULT_TARGET_MODULES, build_config


@torch.no_grad()
def ddim_targets(roles: Roles, scheduler, z: torch.Tensor, cond, uncond, steps: int) -> torch.Tensor:
    """The guided teacher's deterministic `steps`-step DDIM sample from x_T = z (what the pipeline does)."""
    scheduler.set_timesteps(steps)
    x = z * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        eps = roles.teacher_eps(x, t.repeat(x.shape[0]), cond, uncond)
        x = scheduler.step(eps, t, x).prev_sample
    roles.activate(TEACHER)
    return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=8192, help="(noise, teacher sample) training pairs")
    parser.add_argument("--steps", type=int, default=2000, help="regression steps")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--rank", type=int, default=None, help="generator LoRA rank [default: the toy preset's]")
    parser.add_argument("--t-star", type=int, default=None, help="generator timestep [default: the toy preset's]")
    parser.add_argument("--n", type=int, default=240, help="evaluation prompts")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    cfg = build_config(teacher="toy")
    rank, t_star = args.rank or cfg.generator_rank, args.t_star or cfg.t_star

    teacher = load_teacher("toy")
    torch.manual_seed(0)
    add_roles(teacher.unet, rank, 1, DEFAULT_TARGET_MODULES)
    roles = Roles(teacher.unet, teacher.alphas_cumprod, teacher.prediction_type, t_star, cfg.guidance_scale)
    cache = EmbeddingCache(teacher.tokenizer, teacher.text_encoder)
    captions = all_captions()
    shape = (teacher.latent_channels, teacher.latent_size, teacher.latent_size)

    start = time.time()
    gen = torch.Generator().manual_seed(1)
    prompts = [captions[i] for i in torch.randint(len(captions), (args.pairs,), generator=gen)]
    z = torch.randn((args.pairs, *shape), generator=gen)
    targets = []
    for i in range(0, args.pairs, 256):
        cond = cache.get(prompts[i : i + 256])
        targets.append(ddim_targets(roles, teacher.scheduler, z[i : i + 256], cond,
                                    cache.null_embedding().expand_as(cond), 25))
    targets = torch.cat(targets)
    target_seconds = time.time() - start
    check = min(args.pairs, 480)  # the targets must be teacher-quality samples
    targets_accuracy = prompt_accuracy(decode_latents(teacher.vae, targets[:check], teacher.scaling_factor),
                                       prompts[:check])
    print(json.dumps({"targets_accuracy": targets_accuracy}), flush=True)

    params = adapter_parameters(teacher.unet, GENERATOR)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)
    start = time.time()
    for step in range(args.steps):
        idx = torch.randint(args.pairs, (args.batch,), generator=gen)
        x0 = roles.generator(z[idx], cache.get([prompts[i] for i in idx]))
        loss = (x0 - targets[idx]).pow(2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 200 == 0 or step == args.steps - 1:
            print(json.dumps({"step": step, "mse": round(loss.item(), 4)}), flush=True)
    train_seconds = time.time() - start

    @torch.no_grad()
    def generate(batch_prompts: list[str], seed: int) -> torch.Tensor:
        noise = torch.randn((len(batch_prompts), *shape), generator=torch.Generator().manual_seed(seed))
        x0 = torch.cat([roles.generator(noise[i : i + 120], cache.get(batch_prompts[i : i + 120]))
                        for i in range(0, len(batch_prompts), 120)])
        roles.activate(TEACHER)
        return decode_latents(teacher.vae, x0, teacher.scaling_factor)

    report = toy_report(generate, n=args.n)
    result = {"regression_student": {**report, "pairs": args.pairs, "steps": args.steps, "batch": args.batch,
                                     "lr": args.lr, "rank": rank, "t_star": t_star,
                                     "targets_accuracy": targets_accuracy,
                                     "target_seconds": round(target_seconds), "train_seconds": round(train_seconds)}}
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
