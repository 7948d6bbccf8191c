"""The toy-bundle recipe (train/make_toy_bundle.py) and the ablation script run end to end (at a tiny scale)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from refalign_core.inference.pipeline import RefAlignPipeline

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parents[2]
SCALE = 0.002  # every step / clip count of the recipe times this (at least 2)


def run_recipe(out: Path, *extra: str) -> tuple[dict, str]:
    result = subprocess.run([sys.executable, str(ROOT / "train" / "make_toy_bundle.py"), "--out", str(out / "m"),
                             "--work", str(out / "w"), "--scale", str(SCALE), *extra], capture_output=True, text=True,
                            cwd=ROOT, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads((out / "m" / "refalign_toy" / "recipe.json").read_text()), result.stdout


def test_recipe_runs_end_to_end_at_a_tiny_scale_and_a_rerun_reuses_every_finished_stage(tmp_path):
    record, _ = run_recipe(tmp_path, "--ablation-models", str(tmp_path / "extra"))
    again, log = run_recipe(tmp_path, "--ablation-models", str(tmp_path / "extra"))
    assert all(f"{stage}: reusing" in log for stage in ("world", "autoencoders", "judge", "teacher"))
    assert again["sha256"] == record["sha256"]  # the DiTs resume from their last checkpoint: the same files
    assert again["wall_seconds"]["vae_s"] == record["wall_seconds"]["vae_s"]  # the time of the run that built it
    full = json.loads(json.dumps(__import__("make_toy_bundle").RECIPE))
    assert record["recipe"]["train"]["max_steps"] == max(2, int(full["train"]["max_steps"] * SCALE))
    assert record["recipe"]["dit"] == full["dit"] and record["sha256"]
    assert {"judge.safetensors", "teacher.safetensors"} <= set(record["sha256"])
    assert set(record["teachers"]) == {"toy teacher", "efficientnet-lite0"}
    assert 0 <= record["judge_calibration"]["accuracy"] <= 1
    assert 0 <= record["judge_calibration_through_vae"]["accuracy"] <= 1
    assert record["judge_calibration_through_vae"]["clips"] == record["recipe"]["calibration_clips"] == 2
    assert sorted(p.name for p in (tmp_path / "extra").iterdir()) == sorted(
        __import__("make_toy_bundle").ABLATION)
    pipe = RefAlignPipeline.from_bundle(tmp_path / "m" / "refalign_toy_baseline")
    assert pipe.text_encoder.length == full["text_length"]
    frames = pipe("a disc moves right", [torch.rand(32, 32, 3)], steps=2, num_frames=5).frames
    assert frames.shape == (5, 128, 128, 3)
    ablation = subprocess.run([sys.executable, str(ROOT / "train" / "ablation_toy.py"), "--models", str(tmp_path / "m"),
                               "--ablation-models", str(tmp_path / "extra"), "--out", str(tmp_path / "ab"),
                               "--cases", "2", "--seeds", "2", "--steps", "2", "--views", "2"],
                              capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert ablation.returncode == 0, ablation.stderr[-2000:]
    assert ablation.stdout.strip().splitlines()[-1].startswith("confusion RefAlign - baseline: ")
    table = (tmp_path / "ab" / "ablation.md").read_text()
    for row in ("| RefAlign |", "| baseline |", "| positive-only RA |", "| RefAlign, EfficientNet teacher |",
                "| world clip (judge ceiling) |",
                "| world clip through the VAE (DiT ceiling) |", "| RefAlign (seeds 0+1) − baseline (seeds 0+1) |",
                "| toy teacher (teacher) |", "| EfficientNet-Lite0 (teacher) |", "| RefAlign, block 1 |",
                "| baseline, block 5 |"):
        assert row in table, row
    result = json.loads((tmp_path / "ab" / "ablation.json").read_text())
    per_case = result["generation"]["per_case"]
    assert len(per_case["RefAlign"]) == 2
    assert set(per_case["RefAlign"][0]) == {"accuracy", "confusion", "top_lane", "lower_lanes", "attribute_shape",
                                            "attribute_pattern", "attribute_colours"}
    retrieval = result["representation"]["per_subject"]["toy teacher (teacher)"]["retrieval"]
    assert len(retrieval) == 24 and all(0 <= r <= 1 for r in retrieval)
