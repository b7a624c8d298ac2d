"""EMD math: the DMD reduction, every labelled function, UNet-row counts, and the analytic oracle."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from emd_t2i import emd
from emd_t2i.schedule import (
    alpha_sigma,
    eps_from_v,
    forward_noise,
    score_from_eps,
    sd_alphas_cumprod,
    x0_from_eps,
)
from tools import oracle

D64 = torch.float64
ACP = sd_alphas_cumprod()


# ---------------------------------------------------------------- small nonlinear roles
class Net(torch.nn.Module):
    """A tiny MLP; with `timed` it reads (x_t, t) like a score network, otherwise z like a generator."""

    def __init__(self, dim: int, seed: int, timed: bool):
        super().__init__()
        torch.manual_seed(seed)
        self.timed = timed
        self.body = torch.nn.Sequential(
            torch.nn.Linear(dim + int(timed), 32), torch.nn.Tanh(), torch.nn.Linear(32, dim)
        ).to(D64)

    def forward(self, x, t=None):
        if self.timed:
            x = torch.cat([x, (t.to(D64) / 1000).unsqueeze(1)], dim=1)
        return self.body(x)


class Counted:
    """Wraps a callable, counting calls and forward rows (first dimension of the first argument)."""

    def __init__(self, fn, rows_per_sample: int = 1):
        self.fn, self.rows_per_sample, self.calls, self.rows = fn, rows_per_sample, 0, 0

    def __call__(self, *args):
        self.calls += 1
        self.rows += self.rows_per_sample * args[0].shape[0]
        return self.fn(*args)


def roles(dim=6, guidance=3.0):
    gen, cond, uncond, fake = Net(dim, 0, False), Net(dim, 1, True), Net(dim, 2, True), Net(dim, 3, True)

    def teacher(x_t, t):  # batched CFG: one call over [uncond; cond] rows, then (C1)
        both = torch.cat([uncond(x_t, t), cond(x_t, t)])
        return emd.guided_eps(*both.chunk(2), guidance)

    return gen, teacher, fake


def draws(batch=8, dim=6, seed=0):
    rng = torch.Generator().manual_seed(seed)
    z0 = torch.randn(batch, dim, generator=rng, dtype=D64)
    eps0 = torch.randn(batch, dim, generator=rng, dtype=D64)
    return z0, eps0, emd.sample_timesteps(batch, 20, 980, "cpu", rng)


def chain(K=1, g_eps=2.0, g_z=0.0, nc=True, weighting="dmd", cancel_initial_noise=False):
    return emd.EMDSettings(K, g_eps, g_z, nc, weighting, cancel_initial_noise)


def chain_draws(settings, seed, batch=8, dim=6):
    """draws() plus the chain's noise, drawn from `seed` (n_0..n_{K-1}, then m_0..m_{K-1})."""
    z0, eps0, t = draws(batch, dim)
    rng = torch.Generator().manual_seed(seed)
    n = torch.randn(settings.num_steps, batch, dim, generator=rng, dtype=D64)
    m = torch.randn(settings.num_steps, batch, dim, generator=rng, dtype=D64) if settings.moves_z else None
    return emd.Draws(z0, eps0, t, n, m)


def param_grads(loss, module):
    return [g.clone() for g in torch.autograd.grad(loss, list(module.parameters()))]


def emd_grads(gen, teacher, fake, K, g_eps, g_z, nc, seed=123, weighting="dmd"):
    settings = chain(K, g_eps, g_z, nc, weighting)
    step = emd.generator_step(gen, teacher, fake, ACP, chain_draws(settings, seed), settings)
    return param_grads(step.loss, gen)


def dmd2_loss(gen, teacher, fake, z0, eps0, t, extra_eps=None):
    """DMD2's distribution-matching loss, written out independently of emd.py."""
    abar = ACP[t].unsqueeze(1)
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    x = gen(z0)
    with torch.no_grad():
        x_t = alpha * x + sigma * eps0
        pred_real = (x_t - sigma * teacher(x_t, t)) / alpha
        pred_fake = (x_t - sigma * fake(x_t, t)) / alpha
        grad = (pred_fake - pred_real) / (x - pred_real).abs().mean(dim=1, keepdim=True)
        if extra_eps is not None:  # what eps_tilde = -delta + extra_eps adds (no noise cancellation)
            grad = grad - (sigma / alpha) * extra_eps / (x - pred_real).abs().mean(dim=1, keepdim=True)
    return 0.5 * F.mse_loss(x, (x - grad).detach())


