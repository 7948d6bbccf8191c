"""The toy-bundle recipe (train/make_toy_bundle.py) and the ablation script run end to end (at a tiny scale)."""

import json
import subprocess
import sys
from pathlib import Path

import torch

from refalign_core.pipeline import RefAlignPipeline

ROOT = Path(__file__).parents[1]


def run_recipe(out: Path) -> dict:
    result = subprocess.run([sys.executable, str(ROOT / "train" / "make_toy_bundle.py"), "--out", str(out / "m"),
                             "--work", str(out / "w"), "--scale", "0.005"], capture_output=True, text=True,
                            cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads((out / "m" / "refalign_toy" / "recipe.json").read_text())


def test_recipe_runs_end_to_end_at_a_tiny_scale(tmp_path):
    record = run_recipe(tmp_path)
    full = json.loads(json.dumps(__import__("make_toy_bundle").RECIPE))
    assert record["recipe"]["train"]["max_steps"] == max(2, int(full["train"]["max_steps"] * 0.005))
    assert record["recipe"]["dit"] == full["dit"] and record["sha256"]
    pipe = RefAlignPipeline.from_bundle(tmp_path / "m" / "refalign_toy_baseline")
    frames = pipe("a red plain disc moves right", [torch.rand(32, 32, 3)], steps=2, num_frames=5).frames
    assert frames.shape == (5, 64, 64, 3)
    ablation = subprocess.run([sys.executable, str(ROOT / "train" / "ablation_toy.py"), "--models", str(tmp_path / "m"),
                               "--out", str(tmp_path / "ab"), "--cases", "2", "--seeds", "2", "--steps", "2"],
                              capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert ablation.returncode == 0, ablation.stderr[-2000:]
    table = (tmp_path / "ab" / "ablation.md").read_text()
    assert "| RefAlign |" in table and "| baseline |" in table and "RefAlign − baseline" in table
    summary = json.loads((tmp_path / "ab" / "ablation.json").read_text())["summary"]
    assert set(summary["RefAlign"]) == {"identity", "confusion", "copy_paste", "motion"}
