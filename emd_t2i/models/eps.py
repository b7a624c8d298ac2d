"""The one wrapper from a diffusers UNet to eps(x_t, t, c): every role speaks eps in float32 through it."""

from __future__ import annotations

import torch
from torch import Tensor

from emd_t2i.models.conditioning import pooled_dim, unpack, uses_time_ids
from emd_t2i.schedule import alpha_sigma, eps_from_v


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
