"""EM Distillation as pure functions over callables; every equation label refers to docs/ALGORITHM.md.

Nothing here knows about diffusers: `generator(z) -> x0`, `teacher_eps(x_t, t) -> guided eps` and
`fake_eps(x_t, t) -> eps` are plain callables (conditioning is closed over by the caller), so the same code
distills a Stable Diffusion UNet, the toy teacher, or the analytic oracle in `emd_t2i.oracle`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .schedule import alpha_sigma, x0_from_eps

EpsFn = Callable[[Tensor, Tensor], Tensor]  # (x_t, t) -> eps
GeneratorFn = Callable[[Tensor], Tensor]  # z -> x0
Weighting = Literal["dmd", "none"]
ZStep = Literal["constant", "snr"]
Z_STEPS: tuple[str, ...] = ("constant", "snr")


# ---------------------------------------------------------------- the roles' parameterisations
def guided_eps(eps_uncond: Tensor, eps_cond: Tensor, guidance_scale: float) -> Tensor:
    """(C1) eps^w = eps(null) + w * (eps(c) - eps(null))."""
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def generator_x0(z: Tensor, eps_at_t_star: Tensor, alpha_star: Tensor, sigma_star: Tensor) -> Tensor:
    """(G1) g(z, c) = (z - sigma_{t*} eps_theta(z, t*, c)) / alpha_{t*}: the x0-prediction from pure noise."""
    return x0_from_eps(z, eps_at_t_star, alpha_star, sigma_star)


# ---------------------------------------------------------------- E-step
def grad_log_pi_eps(delta: Tensor, eps: Tensor) -> Tensor:
    """(E1) grad_eps log pi = -delta - eps, with delta = eps_T^w(x_t) - eps_psi(x_t)."""
    return -delta - eps


def grad_log_pi_z(jvp_delta: Tensor, z: Tensor, alpha_t: Tensor, sigma_t: Tensor) -> Tensor:
    """(E2) grad_z log pi = -(alpha_t / sigma_t) J_g(z)^T delta - z; `jvp_delta` is J_g(z)^T delta."""
    return -(alpha_t / sigma_t) * jvp_delta - z


def langevin_step(x: Tensor, grad: Tensor, gamma: float | Tensor, noise: Tensor) -> Tensor:
    """(L1)/(L2) x_{k+1} = x_k + (gamma / 2) grad + sqrt(gamma) noise; gamma a scalar or per sample (broadcast)."""
    root = gamma.sqrt() if isinstance(gamma, Tensor) else math.sqrt(gamma)
    return x + 0.5 * gamma * grad + root * noise


def z_step_size(gamma_z: float, alpha_t: Tensor, sigma_t: Tensor, rule: ZStep = "constant") -> float | Tensor:
    """The (L2) step at each sample's t: gamma_z ("constant"), or gamma_z / (1 + alpha_t^2 / sigma_t^2) ("snr").

    Why "snr" (docs/ALGORITHM.md, "A t-dependent z step"): differentiating (E2), the z-target's curvature is
    1 + alpha_t^2 J^T (grad_x s_theta - grad_x s_T) J, and the score Jacobian of a noised density is bounded by
    1 / sigma_t^2, reached where the teacher is sharp; so the curvature is up to 1 + (alpha_t / sigma_t)^2 |J|^2
    (on the oracle 15 at t = 20, 96 with modes of sd 0.15, 1 near t = 980) and a scalar step that is stable at small
    t barely moves z at large t (finding 7). Dividing by 1 + SNR_t bounds gamma(t) * curvature by
    gamma_z max(1, |J|^2) at every t, so the contraction per step is about the same across t. On the VP schedule
    1 / (1 + alpha^2 / sigma^2) = sigma_t^2. Shaped like sigma_t (B, 1, ...), to broadcast over each sample.
    """
    if rule == "constant":
        return gamma_z
    assert rule == "snr", rule
    return gamma_z * sigma_t**2 / (alpha_t**2 + sigma_t**2)


def injected_noise_step(nu: Tensor, gamma_eps: float, noise: Tensor) -> Tensor:
    """(NC1) nu_{k+1} = (1 - gamma_eps / 2) nu_k + sqrt(gamma_eps) n_k: the injected noise carried by (L1)."""
    return (1 - 0.5 * gamma_eps) * nu + math.sqrt(gamma_eps) * noise


def initial_noise(eps0: Tensor, cancel_initial: bool) -> Tensor:
    """(NC0) nu_0: 0 as in (NC1), or eps_0 to also cancel what is left of the initial draw.

    (L1) carries eps_0 into eps_K as (1 - gamma_eps/2)^K eps_0 (0.32 eps_0 at K = 4, gamma_eps = 0.5). Like the
    injected noise it is independent of z when z does not move, so E[J(z)^T eps_0] = 0: it adds M-step variance
    (times sigma_t/alpha_t, up to 12 at t = 980) and no signal. With K = 1, gamma_eps = 2 its factor is 0, so
    the DMD reduction is unchanged.
    """
    return eps0.clone() if cancel_initial else torch.zeros_like(eps0)


def cancel_noise(eps_k: Tensor, nu_k: Tensor) -> Tensor:
    """(NC2) eps_tilde = eps_K - nu_K."""
    return eps_k - nu_k


@dataclass(frozen=True)
class EMDSettings:
    """The E-step's chain and the M-step's weighting, bound once per run (defaults: the K = 1 DMD reduction)."""

    num_steps: int = 1  # K
    gamma_eps: float = 2.0  # (L1)
    gamma_z: float = 0.0  # (L2); 0 keeps z at its prior draw
    noise_cancellation: bool = True  # (NC1, NC2)
    weighting: Weighting = "dmd"  # w(t) of (M1)
    cancel_initial_noise: bool = False  # (NC0)
    t_min: int = 20
    t_max: int = 980
    z_step: ZStep = "constant"  # (L2) step size per t: see z_step_size

    def __post_init__(self):
        assert self.num_steps >= 1 and self.gamma_eps >= 0 and self.gamma_z >= 0, self
        assert 0 <= self.t_min <= self.t_max, self
        assert self.z_step in Z_STEPS, self

    @property
    def moves_z(self) -> bool:
        return self.gamma_z > 0


@dataclass(frozen=True)
class Draws:
    """Everything random in one generator update, sample-major: `rows(i, j)` are the draws of samples i..j-1,
    so a batch split into micro-batches draws exactly what the whole batch does (gradient accumulation)."""

    z0: Tensor  # (B, ...) z_0 ~ N(0, I)
    eps0: Tensor  # (B, ...) eps_0 ~ N(0, I)
    t: Tensor  # (B,) t ~ U{t_min..t_max}
    n: Tensor  # (K, B, ...) the eps chain's noise n_k (L1)
    m: Tensor | None  # (K, B, ...) the z chain's noise m_k (L2); None when z does not move

    def rows(self, start: int, stop: int) -> Draws:
        return Draws(self.z0[start:stop], self.eps0[start:stop], self.t[start:stop], self.n[:, start:stop],
                     None if self.m is None else self.m[:, start:stop])


def draw(settings: EMDSettings, shape: tuple[int, ...], rng: torch.Generator | None = None, device=None,
         dtype: torch.dtype = torch.float32) -> Draws:
    """z_0, eps_0, t and the chain's noise for a batch of `shape` (B, ...), in that order from `rng`."""
    def normal(*lead):
        return torch.randn((*lead, *shape), generator=rng, device=device, dtype=dtype)

    z0, eps0 = normal(), normal()
    t = sample_timesteps(shape[0], settings.t_min, settings.t_max, device, rng)
    n = normal(settings.num_steps)
    return Draws(z0, eps0, t, n, normal(settings.num_steps) if settings.moves_z else None)


