"""Prompts at scale: lazy sources read by index, the bounded cache's flat memory, the on-disk embedding store."""

from __future__ import annotations

import gc
import io
import json
import multiprocessing
import os
import random
import sys
import tarfile

import numpy as np
import pytest
import torch
from tiny import make_tiny_pipeline
from typer.testing import CliRunner

from emd_t2i.cli import app
from emd_t2i.data import readers as prompt_files
from emd_t2i.data.cache import EmbeddingCache
from emd_t2i.data.embeddings import open_embeddings
from emd_t2i.data.prompts import distinct_spread, load_prompts, open_prompts, truncate_report
from emd_t2i.data.store import EmbeddingStore, encode_store
from emd_t2i.errors import UserError
from emd_t2i.models.teachers import load_text_encoder
from emd_t2i.models.text import encode_prompts

N = 20_000
ADJECTIVES = ("red", "blue", "green", "old", "young", "tiny", "huge", "calm", "wild", "bright", "dark", "shiny",
              "rusty", "wooden", "golden", "silver", "misty", "sunny", "snowy", "quiet")
NOUNS = ("cat", "dog", "car", "house", "tree", "boat", "bird", "horse", "castle", "bridge", "lamp", "chair", "robot",
         "flower", "river", "train", "clock", "apple", "mountain", "owl", "city", "garden", "ship", "tower", "violin")
PLACES = [f"{where} {when}" for where in ("beach", "forest", "desert", "street", "harbour", "meadow", "canyon", "village")
          for when in ("at dawn", "at noon", "at dusk", "at night", "in the rain")]


def distinct_prompts(n: int = N) -> list[str]:
    """n distinct prompts over a vocabulary of 70 words (the tokenizer's word cache stays small)."""
    combos = [f"a {a} {b} on a {p}" for a in ADJECTIVES for b in NOUNS for p in PLACES]
    assert len(combos) >= n
    return random.Random(0).sample(combos, n)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """20,000 prompts as .txt and .jsonl, with blank lines and empty prompts between them (skipped)."""
    folder = tmp_path_factory.mktemp("big")
    prompts = distinct_prompts()
    txt, jsonl = [], []
    for i, p in enumerate(prompts):
        if i % 997 == 0:
            txt.append("   ")
            jsonl.append(json.dumps({"id": -i, "prompt": " "}))
        if i % 1009 == 0:
            jsonl.append("")
        txt.append(f"  {p.replace(' ', '  ')}\t")
        jsonl.append(json.dumps({"id": i, "prompt": p, "other": "x"}))
    (folder / "p.txt").write_text("\n".join(txt) + "\n\n", encoding="utf-8")
    (folder / "p.jsonl").write_text("\n".join(jsonl), encoding="utf-8")  # no final newline
    return folder, prompts


@pytest.fixture(scope="module")
def tiny_encoder(tiny_teacher_dir):
    tokenizer, text_encoder, _ = load_text_encoder(str(tiny_teacher_dir))
    return tokenizer, text_encoder


# --- sources ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["p.txt", "p.jsonl"])
def test_a_large_source_is_read_by_index_and_equals_its_lines(big, name):
    folder, prompts = big
    source = open_prompts(str(folder / name), cache=False)
    assert len(source) == N
    assert source.offsets.dtype == np.int64 and source.offsets.nbytes == 8 * N  # the whole index: 8 bytes a prompt
    for i in random.Random(1).sample(range(N), 500) + [0, N - 1]:
        assert source[i] == prompts[i]
    assert source[-1] == prompts[-1] and source[np.int64(5)] == prompts[5]
    assert source[100:110] == prompts[100:110]
    with pytest.raises(IndexError):
        source[N]
    assert load_prompts(str(folder / name)) == prompts
    assert open_prompts(str(folder / name), limit=3, cache=False)[:] == prompts[:3]


