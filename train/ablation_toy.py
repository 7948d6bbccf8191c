"""Toy-scale ablation of the RefAlign loss on subjects never seen in training, for the three shipped toy DiTs trained
on the same data, steps and seed: RefAlign (RA loss), the baseline (RA off) and positive-only RA (no push term).

    python train/ablation_toy.py [--models refalign_core/toy/models] --out ablation [--cases 24] [--seeds 3]

1. Representation: held-out identities, several references each (new angles and scales, then the training
   augmentation). Each reference alone goes through the DiT (with a noised video); its reference tokens after the
   last aligned block (and after the last block) are pooled over the subject's tokens. Nearest-neighbour retrieval
   accuracy across the other references (same identity = correct), and the mean cosine between references of the
   same and of different identities. The VFM's own tokens are scored the same way, as the teacher's level.
2. Generation: held-out cases with 2–3 subjects (the toy world's captions name shapes, not colours), each sampled
   with several seeds and scored with the Identity Check (EfficientNet-Lite0): identity (mean over subjects),
   confusion rate, copy-paste rate and motion amplitude. The world's own clip of each case is scored too: the
   ceiling of what the Identity Check gives on a perfect video.

Means with 95 % intervals (percentile bootstrap over identities / cases, each case averaged over seeds) and paired
differences. Writes `ablation.json` and `ablation.md`."""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from refalign_core.identity import IdentitySettings, check_identity
from refalign_core.pipeline import RefAlignPipeline
from refalign_core.references import Reference, encode_references, fit_on_white
from refalign_core.toy.world import BACKGROUND, all_subjects, caption, reference_image, render_clip, sample_case
from refalign_core.training.data import ReferenceAugmentation
from refalign_core.vfm import load_vfm

VARIANTS = {"RefAlign": "refalign_toy", "baseline": "refalign_toy_baseline",
            "positive-only RA": "refalign_toy_positive_only"}
GENERATION = {"identity": "identity ↑", "confusion": "confusion rate ↓", "copy_paste": "copy-paste rate ↓",
              "motion": "motion amplitude"}
REPRESENTATION = {"retrieval": "retrieval accuracy ↑", "same": "same-subject cosine", "cross": "cross-subject cosine ↓"}


def interval(values, seed: int = 0, resamples: int = 10_000) -> tuple[float, float, float]:
    """Mean and 95 % percentile-bootstrap interval."""
    values = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (resamples, len(values)))].mean(1)
    return float(values.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def held_out_references(views: int, size: int, seed: int = 1) -> tuple[list, torch.Tensor, torch.Tensor]:
    """Per held-out identity, `views` references (new angle and scale, then the training augmentation) -> (subjects,
    images `[S, V, 3, size, size]` in [0, 1], subject masks `[S, V, size, size]`)."""
    _, held_out = all_subjects()
    rng, generator = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    augment = ReferenceAugmentation()
    images, masks = [], []
    for subject in held_out:
        pairs = [reference_image(subject, rng, size) for _ in range(views)]
        fitted = torch.stack([fit_on_white(image, size, size, mask) for image, mask in pairs])
        augmented = augment(fitted, generator)
        images.append(augmented)
        masks.append((augmented.min(1).values < 0.9).float())  # the subject: every pixel not (near) white
    return held_out, torch.stack(images), torch.stack(masks)


def retrieval_scores(embeddings: torch.Tensor) -> dict[str, list[float]]:
    """embeddings `[S, V, D]` -> per identity: retrieval accuracy (nearest other reference is the same identity),
    mean same-identity cosine and mean cross-identity cosine, on embeddings centred on their mean (what all
    references share, e.g. the residual stream's constant part, says nothing about identity)."""
    s, v, _ = embeddings.shape
    flat = embeddings.flatten(0, 1).float()
    flat = F.normalize(flat - flat.mean(0), dim=-1)
    cos = flat @ flat.T
    labels = torch.arange(s).repeat_interleave(v)
    cos.fill_diagonal_(-2)
    hit = (labels[cos.argmax(1)] == labels).float().view(s, v).mean(1)
    same = labels[:, None] == labels[None, :]
    cos.fill_diagonal_(float("nan"))
    same_cos = torch.stack([cos[i][same[i]].nanmean() for i in range(len(labels))]).view(s, v).mean(1)
    cross_cos = torch.stack([cos[i][~same[i]].mean() for i in range(len(labels))]).view(s, v).mean(1)
    return {"retrieval": hit.tolist(), "same": same_cos.tolist(), "cross": cross_cos.tolist()}


@torch.no_grad()
def dit_embeddings(pipe: RefAlignPipeline, images: torch.Tensor, masks: torch.Tensor, blocks: list[int],
                   timestep: float = 700.0, seed: int = 0) -> dict[int, torch.Tensor]:
    """Reference-token features after `blocks`, each reference alone with a noised video, pooled over the tokens
    covering its subject -> block -> `[S, V, dim]`."""
    s, v = images.shape[:2]
    settings = pipe.settings
    latents = encode_references(pipe.vae, images.flatten(0, 1))[0].transpose(0, 1)  # [S·V, 16, h, w]
    h, w = latents.shape[-2:]
    frames = (settings.num_frames - 1) // 4 + 1
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, 16, frames, h, w, generator=generator)
    text = torch.zeros(1, 1, pipe.dit.config.text_dim)
    token_masks = F.avg_pool2d(masks.flatten(0, 1)[:, None], 16).flatten(1) > 0.25  # [S·V, T]
    out = {b: [] for b in blocks}
    for latent, token_mask in zip(latents, token_masks):
        features = pipe.dit(noise, torch.tensor([timestep]), text, reference_latents=latent[None, :, None],
                            reference_feature_blocks=blocks).reference_features
        for b in blocks:
            out[b].append(features[b][0][token_mask].mean(0))
    return {b: torch.stack(x).view(s, v, -1) for b, x in out.items()}