@dataclass(frozen=True)
class EStepResult:
    """What the M-step and the fake-score update need from the E-step (all detached)."""

    z: Tensor  # z_K
    eps_tilde: Tensor  # (NC2), or eps_K with cancellation off
    x0_last: Tensor  # g(z) at the last evaluated x_t (for the "dmd" weighting)
    x0_hat_teacher_last: Tensor  # (N2) of the guided teacher at the last evaluated x_t
    x0_initial: Tensor  # g(z_0), z_0 ~ N(0, I): an unbiased generator sample for (F1)


def e_step(
    generator: GeneratorFn,
    teacher_eps: EpsFn,
    fake_eps: EpsFn,
    alphas_cumprod: Tensor,
    draws: Draws,
    settings: EMDSettings,
    x0_initial: Tensor | None = None,
) -> EStepResult:
    """Reparametrised Langevin on (eps, z) toward pi_t (E0), K steps of (E1, E2, L1, L2, NC1).

    Teacher and fake-score calls keep no graph. The generator keeps a graph only w.r.t. z, and only when
    gamma_z > 0; with gamma_z = 0 z never moves, so g(z_0) is computed once (or taken from `x0_initial`).
    `settings.cancel_initial_noise` starts (NC1) from nu_0 = eps_0 instead of 0 (docs/ALGORITHM.md, "NC0").
    The E- and z-updates are simultaneous: both use delta at the current (eps_k, z_k).
    """
    s = settings
    t = draws.t
    alpha_t, sigma_t = alpha_sigma(alphas_cumprod, t, like=draws.eps0)
    z, eps = draws.z0, draws.eps0
    nu = initial_noise(eps, s.noise_cancellation and s.cancel_initial_noise)
    gamma_z = z_step_size(s.gamma_z, alpha_t, sigma_t, s.z_step)
    x0 = first_x0 = x0_initial
    for k in range(s.num_steps):
        if s.moves_z:
            with torch.enable_grad():
                z_leaf = z.detach().requires_grad_(True)
                x0_graph = generator(z_leaf)
            x0 = x0_graph.detach()
        elif x0 is None:
            with torch.no_grad():
                x0 = generator(z).detach()
        first_x0 = x0 if first_x0 is None else first_x0
        x_t = alpha_t * x0 + sigma_t * eps
        with torch.no_grad():
            eps_teacher = teacher_eps(x_t, t)
            delta = eps_teacher - fake_eps(x_t, t)
        eps_next = langevin_step(eps, grad_log_pi_eps(delta, eps), s.gamma_eps, draws.n[k])
        if s.noise_cancellation:
            nu = injected_noise_step(nu, s.gamma_eps, draws.n[k])
        if s.moves_z:
            # Only a vector-Jacobian product w.r.t. z: no parameter gradient is accumulated.
            (jvp_delta,) = torch.autograd.grad(x0_graph, z_leaf, grad_outputs=delta.to(x0_graph.dtype))
            z = langevin_step(z, grad_log_pi_z(jvp_delta, z, alpha_t, sigma_t), gamma_z, draws.m[k]).detach()
        eps = eps_next
    return EStepResult(
        z=z.detach(),
        eps_tilde=cancel_noise(eps, nu) if s.noise_cancellation else eps,
        x0_last=x0,
        x0_hat_teacher_last=x0_from_eps(x_t, eps_teacher, alpha_t, sigma_t),
        x0_initial=first_x0,
    )


