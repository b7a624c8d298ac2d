"""The embedded toy teacher: a procedural captioned domain, its training recipe, its weights and its metrics."""

from pathlib import Path

TEACHER_DIR = Path(__file__).parent / "teacher"
CLASSIFIER_PATH = Path(__file__).parent / "classifier.safetensors"
