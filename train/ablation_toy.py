"""Toy-scale ablation of the RefAlign loss on subjects never seen in training, scored by the world judge.

    python train/ablation_toy.py [--models refalign_core/toy/models] [--ablation-models DIR] --out ablation
                                 [--cases 24] [--seeds 3]

Models (all trained by `train/make_toy_bundle.py` on the same data and steps): the shipped RefAlign (RA loss, toy
teacher) and baseline (RA off) from `--models`, and, from `--ablation-models` where given, positive-only RA (no push
term), RefAlign with EfficientNet-Lite0 as the teacher, and RefAlign and the baseline with training seed 1.

1. Representation: held-out identities, several references each (new angles and scales, then the training
   augmentation). Each reference alone goes through the DiT (with a noised video); its reference tokens after
   block 1 (the last aligned block) and after the last block are pooled over the subject's tokens.
   Nearest-neighbour retrieval accuracy across the other references (same identity = correct), and the mean cosine
   between references of the same and of different identities. Both teachers' own tokens are scored the same way.
2. Generation: held-out cases with 2–3 subjects, each sampled with several seeds and scored by the world judge
   (`refalign_core.toy.judge`): accuracy (the fraction of frames with the right subject in its lane, mean over
   subjects; also the top lane and the lower lanes apart), confusion (the fraction of frames whose lane shows
   another reference's attribute) and per attribute.
   The world's own clip of each case is judged too, as rendered (the judge's ceiling) and after the bundles' VAE
   encodes and decodes it (the most a DiT with that VAE can score).

Means with 95 % intervals (percentile bootstrap over identities / cases, each case averaged over seeds) and paired
differences. Each model's scores are kept in `OUT/models/<bundle>.json` with what they depend on (its DiT, the
judge, cases, seeds, views, steps) and reused by a later run, so models can be added one at a time. Writes
`ablation.json` and `ablation.md`; the last line printed is
`confusion RefAlign - baseline: <mean> [<low>, <high>]` (both training seeds where the seed-1 models exist)."""

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from refalign_core.inference.bundles import read_bundle
from refalign_core.inference.pipeline import RefAlignPipeline
from refalign_core.inference.references import encode_references
from refalign_core.toy.cases import held_out_cases, interval, judged
from refalign_core.toy.judge import HEADS, WorldJudge, through_vae
from refalign_core.toy.teacher import pooled_tokens, reference_set, retrieval_scores, subject_token_mask
from refalign_core.toy.world import all_subjects, caption
from refalign_core.models.vfm import load_vfm

SHIPPED = {"RefAlign": "refalign_toy", "baseline": "refalign_toy_baseline"}
EXTRA = {"positive-only RA": "refalign_toy_positive_only",
         "RefAlign, EfficientNet teacher": "refalign_toy_efficientnet",
         "RefAlign (seed 1)": "refalign_toy_seed1", "baseline (seed 1)": "refalign_toy_baseline_seed1"}
GENERATION = {"accuracy": "right subject in its lane ↑", "confusion": "confusion ↓",
              "top_lane": "top lane right", "lower_lanes": "lower lanes right",
              **{f"attribute_{a}": f"{a} right" for a in HEADS}}
REPRESENTATION = {"retrieval": "retrieval accuracy ↑", "same": "same-subject cosine",
                  "cross": "cross-subject cosine ↓"}
CEILING = "world clip (judge ceiling)"
VAE_CEILING = "world clip through the VAE (DiT ceiling)"


@torch.no_grad()
def dit_embeddings(pipe: RefAlignPipeline, images: torch.Tensor, blocks: list[int], timestep: float = 700.0,
                   seed: int = 0) -> dict[int, torch.Tensor]:
    """Reference-token features after `blocks`, each reference alone with a noised video, pooled over the tokens
    covering its subject: images `[N, 3, H, W]` -> block -> `[N, dim]`."""
    settings = pipe.settings
    latents = encode_references(pipe.vae, images)[0].transpose(0, 1)  # [N, 16, h, w]
    h, w = latents.shape[-2:]
    frames = (settings.num_frames - 1) // 4 + 1
    noise = torch.randn(1, 16, frames, h, w, generator=torch.Generator().manual_seed(seed))
    text = torch.zeros(1, 1, pipe.dit.config.text_dim)
    out = {b: [] for b in blocks}
    for latent, token_mask in zip(latents, subject_token_mask(images)):
        features = pipe.dit(noise, torch.tensor([timestep]), text, reference_latents=latent[None, :, None],
                            reference_feature_blocks=blocks).reference_features
        for b in blocks:
            out[b].append(features[b][0][token_mask].mean(0))
    return {b: torch.stack(x) for b, x in out.items()}