# ---------------------------------------------------------------- M-step and fake score
def dmd_weight(x0: Tensor, x0_hat_teacher: Tensor) -> Tensor:
    """DMD's per-sample normaliser w = 1 / mean|x0 - x0_hat_T| (stop-gradient), shaped (B,)."""
    dims = tuple(range(1, x0.ndim))
    return 1.0 / (x0.detach() - x0_hat_teacher.detach()).abs().mean(dim=dims).clamp_min(1e-8)


def m_step_loss(x0: Tensor, eps_tilde: Tensor, alpha_t: Tensor, sigma_t: Tensor, weight: Tensor) -> Tensor:
    """(M1) L = 0.5 w(t) || g(z_K) - sg(g(z_K) + (sigma_t / alpha_t) eps_tilde) ||^2.

    Reduced as a mean over elements and samples (DMD2's reduction: a positive constant per element count,
    so learning rates and clipping thresholds carry over). Its gradient is -w (sigma/alpha) J^T eps_tilde
    per element; the value is a diagnostic only.
    """
    dtype = torch.promote_types(x0.dtype, torch.float32)  # half precision in, float32 loss; float64 stays
    target = (x0.to(dtype) + (sigma_t / alpha_t).to(dtype) * eps_tilde.to(dtype)).detach()
    per_sample = 0.5 * (x0.to(dtype) - target).pow(2).flatten(1).mean(dim=1)
    return (weight.to(dtype) * per_sample).mean()


