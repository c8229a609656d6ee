"""The perturbation benchmark's building blocks (benchmarks/perturbation/).

No leak in the folds: everything a method sees is a function of the fold's training cells and the held-out type's
control cells. Two folds are rebuilt with the held-out (T, stimulated) cells replaced by garbage counts; every gene
list, vocabulary, normalised matrix, PCA and baseline prediction must be identical. The report counts a win only
beyond the seed-to-seed sd.
"""

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # the benchmark's own package, as `python benchmarks/bench_perturbation.py` sees it

from perturbation.baselines import mean_shift, most_similar_type  # noqa: E402
from perturbation.folds import LYMPHOID, MYELOID, Fold, highly_variable, is_stimulated  # noqa: E402
from perturbation.report import ours_and_baselines, paired_tests, wins_beyond_noise  # noqa: E402

KANG_PATH = BENCHMARKS.parent / ".." / "shared" / "data" / "kang2018_pbmc_ifnb_counts.h5ad"
FOLDS = ["B", "CD14+Mono"]
NUM_GENES = 200

needs_kang = pytest.mark.skipif(not KANG_PATH.is_file(), reason=f"Kang 2018 counts not found at {KANG_PATH.resolve()}")


@pytest.fixture(scope="module")
def kang():
    cells = sc.read_h5ad(KANG_PATH)
    cells.obs = cells.obs[["cell_type", "condition"]].astype(str)
    return cells


def with_garbage_held_out(cells, held_out: str):
    """`cells` with the (held_out, stimulated) cells' counts replaced by random counts on random genes."""
    held = is_stimulated(cells.obs, [held_out])
    rows = np.flatnonzero(held)
    noise = sp.random(len(rows), cells.n_vars, density=0.05, format="csr", random_state=np.random.default_rng(0),
                      data_rvs=lambda size: np.random.default_rng(1).integers(1, 200, size))
    into_rows = sp.csr_matrix((np.ones(len(rows)), (rows, np.arange(len(rows)))), shape=(cells.n_obs, len(rows)))
    garbage = cells.copy()
    garbage.X = (sp.diags((~held).astype(float)) @ cells.X + into_rows @ noise).tocsr().astype(cells.X.dtype)
    return garbage


def assert_same_matrix(first, second):
    assert first.shape == second.shape and abs(sp.csr_matrix(first) - sp.csr_matrix(second)).sum() == 0


@needs_kang
@pytest.mark.parametrize("held_out", FOLDS)
def test_fold_is_built_without_the_held_out_stimulated_cells(kang, held_out):
    garbage = with_garbage_held_out(kang, held_out)
    # the garbage is strong enough to change a selection that looked at every cell
    assert not highly_variable(kang, NUM_GENES).equals(highly_variable(garbage, NUM_GENES))

    fold, stimulated = Fold.from_cells(kang, held_out, NUM_GENES, seed=0)
    leaky, garbage_stimulated = Fold.from_cells(garbage, held_out, NUM_GENES, seed=0)
    assert abs(stimulated.X - garbage_stimulated.X).sum() > 0
    assert not set(stimulated.obs_names) & (set(fold.train.obs_names) | set(fold.control.obs_names))

    assert fold.genes.equals(leaky.genes) and len(fold.genes) == NUM_GENES
    assert fold.train.var_names.equals(fold.genes) and fold.observational.var_names.equals(fold.genes)
    assert fold.train.obs_names.equals(leaky.train.obs_names)
    for first, second in [(fold.train.X, leaky.train.X), (fold.control.X, leaky.control.X),
                          (fold.train_log, leaky.train_log), (fold.observational.X, leaky.observational.X)]:
        assert_same_matrix(first, second)
    np.testing.assert_array_equal(fold.pca.components_, leaky.pca.components_)
    np.testing.assert_array_equal(fold.pca.mean_, leaky.pca.mean_)

    validation = fold.validation_types()
    assert validation == leaky.validation_types() and held_out not in validation
    assert validation[0] in LYMPHOID and validation[1] in MYELOID
    for baseline in (mean_shift, most_similar_type):
        assert_same_matrix(baseline(fold), baseline(leaky))


def seed_table(values: dict[tuple[str, str], list[float]]) -> pd.DataFrame:
    """A results table: every metric of (method, fold) set to the given per-seed values (MMD^2: their negative)."""
    rows = {(method, fold, seed): value for (method, fold), per_seed in values.items()
            for seed, value in enumerate(per_seed)}
    index = pd.MultiIndex.from_tuples(rows, names=["method", "fold", "seed"])
    values = np.asarray(list(rows.values()))
    return pd.DataFrame({"r2_de": values, "delta_pearson": values, "mmd": -values, "de_direction": values}, index)


def test_wins_count_only_beyond_seed_noise():
    results = seed_table({
        ("scLDM cf", "clear"): [0.90, 0.91, 0.92], ("mean shift", "clear"): [0.80, 0.81, 0.82],
        ("scLDM cf", "noisy"): [0.70, 0.90, 0.80], ("mean shift", "noisy"): [0.75, 0.77, 0.76],
        ("scLDM cf", "lost"): [0.50, 0.51, 0.52], ("mean shift", "lost"): [0.60, 0.61, 0.62],
    })
    no_change = seed_table({("no change", fold): [0.0] * 3 for fold in ["clear", "noisy", "lost"]})
    no_change["delta_pearson"] = np.nan  # undefined for an unchanged prediction: counts as beaten
    results = pd.concat([results, no_change])
    ours, baselines = ours_and_baselines(results)
    assert ours == ["scLDM cf"] and baselines == ["mean shift", "no change"]

    wins = wins_beyond_noise(results, ours, baselines)
    assert wins.loc["scLDM cf"].to_dict() == {"r2_de": 1, "delta_pearson": 1, "mmd": 1, "de_direction": 1, "folds": 3}
    tests = paired_tests(results, ours, baselines)
    assert tests.loc[("scLDM cf", "mean shift"), "r2_de"].startswith("+0.040 (p=")
    assert tests.loc[("scLDM cf", "no change"), "delta_pearson"] == "n/a"
