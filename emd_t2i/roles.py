"""One UNet in three roles: the frozen teacher (adapters off), the generator and the fake score (LoRA adapters)."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from contextlib import contextmanager, nullcontext

import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from torch import Tensor

from .conditioning import pooled_dim, unpack, uses_time_ids
from .emd import generator_x0, guided_eps
from .profiling import UNetClock
from .schedule import alpha_sigma, eps_from_v

GENERATOR = "generator"
FAKE_SCORE = "fake_score"
TEACHER = None  # adapters off


def lora_config(rank: int, target_modules: tuple[str, ...]) -> LoraConfig:
    """A LoRA whose B matrices start at zero, so every role starts as the teacher; alpha = rank (scale 1)."""
    return LoraConfig(r=rank, lora_alpha=rank, target_modules=list(target_modules), init_lora_weights=True)


class EpsModel:
    """A diffusers UNet as eps(x_t, t, c) in float32: the one place that knows the UNet's dtype and what it predicts.

    Inputs go to the base weights' dtype (bf16/fp16 under mixed precision); the output comes back in float32,
    and a v-prediction is turned into eps with (N2) in float32, so everything downstream ((G1), (C1), (M1),
    (F1)) computes in float32 whatever the UNet's precision (as k-diffusion's denoiser wrappers and edm's
    preconditioners own their network's parameterisation).
    """

    def __init__(self, unet: torch.nn.Module, alphas_cumprod: Tensor, prediction_type: str = "epsilon"):
        assert prediction_type in ("epsilon", "v_prediction"), prediction_type
        self.unet = unet
        self.alphas_cumprod = alphas_cumprod
        self.prediction_type = prediction_type
        self.dtype = unet.dtype  # of the frozen base; read once (diffusers walks every parameter to find it)
        self.pooled_dim = pooled_dim(unet) if uses_time_ids(unet) else None  # SDXL: cond is packed (conditioning.py)

    def __call__(self, x_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        cond = cond.to(self.dtype)
        if self.pooled_dim is None:
            out = self.unet(x_t.to(self.dtype), t, encoder_hidden_states=cond)
        else:  # SDXL: the pooled text embeds and time ids travel in the packed row, in every role
            hidden, added = unpack(cond, self.pooled_dim)
            out = self.unet(x_t.to(self.dtype), t, encoder_hidden_states=hidden, added_cond_kwargs=added)
        out = out.sample.float()
        if self.prediction_type == "v_prediction":
            alpha_t, sigma_t = alpha_sigma(self.alphas_cumprod, t, like=out)
            out = eps_from_v(x_t.float(), out, alpha_t, sigma_t)
        return out


class Roles:
    """The teacher eps_T (C1), generator g_theta (G1) and fake score eps_psi, all speaking through one UNet.

    The base weights exist once; each role is the UNet with one adapter (or none) switched on. Everything
    returned is an eps-prediction in float32 (see `EpsModel`).
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        alphas_cumprod: Tensor,
        prediction_type: str = "epsilon",
        t_star: int = 999,
        guidance_scale: float = 1.0,
        clock: UNetClock | None = None,
    ):
        self.unet = unet
        self.model = EpsModel(unet, alphas_cumprod, prediction_type)
        self.alphas_cumprod = alphas_cumprod
        self.t_star = t_star
        self.guidance_scale = guidance_scale
        self.clock = clock
        self._lora_layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
        self._lora_params = [p for n, p in unet.named_parameters() if "lora_" in n]
        self._fast_switch = all(hasattr(m, "_active_adapter") and hasattr(m, "_disable_adapters")
                                for m in self._lora_layers)
        self._checkpointable = [m for m in unet.modules() if hasattr(m, "gradient_checkpointing")]
        for param in self._lora_params:
            param.requires_grad_(True)
        self.active: str | None = TEACHER
        self.activate(TEACHER)
        if getattr(unet, "is_gradient_checkpointing", False):  # enabled the plain diffusers way: make it role-aware
            self.enable_gradient_checkpointing()
        self.unet_rows = 0  # UNet batch rows evaluated: the unit of cost in docs/ALGORITHM.md

    # ------------------------------------------------------------ adapters
    def activate(self, adapter: str | None) -> None:
        """Switch the UNet to one role.

        peft's `set_adapter`/`enable_adapters` also flip `requires_grad` to match the active adapter. That
        would silently drop the M-step gradient when the teacher runs between the generator's forward and
        its backward (gamma_z = 0 shares one generator forward between E- and M-step), and it costs ~25 ms
        per switch on an SD1.5 UNet (docs/BENCHMARKS.md). So only the two attributes a LoRA layer's forward
        reads are set; every LoRA weight stays trainable, and gradients are isolated by which adapter is
        active, `no_grad` around teacher and fake calls, and `autograd.grad` w.r.t. z (tests/test_roles.py).
        """
        self.active = adapter
        if self._fast_switch:
            for layer in self._lora_layers:
                layer._disable_adapters = adapter is None
                if adapter is not None:
                    layer._active_adapter = [adapter]
            return
        for layer in self._lora_layers:  # public API, for a peft without those attributes
            layer.enable_adapters(adapter is not None)
            if adapter is not None:
                layer.set_adapter(adapter)
        for param in self._lora_params:
            param.requires_grad_(True)

    @contextmanager
    def role(self, adapter: str | None):
        """Run a block as one role, then switch back to the role that was active before."""
        previous = self.active
        self.activate(adapter)
        try:
            yield
        finally:
            self.activate(previous)

    # ------------------------------------------------------------ gradient checkpointing
    def enable_gradient_checkpointing(self) -> None:
        """Recompute UNet blocks in backward, each under the role it ran as.

        Backward comes after the E-step has switched roles (it ends on the fake score), so a recomputation under
        whatever role is active *then* would silently differentiate the wrong network. Each checkpointed block
        records the active role at its forward and switches to it for its recomputation.
        """
        self.unet.enable_gradient_checkpointing(gradient_checkpointing_func=self._checkpoint)

    def check_checkpointing(self) -> None:
        """Refuse to compute gradients through blocks whose recomputation ignores the roles: checkpointing turned on
        the plain diffusers way after the roles were made (`unet.enable_gradient_checkpointing()`) would give
        silently wrong gradients (see `enable_gradient_checkpointing`)."""
        for module in self._checkpointable:
            if module.gradient_checkpointing and module._gradient_checkpointing_func != self._checkpoint:
                raise RuntimeError(
                    f"{type(module).__name__} of the UNet recomputes in backward under whatever role is active then "
                    "(gradient checkpointing turned on with unet.enable_gradient_checkpointing() after Roles was "
                    "made): call Roles.enable_gradient_checkpointing() instead")

    def _checkpoint(self, module: torch.nn.Module, *args):
        adapter = self.active
        return torch.utils.checkpoint.checkpoint(
            module.__call__, *args, use_reentrant=False, context_fn=lambda: (nullcontext(), self.role(adapter))
        )

    # ------------------------------------------------------------ the three roles
    def eps(self, adapter: str | None, x_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """eps(x_t, t, c) of one role."""
        self.activate(adapter)
        if torch.is_grad_enabled():
            self.check_checkpointing()
        self.unet_rows += x_t.shape[0]
        if self.clock is None:
            return self.model(x_t, t, cond)
        return self.clock.time(self.model, x_t, t, cond)

    def teacher_eps(self, x_t: Tensor, t: Tensor, cond: Tensor, uncond: Tensor) -> Tensor:
        """(C1) guided teacher eps, as ONE batched UNet call over [uncond; cond]."""
        if self.guidance_scale == 1.0:
            return self.eps(TEACHER, x_t, t, cond)
        both = self.eps(TEACHER, torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([uncond, cond]))
        eps_uncond, eps_cond = both.chunk(2)
        return guided_eps(eps_uncond, eps_cond, self.guidance_scale)

    def generator(self, z: Tensor, cond: Tensor) -> Tensor:
        """(G1) g_theta(z, c): the generator adapter's x0-prediction at t* from pure noise z."""
        t = torch.full((z.shape[0],), self.t_star, device=z.device, dtype=torch.long)
        alpha, sigma = alpha_sigma(self.alphas_cumprod, t, like=z)
        return generator_x0(z.float(), self.eps(GENERATOR, z, t, cond), alpha.float(), sigma.float())

    def fake_eps(self, x_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """eps_psi(x_t, t, c): the fake score, no guidance."""
        return self.eps(FAKE_SCORE, x_t, t, cond)

    def bind(self, cond: Tensor, uncond: Tensor) -> tuple[Callable, Callable, Callable]:
        """The three roles with the conditioning closed over: what `emd.py`'s functions take."""
        return (
            functools.partial(self.generator, cond=cond),
            functools.partial(self.teacher_eps, cond=cond, uncond=uncond),
            functools.partial(self.fake_eps, cond=cond),
        )


def add_roles(unet: torch.nn.Module, generator_rank: int, fake_rank: int, target_modules: tuple[str, ...]) -> None:
    """Add the two zero-initialised LoRA adapters to the (frozen) UNet, in float32."""
    unet.requires_grad_(False)
    with warnings.catch_warnings():  # peft warns that a second adapter is "multiple adapters": intended
        warnings.simplefilter("ignore", UserWarning)
        unet.add_adapter(lora_config(generator_rank, target_modules), adapter_name=GENERATOR)
        unet.add_adapter(lora_config(fake_rank, target_modules), adapter_name=FAKE_SCORE)
    for name, param in unet.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()


def adapter_parameters(unet: torch.nn.Module, adapter: str) -> list[torch.nn.Parameter]:
    """The LoRA parameters of one adapter (for its optimizer)."""
    return [p for n, p in unet.named_parameters() if "lora_" in n and f".{adapter}." in n + "."]


def adapter_state_dict(unet: torch.nn.Module, adapter: str) -> dict[str, Tensor]:
    """peft-format state dict of one adapter (keys without the adapter name)."""
    return {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(unet, adapter_name=adapter).items()}


@contextmanager
def swapped_weights(params: list[torch.nn.Parameter], values: list[Tensor]):
    """Temporarily give `params` other values (an EMA to save or sample), restoring them afterwards."""
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, v in zip(params, saved):
                p.copy_(v)


def load_adapter_state_dict(unet: torch.nn.Module, adapter: str, state: dict[str, Tensor]) -> None:
    result = set_peft_model_state_dict(unet, state, adapter_name=adapter)
    unexpected = getattr(result, "unexpected_keys", [])
    assert not unexpected, f"unexpected adapter keys: {unexpected[:3]}"