# ---------------------------------------------------------------- (a) the DMD reduction
def test_k1_gamma2_with_cancellation_is_dmd_gradient():
    gen, teacher, fake = roles()
    got = emd_grads(gen, teacher, fake, K=1, g_eps=2.0, g_z=0.0, nc=True)
    want = param_grads(dmd2_loss(gen, teacher, fake, *draws()), gen)
    for g, w in zip(got, want):  # float64 roles; test_m1_keeps_float64_precision below is tighter still
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6 * float(w.abs().max()))
    assert sum(float(w.abs().sum()) for w in want) > 1e-3  # not a vacuous 0 == 0


def test_k1_gamma2_without_cancellation_carries_sqrt2_n0():
    gen, teacher, fake = roles()
    got = emd_grads(gen, teacher, fake, K=1, g_eps=2.0, g_z=0.0, nc=False, seed=123)
    z0, eps0, t = draws()
    n0 = chain_draws(chain(), 123).n[0]
    dmd = param_grads(dmd2_loss(gen, teacher, fake, z0, eps0, t), gen)
    want = param_grads(dmd2_loss(gen, teacher, fake, z0, eps0, t, extra_eps=math.sqrt(2) * n0), gen)
    for g, w, d in zip(got, want, dmd):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6 * float(w.abs().max()))
        assert (g - d).norm() > 0.1 * d.norm()


def test_m1_keeps_float64_precision():
    """With float64 roles (the oracle) the (M1) gradient keeps float64 precision (it once reduced in float32)."""
    gen, teacher, fake = roles()
    got = emd_grads(gen, teacher, fake, K=1, g_eps=2.0, g_z=0.0, nc=True)
    want = param_grads(dmd2_loss(gen, teacher, fake, *draws()), gen)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------- (b) each labelled function
def test_n1_n2_inverse_and_score():
    x0, eps = torch.randn(2, 5, 3, dtype=D64).unbind(0)
    alpha, sigma = alpha_sigma(ACP, torch.tensor([20, 500, 980, 0, 999]), like=x0)
    x_t = forward_noise(x0, eps, alpha, sigma)
    torch.testing.assert_close(x0_from_eps(x_t, eps, alpha, sigma), x0)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(alpha))
    # x0 = 0 a.s.: x_t ~ N(0, sigma^2), exact score -x_t / sigma^2, and its eps is x_t / sigma.
    torch.testing.assert_close(score_from_eps(sigma * eps / sigma, sigma), -(sigma * eps) / sigma**2)


def test_v_prediction_to_eps():
    x0, eps = torch.randn(2, 4, 3, dtype=D64).unbind(0)
    alpha, sigma = alpha_sigma(ACP, torch.tensor([30, 300, 700, 970]), like=x0)
    v = alpha * eps - sigma * x0  # the v-prediction target
    torch.testing.assert_close(eps_from_v(forward_noise(x0, eps, alpha, sigma), v, alpha, sigma), eps)


def test_c1_guidance_and_g1_generator():
    u, c = torch.randn(2, 3, 4, dtype=D64).unbind(0)
    torch.testing.assert_close(emd.guided_eps(u, c, 0.0), u)
    torch.testing.assert_close(emd.guided_eps(u, c, 1.0), c)
    torch.testing.assert_close(emd.guided_eps(u, c, 7.5), 7.5 * c - 6.5 * u)
    x0, eps = torch.randn(2, 3, 4, dtype=D64).unbind(0)
    a, s = ACP[999].sqrt(), (1 - ACP[999]).sqrt()
    torch.testing.assert_close(emd.generator_x0(a * x0 + s * eps, eps, a, s), x0)