def test_folders_and_globs_of_shards(tmp_path):
    prompts = distinct_prompts(50)
    for k, start in enumerate(range(0, 50, 20)):
        rows = [json.dumps({"caption": p}) for p in prompts[start : start + 20]]
        (tmp_path / f"shard-{k:02d}.jsonl").write_text("\n".join(rows) + "\n")
    (tmp_path / "notes.csv").write_text("prompt\nnot read\n")
    assert list(open_prompts(str(tmp_path))) == prompts
    assert list(open_prompts(str(tmp_path / "shard-0[12].jsonl"))) == prompts[20:]
    (tmp_path / "a.txt").write_text("captions beside images\nwin, as before\n")
    assert list(open_prompts(str(tmp_path))) == ["captions beside images", "win, as before"]
    with pytest.raises(UserError, match=r"matches files of types .csv, .jsonl"):
        open_prompts(str(tmp_path / "*s*"))
    with pytest.raises(UserError, match="matches no files"):
        open_prompts(str(tmp_path / "*.parquet"))


def test_csv_records_may_span_lines(tmp_path):
    text = 'caption,n\r\n"a cat,\nsitting",1\r\n\r\n,2\r\n"a ""quoted"" dog",3\r\nlast,4'
    (tmp_path / "p.csv").write_bytes(b"\xef\xbb\xbf" + text.encode())  # with a UTF-8 byte order mark
    source = open_prompts(str(tmp_path / "p.csv"))
    assert [source[i] for i in (2, 0, 1)] == ["last", "a cat, sitting", 'a "quoted" dog']
    assert len(source) == 3


