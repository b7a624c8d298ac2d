"""A damaged embedding store is found where it is read, ends in one line naming the file, and `emd-t2i prompts
encode` repairs exactly what fails verification; a run refused by its inputs leaves no config.json behind."""

from __future__ import annotations

import json

import pytest
import torch
from test_prompts_scale import distinct_prompts
from typer.testing import CliRunner

from emd_t2i.cli import app
from emd_t2i.data.store import EmbeddingStore
from emd_t2i.errors import UserError


def encode(teacher, prompts, store):
    result = CliRunner().invoke(app, ["prompts", "encode", "--teacher", str(teacher), "--prompts", str(prompts),
                                      "--output", str(store), "--shard-size", "4", "--dtype", "float32",
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return result.output


def flip_in_the_middle(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40  # one bit of one embedding value: the file keeps its size and header
    path.write_bytes(bytes(data))


DAMAGE = {  # what happened to the store, the file the message must name, and what it must say
    "a truncated shard": (lambda s: (s / "shard-00001.safetensors").write_bytes(
        (s / "shard-00001.safetensors").read_bytes()[:-100]), "shard-00001.safetensors", "bytes, expected"),
    "a broken header": (lambda s: (s / "shard-00001.safetensors").write_bytes(
        b"\xff" * 16 + (s / "shard-00001.safetensors").read_bytes()[16:]), "shard-00001.safetensors", "header"),
    "flipped bytes in shard data": (lambda s: flip_in_the_middle(s / "shard-00001.safetensors"),
                                    "shard-00001.safetensors", "does not match its checksum"),
    "a damaged null embedding": (lambda s: flip_in_the_middle(s / "null.safetensors"), "null.safetensors",
                                 "not matching its checksum"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_store_is_one_line_and_encode_repairs_it(tiny_teacher_dir, tmp_path, damage):
    prompts = distinct_prompts(10)  # shards of 4: rows 4-7 are in shard 1
    source = tmp_path / "p.txt"
    source.write_text("\n".join(prompts) + "\n")
    store = tmp_path / "store"
    encode(tiny_teacher_dir, source, store)
    before = EmbeddingStore(store).get(prompts)
    damaged, name, says = DAMAGE[damage]
    damaged(store)

    with pytest.raises(UserError, match=rf"{name} is damaged \(.*{says}.*\): run the same `emd-t2i prompts encode`"):
        EmbeddingStore(store).get(prompts)
    output = encode(tiny_teacher_dir, source, store)  # the same command again repairs it
    repaired = "1 encoded now, 2 kept" if name.startswith("shard") else "0 encoded now, 3 kept"
    assert repaired in output, output
    torch.testing.assert_close(EmbeddingStore(store).get(prompts), before)


def test_a_refused_start_writes_no_config_and_the_corrected_command_runs(tiny_teacher_dir, prompt_file, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("\n".join(distinct_prompts(6)) + "\n")
    store = tmp_path / "store"
    encode(tiny_teacher_dir, prompt_file, store)  # made for prompt_file
    out = tmp_path / "run"
    args = ["distill", "--teacher", str(tiny_teacher_dir), "--embeddings", str(store), "--output", str(out),
            "--iterations", "1", "--batch-size", "2", "--generator-rank", "4", "--fake-rank", "4", "--fake-updates",
            "1", "--validate-every", "0", "--device", "cpu", "--no-export"]
    result = CliRunner().invoke(app, args + ["--prompts", str(other)])
    assert result.exit_code == 2 and "was made for other prompts" in result.output, result.output
    assert not (out / "config.json").exists()
    result = CliRunner().invoke(app, args + ["--prompts", str(prompt_file)])  # the corrected command
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["prompts"] == str(prompt_file)


def test_a_run_that_meets_a_damaged_shard_ends_in_one_line(tiny_teacher_dir, prompt_file, tmp_path):
    store = tmp_path / "store"
    encode(tiny_teacher_dir, prompt_file, store)  # 5 prompts: shard 1 holds the last one, read in the first batches
    flip_in_the_middle(store / "shard-00001.safetensors")
    result = CliRunner().invoke(app, ["distill", "--teacher", str(tiny_teacher_dir), "--prompts", str(prompt_file),
                                      "--embeddings", str(store), "--output", str(tmp_path / "run"), "--iterations",
                                      "3", "--batch-size", "2", "--generator-rank", "4", "--fake-rank", "4",
                                      "--fake-updates", "1", "--validate-every", "0", "--device", "cpu",
                                      "--no-export"])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "shard-00001.safetensors is damaged" in lines[0], result.output
