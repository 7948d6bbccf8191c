"""Every benchmark script imports (the names it takes from the pack still exist) and has a `main`."""

from pathlib import Path

import pytest

from scripts import load_script

BENCH = sorted((Path(__file__).parents[1] / "bench").glob("*.py"))


def test_there_are_benchmarks():
    assert len(BENCH) >= 6


@pytest.mark.parametrize("path", BENCH, ids=lambda p: p.name)
def test_benchmark_imports(path):
    assert callable(load_script(path, f"bench_{path.stem}").main)
