"""Prompts to the UNet's conditioning: the text encoder's hidden states, as Stable Diffusion conditions on them."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


@torch.no_grad()
def encode_prompts(
    tokenizer, text_encoder, prompts: Sequence[str], *, device: str | torch.device, batch_size: int = 64
) -> Tensor:
    """The text encoder's last_hidden_state (B, 77, D) as Stable Diffusion conditions its UNet on it; for SDXL
    (a `DualTextEncoder`) both encoders' states, the pooled embedding and the time ids packed (B, 78, D)."""
    from emd_t2i.models.conditioning import DualTextEncoder

    chunks = []
    for start in range(0, len(prompts), batch_size):
        if isinstance(text_encoder, DualTextEncoder):
            chunks.append(text_encoder.encode(prompts[start : start + batch_size]))
            continue
        ids = tokenizer(
            list(prompts[start : start + batch_size]),
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        chunks.append(text_encoder(ids.to(device))[0])
    return torch.cat(chunks)


def device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def dtype_of(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype
