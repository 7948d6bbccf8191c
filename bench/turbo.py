"""Turbo on the embedded toy model: the distilled student (its LoRA, the turbo preset: 4 Euler steps, the prompt pass
alone) against the teacher (the toy model at its defaults: 25 steps, three-pass guidance), and against the same
4-step preset without the LoRA (what distillation has to beat), on held-out cases × seeds, side by side in one
process.

Per configuration: DiT evaluations per video (counted on the DiT), the denoising time and the whole wall time per
video (medians; the wall adds the text encoder, the references' VAE encoding and the decoding), the world judge's
accuracy, confusion and mean attribute accuracy (shape, pattern, colours per lane; more signal than whole-subject
accuracy on this undertrained toy), each a mean over cases with a 95 % bootstrap interval, and the latent RMSE to the
teacher from the same noise.

    python bench/turbo.py --student runs/toy_turbo/lora.safetensors [--compare OTHER.safetensors ...]
        [--cases 24] [--seeds 3]

`--compare` adds other students (e.g. another distillation recipe) to the table. Prints, for `--student`,
`relative accuracy: <student ÷ teacher>` and, last, `ratio: <teacher wall ÷ student wall>`."""

import argparse
import json
import statistics
import time

import numpy as np

from refalign_core.inference.pipeline import RefAlignPipeline
from refalign_core.inference.sampler import with_preset
from refalign_core.models.lora import LoraSpec
from refalign_core.toy.cases import held_out_cases, interval, judged
from refalign_core.toy.demo import embedded_bundle
from refalign_core.toy.judge import HEADS, WorldJudge
from refalign_core.toy.world import caption


def dit_evaluations(dit) -> list[int]:
    """A counter of the DiT's evaluations (samples of every forward), filled from now on."""
    counts = [0]
    dit.register_forward_pre_hook(lambda module, args, kwargs: counts.__setitem__(0, counts[0] + args[0].shape[0]),
                                  with_kwargs=True)
    return counts


def run(pipe, settings, cases, seeds, judge, counts) -> dict:
    rows, walls, denoising, evaluations, latents = [], [], [], [], []
    for case in cases:
        per_seed = []
        for seed in range(seeds):
            marks = {}  # denoising runs from the first step's start (cancel_check) to the last step's end (callback)
            before, start = counts[0], time.perf_counter()
            result = pipe(caption(case["tracks"]), case["references"], negative_prompt="",
                          settings=settings.replace(seed=seed),
                          cancel_check=lambda: marks.setdefault("start", time.perf_counter()) and False,
                          callback=lambda *_: marks.__setitem__("end", time.perf_counter()))
            walls.append(time.perf_counter() - start)
            denoising.append(marks["end"] - marks["start"])
            evaluations.append(counts[0] - before)
            latents.append(result.latents)
            numbers = judged(judge(result.frames, case["subjects"]))
            numbers["attributes"] = float(np.mean([numbers[f"attribute_{a}"] for a in HEADS]))
            per_seed.append(numbers)
        rows.append({k: statistics.mean(r[k] for r in per_seed) for k in ("accuracy", "confusion", "attributes")})
    return {"rows": rows, "wall_median": statistics.median(walls), "denoise_median": statistics.median(denoising),
            "evaluations": statistics.median(evaluations), "latents": latents}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", required=True, help="the student LoRA (.safetensors)")
    parser.add_argument("--compare", action="append", default=[], metavar="LORA",
                        help="another student LoRA, shown in the table as `student: LORA`")
    parser.add_argument("--cases", type=int, default=24)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--json", help="write every number here")
    args = parser.parse_args(argv)
    pipe = RefAlignPipeline.from_bundle(embedded_bundle())
    counts = dit_evaluations(pipe.dit)
    judge = WorldJudge.load()
    teacher_settings = pipe.settings
    turbo_settings = with_preset(pipe.settings, "turbo")
    cases = held_out_cases(args.cases, teacher_settings.width, teacher_settings.num_frames)

    results = {"teacher": run(pipe, teacher_settings, cases, args.seeds, judge, counts),
               "turbo preset, no LoRA": run(pipe, turbo_settings, cases, args.seeds, judge, counts)}
    for name, path in [("student", args.student)] + [(f"student: {path}", path) for path in args.compare]:
        pipe.set_loras((LoraSpec(path, 1.0),))
        results[name] = run(pipe, turbo_settings, cases, args.seeds, judge, counts)
    pipe.set_loras(())

    teacher_latents = results["teacher"]["latents"]
    print(f"{args.cases} held-out cases × {args.seeds} seeds; teacher: {teacher_settings.steps} steps, three passes; "
          f"turbo: {turbo_settings.steps} steps, one pass\n")
    print("| config | DiT evaluations | denoising per video (median) | wall per video (median) | judge accuracy | "
          "confusion | attributes | latent RMSE to the teacher |\n|---|---|---|---|---|---|---|---|")
    summary = {}
    for name, result in results.items():
        cells = {}
        for key in ("accuracy", "confusion", "attributes"):
            cells[key] = interval([row[key] for row in result["rows"]])
        rmse = statistics.mean(float((a - b).pow(2).mean().sqrt()) for a, b in zip(result["latents"], teacher_latents))
        summary[name] = {**{k: list(v) for k, v in cells.items()}, "evaluations": result["evaluations"],
                         "wall_median": result["wall_median"], "denoise_median": result["denoise_median"],
                         "rmse_to_teacher": rmse}
        print(f"| {name} | {result['evaluations']:.0f} | {result['denoise_median']:.3f} s | "
              f"{result['wall_median']:.3f} s | " + " | ".join(
            f"{m:.3f} [{lo:.3f}, {hi:.3f}]" for m, lo, hi in cells.values()) + f" | {rmse:.3f} |")
    compared = [name for name in results if name.startswith("student: ")]
    if compared:
        print("\npaired difference per case to `student` (other − student) [95 % interval]:")
        for name in compared:
            print(f"- {name}: " + ", ".join(
                "{} {:+.3f} [{:+.3f}, {:+.3f}]".format(key, *interval(
                    [o[key] - s_[key] for o, s_ in zip(results[name]["rows"], results["student"]["rows"])]))
                for key in ("accuracy", "confusion", "attributes")))
    teacher, student = summary["teacher"], summary["student"]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cases": args.cases, "seeds": args.seeds, "student": args.student, "compare": args.compare,
                       "results": summary}, f, indent=1)
    ratio = lambda key: student[key][0] / teacher[key][0] if teacher[key][0] else float("nan")  # noqa: E731
    print(f"\nrelative attribute accuracy: {ratio('attributes'):.3f}")
    print(f"relative accuracy: {ratio('accuracy'):.3f}")
    print(f"denoising ratio: {teacher['denoise_median'] / student['denoise_median']:.2f}")
    print(f"ratio: {teacher['wall_median'] / student['wall_median']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
