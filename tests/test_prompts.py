"""Prompt sources, the truncation report, encoding, and the embedding cache (tiny CLIP text encoder)."""

from __future__ import annotations

import json
import sys
import types
import warnings

import pytest
import torch
from tiny import tiny_text_encoder

from emd_t2i.data.cache import EmbeddingCache
from emd_t2i.data.prompts import GENERAL_PROMPTS, load_prompts, truncate_report
from emd_t2i.errors import UserError
from emd_t2i.models.text import encode_prompts
from tools.tokenizer import clip_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return clip_tokenizer()


@pytest.fixture(scope="module")
def text_encoder():
    torch.manual_seed(0)
    return tiny_text_encoder().requires_grad_(False)


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


# --- sources ------------------------------------------------------------------------------------------


def test_txt_skips_empty_and_whitespace_lines(tmp_path):
    src = _write(tmp_path / "p.txt", "a red fox\n\n   \n  a  blue\tcar \n\nlast line")
    assert load_prompts(src) == ["a red fox", "a blue car", "last line"]


def test_limit_keeps_the_first(tmp_path):
    src = _write(tmp_path / "p.txt", "one\ntwo\nthree\n")
    assert load_prompts(src, limit=2) == ["one", "two"]
    with pytest.raises(UserError, match="limit"):
        load_prompts(src, limit=0)


def test_jsonl_default_and_named_columns(tmp_path):
    rows = [
        {"id": 1, "text": "a cat", "alt": "x"},
        {"id": 2, "text": ""},
        {"id": 3, "text": "a dog", "alt": "y"},
    ]
    src = _write(tmp_path / "p.jsonl", "\n".join(map(json.dumps, rows)) + "\n\n")
    assert load_prompts(src) == ["a cat", "a dog"]
    assert load_prompts(src, column="alt") == ["x", "y"]


def test_jsonl_of_strings(tmp_path):
    src = _write(tmp_path / "p.jsonl", '"a cat"\n"a dog"\n')
    assert load_prompts(src) == ["a cat", "a dog"]


def test_jsonl_missing_column_lists_found(tmp_path):
    src = _write(tmp_path / "p.jsonl", json.dumps({"id": 1, "desc": "a cat"}))
    with pytest.raises(
        UserError, match=r"p.jsonl has no column any of prompt, text, caption \(found: id, desc\)"
    ):
        load_prompts(src)
    with pytest.raises(UserError, match=r"no column 'title' \(found: id, desc\).*--prompt-column"):
        load_prompts(src, column="title")


def test_jsonl_bad_line_is_named(tmp_path):
    src = _write(tmp_path / "p.jsonl", '{"prompt": "ok"}\n{oops\n')
    with pytest.raises(UserError, match="p.jsonl, line 2"):
        load_prompts(src)


def test_csv_and_tsv(tmp_path):
    src = _write(tmp_path / "p.csv", 'file,caption\n1.png,"a cat, sitting"\n2.png,\n3.png,a dog\n')
    assert load_prompts(src) == ["a cat, sitting", "a dog"]
    assert load_prompts(src, column="file") == ["1.png", "2.png", "3.png"]
    tsv = _write(tmp_path / "p.tsv", "prompt\tscore\na cat\t1\n")
    assert load_prompts(tsv) == ["a cat"]


def test_csv_missing_column_lists_found(tmp_path):
    src = _write(tmp_path / "p.csv", "file,score\n1.png,3\n")
    with pytest.raises(UserError, match=r"found: file, score"):
        load_prompts(src)


def test_folder_of_txt_files(tmp_path):
    _write(tmp_path / "b.txt", "a list\n\nof two\n")
    _write(tmp_path / "a.txt", "one caption\n")
    _write(tmp_path / "a.png", "not a prompt")
    assert load_prompts(str(tmp_path)) == ["one caption", "a list", "of two"]


def test_empty_folder(tmp_path):
    with pytest.raises(UserError, match="has no .txt files"):
        load_prompts(str(tmp_path))


@pytest.mark.parametrize("name, content", [("empty.txt", "\n  \n"), ("empty.csv", ""), ("empty.jsonl", "")])
def test_empty_source_names_file(tmp_path, name, content):
    src = _write(tmp_path / name, content)
    with pytest.raises(UserError, match=name):
        load_prompts(src)


def test_missing_unknown_and_unreadable_files(tmp_path):
    with pytest.raises(UserError, match="nope.txt does not exist"):
        load_prompts(str(tmp_path / "nope.txt"))
    with pytest.raises(UserError, match="p.parquet has an unknown type"):
        load_prompts(_write(tmp_path / "p.parquet", "x"))
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(UserError, match="prompt file .*bad.txt, line 1, is not UTF-8"):
        load_prompts(str(tmp_path / "bad.txt"))


