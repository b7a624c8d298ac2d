"""The discrete VP noise schedule of Stable Diffusion: alpha_t, sigma_t and the eps <-> x0 <-> v maps (N1, N2)."""

from __future__ import annotations

import torch
from torch import Tensor


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-sample vector (B,) so it broadcasts against a batch shaped like `like` (B, ...)."""
    return values.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def alpha_sigma(alphas_cumprod: Tensor, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """alpha_t = sqrt(abar[t]), sigma_t = sqrt(1 - abar[t]), shaped to broadcast against `like`."""
    abar = alphas_cumprod.to(device=t.device, dtype=torch.float64)[t.long()]
    return _per_sample(abar.sqrt(), like), _per_sample((1 - abar).sqrt(), like)


def forward_noise(x0: Tensor, eps: Tensor, alpha_t: Tensor, sigma_t: Tensor) -> Tensor:
    """(N1) x_t = alpha_t * x0 + sigma_t * eps."""
    return alpha_t * x0 + sigma_t * eps


def x0_from_eps(x_t: Tensor, eps_hat: Tensor, alpha_t: Tensor, sigma_t: Tensor) -> Tensor:
    """(N2) x0_hat = (x_t - sigma_t * eps_hat) / alpha_t."""
    return (x_t - sigma_t * eps_hat) / alpha_t


def score_from_eps(eps_hat: Tensor, sigma_t: Tensor) -> Tensor:
    """(N2) s(x_t) = -eps_hat / sigma_t."""
    return -eps_hat / sigma_t


def eps_from_v(x_t: Tensor, v: Tensor, alpha_t: Tensor, sigma_t: Tensor) -> Tensor:
    """v-prediction to eps: eps_hat = alpha_t * v + sigma_t * x_t."""
    return alpha_t * v + sigma_t * x_t


def sd_alphas_cumprod(
    num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> Tensor:
    """Stable Diffusion's "scaled_linear" schedule, for tests and the toy teacher (loaders read the scheduler)."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)
