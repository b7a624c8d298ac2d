"""Analytic oracle for EMD: a Gaussian-mixture teacher, an affine generator, exact scores (float64)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from emd_t2i import emd
from emd_t2i.schedule import alpha_sigma, sd_alphas_cumprod

DTYPE = torch.float64


@dataclass(frozen=True)
class Mixture:
    """A 1-D Gaussian mixture, applied independently to every coordinate of a d-dim sample."""

    weights: tuple[float, ...] = (0.5, 0.5)
    means: tuple[float, ...] = (-2.0, 2.0)
    stds: tuple[float, ...] = (0.5, 0.5)

    def mean(self) -> float:
        return sum(w * m for w, m in zip(self.weights, self.means))

    def variance(self) -> float:
        """Per-coordinate variance: the maximum-likelihood (moment-matching) a^2 of a Gaussian fit."""
        second = sum(w * (s * s + m * m) for w, m, s in zip(self.weights, self.means, self.stds))
        return second - self.mean() ** 2


# The mixtures the z-step choice is measured on (docs/ALGORITHM.md, "The z step"): the oracle's own
# symmetric one, an asymmetric one (unequal weights and scales, ML b != 0), and a sharp one (modes 3x narrower,
# so the z-target at small t is 6x stiffer: closer to an image teacher whose data lie on a thin set).
SYMMETRIC = Mixture()
ASYMMETRIC = Mixture((0.3, 0.7), (-1.0, 2.5), (0.4, 0.8))
SHARP = Mixture((0.5, 0.5), (-2.0, 2.0), (0.15, 0.15))
# A minority mode a fifth of the mass, narrower and 3.5 sd of the majority away: what a mode-seeking fit drops first.
MINORITY = Mixture((0.2, 0.8), (-2.5, 1.0), (0.3, 0.6))


def _tensors(mix: Mixture, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    kw = {"dtype": like.dtype, "device": like.device}
    return torch.tensor(mix.weights, **kw), torch.tensor(mix.means, **kw), torch.tensor(mix.stds, **kw)


def mixture_log_density(x_t: Tensor, alpha_t: Tensor, sigma_t: Tensor, mix: Mixture) -> Tensor:
    """log p_T,t(x_t), summed over coordinates: the mixture convolved by (N1) is sum_k w_k N(alpha m_k, alpha^2 s_k^2 + sigma^2)."""
    w, m, s = _tensors(mix, x_t)
    var = alpha_t.unsqueeze(-1) ** 2 * s**2 + sigma_t.unsqueeze(-1) ** 2
    diff = x_t.unsqueeze(-1) - alpha_t.unsqueeze(-1) * m
    log_comp = torch.log(w) - 0.5 * diff**2 / var - 0.5 * torch.log(2 * math.pi * var)
    return torch.logsumexp(log_comp, dim=-1).flatten(1).sum(dim=1)


def mixture_eps(x_t: Tensor, alpha_t: Tensor, sigma_t: Tensor, mix: Mixture) -> Tensor:
    """The exact teacher eps at x_t: eps = -sigma_t * score (N2), score = sum_k r_k (alpha m_k - x_t) / v_k."""
    w, m, s = _tensors(mix, x_t)
    var = alpha_t.unsqueeze(-1) ** 2 * s**2 + sigma_t.unsqueeze(-1) ** 2
    diff = x_t.unsqueeze(-1) - alpha_t.unsqueeze(-1) * m
    log_comp = torch.log(w) - 0.5 * diff**2 / var - 0.5 * torch.log(var)
    resp = torch.softmax(log_comp, dim=-1)
    score = -(resp * diff / var).sum(dim=-1)
    return -sigma_t * score


def gaussian_log_density(x_t: Tensor, alpha_t: Tensor, sigma_t: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """log p_theta,t(x_t) of the affine generator g(z) = a z + b: N(alpha b, alpha^2 a^2 + sigma^2) per coordinate."""
    var = alpha_t**2 * a**2 + sigma_t**2
    return (-0.5 * (x_t - alpha_t * b) ** 2 / var - 0.5 * torch.log(2 * math.pi * var)).flatten(1).sum(dim=1)


def gaussian_eps(x_t: Tensor, alpha_t: Tensor, sigma_t: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """The exact fake eps of g(z) = a z + b: sigma_t (x_t - alpha b) / (alpha^2 a^2 + sigma^2)."""
    return sigma_t * (x_t - alpha_t * b) / (alpha_t**2 * a**2 + sigma_t**2)


@dataclass
class Oracle:
    """The three roles as closed-form callables for emd.generator_step; (a, b) are the generator's parameters."""

    mix: Mixture
    a: Tensor
    b: Tensor
    alphas_cumprod: Tensor

    @classmethod
    def create(cls, a0: float = 1.0, b0: float = 0.0, mix: Mixture | None = None) -> Oracle:
        a = torch.tensor(a0, dtype=DTYPE, requires_grad=True)
        b = torch.tensor(b0, dtype=DTYPE, requires_grad=True)
        return cls(mix or Mixture(), a, b, sd_alphas_cumprod())

    def generator(self, z: Tensor) -> Tensor:
        return self.a * z + self.b

    def teacher_eps(self, x_t: Tensor, t: Tensor) -> Tensor:
        alpha_t, sigma_t = alpha_sigma(self.alphas_cumprod, t, like=x_t)
        return mixture_eps(x_t, alpha_t, sigma_t, self.mix)

    def fake_eps(self, x_t: Tensor, t: Tensor) -> Tensor:
        """The generator's own exact score (the fake score at convergence of F1), no graph to (a, b)."""
        alpha_t, sigma_t = alpha_sigma(self.alphas_cumprod, t, like=x_t)
        return gaussian_eps(x_t, alpha_t, sigma_t, self.a.detach(), self.b.detach())


