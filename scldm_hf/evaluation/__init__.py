"""Evaluation of generated cells (CFGen / scLDM protocol), VAE reconstruction metrics, baselines and HTML report.

Typical use::

    tables = {name: evaluate_generation(real_test, cells, "cell_type", reference=real_train, real_floor=real_other)
              for name, cells in {"scLDM": ours, "scVI": scvi_cells}.items()}
    write_report("outputs/report", real_test, {"scLDM": ours, "scVI": scvi_cells}, summarize(tables), "cell_type")
"""

from .baselines import NaiveNBBaseline, ScviGenerator
from .card_metrics import ProtocolCardMetrics
from .classifiers import cell_type_f1, real_vs_generated_auroc
from .distribution import (
    distribution_metrics,
    energy_distance,
    mmd_rbf,
    nearest_neighbor_accuracy,
    precision_recall_density_coverage,
    wasserstein,
)
from .evaluate import FLOOR_SUFFIX, METRIC_DESCRIPTIONS, evaluate_generation, floor_description, format_evaluation, summarize
from .genes import gene_correlation_agreement, gene_moment_agreement, gene_moments
from .plots import combine_real_and_generated, marker_genes_of_real, plot_gene_moments, plot_marker_dotplot, plot_umap
from .preprocessing import fit_real_pca, log_normalize
from .reconstruction import reconstruction_metrics
from .report import write_report

__all__ = [
    "FLOOR_SUFFIX",
    "METRIC_DESCRIPTIONS",
    "NaiveNBBaseline",
    "ProtocolCardMetrics",
    "ScviGenerator",
    "cell_type_f1",
    "combine_real_and_generated",
    "distribution_metrics",
    "energy_distance",
    "evaluate_generation",
    "fit_real_pca",
    "floor_description",
    "format_evaluation",
    "gene_correlation_agreement",
    "gene_moment_agreement",
    "gene_moments",
    "log_normalize",
    "marker_genes_of_real",
    "mmd_rbf",
    "nearest_neighbor_accuracy",
    "plot_gene_moments",
    "plot_marker_dotplot",
    "plot_umap",
    "precision_recall_density_coverage",
    "real_vs_generated_auroc",
    "reconstruction_metrics",
    "summarize",
    "wasserstein",
    "write_report",
]
