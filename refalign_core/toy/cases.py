"""Held-out toy-world cases and how a generation on them is scored, shared by the evaluations that compare models or
settings on them (`train/ablation_toy.py`, `bench/reference_strength.py`): the same cases, the same numbers from a
world-judge verdict, the same interval."""

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
