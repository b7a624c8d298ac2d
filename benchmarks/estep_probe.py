"""E-step probe: does Langevin on a trained run's *learned* fake score move its generator's samples toward the
teacher's modes? Nothing is trained: the chain of `emd.e_step` runs alone on a checkpoint's raw generator and fake
score (the pair the E-step sees in training), on the toy's six under-specified prompts and on full prompts.

For each t level (one fixed t for every sample), each step scale c and each K, the z chain (L2) moves with

    gamma_z = c / (1 + (alpha_t / sigma_t)^2 |J|^2)

where |J| is the generator's measured Jacobian norm (`emd.generator_jacobian_norm`, power iteration at
z ~ N(0, I)): c is then the step relative to the stability bound of the z-target's curvature at that t
(docs/ALGORITHM.md, "The z step"). K = 0 is the generator itself. Reported for g(z_K): TV to
the 25-step teacher at the run's guidance (with its floor), modes recalled, entropy ratio, full-prompt accuracy,
rms(z_K), and the mean z drift |(alpha/sigma) J^T delta| against the prior term |z|.

    PYTHONPATH=. python benchmarks/estep_probe.py runs/study22/dmd_s0 --step 500 --out benchmarks/results/estep_probe/dmd_s0_500.json

The K steps are made as K calls of `emd.e_step` with K = 1 (noise cancellation off, which changes only eps_tilde,
never the chain), so K = 4, 16, 64 are prefixes of one chain; `check_prefix` asserts that this equals one call of
`e_step` with K steps, bit for bit.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from emd_t2i.data.cache import EmbeddingCache
from emd_t2i.emd import Draws, EMDSettings, e_step, generator_jacobian_norm, guided_eps
from emd_t2i.evaluation.toy import teacher_images
from emd_t2i.images import decode_latents
from emd_t2i.models.roles import FAKE_SCORE, GENERATOR, TEACHER, Roles, add_roles, load_adapter_state_dict
from emd_t2i.models.teachers import load_teacher
from emd_t2i.schedule import alpha_sigma
from emd_t2i.toy.metrics import evaluation_prompts, prompt_accuracy
from emd_t2i.toy.modes import (
    TEACHER_SEED_OFFSET,
    UNDERSPECIFIED_PROMPTS,
    attribute_labels,
    coverage_from_labels,
)
from emd_t2i.training.checkpoint import checkpoint_dir, load_adapters
from emd_t2i.training.config import DistillConfig

CHUNK = 256  # samples per UNet call


class Probe:
    """A checkpoint's generator and fake score on the toy teacher, with the prompts' embeddings."""

    def __init__(self, run_dir: Path, step: int, ema: bool = False, chain_guidance: float | None = None):
        cfg = DistillConfig.load(run_dir / "config.json")
        self.cfg = cfg
        self.teacher = load_teacher(cfg.teacher)
        add_roles(self.teacher.unet, cfg.generator_rank, cfg.fake_rank, tuple(cfg.target_modules))
        adapters = load_adapters(checkpoint_dir(run_dir, step))
        load_adapter_state_dict(self.teacher.unet, GENERATOR, adapters["generator_ema" if ema else GENERATOR])
        load_adapter_state_dict(self.teacher.unet, FAKE_SCORE, adapters[FAKE_SCORE])
        self.chain_guidance = cfg.guidance_scale if chain_guidance is None else chain_guidance
        self.roles = Roles(self.teacher.unet, self.teacher.alphas_cumprod, self.teacher.prediction_type, cfg.t_star,
                           self.chain_guidance)
        self.cache = EmbeddingCache(self.teacher.tokenizer, self.teacher.text_encoder)
        t = self.teacher
        self.shape = (t.latent_channels, t.latent_size, t.latent_size)

    def bind(self, prompts: list[str]):
        cond = self.cache.get(prompts)
        return self.roles.bind(cond, self.cache.null_embedding().expand_as(cond))

    def images(self, z: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(z), CHUNK):
            generator, _, _ = self.bind(prompts[i:i + CHUNK])
            with torch.no_grad():
                out.append(decode_latents(self.teacher.vae, generator(z[i:i + CHUNK]), self.teacher.scaling_factor))
        return torch.cat(out)

    def jacobian_norm(self, prompts: list[str], seed: int) -> torch.Tensor:
        z = torch.randn((len(prompts), *self.shape), generator=torch.Generator().manual_seed(seed))
        generator, _, _ = self.bind(prompts)
        return generator_jacobian_norm(generator, z, iterations=12, rng=torch.Generator().manual_seed(seed + 1))

    def chain_step(self, z, eps, prompts, t: int, gamma_z: float, gamma_eps: float, n, m):
        """One step of (E1, E2, L1, L2) for every sample at timestep t, by `emd.e_step` with K = 1."""
        settings = EMDSettings(num_steps=1, gamma_eps=gamma_eps, gamma_z=gamma_z, noise_cancellation=False,
                               t_min=t, t_max=t)
        zs, epss, drift = [], [], []
        for i in range(0, len(z), CHUNK):
            rows = slice(i, i + CHUNK)
            generator, teacher_eps, fake_eps = self.bind(prompts[rows])
            tt = torch.full((len(z[rows]),), t, dtype=torch.long)
            draws = Draws(z[rows], eps[rows], tt, n[None, rows], m[None, rows])
            result = e_step(generator, teacher_eps, fake_eps, self.teacher.alphas_cumprod, draws, settings)
            zs.append(result.z)
            epss.append(result.eps_tilde)
        z_next = torch.cat(zs)
        # (L2) solved for its drift -(alpha/sigma) J^T delta: its rms against the prior term's (rms z)
        drift = 2 * (z_next - z - gamma_z**0.5 * m) / gamma_z + z if gamma_z > 0 else torch.zeros_like(z)
        self.drift_rms = float(drift.pow(2).mean().sqrt())
        return z_next, torch.cat(epss)


def check_prefix(probe: Probe, t: int, gamma_z: float, gamma_eps: float, k: int = 3) -> None:
    """K calls of e_step with K = 1 equal one call with K steps (z_K and eps_K), bit for bit."""
    prompts = list(UNDERSPECIFIED_PROMPTS[:2])
    rng = torch.Generator().manual_seed(7)
    z, eps = (torch.randn((2, *probe.shape), generator=rng) for _ in range(2))
    n, m = (torch.randn((k, 2, *probe.shape), generator=rng) for _ in range(2))
    generator, teacher_eps, fake_eps = probe.bind(prompts)
    tt = torch.full((2,), t, dtype=torch.long)
    whole = e_step(generator, teacher_eps, fake_eps, probe.teacher.alphas_cumprod, Draws(z, eps, tt, n, m),
                   EMDSettings(k, gamma_eps, gamma_z, False, t_min=t, t_max=t))
    for i in range(k):
        z, eps = probe.chain_step(z, eps, prompts, t, gamma_z, gamma_eps, n[i], m[i])
    assert torch.equal(z, whole.z) and torch.equal(eps, whole.eps_tilde), "the probe's chain is not emd.e_step's"


def denoising_errors(probe: Probe, z: torch.Tensor, prompts: list[str], ts: list[int], seed: int) -> list[dict]:
    """(F1)'s error on the generator's own samples g(z) noised to each t, for the fake score and for the teacher
    (conditional, w = 1, and guided as in the chain), and the rms of the chain's delta = eps_teacher - eps_fake (E1).
    The fake score is trained on exactly these samples, so where it denoises them no better than the frozen teacher,
    delta carries its fitting error more than the density ratio the E-step is after. g(z) is made once for every t;
    the teacher runs once per t on [uncond; cond], as `Roles.teacher_eps` does, and gives both of its errors."""
    noise = {t: torch.Generator().manual_seed(seed + t) for t in ts}
    names = ("fake", "teacher_conditional", "teacher_guided", "delta")
    sums = {t: dict.fromkeys(names, 0.0) for t in ts}
    for i in range(0, len(z), CHUNK):
        rows = slice(i, i + CHUNK)
        cond = probe.cache.get(prompts[rows])
        uncond = probe.cache.null_embedding().expand_as(cond)
        generator, _, fake_eps = probe.roles.bind(cond, uncond)
        with torch.no_grad():
            x0 = generator(z[rows])
        for t in ts:
            tt = torch.full((len(x0),), t, dtype=torch.long)
            eps = torch.randn(x0.shape, generator=noise[t])
            alpha, sigma = alpha_sigma(probe.teacher.alphas_cumprod, tt, like=x0)
            x_t = alpha * x0 + sigma * eps
            with torch.no_grad():
                fake = fake_eps(x_t, tt)
                both = probe.roles.eps(TEACHER, torch.cat([x_t, x_t]), torch.cat([tt, tt]), torch.cat([uncond, cond]))
            uncond_eps, cond_eps = both.chunk(2)
            guided = guided_eps(uncond_eps, cond_eps, probe.chain_guidance)
            for name, value in (("fake", fake - eps), ("teacher_conditional", cond_eps - eps),
                                ("teacher_guided", guided - eps), ("delta", guided - fake)):
                sums[t][name] += float(value.pow(2).sum())
    count = z.numel()
    return [{"t": t, **{f"mse_{k}": sums[t][k] / count for k in names[:3]},
             "delta_rms": (sums[t]["delta"] / count) ** 0.5} for t in ts]


def teacher_labels(guidance: float, n: int, seed: int, cache: Path) -> np.ndarray:
    """(prompts, n, 3) labels of the 25-step teacher at `guidance` (cached: a few minutes on one thread)."""
    path = cache / f"teacher25_w{guidance}_n{n}_s{seed}.npy"
    if path.exists():
        return np.load(path)
    batch = [p for p in UNDERSPECIFIED_PROMPTS for _ in range(n)]
    labels = attribute_labels(teacher_images(guidance)(batch, seed + TEACHER_SEED_OFFSET))
    labels = labels.reshape(len(UNDERSPECIFIED_PROMPTS), n, -1)
    cache.mkdir(parents=True, exist_ok=True)
    np.save(path, labels)
    return labels


def measure(probe: Probe, z: torch.Tensor, prompts: list[str], n: int, full: list[str], reference) -> dict:
    """Coverage of g(z) on the under-specified prompts (the first 6 n rows) and accuracy on the full ones."""
    images = probe.images(z, prompts)
    under = 6 * n
    labels = attribute_labels(images[:under]).reshape(6, n, -1)
    coverage = coverage_from_labels(labels, reference)
    return {"tv": coverage["mean"]["tv"], "tv_se": coverage["mean"]["tv_se"], "tv_floor": coverage["mean"]["tv_floor"],
            "modes_recalled": coverage["mean"]["modes_recalled"], "entropy_ratio": coverage["mean"]["entropy_ratio"],
            "tv_per_prompt": {p: r["tv"] for p, r in coverage["prompts"].items()},
            "accuracy": prompt_accuracy(images[under:], full)["all"],
            "rms_z": float(z[:under].pow(2).mean().sqrt())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--step", type=int, required=True)
    parser.add_argument("--n", type=int, default=256, help="draws per under-specified prompt")
    parser.add_argument("--full", type=int, default=192, help="full prompts (accuracy)")
    parser.add_argument("--ts", type=int, nargs="+", default=[200, 500, 800])
    parser.add_argument("--scales", type=float, nargs="+", default=[0.1, 0.3, 1.0], help="c of gamma_z")
    parser.add_argument("--ks", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--gamma-eps", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chain-guidance", type=float, default=None,
                        help="the teacher's guidance inside the chain (default: the run's; the reference stays at it)")
    parser.add_argument("--denoising-only", action="store_true",
                        help="only (F1)'s error of the fake score and the teacher on g(z) at each t; no chains")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.time()
    probe = Probe(args.run, args.step, chain_guidance=args.chain_guidance)
    guidance = probe.cfg.guidance_scale
    full = evaluation_prompts(args.full, args.seed)
    prompts = [p for p in UNDERSPECIFIED_PROMPTS for _ in range(args.n)] + full
    rng = torch.Generator().manual_seed(args.seed)
    z0 = torch.randn((len(prompts), *probe.shape), generator=rng)
    eps0 = torch.randn((len(prompts), *probe.shape), generator=rng)
    out = {"run": str(args.run), "step": args.step, "guidance": guidance, "chain_guidance": probe.chain_guidance,
           "t_star": probe.cfg.t_star, "n_per_prompt": args.n, "full_prompts": args.full}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.denoising_only:  # no labels, no |J|, no chains
        out["denoising"] = denoising_errors(probe, z0, prompts, args.ts, args.seed)
        out["seconds"] = round(time.time() - start)
        args.out.write_text(json.dumps(out, indent=1) + "\n")
        print(json.dumps(out["denoising"], indent=1))
        return
    reference = teacher_labels(guidance, 384, args.seed, Path("runs/estep_probe_cache"))
    jac = probe.jacobian_norm(list(UNDERSPECIFIED_PROMPTS) + full[:10], args.seed + 11)
    jnorm = float(jac.max())
    out.update({"gamma_eps": args.gamma_eps,
                "jacobian_norm": {"max": jnorm, "mean": float(jac.mean()), "min": float(jac.min())},
                "generator": measure(probe, z0, prompts, args.n, full, reference), "chains": []})
    print(f"|J| max {jnorm:.3f} mean {float(jac.mean()):.3f}; generator TV {out['generator']['tv']:.3f} "
          f"(floor {out['generator']['tv_floor']:.3f}) acc {out['generator']['accuracy']:.3f}", flush=True)
    for t in args.ts:
        alpha, sigma = (float(v) for v in alpha_sigma(probe.teacher.alphas_cumprod, torch.tensor([t]), z0))
        for c in args.scales:
            gamma_z = c / (1 + (alpha / sigma) ** 2 * jnorm**2)
            check_prefix(probe, t, gamma_z, args.gamma_eps)
            noise = torch.Generator().manual_seed(args.seed + 1000 * t + int(100 * c))
            z, eps = z0.clone(), eps0.clone()
            for k in range(1, max(args.ks) + 1):
                n, m = (torch.randn(z.shape, generator=noise) for _ in range(2))
                z, eps = probe.chain_step(z, eps, prompts, t, gamma_z, args.gamma_eps, n, m)
                if k in args.ks:
                    row = {"t": t, "c": c, "gamma_z": gamma_z, "K": k, "drift_rms": probe.drift_rms,
                           **measure(probe, z, prompts, args.n, full, reference)}
                    out["chains"].append(row)
                    args.out.write_text(json.dumps(out, indent=1) + "\n")  # kept as it goes: a chain is minutes
                    print(f"t {t} c {c} gamma_z {gamma_z:.4f} K {k}: TV {row['tv']:.3f} +- {row['tv_se']:.3f} "
                          f"recall {row['modes_recalled']:.2f} H {row['entropy_ratio']:.2f} "
                          f"acc {row['accuracy']:.3f} rms z {row['rms_z']:.3f} drift {row['drift_rms']:.2f} "
                          f"({time.time() - start:.0f} s)",
                          flush=True)
    out["seconds"] = round(time.time() - start)
    args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