def test_webdataset_tar_shards(tmp_path):
    prompts = distinct_prompts(30)
    path = tmp_path / "shard-000.tar"
    with tarfile.open(path, "w") as tar:
        for i, p in enumerate(prompts + ["  "]):
            for ext, data in (("jpg", b"\xff\xd8 not an image"), ("txt", p.encode())):
                info = tarfile.TarInfo(f"{i:05d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    source = open_prompts(str(path))
    assert len(source) == 30 and source[29] == prompts[29] and list(source) == prompts
    (tmp_path / "bad.tar").write_bytes(b"\x1f\x8b not a plain tar" * 40)
    with pytest.raises(UserError, match="bad.tar is not an uncompressed tar"):
        open_prompts(str(tmp_path / "bad.tar"))


def test_the_index_of_a_large_file_is_cached_and_renewed_when_the_file_changes(big, tmp_path, monkeypatch):
    folder, prompts = big
    src = tmp_path / "p.jsonl"
    src.write_bytes((folder / "p.jsonl").read_bytes())
    monkeypatch.setenv("EMD_T2I_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(prompt_files, "INDEX_CACHE_MIN_BYTES", 0)
    first = open_prompts(str(src))
    assert len(list((tmp_path / "cache" / "prompt-index").glob("*.npz"))) == 1

    def no_scan(path, column):
        raise AssertionError("rescanned a file whose index is cached")

    monkeypatch.setitem(prompt_files._SCANNERS, "jsonl", no_scan)
    again = open_prompts(str(src))
    assert np.array_equal(again.offsets, first.offsets) and again[123] == prompts[123]
    with open(src, "a") as f:
        f.write("\n" + json.dumps({"prompt": "one more"}) + "\n")
    with pytest.raises(AssertionError, match="rescanned"):
        open_prompts(str(src))


def test_hf_and_saved_datasets_are_read_from_arrow(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets", reason="`datasets` is optional: pip install datasets")
    rows = {"text": ["a cat", "", "  a  dog ", None, "a cow"], "n": [1, 2, 3, 4, 5]}
    dataset = datasets.Dataset.from_dict(rows)
    dataset.save_to_disk(str(tmp_path / "saved"))
    source = open_prompts(str(tmp_path / "saved"))
    assert list(source) == ["a cat", "a dog", "a cow"] and source[-1] == "a cow"
    assert isinstance(source.column, datasets.arrow_dataset.Column)  # not a list: rows are read on demand

    datasets.DatasetDict({"test": dataset}).save_to_disk(str(tmp_path / "splits"))
    assert list(open_prompts(str(tmp_path / "splits"), split="test")) == ["a cat", "a dog", "a cow"]
    with pytest.raises(UserError, match=r"has no split 'train' \(found: test\).*--split"):
        open_prompts(str(tmp_path / "splits"))

    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: datasets.load_from_disk(str(tmp_path / "saved")))
    assert list(open_prompts("hf:someone/captions", limit=3)) == ["a cat", "a dog"]


# --- what the loop reads besides batches ------------------------------------------------------------------


def test_validation_prompts_read_only_about_n_prompts():
    prompts = distinct_prompts(1000)
    assert distinct_spread(prompts, 8) == [prompts[i * 1000 // 8] for i in range(8)]  # as spread(distinct, 8)
    repeated = [p for p in prompts[:10] for _ in range(100)]
    assert distinct_spread(repeated, 10) == prompts[:10]
    assert distinct_spread(["a", "b", "a"], 8) == ["a", "b"]


def test_truncate_report_samples_a_large_source(tiny_encoder):
    tokenizer, _ = tiny_encoder
    prompts = ["a cat"] * 900 + ["word " * 100] * 100
    with pytest.warns(UserWarning, match="10 of 100 sampled \\(of 1000\\) prompts"):
        assert truncate_report(tokenizer, prompts, sample=100) == 10


# --- the bounded cache --------------------------------------------------------------------------------


def test_the_cache_keeps_the_most_recently_used(tiny_encoder):
    tokenizer, text_encoder = tiny_encoder
    cache = EmbeddingCache(tokenizer, text_encoder, max_entries=2)
    null = cache.null_embedding()
    cache.get(["a", "b"])
    cache.get(["a"])  # "a" is now the most recent
    cache.get(["c"])  # evicts "b"
    assert list(cache._slots) == ["a", "c"] and cache.encoded == 4
    cache.get(["a", "c"])
    assert cache.encoded == 4
    big_batch = cache.get(["d", "e", "f", "d"])  # more distinct prompts than the bound: still all returned
    torch.testing.assert_close(big_batch, encode_prompts(tokenizer, text_encoder, ["d", "e", "f", "d"], device="cpu"))
    assert len(cache) == 2 and cache.encoded == 7
    torch.testing.assert_close(cache.null_embedding(), null)
    assert cache.encoded == 7


def test_memory_stays_flat_while_a_run_walks_20000_distinct_prompts(big, tiny_encoder):
    """The loop's data path (lazy jsonl source -> bounded cache) on the tiny teacher's text encoder: RSS after
    20,000 distinct prompts is within a few MB of RSS after the first 4,000; the old unbounded cache grows by
    one embedding a prompt."""
    folder, prompts = big
    tokenizer, text_encoder = tiny_encoder
    source = open_prompts(str(folder / "p.jsonl"), cache=False)
    order = np.random.default_rng(0).permutation(N)
    row_bytes = 77 * text_encoder.config.hidden_size * 4

    def walk(cache, positions, batch=256):
        for start in range(0, len(positions), batch):
            rows = positions[start : start + batch]
            out = cache.get([source[int(i)] for i in rows], device="cpu", indices=rows)
            cache.null_embedding(device="cpu")
        return out

    cache = open_embeddings(tokenizer, text_encoder, source, None, max_entries=1024)
    walk(cache, order[:4000])  # past the bound: the cache is full, allocator pools are warm
    gc.collect()
    before = rss_bytes()
    last = walk(cache, order[4000:])
    gc.collect()
    growth = rss_bytes() - before
    assert cache.encoded == N + 1 and len(cache) == 1024
    torch.testing.assert_close(last[-1], encode_prompts(tokenizer, text_encoder, [prompts[order[-1]]], device="cpu")[0])
    assert growth < 6 * 2**20, f"RSS grew by {growth / 2**20:.1f} MB over 16,000 prompts"

    del cache, last
    gc.collect()
    unbounded = EmbeddingCache(tokenizer, text_encoder, max_entries=N)  # as good as the old unbounded cache
    walk(unbounded, order[:256])
    gc.collect()
    before = rss_bytes()
    walk(unbounded, order[256:4256])
    gc.collect()
    assert rss_bytes() - before > 0.8 * 4000 * row_bytes  # 4,000 x 77 x 32 x 4 bytes = 39 MB: what the bound saves


# --- the store ------------------------------------------------------------------------------------------


def _jsonl(path, prompts):
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return str(path)


def test_encode_then_store_equals_the_text_encoder(tiny_teacher_dir, tiny_encoder, tmp_path):
    tokenizer, text_encoder = tiny_encoder
    prompts = distinct_prompts(30) + [" ".join(["word"] * 100)]  # longer than 77 tokens: truncated
    src = _jsonl(tmp_path / "p.jsonl", prompts)
    out = tmp_path / "store"
    result = CliRunner().invoke(app, ["prompts", "encode", "--teacher", str(tiny_teacher_dir), "--prompts", src,
                                      "--output", str(out), "--shard-size", "7", "--batch-size", "4",
                                      "--dtype", "float32", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "31 prompts in 5 shards" in result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["count"] == 31 and manifest["shape"] == [77, 32]
    assert manifest["teacher_source"] == str(tiny_teacher_dir) and manifest["prompts"]["source"] == src

    expected = encode_prompts(tokenizer, text_encoder, prompts, device="cpu")
    store = open_embeddings(tokenizer, text_encoder, open_prompts(src), out)
    assert isinstance(store, EmbeddingStore) and len(store) == 31
    order = [30, 3, 7, 0, 14, 3]
    # float32 as stored; the text encoder batched them differently (by 4 within shards of 7): float rounding only
    torch.testing.assert_close(store.get([prompts[i] for i in order], indices=order), expected[order])
    torch.testing.assert_close(store.get([prompts[i] for i in order]), expected[order])  # found by their text
    torch.testing.assert_close(store.null_embedding(), encode_prompts(tokenizer, text_encoder, [""], device="cpu"))
    assert store.get(["a prompt not in the store"]).shape == (1, 77, 32)  # encoded by the fallback cache

    from safetensors import safe_open  # the shards are ordinary safetensors files

    with safe_open(str(out / "shard-00001.safetensors"), framework="pt") as f:
        torch.testing.assert_close(f.get_slice("embeddings")[2:4], expected[9:11])

    info = CliRunner().invoke(app, ["prompts", "info", str(out)])
    assert "31 prompts" in info.output and "float32 77x32, 5 shards" in info.output


def test_a_store_serves_the_loop_dtype_and_keeps_memory_flat(tiny_encoder, tmp_path):
    tokenizer, text_encoder = tiny_encoder
    prompts = distinct_prompts(3000)
    encode_store(tokenizer, text_encoder, prompts, tmp_path / "s", teacher="tiny", batch_size=500, shard_size=1000)
    half = EmbeddingStore(tmp_path / "s", dtype=torch.bfloat16)
    assert half.get(prompts[:2]).dtype == torch.bfloat16 and half.null_embedding().dtype == torch.bfloat16
    store = EmbeddingStore(tmp_path / "s")
    assert store.get(prompts[:1]).dtype == torch.float16
    walk = [prompts[i] for i in np.random.default_rng(0).permutation(3000)]
    store.get(walk[:500])
    gc.collect()
    before = rss_bytes()
    for start in range(500, 3000, 100):
        store.get(walk[start : start + 100])
    assert rss_bytes() - before < 2 * 2**20  # rows are read, not mapped: 2,500 x 4.9 KB would show


def _read_and_compare(store, prompts, rows, expected):
    for _ in range(20):
        if not torch.equal(store.get([prompts[i] for i in rows], indices=rows), expected[rows]):
            sys.exit(3)
    sys.exit(0)


@pytest.mark.skipif(sys.platform != "linux", reason="forks processes that inherit the store's open files")
def test_several_processes_read_one_store_at_once(tiny_encoder, tmp_path):
    """Ranks on one machine: processes forked after the store was opened and read share its file descriptors
    (positioned reads move no shared offset) while the parent goes on reading."""
    tokenizer, text_encoder = tiny_encoder
    prompts = distinct_prompts(300)
    encode_store(tokenizer, text_encoder, prompts, tmp_path / "s", teacher="tiny", shard_size=64, dtype="float32")
    store = EmbeddingStore(tmp_path / "s")
    expected = store.get(prompts)
    context = multiprocessing.get_context("fork")
    children = [context.Process(target=_read_and_compare, args=(store, prompts, list(range(r, 300, 2))[::-1],
                                                                 expected)) for r in (0, 1)]
    for child in children:
        child.start()
    for _ in range(20):
        assert torch.equal(store.get(prompts[::3]), expected[::3])
    for child in children:
        child.join(timeout=60)
    assert [child.exitcode for child in children] == [0, 0]


def test_a_resumed_encode_keeps_complete_shards(tiny_encoder, tmp_path):
    tokenizer, text_encoder = tiny_encoder
    prompts = distinct_prompts(50)
    calls = []

    class Crashing(torch.nn.Module):
        """The text encoder, interrupted on its 5th call (the null prompt, then shards 0 and 1, then shard 2)."""

        def __init__(self, limit):
            super().__init__()
            self.inner, self.config, self.limit = text_encoder, text_encoder.config, limit

        def forward(self, ids):
            calls.append(len(ids))
            if len(calls) == self.limit:
                raise KeyboardInterrupt
            return self.inner(ids)

    with pytest.raises(KeyboardInterrupt):
        encode_store(tokenizer, Crashing(5), prompts, tmp_path / "s", teacher="tiny", batch_size=10, shard_size=20)
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["manifest.json", "null.safetensors",
                                                                  "shard-00000.safetensors"]
    with pytest.raises(UserError, match="is incomplete: run the same `emd-t2i prompts encode` command again"):
        EmbeddingStore(tmp_path / "s")
    calls.clear()
    summary = encode_store(tokenizer, Crashing(0), prompts, tmp_path / "s", teacher="tiny", batch_size=10,
                           shard_size=20)
    assert (summary.kept_shards, summary.encoded_shards) == (1, 2)
    assert calls == [1, 10, 10, 10]  # the null prompt, then shard 1 and the 10 prompts of shard 2 only
    store = EmbeddingStore(tmp_path / "s")
    torch.testing.assert_close(store.get(prompts).float(), encode_prompts(tokenizer, text_encoder, prompts,
                                                                           device="cpu"), atol=2e-3, rtol=2e-3)
    again = encode_store(tokenizer, Crashing(0), prompts, tmp_path / "s", teacher="tiny", batch_size=10,
                         shard_size=20)
    assert (again.kept_shards, again.encoded_shards) == (3, 0)
    EmbeddingStore(tmp_path / "s")  # still complete


def test_a_store_for_other_prompts_or_another_teacher_is_refused(tiny_encoder, tmp_path):
    tokenizer, text_encoder = tiny_encoder
    prompts = distinct_prompts(40)
    src = open_prompts(_jsonl(tmp_path / "p.jsonl", prompts))
    encode_store(tokenizer, text_encoder, src, tmp_path / "s", teacher="tiny", shard_size=16)
    other = open_prompts(_jsonl(tmp_path / "other.jsonl", prompts[:39] + ["a different last prompt"]))
    with pytest.raises(UserError, match=r"was made for other prompts \(.*p.jsonl, 40 prompts, teacher tiny\)"):
        open_embeddings(tokenizer, text_encoder, other, tmp_path / "s")
    with pytest.raises(UserError, match="holds another prompt than 'a different last prompt' at index 39"):
        EmbeddingStore(tmp_path / "s").get([other[39]], indices=[39])

    other_teacher = make_tiny_pipeline(tmp_path / "other-teacher", seed=7)  # same shapes, other weights
    tok2, enc2, _ = load_text_encoder(str(other_teacher))
    with pytest.raises(UserError, match="was made by another text encoder"):
        open_embeddings(tok2, enc2, src, tmp_path / "s")
    with pytest.raises(UserError, match="holds embeddings made with other text encoder weights"):
        encode_store(tok2, enc2, src, tmp_path / "s", teacher="other", shard_size=16)
    with pytest.raises(UserError, match="holds embeddings made with other prompts, shard_size"):
        encode_store(tokenizer, text_encoder, other, tmp_path / "s", teacher="tiny", shard_size=8)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x").write_text("x")
    with pytest.raises(UserError, match="exists and is not an embedding store"):
        encode_store(tokenizer, text_encoder, src, tmp_path / "junk", teacher="tiny")
    with pytest.raises(UserError, match=r"has no manifest.json: make it with `emd-t2i prompts encode"):
        EmbeddingStore(tmp_path / "junk")


def test_bad_encode_flags_are_one_line(tmp_path):
    result = CliRunner().invoke(app, ["prompts", "encode", "--teacher", "toy", "--prompts", "general",
                                      "--output", str(tmp_path / "s"), "--shard-size", "0"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == ["error: --batch-size and --shard-size must be >= 1 (got 256, 0)"]
    result = CliRunner().invoke(app, ["prompts", "encode", "--teacher", "toy", "--prompts", str(tmp_path / "no.txt"),
                                      "--output", str(tmp_path / "s"), "--dtype", "float16"])
    assert result.exit_code == 2 and "no.txt does not exist" in result.output
