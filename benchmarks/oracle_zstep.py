"""The z step on the oracle: stability per t, fixed points against maximum likelihood on four mixtures, and the
noise-cancellation bias at the ML point; markdown on stdout, raw numbers to a JSON file.

See docs/ALGORITHM.md, "The z step". One thread; about 30 minutes alone.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from tools.oracle import (
    ASYMMETRIC,
    MINORITY,
    SHARP,
    SYMMETRIC,
    Chain,
    chain_z,
    fit,
    fit_error,
    gradient_samples,
)

LR, A0 = 0.02, 2.0
MIXTURES = {"symmetric": SYMMETRIC, "asymmetric": ASYMMETRIC, "minority": MINORITY, "sharp": SHARP}
TOLERANCE = 0.02  # the criterion: a^2 within 2% of ML, b within 2% of the teacher's sd
JUDGED = ("symmetric", "minority")  # the project's oracle, and a teacher with a minority mode

# (K, gamma_eps, gamma_z, z_step, weighting, NC0); noise cancellation on throughout, as in every preset.
FIT_ROWS = [
    (1, 2.0, 0.0, "constant", "dmd", False),  # DMD
    (1, 2.0, 0.0, "constant", "dmd-t", False),  # DMD with its normaliser averaged per t bin
    (1, 2.0, 0.0, "constant", "none", False),
    (8, 0.5, 0.0, "constant", "none", True),  # eps-only chain (gamma_z = 0)
    (4, 0.5, 0.03, "constant", "dmd", True),  # the SD presets' chain before the jacobian step
    (8, 0.5, 0.05, "constant", "none", True),
    (8, 0.5, 0.1, "constant", "none", True),
    (8, 0.5, 0.175, "snr", "none", True),
    (8, 0.5, 0.3, "jacobian", "none", True),
    (8, 0.5, 0.35, "jacobian", "none", True),
    (8, 0.5, 0.4, "jacobian", "none", True),
    (8, 0.5, 0.45, "jacobian", "none", True),
    (8, 0.5, 0.4, "jacobian", "dmd-t", True),
    (8, 0.5, 0.4, "jacobian", "dmd", True),
    (4, 0.5, 0.6, "jacobian", "none", True),
    (4, 0.5, 0.6, "jacobian", "dmd-t", True),
    (2, 0.5, 1.0, "jacobian", "none", True),
    (16, 0.5, 0.25, "jacobian", "none", True),
]
GRADIENT_ROWS = [(8, 0.5, 0.175, "snr", "none", True), (8, 0.5, 0.4, "jacobian", "none", True)]


def chain(row) -> Chain:
    k, g_eps, g_z, z_step, weighting, nc0 = row
    return Chain(k, g_eps, g_z, True, weighting, nc0, 20, 980, z_step)


def label(row) -> str:
    k, g_eps, g_z, z_step, weighting, nc0 = row
    name = f"{k} (DMD)" if (k, g_eps, g_z) == (1, 2.0, 0.0) else str(k)
    return f"| {name} | {g_eps} | {g_z} | {z_step if g_z else '-'} | {weighting} | {'on' if nc0 else 'off'} |"


def stability_table(k: int, batch: int, dim: int, out: dict) -> list[str]:
    """rms of z_K after k steps at one fixed t, (a, b) at the ML fit; the target's z-marginal has rms about 1."""
    gammas, ts = (0.1, 0.3, 1.0, 2.0), (20, 50, 100, 200, 400, 980)
    rules = ("constant", "snr", "jacobian")
    rows = ["| mixture | t | " + " | ".join(f"{rule} {g}" for rule in rules for g in gammas) + " |",
            "|---|---|" + "---|" * len(rules) * len(gammas)]
    print("\n".join(rows), flush=True)
    for name in ("symmetric", "sharp"):
        mix = MIXTURES[name]
        for t in ts:
            cells = []
            for rule in rules:
                for g in gammas:
                    z = chain_z(Chain(k, 0.5, g, True, "none", True, t, t, rule), math.sqrt(mix.variance()),
                                mix.mean(), batch, dim, seed=0, mix=mix)
                    rms = float(z.pow(2).mean().sqrt())
                    out.setdefault(name, {}).setdefault(str(t), {})[f"{rule} {g}"] = rms
                    cells.append(f"{rms:.2f}" if rms < 1e3 else "diverged")
            rows.append(f"| {name} | {t} | " + " | ".join(cells) + " |")
            print(rows[-1], flush=True)
    return rows


