"""Extension quality on the embedded toy model: the demo case as a video of several segments (each continuing the
last frame of the one before), for each seam choice with and without colour matching, over a few seeds.

Per segment: the world judge's accuracy (the right subject in its lane, per frame) and the Identity Check, each on
the segment's own frames (its held first frame included), and the colour drift (mean |RGB mean − segment 1's|, in
0–255 steps). Seams: every frame difference (mean |frame t+1 − frame t|) where a segment's new frames begin, against
the median difference inside segments, and against segment 1's own first step (frame 0 → 1, where the causal VAE's
lone first frame meets the first group of four: every seam is such a step of its clip). Numbers are means over the
seeds.

    python bench/extension_quality.py [--segments 3] [--seeds 3] [--json out.json]

The last line is the default configuration's (`--seam pixels`, colour matching on):
`seam ratio: <max frame-difference at a seam ÷ median frame-difference inside segments>`."""

import argparse
import json
import statistics
import time

import torch

from refalign_core.inference.extension import SEAMS, Extension
from refalign_core.inference.pipeline import RefAlignPipeline
from refalign_core.metrics.identity import IdentitySettings, check_identity
from refalign_core.models.vfm import load_vfm
from refalign_core.toy.demo import DEMO_NAMES, DEMO_PROMPT, DEMO_TRACKS, demo_references, embedded_bundle
from refalign_core.toy.judge import WorldJudge

OVERLAP = 1  # the toy clip has 5 frames: one held frame leaves 4 new ones per segment


def segment_windows(extension: Extension, num_frames: int) -> list[slice]:
    """Each segment's frames in the joined video (a later one starts at its held frames)."""
    step = num_frames - extension.overlap
    return [slice(index * step, index * step + num_frames) for index in range(extension.segments)]


def seam_ratio(frames: torch.Tensor, extension: Extension, num_frames: int) -> tuple[float, list[float], float]:
    """(max seam difference ÷ median inside difference, the seam differences, that median); difference t is
    mean |frame t+1 − frame t| in [0, 1] units."""
    differences = (frames[1:] - frames[:-1]).abs().mean(dim=(1, 2, 3)).tolist()
    step = num_frames - extension.overlap
    seams = [index * step + num_frames - 1 for index in range(extension.segments - 1)]
    inside = statistics.median(d for t, d in enumerate(differences) if t not in seams)
    seam_differences = [differences[t] for t in seams]
    return max(seam_differences) / inside, seam_differences, inside


def score(frames, extension, num_frames, judge, vfm, references) -> dict:
    subjects = [track.subject for track in DEMO_TRACKS]
    windows = segment_windows(extension, num_frames)
    base = frames[windows[0]].mean(dim=(0, 1, 2))
    per_segment = []
    for window in windows:
        clip = frames[window]
        identity = check_identity(references, clip, vfm, names=list(DEMO_NAMES),
                                  settings=IdentitySettings(sample_frames=len(clip)))
        per_segment.append({"judge": judge(clip, subjects, list(DEMO_NAMES)).accuracy,
                            "identity": identity.overall,
                            "color_drift": float((clip.mean(dim=(0, 1, 2)) - base).abs().mean() * 255)})
    ratio, seams, inside = seam_ratio(frames, extension, num_frames)
    # a seam is frame 0 → 1 of the new clip; segment 1's own frame 0 → 1 step is the model's, with no seam
    first_step = float((frames[1] - frames[0]).abs().mean())
    return {"segments": per_segment, "seam_ratio": ratio, "seam_differences": seams, "inside_median": inside,
            "seam_to_first_step": max(seams) / first_step}


def mean_over_seeds(runs: list[dict]) -> dict:
    count = len(runs[0]["segments"])
    return {"segments": [{key: statistics.mean(run["segments"][i][key] for run in runs)
                          for key in runs[0]["segments"][0]} for i in range(count)],
            "seam_ratio": statistics.mean(run["seam_ratio"] for run in runs),
            "seam_to_first_step": statistics.mean(run["seam_to_first_step"] for run in runs),
            "seam_ratio_worst": max(run["seam_ratio"] for run in runs)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--segments", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, help="sampling steps (default: the toy bundle's)")
    parser.add_argument("--json", help="write every number here")
    args = parser.parse_args(argv)
    if args.segments < 2:
        parser.error("--segments: at least 2 (seams are what this measures)")
    pipe = RefAlignPipeline.from_bundle(embedded_bundle())
    settings = pipe.settings if args.steps is None else pipe.settings.replace(steps=args.steps)
    judge, vfm, references = WorldJudge.load(), load_vfm(), demo_references()
    results, start = {}, time.perf_counter()
    for seam in SEAMS:
        for color_match in (False, True):
            extension = Extension(segments=args.segments, overlap=OVERLAP, seam=seam, color_match=color_match)
            runs = [score(pipe(DEMO_PROMPT, references, negative_prompt="", settings=settings.replace(seed=seed),
                               extension=extension).frames, extension, settings.num_frames, judge, vfm, references)
                    for seed in range(args.seeds)]
            results[f"{seam}, colour match {'on' if color_match else 'off'}"] = mean_over_seeds(runs)
    print(f"{args.segments} segments of the demo case ({settings.num_frames} frames, overlap {OVERLAP}, "
          f"{settings.steps} steps), mean of {args.seeds} seeds, {time.perf_counter() - start:.0f} s\n")
    print("| seam, colour match | segment | judge | identity | colour drift (0–255) |\n|---|---|---|---|---|")
    for name, result in results.items():
        for index, segment in enumerate(result["segments"], start=1):
            print(f"| {name} | {index} | {segment['judge']:.0%} | {segment['identity']:.3f} | "
                  f"{segment['color_drift']:.2f} |")
    print()
    for name, result in results.items():
        first = result["segments"][0]
        worst = max(abs(s["judge"] - first["judge"]) for s in result["segments"][1:]) * 100
        print(f"{name}: seam ratio {result['seam_ratio']:.2f} (worst seed {result['seam_ratio_worst']:.2f}), "
              f"largest seam ÷ segment 1's own frame 0→1 step {result['seam_to_first_step']:.2f}; judge within "
              f"{worst:.0f} points of segment 1")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": settings.to_dict(), "segments": args.segments, "seeds": args.seeds,
                       "overlap": OVERLAP, "results": results}, f, indent=1)
    print(f"seam ratio: {results['pixels, colour match on']['seam_ratio']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
