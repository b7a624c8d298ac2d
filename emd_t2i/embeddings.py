"""Text embeddings for the loop: encoding prompts, a bounded cache that encodes on the fly, or (see
`embedding_store`) embeddings encoded once on disk."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

DEFAULT_MAX_ENTRIES = 4096  # SD 1.5 (77 x 768): 0.9 GiB in float32, half that in bf16


# ---------------------------------------------------------------------------------------------------------
# Encoding and the on-the-fly cache
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_prompts(
    tokenizer, text_encoder, prompts: Sequence[str], *, device: str | torch.device, batch_size: int = 64
) -> Tensor:
    """The text encoder's last_hidden_state (B, 77, D) as Stable Diffusion conditions its UNet on it; for SDXL
    (a `DualTextEncoder`) both encoders' states, the pooled embedding and the time ids packed (B, 78, D)."""
    from .conditioning import DualTextEncoder

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
        from .conditioning import DualTextEncoder

        if self._null is None and isinstance(self.text_encoder, DualTextEncoder):
            self._null = self.text_encoder.null_embedding().cpu()  # SDXL: zeros under force_zeros_for_empty_prompt
        if self._null is None:
            self._null = self._encode([""])
        return self._null.to(device if device is not None else device_of(self.text_encoder))


# ---------------------------------------------------------------------------------------------------------
# What the loop and the CLI call
# ---------------------------------------------------------------------------------------------------------


def open_embeddings(tokenizer, text_encoder, prompts: Sequence[str], store: str | Path | None = None, *,
                    max_entries: int = DEFAULT_MAX_ENTRIES, batch_size: int = 64):
    """The embeddings a run reads: the store at `store`, checked against these prompts and this text encoder, or
    without one a cache of at most `max_entries` that encodes on the fly. Either answers `.get(prompts, device,
    indices=None)` and `.null_embedding(device)` in the text encoder's dtype."""
    from .conditioning import DualTextEncoder
    from .errors import UserError

    if store is not None and isinstance(text_encoder, DualTextEncoder):
        raise UserError("--embeddings (a precomputed store) is not supported for SDXL teachers yet: drop it "
                        "(embeddings are then encoded on the fly and cached, --embedding-cache)")
    if store is None:
        return EmbeddingCache(tokenizer, text_encoder, batch_size=batch_size, max_entries=max_entries)
    from .embedding_store import EmbeddingStore

    fallback = EmbeddingCache(tokenizer, text_encoder, batch_size=batch_size, max_entries=256)
    opened = EmbeddingStore(store, dtype=dtype_of(text_encoder), fallback=fallback)
    opened.verify(tokenizer, text_encoder, prompts)
    return opened


def load_text_encoder(spec: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """(tokenizer, text encoder, resolved source) of a teacher, without its UNet or VAE."""
    from transformers import CLIPTextModel, CLIPTokenizer

    from .errors import UserError
    from .teachers import SDXL_PIPELINE, _load, _read_json, resolve_teacher

    source = resolve_teacher(spec)
    if _read_json(source, "model_index.json").get("_class_name") == SDXL_PIPELINE:
        raise UserError(f"teacher {spec} is SDXL: a precomputed embedding store is SD 1.x/2.x only; distill without "
                        "--embeddings (SDXL embeddings are encoded on the fly and cached)")
    tokenizer = _load(source, "tokenizer", CLIPTokenizer.from_pretrained)
    text_encoder = _load(source, "text_encoder", CLIPTextModel.from_pretrained, dtype=dtype)
    return tokenizer, text_encoder.to(device).requires_grad_(False).eval(), source
