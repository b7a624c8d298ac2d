"""Shared pytest setup: offline hub, two CPU threads, and one tiny SD teacher folder per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
# `pytest` (unlike `python -m pytest`) does not put the repo root on sys.path; make emd_t2i importable
# from a plain checkout as well as from an editable install.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import pytest
import torch

torch.set_num_threads(1)  # tiny models gain nothing from 2 threads; with the CPU shared, OpenMP spin-waits made a 3 s run take 165 s


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory):
    """A tiny epsilon-prediction SD pipeline folder (see tests/tiny.py), built once per test session."""
    from tiny import make_tiny_pipeline

    return make_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "teacher")


@pytest.fixture(scope="session")
def tiny_vpred_teacher_dir(tmp_path_factory):
    """The same tiny pipeline with a v-prediction scheduler (the SD 2.1-768 case)."""
    from tiny import make_tiny_pipeline

    return make_tiny_pipeline(tmp_path_factory.mktemp("tiny_v") / "teacher", prediction_type="v_prediction")


TRAIN_PROMPTS = ["a cat", "a dog on a beach", "a red car at night", "an old castle", "a bowl of fruit"]


@pytest.fixture(scope="session")
def prompt_file(tmp_path_factory):
    """A small prompt file for training runs on the tiny teacher."""
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(TRAIN_PROMPTS) + "\n\n")
    return path


@pytest.fixture(scope="session")
def tiny_sdxl_teacher_dir(tmp_path_factory):
    """A tiny SDXL-shaped pipeline folder (two text encoders, pooled embeds and time ids; see tests/tiny.py)."""
    from tiny import make_tiny_sdxl_pipeline

    return make_tiny_sdxl_pipeline(tmp_path_factory.mktemp("tiny_sdxl") / "teacher")
