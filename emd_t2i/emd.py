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

from emd_t2i.choices import WEIGHTINGS, Z_STEPS
from emd_t2i.schedule import alpha_sigma, x0_from_eps

EpsFn = Callable[[Tensor, Tensor], Tensor]  # (x_t, t) -> eps
GeneratorFn = Callable[[Tensor], Tensor]  # z -> x0
Weighting = Literal["dmd", "dmd-t", "none"]  # choices.WEIGHTINGS
ZStep = Literal["constant", "snr", "jacobian"]  # choices.Z_STEPS


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


def z_step_size(gamma_z: float, alpha_t: Tensor, sigma_t: Tensor, rule: ZStep = "constant",
                jacobian_norm: float | None = None) -> float | Tensor:
    """The (L2) step at each sample's t: gamma_z ("constant"), gamma_z / (1 + alpha_t^2 / sigma_t^2) ("snr"), or
    gamma_z / (1 + (alpha_t / sigma_t)^2 |J|^2) ("jacobian", |J| the generator's measured Jacobian norm).

    Why (docs/ALGORITHM.md, "The z step"): differentiating (E2), the z-target's curvature is
    1 + alpha_t^2 J^T (grad_x s_theta - grad_x s_T) J, and the score Jacobian of a noised density is bounded by
    1 / sigma_t^2, reached where the teacher is sharp; so the curvature is at most 1 + (alpha_t / sigma_t)^2 |J|^2.
    A scalar step that is stable at small t barely moves z at large t. "jacobian" divides by that bound, so
    gamma(t) * curvature <= gamma_z at every t, for every teacher and generator: gamma_z is then a step relative
    to the stability limit (about 4). "snr" leaves |J| out (gamma(t) * curvature <= gamma_z max(1, |J|^2)); on the
    VP schedule 1 / (1 + alpha^2 / sigma^2) = sigma_t^2. Shaped like sigma_t (B, 1, ...), to broadcast per sample.
    """
    if rule == "constant":
        return gamma_z
    if rule == "snr":
        return gamma_z * sigma_t**2 / (alpha_t**2 + sigma_t**2)
    assert rule == "jacobian" and jacobian_norm is not None, (rule, jacobian_norm)
    return gamma_z / (1 + (alpha_t / sigma_t) ** 2 * jacobian_norm**2)


def generator_jacobian_norm(generator: GeneratorFn, z: Tensor, iterations: int = 8, h: float = 1e-2,
                            rng: torch.Generator | None = None) -> Tensor:
    """|J_g(z)| per sample, (B,): the largest singular value of the generator's Jacobian, by power iteration on
    J^T J. J v is a central difference (forward calls only, so it runs where double backward does not, e.g. fused
    attention kernels), J^T u one vector-Jacobian product through the graph of g(z), built once. `h` is the
    difference step per element of z (rms); the estimate rises toward |J| with the iterations (a lower bound)."""
    batch, dims = z.shape[0], tuple(range(1, z.ndim))

    def unit(v: Tensor) -> Tensor:
        return v / v.pow(2).sum(dims, keepdim=True).sqrt().clamp_min(1e-30)

    size = math.prod(z.shape[1:]) ** 0.5
    v = unit(torch.randn(z.shape, generator=rng, dtype=z.dtype).to(z.device))
    with torch.enable_grad():
        z_leaf = z.detach().requires_grad_(True)
        x0 = generator(z_leaf)
    norm = torch.zeros(batch, dtype=torch.float64, device=z.device)
    for _ in range(iterations):
        with torch.no_grad():
            step = h * size * v  # rms h per element
            jv = (generator(z + step) - generator(z - step)) / (2 * h * size)
        norm = jv.double().pow(2).sum(dims).sqrt()
        (jtjv,) = torch.autograd.grad(x0, z_leaf, grad_outputs=jv.to(x0.dtype), retain_graph=True)
        v = unit(jtjv.detach().to(z.dtype))
    return norm


def injected_noise_step(nu: Tensor, gamma_eps: float, noise: Tensor) -> Tensor:
    """(NC1) nu_{k+1} = (1 - gamma_eps / 2) nu_k + sqrt(gamma_eps) n_k: the injected noise carried by (L1)."""
    return (1 - 0.5 * gamma_eps) * nu + math.sqrt(gamma_eps) * noise


def injected_noise_start(eps0: Tensor, cancel_initial: bool) -> Tensor:
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
        assert self.z_step in Z_STEPS and self.weighting in WEIGHTINGS, self

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
    jacobian_norm: float | None = None,
) -> EStepResult:
    """Reparametrised Langevin on (eps, z) toward pi_t (E0), K steps of (E1, E2, L1, L2, NC1).

    Teacher and fake-score calls keep no graph. The generator keeps a graph only w.r.t. z, and only when
    gamma_z > 0; with gamma_z = 0 z never moves, so g(z_0) is computed once (or taken from `x0_initial`).
    `settings.cancel_initial_noise` starts (NC1) from nu_0 = eps_0 instead of 0 (docs/ALGORITHM.md, "NC0").
    The E- and z-updates are simultaneous: both use delta at the current (eps_k, z_k). `jacobian_norm` is the
    generator's |J| for z_step "jacobian" (`generator_jacobian_norm`, refreshed by the caller).
    """
    s = settings
    t = draws.t
    alpha_t, sigma_t = alpha_sigma(alphas_cumprod, t, like=draws.eps0)
    z, eps = draws.z0, draws.eps0
    nu = injected_noise_start(eps, s.noise_cancellation and s.cancel_initial_noise)
    gamma_z = z_step_size(s.gamma_z, alpha_t, sigma_t, s.z_step, jacobian_norm)
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
def dmd_error(x0: Tensor, x0_hat_teacher: Tensor) -> Tensor:
    """mean |x0 - x0_hat_T| per sample, (B,): the error DMD's normaliser divides by."""
    dims = tuple(range(1, x0.ndim))
    return (x0.detach() - x0_hat_teacher.detach()).abs().mean(dim=dims)


