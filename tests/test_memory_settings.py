"""Gradients do not depend on memory settings: gradient checkpointing and gradient accumulation change how a
gradient is computed, never its value; half precision never reaches (G1) or the (M1) target."""

import pytest
import torch
from test_train import tiny_config

from emd_t2i.emd import Draws, EMDSettings, fake_score_step, generator_step
from emd_t2i.models.roles import FAKE_SCORE, GENERATOR, Roles, adapter_parameters, add_roles
from emd_t2i.models.teachers import load_teacher
from emd_t2i.schedule import alpha_sigma
from emd_t2i.training import run as run_module
from emd_t2i.training.config import DEFAULT_TARGET_MODULES
from emd_t2i.training.loop import distill


def relative_error(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    a, b = torch.cat([x.flatten() for x in a]), torch.cat([x.flatten() for x in b])
    return float((a - b).norm() / b.norm())


def roles_with_moved_adapters(path, dtype=torch.float32):
    """Both adapters non-zero and of equal rank (a recomputation under the wrong one then runs without error)."""
    teacher = load_teacher(str(path), load_vae=False, dtype=dtype)
    torch.manual_seed(0)
    add_roles(teacher.unet, 4, 4, DEFAULT_TARGET_MODULES)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in adapter_parameters(teacher.unet, GENERATOR) + adapter_parameters(teacher.unet, FAKE_SCORE):
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return teacher, Roles(teacher.unet, teacher.alphas_cumprod, teacher.prediction_type, 999, 3.0)


def one_update_grads(teacher, roles, gamma_z: float) -> tuple[list, list]:
    """The M-step gradient of the generator and the (F1) gradient of the fake score, for fixed draws."""
    settings = EMDSettings(2, 0.5, gamma_z)
    g = torch.Generator().manual_seed(2)
    shape = (2, teacher.latent_channels, teacher.latent_size, teacher.latent_size)
    cond = torch.randn(2, 77, teacher.cross_attention_dim, generator=g)
    draws = Draws(torch.randn(shape, generator=g), torch.randn(shape, generator=g), torch.tensor([150, 800]),
                  torch.randn(2, *shape, generator=g), torch.randn(2, *shape, generator=g) if gamma_z else None)
    generator, teacher_eps, fake_eps = roles.bind(cond, torch.zeros_like(cond))
    step = generator_step(generator, teacher_eps, fake_eps, teacher.alphas_cumprod, draws, settings)
    gen, fake = adapter_parameters(teacher.unet, GENERATOR), adapter_parameters(teacher.unet, FAKE_SCORE)
    gen_grads = torch.autograd.grad(step.loss, gen)
    loss_f = fake_score_step(fake_eps, step.x0_sample, draws.t, draws.eps0, teacher.alphas_cumprod)
    roles.activate(GENERATOR)  # the role active at backward must not matter either
    return gen_grads, torch.autograd.grad(loss_f, fake)


@pytest.mark.parametrize("gamma_z", [0.0, 0.1])
def test_checkpointing_recomputes_each_role_under_its_own_adapter(tiny_teacher_dir, gamma_z):
    teacher, roles = roles_with_moved_adapters(tiny_teacher_dir)
    plain_gen, plain_fake = one_update_grads(teacher, roles, gamma_z)
    roles.enable_gradient_checkpointing()
    ckpt_gen, ckpt_fake = one_update_grads(teacher, roles, gamma_z)
    assert relative_error(ckpt_gen, plain_gen) < 1e-5
    assert relative_error(ckpt_fake, plain_fake) < 1e-5


def test_checkpointing_turned_on_the_diffusers_way_after_the_roles_is_refused(tiny_teacher_dir):
    """diffusers' own checkpointing recomputes under whatever role is active at backward time (the E-step ends on
    the fake score): the generator's gradient would silently change, so computing one is refused."""
    teacher, roles = roles_with_moved_adapters(tiny_teacher_dir)
    teacher.unet.enable_gradient_checkpointing()
    with pytest.raises(RuntimeError, match="Roles.enable_gradient_checkpointing"):
        one_update_grads(teacher, roles, 0.0)
    roles.enable_gradient_checkpointing()  # the role-aware way is accepted
    one_update_grads(teacher, roles, 0.0)


def test_roles_take_over_checkpointing_enabled_the_diffusers_way(tiny_teacher_dir):
    teacher, roles = roles_with_moved_adapters(tiny_teacher_dir)
    plain_gen, _ = one_update_grads(teacher, roles, 0.0)
    teacher.unet.enable_gradient_checkpointing()
    roles = Roles(teacher.unet, teacher.alphas_cumprod, teacher.prediction_type, 999, 3.0)
    ckpt_gen, _ = one_update_grads(teacher, roles, 0.0)
    assert relative_error(ckpt_gen, plain_gen) < 1e-5


def run_grads(monkeypatch, cfg) -> list[list[torch.Tensor]]:
    """Every gradient the loop steps with (generator, then each fake-score update, per iteration)."""
    real, seen = run_module.optimizer_step, []

    def spy(optimizer, scaler, params, max_norm, world):
        seen.append([p.grad.detach().clone() for p in params])
        return real(optimizer, scaler, params, max_norm, world)

    monkeypatch.setattr(run_module, "optimizer_step", spy)
    distill(cfg)
    monkeypatch.setattr(run_module, "optimizer_step", real)
    return seen


LOOP = {"iterations": 2, "fake_updates": 2, "validate_every": 0, "max_grad_norm": 0.0}


@pytest.mark.parametrize("gamma_z", [0.0, 0.1])
def test_the_loop_steps_with_the_same_gradients_with_and_without_checkpointing(
    tiny_teacher_dir, prompt_file, tmp_path, monkeypatch, gamma_z
):
    runs = {
        on: run_grads(monkeypatch, tiny_config(tiny_teacher_dir, prompt_file, tmp_path / str(on), gamma_z=gamma_z,
                                               gradient_checkpointing=on, **LOOP))
        for on in (False, True)
    }
    assert len(runs[True]) == len(runs[False]) == 2 * (1 + LOOP["fake_updates"])
    for ckpt_grads, plain in zip(runs[True], runs[False]):  # iteration 2 runs with both adapters moved
        assert relative_error(ckpt_grads, plain) < 1e-5


# The run's running estimates (the per-t table of "dmd-t", the |J| of z_step "jacobian") are made from the whole
# global batch, so they too must not depend on how it is split.
@pytest.mark.parametrize("estimates", [{}, {"weighting": "dmd-t", "z_step": "jacobian", "jacobian_every": 1}])
def test_grad_accum_equals_one_batch_twice_as_big(tiny_teacher_dir, prompt_file, tmp_path, monkeypatch, estimates):
    # Without NC0, eps_tilde keeps (1 - gamma/2)^K eps_0 and is O(1). With it, eps_tilde is the small remainder
    # of eps_K - nu_K (rms ~3e-3 here), which turns fp32 summation-order differences between a batch of 4 and
    # two of 2 into ~4e-5 of the M-step gradient: float cancellation, not a different gradient.
    same = {**LOOP, "cancel_initial_noise": False, **estimates}
    accumulated = run_grads(monkeypatch, tiny_config(tiny_teacher_dir, prompt_file, tmp_path / "a", batch_size=2,
                                                     grad_accum=2, **same))
    big = run_grads(monkeypatch, tiny_config(tiny_teacher_dir, prompt_file, tmp_path / "b", batch_size=4, **same))
    assert len(accumulated) == len(big) == 6
    for a, b in zip(accumulated, big):
        assert relative_error(a, b) < 1e-5
    assert relative_error(big[0], big[3]) > 1e-2  # the iterations differ: the comparison is not vacuous


def test_g1_is_computed_in_float32_from_a_bf16_unet(tiny_teacher_dir):
    """(G1) divides by alpha_{t*} (sigma/alpha = 14.6 at t* = 999): done in bf16 it would lose ~1% of x0."""
    teacher, roles = roles_with_moved_adapters(tiny_teacher_dir, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, teacher.latent_channels, teacher.latent_size, teacher.latent_size, generator=g)
    cond = torch.randn(2, 77, teacher.cross_attention_dim, generator=g)
    with torch.no_grad():
        x0 = roles.generator(z, cond)
        t = torch.full((2,), 999)
        eps = roles.eps(GENERATOR, z, t, cond)
    assert x0.dtype == eps.dtype == torch.float32
    alpha, sigma = alpha_sigma(teacher.alphas_cumprod, t, like=z.double())
    exact = (z.double() - sigma * eps.double()) / alpha
    torch.testing.assert_close(x0.double(), exact, rtol=1e-6, atol=1e-5)
    in_bf16 = (z.bfloat16() - sigma.bfloat16() * eps.bfloat16()) / alpha.bfloat16()
    assert (in_bf16.double() - exact).abs().max() > 1e-2  # what the float32 policy avoids
