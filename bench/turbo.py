"""Turbo on the embedded toy model: the distilled student (its LoRA, the turbo preset: 4 Euler steps, the prompt pass
alone) against the teacher (the toy model at its defaults: 25 steps, three-pass guidance), and against the same
4-step preset without the LoRA (what distillation has to beat), on held-out cases × seeds, side by side in one
process.

Per configuration: DiT evaluations per video (counted on the DiT), the denoising time and the whole wall time per
video (medians; the wall adds the text encoder, the references' VAE encoding and the decoding, which also caps the
wall ratio: it prints the ratio a student with a free denoiser would get), the world judge's
accuracy, confusion and mean attribute accuracy (shape, pattern, colours per lane; more signal than whole-subject
accuracy on this undertrained toy), each a mean over cases with a 95 % bootstrap interval, and the latent RMSE to the
teacher from the same noise. A first row judges each case's own world clip after the toy VAE's encode and decode:
the ceiling any DiT is held to on this VAE.

    python bench/turbo.py --student runs/toy_turbo/lora.safetensors [--compare OTHER.safetensors ...]
        [--cases 24] [--seeds 3]

`--compare` adds other students (e.g. another distillation recipe) to the table. Prints the per-case paired
difference student − teacher (and other − student), then, for `--student`, `relative accuracy: <student ÷ teacher>`
with the 95 % interval of that ratio over cases (bootstrap, paired) and, last, `ratio: <teacher wall ÷ student
wall>`."""

import argparse
import json
import statistics
import time

import numpy as np

from refalign_core.inference.pipeline import RefAlignPipeline
from refalign_core.inference.sampler import with_preset
from refalign_core.models.lora import LoraSpec
from refalign_core.toy.cases import held_out_cases, interval, judged, ratio_interval
from refalign_core.toy.demo import embedded_bundle
from refalign_core.toy.judge import HEADS, WorldJudge, through_vae
from refalign_core.toy.world import caption


def dit_evaluations(dit) -> list[int]:
    """A counter of the DiT's evaluations (samples of every forward), filled from now on."""
    counts = [0]
    dit.register_forward_pre_hook(lambda module, args, kwargs: counts.__setitem__(0, counts[0] + args[0].shape[0]),
                                  with_kwargs=True)
    return counts


METRICS = ("accuracy", "confusion", "attributes")


def scored(judge, frames, subjects) -> dict[str, float]:
    numbers = judged(judge(frames, subjects))
    numbers["attributes"] = float(np.mean([numbers[f"attribute_{a}"] for a in HEADS]))
    return {key: numbers[key] for key in METRICS}


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
            per_seed.append(scored(judge, result.frames, case["subjects"]))
        rows.append({k: statistics.mean(r[k] for r in per_seed) for k in METRICS})
    return {"rows": rows, "wall_median": statistics.median(walls), "denoise_median": statistics.median(denoising),
            "other_median": statistics.median(w - d for w, d in zip(walls, denoising)),
            "evaluations": statistics.median(evaluations), "latents": latents}


def paired(others: list[dict], base: list[dict]) -> str:
    """Per-case differences (other − base) of every metric, with 95 % intervals."""
    return ", ".join("{} {:+.3f} [{:+.3f}, {:+.3f}]".format(key, *interval([o[key] - b[key] for o, b in zip(others, base)]))
                     for key in METRICS)


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

    # the world's own clip of each case through the toy VAE: what a DiT with perfect latents could score
    ceiling = [scored(judge, through_vae(pipe.vae, case["truth"]), case["subjects"]) for case in cases]

    teacher_latents = results["teacher"]["latents"]
    print(f"{args.cases} held-out cases × {args.seeds} seeds; teacher: {teacher_settings.steps} steps, three passes; "
          f"turbo: {turbo_settings.steps} steps, one pass\n")
    print("| config | DiT evaluations | denoising per video (median) | wall per video (median) | judge accuracy | "
          "confusion | attributes | latent RMSE to the teacher |\n|---|---|---|---|---|---|---|---|")
    intervals = lambda rows: {key: list(interval([row[key] for row in rows])) for key in METRICS}  # noqa: E731
    cells = lambda numbers: " | ".join("{:.3f} [{:.3f}, {:.3f}]".format(*numbers[k]) for k in METRICS)  # noqa: E731
    summary = {"ceiling": intervals(ceiling)}
    print(f"| world clip through the toy VAE (ceiling) | | | | {cells(summary['ceiling'])} | |")
    for name, result in results.items():
        rmse = statistics.mean(float((a - b).pow(2).mean().sqrt()) for a, b in zip(result["latents"], teacher_latents))
        summary[name] = {**intervals(result["rows"]), "evaluations": result["evaluations"],
                         "wall_median": result["wall_median"], "denoise_median": result["denoise_median"],
                         "other_median": result["other_median"], "rmse_to_teacher": rmse}
        print(f"| {name} | {result['evaluations']:.0f} | {result['denoise_median']:.3f} s | "
              f"{result['wall_median']:.3f} s | {cells(summary[name])} | {rmse:.3f} |")
    teacher_rows, student_rows = results["teacher"]["rows"], results["student"]["rows"]
    print("\npaired difference per case [95 % interval]:")
    print(f"- student − teacher: {paired(student_rows, teacher_rows)}")
    for name in (name for name in results if name.startswith("student: ")):
        print(f"- {name} − student: {paired(results[name]['rows'], student_rows)}")
    relative = {key: ratio_interval([row[key] for row in student_rows], [row[key] for row in teacher_rows])
                for key in ("attributes", "accuracy")}
    teacher, student = summary["teacher"], summary["student"]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cases": args.cases, "seeds": args.seeds, "student": args.student, "compare": args.compare,
                       "results": summary, "relative": relative}, f, indent=1)
    print("\nrelative attribute accuracy: {:.3f} [{:.3f}, {:.3f}]".format(*relative["attributes"]))
    print("relative accuracy: {:.3f} [{:.3f}, {:.3f}]".format(*relative["accuracy"]))
    print(f"denoising ratio: {teacher['denoise_median'] / student['denoise_median']:.2f}")
    # the text encoder, reference encoding and decode are the same for both: the wall ratio cannot pass this
    print(f"student's work besides denoising: {student['other_median']:.3f} s per video; ratio with a free "
          f"denoiser: {teacher['wall_median'] / student['other_median']:.2f}")
    print(f"ratio: {teacher['wall_median'] / student['wall_median']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
