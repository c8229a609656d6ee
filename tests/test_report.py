"""The HTML report: one metrics table (with each metric's meaning) and three figures, from PBMC68k counts."""

import re

import numpy as np

from scldm_hf.data import load_pbmc68k_counts
from scldm_hf.evaluation import (
    METRIC_DESCRIPTIONS,
    NaiveNBBaseline,
    evaluate_generation,
    floor_description,
    summarize,
    write_report,
)

LABEL_KEY = "cell_type"


def test_write_report_contains_metrics_table_and_figures(tmp_path):
    adata = load_pbmc68k_counts()
    order = np.random.default_rng(0).permutation(adata.n_obs)
    train, test = (adata[part].copy() for part in np.array_split(order, 3)[:2])  # 234 and 233 cells
    naive = NaiveNBBaseline(LABEL_KEY).fit(train).sample(train.obs[LABEL_KEY].astype(str), seed=0)
    generated_by_model = {"real train": train, "naive NB": naive}
    summary = summarize({"naive NB": evaluate_generation(test, naive, LABEL_KEY, reference=train, min_cells=40)})

    path = write_report(tmp_path / "report", test, generated_by_model, summary, LABEL_KEY)

    assert path == tmp_path / "report" / "report.html"
    page = path.read_text()
    assert page.count("<table") == 1
    assert "<th>classifier_auroc</th>" in page and METRIC_DESCRIPTIONS["classifier_auroc"] in page
    assert "<th>classifier_auroc_real_floor</th>" in page and floor_description("classifier_auroc") in page
    assert "<th>naive NB</th>" in page and "real train: 234" in page
    assert f"{summary.loc['naive NB', 'mmd_rbf']:.4g}" in page
    assert len(re.findall(r'<img src="data:image/png;base64,[A-Za-z0-9+/=]{1000,}"', page)) == 3
    for figure in ["umap.png", "gene_moments.png", "marker_dotplot.png"]:
        assert (path.parent / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
