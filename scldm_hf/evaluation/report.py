"""`write_report`: one self-contained HTML page (metrics table + figures embedded as base64 PNG)."""

import base64
import html
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd
from anndata import AnnData

from .evaluate import FLOOR_SUFFIX, METRIC_DESCRIPTIONS, floor_description
from .plots import combine_real_and_generated, plot_gene_moments, plot_marker_dotplot, plot_umap

_STYLE = """
body { font-family: sans-serif; margin: 2em; max-width: 1400px; }
table { border-collapse: collapse; font-size: 13px; margin-bottom: 1em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
td:last-child { text-align: left; color: #555; }
th { background: #f2f2f2; }
img { max-width: 100%; border: 1px solid #eee; }
"""

FIGURES = {
    "umap.png": "UMAP of real and generated cells (PCA fitted on real cells)",
    "gene_moments.png": "Per-gene statistics, generated against real (log1p CP10k)",
    "marker_dotplot.png": "Marker genes of the real cells, per condition and source",
}


def _embedded_image(path: Path) -> str:
    encoded = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{encoded}" alt="{path.name}">'


def write_report(
    output_dir: str | Path,
    real: AnnData,
    generated_by_model: Mapping[str, AnnData],
    metrics_table: pd.DataFrame,
    condition_key: str | Sequence[str],
    *,
    marker_genes: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
    title: str = "scLDM generation report",
    seed: int = 0,
) -> Path:
    """Write `output_dir/report.html` plus its figures as PNG files next to it; return the HTML path.

    Args:
        real: held-out real counts; generated_by_model: `{model name: generated counts}` over the same genes.
        metrics_table: e.g. `summarize(...)` (one row per model) or one `evaluate_generation` table; it is shown
            transposed (one row per metric) with each metric's meaning.
        condition_key: obs column(s) used to colour and group cells.
        marker_genes: genes for the dot plot (list or `{group: genes}`); default: top markers of the real cells.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    combined = combine_real_and_generated(real, generated_by_model, condition_key, seed=seed)
    figures = {
        "umap.png": plot_umap(combined, output_dir / "umap.png", seed=seed),
        "gene_moments.png": plot_gene_moments(combined, output_dir / "gene_moments.png"),
        "marker_dotplot.png": plot_marker_dotplot(combined, output_dir / "marker_dotplot.png", marker_genes),
    }

    table = metrics_table.T  # one row per metric, one column per model (or condition)
    table["meaning"] = [floor_description(name) if name.endswith(FLOOR_SUFFIX) else METRIC_DESCRIPTIONS.get(name, "")
                        for name in table.index]
    cell_counts = ", ".join(f"{name}: {cells.n_obs}" for name, cells in {"real": real, **generated_by_model}.items())
    sections = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p>Cells: {html.escape(cell_counts)}. Genes: {real.n_vars}. "
        f"Condition: {html.escape(str(condition_key))}.</p>",
        "<h2>Metrics</h2>",
        *(f"<p>{html.escape(note)}</p>" for note in metrics_table.attrs.get("notes", [])),
        table.to_html(float_format=lambda value: f"{value:.4g}", na_rep="", border=0),
        *(f"<h2>{html.escape(FIGURES[name])}</h2>\n{_embedded_image(path)}" for name, path in figures.items()),
    ]
    page = (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_STYLE}</style></head>\n<body>\n" + "\n".join(sections) + "\n</body></html>\n"
    )
    report_path = output_dir / "report.html"
    report_path.write_text(page, encoding="utf-8")
    return report_path
