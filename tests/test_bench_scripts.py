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


@pytest.mark.slow
def test_turbo_bench_runs_the_student_and_the_teacher(capsys, tmp_path):
    """The issue's numbers on one case: evaluations counted per configuration, the relative numbers with their
    intervals, and `ratio:` last."""
    turbo = load_script(Path(__file__).parents[1] / "bench" / "turbo.py", "bench_turbo_run")
    from refalign_core.toy.demo import SHIPPED_TURBO
    assert turbo.main(["--student", str(SHIPPED_TURBO), "--cases", "1", "--seeds", "1",
                       "--json", str(tmp_path / "turbo.json")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in lines if line.startswith("| ")}
    assert rows["teacher"][1] == "50" and rows["student"][1] == "4"  # 25 steps × 2 passes; 4 steps × 1 pass
    assert "world clip through the toy VAE (ceiling)" in rows
    assert any(line.startswith("- student − teacher: accuracy ") for line in lines)
    assert any(line.startswith("relative accuracy: ") for line in lines)
    free = next(line for line in lines if line.startswith("student's work besides denoising: "))
    assert float(free.split()[-1]) > float(lines[-1].split()[-1])  # the wall ratio stays under its cap
    assert lines[-1].startswith("ratio: ") and float(lines[-1].split()[-1]) > 1
    assert (tmp_path / "turbo.json").is_file()
