"""The embedded toy teacher: a procedural captioned domain, its weights, and its metrics (its training recipe is
tools/train_toy_teacher.py in a checkout)."""

from pathlib import Path

TEACHER_DIR = Path(__file__).parent / "teacher"
CLASSIFIER_PATH = Path(__file__).parent / "classifier.safetensors"