def test_e1_e2_are_gradients_of_log_pi_in_eps_z():
    """log pi(eps, z) = log p_T(x_t) - log p_theta(x_t) + log N(z) + log N(eps), x_t = alpha g(z) + sigma eps."""
    mix, a, b = oracle.Mixture(), torch.tensor(1.3, dtype=D64), torch.tensor(0.4, dtype=D64)

    def g(z):  # nonlinear, so J_g is not a constant
        return a * z + b + 0.7 * torch.tanh(2 * z)

    z, eps = torch.randn(2, 6, 3, dtype=D64).unbind(0)
    z.requires_grad_(True), eps.requires_grad_(True)
    t = torch.tensor([20, 60, 200, 500, 800, 980])
    alpha, sigma = alpha_sigma(ACP, t, like=z)
    x_t = alpha * g(z) + sigma * eps
    log_pi = (
        oracle.mixture_log_density(x_t, alpha, sigma, mix)
        - oracle.gaussian_log_density(x_t, alpha, sigma, a, b)
        - 0.5 * (z**2).sum(1) - 0.5 * (eps**2).sum(1)
    ).sum()
    want_eps, want_z = torch.autograd.grad(log_pi, (eps, z))
    with torch.no_grad():
        delta = oracle.mixture_eps(x_t, alpha, sigma, mix) - oracle.gaussian_eps(x_t, alpha, sigma, a, b)
    (jt_delta,) = torch.autograd.grad(g(z), z, grad_outputs=delta)
    torch.testing.assert_close(emd.grad_log_pi_eps(delta, eps.detach()), want_eps)
    torch.testing.assert_close(emd.grad_log_pi_z(jt_delta, z.detach(), alpha, sigma), want_z)


def test_l1_stationary_variance_on_a_gaussian():
    """(L1) on N(0, 1): x' = (1 - gamma/2) x + sqrt(gamma) n has stationary variance 1 / (1 - gamma/4)."""
    gamma, rng = 0.5, torch.Generator().manual_seed(0)
    x = torch.zeros(40_000, dtype=D64)
    for _ in range(60):
        x = emd.langevin_step(x, -x, gamma, torch.randn(x.shape, generator=rng, dtype=D64))
    assert abs(float(x.var()) - 1 / (1 - gamma / 4)) < 0.03


def test_nc1_nc2_remove_exactly_the_injected_noise():
    """With teacher == fake (delta = 0), eps_K = (1 - gamma/2)^K eps_0 + nu_K, so eps_tilde is deterministic."""
    gen, _, fake = roles()
    _z0, eps0, _t = draws()
    K, gamma = 5, 0.7
    on = emd.e_step(gen, fake, fake, ACP, chain_draws(chain(K, gamma), 1), chain(K, gamma))
    torch.testing.assert_close(on.eps_tilde, (1 - gamma / 2) ** K * eps0)
    off_draws = chain_draws(chain(K, gamma, nc=False), 1)
    off = emd.e_step(gen, fake, fake, ACP, off_draws, chain(K, gamma, nc=False))
    nu = torch.zeros_like(eps0)
    for k in range(K):
        nu = nu + (1 - gamma / 2) ** (K - 1 - k) * math.sqrt(gamma) * off_draws.n[k]
    torch.testing.assert_close(off.eps_tilde, (1 - gamma / 2) ** K * eps0 + nu)


def test_nc0_removes_the_initial_draw_too():
    """With teacher == fake (delta = 0) and nu_0 = eps_0 (NC0), nothing model-free is left: eps_tilde = 0."""
    gen, _, fake = roles()
    _z0, eps0, _t = draws()
    settings = chain(5, 0.7, cancel_initial_noise=True)
    out = emd.e_step(gen, fake, fake, ACP, chain_draws(settings, 1), settings)
    torch.testing.assert_close(out.eps_tilde, torch.zeros_like(eps0))


