"""Toy-scale ablation: does the RA loss help on subjects never seen in training?

    python train/ablation_toy.py --models models --out ablation [--cases 24] [--seeds 3]

Held-out toy-world cases (2–3 subjects each, held-out identities, their references and captions) are generated with
the RefAlign toy model and the baseline (same data and steps, RA off) over several seeds and scored with the identity
check (EfficientNet-Lite0): identity similarity (mean over subjects), confusion rate (videos with a confusion
flag), copy-paste rate, motion amplitude. Per model: mean and 95 % interval over cases (each case averaged over
seeds); also the paired difference RefAlign − baseline. Writes `ablation.json` and `ablation.md`."""

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from refalign_core.identity import IdentitySettings, check_identity
from refalign_core.pipeline import RefAlignPipeline
from refalign_core.references import Reference
from refalign_core.toy_world import make_toy_world
from refalign_core.training.data import SkipCounter
from refalign_core.training.datasets import read_jsonl
from refalign_core.video_io import load_image
from refalign_core.vfm import load_vfm

METRICS = {"identity": "identity similarity ↑", "confusion": "confusion rate ↓", "copy_paste": "copy-paste rate ↓",
           "motion": "motion amplitude"}


def interval(values) -> tuple[float, float, float]:
    """Mean and 95 % interval (normal approximation, t for small n)."""
    values = np.asarray(values, dtype=float)
    mean = float(values.mean())
    if len(values) < 2:
        return mean, mean, mean
    t = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78, 6: 2.57, 8: 2.36, 10: 2.26, 16: 2.13, 24: 2.07, 32: 2.04}
    q = t.get(len(values), 1.96 if len(values) > 32 else 2.1)
    half = q * values.std(ddof=1) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def score_case(pipe, entry, seed, steps, vfm):
    refs = [load_image(r.views[0].image) for r in entry.references]
    masks = [load_image(r.views[0].mask).convert("L") for r in entry.references]
    result = pipe(entry.caption, [Reference(image, mask) for image, mask in zip(refs, masks)], negative_prompt="",
                  seed=seed, steps=steps)
    report = check_identity(refs, result.frames, vfm, masks=masks, names=[r.subject for r in entry.references],
                            settings=IdentitySettings(sample_frames=17))
    return {"identity": report.overall, "confusion": float(bool(report.confusion_flags)),
            "copy_paste": float(bool(report.copy_paste_flags)), "motion": report.motion_amplitude}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="models", help="folder holding refalign_toy/ and refalign_toy_baseline/")
    parser.add_argument("--out", default="ablation")
    parser.add_argument("--cases", type=int, default=24)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, help="sampling steps (default: the bundle's)")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    world = make_toy_world(Path(tempfile.mkdtemp(prefix="toy_held_out_")), num_videos=args.cases, split="held_out",
                           seed=1, min_subjects=2)
    entries = read_jsonl(world, SkipCounter())
    vfm = load_vfm("efficientnet-lite0")
    models = {"RefAlign": Path(args.models) / "refalign_toy", "baseline": Path(args.models) / "refalign_toy_baseline"}
    scores = {}
    start = time.perf_counter()
    for name, folder in models.items():
        pipe = RefAlignPipeline.from_bundle(folder)
        steps = args.steps or pipe.settings.steps
        scores[name] = [[score_case(pipe, e, seed, steps, vfm) for seed in range(args.seeds)]
                        for e in tqdm(entries, desc=name, unit="case")]
    per_case = {name: {m: [float(np.mean([s[m] for s in case])) for case in cases] for m in METRICS}
                for name, cases in scores.items()}
    summary = {name: {m: interval(v) for m, v in metrics.items()} for name, metrics in per_case.items()}
    summary["RefAlign − baseline"] = {m: interval(np.subtract(per_case["RefAlign"][m], per_case["baseline"][m]))
                                      for m in METRICS}
    lines = [f"Held-out toy world: {args.cases} cases × {args.seeds} seeds, 2–3 unseen subjects each; mean [95 % "
             "interval over cases].", "", "| model | " + " | ".join(METRICS.values()) + " |",
             "|---|" + "---|" * len(METRICS)]
    for name, metrics in summary.items():
        lines.append(f"| {name} | " + " | ".join(f"{m:.3f} [{lo:.3f}, {hi:.3f}]" for m, lo, hi in metrics.values())
                     + " |")
    table = "\n".join(lines) + "\n"
    (out / "ablation.md").write_text(table)
    (out / "ablation.json").write_text(json.dumps({"cases": args.cases, "seeds": args.seeds, "summary": summary,
                                                   "per_case": per_case, "seconds": time.perf_counter() - start},
                                                  indent=1))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
