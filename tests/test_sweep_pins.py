"""Every recorded sweep point is what toy_sweep.sh would run today: its pins, not the moving toy preset, fix it."""

import importlib.util
import json
import subprocess
from pathlib import Path

from emd_t2i.training.config import build_config

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "benchmarks" / "results" / "sweep"


def parse_sets():
    spec = importlib.util.spec_from_file_location("toy_quality", ROOT / "benchmarks" / "toy_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.parse_sets


def test_recorded_sweep_points_keep_their_config():
    parse = parse_sets()
    lines = subprocess.run(["bash", str(ROOT / "benchmarks" / "toy_sweep.sh"), "--print"], check=True,
                           capture_output=True, text=True).stdout.splitlines()
    checked = 0
    for line in lines:
        name, stage, flags = line.split("|", 2)
        recorded = SWEEP / f"{name}_{stage}.json"
        if not recorded.exists():
            continue
        words = flags.split()  # bash splits the unquoted expansion on whitespace only, quotes stay literal
        sets = [words[i + 1] for i, word in enumerate(words) if word == "--set"]
        now = build_config(teacher="toy", iterations=int(stage), **parse(sets)).to_dict()
        ran = json.loads(recorded.read_text())["emd"]["config"]
        drift = {k: (v, now[k]) for k, v in ran.items() if json.dumps(now[k]) != json.dumps(v)}
        assert not drift, f"{recorded.name}: ran with / would now run with {drift}"
        checked += 1
    assert checked >= 60  # the sweep's recorded points, all of them read
