"""The seed-aware report of the perturbation benchmark over a table indexed by (method, fold, seed)."""

import numpy as np
import pandas as pd
from scipy.stats import wilcoxon

REFERENCE = "VAE round trip (held-out cells)"
HIGHER_IS_BETTER = {"r2_de": True, "delta_pearson": True, "mmd": False, "de_direction": True}


def markdown(frame: pd.DataFrame) -> str:
    """`frame` (index included) as a markdown table, numbers to 3 decimals."""
    return frame.reset_index().to_markdown(index=False, floatfmt=".3f")


def ours_and_baselines(results: pd.DataFrame) -> tuple[list[str], list[str]]:
    """The scLDM rows and the baseline rows of `results` (the VAE round trip is neither)."""
    methods = list(dict.fromkeys(results.index.get_level_values("method")))
    ours = [method for method in methods if method.startswith("scLDM")]
    return ours, [method for method in methods if method not in ours and method != REFERENCE]


def signed(results: pd.DataFrame, metric: str) -> pd.Series:
    """`metric` oriented so that larger is better, undefined values (no change's Δ) as the worst possible."""
    values = results[metric] if HIGHER_IS_BETTER[metric] else -results[metric]
    return values.fillna(-np.inf)


def mean_sd_over_seeds(results: pd.DataFrame) -> pd.DataFrame:
    """Per method: the mean over folds of each seed, then mean ± sd of those over seeds."""
    per_seed = results[list(HIGHER_IS_BETTER)].groupby(level=["method", "seed"], sort=False).mean()
    by_method = per_seed.groupby(level="method", sort=False)
    mean, sd = by_method.mean(), by_method.std(ddof=1).fillna(0)
    return pd.DataFrame({metric: [f"{m:.3f} ± {s:.3f}" for m, s in zip(mean[metric], sd[metric])]
                         for metric in mean}, index=mean.index)


def wins_beyond_noise(results: pd.DataFrame, ours: list[str], baselines: list[str]) -> pd.DataFrame:
    """Folds where each scLDM row beats every baseline on a metric by more than the seed-to-seed sd (the larger
    of the two methods' sds on that fold)."""
    wins = {}
    for metric in HIGHER_IS_BETTER:
        by_fold = signed(results, metric).groupby(level=["method", "fold"])
        mean, sd = by_fold.mean().unstack("method"), by_fold.std(ddof=1).fillna(0).unstack("method")
        for method in ours:
            beats = [(mean[method] - mean[baseline]) > np.maximum(sd[method], sd[baseline].replace(np.nan, 0))
                     for baseline in baselines]
            wins.setdefault(method, {})[metric] = int(np.logical_and.reduce(beats).sum())
    table = pd.DataFrame.from_dict(wins, orient="index").rename_axis("method")
    return table.assign(folds=results.index.get_level_values("fold").nunique())


def paired_tests(results: pd.DataFrame, ours: list[str], baselines: list[str]) -> pd.DataFrame:
    """Wilcoxon signed-rank over the (fold, seed) pairs of each scLDM row vs each baseline: the median difference
    (positive: ours better) and the two-sided p-value per metric."""
    rows = {}
    for metric in HIGHER_IS_BETTER:
        values = signed(results, metric).unstack("method")
        for method in ours:
            for baseline in baselines:
                difference = (values[method] - values[baseline]).replace([np.inf, -np.inf], np.nan).dropna()
                test = wilcoxon(difference) if len(difference) > 1 and difference.any() else None
                rows.setdefault((method, baseline), {})[metric] = (
                    f"{difference.median():+.3f} (p={test.pvalue:.3f}, n={len(difference)})" if test else "n/a")
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis(["method", "baseline"])


def best_per_metric(results: pd.DataFrame) -> pd.Series:
    """The method (round trip excluded) with the best mean of each metric."""
    mean = results.drop(REFERENCE, level="method", errors="ignore").groupby(level="method").mean()
    return pd.Series({metric: (mean[metric].idxmax() if higher else mean[metric].idxmin())
                      for metric, higher in HIGHER_IS_BETTER.items()}, name="best method").rename_axis("metric")


def summarize(results: pd.DataFrame) -> None:
    """Print the per-fold means, mean ± sd over seeds, wins beyond seed noise, paired tests and metric winners."""
    ours, baselines = ours_and_baselines(results)
    seeds = sorted(set(results.index.get_level_values("seed")))
    print(f"\nseeds {seeds}; per fold (mean over seeds)\n")
    print(markdown(results.groupby(level=["fold", "method"], sort=False).mean()))
    print("\nmean ± sd over seeds (each seed: mean over folds)\n")
    print(markdown(mean_sd_over_seeds(results)))
    print("\nfolds where an scLDM row beats every baseline by more than the seed-to-seed sd\n")
    print(markdown(wins_beyond_noise(results, ours, baselines)))
    print("\npaired Wilcoxon signed-rank over (fold, seed): median difference, ours minus baseline (sign: + better)\n")
    print(markdown(paired_tests(results, ours, baselines)))
    print("\nbest mean per metric\n")
    print(markdown(best_per_metric(results).to_frame()))
