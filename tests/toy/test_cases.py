"""The held-out cases' intervals: the ratio of paired means and its bootstrap interval."""

import numpy as np
import pytest

from refalign_core.toy.cases import interval, ratio_interval


def test_ratio_of_means_with_an_interval_around_it():
    rng = np.random.default_rng(0)
    teacher = rng.uniform(0.1, 0.3, 48)
    ratio, low, high = ratio_interval(0.9 * teacher, teacher)
    assert ratio == pytest.approx(0.9) and low == pytest.approx(0.9) and high == pytest.approx(0.9)  # exact pairs
    student = teacher * 0.9 + rng.normal(0, 0.05, 48)
    ratio, low, high = ratio_interval(student, teacher)
    assert ratio == pytest.approx(student.mean() / teacher.mean())
    assert low < ratio < high and high - low < 0.3


def test_pairing_narrows_the_interval():
    """Cases that are hard for both (a shared per-case level) cancel in the ratio only when resampled together."""
    rng = np.random.default_rng(1)
    level = rng.uniform(0.05, 0.6, 40)
    paired = ratio_interval(level * 0.95, level)
    unpaired_low, unpaired_high = (interval(level * 0.95)[i] / interval(level)[j] for i, j in ((1, 2), (2, 1)))
    assert paired[2] - paired[1] < 0.01 < unpaired_high - unpaired_low


def test_a_zero_denominator_gives_nan_and_unpaired_values_are_refused():
    assert np.isnan(ratio_interval([0.1, 0.2], [0.0, 0.0])).all()
    _, low, high = ratio_interval([0.1, 0.0, 0.0], [0.1, 0.0, 0.0])  # many resamples are 0 ÷ 0 or x ÷ 0
    assert low <= 1.0 <= high
    with pytest.raises(ValueError, match="pair"):
        ratio_interval([0.1, 0.2], [0.1])