def score_model(pipe: RefAlignPipeline, images: torch.Tensor, views: int, cases: list[dict], judge: WorldJudge,
                seeds: int) -> dict:
    """One model's representation retrieval (block 1 and the last block; `images` are `views` references of each
    held-out identity) and judged generation per case (each the mean over `seeds` sampling seeds)."""
    blocks = [1, pipe.dit.config.num_layers - 1]
    representation = {f"block {block}": retrieval_scores(embedding.view(-1, views, embedding.shape[-1]))
                      for block, embedding in dit_embeddings(pipe, images, blocks).items()}
    generation = []
    for case in tqdm(cases, desc="cases", unit="case"):
        runs = [judged(judge(pipe(caption(case["tracks"]), case["references"], negative_prompt="", seed=seed).frames,
                             case["subjects"])) for seed in range(seeds)]
        generation.append({m: float(np.mean([r[m] for r in runs])) for m in GENERATION})
    return {"representation": representation, "generation": generation}


def cached_scores(path: Path, key: dict, compute) -> dict:
    """`compute()`, or what an earlier run saved at `path` with the same `key` (an ablation grows one model at a
    time: each model's scores are kept apart and reused)."""
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return saved["scores"]
    scores = compute()
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, "scores": scores}))
    tmp.replace(path)
    return scores


def pool_seeds(rows: dict[str, dict[str, list[float]]]) -> None:
    """Add "<model> (seeds 0+1)" rows: per case, the mean of the seed-0 and seed-1 models."""
    for name in ("RefAlign", "baseline"):
        if f"{name} (seed 1)" in rows:
            rows[f"{name} (seeds 0+1)"] = {k: list(np.mean([rows[name][k], rows[f"{name} (seed 1)"][k]], axis=0))
                                           for k in rows[name]}


def table(rows: dict[str, dict[str, list[float]]], columns: dict[str, str], pairs=()) -> list[str]:
    lines = ["| | " + " | ".join(columns.values()) + " |", "|---|" + "---|" * len(columns)]
    for name, values in rows.items():
        cells = [interval(values[k]) for k in columns]
        lines.append(f"| {name} | " + " | ".join(f"{m:.3f} [{lo:.3f}, {hi:.3f}]" for m, lo, hi in cells) + " |")
    for a, b in pairs:
        if a in rows and b in rows:
            cells = [interval(np.subtract(rows[a][k], rows[b][k])) for k in columns]
            lines.append(f"| {a} − {b} | " + " | ".join(f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]" for m, lo, hi in cells)
                         + " |")
    return lines


