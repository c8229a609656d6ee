"""Building blocks of benchmarks/bench_perturbation.py: leak-free folds, the baselines and the seed-aware report."""
