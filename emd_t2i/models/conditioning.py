"""SDXL's conditioning (two text encoders, the pooled embedding, the micro-conditioning time ids) as ONE tensor.

SDXL's UNet takes `encoder_hidden_states` (B, 77, D1 + D2), and `added_cond_kwargs` {"text_embeds": (B, P),
"time_ids": (B, 6)}. Packing the last two into one extra token row, (B, 78, D) with row 77 = [pooled, time ids,
zeros], lets everything that handles a prompt's embedding (the cache, batch slicing, the [uncond; cond] guidance
batch, broadcasting the null embedding) handle SDXL's unchanged; `EpsModel` unpacks it at the UNet call. The time
ids (sizes such as 1024) are exact in bf16 and fp16.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

TIME_IDS = 6  # (original h, original w, crop top, crop left, target h, target w)


def uses_time_ids(unet) -> bool:
    """Whether a UNet is SDXL-shaped (conditioned on pooled text embeds and time ids)."""
    return getattr(getattr(unet, "config", None), "addition_embed_type", None) == "text_time"


def add_time_ids(resolution: int) -> list[int]:
    """StableDiffusionXLPipeline's defaults: original size = target size = the model's resolution, crop (0, 0)."""
    return [resolution, resolution, 0, 0, resolution, resolution]


def pack(hidden: Tensor, pooled: Tensor, time_ids: Tensor) -> Tensor:
    """(B, 77, D), (B, P), (B, 6) -> (B, 78, D)."""
    batch, _, width = hidden.shape
    assert pooled.shape[-1] + TIME_IDS <= width, (pooled.shape, width)
    extra = hidden.new_zeros(batch, 1, width)
    extra[:, 0, : pooled.shape[-1]] = pooled
    extra[:, 0, pooled.shape[-1] : pooled.shape[-1] + TIME_IDS] = time_ids.to(hidden.dtype)
    return torch.cat([hidden, extra], dim=1)


def unpack(cond: Tensor, pooled_dim: int) -> tuple[Tensor, dict[str, Tensor]]:
    """(B, 78, D) -> encoder_hidden_states, added_cond_kwargs of an SDXL UNet."""
    extra = cond[:, -1]
    kwargs = {"text_embeds": extra[:, :pooled_dim], "time_ids": extra[:, pooled_dim : pooled_dim + TIME_IDS]}
    return cond[:, :-1], kwargs


def pooled_dim(unet) -> int:
    """P from the UNet config: projection_class_embeddings_input_dim = 6 * addition_time_embed_dim + P."""
    config = unet.config
    return int(config.projection_class_embeddings_input_dim - TIME_IDS * config.addition_time_embed_dim)


class DualTextEncoder(torch.nn.Module):
    """SDXL's two CLIP text encoders as StableDiffusionXLPipeline.encode_prompt uses them (no clip skip): the
    penultimate hidden states of both, concatenated, and text_encoder_2's projected pooled output; packed with the
    time ids for `resolution`. The null prompt follows the pipeline's `force_zeros_for_empty_prompt`: zeros (what
    SDXL and DMD2 use for the unconditional branch) or the encoded "" prompt."""

    def __init__(self, tokenizer, text_encoder, tokenizer_2, text_encoder_2, resolution: int,
                 force_zeros_for_empty_prompt: bool):
        super().__init__()
        self.tokenizers = (tokenizer, tokenizer_2)
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2
        self.resolution = resolution
        self.force_zeros = force_zeros_for_empty_prompt

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Tensor:
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, (self.text_encoder, self.text_encoder_2)):
            ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids
            out = encoder(ids.to(next(encoder.parameters()).device), output_hidden_states=True)
            if out[0].ndim == 2:
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        hidden = torch.cat(hidden, dim=-1).to(self.text_encoder_2.dtype)
        time_ids = torch.tensor([add_time_ids(self.resolution)] * len(prompts), device=hidden.device)
        return pack(hidden, pooled.to(hidden.dtype), time_ids)

    def null_embedding(self) -> Tensor:
        """(1, 78, D): the unconditional branch of guidance (zeros but the time ids under force_zeros)."""
        null = self.encode([""])
        if self.force_zeros:
            null[:, :-1] = 0
            null[:, -1, : self.text_encoder_2.config.projection_dim] = 0
        return null
