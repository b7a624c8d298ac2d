"""A bounded cache of prompt embeddings that encodes on the fly (each prompt once while it is kept)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor

from emd_t2i.models.text import device_of, encode_prompts

DEFAULT_MAX_ENTRIES = 4096  # SD 1.5 (77 x 768): 0.9 GiB in float32, half that in bf16


class EmbeddingCache:
    """Encodes prompts when first asked for and keeps the `max_entries` most recently used embeddings on the CPU,
    in the text encoder's dtype. With a large source each prompt comes back once an epoch, so the bound, not the
    source, sets the memory. The embeddings live in one block allocated at the first encode (pages become resident
    as its rows are first written): replacing an evicted row reuses its memory, so a long run does not fragment the
    heap. The null embedding is kept apart and never evicted."""

    def __init__(self, tokenizer, text_encoder, *, batch_size: int = 64, max_entries: int = DEFAULT_MAX_ENTRIES):
        assert max_entries >= 1, max_entries
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.batch_size = batch_size
        self.max_entries = max_entries
        self.encoded = 0  # prompts sent through the text encoder (a cache hit adds nothing)
        self.encoder_calls = 0  # forward calls of the text encoder
        self._slots: OrderedDict[str, int] = OrderedDict()  # prompt -> row of the block, least recently used first
        self._block: Tensor | None = None
        self._null: Tensor | None = None

    def __len__(self) -> int:
        return len(self._slots)

    def _encode(self, prompts: list[str]) -> Tensor:
        embeddings = encode_prompts(
            self.tokenizer, self.text_encoder, prompts, device=device_of(self.text_encoder), batch_size=self.batch_size
        ).cpu()
        self.encoded += len(prompts)
        self.encoder_calls += -(-len(prompts) // self.batch_size)
        return embeddings

    def _keep(self, prompt: str, embedding: Tensor) -> None:
        if self._block is None:
            self._block = torch.empty((self.max_entries, *embedding.shape), dtype=embedding.dtype)
        if len(self._slots) < self.max_entries:
            slot = len(self._slots)
        else:
            slot = self._slots.popitem(last=False)[1]  # the least recently used row is replaced
        self._block[slot] = embedding
        self._slots[prompt] = slot

    def get(self, prompts: Sequence[str], device: str | torch.device | None = None, indices=None) -> Tensor:
        """The embeddings (B, 77, D) of `prompts`, in order, on `device` (default: the encoder's). `indices`
        (the prompts' positions in their source) are the store's business; a cache goes by the text alone."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._slots]
        fresh = self._encode(missing) if missing else None
        position = {p: k for k, p in enumerate(missing)}
        rows = []
        for p in prompts:
            if p in position:
                rows.append(fresh[position[p]])
            else:
                self._slots.move_to_end(p)
                rows.append(self._block[self._slots[p]])
        batch = torch.stack(rows)  # a copy, made before new rows may replace the ones read
        for p, k in position.items():
            self._keep(p, fresh[k])
        return batch.to(device if device is not None else device_of(self.text_encoder))

    def null_embedding(self, device: str | torch.device | None = None) -> Tensor:
        """The embedding (1, 77, D) of the empty prompt "", the unconditional branch of guidance."""
        from emd_t2i.models.conditioning import DualTextEncoder

        if self._null is None and isinstance(self.text_encoder, DualTextEncoder):
            self._null = self.text_encoder.null_embedding().cpu()  # SDXL: zeros under force_zeros_for_empty_prompt
        if self._null is None:
            self._null = self._encode([""])
        return self._null.to(device if device is not None else device_of(self.text_encoder))
