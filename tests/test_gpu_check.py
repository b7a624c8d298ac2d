"""benchmarks/gpu_check.py runs every section with --tiny on the CPU and writes the JSON a GPU run fills; the SD1.5
configs of benchmarks/sd_random.py are the published ones; sd15_cpu.py's peak-memory reading is a child's own."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SECTIONS = ("build", "flops", "train_checkpointing_on", "train_checkpointing_off", "export", "sampling",
            "sdxl_train")


@pytest.fixture(scope="module")
def bench():
    """The benchmark scripts as modules (they import each other by name, as `python benchmarks/x.py` does)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(BENCHMARKS))
        import gpu_check
        import sd15_cpu
        import sd_random

        yield {"gpu_check": gpu_check, "sd15_cpu": sd15_cpu, "sd_random": sd_random}


@pytest.fixture(scope="module")
def tiny_check(bench, tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_check")
    out = root / "gpu_check.json"
    bench["gpu_check"].main(["--tiny", "--out", str(out), "--workdir", str(root / "work"), "--iterations", "2"])
    return json.loads(out.read_text())


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_rows_per_iteration_formula(bench):
    """(4K + 2) B forward rows with gamma_z > 0, (3K + 2) B without, plus 2B per fake update beyond the first
    (docs/BENCHMARKS.md); backward: the z-VJPs (K B, only when z moves), the M-step (B), each fake update (B)."""
    rows = bench["gpu_check"].emd_unet_rows
    for K, F, B in ((4, 5, 4), (1, 1, 1), (2, 5, 32), (8, 3, 2)):
        assert rows(K, 0.03, F, B) == ((4 * K + 2) * B + (F - 1) * 2 * B, (K + 1 + F) * B)
        assert rows(K, 0.0, F, B) == ((3 * K + 2) * B + (F - 1) * 2 * B, (1 + F) * B)
    assert rows(2, 0.0, 5, 32)[0] == 512  # the toy preset's figure in docs/BENCHMARKS.md
    assert rows(4, 0.03, 5, 4) == (104, 40)  # the GPU check's setting


def test_tiny_check_fills_every_section(tiny_check, bench):
    gpu_check = bench["gpu_check"]
    env = tiny_check["environment"]
    assert env["gpu"] is None and env["torch"] and env["diffusers"] and env["tiny"] is True
    assert tiny_check["goal"].startswith("peak memory <= 16 GiB")
    sections = tiny_check["sections"]
    assert tuple(sections) == SECTIONS
    for name, section in sections.items():
        assert "error" not in section and "skipped" not in section, (name, section)
        assert section["section_s"] >= 0

    assert positive(sections["flops"]["fwd_flops_per_row"])
    forward, backward = gpu_check.emd_unet_rows(gpu_check.K, gpu_check.GAMMA_Z, gpu_check.FAKE_UPDATES,
                                                gpu_check.BATCH)
    for checkpointing in ("on", "off"):
        train = sections[f"train_checkpointing_{checkpointing}"]
        assert train["gradient_checkpointing"] is (checkpointing == "on")
        assert train["measured_iterations"] == 1  # of 2: the first is the warm-up
        # the train loop's own count is the EMD count
        assert train["unet_rows_per_it"] == train["unet_rows_per_it_expected"] == forward == 104
        assert train["unet_backward_rows_per_it"] == train["unet_backward_rows_per_it_expected"] == backward == 40
        for key in ("s_per_it", "it_per_s", "unet_rows_per_s", "unet_forward_s", "unet_backward_s",
                    "train_flops_per_it", "achieved_flops", "run_wall_s"):
            assert positive(train[key]), (checkpointing, key, train[key])
        assert math.isfinite(train["other_s"])
        assert train["unet_forward_s"] + train["unet_backward_s"] <= train["s_per_it"] * 1.01
        assert train["train_flops_per_it"] == pytest.approx(
            sections["flops"]["fwd_flops_per_row"] * (forward + 2 * backward))
        assert train["peak_mem_gib"] is None and train["mfu"] is None  # CPU: no CUDA memory, no peak FLOP/s
        assert train["config"]["mixed_precision"] == "no" and train["config"]["profile"] is True

    sdxl = sections["sdxl_train"]
    assert sdxl["unet_rows_per_it"] == gpu_check.emd_unet_rows(4, 0.03, 5, 2, True)[0] and positive(sdxl["s_per_it"])
    sampling = sections["sampling"]
    assert sampling["one_step_model"].startswith("export")
    assert {(r["model"], r["batch"]) for r in sampling["rows"]} == {
        (m, b) for m in ("one_step", "teacher_25") for b in (1, 16)}
    for row in sampling["rows"]:
        assert positive(row["latency_s"]) and positive(row["images_per_s"])
        assert row["images_per_s"] == pytest.approx(row["batch"] / row["latency_s"])
    assert all(speedup > 1 for speedup in sampling["speedup_images_per_s"].values())  # 1 UNet row vs 50


def test_failed_section_is_recorded_and_the_rest_reported(bench, tmp_path, monkeypatch):
    gpu_check = bench["gpu_check"]

    def broken(c):
        raise RuntimeError("no disk")

    monkeypatch.setattr(gpu_check, "section_build", broken)
    out = tmp_path / "broken.json"
    gpu_check.main(["--tiny", "--out", str(out), "--workdir", str(tmp_path / "work")])
    sections = json.loads(out.read_text())["sections"]
    assert sections["build"]["error"] == "RuntimeError: no disk" and sections["build"]["traceback"]
    assert all("skipped" in sections[name] for name in SECTIONS[1:-1])
    assert "error" not in sections["sdxl_train"]  # SDXL builds its own teacher


def test_budget_stops_new_sections(bench, tmp_path):
    out = tmp_path / "budget.json"
    bench["gpu_check"].main(["--tiny", "--out", str(out), "--workdir", str(tmp_path / "work"), "--budget-s", "0"])
    sections = json.loads(out.read_text())["sections"]
    assert all(sections[name]["skipped"].startswith("budget") for name in SECTIONS)


def test_peak_bf16_flops_table(bench):
    peak = bench["gpu_check"].peak_bf16_flops
    assert peak("NVIDIA H200") == peak("NVIDIA H100 80GB HBM3") == 989e12
    assert peak("NVIDIA H100 PCIe") == 756e12 and peak("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak("NVIDIA L40S") == 362e12 and peak("NVIDIA GeForce RTX 4090") == 165e12
    assert peak("NVIDIA H100 NVL") is None and peak("Tesla T4") is None


@pytest.fixture(scope="module")
def sd15_parts(bench):
    """SD1.5's components on the meta device (no memory); build_sd15 asserts the published parameter counts."""
    return bench["sd_random"].build_sd15(device="meta")


@pytest.fixture(scope="module")
def sd15_config_folder(sd15_parts, tmp_path_factory):
    """A pipeline folder with SD1.5's JSON configs and no weights: enough for its preset and --dry-run."""
    folder = tmp_path_factory.mktemp("sd15_configs") / "teacher"
    for name in ("unet", "vae", "scheduler"):
        sd15_parts[name].save_config(folder / name)
    sd15_parts["text_encoder"].config.save_pretrained(folder / "text_encoder")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (folder.parent / "prompts.txt").write_text("a red fox\n")
    return folder


def test_sd15_configs_have_the_published_parameter_counts(bench, sd15_parts):
    sd_random = bench["sd_random"]
    assert {k: sd_random.parameter_count(sd15_parts[k]) for k in sd_random.SD15_PARAMETERS} == {
        "unet": 859_520_964, "text_encoder": 123_060_480, "vae": 83_653_863}
    assert sd15_parts["scheduler"].config.steps_offset == 1 and sd15_parts["scheduler"].config.skip_prk_steps
    assert sd15_parts["tokenizer"].model_max_length == 77


@pytest.mark.parametrize("setting", ["minimal", "defaults"])
def test_sd15_cpu_flags_are_accepted_over_the_sd15_preset(bench, sd15_config_folder, setting, tmp_path):
    """The real-size benchmark's `emd-t2i distill` arguments pass the CLI's checks over the sd-1.5 preset."""
    from typer.testing import CliRunner

    from emd_t2i.cli import app

    sd15_cpu = bench["sd15_cpu"]
    args = sd15_cpu.distill_args(setting, sd15_config_folder, sd15_config_folder.parent / "prompts.txt",
                                 tmp_path / "run", 2)
    result = CliRunner().invoke(app, args + ["--dry-run"])
    assert result.exit_code == 0, result.output
    config = json.loads(result.output[: result.output.rindex("}") + 1])
    K, gamma_z, fake_updates = sd15_cpu.SETTINGS[setting]
    assert (config["num_langevin_steps"], config["gamma_z"], config["fake_updates"]) == (K, gamma_z, fake_updates)
    assert config["batch_size"] == 1 and config["profile"] and config["gradient_checkpointing"]
    assert "preset: sd-1.5" in result.output


def test_gpu_check_config_over_the_sd15_preset(bench, sd15_config_folder, tmp_path):
    gpu_check = bench["gpu_check"]
    import torch

    check = gpu_check.Check(tiny=False, device="cuda", dtype=torch.bfloat16, workdir=sd15_config_folder.parent,
                            iterations=3, teacher=sd15_config_folder)
    for checkpointing in (True, False):
        cfg = gpu_check._distill_config(check, tmp_path / "run", checkpointing)
        assert (cfg.batch_size, cfg.num_langevin_steps, cfg.gamma_z, cfg.fake_updates) == (4, 4, 0.03, 5)
        assert cfg.mixed_precision == "bf16" and cfg.gradient_checkpointing is checkpointing and cfg.profile
        assert "conv_in" in cfg.target_modules  # the sd-1.5 preset underneath


def test_run_measured_reads_the_child_peak_rss(tmp_path):
    """os.wait4's ru_maxrss is a child's peak (KiB on Linux), floored at its parent's own peak, which Linux carries
    through fork and exec: so the reading runs under a fresh python that imports sd15_cpu alone (no torch), as
    the benchmark's parent does, and a child that holds 200 MB reads about that."""
    child = "import time; b = bytearray(200 * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(0.5)"
    parent = (f"import json, sys; from pathlib import Path; sys.path.insert(0, {str(BENCHMARKS)!r}); import sd15_cpu; "
              f"assert 'torch' not in sys.modules; print(json.dumps(sd15_cpu.run_measured([sys.executable, '-c', "
              f"{child!r}], Path({str(tmp_path / 'child.log')!r}), None)))")
    out = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.splitlines()[-1])
    mib = 2**20
    assert result["rc"] == 0 and 200 * mib <= result["peak_rss_bytes"] < 300 * mib
    assert result["vm_hwm_bytes"] == pytest.approx(result["peak_rss_bytes"], rel=0.02)  # /proc agrees