def test_nc0_keeps_the_dmd_reduction():
    """K = 1, gamma_eps = 2: (L1) multiplies eps_0 by 1 - 2/2 = 0, so NC0 changes nothing."""
    gen, teacher, fake = roles()

    def grads(cancel_initial):
        settings = chain(cancel_initial_noise=cancel_initial)
        step = emd.generator_step(gen, teacher, fake, ACP, chain_draws(settings, 5), settings)
        return param_grads(step.loss, gen)

    for a, b in zip(grads(True), grads(False)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_nc0_cuts_m_step_variance_and_is_unbiased_without_z_updates():
    """eps-only chain, weighting "none": eps_0 is independent of z, so removing (1 - gamma/2)^K eps_0 from
    eps_tilde keeps the mean gradient and removes variance (docs/ALGORITHM.md, NC0: 13x / 29x at K = 4)."""
    kw = {"n": 80, "batch": 16, "dim": 16, "seed": 3}
    nc = oracle.gradient_samples(oracle.Chain(4, 0.5, 0.0, True, "none"), 2.0, 0.0, **kw)
    nc0 = oracle.gradient_samples(oracle.Chain(4, 0.5, 0.0, True, "none", cancel_initial_noise=True), 2.0, 0.0, **kw)
    assert (nc.var(0) / nc0.var(0) > 5).all()
    diff = nc0 - nc  # paired: same draws
    z_score = diff.mean(0) / (diff.std(0) / math.sqrt(diff.shape[0]))
    assert (z_score.abs() < 4).all()


def test_m1_gradient_and_m0_prime_sign():
    B, dim = 5, 4
    x0 = torch.randn(B, dim, dtype=D64, requires_grad=True)
    eps_tilde = torch.randn(B, dim, dtype=D64)
    t = torch.tensor([25, 250, 500, 750, 975])
    alpha, sigma = alpha_sigma(ACP, t, like=x0)
    w = torch.rand(B, dtype=D64) + 0.5
    (got,) = torch.autograd.grad(emd.m_step_loss(x0, eps_tilde, alpha, sigma, w), x0)
    want = -w.unsqueeze(1) * (sigma / alpha) * eps_tilde / (B * dim)  # mean over elements and samples
    torch.testing.assert_close(got, want)
    # (M0'): grad log N(x_t; alpha x0, sigma^2) at x_t = alpha sg(x0) + sigma eps_tilde is (alpha/sigma) eps_tilde;
    # descending (M1) ascends it, with the positive factor w sigma^2 / alpha^2 / (B d).
    x_t = (alpha * x0 + sigma * eps_tilde).detach()
    (m0,) = torch.autograd.grad((-0.5 * (x_t - alpha * x0) ** 2 / sigma**2).sum(), x0)
    torch.testing.assert_close(m0, (alpha / sigma) * eps_tilde)
    torch.testing.assert_close(got, -(w.unsqueeze(1) * sigma**2 / alpha**2 / (B * dim)) * m0)


def test_dmd_weight_and_timesteps():
    x0, x0_hat = torch.tensor([[1.0, -1.0], [0.0, 4.0]]), torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    torch.testing.assert_close(emd.dmd_weight(x0, x0_hat), torch.tensor([1.0, 1 / 3]))
    t = emd.sample_timesteps(20_000, 20, 980, "cpu", torch.Generator().manual_seed(0))
    assert int(t.min()) == 20 and int(t.max()) == 980


# ---------------------------------------------------------------- (c) UNet rows per iteration
@pytest.mark.parametrize("K,g_z", [(1, 0.0), (4, 0.0), (3, 0.2)])
def test_unet_rows_per_iteration(K, g_z):
    gen, teacher, fake = roles()
    gen_c, teacher_c, fake_c = Counted(gen), Counted(teacher, rows_per_sample=2), Counted(fake)
    z0, _eps0, t = draws()
    B = z0.shape[0]
    step = emd.generator_step(gen_c, teacher_c, fake_c, ACP, chain_draws(chain(K, 0.5, g_z), 0), chain(K, 0.5, g_z))
    assert (teacher_c.calls, fake_c.calls) == (K, K)
    assert gen_c.calls == (1 if g_z == 0 else K + 1)
    emd.fake_score_step(fake_c, step.x0_sample, t, torch.randn_like(step.x0_sample), ACP)
    total = gen_c.rows + teacher_c.rows + fake_c.rows
    assert total == ((3 * K + 2) * B if g_z == 0 else (4 * K + 2) * B)


def test_e_step_z_updates_leave_no_parameter_grad():
    gen, teacher, fake = roles()
    z0, _eps0, _t = draws()
    out = emd.e_step(gen, teacher, fake, ACP, chain_draws(chain(3, 0.5, 0.2), 0), chain(3, 0.5, 0.2))
    assert all(p.grad is None for p in gen.parameters())
    assert not out.z.requires_grad and (out.z - z0).abs().max() > 1e-3
    assert all(not v.requires_grad for v in (out.eps_tilde, out.x0_last, out.x0_hat_teacher_last, out.x0_initial))


# ---------------------------------------------------------------- (d) the analytic oracle
def test_oracle_scores_are_exact():
    """mixture_eps / gaussian_eps are -sigma * d/dx of the closed-form log densities (N2)."""
    x_t = torch.randn(4, 3, dtype=D64, requires_grad=True)
    alpha, sigma = alpha_sigma(ACP, torch.tensor([20, 300, 600, 980]), like=x_t)
    a, b = torch.tensor(1.7, dtype=D64), torch.tensor(-0.3, dtype=D64)
    mix = oracle.Mixture((0.3, 0.7), (-1.0, 2.5), (0.4, 0.8))
    (s_t,) = torch.autograd.grad(oracle.mixture_log_density(x_t, alpha, sigma, mix).sum(), x_t)
    (s_g,) = torch.autograd.grad(oracle.gaussian_log_density(x_t, alpha, sigma, a, b).sum(), x_t)
    torch.testing.assert_close(oracle.mixture_eps(x_t, alpha, sigma, mix), -sigma * s_t)
    torch.testing.assert_close(oracle.gaussian_eps(x_t, alpha, sigma, a, b), -sigma * s_g)
    assert oracle.Mixture().variance() == pytest.approx(4.25)


def test_oracle_dmd_is_mode_seeking_and_emd_approaches_maximum_likelihood():
    """Measured (2 seeds, these settings): DMD a^2 ~ 3.6; EMD K=8, gamma_eps=0.5, gamma_z=0.03, weighting "none"
    a^2 = 4.19-4.21 (ML 4.25). With weighting "dmd" the same chain gives ~4.38 (see docs/ALGORITHM.md, finding 4)."""
    ml = oracle.Mixture().variance()  # 4.25: the maximum-likelihood (moment-matching) Gaussian
    kw = {"iters": 100, "batch": 128, "dim": 16, "lr": 0.03, "a0": 2.0}
    dmd = oracle.fit(oracle.Chain(1, 2.0, 0.0, True, "dmd"), **kw)
    emd_fit = oracle.fit(oracle.Chain(8, 0.5, 0.03, True, "none"), **kw)
    assert dmd.a2 < ml - 0.4 and abs(dmd.b) < 0.1  # reverse KL shrinks the variance (mode-seeking)
    assert abs(emd_fit.a2 - ml) < 0.2 and abs(emd_fit.b) < 0.1
    assert emd_fit.a2 > dmd.a2 + 0.4


# ---------------------------------------------------------------- (e) noise cancellation
@pytest.mark.parametrize("K,g_eps,min_ratio", [(1, 2.0, 20.0), (4, 0.5, 5.0)])
def test_noise_cancellation_cuts_variance_and_is_unbiased_without_z_updates(K, g_eps, min_ratio):
    """eps-only chain, weighting "none": nu_K is independent of z_0 and w, so subtracting it is unbiased."""
    chain_on = oracle.Chain(K, g_eps, 0.0, True, "none")
    chain_off = oracle.Chain(K, g_eps, 0.0, False, "none")
    on = oracle.gradient_samples(chain_on, 2.0, 0.0, n=80, batch=16, dim=16, seed=3)
    off = oracle.gradient_samples(chain_off, 2.0, 0.0, n=80, batch=16, dim=16, seed=3)
    assert (off.var(0) / on.var(0) > min_ratio).all()
    diff = on - off  # paired: same z_0, eps_0, t and Langevin noise
    z_score = diff.mean(0) / (diff.std(0) / math.sqrt(diff.shape[0]))
    assert (z_score.abs() < 4).all()


# ---------------------------------------------------------------- (f) the t-dependent z step (issue 17)
def test_z_step_defaults_to_the_scalar_step():
    settings = emd.EMDSettings()
    assert settings.z_step == "constant"
    alpha, sigma = alpha_sigma(ACP, torch.tensor([20, 980]), like=torch.zeros(2, 3, dtype=D64))
    assert emd.z_step_size(0.03, alpha, sigma) == 0.03
    torch.testing.assert_close(emd.z_step_size(0.5, alpha, sigma, "snr"), 0.5 * sigma**2)  # 1 / (1 + SNR) on VP


def test_snr_z_step_is_per_sample():
    """The batch under z_step="snr" equals each sample run alone with the scalar step gamma_z sigma_t^2."""
    gen, teacher, fake = roles()
    gamma_z = 0.4
    settings = emd.EMDSettings(3, 0.5, gamma_z, z_step="snr")
    batch_draws = chain_draws(settings, 4)
    batch = emd.e_step(gen, teacher, fake, ACP, batch_draws, settings)
    sigma2 = 1 - ACP[batch_draws.t].to(D64)
    for i in range(len(sigma2)):
        alone = emd.EMDSettings(3, 0.5, gamma_z * float(sigma2[i]))
        single = emd.e_step(gen, teacher, fake, ACP, batch_draws.rows(i, i + 1), alone)
        torch.testing.assert_close(single.z, batch.z[i : i + 1])
        torch.testing.assert_close(single.eps_tilde, batch.eps_tilde[i : i + 1])
    assert (batch.z - batch_draws.z0).abs().max() > 1e-3


@pytest.mark.parametrize("mix,t,gamma_z", [(oracle.SYMMETRIC, 20, 1.0), (oracle.SHARP, 50, 0.3)])
def test_snr_z_step_is_stable_where_the_constant_one_diverges(mix, t, gamma_z):
    """At small t the z-target's curvature is ~(alpha/sigma)^2 |J|^2 (15 on the symmetric oracle at t = 20, 55 on
    the sharp one at t = 50): a scalar step above 4 / curvature blows z up geometrically; gamma_z sigma_t^2 does not.
    32 steps at one t, (a, b) at the ML fit, where the target's z-marginal has rms about 1."""
    a = math.sqrt(mix.variance())

    def rms(rule):
        z = oracle.chain_z(oracle.Chain(32, 0.5, gamma_z, True, "none", True, t, t, rule), a, mix.mean(), 64, 16,
                           mix=mix)
        return float(z.pow(2).mean().sqrt())

    assert not rms("constant") < 1e3  # diverged (or overflowed to inf / nan)
    assert 0.8 < rms("snr") < 1.2


def test_oracle_snr_z_step_reaches_maximum_likelihood_on_two_mixtures():
    """The chosen chain (docs/ALGORITHM.md, "The z step"): K = 8, gamma_eps = 0.5, gamma_z = 0.175 with
    z_step "snr", weighting "none", NC and NC0 on. benchmarks/oracle_zstep.py measured a^2 +1.4% / -1.4% of ML on
    the symmetric / asymmetric mixture (seeds 0 and 1 agree to 0.1%), b within 0.4% of the teacher's sd; DMD is
    15% / 12% under. This is that benchmark's run for seed 0 (deterministic, float64), so the 2% of the issue is
    the tolerance; the margin is 0.6%, six times the seed-to-seed spread."""
    kw = {"iters": 400, "batch": 256, "dim": 16, "lr": 0.02, "a0": 2.0, "seed": 0}
    chosen = oracle.Chain(8, 0.5, 0.175, True, "none", True, 20, 980, "snr")
    for mix in (oracle.SYMMETRIC, oracle.ASYMMETRIC):
        a2_err, b_err = oracle.fit_error(oracle.fit(chosen, mix=mix, **kw), mix)
        assert abs(a2_err) < 0.02 and abs(b_err) < 0.02, (mix, a2_err, b_err)
        dmd_a2_err, _ = oracle.fit_error(oracle.fit(oracle.Chain(), mix=mix, **kw), mix)
        assert dmd_a2_err < -0.1, (mix, dmd_a2_err)  # DMD (K = 1, gamma_eps = 2) stays mode-seeking


# ---------------------------------------------------------------- (g) the z step scaled by the generator, and w(t)
def test_jacobian_norm_is_the_largest_singular_value():
    """Power iteration on J^T J (J v by central differences, J^T u by autograd) against the exact spectral norm
    of a nonlinear map, per sample; and exactly a for the oracle's affine generator a z + b."""
    w = torch.randn(12, 12, generator=torch.Generator().manual_seed(0), dtype=D64)

    def g(z):
        return torch.tanh(z @ w.T)

    z = torch.randn(3, 12, generator=torch.Generator().manual_seed(1), dtype=D64)
    estimate = emd.generator_jacobian_norm(g, z, iterations=60, rng=torch.Generator().manual_seed(2))
    exact = torch.stack([torch.linalg.matrix_norm(torch.autograd.functional.jacobian(g, z[i]), 2) for i in range(3)])
    torch.testing.assert_close(estimate, exact, rtol=5e-3, atol=0)
    affine = oracle.Oracle.create(1.7, 0.3)
    torch.testing.assert_close(emd.generator_jacobian_norm(affine.generator, z, iterations=2),
                               torch.full((3,), 1.7, dtype=D64))
    assert affine.a.grad is None  # J^T u is taken w.r.t. z only


def test_jacobian_z_step_bounds_the_step_times_the_curvature_bound():
    alpha, sigma = alpha_sigma(ACP, torch.tensor([20, 500, 980]), like=torch.zeros(3, 4, dtype=D64))
    step = emd.z_step_size(0.4, alpha, sigma, "jacobian", jacobian_norm=3.0)
    torch.testing.assert_close(step * (1 + (alpha / sigma) ** 2 * 9.0), torch.full_like(step, 0.4))
    # with |J| = 1 it is the snr step
    torch.testing.assert_close(emd.z_step_size(0.4, alpha, sigma, "jacobian", 1.0), emd.z_step_size(0.4, alpha, sigma, "snr"))


def test_dmd_t_weight_is_a_function_of_t_once_its_bin_has_a_mean():
    t = torch.tensor([100, 101, 900, 500])
    bins = emd.timestep_bin(t, 20, 980)
    assert bins[0] == bins[1] != bins[2]
    error = torch.tensor([0.2, 0.4, 0.1, 0.3], dtype=D64)
    empty = torch.full((emd.TIMESTEP_BINS,), float("nan"), dtype=D64)
    # an empty table falls back to each sample's own DMD weight
    torch.testing.assert_close(emd.binned_weight(empty, bins, error), 1 / error)
    sums, counts = emd.bin_sums(bins[:3], error[:3])
    table = emd.update_error_table(empty, sums, counts)
    assert table[bins[0]] == pytest.approx(0.3) and table[bins[2]] == pytest.approx(0.1)
    w = emd.binned_weight(table, bins, torch.tensor([5.0, 0.01, 7.0, 0.3], dtype=D64))
    assert w[0] == w[1] == pytest.approx(1 / 0.3) and w[2] == pytest.approx(10.0)
    assert w[3] == pytest.approx(1 / 0.3)  # t = 500's bin is still empty: its own error
    # each new sample of a bin decays the old mean by `decay`: two samples of 0.5 after a mean of 0.3
    sums, counts = emd.bin_sums(bins[:2], torch.tensor([0.5, 0.5], dtype=D64))
    later = emd.update_error_table(table, sums, counts, decay=0.9)
    assert later[bins[0]] == pytest.approx(0.81 * 0.3 + 0.19 * 0.5)
    assert later[bins[2]] == table[bins[2]]


def test_dmd_t_weighting_keeps_the_dmd_gradient_direction_per_sample():
    """K = 1, gamma_eps = 2: with one sample per bin and the table holding exactly the samples' own errors, "dmd-t"
    is "dmd"; in general it rescales each sample's DMD gradient by a positive function of its t."""
    gen, teacher, fake = roles()
    settings = emd.EMDSettings(weighting="dmd-t")
    draws = chain_draws(settings, 3).rows(0, 4)
    dmd = emd.generator_step(gen, teacher, fake, ACP, draws, emd.EMDSettings())
    bins = emd.timestep_bin(draws.t, settings.t_min, settings.t_max)
    assert len(set(bins.tolist())) == 4
    table = emd.update_error_table(torch.full((emd.TIMESTEP_BINS,), float("nan"), dtype=D64),
                                   *emd.bin_sums(bins, dmd.error))
    binned = emd.generator_step(gen, teacher, fake, ACP, draws, settings, error_table=table)
    torch.testing.assert_close(binned.loss, dmd.loss)


def test_oracle_jacobian_z_step_reaches_maximum_likelihood_on_two_mixtures():
    """The chain chosen on the oracle (docs/ALGORITHM.md, "The z step"): K = 8, gamma_eps = 0.5, gamma_z = 0.4
    relative to the curvature bound (z_step "jacobian", |J| measured every step as the training loop does),
    weighting "none", NC and NC0 on: within 2% of maximum likelihood on the project's symmetric oracle and on the
    minority-mode mixture (measured by benchmarks/oracle_zstep.py: this is its seed-0 run); DMD is >10% under."""
    kw = {"iters": 400, "batch": 256, "dim": 16, "lr": 0.02, "a0": 2.0, "seed": 0}
    chosen = oracle.Chain(8, 0.5, 0.4, True, "none", True, 20, 980, "jacobian")
    for mix in (oracle.SYMMETRIC, oracle.MINORITY):
        a2_err, b_err = oracle.fit_error(oracle.fit(chosen, mix=mix, **kw), mix)
        assert abs(a2_err) < 0.02 and abs(b_err) < 0.02, (mix, a2_err, b_err)
    dmd_a2_err, _ = oracle.fit_error(oracle.fit(oracle.Chain(), mix=oracle.MINORITY, **kw), oracle.MINORITY)
    assert dmd_a2_err < -0.1, dmd_a2_err  # DMD (K = 1, gamma_eps = 2) stays mode-seeking
