"""Stable Diffusion's CLIP tokenizer built offline from the BPE vocabulary that open_clip ships."""

from __future__ import annotations

import gzip
from functools import lru_cache

from transformers import CLIPTokenizer

CLIP_VOCAB_SIZE = 49408
CLIP_MAX_LENGTH = 77
_NUM_MERGES = 49152 - 256 - 2  # the merges CLIP keeps: 49408 tokens = 2 * 256 bytes + merges + 2 specials


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-unicode table (the base alphabet of the BPE)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


@lru_cache(maxsize=1)
def _clip_vocab_and_merges() -> tuple[tuple[tuple[str, int], ...], tuple[str, ...]]:
    from open_clip.tokenizer import default_bpe

    with gzip.open(default_bpe(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [a + "</w>" for a in alphabet] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    assert len(tokens) == CLIP_VOCAB_SIZE
    return tuple((tok, i) for i, tok in enumerate(tokens)), tuple(" ".join(m) for m in merges)


def clip_tokenizer(model_max_length: int = CLIP_MAX_LENGTH) -> CLIPTokenizer:
    """The openai/clip-vit-large-patch14 tokenizer (same ids as Stable Diffusion's), with no download."""
    vocab, merges = _clip_vocab_and_merges()
    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=[tuple(m.split(" ")) for m in merges],
        model_max_length=model_max_length,
    )
