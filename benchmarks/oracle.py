"""Oracle tables (markdown): EMD/DMD fixed points, noise-cancellation variance ratios and bias; see docs/ALGORITHM.md."""

from __future__ import annotations

import argparse
import math
import time

import torch

from tools.oracle import Chain, Mixture, fit, gradient_samples

LR, A0 = 0.02, 2.0


def fixed_point_table(chains, iters: int, batch: int, dim: int) -> list[str]:
    """a^2 and b after `iters` Adam steps from (a, b) = (2, 0); ML is a^2 = mixture variance, b = mixture mean."""
    rows = ["| K | gamma_eps | gamma_z | weighting | a^2 (NC on) | a^2 (NC off) | b (NC on) |", "|---|---|---|---|---|---|---|"]
    print("\n".join(rows), flush=True)
    for k, g_eps, g_z, weighting in chains:
        on = fit(Chain(k, g_eps, g_z, True, weighting), iters, batch, dim, lr=LR, a0=A0)
        off = fit(Chain(k, g_eps, g_z, False, weighting), iters, batch, dim, lr=LR, a0=A0)
        name = f"{k} (DMD)" if (k, g_eps, g_z) == (1, 2.0, 0.0) else str(k)
        rows.append(f"| {name} | {g_eps} | {g_z} | {weighting} | {on.a2:.3f} | {off.a2:.3f} | {on.b:+.3f} |")
        print(rows[-1], flush=True)
    return rows


def variance_table(configs, a: float, n: int, batch: int, dim: int) -> list[str]:
    """Per-batch variance of d(M1)/d(a, b) with cancellation off / on, and the paired bias (on - off) / s.e."""
    rows = [
        ("| K | gamma_eps | gamma_z | weighting | var ratio a (off/on) | var ratio b (off/on) "
         "| mean grad a (off) | mean(on - off) a | (on - off) / s.e. |"),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(rows), flush=True)
    for k, g_eps, g_z, weighting in configs:
        on = gradient_samples(Chain(k, g_eps, g_z, True, weighting), a, 0.0, n, batch, dim, seed=7)
        off = gradient_samples(Chain(k, g_eps, g_z, False, weighting), a, 0.0, n, batch, dim, seed=7)
        ratio = off.var(0) / on.var(0)
        diff = (on - off)[:, 0]  # paired: same z_0, eps_0, t and Langevin noise
        z_score = float(diff.mean() / (diff.std() / math.sqrt(n)))
        rows.append(f"| {k} | {g_eps} | {g_z} | {weighting} | {ratio[0]:.1f} | {ratio[1]:.1f} "
                    f"| {float(off[:, 0].mean()):+.2e} | {float(diff.mean()):+.2e} | {z_score:+.1f} |")
        print(rows[-1], flush=True)
    return rows


def nc0_table(n: int, dim: int, iters: int, batch: int) -> list[str]:
    """NC0 (nu_0 = eps_0) against plain NC: paired M-step gradient variance and mean at (a, b) = (2, 0), and the
    fixed points with and without it."""
    rows = [("| K | gamma_eps | gamma_z | weighting | var ratio a (NC/NC0) | var ratio b (NC/NC0) "
            "| (NC0 - NC) / s.e. | a^2 NC | a^2 NC+NC0 |"), "|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(rows), flush=True)
    for k, g_eps, g_z, weighting in [(1, 2.0, 0.0, "dmd"), (4, 0.5, 0.0, "none"), (4, 0.5, 0.0, "dmd"),
                                     (4, 0.5, 0.03, "none"), (4, 0.5, 0.03, "dmd"), (8, 0.5, 0.03, "dmd")]:
        chains = [Chain(k, g_eps, g_z, True, weighting, cancel) for cancel in (False, True)]
        nc, nc0 = (gradient_samples(c, 2.0, 0.0, n, 16, dim, seed=7) for c in chains)
        ratio = nc.var(0) / nc0.var(0)
        diff = (nc0 - nc)[:, 0]
        z_score = float(diff.mean() / (diff.std() / math.sqrt(n))) if diff.abs().max() > 0 else 0.0
        fits = [fit(c, iters, batch, dim, lr=LR, a0=A0).a2 for c in chains]
        rows.append(f"| {k} | {g_eps} | {g_z} | {weighting} | {ratio[0]:.1f} | {ratio[1]:.1f} | {z_score:+.1f} "
                    f"| {fits[0]:.3f} | {fits[1]:.3f} |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--var-batches", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="fewer configurations (a smoke run)")
    parser.add_argument("--nc0", action="store_true", help="only the NC0 table (initial-noise cancellation)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    mix, start = Mixture(), time.time()
    print(f"Teacher: {mix}, ML fit a^2 = {mix.variance():.3f}, b = {mix.mean():.3f}; "
          f"batch {args.batch} x dim {args.dim}, {args.iters} Adam steps from a = {A0} (lr {LR} decayed to "
          f"{LR / 10}), mean of the last quarter.\n")
    if args.nc0:
        print(f"NC0 vs NC, gradients over {args.var_batches} paired batches of 16 x {args.dim}:\n")
        nc0_table(args.var_batches, args.dim, args.iters, args.batch)
        print(f"\n({time.time() - start:.0f} s)")
        return
    chains = [(1, 2.0, 0.0, "dmd"), (1, 2.0, 0.0, "none")]
    chains += [(k, 0.5, 0.0, "dmd") for k in (1, 2, 4, 8, 16)]
    chains += [(k, 0.5, 0.01, "dmd") for k in (1, 2, 4, 8, 16)]
    chains += [(k, 0.5, 0.03, "dmd") for k in (4, 8, 16)]
    chains += [(8, 0.5, 0.1, "dmd"), (8, 1.0, 0.01, "dmd"), (8, 0.5, 0.01, "none"), (16, 0.5, 0.01, "none")]
    if args.quick:
        chains = chains[:1] + chains[-2:-1]
    fixed_point_table(chains, args.iters, args.batch, args.dim)
    print(f"\nGradient at a = 2, b = 0 over {args.var_batches} independent batches of {16} x {args.dim}:\n")
    configs = [(1, 2.0, 0.0, "dmd"), (1, 2.0, 0.0, "none"), (4, 0.5, 0.0, "none"), (4, 0.5, 0.0, "dmd"),
               (16, 0.5, 0.0, "none"), (4, 0.5, 0.01, "none"), (16, 0.5, 0.01, "none"), (16, 0.5, 0.03, "dmd")]
    if args.quick:
        configs = configs[:3]
    variance_table(configs, 2.0, args.var_batches, 16, args.dim)
    print(f"\n({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
