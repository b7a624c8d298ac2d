"""One UNet in three roles: the frozen teacher (adapters off), the generator and the fake score (LoRA adapters)."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING

import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from torch import Tensor

from emd_t2i.emd import generator_x0, guided_eps
from emd_t2i.models.eps import EpsModel
from emd_t2i.schedule import alpha_sigma

if TYPE_CHECKING:
    from emd_t2i.training.telemetry import UNetClock

GENERATOR = "generator"
FAKE_SCORE = "fake_score"
TEACHER = None  # adapters off


def lora_config(rank: int, target_modules: tuple[str, ...]) -> LoraConfig:
    """A LoRA whose B matrices start at zero, so every role starts as the teacher; alpha = rank (scale 1)."""
    return LoraConfig(r=rank, lora_alpha=rank, target_modules=list(target_modules), init_lora_weights=True)


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
