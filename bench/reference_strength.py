"""Reference strength on held-out toy cases: how the shipped toy model's output follows `reference_strength`.

    python bench/reference_strength.py [--cases 16] [--seeds 2] [--steps N] [--threads 2]
                                       [--out reference_strength.json]

The embedded toy bundle at its default settings (or `--steps`), on the held-out cases of `train/ablation_toy.py`
(`refalign_core.toy.cases`: 2–3 subjects never seen in training, their own references and captions; the first n
cases are the same for any `--cases` ≥ n), each sampled with seeds 0 … S−1 (negative prompt "") at reference
strength 0, 0.5, 1, 1.5 and 2, and scored as the demo scores its video: the world judge (accuracy: the fraction of
frames with the right subject in its lane; confusion: the fraction whose lane shows another reference's attribute)
and the Identity Check (overall, EfficientNet-Lite0, every frame). Each case is averaged over seeds; mean and 95 %
percentile-bootstrap interval over cases, and each strength's paired difference from strength 1 (the default). One
more row: the world's own clip of each case after the bundle's VAE (the most a DiT on this VAE can score).

Two exactness checks, on every case and seed: at strength 0 the largest |difference| between the latents and those
of the same run with no references at all (`sample_r2v` with K = 0 reference frames: the bias hides the reference
keys, so the video must be what it is without them), and at strength 1 whether the latents are bit-identical to a
run that does not pass the argument.

Every (case, seed) is kept in `OUT` with a .runs.json suffix, keyed by what it depends on (the DiT, the judge, the
settings), and reused by a later run: a stopped run resumes, and more cases or seeds add to the earlier ones.
Writes `OUT` (every number, JSON) and prints a markdown table; the last line is
`identity by strength: 0→<mean>, 0.5→<mean>, 1→<mean>, 1.5→<mean>, 2→<mean>`."""

import argparse
import hashlib
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from refalign_core.inference.pipeline import RefAlignPipeline, VAECodec
from refalign_core.inference.sampler import sample_r2v
from refalign_core.metrics.identity import IdentitySettings, check_identity
from refalign_core.models.vfm import load_vfm
from refalign_core.toy.cases import held_out_cases, interval, judged
from refalign_core.toy.demo import embedded_bundle
from refalign_core.toy.judge import JUDGE_FILE, WorldJudge, through_vae
from refalign_core.toy.world import caption

STRENGTHS = (0.0, 0.5, 1.0, 1.5, 2.0)
COLUMNS = {"accuracy": "judge accuracy ↑", "confusion": "judge confusion ↓", "identity": "Identity Check overall ↑"}
CEILING = "world clip through the toy VAE (ceiling)"


def label(strength: float) -> str:
    return f"{strength:g}"


def scores(frames: torch.Tensor, case: dict, judge: WorldJudge, vfm) -> dict[str, float]:
    """The world judge's numbers (`judged`) and the Identity Check's overall score of one video of `case`."""
    identity = check_identity(case["references"], frames, vfm, names=[s.id for s in case["subjects"]],
                              settings=IdentitySettings(sample_frames=len(frames)),
                              backbone_name="efficientnet-lite0")
    return judged(judge(frames, case["subjects"])) | {"identity": identity.overall}


def run_case(pipe: RefAlignPipeline, case: dict, seed: int, judge: WorldJudge, vfm) -> dict:
    """One case and seed at every strength, and the two exactness checks."""
    prompt = caption(case["tracks"])
    latents, out = {}, {}
    for strength in STRENGTHS:
        result = pipe(prompt, case["references"], negative_prompt="", seed=seed, reference_strength=strength)
        latents[strength] = result.latents
        out[label(strength)] = scores(result.frames, case, judge, vfm)
    default = pipe(prompt, case["references"], negative_prompt="", seed=seed, decode=False).latents
    prompt_embeds, negative_embeds = pipe.encode_text(prompt, "")  # what the pipe encodes for negative_prompt ""
    reference_latents = VAECodec(pipe.vae).encode_references(result.references)
    no_references = sample_r2v(pipe.dit, prompt_embeds, negative_embeds, reference_latents[:, :, :0],
                               pipe.settings.replace(seed=seed))
    return {"strengths": out,
            "strength0_vs_no_references": float((latents[0.0] - no_references).abs().max()),
            "strength1_vs_no_references": float((latents[1.0] - no_references).abs().max()),
            "strength1_bit_identical": bool(torch.equal(latents[1.0], default))}


class RunCache:
    """(case, seed) -> `run_case`'s result, in a JSON file, valid while `key` is the same; written after each run."""

    def __init__(self, path: Path, key: dict):
        self.path, self.key, self.runs = path, key, {}
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved.get("key") == key:
                self.runs = saved["runs"]

    def get(self, case: int, seed: int, compute) -> tuple[dict, bool]:
        name = f"{case}/{seed}"
        if name in self.runs:
            return self.runs[name], True
        self.runs[name] = compute()
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": self.key, "runs": self.runs}))
        tmp.replace(self.path)
        return self.runs[name], False