@pytest.mark.parametrize("name", ["p.txt", "p.csv", "p.jsonl"])
def test_text_that_is_not_utf8_is_named_by_its_line(tmp_path, name):
    lines = {"p.txt": [b"a cat", b"a dog", b"caf\xe9 au lait"], "p.csv": [b"prompt", b"a cat", b"caf\xe9 au lait"],
             "p.jsonl": [b'{"prompt": "a cat"}', b'{"prompt": "a dog"}', b'{"prompt": "caf\xe9"}']}[name]
    (tmp_path / name).write_bytes(b"\n".join(lines) + b"\n")  # Latin-1 on line 3
    with pytest.raises(UserError, match=rf"{name}, line 3, is not UTF-8 text: save the file as UTF-8"):
        load_prompts(str(tmp_path / name))


def test_hf_without_datasets_says_pip_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(UserError, match="pip install datasets"):
        load_prompts("hf:someone/prompts")


class _FakeDataset:
    def __init__(self, columns):
        self.columns = columns
        self.column_names = list(columns)

    def __len__(self):
        return len(next(iter(self.columns.values())))

    def __getitem__(self, name):
        return self.columns[name]

    def select(self, indices):
        return _FakeDataset({k: [v[i] for i in indices] for k, v in self.columns.items()})


def test_hf_dataset_split_column_limit(monkeypatch):
    calls = []

    def load_dataset(name, split):
        calls.append((name, split))
        if name != "someone/prompts":
            raise FileNotFoundError(name)
        return _FakeDataset({"Prompt": ["a cat", " ", "a dog", "a cow"], "caption": ["c1", "c2", "c3", "c4"]})

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert load_prompts("hf:someone/prompts", split="test") == ["c1", "c2", "c3", "c4"]
    assert load_prompts("hf:someone/prompts", column="Prompt", limit=3) == ["a cat", "a dog"]
    assert calls[0] == ("someone/prompts", "test")
    with pytest.raises(UserError, match="cannot load dataset hf:someone/missing"):
        load_prompts("hf:someone/missing")


def test_general_prompts_ship():
    prompts = load_prompts(str(GENERAL_PROMPTS))
    assert len(prompts) >= 300
    assert len(set(prompts)) == len(prompts)


# --- tokenizing and encoding --------------------------------------------------------------------------


def test_truncate_report_counts_and_warns_once(tokenizer):
    prompts = ["a cat", "x " * 75, "x " * 76, "word " * 200]  # 75 + BOS + EOS = 77 fits
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert truncate_report(tokenizer, prompts) == 2
    assert len(caught) == 1 and "2 of 4 prompts" in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert truncate_report(tokenizer, ["a cat"]) == 0


def test_encode_prompts_matches_direct_call(tokenizer, text_encoder):
    prompts = ["a cat", "a photo of a dog on a beach", "word " * 100]
    ids = tokenizer(
        prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    expected = text_encoder(ids).last_hidden_state
    got = encode_prompts(tokenizer, text_encoder, prompts, device="cpu", batch_size=2)
    assert got.shape == (3, 77, 32)
    torch.testing.assert_close(got, expected)


def test_cache_encodes_each_prompt_once(tokenizer, text_encoder):
    cache = EmbeddingCache(tokenizer, text_encoder, batch_size=2)
    first = cache.get(["a cat", "a dog", "a cat"])
    assert cache.encoded == 2 and cache.encoder_calls == 1
    second = cache.get(["a dog", "a cow", "a cat"])
    assert cache.encoded == 3 and cache.encoder_calls == 2 and len(cache) == 3
    torch.testing.assert_close(second[0], first[1])
    torch.testing.assert_close(second[2], first[0])
    torch.testing.assert_close(
        second, encode_prompts(tokenizer, text_encoder, ["a dog", "a cow", "a cat"], device="cpu")
    )
    cache.get(["a cow"])
    assert cache.encoded == 3


def test_null_embedding(tokenizer, text_encoder):
    cache = EmbeddingCache(tokenizer, text_encoder)
    null = cache.null_embedding()
    assert null.shape == (1, 77, 32)
    torch.testing.assert_close(null, encode_prompts(tokenizer, text_encoder, [""], device="cpu"))
    cache.null_embedding()
    assert cache.encoded == 1


def test_cache_keeps_encoder_dtype_on_cpu(tokenizer, text_encoder):
    half = tiny_text_encoder().to(torch.bfloat16).requires_grad_(False)
    cache = EmbeddingCache(tokenizer, half)
    out = cache.get(["a cat"], device="cpu")
    assert out.dtype == torch.bfloat16
    assert cache._block.device.type == "cpu" and cache._block.dtype == torch.bfloat16


def test_a_bundled_list_loads_by_name():
    from emd_t2i.data.prompts import load_prompts

    prompts = load_prompts("general")
    assert len(prompts) >= 300 and len(set(prompts)) == len(prompts)