def model_folders(models: Path, extra: Path | None) -> dict[str, Path]:
    """The shipped bundles, and the ablation's extra ones that exist."""
    folders = {name: models / folder for name, folder in SHIPPED.items()}
    if extra is not None:
        folders |= {name: extra / folder for name, folder in EXTRA.items() if (extra / folder).is_dir()}
    return folders


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    models = Path(__file__).resolve().parents[1] / "refalign_core" / "toy" / "models"
    parser.add_argument("--models", default=str(models), help="folder holding the shipped bundles, judge and teacher")
    parser.add_argument("--ablation-models", help="folder holding the ablation's extra bundles (make_toy_bundle.py "
                                                  "--ablation-models)")
    parser.add_argument("--out", default="ablation")
    parser.add_argument("--cases", type=int, default=24)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--views", type=int, default=6, help="references per held-out identity (representation)")
    parser.add_argument("--steps", type=int, help="sampling steps (default: the bundles')")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    out, models = Path(args.out), Path(args.models)
    out.mkdir(parents=True, exist_ok=True)
    folders = model_folders(models, Path(args.ablation_models) if args.ablation_models else None)
    start = time.perf_counter()
    settings = read_bundle(folders["RefAlign"]).settings
    _, held_out = all_subjects()
    images, _ = reference_set(held_out, args.views, seed=1, size=settings.width)
    cases = held_out_cases(args.cases, settings.width, settings.num_frames)
    judge = WorldJudge.load(models / "judge.safetensors")
    teachers = {"toy teacher": load_vfm(str(models / "teacher.safetensors")),
                "EfficientNet-Lite0": load_vfm("efficientnet-lite0")}
    rep_rows = {f"{name} (teacher)": retrieval_scores(pooled_tokens(vfm, images).view(len(held_out), args.views, -1))
                for name, vfm in teachers.items()}
    vae = RefAlignPipeline.from_bundle(folders["RefAlign"]).vae
    gen_rows = {CEILING: [judged(judge(case["truth"], case["subjects"])) for case in cases],
                VAE_CEILING: [judged(judge(through_vae(vae, case["truth"]), case["subjects"])) for case in cases]}
    (out / "models").mkdir(exist_ok=True)
    for name, folder in folders.items():
        key = {"dit": sha256_file(folder / "dit.safetensors"), "judge": sha256_file(models / "judge.safetensors"),
               "cases": args.cases, "seeds": args.seeds, "views": args.views, "steps": args.steps}

        def compute(folder=folder):
            pipe = RefAlignPipeline.from_bundle(folder)
            if args.steps is not None:
                pipe.settings = pipe.settings.replace(steps=args.steps)
            return score_model(pipe, images, args.views, cases, judge, args.seeds)

        scores = cached_scores(out / "models" / f"{folder.name}.json", key, compute)
        rep_rows |= {f"{name}, {block}": values for block, values in scores["representation"].items()}
        gen_rows[name] = scores["generation"]
    rep = {"subjects": [s.id for s in held_out], "views": args.views, "per_subject": rep_rows}
    gen = {"cases": args.cases, "seeds": args.seeds, "per_case": gen_rows}
    text, confusion = write_report(out, rep, gen, time.perf_counter() - start)
    print(text)
    mean, low, high = confusion
    print(f"confusion RefAlign - baseline: {mean:+.3f} [{low:+.3f}, {high:+.3f}]")
    return 0


def write_report(out: Path, rep: dict, gen: dict, seconds: float) -> tuple[str, tuple[float, float, float]]:
    """ablation.md (the tables) and ablation.json (every score). Returns (the tables' text, the main pair's
    confusion difference: mean and 95 % interval)."""
    rep_rows = rep["per_subject"]
    gen_rows = {name: {m: [case[m] for case in per_case] for m in GENERATION}
                for name, per_case in gen["per_case"].items()}
    pool_seeds(gen_rows)
    main_pair = ("RefAlign (seeds 0+1)", "baseline (seeds 0+1)") if "RefAlign (seeds 0+1)" in gen_rows \
        else ("RefAlign", "baseline")
    last = max(int(k.rsplit(" ", 1)[1]) for k in rep_rows if "block" in k)
    lines = [f"Representation: {len(rep['subjects'])} held-out identities × {rep['views']} references; reference "
             "tokens pooled over the subject, centred; mean [95 % interval over identities].", ""]
    lines += table(rep_rows, REPRESENTATION, [(f"RefAlign, block {b}", f"{other}, block {b}") for b in (1, last)
                                              for other in ("baseline", "positive-only RA",
                                                            "RefAlign, EfficientNet teacher")])
    lines += ["", f"Generation: {gen['cases']} held-out cases × {gen['seeds']} seeds, 2–3 unseen subjects each, "
              "scored by the world judge (fractions of frames); mean [95 % interval over cases].", ""]
    pairs = [main_pair, ("RefAlign", "baseline"), ("RefAlign (seed 1)", "baseline (seed 1)"),
             ("RefAlign", "positive-only RA"), ("RefAlign", "RefAlign, EfficientNet teacher")]
    lines += table(gen_rows, GENERATION, list(dict.fromkeys(pairs)))
    text = "\n".join(lines) + "\n"
    (out / "ablation.md").write_text(text)
    (out / "ablation.json").write_text(json.dumps({"representation": rep, "generation": gen, "seconds": seconds},
                                                  indent=1))
    return text, interval(np.subtract(gen_rows[main_pair[0]]["confusion"], gen_rows[main_pair[1]]["confusion"]))


if __name__ == "__main__":
    sys.exit(main())
