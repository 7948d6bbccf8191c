"""bench/reference_strength.py runs end to end on one held-out case (few steps): every strength is scored, strength 0
equals a run with no references, strength 1 equals a run without the argument, and a rerun reuses its runs."""

import json
from pathlib import Path

from refalign_core.toy.cases import held_out_cases
from scripts import load_script

BENCH = Path(__file__).parents[2] / "bench" / "reference_strength.py"


def load_bench():
    return load_script(BENCH, "bench_reference_strength")


def test_reference_strength_bench_on_one_case(tmp_path, capsys):
    bench = load_bench()
    out = tmp_path / "strength.json"
    argv = ["--cases", "1", "--seeds", "1", "--steps", "2", "--out", str(out)]
    assert bench.main(argv) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads(out.read_text())
    assert set(result["strengths"]) == {"0", "0.5", "1", "1.5", "2", bench.CEILING}
    assert set(result["differences_from_1"]) == {"0 − 1", "0.5 − 1", "1.5 − 1", "2 − 1"}
    assert last.startswith("identity by strength: ") and last.count("→") == 5
    for row in result["strengths"].values():
        for name, (mean, low, high) in row.items():
            assert (0 if name != "identity" else -1) <= low <= mean <= high <= 1, (name, mean, low, high)
    assert result["settings"]["steps"] == 2 and result["reused_runs"] == 0
    assert result["strength0_vs_no_references_max_abs"] <= 1e-5
    assert result["strength1_vs_no_references_min_of_max_abs"] > 1e-3  # the references do change this run
    assert result["strength1_bit_identical"] is True

    assert bench.main(argv) == 0  # the run is kept and reused
    again = json.loads(out.read_text())
    assert again["reused_runs"] == 1 and again["strengths"] == result["strengths"]


def test_held_out_cases_are_a_fixed_list():
    """The ablation and the bench score the same cases: the first n for any count ≥ n."""
    short, long = held_out_cases(2, 128, 5), held_out_cases(3, 128, 5)
    assert [c["subjects"] for c in short] == [c["subjects"] for c in long[:2]]
    assert all(a["truth"].equal(b["truth"]) for a, b in zip(short, long))
