"""One UNet in three roles: one copy of the base weights, zero-initialised adapters, isolated gradients."""

import torch

from emd_t2i.emd import Draws, EMDSettings, e_step, fake_score_step, generator_step
from emd_t2i.models.roles import FAKE_SCORE, GENERATOR, Roles, adapter_parameters, add_roles
from emd_t2i.models.teachers import load_teacher
from emd_t2i.training.config import DEFAULT_TARGET_MODULES


def _roles(path, guidance_scale=3.0, rank=4):
    teacher = load_teacher(str(path), load_vae=False)
    add_roles(teacher.unet, rank, rank, DEFAULT_TARGET_MODULES)
    return teacher, Roles(teacher.unet, teacher.alphas_cumprod, teacher.prediction_type, 999, guidance_scale)


def _inputs(teacher, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, teacher.latent_channels, teacher.latent_size, teacher.latent_size)
    cond = torch.randn(batch, 77, teacher.cross_attention_dim, generator=g)
    return (
        torch.randn(shape, generator=g),
        torch.randn(shape, generator=g),
        torch.tensor([100, 700])[:batch],
        cond,
    )


def _perturb(params, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def test_one_copy_of_the_base_weights(tiny_teacher_dir):
    teacher, _ = _roles(tiny_teacher_dir)
    base = [p for n, p in teacher.unet.named_parameters() if "lora_" not in n]
    lora = [p for n, p in teacher.unet.named_parameters() if "lora_" in n]
    ptrs = [p.data_ptr() for p in base]
    assert len(ptrs) == len(set(ptrs)), "a base weight is stored twice"
    fresh = load_teacher(str(tiny_teacher_dir), load_vae=False).unet
    assert sum(p.numel() for p in base) == sum(p.numel() for p in fresh.parameters())
    gen, fake = adapter_parameters(teacher.unet, GENERATOR), adapter_parameters(teacher.unet, FAKE_SCORE)
    assert len(gen) + len(fake) == len(lora) and not {id(p) for p in gen} & {id(p) for p in fake}
    assert all(p.dtype == torch.float32 for p in lora)


def test_roles_start_as_the_teacher_and_adapters_off_is_the_teacher(tiny_teacher_dir):
    teacher, roles = _roles(tiny_teacher_dir)
    reference = load_teacher(str(tiny_teacher_dir), load_vae=False).unet
    _z, x, t, cond = _inputs(teacher)
    expected = reference(x, t, encoder_hidden_states=cond).sample
    with torch.no_grad():
        for adapter in (None, GENERATOR, FAKE_SCORE):
            torch.testing.assert_close(roles.eps(adapter, x, t, cond), expected, rtol=0, atol=0)
        _perturb(
            adapter_parameters(teacher.unet, GENERATOR) + adapter_parameters(teacher.unet, FAKE_SCORE), 1
        )
        torch.testing.assert_close(roles.eps(None, x, t, cond), expected, rtol=0, atol=0)
        assert (roles.eps(GENERATOR, x, t, cond) - expected).abs().max() > 1e-4
        assert (roles.eps(FAKE_SCORE, x, t, cond) - roles.eps(GENERATOR, x, t, cond)).abs().max() > 1e-4


def test_guidance_is_one_batched_call(tiny_teacher_dir):
    teacher, roles = _roles(tiny_teacher_dir, guidance_scale=4.0)
    _z, x, t, cond = _inputs(teacher)
    uncond = torch.zeros_like(cond)
    calls = []
    handle = teacher.unet.register_forward_pre_hook(
        lambda m, a, k: calls.append(a[0].shape[0]), with_kwargs=True
    )
    with torch.no_grad():
        guided = roles.teacher_eps(x, t, cond, uncond)
        e_u, e_c = roles.eps(None, x, t, uncond), roles.eps(None, x, t, cond)
    handle.remove()
    assert calls[0] == 2 * x.shape[0] and len(calls) == 3
    torch.testing.assert_close(guided, e_u + 4.0 * (e_c - e_u), rtol=1e-5, atol=1e-5)


def test_gradients_reach_only_the_role_being_trained(tiny_teacher_dir):
    """M-step grads land on the generator only (also when the teacher runs between its forward and backward,
    gamma_z = 0); the E-step's z-VJP (gamma_z > 0) accumulates nothing; (F1) grads land on the fake score."""
    teacher, roles = _roles(tiny_teacher_dir)
    _perturb(adapter_parameters(teacher.unet, FAKE_SCORE), 2)
    gen, fake = adapter_parameters(teacher.unet, GENERATOR), adapter_parameters(teacher.unet, FAKE_SCORE)
    z, eps, t, cond = _inputs(teacher)
    generator, teacher_eps, fake_eps = roles.bind(cond, torch.zeros_like(cond))

    moving = EMDSettings(2, 0.5, 0.1)
    noise = torch.randn(2, *z.shape, generator=torch.Generator().manual_seed(1))
    e_step(generator, teacher_eps, fake_eps, teacher.alphas_cumprod, Draws(z, eps, t, noise, noise), moving)
    assert all(p.grad is None for p in gen + fake), "the E-step accumulated parameter gradients"

    for gamma_z in (0.0, 0.1):
        settings = EMDSettings(2, 0.5, gamma_z)
        draws = Draws(z, eps, t, noise, noise if gamma_z > 0 else None)
        step = generator_step(generator, teacher_eps, fake_eps, teacher.alphas_cumprod, draws, settings)
        step.loss.backward()
        assert sum(float(p.grad.abs().sum()) for p in gen if p.grad is not None) > 0
        assert all(p.grad is None for p in fake)
        for p in gen:
            p.grad = None

    fake_score_step(fake_eps, step.x0_sample, t, eps, teacher.alphas_cumprod).backward()
    assert sum(float(p.grad.abs().sum()) for p in fake if p.grad is not None) > 0
    assert all(p.grad is None for p in gen)


def test_fast_role_switch_matches_peft_public_api(tiny_teacher_dir):
    teacher, roles = _roles(tiny_teacher_dir)
    assert roles._fast_switch
    _perturb(adapter_parameters(teacher.unet, GENERATOR) + adapter_parameters(teacher.unet, FAKE_SCORE), 3)
    _, x, t, cond = _inputs(teacher)
    with torch.no_grad():
        for adapter in (GENERATOR, FAKE_SCORE, None, GENERATOR):
            ours = roles.eps(adapter, x, t, cond)
            if adapter is None:
                teacher.unet.disable_adapters()
            else:
                teacher.unet.enable_adapters()
                teacher.unet.set_adapter(adapter)
            theirs = teacher.unet(x, t, encoder_hidden_states=cond).sample
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
