"""The per-stage diagnosis benchmark's paired comparison of two arms on the same seeds (benchmarks/bench_diagnosis.py)."""

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # as `python benchmarks/bench_diagnosis.py` sees its neighbours

from bench_diagnosis import COUNT_METRICS, paired_table  # noqa: E402


def diagnosis(scldm_mmd: float, scvi_mmd: float, floor: float = -0.01) -> dict:
    """Scores of one seed as `diagnose` returns them: every metric `(score, floor)`, MMD² set, the rest 0.5."""
    def stages(mmd):
        count = {metric: (mmd if metric == "mmd_rbf" else 0.5, floor) for metric in COUNT_METRICS}
        return {"e": count, "b decoded": count, "c": {"KS log library size": (0.2, 0.1)}}
    return {"scLDM": stages(scldm_mmd), "scVI": stages(scvi_mmd)}


def test_paired_table_differences_are_per_seed_then_averaged():
    runs = [diagnosis(0.030, 0.010), diagnosis(0.050, 0.000)]
    baseline = [diagnosis(0.040, 0.010), diagnosis(0.080, 0.000)]
    table = paired_table(runs, baseline, seeds=[3, 4])
    assert "| 3 | 0.030 | 0.040 | 0.010 | -0.010 |" in table
    # this run - baseline: -0.010, -0.030 -> -0.020 ± 0.014; this run - scVI: 0.020, 0.050 -> 0.035 ± 0.021
    assert "| (e) full generation | mmd_rbf | 0.040 ± 0.014 | 0.060 ± 0.028 | -0.020 ± 0.014 | 0.035 ± 0.021 |" in table
    assert "| (c) library-size model | KS log library size | 0.200 ± 0.000 | 0.200 ± 0.000 | 0.000 ± 0.000 |" in table