def fixed_point_table(rows_in, iters: int, batch: int, dim: int, seeds: int, out: list) -> list[str]:
    """a^2 / a^2_ML - 1 and (b - b_ML) / sd on each mixture, mean over seeds (Adam from (a, b) = (2, 0))."""
    head = "| K | gamma_eps | gamma_z | z_step | weighting | NC0 | " + " | ".join(
        f"{n}: a^2 err | {n}: b err" for n in MIXTURES) + f" | within 2% ({', '.join(JUDGED)}) | s |"
    rows = [head, "|---|---|---|---|---|---|" + "---|---|" * len(MIXTURES) + "---|---|"]
    print("\n".join(rows), flush=True)
    for row in rows_in:
        start, cells, record = time.time(), [], {"row": list(row), "fits": {}}
        for name, mix in MIXTURES.items():
            errs = [fit_error(fit(chain(row), iters, batch, dim, lr=LR, a0=A0, seed=s, mix=mix), mix)
                    for s in range(seeds)]
            record["fits"][name] = [{"a2_rel_err": a, "b_err_sd": b} for a, b in errs]
            a_err = sum(e[0] for e in errs) / seeds
            b_err = sum(e[1] for e in errs) / seeds
            spread = max(e[0] for e in errs) - min(e[0] for e in errs)
            cells.append(f"{100 * a_err:+.1f}% (±{50 * spread:.1f}) | {100 * b_err:+.1f}%")
            record[name] = {"a2_rel_err": a_err, "b_err_sd": b_err}
        ok = all(abs(record[n]["a2_rel_err"]) <= TOLERANCE and abs(record[n]["b_err_sd"]) <= TOLERANCE
                 for n in JUDGED)
        record["within_2pct"], record["seconds"] = ok, time.time() - start
        out.append(record)
        rows.append(f"{label(row)} " + " | ".join(cells) + f" | {'yes' if ok else 'no'} | {record['seconds']:.0f} |")
        print(rows[-1], flush=True)
    return rows


def gradient_table(rows_in, n: int, dim: int, out: list) -> list[str]:
    """Mean d(M1)/da at the ML point over n batches of 64, noise cancellation on and off (paired draws):
    zero for an unbiased E-step; negative pushes a^2 above ML."""
    rows = ["| K | gamma_eps | gamma_z | z_step | weighting | NC0 | "
            + " | ".join(f"{m}: NC on | {m}: NC off" for m in MIXTURES) + " |",
            "|---|---|---|---|---|---|" + "---|---|" * len(MIXTURES)]
    print("\n".join(rows), flush=True)
    for row in rows_in:
        cells, record = [], {"row": list(row)}
        for name, mix in MIXTURES.items():
            a = math.sqrt(mix.variance())
            on = gradient_samples(chain(row), a, mix.mean(), n, 64, dim, seed=1, mix=mix)[:, 0]
            k, g_eps, g_z, z_step, weighting, _ = row
            off_chain = Chain(k, g_eps, g_z, False, weighting, False, 20, 980, z_step)
            off = gradient_samples(off_chain, a, mix.mean(), n, 64, dim, seed=1, mix=mix)[:, 0]
            stats = {key: (float(x.mean()), float(x.std() / math.sqrt(n))) for key, x in (("on", on), ("off", off))}
            record[name] = stats
            cells.append(" | ".join(f"{m:+.1e} ± {s:.0e}" for m, s in stats.values()))
        out.append(record)
        rows.append(f"{label(row)} " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iters", type=int, default=400)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--grad-batches", type=int, default=2000)
    parser.add_argument("--quick", action="store_true", help="three fit rows, one seed, no gradient table")
    parser.add_argument("--output", default="benchmarks/results/oracle_zstep.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.time()
    results: dict = {"args": vars(args), "mixtures": {n: m.__dict__ for n, m in MIXTURES.items()},
                     "ml": {n: {"a2": m.variance(), "b": m.mean()} for n, m in MIXTURES.items()},
                     "stability": {}, "fixed_points": [], "gradient_at_ml": []}
    print(f"Mixtures: {MIXTURES}\nML fits (a^2, b): "
          f"{ {n: (round(m.variance(), 4), m.mean()) for n, m in MIXTURES.items()} }\n")
    print("rms of z_K after 32 steps at fixed t, (a, b) = ML, 64 x 16 samples:\n")
    stability_table(32, 64, args.dim, results["stability"])
    print(f"\nFixed points: {args.iters} Adam steps from (a, b) = ({A0}, 0), lr {LR} decayed to {LR / 10}, batch "
          f"{args.batch} x dim {args.dim}, mean of the last quarter, mean of {1 if args.quick else args.seeds} seeds (± half their "
          f"spread); errors relative to ML (b in teacher sd):\n")
    rows = FIT_ROWS if not args.quick else [FIT_ROWS[0], FIT_ROWS[7], FIT_ROWS[10]]
    fixed_point_table(rows, args.iters, args.batch, args.dim, 1 if args.quick else args.seeds,
                      results["fixed_points"])
    if not args.quick:
        print(f"\nd(M1)/da at the ML point, mean ± s.e. over {args.grad_batches} batches of 64 x {args.dim}:\n")
        gradient_table(GRADIENT_ROWS, args.grad_batches, args.dim, results["gradient_at_ml"])
    results["seconds"] = time.time() - start
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=1))
    print(f"\n({results['seconds']:.0f} s; raw numbers in {args.output})")


if __name__ == "__main__":
    main()
