"""The embedding store: every prompt of a source encoded once (`emd-t2i prompts encode`) into safetensors
shards with a JSON manifest, read back row by row by any number of runs and ranks."""

from __future__ import annotations

import hashlib
import io
import json
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from emd_t2i.data.cache import EmbeddingCache
from emd_t2i.data.shards import (
    DamagedShard,
    ShardLayout,
    open_shard,
    row_checksum,
    shard_problem,
    write_shard,
)
from emd_t2i.errors import UserError
from emd_t2i.files import OpenFiles, file_sha256, write_atomic, write_json_atomic
from emd_t2i.models.text import device_of, encode_prompts

STORE_FORMAT, STORE_VERSION = "emd-t2i-embeddings", 2  # 2: a checksum per row, the small files' sha256s
MANIFEST, NULL_FILE = "manifest.json", "null.safetensors"
HASHES, LOOKUP_HASHES, LOOKUP_ROWS = "hashes.npy", "lookup-hashes.npy", "lookup-rows.npy"
DTYPES = {"float32": (torch.float32, "F32"), "float16": (torch.float16, "F16"), "bfloat16": (torch.bfloat16, "BF16")}
# The text-encoder config keys that decide its architecture (not its file paths or library versions).
ARCHITECTURE_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "max_position_embeddings", "vocab_size", "hidden_act", "layer_norm_eps", "projection_dim")
# Relative L2 distance between a stored embedding and the same prompt encoded now, above which the store was made
# by another text encoder: float16/bf16 rounding stays near 1e-2, other weights or tokenizers land near 1.
PROBE_TOLERANCE = 0.1


# ---------------------------------------------------------------------------------------------------------
# Identities: of a prompt, of a prompt source, of a text encoder
# ---------------------------------------------------------------------------------------------------------


def prompt_hashes(prompts: Iterable[str]) -> np.ndarray:
    """A 64-bit BLAKE2b of each prompt's UTF-8 text (int64): how a store knows which prompt a row holds."""
    return np.array(
        [int.from_bytes(hashlib.blake2b(p.encode(), digest_size=8).digest(), "little", signed=True) for p in prompts],
        dtype=np.int64,
    )


