"""The recipe for the embedded toy model's turbo student: one command, CPU, fixed seed.

    python train/make_toy_turbo.py [--out refalign_core/toy/models/refalign_toy_turbo] [--work DIR]

Trains `train/configs/toy_turbo.yaml` (LoRA adapters on the shipped RefAlign toy model, distilled from it at its
defaults into the turbo preset: `refalign_core.training.distill`) in `--work` (an interrupted run resumes there
bit-exactly), then writes `lora.safetensors` and `recipe.json` (the config, the training time and the file's SHA-256)
to `--out`."""

import argparse
import csv
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from refalign_core.toy.demo import SHIPPED_TURBO
from refalign_core.training import load_training_config, train

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "train" / "configs" / "toy_turbo.yaml"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(SHIPPED_TURBO.parent), help="folder for lora.safetensors + recipe.json")
    parser.add_argument("--work", help="training folder (default: a temporary one); a rerun resumes there")
    args = parser.parse_args(argv)
    work = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="toy-turbo-"))
    out = Path(args.out).resolve()
    os.chdir(ROOT)  # the config names its model files from the repository's root
    config = load_training_config(CONFIG)
    start = time.perf_counter()
    result = train(config, work, resume=(work / "checkpoints").is_dir())
    seconds = sum(float(row["seconds"]) for row in csv.DictReader((work / "log.csv").open()))
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(result.files["lora"], out / "lora.safetensors")
    record = {"command": "python train/make_toy_turbo.py", "config": load_training_config(CONFIG).to_dict(),
              "training_seconds": round(seconds), "this_run_seconds": round(time.perf_counter() - start),
              "sha256": {"lora.safetensors": hashlib.sha256((out / "lora.safetensors").read_bytes()).hexdigest()}}
    (out / "recipe.json").write_text(json.dumps(record, indent=1))
    print(f"turbo student: {out / 'lora.safetensors'} ({seconds / 60:.0f} min of training steps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
