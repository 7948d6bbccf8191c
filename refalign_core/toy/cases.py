"""Held-out toy-world cases and how a generation on them is scored, shared by the evaluations that compare models or
settings on them (`train/ablation_toy.py`, `bench/reference_strength.py`, `bench/turbo.py`): the same cases, the
same numbers from a world-judge verdict, the same intervals."""

import numpy as np

from ..inference.references import Reference
from .judge import HEADS
from .world import BACKGROUND, all_subjects, reference_image, render_clip, sample_case


def held_out_cases(count: int, size: int, frames: int) -> list[dict]:
    """`count` cases of 2–3 held-out subjects (the same for every model; the first n of a longer list are the n of a
    shorter one): tracks, subjects, references, the world's clip ("truth")."""
    _, held_out = all_subjects()
    rng = np.random.default_rng(1)
    cases = []
    for _ in range(count):
        tracks = sample_case(held_out, rng, min_subjects=2, max_subjects=3)
        subjects = [t.subject for t in tracks]
        pairs = [reference_image(s, rng, size) for s in subjects]
        cases.append({"tracks": tracks, "subjects": subjects,
                      "references": [Reference(image, mask, s.id) for (image, mask), s in zip(pairs, subjects)],
                      "truth": render_clip(tracks, BACKGROUND, frames, size)})
    return cases


def judged(verdict) -> dict[str, float]:
    """A verdict's numbers: means over subjects, and the top lane apart from the lower ones (binding by order: do the
    lower lanes get their own subject, or the first one's?)."""
    return {"accuracy": verdict.accuracy, "confusion": verdict.confusion,
            "top_lane": verdict.subjects[0].accuracy,
            "lower_lanes": float(np.mean([s.accuracy for s in verdict.subjects[1:]])),
            **{f"attribute_{a}": float(np.mean([s.attributes[a] for s in verdict.subjects])) for a in HEADS}}


def interval(values, seed: int = 0, resamples: int = 10_000) -> tuple[float, float, float]:
    """Mean and 95 % percentile-bootstrap interval."""
    values = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (resamples, len(values)))].mean(1)
    return float(values.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def ratio_interval(numerator, denominator, seed: int = 0, resamples: int = 10_000) -> tuple[float, float, float]:
    """mean(numerator) ÷ mean(denominator) of paired per-case values, and its 95 % percentile-bootstrap interval
    (the cases resampled together, so a case's two values stay paired). A resample whose denominator is 0 counts
    as an infinite ratio (0 ÷ 0 is left out); nan everywhere when the denominator's own mean is 0."""
    numerator, denominator = np.asarray(numerator, dtype=float), np.asarray(denominator, dtype=float)
    if numerator.shape != denominator.shape:
        raise ValueError(f"ratio_interval: {numerator.shape} values against {denominator.shape}; they must pair")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(numerator), (resamples, len(numerator)))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = numerator[picks].mean(1) / denominator[picks].mean(1)
        ratio = numerator.mean() / denominator.mean() if denominator.mean() else float("nan")
    ratios = ratios[~np.isnan(ratios)]
    if not len(ratios) or np.isnan(ratio):
        return float("nan"), float("nan"), float("nan")
    return float(ratio), float(np.percentile(ratios, 2.5)), float(np.percentile(ratios, 97.5))