def source_fingerprint(prompts: Sequence[str], samples: int = 256) -> str:
    """The count and `samples` prompts evenly spaced through a source (and its last), hashed: cheap to check at
    every start, and any other file or dataset differs in it. Rows served by index are checked one by one."""
    n = len(prompts)
    positions = sorted({i * n // samples for i in range(samples)} | {n - 1}) if n > samples else range(n)
    digest = hashlib.sha256(str(n).encode() + prompt_hashes(prompts[i] for i in positions).tobytes())
    return digest.hexdigest()[:32]


def text_encoder_fingerprint(text_encoder) -> str:
    config = text_encoder.config.to_dict()
    facts = {k: config.get(k) for k in ARCHITECTURE_KEYS}
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:32]


def _relative_distance(a: Tensor, b: Tensor) -> float:
    a, b = a.float().cpu(), b.float().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _save_npy(path: Path, array: np.ndarray) -> None:
    with io.BytesIO() as buffer:
        np.save(buffer, array)
        write_atomic(path, buffer.getvalue())


# ---------------------------------------------------------------------------------------------------------
# Encoding a whole source into a store (`emd-t2i prompts encode`)
# ---------------------------------------------------------------------------------------------------------


def check_encode_settings(batch_size: int, shard_size: int, dtype: str) -> None:
    if batch_size < 1 or shard_size < 1:
        raise UserError(f"--batch-size and --shard-size must be >= 1 (got {batch_size}, {shard_size})")
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")


@dataclass(frozen=True)
class EncodeSummary:
    path: Path
    count: int
    shards: int
    encoded_shards: int  # written by this call
    kept_shards: int  # already complete from an earlier, interrupted call


def encode_store(
    tokenizer,
    text_encoder,
    prompts: Sequence[str],
    output: str | Path,
    *,
    teacher: str,
    teacher_source: str | None = None,
    batch_size: int = 64,
    shard_size: int = 10_000,
    dtype: str = "float16",
    progress: bool = False,
) -> EncodeSummary:
    """Encode every prompt of a source once into safetensors shards at `output`, for `EmbeddingStore`.

    Resumable: run it again after an interruption and the shards already complete are kept; so is repairing: a
    shard that fails verification (every row against its checksum) is encoded again. A folder that holds a store
    of other prompts, another text encoder or other settings is refused.
    """
    check_encode_settings(batch_size, shard_size, dtype)
    torch_dtype, st_dtype = DTYPES[dtype]
    output, count = Path(output), len(prompts)
    if count == 0:
        raise UserError("--prompts holds no prompts: there is nothing to encode")
    shape = [int(tokenizer.model_max_length), int(text_encoder.config.hidden_size)]
    row_bytes = math.prod(shape) * torch_dtype.itemsize
    shards = [f"shard-{k:05d}.safetensors" for k in range(-(-count // shard_size))]
    manifest = {
        "format": STORE_FORMAT,
        "version": STORE_VERSION,
        "teacher": teacher,
        "teacher_source": teacher_source or teacher,
        "text_encoder": {"class": type(text_encoder).__name__, "config_sha256": text_encoder_fingerprint(text_encoder)},
        "dtype": dtype,
        "shape": shape,
        "count": count,
        "shard_size": shard_size,
        "shards": shards,
        "prompts": {"source": getattr(prompts, "name", "a list"), "fingerprint": source_fingerprint(prompts)},
        "complete": False,
    }
    device = device_of(text_encoder)
    null = encode_prompts(tokenizer, text_encoder, [""], device=device).float().cpu()
    from safetensors.torch import save

    null_file = save({"null": null.contiguous()}, metadata={"format": "pt"})
    manifest["files"] = {NULL_FILE: hashlib.sha256(null_file).hexdigest()}
    _prepare_output(output, manifest, null)
    write_atomic(output / NULL_FILE, null_file)

    from tqdm.auto import tqdm

    encoded = kept = 0
    all_hashes = []
    with tqdm(total=count, disable=not progress, desc="encode", unit="prompt") as bar:
        for k, name in enumerate(shards):
            start, stop = k * shard_size, min(count, (k + 1) * shard_size)
            texts = prompts[start:stop]
            hashes = prompt_hashes(texts)
            all_hashes.append(hashes)
            problem = shard_problem(output / name, hashes, shape, st_dtype, row_bytes) if (
                output / name).is_file() else "missing"
            if problem is None:
                kept += 1
                bar.update(stop - start)
                continue
            if problem != "missing":  # damaged since it was written: encoded again, said so
                print(f"{output / name} is damaged ({problem}): encoding it again", file=sys.stderr)
            if encoded == 0:  # from here until the end the store is incomplete, even if it was complete before
                write_json_atomic(output / MANIFEST, manifest)

            def batches(texts=texts):
                for a in range(0, len(texts), batch_size):
                    chunk = texts[a : a + batch_size]
                    yield encode_prompts(tokenizer, text_encoder, chunk, device=device, batch_size=batch_size).to(
                        torch_dtype)
                    bar.update(len(chunk))

            write_shard(output / name, hashes, batches(), shape, st_dtype, row_bytes)
            encoded += 1

    hashes = np.concatenate(all_hashes)
    order = np.argsort(hashes, kind="stable")
    for name, array in ((HASHES, hashes), (LOOKUP_HASHES, hashes[order]), (LOOKUP_ROWS, order.astype(np.int64))):
        _save_npy(output / name, array)
        manifest["files"][name] = file_sha256(output / name)
    write_json_atomic(output / MANIFEST, {**manifest, "complete": True})
    return EncodeSummary(output, count, len(shards), encoded, kept)


def _prepare_output(output: Path, manifest: dict, null: Tensor) -> None:
    """Start a store in a new or empty folder, or resume one made with the same prompts, encoder and settings."""
    saved_path = output / MANIFEST
    if saved_path.is_file():
        try:
            saved = json.loads(saved_path.read_text())
        except (OSError, ValueError) as err:
            raise UserError(f"--output {output} has an unreadable {MANIFEST}: choose a new folder") from err
        same = ("format", "version", "dtype", "shape", "count", "shard_size", "text_encoder")
        changed = [k for k in same if saved.get(k) != manifest[k]]
        if saved.get("prompts", {}).get("fingerprint") != manifest["prompts"]["fingerprint"]:
            changed.insert(0, "prompts")
        if not changed and _intact(output, NULL_FILE, saved):  # a damaged one says nothing: it is rewritten
            from safetensors.torch import load_file

            if _relative_distance(load_file(output / NULL_FILE)["null"], null) > PROBE_TOLERANCE:
                changed.append("text encoder weights")
        if changed:
            raise UserError(f"--output {output} holds embeddings made with other {', '.join(changed)} "
                            f"(teacher {saved.get('teacher')}, prompts {saved.get('prompts', {}).get('source')}): "
                            "use another --output, or the same flags to resume")
    elif output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise UserError(f"--output {output} exists and is not an embedding store: choose an empty or new folder")
    output.mkdir(parents=True, exist_ok=True)
    for stale in output.glob("*.tmp-*"):  # left by an interrupted run (one encode per folder at a time)
        stale.unlink()
    if not saved_path.is_file():
        write_json_atomic(saved_path, manifest)


def _intact(store: Path, name: str, manifest: dict) -> bool:
    """Whether one of a store's small files is there and matches the sha256 its manifest recorded."""
    expected = manifest.get("files", {}).get(name)
    return (store / name).is_file() and expected is not None and file_sha256(store / name) == expected


# ---------------------------------------------------------------------------------------------------------
# Reading a store
# ---------------------------------------------------------------------------------------------------------


def read_manifest(path: Path) -> dict:
    """The manifest of a complete store; a UserError says how to make or finish one."""
    file = path / MANIFEST
    if not file.is_file():
        raise UserError(f"embedding store {path} has no {MANIFEST}: make it with `emd-t2i prompts encode "
                        f"--teacher T --prompts P --output {path}`")
    try:
        manifest = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"embedding store {path} has an unreadable {MANIFEST}: encode it again") from err
    if not isinstance(manifest, dict) or manifest.get("format") != STORE_FORMAT:
        raise UserError(f"{path} is not an embedding store this version of emd-t2i reads: encode it again with "
                        "`emd-t2i prompts encode`")
    if manifest.get("version") != STORE_VERSION:  # before version 2 rows had no checksums
        raise UserError(f"embedding store {path} was made by another version of emd-t2i: encode it again with "
                        "`emd-t2i prompts encode` into a new folder")
    if not manifest.get("complete"):
        raise UserError(f"embedding store {path} is incomplete: run the same `emd-t2i prompts encode` command "
                        "again to finish it")
    return manifest


class EmbeddingStore:
    """Embeddings encoded once by `emd-t2i prompts encode`, read from disk row by row.

    In memory: the null embedding and three memory-mapped int64 arrays (24 bytes a prompt, shared by every rank
    on a machine). Rows are read with `os.pread`, not mapped, so a process that walks the whole store keeps a flat
    RSS while the OS page cache serves all ranks. Same interface as `EmbeddingCache`: `.get(prompts, device,
    indices=None)` and `.null_embedding(device)`, in `dtype` (default: as stored). A prompt the store lacks is
    encoded by `fallback` if given, else refused.
    """

    def __init__(self, path: str | Path, *, dtype: torch.dtype | None = None, fallback: EmbeddingCache | None = None):
        from safetensors.torch import load_file

        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.count, self.shard_size = int(self.manifest["count"]), int(self.manifest["shard_size"])
        self.shape = tuple(self.manifest["shape"])
        self.stored_dtype = DTYPES[self.manifest["dtype"]][0]
        self.dtype = dtype or self.stored_dtype
        self.row_bytes = math.prod(self.shape) * self.stored_dtype.itemsize
        self.fallback = fallback
        for name in (NULL_FILE, HASHES, LOOKUP_HASHES, LOOKUP_ROWS):  # small: checked whole, once
            if not _intact(self.path, name, self.manifest):
                raise self._damaged(name, "missing or not matching its checksum")
        self.hashes = np.load(self.path / HASHES, mmap_mode="r")
        self.lookup_hashes = np.load(self.path / LOOKUP_HASHES, mmap_mode="r")
        self.lookup_rows = np.load(self.path / LOOKUP_ROWS, mmap_mode="r")
        self._null = load_file(self.path / NULL_FILE)["null"]
        self._layouts: dict[int, ShardLayout] = {}
        self._open = OpenFiles()

    def __len__(self) -> int:
        return self.count

    def verify(self, tokenizer, text_encoder, prompts: Sequence[str]) -> None:
        """Refuse a store made for other prompts or by another text encoder (or tokenizer), in one line each."""
        made_for = f"{self.manifest['prompts']['source']}, {self.count} prompts, teacher {self.manifest['teacher']}"
        if self.manifest["prompts"]["fingerprint"] != source_fingerprint(prompts):
            raise UserError(
                f"embedding store {self.path} was made for other prompts ({made_for}), not "
                f"{getattr(prompts, 'name', 'these')} ({len(prompts)} prompts): encode this source with "
                "`emd-t2i prompts encode` into a new folder, or run without the store")
        shape = (int(tokenizer.model_max_length), int(text_encoder.config.hidden_size))
        probe = encode_prompts(tokenizer, text_encoder, ["", prompts[0]], device=device_of(text_encoder))
        stored = torch.cat([self._null, self.get([prompts[0]], indices=[0]).float()])
        if (shape != self.shape or self.manifest["text_encoder"]["config_sha256"] != text_encoder_fingerprint(
                text_encoder) or _relative_distance(stored, probe) > PROBE_TOLERANCE):
            raise UserError(
                f"embedding store {self.path} was made by another text encoder ({made_for}): encode these prompts "
                "with this --teacher (`emd-t2i prompts encode`) into a new folder, or run without the store")

    def rows_of(self, prompts: Sequence[str]) -> np.ndarray:
        """Each prompt's row in the store, or -1 where the store does not hold it."""
        hashes = prompt_hashes(prompts)
        at = np.minimum(np.searchsorted(self.lookup_hashes, hashes), self.count - 1)
        found = np.asarray(self.lookup_hashes[at]) == hashes
        return np.where(found, np.asarray(self.lookup_rows[at]), -1)

    def get(self, prompts: Sequence[str], device: str | torch.device | None = None, indices=None) -> Tensor:
        """The embeddings (B, 77, D) of `prompts` on `device` (default: the CPU). With `indices` (the prompts'
        positions in the source the store was made from) rows are read directly and each is checked to hold its
        prompt; without, the rows are looked up by the prompts' hashes."""
        if indices is not None:
            rows = np.asarray(indices, dtype=np.int64)
            assert rows.shape == (len(prompts),), "one index per prompt"
            if (rows < 0).any() or (rows >= self.count).any():
                raise UserError(f"embedding store {self.path} holds {self.count} prompts; asked for index "
                                f"{int(rows.max())}: it was made for a smaller source")
            wrong = np.flatnonzero(np.asarray(self.hashes[rows]) != prompt_hashes(prompts))
            if wrong.size:
                k = int(wrong[0])
                raise UserError(f"embedding store {self.path} holds another prompt than {prompts[k]!r} at index "
                                f"{rows[k]}: it was made for other prompts; encode this source again")
        else:
            rows = self.rows_of(prompts)
        out = torch.empty((len(prompts), *self.shape), dtype=self.dtype)
        for k, (row, prompt_hash) in enumerate(zip(rows, prompt_hashes(prompts))):
            if row >= 0:
                out[k] = self._row(int(row), int(prompt_hash))
        missing = np.flatnonzero(rows < 0).tolist()
        if missing:
            if self.fallback is None:
                raise UserError(f"embedding store {self.path} has no embedding of {prompts[missing[0]]!r}: it holds "
                                "only the prompts it was encoded from")
            out[missing] = self.fallback.get([prompts[k] for k in missing], device="cpu").to(self.dtype)
        return out.to(device if device is not None else "cpu")

    def null_embedding(self, device: str | torch.device | None = None) -> Tensor:
        """The embedding (1, 77, D) of the empty prompt "", encoded with the store (kept in float32)."""
        return self._null.to(device=device if device is not None else "cpu", dtype=self.dtype)

    def _row(self, row: int, prompt_hash: int) -> Tensor:
        """One row, checked against its checksum (and so against the prompt it was asked for)."""
        shard, local = divmod(row, self.shard_size)
        name = self.manifest["shards"][shard]
        layout, path = self._layout(shard), str(self.path / name)
        raw = self._open.read(path, layout.embeddings + local * self.row_bytes, self.row_bytes)
        stored = int.from_bytes(self._open.read(path, layout.checksums + 8 * local, 8), "little", signed=True)
        if len(raw) != self.row_bytes or row_checksum(prompt_hash, raw) != stored:
            raise self._damaged(name, f"row {local} does not match its checksum")
        return torch.frombuffer(bytearray(raw), dtype=self.stored_dtype).view(self.shape)

    def _layout(self, shard: int) -> ShardLayout:
        """Where a shard's parts are, read (and its header and size checked) when the shard is first opened."""
        if shard not in self._layouts:
            name, count = self.manifest["shards"][shard], min(self.shard_size, self.count - shard * self.shard_size)
            try:
                self._layouts[shard] = open_shard(self.path / name, count, list(self.shape),
                                                  DTYPES[self.manifest["dtype"]][1], self.row_bytes)
            except DamagedShard as err:
                raise self._damaged(name, str(err)) from None
        return self._layouts[shard]

    def _damaged(self, name: str, problem: str) -> UserError:
        return UserError(f"embedding store {self.path}: {name} is damaged ({problem}): run the same `emd-t2i prompts "
                         "encode` command again to repair it")
