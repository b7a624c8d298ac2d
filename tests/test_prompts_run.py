"""A run that walks 20,000 distinct prompts keeps a flat resident memory (issue 16): prompts are read lazily and
embeddings live in a bounded cache; and a run can take its embeddings from a store made by `prompts encode`."""

import json

import pytest
from test_train import tiny_config
from typer.testing import CliRunner

from emd_t2i.cli import app
from emd_t2i.training import batch as batches
from emd_t2i.training.loop import distill
from emd_t2i.training.run import FakeStats, GeneratorStats, Run

WALK = {"iterations": 157, "batch_size": 128, "num_langevin_steps": 1, "gamma_eps": 2.0, "gamma_z": 0.0,
        "fake_updates": 1, "generator_rank": 1, "fake_rank": 1, "validate_every": 0, "log_every": 50,
        "checkpoint_every": 1000, "num_validation_prompts": 1, "embedding_cache": 512}


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


@pytest.mark.slow
def test_rss_stays_flat_while_a_run_walks_20000_prompts(tiny_teacher_dir, tmp_path, monkeypatch):
    """The loop, its data order, lazy prompt reads, the text encoder and the embedding cache run for real over
    20,000 distinct prompts; the UNet updates are stubbed out, since 157 of them at batch 128 take minutes on
    two CPU cores and hold no per-prompt state (their memory is what benchmarks/soak.py watches)."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"text": f"prompt number {i}, a {i % 7} and a {i % 13}"}) + "\n"
                               for i in range(20_000)))
    real, rss = batches.make_batch, {}

    def watched(cfg, settings, prompts, cache, latent_shape, step, *args):
        rss[step] = rss_mib()
        return real(cfg, settings, prompts, cache, latent_shape, step, *args)

    monkeypatch.setattr("emd_t2i.training.loop.make_batch", watched)
    monkeypatch.setattr(Run, "generator_update", lambda run, batch: (GeneratorStats(0.0, 0.0, 0.0, 0.0), []))
    monkeypatch.setattr(Run, "fake_score_updates", lambda run, batch, x0: FakeStats(0.0, 0.0))
    distill(tiny_config(tiny_teacher_dir, prompts, tmp_path / "run", **WALK))
    assert len(rss) == 157  # 157 x 128 = 20,096 prompts: every one seen once
    growth = max(rss[s] for s in range(40, 157)) - rss[40]
    assert growth < 8, f"RSS grew by {growth:.1f} MiB over 15,000 new prompts (an unbounded cache: ~10 KiB each)"


def test_a_run_takes_its_embeddings_from_a_store(tiny_teacher_dir, prompt_file, tmp_path):
    store = tmp_path / "store"
    result = CliRunner().invoke(app, ["prompts", "encode", "--teacher", str(tiny_teacher_dir), "--prompts",
                                      str(prompt_file), "--output", str(store), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    run = distill(tiny_config(tiny_teacher_dir, prompt_file, tmp_path / "run", iterations=2, validate_every=0,
                              embeddings=str(store)))
    assert [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()] == [1, 2]
    missing = CliRunner().invoke(app, ["distill", "--teacher", str(tiny_teacher_dir), "--prompts", str(prompt_file),
                                       "--embeddings", str(tmp_path / "nowhere"), "--dry-run"])
    assert missing.exit_code == 2 and "Traceback" not in missing.output
