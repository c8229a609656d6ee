"""`make demo`'s code path end to end, with the tiny recipe and a 2-epoch scVI (minutes become seconds)."""

from pathlib import Path

import pandas as pd
import pytest

from scldm_hf.demo import run_demo

TINY = Path(__file__).resolve().parents[1] / "training" / "configs" / "tiny.yaml"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_demo_trains_generates_evaluates_and_writes_the_report(tmp_path):
    report = run_demo(tmp_path, TINY, seed=0, guidance_scale=1.0, scvi_epochs=2)

    html = report.read_text()
    assert report == tmp_path / "report.html"
    for model in ("scLDM", "scVI", "naive NB"):
        assert model in html
    assert html.count("<img") >= 3, "UMAP, gene moments and marker dot plot"
    assert (tmp_path / "scldm" / "pipeline" / "model_index.json").is_file()

    summary = pd.read_csv(tmp_path / "metrics.csv", index_col="model")
    assert list(summary.index) == ["scLDM", "scVI", "naive NB"]
    # a second real sample is the floor beside every score: indistinguishable from the test cells, closer than any
    # generator here, and the same for every model (same test cells, same seeded subsampling)
    assert summary["nn_accuracy_real_floor"].nunique() == 1 and 0.35 < summary["nn_accuracy_real_floor"].iloc[0] < 0.65
    assert (summary["mmd_rbf_real_floor"] < summary["mmd_rbf"]).all()
    assert (summary["n_real"] == summary["n_generated"]).all()
    assert (summary["wall_time_s"] > 0).all()