def sha256_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def summarise(per_case: dict[str, list[dict]]) -> dict[str, dict[str, list[float]]]:
    """row -> column -> [mean, low, high] over cases; the rows "<x> − 1" are paired differences from strength 1."""
    summary = {row: {m: list(interval([case[m] for case in cases])) for m in COLUMNS}
               for row, cases in per_case.items()}
    for x in STRENGTHS:
        if x != 1.0:
            summary[f"{label(x)} − 1"] = {m: list(interval(np.subtract([c[m] for c in per_case[label(x)]],
                                                                         [c[m] for c in per_case["1"]])))
                                           for m in COLUMNS}
    return summary


def table(summary: dict, cases: int, seeds: int) -> str:
    lines = [f"| {cases} held-out cases × {seeds} seeds; mean [95 % interval over cases] | "
             + " | ".join(COLUMNS.values()) + " |", "|---|" + "---|" * len(COLUMNS)]
    for row, values in summary.items():
        difference = "−" in row
        name = (row if row == CEILING else f"strength {row}" + (" (references hidden)" if row == "0" else
                                                                " (default)" if row == "1" else ""))
        cell = "{:+.3f} [{:+.3f}, {:+.3f}]" if difference else "{:.3f} [{:.3f}, {:.3f}]"
        lines.append(f"| {name} | " + " | ".join(cell.format(*values[m]) for m in COLUMNS) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=16)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, help="sampling steps (default: the bundle's)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (1 where other jobs share a "
                                                                  "2-core CPU: two threads then contend and run "
                                                                  "several times slower)")
    parser.add_argument("--out", default="reference_strength.json", help="the JSON of every number")
    args = parser.parse_args(argv)
    if min(args.cases, args.seeds, args.threads) < 1:
        parser.error("--cases, --seeds and --threads must be at least 1")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    bundle = embedded_bundle()
    pipe = RefAlignPipeline.from_bundle(bundle)
    if args.steps is not None:
        pipe.settings = pipe.settings.replace(steps=args.steps)
    settings = pipe.settings
    judge, vfm = WorldJudge.load(JUDGE_FILE), load_vfm()
    cases = held_out_cases(args.cases, settings.width, settings.num_frames)
    key = {"dit": sha256_file(bundle / "dit.safetensors"), "judge": sha256_file(JUDGE_FILE),
           "settings": settings.to_dict(), "strengths": list(STRENGTHS), "threads": args.threads}
    cache = RunCache(out.with_suffix(".runs.json"), key)

    runs, reused, run_seconds = {}, 0, []
    for index, seed in tqdm([(i, s) for i in range(args.cases) for s in range(args.seeds)], desc="case × seed"):
        t0 = time.perf_counter()
        runs[index, seed], hit = cache.get(index, seed, lambda: run_case(pipe, cases[index], seed, judge, vfm))
        reused += hit
        if not hit:
            run_seconds.append(time.perf_counter() - t0)
    per_case = {label(x): [{m: float(np.mean([runs[i, s]["strengths"][label(x)][m] for s in range(args.seeds)]))
                            for m in runs[i, 0]["strengths"][label(x)]} for i in range(args.cases)]
                for x in STRENGTHS}
    per_case[CEILING] = [scores(through_vae(pipe.vae, case["truth"]), case, judge, vfm) for case in cases]
    summary = summarise(per_case)
    diff0 = max(r["strength0_vs_no_references"] for r in runs.values())
    diff1 = min(r["strength1_vs_no_references"] for r in runs.values())
    identical = sum(r["strength1_bit_identical"] for r in runs.values())
    seconds = time.perf_counter() - start
    result = {"cases": args.cases, "seeds": args.seeds, "settings": settings.to_dict(),
              "strengths": {row: v for row, v in summary.items() if "−" not in row},
              "differences_from_1": {row: v for row, v in summary.items() if "−" in row},
              "per_case": per_case, "runs": {f"{i}/{s}": r for (i, s), r in runs.items()},
              "strength0_vs_no_references_max_abs": diff0, "strength1_vs_no_references_min_of_max_abs": diff1,
              "strength1_bit_identical": identical == len(runs), "strength1_bit_identical_runs": identical,
              "reused_runs": reused, "seconds": seconds,
              "seconds_per_case_seed": float(np.mean(run_seconds)) if run_seconds else None,
              "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                          "torch": torch.__version__}}
    out.write_text(json.dumps(result, indent=1))
    print(table(summary, args.cases, args.seeds))
    print(f"\nstrength 0 vs no references (K = 0): max |Δ latents| {diff0:.3g} over {len(runs)} runs "
          f"(strength 1 vs no references: at least {diff1:.3g})")
    print(f"strength 1 vs no argument: latents bit-identical in {identical}/{len(runs)} runs")
    print(f"{len(runs) - reused} runs computed, {reused} reused; {seconds:.0f} s; {out}")
    print("identity by strength: " + ", ".join(f"{label(x)}→{summary[label(x)]['identity'][0]:.3f}"
                                               for x in STRENGTHS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