def dmd_weight(x0: Tensor, x0_hat_teacher: Tensor) -> Tensor:
    """DMD's per-sample normaliser w = 1 / mean|x0 - x0_hat_T| (stop-gradient), shaped (B,)."""
    return 1.0 / dmd_error(x0, x0_hat_teacher).clamp_min(1e-8)


# Weighting "dmd-t": DMD's normaliser averaged over the samples of each t bin, so that w depends on t alone and
# any positive w(t) keeps the fixed point of (M1) (the per-sample "dmd" weight does not once K > 1: it depends on
# the eps the teacher saw). The table is the run's state: a running mean of dmd_error per bin, NaN where empty.
TIMESTEP_BINS = 50


def timestep_bin(t: Tensor, t_min: int, t_max: int, bins: int = TIMESTEP_BINS) -> Tensor:
    """The bin of each t in [t_min, t_max], split into `bins` equal ranges."""
    return ((t.long() - t_min) * bins // (t_max - t_min + 1)).clamp(0, bins - 1)


def binned_weight(error_table: Tensor, t_bin: Tensor, error: Tensor) -> Tensor:
    """w(t) = 1 / (running mean of dmd_error in t's bin); a sample whose bin has no mean yet gets 1 / its own."""
    mean = error_table.to(device=error.device, dtype=torch.float64)[t_bin.to(error.device)]
    return 1.0 / torch.where(torch.isnan(mean), error.double(), mean).clamp_min(1e-8)


def bin_sums(t_bin: Tensor, error: Tensor, bins: int = TIMESTEP_BINS) -> tuple[Tensor, Tensor]:
    """(sum of dmd_error, number of samples) per bin, float64 on the CPU: what processes add up before an update."""
    t_bin, error = t_bin.cpu(), error.detach().double().cpu()
    sums = torch.zeros(bins, dtype=torch.float64).index_add_(0, t_bin, error)
    return sums, torch.bincount(t_bin, minlength=bins).double()


def update_error_table(table: Tensor, sums: Tensor, counts: Tensor, decay: float = 0.98) -> Tensor:
    """The running mean per bin after a batch: each of a bin's n new samples decays the old mean by `decay`
    (so the mean spans about 1 / (1 - decay) samples of that bin, whatever the batch size); an empty bin takes the
    batch's mean."""
    seen = counts > 0
    mean = torch.where(seen, sums / counts.clamp_min(1), table)
    keep = decay**counts
    return torch.where(seen & ~torch.isnan(table), keep * table + (1 - keep) * mean, mean)


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
    error: Tensor  # dmd_error per sample (B,), detached: what the "dmd-t" table is updated with


def generator_step(
    generator: GeneratorFn,
    teacher_eps: EpsFn,
    fake_eps: EpsFn,
    alphas_cumprod: Tensor,
    draws: Draws,
    settings: EMDSettings,
    jacobian_norm: float | None = None,
    error_table: Tensor | None = None,
) -> GeneratorStep:
    """E-step then the (M1) loss. With gamma_z = 0, z_K = z_0, so the one generator forward that carries the
    M-step graph also serves the whole E-step: (3K + 1) B forward rows instead of (4K + 1) B. `error_table` is the
    running per-bin mean of dmd_error for weighting "dmd-t" (None: every sample uses its own, as "dmd")."""
    x0_with_graph = None if settings.moves_z else generator(draws.z0)
    result = e_step(generator, teacher_eps, fake_eps, alphas_cumprod, draws, settings,
                    x0_initial=None if x0_with_graph is None else x0_with_graph.detach(), jacobian_norm=jacobian_norm)
    x0 = generator(result.z) if x0_with_graph is None else x0_with_graph
    error = dmd_error(result.x0_last, result.x0_hat_teacher_last)
    if settings.weighting == "dmd":
        weight = 1.0 / error.clamp_min(1e-8)  # dmd_weight
    elif settings.weighting == "dmd-t":
        table = torch.full((TIMESTEP_BINS,), float("nan"), dtype=torch.float64) if error_table is None else error_table
        weight = binned_weight(table, timestep_bin(draws.t, settings.t_min, settings.t_max), error)
    else:
        weight = torch.ones(x0.shape[0], device=x0.device)
    alpha_t, sigma_t = alpha_sigma(alphas_cumprod, draws.t, like=x0)
    loss = m_step_loss(x0, result.eps_tilde, alpha_t, sigma_t, weight)
    return GeneratorStep(
        loss=loss,
        x0_sample=result.x0_initial,
        weight_mean=float(weight.mean()),
        eps_tilde_rms=float(result.eps_tilde.float().pow(2).mean().sqrt()),
        error=error,
    )


def fake_score_step(fake_eps: EpsFn, x0: Tensor, t: Tensor, eps: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """(F1) on detached generator samples x0, noised with the given fresh eps at t."""
    alpha_t, sigma_t = alpha_sigma(alphas_cumprod, t, like=x0)
    x_t = alpha_t * x0.detach() + sigma_t * eps
    return fake_score_loss(fake_eps(x_t, t), eps)
