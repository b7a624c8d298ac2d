"""Prompts and their embeddings: lazy prompt sources, a bounded embedding cache, and an embedding store on disk."""