# E-step settings (K, step sizes, noise cancellation) and the M-step weighting; the default is DMD (K = 1).
Chain = emd.EMDSettings


@dataclass
class RunState:
    """What a run carries between generator steps: the generator's |J| (z_step "jacobian") and the per-t table of
    DMD's error (weighting "dmd-t"), both kept as the training loop keeps them."""

    jacobian_norm: float | None = None
    error_table: Tensor | None = None


def step_loss(oracle: Oracle, chain: Chain, batch: int, dim: int, rng: torch.Generator,
              state: RunState | None = None) -> Tensor:
    """The (M1) loss of one emd.generator_step on the oracle, with a graph to (a, b); `state` is updated."""
    state = RunState() if state is None else state
    if chain.z_step == "jacobian":
        z = torch.randn((4, dim), generator=rng, dtype=DTYPE)
        state.jacobian_norm = float(emd.generator_jacobian_norm(oracle.generator, z, rng=rng).max())
    draws = emd.draw(chain, (batch, dim), rng, dtype=DTYPE)
    step = emd.generator_step(oracle.generator, oracle.teacher_eps, oracle.fake_eps, oracle.alphas_cumprod, draws,
                              chain, jacobian_norm=state.jacobian_norm, error_table=state.error_table)
    if chain.weighting == "dmd-t":
        table = state.error_table if state.error_table is not None else torch.full(
            (emd.TIMESTEP_BINS,), float("nan"), dtype=torch.float64)
        sums, counts = emd.bin_sums(emd.timestep_bin(draws.t, chain.t_min, chain.t_max), step.error)
        state.error_table = emd.update_error_table(table, sums, counts)
    return step.loss


def param_gradient(oracle: Oracle, chain: Chain, batch: int, dim: int, rng: torch.Generator) -> Tensor:
    """d(M1)/d(a, b) for one batch, shaped (2,)."""
    grads = torch.autograd.grad(step_loss(oracle, chain, batch, dim, rng), (oracle.a, oracle.b))
    return torch.stack(grads).detach()


def gradient_samples(
    chain: Chain, a: float, b: float, n: int, batch: int, dim: int, seed: int = 0, mix: Mixture | None = None
) -> Tensor:
    """n independent M-step gradients at fixed (a, b), shaped (n, 2): for variance and bias."""
    oracle = Oracle.create(a, b, mix)
    rng = torch.Generator().manual_seed(seed)
    return torch.stack([param_gradient(oracle, chain, batch, dim, rng) for _ in range(n)])


@dataclass(frozen=True)
class FitResult:
    a2: float  # a^2 averaged over the last quarter of iterations
    b: float
    trajectory: list[tuple[float, float]]  # (a^2, b) every iteration


def fit(
    chain: Chain, iters: int = 300, batch: int = 256, dim: int = 16, lr: float = 0.05, a0: float = 1.0,
    b0: float = 0.0, seed: int = 0, mix: Mixture | None = None,
) -> FitResult:
    """Iterate emd.generator_step with Adam on (a, b) against the exact fake score; report the fixed point."""
    oracle = Oracle.create(a0, b0, mix)
    rng = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([oracle.a, oracle.b], lr=lr, betas=(0.9, 0.99))
    # Linear decay to 10% so the last quarter averages a settled fixed point, not Adam's noise ball.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 - 0.9 * i / iters)
    traj, state = [], RunState()
    for _ in range(iters):
        opt.zero_grad(set_to_none=True)
        step_loss(oracle, chain, batch, dim, rng, state).backward()
        opt.step()
        sched.step()
        traj.append((float(oracle.a.detach() ** 2), float(oracle.b.detach())))
    tail = traj[-max(1, iters // 4):]
    return FitResult(
        a2=sum(p[0] for p in tail) / len(tail), b=sum(p[1] for p in tail) / len(tail), trajectory=traj
    )


def fit_error(result: FitResult, mix: Mixture) -> tuple[float, float]:
    """(a^2 / a^2_ML - 1, (b - b_ML) / sd): the fit's relative error in variance, and its mean error in units of
    the teacher's standard deviation (b_ML can be 0, so a relative error in b would be meaningless)."""
    return result.a2 / mix.variance() - 1, (result.b - mix.mean()) / math.sqrt(mix.variance())


def chain_z(chain: Chain, a: float, b: float, batch: int, dim: int, seed: int = 0, mix: Mixture | None = None) -> Tensor:
    """z_K of one E-step on the oracle at fixed (a, b), with t drawn from [chain.t_min, chain.t_max]: where the
    z chain goes (set t_min = t_max to look at one t)."""
    oracle = Oracle.create(a, b, mix)
    draws = emd.draw(chain, (batch, dim), torch.Generator().manual_seed(seed), dtype=DTYPE)
    return emd.e_step(oracle.generator, oracle.teacher_eps, oracle.fake_eps, oracle.alphas_cumprod, draws, chain,
                      jacobian_norm=abs(a)).z
