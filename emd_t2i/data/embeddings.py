"""The embeddings a run reads: a store encoded once on disk (`emd-t2i prompts encode`) or the on-the-fly cache."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from emd_t2i.data.cache import DEFAULT_MAX_ENTRIES, EmbeddingCache
from emd_t2i.data.store import EmbeddingStore
from emd_t2i.errors import UserError
from emd_t2i.models.conditioning import DualTextEncoder
from emd_t2i.models.text import dtype_of


def open_embeddings(tokenizer, text_encoder, prompts: Sequence[str], store: str | Path | None = None, *,
                    max_entries: int = DEFAULT_MAX_ENTRIES, batch_size: int = 64):
    """The embeddings a run reads: the store at `store`, checked against these prompts and this text encoder, or
    without one a cache of at most `max_entries` that encodes on the fly. Either answers `.get(prompts, device,
    indices=None)` and `.null_embedding(device)` in the text encoder's dtype."""
    if store is not None and isinstance(text_encoder, DualTextEncoder):
        raise UserError("--embeddings (a precomputed store) is not supported for SDXL teachers yet: drop it "
                        "(embeddings are then encoded on the fly and cached, --embedding-cache)")
    if store is None:
        return EmbeddingCache(tokenizer, text_encoder, batch_size=batch_size, max_entries=max_entries)
    fallback = EmbeddingCache(tokenizer, text_encoder, batch_size=batch_size, max_entries=256)
    opened = EmbeddingStore(store, dtype=dtype_of(text_encoder), fallback=fallback)
    opened.verify(tokenizer, text_encoder, prompts)
    return opened