def fake_score_loss(eps_pred: Tensor, eps: Tensor) -> Tensor:
    """(F1) L_psi = || eps_psi(alpha_t sg(g(z)) + sigma_t eps, t, c) - eps ||^2, mean over elements."""
    dtype = torch.promote_types(eps_pred.dtype, torch.float32)
    return (eps_pred.to(dtype) - eps.to(dtype)).pow(2).mean()


def sample_timesteps(batch: int, t_min: int, t_max: int, device, rng: torch.Generator | None = None) -> Tensor:
    """t ~ uniform integers in [t_min, t_max], one per sample."""
    return torch.randint(t_min, t_max + 1, (batch,), generator=rng, device=device)


# ---------------------------------------------------------------- one generator update, assembled
@dataclass(frozen=True)
class GeneratorStep:
    loss: Tensor  # (M1), with a graph to theta
    x0_sample: Tensor  # detached g(z_0), z_0 ~ N(0, I), for the fake-score update
    weight_mean: float
    eps_tilde_rms: float


def generator_step(
    generator: GeneratorFn,
    teacher_eps: EpsFn,
    fake_eps: EpsFn,
    alphas_cumprod: Tensor,
    draws: Draws,
    settings: EMDSettings,
) -> GeneratorStep:
    """E-step then the (M1) loss. With gamma_z = 0, z_K = z_0, so the one generator forward that carries the
    M-step graph also serves the whole E-step: (3K + 1) B forward rows instead of (4K + 1) B."""
    x0_with_graph = None if settings.moves_z else generator(draws.z0)
    result = e_step(generator, teacher_eps, fake_eps, alphas_cumprod, draws, settings,
                    x0_initial=None if x0_with_graph is None else x0_with_graph.detach())
    x0 = generator(result.z) if x0_with_graph is None else x0_with_graph
    if settings.weighting == "dmd":
        weight = dmd_weight(result.x0_last, result.x0_hat_teacher_last)
    else:
        weight = torch.ones(x0.shape[0], device=x0.device)
    alpha_t, sigma_t = alpha_sigma(alphas_cumprod, draws.t, like=x0)
    loss = m_step_loss(x0, result.eps_tilde, alpha_t, sigma_t, weight)
    return GeneratorStep(
        loss=loss,
        x0_sample=result.x0_initial,
        weight_mean=float(weight.mean()),
        eps_tilde_rms=float(result.eps_tilde.float().pow(2).mean().sqrt()),
    )


def fake_score_step(fake_eps: EpsFn, x0: Tensor, t: Tensor, eps: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """(F1) on detached generator samples x0, noised with the given fresh eps at t."""
    alpha_t, sigma_t = alpha_sigma(alphas_cumprod, t, like=x0)
    x_t = alpha_t * x0.detach() + sigma_t * eps
    return fake_score_loss(fake_eps(x_t, t), eps)