def representation(pipes: dict[str, RefAlignPipeline], vfm, views: int) -> dict:
    size = next(iter(pipes.values())).settings.width
    subjects, images, masks = held_out_references(views, size)
    token_masks = F.avg_pool2d(masks.flatten(0, 1)[:, None], 16).flatten(1) > 0.25
    tokens = vfm(images.flatten(0, 1))
    teacher = torch.stack([t[m].mean(0) for t, m in zip(tokens, token_masks)]).view(*images.shape[:2], -1)
    scores = {"VFM (teacher)": retrieval_scores(teacher)}
    layers = next(iter(pipes.values())).dit.config.num_layers
    for name, pipe in pipes.items():
        blocks = [1, layers - 1]
        for block, embedding in dit_embeddings(pipe, images, masks, blocks).items():
            scores[f"{name}, block {block}"] = retrieval_scores(embedding)
    return {"subjects": [s.id for s in subjects], "views": views, "per_subject": scores}


def generation(pipes: dict[str, RefAlignPipeline], vfm, cases: int, seeds: int) -> dict:
    settings = next(iter(pipes.values())).settings
    _, held_out = all_subjects()
    rng = np.random.default_rng(1)
    identity_settings = IdentitySettings(sample_frames=settings.num_frames)

    def score(references, masks, names, frames):
        report = check_identity(references, frames, vfm, masks=masks, names=names, settings=identity_settings)
        return {"identity": report.overall, "confusion": float(bool(report.confusion_flags)),
                "copy_paste": float(bool(report.copy_paste_flags)), "motion": report.motion_amplitude}

    per_case = {name: [] for name in ["world clip (ceiling)", *pipes]}
    for _ in tqdm(range(cases), desc="cases", unit="case"):
        tracks = sample_case(held_out, rng, min_subjects=2, max_subjects=3)
        pairs = [reference_image(t.subject, rng, settings.width) for t in tracks]
        references, masks = [p[0] for p in pairs], [p[1] for p in pairs]
        names = [t.subject.id for t in tracks]
        truth = render_clip(tracks, BACKGROUND, settings.num_frames, settings.width)
        per_case["world clip (ceiling)"].append(score(references, masks, names, truth))
        for name, pipe in pipes.items():
            runs = [score(references, masks, names, pipe(caption(tracks), [Reference(i, m, n) for i, m, n in
                                                                           zip(references, masks, names)],
                                                          negative_prompt="", seed=seed).frames)
                    for seed in range(seeds)]
            per_case[name].append({m: float(np.mean([r[m] for r in runs])) for m in GENERATION})
    return {"cases": cases, "seeds": seeds, "per_case": per_case}


def table(rows: dict[str, dict[str, list[float]]], columns: dict[str, str], pairs=()) -> list[str]:
    lines = ["| | " + " | ".join(columns.values()) + " |", "|---|" + "---|" * len(columns)]
    for name, values in rows.items():
        cells = [interval(values[k]) for k in columns]
        lines.append(f"| {name} | " + " | ".join(f"{m:.3f} [{lo:.3f}, {hi:.3f}]" for m, lo, hi in cells) + " |")
    for a, b in pairs:
        cells = [interval(np.subtract(rows[a][k], rows[b][k])) for k in columns]
        lines.append(f"| {a} − {b} | " + " | ".join(f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]" for m, lo, hi in cells)
                     + " |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=str(Path(__file__).resolve().parents[1] / "refalign_core" / "toy" /
                                                 "models"), help="folder holding the three toy bundles")
    parser.add_argument("--out", default="ablation")
    parser.add_argument("--cases", type=int, default=24)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--views", type=int, default=6, help="references per held-out identity (representation)")
    parser.add_argument("--steps", type=int, help="sampling steps (default: the bundles')")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipes = {name: RefAlignPipeline.from_bundle(Path(args.models) / folder) for name, folder in VARIANTS.items()}
    if args.steps is not None:
        for pipe in pipes.values():
            pipe.settings = pipe.settings.replace(steps=args.steps)
    start = time.perf_counter()
    vfm = load_vfm("efficientnet-lite0")  # the teacher and the Identity Check's backbone
    rep = representation(pipes, vfm, args.views)
    gen = generation(pipes, vfm, args.cases, args.seeds)
    rep_rows = rep["per_subject"]
    gen_rows = {name: {m: [case[m] for case in cases] for m in GENERATION} for name, cases in gen["per_case"].items()}
    layers = max(int(k.rsplit(" ", 1)[1]) for k in rep_rows if "block" in k)
    lines = [f"Representation: {len(rep['subjects'])} held-out identities × {args.views} references; reference "
             "tokens pooled over the subject, centred; mean [95 % interval over identities].", ""]
    lines += table(rep_rows, REPRESENTATION, [(f"RefAlign, block {b}", f"{other}, block {b}") for b in (1, layers)
                                              for other in ("baseline", "positive-only RA")])
    lines += ["", f"Generation: {args.cases} held-out cases × {args.seeds} seeds, 2–3 unseen subjects each; mean "
              "[95 % interval over cases].", ""]
    lines += table(gen_rows, GENERATION, [("RefAlign", "baseline"), ("RefAlign", "positive-only RA")])
    text = "\n".join(lines) + "\n"
    (out / "ablation.md").write_text(text)
    (out / "ablation.json").write_text(json.dumps({"representation": rep, "generation": gen,
                                                   "seconds": time.perf_counter() - start}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
